"""``scripts/bench fleet``: what a fleet of N hosts running sdnsup does to the CC and the APs.

No kernel, no processes, no network: a discrete-event simulation of N hosts, each driven by
the policy code the daemon itself runs, called the way the supervisor calls it:

* when to ask the CC: :class:`sdnsup.refresh.RefreshSchedule` (start with or without a saved
  list, the periodic refresh, failures with and without an AP, the extra refresh after an AP
  death, no AP left);
* which AP: :func:`sdnsup.probe.rank` of each probe round, :class:`sdnsup.probe.Hysteresis`
  (hold-down after a death), :func:`sdnsup.choice.eligible` and :func:`sdnsup.choice.choose`
  (the band of near-equal APs and the weighted rendezvous choice, with the real
  :func:`sdnsup.probe.should_switch`);
* the timing constants of the supervisor and the keepalive (probe rounds every 30 s +-20%,
  2 s without an AP, the re-probe spread after a death, K x deadline to detect a death).

The policies take the time as an argument, so the simulation's clock is its event queue: it
jumps from one event to the next, as trio's MockClock does for the daemon's unit tests,
without a hundred thousand tasks. The CC answers instantly (or fails, during an outage);
three near-equal APs answer in 5.0, 5.3 and 6.1 ms, +-1 ms per round, with weights 1/1/2;
ttl is 60 s.

Scenarios, for each N (default 1k, 10k and 100k):

1. **restart, saved lists**: every host restarts within one second, each with its saved AP
   list. CC requests per second over the next 10 minutes; AP shares after the first round.
2. **restart, no saved list**: the same on a first boot (every host asks at once: N in one
   second, unavoidable), then the next 10 minutes.
3. **CC outage**: a fleet in its steady state; the CC fails every request for 10 minutes;
   the rate during, and the peak in the 10 minutes after.
4. **AP death, return, total outage**, one timeline: the busiest AP (weight 2) dies; its
   hosts fail over; CC peak in the 2 minutes after, shares a minute after. It returns after
   5 minutes: shares 2 minutes later. Then every AP dies for a minute and they come back 2 s
   apart: shares right after the first return and 2 minutes later.
5. **keepalive load**: probe packets per second on the busiest AP, and flows per host that a
   stateful device on the path keeps (UDP conntrack timeout 30 s).

Targets at N = 100k, ttl 60 s (issue "fleet behaviour"): restart with saved lists, peak <=
1.25 N/ttl; CC outage, <= 1.1 N/ttl during (the mean) and peak <= 1.25 N/ttl after; AP
death, CC peak <= 2 N/ttl; shares within +-5 points of the weight shares among near-equal
APs; busiest survivor after a death <= 1.05x its share. Prints the tables and writes
bench-results/fleet.json.
"""

from __future__ import annotations

import argparse
import heapq
import ipaddress
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import benchlib

from sdnsup.aps import AccessPoint
from sdnsup.choice import choose, eligible
from sdnsup.defaults import (
    DRAIN_INTERVAL,
    KEEPALIVE_INTERVAL,
    KEEPALIVE_MISSES,
    KEEPALIVE_TIMEOUT,
    REPROBE_INTERVAL,
)
from sdnsup.probe import PROBE_COUNT, Hysteresis, ProbeResult, rank, should_switch
from sdnsup.refresh import Outcome, RefreshSchedule
from sdnsup.supervisor import (
    NO_AP_REPROBE_INTERVAL,
    REPROBE_SPREAD,
    jittered,
)

