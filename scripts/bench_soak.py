"""``scripts/bench soak``: 1,000 AP flaps and 200 link flaps with traffic; then look for leaks.

Everything runs in one lab of network namespaces (:class:`sdnsup.lab.Lab`: client A, router R,
host B, N_APS = 40 APs with probe agents, the lab CC), removed at the end, also on failure;
nothing in the host's namespace changes. The real sdnsup runs in A, steering B's subnets (IPv4
and IPv6) through the APs the CC lists, with a short keepalive so that 1,000 failovers fit in
the 10 minutes the soak may take (every other setting is the default).

Traffic: :class:`sdnsup.lab.traffic.ConnectionStream`, a new TCP connection A -> B and B -> A
every STREAM_INTERVAL for the whole soak (B -> A is the seed's hard problem: those replies
must never be steered, whatever happens to the APs).

Faults, interleaved evenly (a link flap after every ~5 AP flaps):

* AP flap: cut the active AP's link (``ip link set up0 down`` in the AP, found from sdnsup's
  nexthop in A), wait until sdnsup's nexthop names another AP (or none: no AP usable), bring
  the link back. A dead AP is held down for 10 s before sdnsup uses it again, so the lab has
  enough APs for the flaps to keep finding a live one.
* link flap: A's own interface down for LINK_DOWN, up again (and the default routes the kernel
  dropped put back, as a network manager would), then wait until sdnsup's state is complete.

After a warm-up (a few flaps of each kind, not counted) the baseline is taken: sdnsup's kernel
objects in A, its open file descriptors and its RSS, with sdnsup idle. At the end, the same:

* kernel objects: exactly what sdnsup intends, nothing duplicated: one nftables table (the
  same chains, rules and set contents as at the baseline), one policy rule and one nexthop
  per family, one route per CIDR pointing at its nexthop, no route of sdnsup's elsewhere;
* file descriptors: the count at the end is not above the baseline (both the minimum over a
  second of samples: a probe in flight holds a socket for a moment);
* RSS growth under 5 MB;
* sdnsup still serving: ``sdnsup status`` connected, connections A -> B through an AP again
  and B -> A working, within a bound, and staying so;
* the traffic's success rate over the soak (A -> B fails while an AP is cut, both directions
  while A's link is down), and the failures outside those fault windows, counted apart
  (expected: none).

Then, in a second lab (CHANGE_APS APs, more than the 7 AP slots), the AP changes that are
not deaths: ``--ap-changes`` (1,000) switches to a faster AP (the agents' answer delays make
the next AP of a round robin clearly faster), with SESSIONS long-lived sessions open all along
(a line every 100 ms each; every change closes the oldest sessions and opens as many new ones
through the new AP, so the sessions are spread over the last few APs, and drained APs free
their slots for others). A switch that finds every slot taken is refused by sdnsup (counted
apart: it keeps the sessions pinned). Checked: no line lost, no session reset, no session
changed path; at the end, with the sessions closed, every slot but the active AP's is freed
(kernel objects, pins and conntrack marks), and sdnsup's fds and RSS did not grow.

Prints a table and writes bench-results/soak.json. Exit status: 1 when a leak is found, when
sdnsup stopped serving or did not react to a flap within FLAP_TIMEOUT, when a session lost a
line (correctness results, not timing), or when a measurement could not be taken; 0
otherwise. ``--ap-flaps`` / ``--link-flaps`` / ``--ap-changes`` scale it down for a quick
check; a phase that its 10-minute budget cuts short says so (INCOMPLETE) and checks what it
did.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench_datapath import wait_idle
from bench_footprint import ProcSample, fd_kinds, is_sdnsup, sample
from benchlib import no_lab_exit, print_table, stat, write_json

from sdnsup.lab import Lab, LabError, WaitTimeout, wait_for
from sdnsup.lab.commands import run
from sdnsup.lab.measure import owns
from sdnsup.lab.traffic import A_TO_B, B_TO_A, Attempt, ConnectionStream
from sdnsup.routes import RTPROT_SDNSUP

CIDRS = ("10.10.10.0/24", "fd10:10:10::/64")  # B's subnets, both families
AP_FLAPS = 1_000
LINK_FLAPS = 200
# A dead AP is reused only after sdnsup's 10 s hold-down (sdnsup.probe.HOLD_DOWN) and a
# probe round it fully answered; with a flap every ~0.35 s some 30 APs are held down at
# any time, so the lab needs more than that to always have a live one to fail over to.
N_APS = 40
# Keepalive: 0.1 s interval and deadline, 2 misses: a verdict 0.2-0.3 s after the cut, so
# 1,000 flaps fit in the budget; comfortably above the shortest settings sdnsup accepts, so
# a loaded machine does not turn late answers into extra failovers.
KEEPALIVE = ("--keepalive-interval", "0.1", "--keepalive-timeout", "0.1", "--keepalive-misses", "2")
LINK_DOWN = 0.1
STREAM_INTERVAL = 0.05  # per direction: 20 new connections a second each way
# Healthy time after every flap, so that the traffic does not only ever meet faults: the new
# connections started in it must all succeed (failures outside faults are reported apart).
# 1,200 flaps x 0.1 s fit in the budget next to the flaps themselves (~0.3 s each).
FLAP_GAP = 0.1
STREAM_TIMEOUT = 1.0
# A connection that ends this close to a fault may still have been hit by it (the link-down
# command returns before the kernel has dropped everything, a packet was in flight).
FAULT_MARGIN = 0.05
WARMUP_AP_FLAPS = 10
WARMUP_LINK_FLAPS = 2
RSS_GROWTH_LIMIT_MB = 5.0
FD_SAMPLES = 10  # over about a second: the minimum is the steady set of fds
MAX_SECONDS = 600.0  # the whole soak, start-up and checks included
FINAL_RESERVE = 60.0  # kept for the final checks when the flaps are cut short by the budget
MB = 1024 * 1024

# Bounds: nothing here waits longer than this for anything.
START_TIMEOUT = 30.0
FLAP_TIMEOUT = 10.0  # AP cut -> sdnsup's nexthop moved; link up -> state complete
NO_AP_TIMEOUT = 20.0  # no usable AP -> one chosen again: hold-down 10 s + a probe round
SERVE_TIMEOUT = 15.0  # end of the flaps -> traffic through an AP again
STAY_HEALTHY = 3.0
STOP_TIMEOUT = 10.0
POLL = 0.01


class BenchError(Exception):
    """A measurement could not be taken."""


# --- sdnsup's state in A ----------------------------------------------------------------------


def _ip_json(lab: Lab, *argv: str) -> list[dict[str, Any]]:
    out = run(["ip", "-n", lab.ns_a, "-j", *argv]).stdout.strip()
    return json.loads(out) if out else []


def active_ap(lab: Lab) -> int | None:
    """The AP index sdnsup's IPv4 nexthop names, None when it has none (no AP usable)."""
    by_addr = {str(ap.addr): ap.index for ap in lab.aps}
    for nh in _ip_json(lab, "nexthop", "show"):
        if owns(nh) and nh.get("gateway") in by_addr:
            return by_addr[nh["gateway"]]
    return None


