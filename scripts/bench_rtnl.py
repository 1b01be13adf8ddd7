#!/usr/bin/env python3
"""Time sdnsup's rtnetlink backend against ``ip -batch`` for 1k/10k/100k routes.

Run as root from the repository: ``.venv/bin/python scripts/bench_rtnl.py``. It never
touches the root network namespace: it creates ``sdnt-rtnl-bench-<random>``, re-executes
itself inside with ``ip netns exec`` (``--inside``, which refuses to run in the root
namespace), and deletes the namespace afterwards, also on failure or Ctrl-C.

Each size is run for IPv4 /24s and IPv6 /48s, all in table 7300 via one nexthop object:
add (create-or-replace), switch them all to another gateway (one nexthop replace), read
back (dump), delete. The ``ip`` column does the same with ``ip -batch`` of ``route replace``,
``nexthop replace`` and ``route del`` lines, and ``ip route show`` (which also formats text).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sdnsup.routes import Nexthop, Route  # noqa: E402
from sdnsup.rtnl import RtnlRoutes  # noqa: E402

T = TypeVar("T")
PROTO = 0xF5
TABLE = 7300
NHID = {4: 4, 6: 6}
PREFIX = "sdnt-rtnl-bench-"


def sh(*args: str, stdin: str | None = None) -> str:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, check=True).stdout


def make_routes(version: int, n: int) -> list[Route]:
    """``n`` distinct IPv4 /24s from 10.0.0.0, or IPv6 /48s from 2001:db8:1000::."""
    if version == 4:
        nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [
            ipaddress.IPv4Network((0x0A000000 + (i << 8), 24)) for i in range(n)
        ]
    else:
        base = int(ipaddress.IPv6Address("2001:db8:1000::"))
        nets = [ipaddress.IPv6Network((base + (i << 80), 48)) for i in range(n)]
    return [Route(net, TABLE, NHID[version]) for net in nets]


def timed(fn: Callable[..., T], *args: object) -> tuple[float, T]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def ip_batch(lines: list[str]) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".ipbatch") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        start = time.perf_counter()
        sh("ip", "-batch", f.name)
        return time.perf_counter() - start


def in_namespace(ns: str) -> bool:
    """Whether this process runs in the named namespace ``ns`` (``/run/netns/NS``)."""
    try:
        named = os.stat(f"/run/netns/{ns}")
    except FileNotFoundError:
        return False
    mine = os.stat("/proc/self/ns/net")
    return (mine.st_dev, mine.st_ino) == (named.st_dev, named.st_ino)


def inside(ns: str, sizes: list[int]) -> None:
    """The benchmark proper; runs inside the throwaway namespace ``ns``."""
    if not ns.startswith(PREFIX) or not in_namespace(ns):
        sys.exit(f"refusing to run: not inside a {PREFIX}* namespace")
    rt = RtnlRoutes.from_system()
    ifindex = socket.if_nametoindex("v0")
    family = {4: socket.AF_INET, 6: socket.AF_INET6}
    gw = {4: ("192.0.2.2", "192.0.2.3"), 6: ("2001:db8::2", "2001:db8::3")}

    def nexthop(v: int, which: int) -> Nexthop:
        return Nexthop(NHID[v], family[v], ipaddress.ip_address(gw[v][which]), ifindex)

    for v in (4, 6):
        assert rt.replace_nexthop(nexthop(v, 0), PROTO) == []
    print(f"{'routes':>12} {'op':>7} {'rtnl.py':>10} {'ip -batch':>10}")
    for n in sizes:
        for v in (4, 6):
            routes = make_routes(v, n)
            label = f"{n} IPv{v}"

            t_add, failures = timed(rt.add_routes, routes, PROTO)
            assert failures == [], failures
            # Switching every route to another gateway is one nexthop replace.
            t_swap, failures = timed(rt.replace_nexthop, nexthop(v, 1), PROTO)
            assert failures == [], failures
            rt.replace_nexthop(nexthop(v, 0), PROTO)
            t_dump, got = timed(rt.routes, PROTO)
            assert got == set(routes)
            t_del, failures = timed(rt.delete_routes, routes)
            assert failures == [], failures

            fam = f"-{v}"
            b_add = ip_batch(
                [f"route replace {r.dst} nhid {r.nhid} table {TABLE} proto {PROTO}" for r in routes]
            )
            swap = f"nexthop replace id {NHID[v]} via {gw[v][1]} dev v0 proto {PROTO}"
            b_swap = ip_batch([swap])
            start = time.perf_counter()
            shown = sh("ip", fam, "route", "show", "table", str(TABLE), "proto", str(PROTO))
            b_dump = time.perf_counter() - start
            assert shown.count("\n") == n
            b_del = ip_batch([f"route del {r.dst} table {TABLE}" for r in routes])

            rows = [
                ("add", t_add, b_add),
                ("nh swap", t_swap, b_swap),
                ("dump", t_dump, b_dump),
                ("delete", t_del, b_del),
            ]
            for op, ours, theirs in rows:
                print(f"{label:>12} {op:>7} {ours:>9.3f}s {theirs:>9.3f}s", flush=True)
    rt.close()


def outside(sizes: list[int]) -> int:
    """Create the namespace, run this script inside it, always delete it."""
    if os.geteuid() != 0:
        sys.exit("needs root (creates a network namespace)")
    ns = f"{PREFIX}{secrets.token_hex(3)}"
    sh("ip", "netns", "add", ns)
    try:
        for cmd in (
            "link set lo up",
            "link add v0 type veth peer name v1",
            "link set v0 up",
            "link set v1 up",
            "addr add 192.0.2.1/24 dev v0",
            "addr add 2001:db8::1/64 dev v0 nodad",
        ):
            sh("ip", "-n", ns, *cmd.split())
        argv = [sys.executable, str(Path(__file__).resolve()), f"--inside={ns}"]
        argv += [f"--sizes={','.join(map(str, sizes))}"]
        return subprocess.run(["ip", "netns", "exec", ns, *argv], check=False).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma-separated counts")
    parser.add_argument("--inside", metavar="NS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.inside:
        inside(args.inside, sizes)
        return 0
    return outside(sizes)


if __name__ == "__main__":
    sys.exit(main())