TTL = 60.0
APS = tuple(
    AccessPoint(f"ap{i}", addr4=ipaddress.IPv4Address(f"10.77.0.{10 + i}"), weight=w)
    for i, w in ((1, 1), (2, 1), (3, 2))
)
AP1, AP2, AP3 = APS
BASE_RTT = {AP1: 0.0050, AP2: 0.0053, AP3: 0.0061}
RTT_JITTER = 0.001
# The keepalive's verdict: K missed probes, each with its deadline (keepalive module).
DETECT = KEEPALIVE_MISSES * KEEPALIVE_TIMEOUT
# Linux nf_conntrack_udp_timeout: how long a flow seen once each way is kept.
UDP_FLOW_TIMEOUT = 30.0
# The targets are for this size: below it, the noise of a 1-second bin (its Poisson spread,
# 1/sqrt(N/ttl): 8% at 10k, 25% at 1k) decides a peak more than the policy does.
TARGET_SIZE = 100_000
TARGETS = {
    "restart_saved_peak": 1.25,
    "outage_during_mean": 1.10,
    "outage_after_peak": 1.25,
    "death_peak": 2.0,
    "share_points": 0.05,
    "survivor_ratio": 1.05,
}
REFRESH, ROUND, DETECTED = 0, 1, 2


class Host:
    __slots__ = ("active", "dark", "host", "hyst", "ranking", "refresh_at", "round_at", "sched")

    def __init__(self, host: str, rng: random.Random) -> None:
        self.host = host
        self.sched = RefreshSchedule(TTL, rng)
        self.hyst = Hysteresis()
        self.active: AccessPoint | None = None
        self.dark = False  # no usable AP (the supervisor's NO_AP phase)
        self.ranking: tuple[ProbeResult, ...] = ()
        self.refresh_at = math.inf
        self.round_at = math.inf