def state_complete(lab: Lab) -> bool:
    """Whether sdnsup's nexthops, rules and routes are all in A (both families): per family
    the CIDR routes' nexthop and the active AP slot's (a draining slot may add one)."""
    nhs = [n for n in _ip_json(lab, "nexthop", "show") if owns(n) and "gateway" in n]
    if len(nhs) < 4:
        return False
    for fam in ("-4", "-6"):
        if not any(owns(r) for r in _ip_json(lab, fam, "rule", "show")):
            return False
        if not _ip_json(lab, fam, "route", "show", "table", "7300"):
            return False
    return True


def _strip_handles(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_handles(v) for k, v in obj.items() if k != "handle"}
    if isinstance(obj, list):
        return [_strip_handles(v) for v in obj]
    return obj


def kernel_objects(lab: Lab) -> dict[str, Any]:
    """Everything in A that is sdnsup's, or would be if it leaked, comparable with ==.

    The nexthops' gateways and ids are left out (the active AP and its slot change with every
    flap); everything else must be the same at the baseline and at the end.
    """
    nft = json.loads(run(["ip", "netns", "exec", lab.ns_a, "nft", "-j", "list", "ruleset"]).stdout)
    items = [_strip_handles(o) for o in nft["nftables"] if "metainfo" not in o]
    tables = sorted((o["table"]["family"], o["table"]["name"]) for o in items if "table" in o)
    table_items = [o for o in items if "table" not in o]
    for o in table_items:  # set elements in a stable order
        for v in o.values():
            if isinstance(v, dict) and isinstance(v.get("elem"), list):
                v["elem"] = sorted(v["elem"], key=json.dumps)
    nexthops = sorted(
        (n["id"], str(n.get("protocol")), n.get("dev", "")) for n in _ip_json(lab, "nexthop")
    )
    # which AP holds which slot changes with every flap: the pins chain names the APs
    for o in table_items:
        if o.get("rule", {}).get("chain") == "pins":
            o["rule"]["expr"] = "(the slots' AP addresses)"
    objs: dict[str, Any] = {
        "nft tables": tables,
        "nft objects": sorted(table_items, key=json.dumps),
        "nexthops (id, proto, dev)": [(0, p, d) for _, p, d in nexthops],
    }
    for fam in ("-4", "-6"):
        objs[f"rules {fam}"] = _ip_json(lab, fam, "rule", "show")
        routes = _ip_json(lab, fam, "route", "show", "table", "all", "proto", str(RTPROT_SDNSUP))
        objs[f"sdnsup routes {fam}"] = sorted(
            (r["dst"], str(r.get("table")) if r["dst"] != "default" else "slot", r.get("nhid"))
            for r in routes
            if r["dst"] != "default"
        )
        objs[f"slot routes {fam}"] = len([r for r in routes if r["dst"] == "default"])
        objs[f"table 7300 {fam}"] = len(_ip_json(lab, fam, "route", "show", "table", "7300"))
    return objs


