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

Prints a table and writes bench-results/soak.json. Exit status: 1 when a leak is found, when
sdnsup stopped serving or did not react to a flap within FLAP_TIMEOUT (correctness results,
not timing), or when a measurement could not be taken; 0 otherwise. ``--ap-flaps`` /
``--link-flaps`` scale it down for a quick check; a soak that the 10-minute budget cuts short
says so (INCOMPLETE) and checks what it did.
"""

from __future__ import annotations

import argparse
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


OUR_PROTO = (str(RTPROT_SDNSUP), hex(RTPROT_SDNSUP))  # how ip -j prints sdnsup's proto


def _ours(obj: dict[str, Any]) -> bool:
    return str(obj.get("protocol")) in OUR_PROTO


def active_ap(lab: Lab) -> int | None:
    """The AP index sdnsup's IPv4 nexthop names, None when it has none (no AP usable)."""
    by_addr = {str(ap.addr): ap.index for ap in lab.aps}
    for nh in _ip_json(lab, "nexthop", "show"):
        if _ours(nh) and nh.get("gateway") in by_addr:
            return by_addr[nh["gateway"]]
    return None


def state_complete(lab: Lab) -> bool:
    """Whether sdnsup's nexthops, rules and routes are all in A (both families)."""
    nhs = [n for n in _ip_json(lab, "nexthop", "show") if _ours(n) and "gateway" in n]
    if len(nhs) != 2:
        return False
    for fam in ("-4", "-6"):
        if not any(_ours(r) for r in _ip_json(lab, fam, "rule", "show")):
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

    The nexthops' gateways are left out (the active AP changes with every flap); everything
    else must be the same at the baseline and at the end.
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
    objs: dict[str, Any] = {
        "nft tables": tables,
        "nft objects": sorted(table_items, key=json.dumps),
        "nexthops (id, proto, dev)": nexthops,
    }
    for fam in ("-4", "-6"):
        objs[f"rules {fam}"] = _ip_json(lab, fam, "rule", "show")
        routes = _ip_json(lab, fam, "route", "show", "table", "all", "proto", str(RTPROT_SDNSUP))
        objs[f"sdnsup routes {fam}"] = sorted(
            (r["dst"], str(r.get("table")), r.get("nhid")) for r in routes
        )
        objs[f"table 7300 {fam}"] = len(_ip_json(lab, fam, "route", "show", "table", "7300"))
    return objs


def intended(objs: dict[str, Any]) -> list[str]:
    """What in ``objs`` is not exactly sdnsup's intended state (an empty list: all good)."""
    problems = []
    if objs["nft tables"] != [("inet", "sdnsup")]:
        problems.append(f"nft tables in A: {objs['nft tables']} (want only inet sdnsup)")
    ours = [n for n in objs["nexthops (id, proto, dev)"] if n[1] in OUR_PROTO]
    if len(ours) != 2 or len(objs["nexthops (id, proto, dev)"]) != 2:
        problems.append(f"nexthops: {objs['nexthops (id, proto, dev)']} (want one per family)")
    nhids = {n[0] for n in ours}
    for fam, cidr in (("-4", CIDRS[0]), ("-6", CIDRS[1])):
        rules = [r for r in objs[f"rules {fam}"] if _ours(r)]
        if len(rules) != 1:
            problems.append(f"sdnsup rules {fam}: {rules} (want exactly one)")
        routes = objs[f"sdnsup routes {fam}"]
        if len(routes) != 1 or routes[0][0] != cidr or routes[0][2] not in nhids:
            problems.append(f"sdnsup routes {fam}: {routes} (want {cidr} via its nexthop)")
        if objs[f"table 7300 {fam}"] != 1:
            problems.append(f"table 7300 {fam} holds {objs[f'table 7300 {fam}']} routes, not 1")
    return problems


def leftovers(objs: dict[str, Any]) -> list[str]:
    """What of sdnsup's is still in ``objs`` (after it stopped: must be nothing)."""
    out = []
    if ("inet", "sdnsup") in objs["nft tables"]:
        out.append("nft table inet sdnsup")
    out += [f"nexthop {n}" for n in objs["nexthops (id, proto, dev)"] if n[1] in OUR_PROTO]
    for fam in ("-4", "-6"):
        out += [f"rule {r}" for r in objs[f"rules {fam}"] if _ours(r)]
        out += [f"route {r}" for r in objs[f"sdnsup routes {fam}"]]
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
                "1 table, 1 rule + 1 nexthop per family, 1 route per CIDR",
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
    args = parser.parse_args(argv)
    if args.ap_flaps < 0 or args.link_flaps < 0 or args.ap_flaps + args.link_flaps == 0:
        parser.error("--ap-flaps and --link-flaps must be >= 0, and not both 0")
    if (code := no_lab_exit()) is not None:
        return code
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    started = time.monotonic()
    res = Soak(asked=(args.ap_flaps, args.link_flaps))
    errors: list[str] = []
    try:
        with Lab.create(n_aps=N_APS) as lab:
            soak(lab, args, res, started)
    except (BenchError, LabError, subprocess.SubprocessError, OSError) as exc:
        errors.append(str(exc))
    figures = report(res)
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
    return 1 if errors or res.leaks or res.serving or res.flaps.problems else 0


if __name__ == "__main__":
    sys.exit(main())