class Fleet:
    """N hosts, the CC and the three APs, on one event queue."""

    def __init__(self, n: int, seed: int, *, rounds: bool = True) -> None:
        self.rng = random.Random(seed)
        random.seed(seed)  # supervisor.jittered draws from the module's generator
        self.hosts = [Host(f"host-{seed}-{i}", self.rng) for i in range(n)]
        self.rounds = rounds  # False: APs never change, the choice after start is final
        self.up = dict.fromkeys(APS, True)
        self.cc_up = True
        self.now = 0.0
        self.queue: list[tuple[float, int, int]] = []
        self.requests: list[float] = []

    # --- events ------------------------------------------------------------------------

    def _push(self, t: float, kind: int, i: int) -> None:
        heapq.heappush(self.queue, (t, kind, i))

    def _reschedule_refresh(self, i: int) -> None:
        h = self.hosts[i]
        if h.sched.due != h.refresh_at:
            h.refresh_at = h.sched.due
            self._push(h.refresh_at, REFRESH, i)

    def _schedule_round(self, i: int, t: float) -> None:
        h = self.hosts[i]
        if t < h.round_at or h.round_at <= self.now:
            h.round_at = t
            self._push(t, ROUND, i)

    def run_until(self, end: float) -> None:
        queue, hosts = self.queue, self.hosts
        while queue and queue[0][0] < end:
            t, kind, i = heapq.heappop(queue)
            self.now = t
            h = hosts[i]
            if kind == REFRESH:
                if t == h.refresh_at:
                    self._refresh(i, t)
            elif kind == ROUND:
                if t == h.round_at:
                    self._round(i, t)
            else:
                self._detected(i, t)
        self.now = end

    # --- what one host does (the supervisor's glue around the policy code) --------------

    def start(self, i: int, t: float, *, saved: bool) -> None:
        h = self.hosts[i]
        if not saved:
            self.requests.append(t)  # initial discovery: at once
        h.sched.start(t, saved=saved)
        self._reschedule_refresh(i)
        self._round(i, t)

    def _results(self) -> tuple[ProbeResult, ...]:
        out = []
        for ap in APS:
            if self.up[ap]:
                rtt = BASE_RTT[ap] + self.rng.uniform(-RTT_JITTER, RTT_JITTER)
                out.append(ProbeResult(ap, rtt, PROBE_COUNT, PROBE_COUNT))
            else:
                out.append(ProbeResult(ap, None, PROBE_COUNT, 0))
        return rank(out)

    def _round(self, i: int, t: float) -> None:
        h = self.hosts[i]
        h.ranking = self._results()
        h.hyst.observe(h.ranking, t)
        live = eligible(h.ranking, APS, lambda key: h.hyst.usable(key, t))
        if not live:
            if h.active is None and not h.dark:
                h.dark = True
                h.sched.no_ap(t)
                self._reschedule_refresh(i)
        else:
            choice = choose(
                live, host=h.host, active=h.active, listed=True, should_switch=should_switch
            )
            if choice is not None:
                h.active = choice.result.ap
                h.dark = False
        if self.rounds or h.active is None:
            interval = NO_AP_REPROBE_INTERVAL if h.active is None else REPROBE_INTERVAL
            h.round_at = t + jittered(interval)
            self._push(h.round_at, ROUND, i)
        else:
            h.round_at = math.inf

    def _refresh(self, i: int, t: float) -> None:
        h = self.hosts[i]
        self.requests.append(t)
        h.sched.fire(t)
        h.sched.done(t, Outcome(self.cc_up), has_ap=h.active is not None, ttl=TTL)
        h.refresh_at = math.inf
        self._reschedule_refresh(i)

    def _detected(self, i: int, t: float) -> None:
        """The keepalive's verdict on host ``i``'s active AP (the supervisor's _fail_over)."""
        h = self.hosts[i]
        dead = h.active
        if dead is None or self.up[dead]:
            return
        h.hyst.mark_dead(dead.id, t)
        live = [
            r for r in eligible(h.ranking, APS, lambda key: h.hyst.usable(key, t)) if r.ap != dead
        ]
        choice = choose(live, host=h.host, active=None, listed=True, should_switch=should_switch)
        h.active = choice.result.ap if choice is not None else None
        if h.active is not None:
            h.sched.ap_died(t)
            if not self.up[h.active]:
                # the last round saw it alive, but it is gone too: its keepalive says so
                self._push(t + DETECT + self.rng.uniform(0, KEEPALIVE_INTERVAL), DETECTED, i)
        else:
            h.dark = True
            h.sched.no_ap(t)
        self._reschedule_refresh(i)
        self._schedule_round(i, t + self.rng.uniform(0.0, REPROBE_SPREAD))

    # --- what the world does -----------------------------------------------------------

    def kill(self, ap: AccessPoint) -> None:
        self.up[ap] = False
        for i, h in enumerate(self.hosts):
            if h.active == ap:
                # the keepalive's verdict: K deadlines after the last answer, which came
                # within one interval before the death
                self._push(self.now + DETECT + self.rng.uniform(0, KEEPALIVE_INTERVAL), DETECTED, i)

    def revive(self, ap: AccessPoint) -> None:
        self.up[ap] = True

    def shares(self) -> dict[str, float]:
        count = Counter(h.active.id for h in self.hosts if h.active is not None)
        return {ap.id: count[ap.id] / len(self.hosts) for ap in APS}

    def rate(self, start: float, end: float) -> list[int]:
        """CC requests in each second of [start, end)."""
        bins = [0] * int(end - start)
        for t in self.requests:
            if start <= t < end:
                bins[int(t - start)] += 1
        return bins


# --- scenarios ---------------------------------------------------------------------------


def weight_shares(aps: Sequence[AccessPoint]) -> dict[str, float]:
    total = sum(ap.weight for ap in aps)
    return {ap.id: (ap.weight / total if ap in aps else 0.0) for ap in APS}


def p99(values: Sequence[int]) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))])


def steady(n: int, seed: int, *, rounds: bool = True) -> Fleet:
    """A fleet that started long ago: its refreshes and rounds spread as in steady state."""
    fleet = Fleet(n, seed, rounds=rounds)
    fleet.now = -3 * TTL
    for i in range(n):
        fleet.start(i, -3 * TTL + fleet.rng.uniform(0, TTL), saved=True)
    fleet.run_until(0.0)
    fleet.requests.clear()
    return fleet


def restart(n: int, seed: int, *, saved: bool) -> dict[str, Any]:
    fleet = Fleet(n, seed, rounds=False)
    starts = sorted(fleet.rng.uniform(0, 1) for _ in range(n))
    for i, t in enumerate(starts):
        fleet.now = t
        fleet.start(i, t, saved=saved)
    fleet.run_until(600.0)
    bins = fleet.rate(0.0, 600.0)
    later = fleet.rate(5.0, 600.0)
    return {
        "peak": max(bins),
        "p99": p99(bins),
        "peak_after_5s": max(later),
        "shares": fleet.shares(),
    }