def intended(objs: dict[str, Any]) -> list[str]:
    """What in ``objs`` is not exactly sdnsup's intended state (an empty list: all good):
    after AP deaths only (the soak's flaps), no AP drains, so per family the CIDR routes'
    nexthop and the active AP slot's, one rule, the CIDR route and the slot's default."""
    from sdnsup.state import NHID_V4, NHID_V6

    problems = []
    if objs["nft tables"] != [("inet", "sdnsup")]:
        problems.append(f"nft tables in A: {objs['nft tables']} (want only inet sdnsup)")
    ours = [n for n in objs["nexthops (id, proto, dev)"] if owns({"protocol": n[1]})]
    if len(ours) != 4 or len(objs["nexthops (id, proto, dev)"]) != 4:
        problems.append(
            f"nexthops: {objs['nexthops (id, proto, dev)']} (want two per family: the CIDR "
            "routes' and the active AP slot's)"
        )
    nhids = {NHID_V4, NHID_V6}
    for fam, cidr in (("-4", CIDRS[0]), ("-6", CIDRS[1])):
        rules = [r for r in objs[f"rules {fam}"] if owns(r)]
        if len(rules) != 1:
            problems.append(f"sdnsup rules {fam}: {rules} (want exactly one)")
        routes = objs[f"sdnsup routes {fam}"]
        if len(routes) != 1 or routes[0][0] != cidr or routes[0][2] not in nhids:
            problems.append(f"sdnsup routes {fam}: {routes} (want {cidr} via its nexthop)")
        if objs[f"slot routes {fam}"] != 1:
            problems.append(f"AP slot routes {fam}: {objs[f'slot routes {fam}']} (want 1)")
        if objs[f"table 7300 {fam}"] != 1:
            problems.append(f"table 7300 {fam} holds {objs[f'table 7300 {fam}']} routes, not 1")
    return problems


def leftovers(objs: dict[str, Any]) -> list[str]:
    """What of sdnsup's is still in ``objs`` (after it stopped: must be nothing)."""
    out = []
    if ("inet", "sdnsup") in objs["nft tables"]:
        out.append("nft table inet sdnsup")
    out += [f"nexthop {n}" for n in objs["nexthops (id, proto, dev)"] if owns({"protocol": n[1]})]
    for fam in ("-4", "-6"):
        out += [f"rule {r}" for r in objs[f"rules {fam}"] if owns(r)]
        out += [f"route {r}" for r in objs[f"sdnsup routes {fam}"]]
        out += [f"{n} slot default routes {fam}" for n in [objs[f"slot routes {fam}"]] if n]
    return out


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    out = []
    for key in before:
        if before[key] != after.get(key):
            out.append(
                f"{key} changed:\n    at the baseline: {before[key]}\n"
                f"    at the end:      {after.get(key)}"
            )
    return out


# --- the process ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """sdnsup at rest: kernel objects, steady fd count, RSS."""

    objects: dict[str, Any]
    fds: int  # minimum over FD_SAMPLES samples
    fd_kinds: dict[str, int]
    proc: ProcSample


def snapshot(lab: Lab, pid: int) -> Snapshot:
    """Wait until sdnsup is idle, then read its kernel objects, fds and memory."""
    try:
        wait_idle(pid)
    except WaitTimeout as exc:
        raise BenchError(f"sdnsup does not come to rest: {exc}") from None
    fds: list[tuple[int, dict[str, int]]] = []
    for _ in range(FD_SAMPLES):
        fds.append((sample(pid).fds, fd_kinds(pid)))
        time.sleep(0.1)
    low = min(fds, key=lambda f: f[0])
    return Snapshot(kernel_objects(lab), low[0], low[1], sample(pid))


# --- the flaps --------------------------------------------------------------------------------


@dataclass
class Flaps:
    failover: list[float] = field(default_factory=list)  # AP cut -> nexthop moved
    heal: list[float] = field(default_factory=list)  # link up -> state complete
    outcomes: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)  # sdnsup did not react in time
    # (start, end, kind) of every fault, warm-up included: an AP cut until sdnsup left the AP,
    # a link down until sdnsup's state was complete again (time.monotonic(), the clock of
    # the traffic's records too)
    windows: list[tuple[float, float, str]] = field(default_factory=list)

    @property
    def ap_done(self) -> int:
        return sum(n for k, n in self.outcomes.items() if k.startswith("ap "))

    @property
    def link_done(self) -> int:
        return sum(n for k, n in self.outcomes.items() if k.startswith("link "))


def _poll(what: str, timeout: float, predicate: Callable[[], Any]) -> Any:
    try:
        return wait_for(what, timeout, predicate, step=POLL)
    except WaitTimeout:
        return None


def ap_flap(lab: Lab, flaps: Flaps, count: bool = True) -> None:
    """Cut the active AP, wait for sdnsup to leave it, bring it back."""
    idx = _poll("an active AP", NO_AP_TIMEOUT, lambda: active_ap(lab))
    if idx is None:
        flaps.problems.append(f"no AP active within {NO_AP_TIMEOUT:.0f} s")
        flaps.outcomes["ap: no AP to cut"] += 1
        return

    def left() -> tuple[int | None] | None:
        now = active_ap(lab)
        return (now,) if now != idx else None  # a tuple: "moved to no AP" is truthy too

    t0 = time.monotonic()
    lab.ap_link_down(idx)
    try:
        moved = _poll(f"sdnsup to leave AP{idx}", FLAP_TIMEOUT, left)
        elapsed = time.monotonic() - t0
    finally:
        lab.ap_link_up(idx)
        flaps.windows.append((t0, time.monotonic(), "ap"))
    if not count:
        return
    if moved is None:
        flaps.problems.append(f"sdnsup still on AP{idx} {FLAP_TIMEOUT:.0f} s after its cut")
        flaps.outcomes["ap flap: no failover"] += 1
        return
    flaps.failover.append(elapsed)
    flaps.outcomes["ap flap: failed over" if moved[0] else "ap flap: no AP left"] += 1


