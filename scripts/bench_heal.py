"""``scripts/bench heal``: how fast sdnsup restores its kernel state after someone breaks it.

Each run builds a lab of network namespaces (:class:`sdnsup.lab.Lab`: client A, router R,
host B, three APs and the lab CC), removed at the end, also on failure; nothing in the host's
namespace changes. sdnsup runs in A with its defaults, steering B's subnet (one IPv4 and one
IPv6 CIDR) through AP1. Then, one after the other, each followed by a check that A's kernel
holds exactly what it held before (sdnsup's nexthops, routes, rules and nftables table):

1. link flap: ``ip link set eth0 down``, 0.3 s, ``up`` in A (the kernel drops the nexthops
   and routes through a downed link, without a delete event per route). From the link-up
   event to the last nexthop/route/rule restored, both stamped by ``ip -ts monitor`` in A.
2. ``nft flush ruleset`` in A: from the deletion of table ``inet sdnsup`` to the last
   object of the restored table (chain, set, element, rule), both stamped by a listener on
   the nftables netlink group in A (``ip monitor`` does not see nftables).
3. the routes of sdnsup's table removed by someone else: ``ip -4/-6 route flush table 7300``
   is tried first. Whether it works depends on ``net.ipv4.nexthop_compat_mode``, which
   sdnsup sets to 0 when no other software in the namespace uses nexthop objects: then the
   flush works. With compat mode 1, iproute2 6.1 fails on routes that use nexthop objects
   ("Failed to send flush request: Invalid argument") and deletes nothing; the routes are
   then deleted with one ``ip -batch`` of ``route del`` lines. So this fault is measured
   twice: in the lab above (sdnsup alone), and in a second lab where another program's
   nexthop object keeps compat mode at 1 (the output says which way each one went). From
   the first route deletion to the last route restored, stamped by ``ip -ts monitor`` in A.

Figures only, printed with the target (< 100 ms) next to them. A failed run is reported as
FAILED with the reason and taken again (a bounded number of times); the exit status is 1
only when fewer than ``--runs`` runs could be measured, 77 when no lab can be built here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import benchlib
from bench_failover import (
    DELAYS,
    STAT_HEAD,
    BenchError,
    Obj,
    alive,
    json_lines,
    lab_with_cc,
    link_is_up,
    maybe_stat,
    monitor_events,
    nft_table,
    python,
    repeat,
    sdnsup_objects,
    start_monitor,
    start_sdnsup,
    stat_row,
    stop_sdnsup,
    wait_for,
    wait_ranking,
)

from sdnsup import netmon
from sdnsup.lab import Lab
from sdnsup.routes import RTPROT_SDNSUP
from sdnsup.state import DEFAULT_TABLE

TARGET = 0.100
FLAP_DOWN = 0.3
SETTLE = 0.5  # before each fault: sdnsup idle, its coalescing window long over
HEAL_TIMEOUT = 5.0
RUN_BUDGET = 60.0  # the helper processes of a run end on their own after this
SCENARIOS = (
    ("flap", "link flap: link up -> nexthops/routes/rules restored"),
    ("nft", "nft flush ruleset -> table inet sdnsup restored"),
    ("routes", f"routes of table {DEFAULT_TABLE} removed -> restored"),
    ("routes-shared", "  the same, another nexthop user in A"),
)
# Another program's nexthop object in A (as FRR or a second overlay would have): sdnsup then
# leaves net.ipv4.nexthop_compat_mode at 1, under which `ip route flush` fails.
FOREIGN_NEXTHOP_ID = "4242"

# A: every nftables notification (table, chain, rule, set, element; NEWGEN ends a
# transaction) as one JSON line stamped on arrival, parsed by sdnsup's own parser.
NFT_LISTENER = """
import json, socket, sys, time
from sdnsup.netmon import NFNLGRP_NFTABLES, parse_nfnl
from sdnsup.netlink import NETLINK_NETFILTER
SOL_NETLINK, NETLINK_ADD_MEMBERSHIP = 270, 1  # not exported by Python's socket module
until = time.time() + float(sys.argv[1])
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
s.bind((0, 0))
s.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
s.settimeout(0.5)
print(json.dumps({"kind": "ready"}), flush=True)
while time.time() < until:
    try:
        data = s.recv(1 << 16)
    except TimeoutError:
        continue
    now = time.time()
    for e in parse_nfnl(data):
        line = {"t": now, "kind": e.kind, "deleted": e.deleted, "table": e.nft_table}
        print(json.dumps(line), flush=True)