def outage(n: int, seed: int) -> dict[str, Any]:
    fleet = steady(n, seed, rounds=False)
    fleet.cc_up = False
    fleet.run_until(600.0)
    fleet.cc_up = True
    fleet.run_until(1200.0)
    during, after = fleet.rate(0.0, 600.0), fleet.rate(600.0, 1200.0)
    return {
        "during_mean": sum(during) / len(during),
        "during_peak": max(during),
        "after_peak": max(after),
        "after_p99": p99(after),
    }


def deaths(n: int, seed: int) -> dict[str, Any]:
    fleet = steady(n, seed)
    before = fleet.shares()
    busiest = max(APS, key=lambda ap: before[ap.id])
    fleet.kill(busiest)
    fleet.run_until(60.0)
    after_death = fleet.shares()
    fleet.run_until(120.0)
    death_bins = fleet.rate(0.0, 120.0)
    fleet.run_until(300.0)
    fleet.revive(busiest)
    fleet.run_until(420.0)
    after_return = fleet.shares()
    fleet.run_until(600.0)
    for ap in APS:
        fleet.kill(ap)
    fleet.run_until(660.0)
    outage_bins = fleet.rate(600.0, 660.0)
    for k, ap in enumerate(APS):
        fleet.run_until(660.0 + 2 * k)
        fleet.revive(ap)
    fleet.run_until(663.5)
    first_back = fleet.shares()
    fleet.run_until(800.0)
    after_outage = fleet.shares()
    survivors = [ap for ap in APS if ap != busiest]
    wanted = weight_shares(survivors)
    ratio = max(after_death[ap.id] / wanted[ap.id] for ap in survivors)
    return {
        "busiest": busiest.id,
        "before": before,
        "death_peak": max(death_bins),
        "death_p99": p99(death_bins),
        "after_death": after_death,
        "after_death_wanted": wanted,
        "survivor_ratio": ratio,
        "after_return": after_return,
        "total_outage_cc_peak": max(outage_bins),
        "first_back": first_back,
        "after_outage": after_outage,
    }


def keepalive_load(n: int, shares: dict[str, float]) -> dict[str, float]:
    busiest = max(shares.values())
    per_round = PROBE_COUNT / REPROBE_INTERVAL  # every host probes every AP each round
    before = 1 / KEEPALIVE_INTERVAL * UDP_FLOW_TIMEOUT + len(APS) * per_round * UDP_FLOW_TIMEOUT
    return {
        "busiest_pps": n * busiest / KEEPALIVE_INTERVAL + n * per_round,
        "flows_per_host_before": before,
        "flows_per_host_now": float(len(APS)),
        "drain_pps_per_host": 1 / DRAIN_INTERVAL,
    }


# --- report ------------------------------------------------------------------------------


def deviation(got: dict[str, float], wanted: dict[str, float]) -> float:
    return max(abs(got[k] - wanted[k]) for k in wanted)


def fmt_shares(shares: dict[str, float]) -> str:
    return "/".join(f"{shares[ap.id] * 100:.1f}" for ap in APS)


def judge(value: float, target: float | None, n: int) -> str:
    if target is None or n < TARGET_SIZE:
        return "-"
    return "ok" if value <= target else "MISSED"