def link_flap(lab: Lab, flaps: Flaps, count: bool = True) -> None:
    """A's interface down for LINK_DOWN, up, default routes back; wait for sdnsup's state."""
    dev = lab.a_ifname
    down = time.monotonic()
    run(["ip", "-n", lab.ns_a, "link", "set", dev, "down"])
    time.sleep(LINK_DOWN)
    run(["ip", "-n", lab.ns_a, "link", "set", dev, "up"])
    t0 = time.monotonic()
    # The kernel dropped the default routes with the link; a network manager would put them
    # back (sockets need them to pick a source address), so the soak does, as the tests do.
    run(["ip", "-n", lab.ns_a, "route", "replace", "default", "via", str(lab.router_addr)])
    run(["ip", "-n", lab.ns_a, "-6", "route", "replace", "default", "via", str(lab.router_addr6)])
    healed = _poll("sdnsup's state after a link flap", FLAP_TIMEOUT, lambda: state_complete(lab))
    flaps.windows.append((down, time.monotonic(), "link"))
    if not count:
        return
    if not healed:
        flaps.problems.append(f"sdnsup's state incomplete {FLAP_TIMEOUT:.0f} s after link up")
        flaps.outcomes["link flap: not healed"] += 1
        return
    flaps.heal.append(time.monotonic() - t0)
    flaps.outcomes["link flap: healed"] += 1


def unexplained(
    attempts: Sequence[Attempt], windows: Sequence[tuple[float, float, str]], kinds: set[str]
) -> list[str]:
    """The failed attempts that overlap no fault window of ``kinds`` (give or take
    FAULT_MARGIN), as "#seq: why"."""
    spans = [(a - FAULT_MARGIN, b + FAULT_MARGIN) for a, b, kind in windows if kind in kinds]
    return [
        f"#{a.seq} at {a.t0:.3f}: {a.err}"
        for a in attempts
        if not a.ok and not any(a.t0 <= end and a.t1 >= start for start, end in spans)
    ]


def schedule(ap_flaps: int, link_flaps: int) -> list[str]:
    """The flaps in order, link flaps spread evenly among the AP flaps."""
    total = ap_flaps + link_flaps
    out = []
    for i in range(total):
        is_link = (i + 1) * link_flaps // total > i * link_flaps // total
        out.append("link" if is_link else "ap")
    return out


# --- the soak ---------------------------------------------------------------------------------


@dataclass
class Soak:
    asked: tuple[int, int]
    flaps: Flaps = field(default_factory=Flaps)
    base: Snapshot | None = None
    end: Snapshot | None = None
    leaks: dict[str, list[str]] = field(default_factory=dict)  # "kernel"/"fds"/"rss" -> what
    serving: list[str] = field(default_factory=list)  # why it is not serving ([] = serving)
    status: dict[str, Any] = field(default_factory=dict)
    traffic: dict[str, tuple[int, int]] = field(default_factory=dict)  # dir -> (tried, failed)
    recovery: float | None = None
    flaps_started: float = 0.0  # time.monotonic() after the warm-up
    unexplained: dict[str, list[str]] = field(default_factory=dict)  # failures outside faults
    seconds: float = 0.0
    complete: bool = False