"""


@dataclass
class Heal:
    seconds: float  # the event -> the last restored object
    restored: int  # objects restored (events counted)
    how: str = ""  # how the fault was made, where there is a choice


# --- 1: link flap ----------------------------------------------------------------------------


def restores(obj: Obj, event: str) -> bool:
    """Whether a monitor event (re-)establishes ``obj`` as it was before the fault."""
    kind, key, value = obj
    if event.startswith("Deleted "):
        return False
    if kind == "nexthop":
        return event.startswith(f"id {key} via {value} ")
    if kind == "route":
        # With net.ipv4.nexthop_compat_mode=0 routes print (and dump) their nhid only.
        return event.startswith(f"{key} ") and (value == "none" or f" via {value} " in event)
    # IPv4 and IPv6 rules print alike: the caller lets each event count for one rule only
    return event.startswith(f"{value}:") and f"proto {RTPROT_SDNSUP}" in event


def completion(
    events: list[tuple[float, str]], start: int, needed: set[Obj]
) -> tuple[float, int] | None:
    """The time of the event that restored the last of ``needed`` after ``events[start]``
    (each event restores one object at most) and how many; None while one is missing."""
    used: set[int] = set()
    last = events[start][0]
    for obj in sorted(needed):
        hit = next(
            (
                i
                for i in range(start + 1, len(events))
                if i not in used and restores(obj, events[i][1])
            ),
            None,
        )
        if hit is None:
            return None
        used.add(hit)
        last = max(last, events[hit][0])
    return last, len(needed)


def heal_flap(lab: Lab) -> Heal:
    before = sdnsup_objects(lab)
    monitor = start_monitor(lab, "link", "nexthop", "rule", "route")
    dev = lab.a_ifname
    down_at = time.monotonic()
    lab.exec(lab.ns_a, "ip", "link", "set", dev, "down")
    # What is gone while the link is down (sdnsup reacts within ~coalesce + apply, long
    # before this): those objects, and only those, must come back after the link-up.
    time.sleep(max(0.0, down_at + FLAP_DOWN - 0.1 - time.monotonic()))
    needed = before - sdnsup_objects(lab)
    time.sleep(max(0.0, down_at + FLAP_DOWN - time.monotonic()))
    lab.exec(lab.ns_a, "ip", "link", "set", dev, "up")
    # The kernel dropped the default route with the link; a network manager would put it
    # back (sockets need it to pick a source address), so the lab does too, as the tests do.
    lab.exec(lab.ns_a, "ip", "route", "replace", "default", "via", str(lab.router_addr))
    if not needed:
        raise BenchError("the link-down removed none of sdnsup's objects: nothing to heal")

    def healed() -> Heal | None:
        events = monitor_events(lab.logs(monitor))
        states = [link_is_up(e, dev) for _, e in events]
        down = next((i for i, up in enumerate(states) if up is False), None)
        up = next((i for i, s in enumerate(states) if s and down is not None and i > down), None)
        if up is None:
            return None
        done = completion(events, up, needed)
        return None if done is None else Heal(done[0] - events[up][0], done[1])

    try:
        heal: Heal = wait_for("the state to be restored after the flap", HEAL_TIMEOUT, healed)
    finally:
        lab.stop(monitor, grace=1.0)
    return heal


# --- 2: nft flush ruleset --------------------------------------------------------------------


def heal_nft(lab: Lab) -> Heal:
    table = nft_table(lab)
    if table is None:
        raise BenchError("no table inet sdnsup before the flush")
    listener = lab.popen(lab.ns_a, *python(NFT_LISTENER, RUN_BUDGET), label="a-nftmon")
    try:
        wait_for("the nftables listener in A", 10.0, lambda: json_lines(lab, listener))
        lab.exec(lab.ns_a, "nft", "flush", "ruleset")
        wait_for("table inet sdnsup restored", HEAL_TIMEOUT, lambda: nft_table(lab) == table)
        time.sleep(0.05)  # the listener prints what it already received
    finally:
        lab.stop(listener, grace=1.0)
    ours = [e for e in json_lines(lab, listener) if e.get("table") == "sdnsup"]
    gone = next((i for i, e in enumerate(ours) if e["deleted"]), None)
    if gone is None:
        raise BenchError("the listener saw no deletion in table inet sdnsup")
    back = [e for e in ours[gone:] if not e["deleted"]]
    if not any(e["kind"] == "nft-table" for e in back):
        raise BenchError("the listener saw no re-created table inet sdnsup")
    return Heal(back[-1]["t"] - ours[gone]["t"], len(back))


# --- 3: routes removed -----------------------------------------------------------------------


def table_routes(lab: Lab) -> list[str]:
    """The destinations of the routes in sdnsup's table, both families."""
    out = []
    for fam in ("-4", "-6"):
        argv = ("ip", fam, "-o", "route", "show", "table", str(DEFAULT_TABLE))
        out += [ln.split()[0] for ln in lab.exec(lab.ns_a, *argv).stdout.splitlines() if ln]
    return out