def cc_rows(n: int, r: dict[str, Any]) -> list[list[str]]:
    steady_rate = n / TTL
    saved, cold, down, life = r["restart_saved"], r["restart_cold"], r["cc_outage"], r["deaths"]
    rows = [
        ("restart, saved lists", saved["peak"], saved["p99"], "restart_saved_peak"),
        ("restart, no saved list", cold["peak"], cold["p99"], None),
        ("  same, after the first 5 s", cold["peak_after_5s"], None, None),
        ("CC outage, during (mean)", down["during_mean"], None, "outage_during_mean"),
        ("CC outage, during (peak)", down["during_peak"], None, None),
        ("CC outage, after", down["after_peak"], down["after_p99"], "outage_after_peak"),
        (f"death of {life['busiest']}", life["death_peak"], life["death_p99"], "death_peak"),
        ("every AP dead (no AP: fast backoff)", life["total_outage_cc_peak"], None, None),
    ]  # fmt: skip
    out = []
    for what, peak, p99_, key in rows:
        x = peak / steady_rate
        target = TARGETS[key] if key else None
        out.append(
            [
                f"{n:,}",
                what,
                f"{peak:.0f}",
                "-" if p99_ is None else f"{p99_:.0f}",
                f"{x:.2f}",
                "-" if target is None else f"<= {target:g}",
                judge(x, target, n),
            ]
        )
    return out


def share_rows(n: int, r: dict[str, Any]) -> list[list[str]]:
    life, everyone = r["deaths"], weight_shares(APS)
    wanted = life["after_death_wanted"]
    rows = [
        ("at start", r["restart_saved"]["shares"], everyone, True),
        (f"1 min after {life['busiest']} died", life["after_death"], wanted, True),
        ("2 min after it returned", life["after_return"], everyone, True),
        ("3.5 s after a total outage", life["first_back"], everyone, False),
        ("2 min after a total outage", life["after_outage"], everyone, True),
    ]  # fmt: skip
    out = []
    for when, got, wanted, judged in rows:
        dev = deviation(got, wanted)
        verdict = judge(dev, TARGETS["share_points"] if judged else None, n)
        out.append(
            [f"{n:,}", when, fmt_shares(got), fmt_shares(wanted), f"{dev * 100:.1f}", verdict]
        )
    return out


def load_row(n: int, r: dict[str, Any]) -> list[str]:
    load, survivor = r["keepalive"], r["deaths"]["survivor_ratio"]
    verdict = judge(survivor, TARGETS["survivor_ratio"], n)
    return [
        f"{n:,}",
        f"{load['busiest_pps']:,.0f}",
        f"{survivor:.3f} (<= {TARGETS['survivor_ratio']:g}) {verdict}",
        f"{load['flows_per_host_before']:.0f} -> {load['flows_per_host_now']:.0f}",
        f"{r['simulated_in_s']:.1f} s",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1_000, 10_000, 100_000],
        help="fleet sizes, comma-separated (default 1000,10000,100000)",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    figures: dict[str, Any] = {"ttl": TTL, "targets": TARGETS, "sizes": {}}
    cc: list[list[str]] = []
    shares: list[list[str]] = []
    load: list[list[str]] = []
    for n in args.sizes:
        started = time.monotonic()
        life = deaths(n, args.seed + 3)
        r = {
            "restart_saved": restart(n, args.seed, saved=True),
            "restart_cold": restart(n, args.seed + 1, saved=False),
            "cc_outage": outage(n, args.seed + 2),
            "deaths": life,
            "keepalive": keepalive_load(n, life["before"]),
        }
        r["simulated_in_s"] = time.monotonic() - started
        figures["sizes"][n] = r
        cc += cc_rows(n, r)
        shares += share_rows(n, r)
        load.append(load_row(n, r))
        print(f"fleet of {n:,}: simulated in {r['simulated_in_s']:.1f} s", file=sys.stderr)

    benchlib.print_table(
        f"CC requests per second (x = peak / (N/ttl), ttl 60 s; targets judged at N = "
        f"{TARGET_SIZE:,})",
        ["N", "scenario", "peak/s", "p99/s", "x", "target", ""],
        cc,
    )
    benchlib.print_table(
        "AP shares, % of hosts on ap1/ap2/ap3 (weights 1/1/2, RTT 5.0/5.3/6.1 +-1 ms)",
        ["N", "when", "shares", "weight shares", "max dev (points)", ""],
        shares,
    )
    benchlib.print_table(
        "keepalive load and failover spread",
        ["N", "probe pkts/s on busiest AP", "busiest survivor / its share", "flows/host", "sim"],
        load,
    )
    path = benchlib.write_json("fleet", figures)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
