"""``scripts/bench apply``: how fast sdnsup applies 1k/10k/100k CIDRs, against baselines.

Runs in a network namespace of its own (``sdnt-bench-*``, removed at the end); nothing in the
host's namespace changes. Each figure is the median (min-max) over ``--runs`` runs, and every
ratio is taken per run between figures measured in that same run:

* from scratch, at each size: sdnsup (routes, nexthop, rule and the whole nftables table
  written), the floor (``ip -batch`` for the same routes plus ``nft -f`` for the same table
  text), and the seed's naive way (one ``ip route`` and one ``iptables`` subprocess per CIDR;
  measured on NAIVE_MAX CIDRs per run and extrapolated linearly beyond, as marked);
* incremental, at each size, repeated REPEAT times per run: one CIDR changed (a desired state
  whose unchanged CIDRs are the same objects as before, as a state derived from the previous
  one is); the AP switched while the old one keeps its pinned connections (a new AP slot,
  the old slot draining: its rules and table); the drained AP's slot freed; the new AP's
  death (its slot retired, the CIDR routes re-pointed to the next AP, which takes a slot);
  the same state again; and teardown. Each state is derived with ``dataclasses.replace``,
  exactly as the daemon derives it. ``ip nexthop replace`` is the kernel's own cost of a
  switch, done by iproute2, for reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import Stat, positive_int, print_table, ratio, stat, write_json

SIZES = (1_000, 10_000, 100_000)
# One subprocess pair per CIDR costs milliseconds; beyond this, extrapolate.
NAIVE_MAX = 1_000
REPEAT = 15  # incremental operations per size and run: cheap, and noisy one by one
AP1, AP2 = "10.77.0.11", "10.77.0.12"
DEV = "dum0"
TARGETS = {
    "scratch_vs_floor": "<= 1.5x floor",
    "speedup": ">= 20x naive",
    "change 1 CIDR": "<= 10 ms at 100k",
    "switch AP (old one drains)": "<= 10 ms at 100k",
    "drained AP freed": "<= 10 ms at 100k",
    "AP death (re-point to the next)": "<= 10 ms at 100k",
}


def cidrs(n: int) -> list[ipaddress.IPv4Network]:
    """n distinct, non-overlapping /28s in 10.0.0.0/8."""
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    return [ipaddress.IPv4Network((base + i * 16, 28)) for i in range(n)]


def sh(*argv: str, input: str | None = None) -> None:
    subprocess.run(argv, check=True, input=input, text=True, capture_output=True)


def timed(*argv: str) -> float:
    t0 = time.perf_counter()
    sh(*argv)
    return time.perf_counter() - t0


def inner(runs: int) -> None:
    from sdnsup.applier import Applier
    from sdnsup.state import DesiredState, Slot

    def applier() -> Applier:
        return Applier.from_system()

    def state(nets: frozenset[ipaddress.IPv4Network], ap: str) -> DesiredState:
        addr = ipaddress.IPv4Address(ap)
        return DesiredState(cidrs4=nets, ap4=addr, slots=(Slot(1, addr),))

    scratch: dict[int, dict[str, list[float]]] = {
        n: {k: [] for k in ("sdnsup", "ip", "nft", "floor", "naive")} for n in SIZES
    }
    written: dict[int, str] = {}
    incr: dict[tuple[int, str], list[float]] = {}
    incr_writes: dict[tuple[int, str], str] = {}
    tmp = Path(tempfile.mkdtemp(prefix="sdnsup-bench-"))
    try:
        for run in range(1, runs + 1):
            print(f"run {run}/{runs}...", file=sys.stderr, flush=True)
            for n in SIZES:
                nets = cidrs(n)
                a = applier()
                result = a.apply(state(frozenset(nets), AP1))
                written[n] = result.summary().rsplit(" in ", 1)[0]
                listing = ["nft", "list", "table", "inet", "sdnsup"]
                nft_text = subprocess.run(
                    listing, check=True, capture_output=True, text=True
                ).stdout
                a.teardown()

                # Floor: the same routes with ip -batch, the same table with nft -f.
                batch = tmp / "routes.batch"
                batch.write_text("".join(f"route add {c} via {AP1} table 7300\n" for c in nets))
                table = tmp / "table.nft"
                table.write_text(nft_text)
                t_ip = timed("ip", "-batch", str(batch))
                t_nft = timed("nft", "-f", str(table))
                sh("ip", "route", "flush", "table", "7300")
                sh("nft", "delete", "table", "inet", "sdnsup")

                # The seed's way: a subprocess per route and per iptables rule.
                k = min(n, NAIVE_MAX)
                t0 = time.perf_counter()
                for c in nets[:k]:
                    sh("ip", "route", "add", str(c), "via", AP1, "table", "100")
                    mark = "-m conntrack --ctstate NEW -j MARK --set-mark 100".split()
                    sh("iptables", "-t", "mangle", "-A", "OUTPUT", "-d", str(c), *mark)
                t_naive = (time.perf_counter() - t0) * n / k
                sh("ip", "route", "flush", "table", "100")
                sh("iptables", "-t", "mangle", "-F", "OUTPUT")
                row = scratch[n]
                row["sdnsup"].append(result.seconds)
                row["ip"].append(t_ip)
                row["nft"].append(t_nft)
                row["floor"].append(t_ip + t_nft)
                row["naive"].append(t_naive)

            for n in SIZES:
                incremental(applier, state, n, incr, incr_writes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(scratch, written, incr, incr_writes, runs)


def incremental(
    applier: Any,
    state: Any,
    n: int,
    incr: dict[tuple[int, str], list[float]],
    incr_writes: dict[tuple[int, str], str],
) -> None:
    """REPEAT rounds of change / switch / same again on n CIDRs, then teardown."""
    nets = cidrs(n)
    a = applier()
    full = frozenset(nets)
    current = state(full, AP1)
    a.apply(current)
    # The changed list keeps every other CIDR object: only one CIDR differs.
    extra = ipaddress.IPv4Network("11.0.0.0/24")
    changed = frozenset([*nets[1:], extra])

    def note(label: str, result: Any) -> None:
        incr.setdefault((n, label), []).append(result.seconds)
        incr_writes[(n, label)] = result.summary().rsplit(" in ", 1)[0]

    from sdnsup.state import Slot

    ap1, ap2 = ipaddress.IPv4Address(AP1), ipaddress.IPv4Address(AP2)
    for i in range(REPEAT):
        current = dataclasses.replace(current, cidrs4=changed if i % 2 == 0 else full)
        note("change 1 CIDR", a.apply(current))
        # AP 2 becomes faster: it takes slot 2, AP 1 drains in slot 1
        current = dataclasses.replace(
            current, ap4=ap2, slots=(Slot(1, ap1, draining=True), Slot(2, ap2))
        )
        note("switch AP (old one drains)", a.apply(current))
        note("same state again", a.apply(current))
        current = dataclasses.replace(current, slots=(Slot(2, ap2),))
        note("drained AP freed", a.apply(current))
        # AP 2 dies: its slot is retired, AP 1 (next of the ranking) takes slot 1 again
        current = dataclasses.replace(current, ap4=ap1, slots=(Slot(1, ap1),))
        note("AP death (re-point to the next)", a.apply(current))
    from sdnsup.state import NHID_V4

    nhid = str(NHID_V4)
    # With nexthop_compat_mode as sdnsup left it (0 unless others use nexthop objects).
    incr.setdefault((n, "ip nexthop replace (reference)"), []).append(
        timed("ip", "nexthop", "replace", "id", nhid, "via", AP1, "dev", DEV, "proto", "245")
    )
    note("teardown", a.teardown())


def report(
    scratch: dict[int, dict[str, list[float]]],
    written: dict[int, str],
    incr: dict[tuple[int, str], list[float]],
    incr_writes: dict[tuple[int, str], str],
    runs: int,
) -> None:
    figures: dict[str, Any] = {"runs": runs, "repeat": REPEAT, "scratch": {}, "incremental": {}}
    rows = []
    for n in SIZES:
        f = {k: stat(v) for k, v in scratch[n].items()}
        vs_floor, speedup = ratio(f["sdnsup"], f["floor"]), ratio(f["naive"], f["sdnsup"])
        naive_note = "" if n <= NAIVE_MAX else f" (extrapolated from {NAIVE_MAX})"
        rows.append((
            f"{n:>7,} CIDRs",
            f["sdnsup"].fmt(digits=0),
            f"{f['floor'].fmt(digits=0)} = ip {f['ip'].median * 1000:.0f} + nft "
            f"{f['nft'].median * 1000:.0f}",
            vs_floor.fmt("x", 2),
            f"{f['naive'].median:.1f} s{naive_note}",
            speedup.fmt("x", 0),
            written[n],
        ))  # fmt: skip
        figures["scratch"][str(n)] = {**f, "vs_floor": vs_floor, "speedup_vs_naive": speedup,
                                      "written": written[n]}  # fmt: skip
    print_table(
        f"apply from scratch (median (min-max) over {runs} runs; targets: "
        f"{TARGETS['scratch_vs_floor']}, {TARGETS['speedup']})",
        (
            "case",
            "sdnsup",
            "floor: ip -batch + nft -f",
            "vs floor",
            "naive (seed)",
            "speedup vs naive",
            "kernel objects written",
        ),
        rows,
    )
    rows = []
    for (n, label), values in incr.items():
        st: Stat = stat(values)
        target = TARGETS.get(label, "") if n == SIZES[-1] else ""
        rows.append((f"{n:>7,} CIDRs: {label}", st.fmt(digits=2), incr_writes.get((n, label), ""),
                     target))  # fmt: skip
        figures["incremental"].setdefault(str(n), {})[label] = st
    print_table(
        f"incremental changes (median (min-max) over {runs} x {REPEAT} operations)",
        ("case", "sdnsup", "kernel objects written", "target"),
        rows,
    )
    write_json("apply", figures)


def outer(runs: int) -> int:
    ns = f"sdnt-bench-{secrets.token_hex(3)}"
    try:
        sh("ip", "netns", "add", ns)
        for cmd in (
            "link set lo up",
            # a veth pair, not a dummy: this kernel has no dummy module
            f"link add {DEV} type veth peer name {DEV}p",
            f"link set {DEV} up",
            f"link set {DEV}p up",
            f"addr add 10.77.0.1/24 dev {DEV}",
        ):
            sh("ip", "-n", ns, *cmd.split())
        env = dict(os.environ, SDNSUP_BENCH_INNER="1")
        return subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, __file__, "--runs", str(runs)],
            env=env,
            check=False,
        ).returncode
    finally:
        subprocess.run(["ip", "netns", "pids", ns], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=positive_int, default=3, help="repeated runs (default 3)")
    args = parser.parse_args()
    if os.environ.get("SDNSUP_BENCH_INNER") == "1":
        inner(args.runs)
        return 0
    return outer(args.runs)


if __name__ == "__main__":
    sys.exit(main())
