"""``scripts/bench apply``: how fast sdnsup applies 1k/10k/100k CIDRs, against baselines.

Runs in a network namespace of its own (``sdnt-bench-*``, removed at the end); nothing in the
host's namespace changes. Prints, for each size: sdnsup from scratch (kernel objects written),
the practical floor (``ip -batch`` for the routes plus ``nft -f`` for the same table), and the
seed's naive approach (one ``ip route`` and one ``iptables`` subprocess per CIDR; measured on
up to NAIVE_MAX CIDRs and extrapolated linearly beyond, as marked). Then, with 100k CIDRs:
changing one CIDR, switching AP, and teardown.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = (1_000, 10_000, 100_000)
# One subprocess pair per CIDR costs milliseconds; beyond this, extrapolate.
NAIVE_MAX = 1_000
AP1, AP2 = "10.77.0.11", "10.77.0.12"
DEV = "dum0"


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


def inner() -> None:
    from sdnsup.applier import Applier
    from sdnsup.nft import LibNftables
    from sdnsup.rtnl import RtnlRoutes
    from sdnsup.state import DesiredState
    from sdnsup.sysctl import ProcSysctl

    def applier() -> Applier:
        return Applier(RtnlRoutes.from_system(), LibNftables(), ProcSysctl())

    def state(nets: list[ipaddress.IPv4Network], ap: str) -> DesiredState:
        return DesiredState(cidrs4=frozenset(nets), ap4=ipaddress.IPv4Address(ap))

    rows: list[tuple[str, ...]] = []
    incremental: list[tuple[str, ...]] = []
    tmp = Path(tempfile.mkdtemp(prefix="sdnsup-bench-"))
    try:
        for n in SIZES:
            nets = cidrs(n)
            a = applier()
            result = a.apply(state(nets, AP1))
            ours = result.seconds
            written = result.summary().rsplit(" in ", 1)[0]
            listing = ["nft", "list", "table", "inet", "sdnsup"]
            nft_text = subprocess.run(listing, check=True, capture_output=True, text=True).stdout
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
            floor = t_ip + t_nft

            # The seed's way: a subprocess per route and per iptables rule.
            k = min(n, NAIVE_MAX)

            t0 = time.perf_counter()
            for c in nets[:k]:
                sh("ip", "route", "add", str(c), "via", AP1, "table", "100")
                sh("iptables", "-t", "mangle", "-A", "OUTPUT", "-d", str(c), "-m", "conntrack",
                   "--ctstate", "NEW", "-j", "MARK", "--set-mark", "100")  # fmt: skip
            t_naive = (time.perf_counter() - t0) * n / k
            sh("ip", "route", "flush", "table", "100")
            sh("iptables", "-t", "mangle", "-F", "OUTPUT")
            naive_note = "" if k == n else f" (extrapolated from {k})"
            rows.append(
                (
                    f"{n:>7,} CIDRs from scratch",
                    f"{ours * 1000:9.0f} ms",
                    f"{floor * 1000:7.0f} ms (ip {t_ip * 1000:.0f} + nft {t_nft * 1000:.0f})",
                    f"{ours / floor:5.2f}x",
                    f"{t_naive:8.1f} s{naive_note}",
                    f"{t_naive / ours:6.0f}x",
                    written,
                )
            )

        # Incremental changes at each size: what an AP switch or a CIDR edit costs once
        # 1k/10k/100k CIDRs are in place. "ip nexthop replace" is the same kernel operation
        # as sdnsup's AP switch, done by iproute2: the kernel's own cost of re-pointing the
        # routes, which grows with their number.
        for n in SIZES:
            nets = cidrs(n)
            a = applier()
            a.apply(state(nets, AP1))
            changed = [*nets[1:], ipaddress.IPv4Network("11.0.0.0/24")]
            steps = []
            for label, desired in (
                ("change 1 CIDR", state(changed, AP1)),
                ("switch AP", state(changed, AP2)),
                ("same state again", state(changed, AP2)),
            ):
                r = a.apply(desired)
                steps.append((label, r))
            nhid = f"{next(iter(a.applied.nexthops)).id}" if a.applied else "0"
            t_ip_nh = timed(
                "ip", "nexthop", "replace", "id", nhid, "via", AP1, "dev", DEV, "proto", "245"
            )
            steps.append(("teardown", a.teardown()))
            for label, r in steps:
                ref = f"ip nexthop replace: {t_ip_nh * 1000:.1f} ms" if label == "switch AP" else ""
                incremental.append((f"{n:>7,} CIDRs: {label}", f"{r.seconds * 1000:8.1f} ms",
                                    r.summary().rsplit(" in ", 1)[0], ref))  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    head = ("case", "sdnsup", "floor (ip -batch + nft -f)", "vs floor", "naive (seed)",
            "speedup", "kernel objects written")  # fmt: skip
    print_table(head, rows)
    print()
    print_table(("case", "sdnsup", "kernel objects written", "reference"), incremental)


def print_table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def outer() -> int:
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
            ["ip", "netns", "exec", ns, sys.executable, __file__], env=env, check=False
        ).returncode
    finally:
        subprocess.run(["ip", "netns", "pids", ns], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


if __name__ == "__main__":
    if os.environ.get("SDNSUP_BENCH_INNER") == "1":
        inner()
    else:
        sys.exit(outer())