def remove_routes(lab: Lab, dsts: list[str]) -> str:
    """Delete the routes of sdnsup's table as an operator would; how it was done.

    ``ip -4 route flush`` and ``ip -6 route flush`` run at once (one fault, not two).
    Whether they work depends on net.ipv4.nexthop_compat_mode: with 1 (the kernel's
    default), route dumps carry the nexthop's gateway too and iproute2 6.1 sends that back
    in its delete, which the kernel refuses ("Failed to send flush request: Invalid
    argument"; nothing is deleted); with 0 the flush works. A family whose flush failed
    gets one ``ip -batch`` of ``route del`` lines instead.
    """
    table = str(DEFAULT_TABLE)
    flushes = {
        fam: lab.popen(lab.ns_a, "ip", fam, "route", "flush", "table", table, label=f"flush{fam}")
        for fam in ("-4", "-6")
    }
    failed = {}
    for fam, proc in flushes.items():
        try:
            code = proc.wait(timeout=HEAL_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise BenchError(f"ip {fam} route flush table {table} hangs") from None
        if code != 0:
            failed[fam] = (lab.logs(proc).strip().splitlines() or ["?"])[-1]
    if not failed:
        return f"ip -4/-6 route flush table {table}"
    left = [d for d in dsts if ("-6" if ":" in d else "-4") in failed]
    script = "".join(f"route del {dst} table {table}\n" for dst in left)
    lab.exec(lab.ns_a, "ip", "-force", "-batch", "-", input=script)
    reasons = "; ".join(f"ip {fam}: {why}" for fam, why in sorted(failed.items()))
    return (
        f"ip route flush table {table} failed ({reasons}); deleted by ip -batch of"
        f" {len(left)} 'route del'"
    )


def route_heal(events: list[tuple[float, str]], before: set[Obj], how: str) -> Heal | None:
    """From the first deletion in sdnsup's table to the last restored route, once every
    deleted route's latest event is its restoration (a flush that re-reads the table may
    delete a route sdnsup had already put back: the fault then lasts longer); None before."""
    marker = f" table {DEFAULT_TABLE} "
    gone = [
        (i, e.split()[1])
        for i, (_, e) in enumerate(events)
        if e.startswith("Deleted ") and marker in e
    ]
    if not gone:
        return None
    last_seen: dict[str, tuple[int, bool]] = {}  # dst -> (index of its latest event, restored)
    for i, (_, e) in enumerate(events):
        dst = e.removeprefix("Deleted ").split()[0]
        if marker in e and any(o[1] == dst for o in before):
            restored = any(restores(o, e) for o in before if o[1] == dst)
            last_seen[dst] = (i, restored)
    deleted = {dst for _, dst in gone}
    if not all(last_seen[d][1] for d in deleted):
        return None
    end = max(events[last_seen[d][0]][0] for d in deleted)
    again = len(gone) - len(deleted)
    extra = f"; {again} deleted again after sdnsup had restored them" if again else ""
    return Heal(end - events[gone[0][0]][0], len(deleted), how + extra)


def heal_routes(lab: Lab) -> Heal:
    dsts = table_routes(lab)
    if not dsts:
        raise BenchError(f"no routes in table {DEFAULT_TABLE} before the fault")
    before = {o for o in sdnsup_objects(lab) if o[0] == "route"}
    monitor = start_monitor(lab, "route")
    try:
        how = remove_routes(lab, dsts)

        def healed() -> Heal | None:
            return route_heal(monitor_events(lab.logs(monitor)), before, how)

        heal: Heal = wait_for(f"table {DEFAULT_TABLE}'s routes restored", HEAL_TIMEOUT, healed)
    finally:
        lab.stop(monitor, grace=1.0)
    return heal


# --- runs ------------------------------------------------------------------------------------


@dataclass
class Results:
    heals: dict[str, list[Heal]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def check_unchanged(lab: Lab, fault: str, objects: set[Obj], table: Any) -> None:
    """A's kernel holds what it held before ``fault`` (sdnsup's objects and table)."""
    now = sdnsup_objects(lab)
    if now != objects:
        raise BenchError(f"after the {fault} heal sdnsup's objects differ: {sorted(objects ^ now)}")
    if nft_table(lab) != table:
        raise BenchError(f"after the {fault} heal table inet sdnsup differs")


def heal_run(lab: Lab) -> dict[str, Heal]:
    """sdnsup in a fresh lab, then every fault in turn; the state is checked after each."""
    proc, _ = start_sdnsup(lab, lab_with_cc(lab))
    faults: dict[str, Callable[[Lab], Heal]] = {
        "flap": heal_flap,
        "nft": heal_nft,
        "routes": heal_routes,
    }
    heals = {}
    try:
        wait_ranking(lab, proc)
        time.sleep(SETTLE)
        objects, table = sdnsup_objects(lab), nft_table(lab)
        mode = lab.exec(lab.ns_a, "sysctl", "-n", "net.ipv4.nexthop_compat_mode").stdout.strip()
        for key, fault in faults.items():
            alive(lab, proc)
            heals[key] = fault(lab)
            time.sleep(SETTLE)
            check_unchanged(lab, key, objects, table)
        heals["routes"].how = f"nexthop_compat_mode={mode}: {heals['routes'].how}"
    except BenchError as exc:
        raise BenchError(f"{exc}\nsdnsup's log:\n{lab.logs(proc)[-3000:]}") from None
    finally:
        stop_sdnsup(lab, proc)
    return heals


def heal_run_shared(lab: Lab) -> Heal:
    """The route removal again, in a lab where another program owns a nexthop object."""
    via = ("via", str(lab.router_addr), "dev", lab.a_ifname)
    lab.exec(lab.ns_a, "ip", "nexthop", "add", "id", FOREIGN_NEXTHOP_ID, *via)
    proc, _ = start_sdnsup(lab, lab_with_cc(lab))
    try:
        wait_ranking(lab, proc)
        time.sleep(SETTLE)
        objects, table = sdnsup_objects(lab), nft_table(lab)
        mode = lab.exec(lab.ns_a, "sysctl", "-n", "net.ipv4.nexthop_compat_mode").stdout.strip()
        heal = heal_routes(lab)
        heal.how = f"nexthop_compat_mode={mode}: {heal.how}"
        time.sleep(SETTLE)
        check_unchanged(lab, "routes-shared", objects, table)
    except BenchError as exc:
        raise BenchError(f"{exc}\nsdnsup's log:\n{lab.logs(proc)[-3000:]}") from None
    finally:
        stop_sdnsup(lab, proc)
    return heal


def report(res: Results, runs: int) -> dict[str, Any]:
    target = f"< {TARGET * 1000:.0f} ms"
    rows = [
        stat_row(label, [h.seconds for h in res.heals.get(key, [])], target)
        for key, label in SCENARIOS
    ]
    benchlib.print_table(
        f"heal: sdnsup (defaults), the fault's event -> the last restored object, {runs} runs",
        STAT_HEAD,
        rows,
    )
    figures: dict[str, Any] = {"runs_requested": runs, "target": TARGET, "scenarios": {}}
    for key, label in SCENARIOS:
        heals = res.heals.get(key, [])
        hows = sorted({h.how for h in heals if h.how})
        counts = sorted({h.restored for h in heals})
        s = maybe_stat([h.seconds for h in heals])
        verdict = "-" if s is None else ("meets" if s.max < TARGET else "MISSES")
        print(f"  {key}: {verdict} the target in every run; objects restored per run: {counts}")
        for how in hows:
            print(f"    fault made by: {how}")
        figures["scenarios"][key] = {
            "what": label,
            "seconds": s,
            "restored_objects": counts,
            "fault": hows,
        }
    figures["errors"] = res.errors
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--runs", type=benchlib.positive_int, default=10, help="repeated runs (default 10)"
    )
    args = parser.parse_args(argv)
    if (code := benchlib.no_lab_exit()) is not None:
        return code
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    print(
        f"sdnsup with its defaults in A (netlink coalesce {netmon.COALESCE * 1000:.0f} ms);"
        f" faults: link flap ({FLAP_DOWN:g} s down), nft flush ruleset, table"
        f" {DEFAULT_TABLE}'s routes removed (also with another nexthop user in A);"
        f" fresh labs per run, {args.runs} runs"
    )
    res = Results()

    def once() -> dict[str, Heal]:
        with Lab.create(n_aps=len(DELAYS)) as lab:
            heals = heal_run(lab)
        with Lab.create(n_aps=len(DELAYS)) as lab:
            heals["routes-shared"] = heal_run_shared(lab)
        return heals

    done = repeat(args.runs, once, res.errors)
    for key, _ in SCENARIOS:
        res.heals[key] = [run[key] for run in done]
    figures = report(res, args.runs)
    for err in res.errors:
        print(f"FAILED {err}")
    benchlib.write_json("heal", figures)
    return 1 if len(done) < args.runs else 0


if __name__ == "__main__":
    sys.exit(main())