def soak(lab: Lab, args: argparse.Namespace, res: Soak, started: float) -> None:
    lab.start_ap_agents()
    url = lab.start_cc()
    proc = lab.run_sdnsup(lab.ns_a, "-r", ",".join(CIDRS), "--cc", url, *KEEPALIVE)

    def up() -> bool:
        if proc.poll() is not None:
            raise BenchError(f"sdnsup exited {proc.returncode}:\n{lab.logs(proc)}")
        return "probe ranking:" in lab.logs(proc) and state_complete(lab)

    try:
        wait_for("sdnsup to be up", START_TIMEOUT, up, step=0.1)
    except WaitTimeout as exc:
        raise BenchError(f"{exc}:\n{lab.logs(proc)}") from None
    if not is_sdnsup(proc.pid):
        raise BenchError(f"process {proc.pid} is not sdnsup: {proc.args!r}")
    budget = started + MAX_SECONDS - time.monotonic()
    overlays = {str(ap.overlay_addr) for ap in lab.aps}
    with ConnectionStream(
        lab, interval=STREAM_INTERVAL, timeout=STREAM_TIMEOUT, max_seconds=budget
    ) as stream:
        print("warm-up...", file=sys.stderr, flush=True)
        for kind in schedule(
            min(WARMUP_AP_FLAPS, args.ap_flaps), min(WARMUP_LINK_FLAPS, args.link_flaps)
        ):
            (ap_flap if kind == "ap" else link_flap)(lab, res.flaps, count=False)
            time.sleep(FLAP_GAP)
        # The last warm-up flap may have left no usable AP for a moment (all held down).
        _poll("sdnsup connected after the warm-up", NO_AP_TIMEOUT, lambda: state_complete(lab))
        res.base = snapshot(lab, proc.pid)
        problems = intended(res.base.objects)
        if problems:
            raise BenchError(
                "sdnsup's state after the warm-up is not as intended:\n  " + "\n  ".join(problems)
            )
        plan = schedule(args.ap_flaps, args.link_flaps)
        deadline = started + MAX_SECONDS - FINAL_RESERVE
        t0 = res.flaps_started = time.monotonic()
        for i, kind in enumerate(plan):
            if time.monotonic() > deadline:
                break
            if proc.poll() is not None:
                raise BenchError(f"sdnsup exited {proc.returncode} during the soak")
            (ap_flap if kind == "ap" else link_flap)(lab, res.flaps)
            time.sleep(FLAP_GAP)
            if (i + 1) % 100 == 0:
                print(
                    f"{i + 1}/{len(plan)} flaps, {time.monotonic() - t0:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
        res.seconds = time.monotonic() - t0
        res.complete = res.flaps.ap_done + res.flaps.link_done == len(plan)
        # Still serving: through an AP again, both directions, and staying so.
        stream.mark("end of the flaps")
        try:
            res.recovery = stream.wait_healthy(SERVE_TIMEOUT, via=overlays)
            stream.stay_healthy(STAY_HEALTHY)
        except LabError as exc:
            res.serving.append(f"traffic after the flaps: {exc}")
        res.traffic = dict(stream.report().by_direction)
        # A -> B may fail while an AP is cut or A's link is down; B -> A only while A's link
        # is down (its replies are never steered: the seed's hard problem). Anything else
        # failing is a finding.
        res.unexplained[A_TO_B] = unexplained(
            stream.attempts(A_TO_B), res.flaps.windows, {"ap", "link"}
        )
        res.unexplained[B_TO_A] = unexplained(stream.attempts(B_TO_A), res.flaps.windows, {"link"})
    res.end = snapshot(lab, proc.pid)
    status = lab.exec(lab.ns_a, *_sdnsup("status", "--json"), check=False)
    try:
        res.status = json.loads(status.stdout)
    except ValueError:
        res.serving.append(f"sdnsup status: exit {status.returncode}: {status.stderr.strip()}")
    if status.returncode != 0:
        res.serving.append(f"sdnsup status exit {status.returncode} (0 = connected)")
    kernel = intended(res.end.objects) + differences(res.base.objects, res.end.objects)
    if res.end.fds > res.base.fds:
        res.leaks["fds"] = [
            f"{res.base.fds} after the warm-up, {res.end.fds} at the end "
            f"({res.base.fd_kinds} -> {res.end.fd_kinds})"
        ]
    growth = (res.end.proc.rss - res.base.proc.rss) / MB
    if growth >= RSS_GROWTH_LIMIT_MB:
        res.leaks["rss"] = [f"grew by {growth:.1f} MB (limit {RSS_GROWTH_LIMIT_MB:.0f} MB)"]
    code = lab.stop(proc, grace=STOP_TIMEOUT)
    if code != 0:
        res.serving.append(f"sdnsup exited {code} on SIGTERM")
    kernel += [f"after SIGTERM: {x}" for x in leftovers(kernel_objects(lab))]
    if kernel:
        res.leaks["kernel"] = kernel


def _sdnsup(*args: str) -> list[str]:
    return [sys.executable, "-m", "sdnsup.cli", *args]


# --- AP changes under live sessions -----------------------------------------------------------

AP_CHANGES = 1_000
# More APs than the 7 AP slots of the default mask: numbers are freed and reused.
CHANGE_APS = 9
SESSIONS = 20
# Each change closes this many of the oldest sessions and opens as many through the new AP:
# a session lives SESSIONS / ROLL changes, spread over the last few APs.
ROLL = 4
# sdnsup status (a process start) every this many changes: the most slots in use.
STATUS_EVERY = 10
FAST_DELAY = 0.0
SLOW_DELAY = 0.030  # the others: > 10 ms and > 33% slower, so the anti-flap rule switches
CHANGE_TIMEOUT = 3.0  # a probe round every 0.2 s: a switch within a few rounds
DRAIN_TIMEOUT = 20.0  # sessions closed -> every other slot freed (counts every 2 s)
CHANGE_ARGS = ("--reprobe-interval", "0.2")


@dataclass
class Changes:
    asked: int
    done: int = 0
    refused: int = 0  # every slot held pinned connections: sdnsup kept the active AP
    seconds: float = 0.0
    switch: list[float] = field(default_factory=list)  # delays changed -> new AP active
    opened: int = 0
    sent: int = 0
    answered: int = 0
    errors: list[str] = field(default_factory=list)
    path_changes: list[str] = field(default_factory=list)
    most_slots: int = 0
    leaks: list[str] = field(default_factory=list)
    fds: tuple[int, int] = (0, 0)
    rss_mb: tuple[float, float] = (0.0, 0.0)
    complete: bool = False


def _active_by_nexthop(lab: Lab) -> int | None:
    """The AP the CIDR routes' IPv4 nexthop (slot 0's id) names."""
    from sdnsup.state import NHID_V4

    by_addr = {str(ap.addr): ap.index for ap in lab.aps}
    for nh in _ip_json(lab, "nexthop", "show"):
        if nh.get("id") == NHID_V4:
            return by_addr.get(nh.get("gateway", ""))
    return None


def _steady_fds(pid: int) -> int:
    """The fewest open fds over about a second: a probe in flight holds a socket a moment."""
    low = []
    for _ in range(FD_SAMPLES):
        low.append(sample(pid).fds)
        time.sleep(0.1)
    return min(low)


def _is_active(lab: Lab, index: int) -> bool:
    return _active_by_nexthop(lab) == index


def _status(lab: Lab) -> dict[str, Any]:
    out = lab.exec(lab.ns_a, *_sdnsup("status", "--json"), check=False).stdout
    try:
        found: dict[str, Any] = json.loads(out)
    except ValueError:
        return {}
    return found or {}


def _close(tickers: list[Any], res: Changes) -> None:
    from sdnsup.lab.services import Ticker

    for t in tickers:
        assert isinstance(t, Ticker)
        t.close()  # all at once, then collect
    for t in tickers:
        report = t.stop()
        res.sent += report.sent
        res.answered += report.answered
        res.errors += [f"{t.description}: {e['err']} {e['text']}" for e in report.errors]
        if len(report.peers) > 1:
            res.path_changes.append(f"{t.description}: {dict(report.peers)}")


def changes(args: argparse.Namespace, res: Changes) -> None:
    from sdnsup.state import Settings

    started = time.monotonic()
    with Lab.create(n_aps=CHANGE_APS) as lab:
        lab.start_ap_agents({i: SLOW_DELAY for i in range(2, CHANGE_APS + 1)})
        url = lab.start_cc()
        lab.set_cc()
        lab.serve_whoami(lab.ns_b)
        proc = lab.run_sdnsup(lab.ns_a, "-r", ",".join(CIDRS), "--cc", url, *CHANGE_ARGS)
        try:
            wait_for("sdnsup on AP 1", START_TIMEOUT, lambda: _active_by_nexthop(lab) == 1)
            wait_idle(proc.pid)
        except WaitTimeout as exc:
            raise BenchError(f"{exc}:\n{lab.logs(proc)}") from None
        base = sample(proc.pid)
        base_fds = _steady_fds(proc.pid)
        tickers: list[Any] = []
        dests = [lab.b_addr, lab.b_addr6]
        deadline = started + MAX_SECONDS - FINAL_RESERVE
        t0 = time.monotonic()
        current = 1
        try:
            while res.done + res.refused < res.asked and time.monotonic() < deadline:
                # roll the sessions: the oldest go, new ones open through the active AP
                _close(tickers[:ROLL] if len(tickers) >= SESSIONS else [], res)
                if len(tickers) >= SESSIONS:
                    tickers = tickers[ROLL:]
                new = []
                while len(tickers) + len(new) < SESSIONS:
                    new.append(lab.open_ticker(lab.ns_a, dests[res.opened % 2], wait=False))
                    res.opened += 1
                for t in new:
                    if t.wait_open(10) is None:
                        raise BenchError(f"a session did not open: {t.report()}")
                tickers += new
                target = current % CHANGE_APS + 1
                for ap in lab.aps:
                    lab.set_ap_delay(ap.index, FAST_DELAY if ap.index == target else SLOW_DELAY)
                c0 = time.monotonic()
                moved = _poll(
                    "the switch", CHANGE_TIMEOUT, functools.partial(_is_active, lab, target)
                )
                if moved:
                    res.switch.append(time.monotonic() - c0)
                    res.done += 1
                    current = target
                else:
                    res.refused += 1  # all slots held sessions: it stays (logged)
                    lab.set_ap_delay(current, FAST_DELAY)
                    lab.set_ap_delay(target, SLOW_DELAY)
                    time.sleep(0.5)
                if (res.done + res.refused) % STATUS_EVERY == 0:
                    st = _status(lab)
                    used = int((st.get("slots") or {}).get("used", 0))
                    res.most_slots = max(res.most_slots, used)
                if (res.done + res.refused) % 100 == 0:
                    print(
                        f"{res.done} AP changes ({res.refused} refused), "
                        f"{time.monotonic() - t0:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            res.seconds = time.monotonic() - t0
            _close(tickers, res)
        res.complete = res.done + res.refused >= res.asked

        # Every session is closed: all slots but the active AP's drain and are freed.
        def one_slot() -> bool:
            return int((_status(lab).get("slots") or {}).get("used", -1)) == 1

        if _poll("every other slot freed", DRAIN_TIMEOUT, one_slot) is None:
            held = _status(lab).get("slots")
            res.leaks.append(f"slots still held {DRAIN_TIMEOUT:.0f} s after the sessions: {held}")
        settings = Settings()
        nexthops = [n for n in _ip_json(lab, "nexthop", "show") if owns(n)]
        if len(nexthops) != 4:  # per family: the CIDR routes' and the active slot's
            res.leaks.append(f"nexthops: {nexthops}")
        for fam in ("-4", "-6"):
            rules = [r for r in _ip_json(lab, fam, "rule", "show") if owns(r)]
            if len(rules) != 1:
                res.leaks.append(f"rules {fam}: {rules}")
            routes = _ip_json(
                lab, fam, "route", "show", "table", "all", "proto", str(RTPROT_SDNSUP)
            )
            if len(routes) != 2:
                res.leaks.append(f"routes {fam}: {routes}")
        nft = run(
            ["ip", "netns", "exec", lab.ns_a, "nft", "list", "chain", "inet", "sdnsup", "pins"]
        )
        if nft.stdout.count("rt ip nexthop") != 1 or nft.stdout.count("rt ip6 nexthop") != 1:
            res.leaks.append(f"pins: {nft.stdout}")
        active = _active_by_nexthop(lab)
        for n in range(1, settings.slots + 1):
            mark = f"{settings.slot_mark(n):#x}/{settings.mask:#x}"
            listing = lab.exec(lab.ns_a, "conntrack", "-L", "-m", mark, check=False).stdout
            live = [x for x in listing.splitlines() if "TIME_WAIT" not in x and "CLOSE" not in x]
            if live and n != _slot_of(lab, active):
                res.leaks.append(f"conntrack entries still pinned to slot {n}: {live[:3]}")
        try:
            wait_idle(proc.pid)
        except WaitTimeout:
            pass
        end = sample(proc.pid)
        res.fds = (base_fds, _steady_fds(proc.pid))
        if res.fds[1] > res.fds[0]:
            res.leaks.append(f"fds {res.fds[0]} -> {res.fds[1]}: {fd_kinds(proc.pid)}")
        res.rss_mb = (base.rss / MB, end.rss / MB)
        code = lab.stop(proc, grace=STOP_TIMEOUT)
        if code != 0:
            res.leaks.append(f"sdnsup exited {code} on SIGTERM")
        res.leaks += [f"after SIGTERM: {x}" for x in leftovers(kernel_objects(lab))]


def _slot_of(lab: Lab, ap: int | None) -> int | None:
    """The slot number whose IPv4 nexthop names AP ``ap``."""
    from sdnsup.state import slot_of_nhid

    if ap is None:
        return None
    addr = str(lab.ap(ap).addr)
    for nh in _ip_json(lab, "nexthop", "show"):
        key = slot_of_nhid(nh.get("id", 0))
        if key and key[1] and nh.get("gateway") == addr:
            return key[1]
    return None


def changes_report(res: Changes) -> dict[str, Any]:
    lost = res.sent - res.answered
    sw = stat(res.switch) if res.switch else None
    rows = [
        ["AP changes done", f"{res.done} of {res.asked}", "all"],
        ["  refused: every slot held sessions", str(res.refused), "(sdnsup keeps the AP)"],
        ["time", f"{res.seconds:.0f} s", f"<= {MAX_SECONDS:.0f} s"],
        ["faster AP -> sdnsup's switch", sw.fmt("ms", 0) if sw else "-", "probe every 0.2 s"],
        ["sessions opened (20 open at any time)", str(res.opened), ""],
        ["lines sent / answered / lost", f"{res.sent} / {res.answered} / {lost}", "0 lost"],
        ["sessions reset or broken", str(len(res.errors)), "0"],
        ["sessions that changed path", str(len(res.path_changes)), "0"],
        ["most AP slots in use at once", str(res.most_slots), "<= 7"],
        ["open fds (start -> end)", f"{res.fds[0]} -> {res.fds[1]}", "no growth"],
        [
            "RSS (start -> end)",
            f"{res.rss_mb[0]:.1f} -> {res.rss_mb[1]:.1f} MB "
            f"({res.rss_mb[1] - res.rss_mb[0]:+.2f} MB)",
            f"< {RSS_GROWTH_LIMIT_MB:.0f} MB growth",
        ],
        [
            "slots and kernel objects at the end",
            "LEAK (below)" if res.leaks else "only the active AP's slot, nothing after SIGTERM",
            "",
        ],
    ]
    print_table(
        f"soak: {res.asked} AP changes (not deaths) with {SESSIONS} live sessions, "
        f"{CHANGE_APS} APs",
        ["figure", "value", "target / check"],
        rows,
    )
    for leak in res.leaks:
        print(f"LEAK (slots) {leak}")
    for line in (res.errors + res.path_changes)[:10]:
        print(f"SESSION {line}")
    if not res.complete:
        print(f"INCOMPLETE: the {MAX_SECONDS:.0f} s budget ended the AP changes early")
    return {
        "asked": res.asked,
        "done": res.done,
        "refused": res.refused,
        "complete": res.complete,
        "seconds": res.seconds,
        "switch_seconds": sw,
        "sessions_opened": res.opened,
        "lines": {"sent": res.sent, "answered": res.answered, "lost": lost},
        "session_errors": res.errors,
        "path_changes": res.path_changes,
        "most_slots": res.most_slots,
        "fds": list(res.fds),
        "rss_mb": list(res.rss_mb),
        "leaks": res.leaks,
    }


# --- the table --------------------------------------------------------------------------------


def report(res: Soak) -> dict[str, Any]:
    f = res.flaps
    asked_ap, asked_link = res.asked
    fail_s = stat(f.failover) if f.failover else None
    heal_s = stat(f.heal) if f.heal else None
    rows: list[list[str]] = [
        ["AP flaps done", f"{f.ap_done} of {asked_ap}", "all"],
        ["link flaps done", f"{f.link_done} of {asked_link}", "all"],
        ["flap outcomes", "; ".join(f"{k} {n}" for k, n in sorted(f.outcomes.items())), ""],
        ["soak time (flaps)", f"{res.seconds:.0f} s", f"<= {MAX_SECONDS:.0f} s in all"],
        [
            "AP cut -> sdnsup's nexthop moved",
            fail_s.fmt("ms", 0) if fail_s else "-",
            "keepalive 0.1 s x 2 misses: 0.2-0.3 s",
        ],
        [
            "link up -> sdnsup's state complete",
            heal_s.fmt("ms", 0) if heal_s else "-",
            "polled with ip(8): bench heal is exact",
        ],
    ]
    faults = {A_TO_B: "an AP cut or A's link down", B_TO_A: "A's link down"}
    dark = sum(end - start for start, end, _ in f.windows if start >= res.flaps_started)
    for direction in (A_TO_B, B_TO_A):
        tried, failed = res.traffic.get(direction, (0, 0))
        rate = f"{(tried - failed) / tried:.2%}" if tried else "-"
        rows.append(
            [
                f"traffic {direction}: connections ok",
                f"{rate} of {tried} ({failed} failed)",
                f"failures only during {faults[direction]}",
            ]
        )
        odd = res.unexplained.get(direction, [])
        rows.append(
            [
                f"  {direction} failures outside {faults[direction]}",
                str(len(odd)) + ("  (below)" if odd else ""),
                "0",
            ]
        )
    rows.append(["time with a fault in place", f"{dark:.0f} s of {res.seconds:.0f} s", ""])
    st = res.status
    counts = (
        f"{(st.get('failovers') or {}).get('count')} failovers, "
        f"{(st.get('heals') or {}).get('count')} heals"
        if st
        else "-"
    )
    rows.append(["sdnsup's own counts", counts, ""])
    if res.base and res.end:
        b, e = res.base, res.end
        growth = (e.proc.rss - b.proc.rss) / MB
        rows += [
            [
                "kernel objects at the end (and after SIGTERM)",
                "LEAK (below)"
                if "kernel" in res.leaks
                else "as intended, same as after warm-up (nothing left after SIGTERM)",
                "1 table; per family 1 rule, 2 nexthops (the CIDR routes', the AP slot's), "
                "1 route per CIDR, the slot's default route",
            ],
            [
                "open fds (after warm-up -> end)",
                f"{b.fds} -> {e.fds}" + ("  LEAK" if "fds" in res.leaks else ""),
                "no growth",
            ],
            [
                "RSS (after warm-up -> end)",
                f"{b.proc.rss / MB:.1f} -> {e.proc.rss / MB:.1f} MB ({growth:+.2f} MB)"
                + ("  LEAK" if "rss" in res.leaks else ""),
                f"< {RSS_GROWTH_LIMIT_MB:.0f} MB growth",
            ],
            [
                "threads (after warm-up -> end)",
                f"{len(b.proc.switches)} -> {len(e.proc.switches)}",
                "",
            ],
        ]
    serving = "yes" if not res.serving else "NO"
    if res.recovery is not None:
        serving += f" (through an AP {res.recovery * 1000:.0f} ms after the last flap)"
    rows.append(["still serving", serving, "status connected, traffic both ways"])
    print_table(
        f"soak: {asked_ap} AP flaps + {asked_link} link flaps with traffic, {N_APS} APs",
        ["figure", "value", "target / check"],
        rows,
    )
    for kind, leaks in res.leaks.items():
        for leak in leaks:
            print(f"LEAK ({kind}) {leak}")
    for why in res.serving:
        print(f"NOT SERVING {why}")
    for problem in f.problems[:20]:
        print(f"PROBLEM {problem}")
    for direction, odd in res.unexplained.items():
        for line in odd[:10]:
            print(f"UNEXPLAINED {direction} failure {line}")
    if not res.complete:
        print(f"INCOMPLETE: the {MAX_SECONDS:.0f} s budget ended the flaps early")
    return {
        "asked": {"ap_flaps": asked_ap, "link_flaps": asked_link},
        "done": {"ap_flaps": f.ap_done, "link_flaps": f.link_done},
        "complete": res.complete,
        "outcomes": dict(f.outcomes),
        "seconds": res.seconds,
        "failover_seconds": fail_s,
        "heal_seconds": heal_s,
        "traffic": {d: {"attempted": t, "failed": n} for d, (t, n) in res.traffic.items()},
        "sdnsup_status": {k: res.status.get(k) for k in ("state", "failovers", "heals")},
        "baseline": _snap_figures(res.base),
        "end": _snap_figures(res.end),
        "leaks": res.leaks,
        "not_serving": res.serving,
        "problems": f.problems,
        "serve_recovery_seconds": res.recovery,
        "failures_outside_faults": res.unexplained,
        "fault_seconds": dark,
    }


def _snap_figures(s: Snapshot | None) -> dict[str, Any] | None:
    if s is None:
        return None
    return {
        "fds": s.fds,
        "fd_kinds": s.fd_kinds,
        "rss_mb": s.proc.rss / MB,
        "threads": len(s.proc.switches),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--ap-flaps", type=int, default=AP_FLAPS, help=f"active-AP flaps (default {AP_FLAPS})"
    )
    parser.add_argument(
        "--link-flaps",
        type=int,
        default=LINK_FLAPS,
        help=f"flaps of A's interface (default {LINK_FLAPS})",
    )
    parser.add_argument(
        "--ap-changes",
        type=int,
        default=AP_CHANGES,
        help=f"switches to a faster AP under live sessions (default {AP_CHANGES}; 0: skip)",
    )
    args = parser.parse_args(argv)
    if args.ap_flaps < 0 or args.link_flaps < 0 or args.ap_changes < 0:
        parser.error("--ap-flaps, --link-flaps and --ap-changes must be >= 0")
    if (code := no_lab_exit()) is not None:
        return code
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    started = time.monotonic()
    res = Soak(asked=(args.ap_flaps, args.link_flaps))
    errors: list[str] = []
    if args.ap_flaps + args.link_flaps:
        try:
            with Lab.create(n_aps=N_APS) as lab:
                soak(lab, args, res, started)
        except (BenchError, LabError, subprocess.SubprocessError, OSError) as exc:
            errors.append(str(exc))
        figures = report(res)
    else:
        figures = {}
    moves = Changes(asked=args.ap_changes)
    if args.ap_changes:
        try:
            changes(args, moves)
        except (BenchError, LabError, subprocess.SubprocessError, OSError) as exc:
            errors.append(f"AP changes: {exc}")
        figures["ap_changes"] = changes_report(moves)
    figures["errors"] = errors
    figures["settings"] = {
        "aps": N_APS,
        "keepalive": " ".join(KEEPALIVE),
        "link_down_s": LINK_DOWN,
        "stream_interval_s": STREAM_INTERVAL,
        "max_seconds": MAX_SECONDS,
    }
    write_json("soak", figures)
    for err in errors:
        print(f"FAILED {err}")
    broken = moves.leaks or moves.errors or moves.path_changes or moves.sent != moves.answered
    return 1 if errors or res.leaks or res.serving or res.flaps.problems or broken else 0


if __name__ == "__main__":
    sys.exit(main())
