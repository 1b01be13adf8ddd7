#!/usr/bin/env python3
"""Benchmark sdnsup.nfnl against libnftables on a 100k-CIDR interval set.

Run as root: ``.venv/bin/python scripts/bench_nfnl.py [--cidrs N] [--repeat R]``. The script
creates a network namespace ``sdnt-nfnl-bench-<hex>``, re-executes itself inside it, and
deletes the namespace at the end (also on failure or Ctrl-C); nothing touches the namespace it
was started in.

Measured, with N random non-overlapping IPv4 CIDRs of /24-/32 in ``inet sdnsup dst4``:

* loading all N into the empty set: SetElements.add, libnftables JSON
  (``Nftables().json_cmd``), ``nft -f`` with a text ruleset;
* adding then deleting one CIDR with the N already loaded: SetElements vs libnftables JSON
  (median of R runs, fresh CIDR each time), and the same to a small set in the same table,
  which shows how much of the cost the kernel charges per transaction on a big set;
* reading the set back: SetElements.list vs ``nft -j list set`` through libnftables.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TABLE = "sdnsup"
SETS = (
    f"add table inet {TABLE}; "
    f"add set inet {TABLE} dst4 {{ type ipv4_addr; flags interval; }}; "
    f"add set inet {TABLE} dst6 {{ type ipv6_addr; flags interval; }}; "
    f"add set inet {TABLE} small4 {{ type ipv4_addr; flags interval; }}"
)
INNER_FLAG = "--inside-netns"


def outer(argv: list[str]) -> int:
    """Create the namespace, run this script inside it, always delete the namespace."""
    if os.geteuid() != 0:
        print("bench_nfnl: needs root (network namespaces, nftables)", file=sys.stderr)
        return 77
    name = f"sdnt-nfnl-bench-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        cmd = ["ip", "netns", "exec", name, sys.executable, __file__, INNER_FLAG, *argv]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        return subprocess.run(cmd, env=env, check=False).returncode
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def random_cidrs(count: int, seed: int) -> list[ipaddress.IPv4Network]:
    """``count`` CIDRs of /24-/32, one per distinct /24 of 1.0.0.0-223.255.255.255."""
    rnd = random.Random(seed)
    blocks = rnd.sample(range(1 << 16, 224 << 16), count)
    out = []
    for block in blocks:
        plen = rnd.randint(24, 32)
        offset = rnd.randrange(1 << (plen - 24)) << (32 - plen)
        out.append(ipaddress.IPv4Network(((block << 8) + offset, plen)))
    return out


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def nft(script: str) -> None:
    subprocess.run(["nft", script], check=True)


def inner(cidrs: int, repeat: int) -> int:
    import nftables

    from sdnsup.nfnl import SetElements

    lib = nftables.Nftables()
    lib.set_json_output(True)

    def json_cmd(cmd: dict[str, Any]) -> Any:
        rc, out, err = lib.json_cmd({"nftables": [cmd]})
        if rc != 0:
            raise RuntimeError(f"libnftables: {err}")
        return out

    def elem_json(net: ipaddress.IPv4Network) -> Any:
        if net.prefixlen == 32:
            return str(net.network_address)
        return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}

    def element(verb: str, set_name: str, nets: list[ipaddress.IPv4Network]) -> None:
        body = {"family": "inet", "table": TABLE, "name": set_name}
        json_cmd({verb: {"element": {**body, "elem": [elem_json(n) for n in nets]}}})

    def fresh_table() -> None:
        subprocess.run(["nft", f"delete table inet {TABLE}"], check=False, capture_output=True)
        nft(SETS)

    generated = random_cidrs(cidrs + repeat, seed=1)
    nets, spare = generated[:cidrs], generated[cidrs:]  # disjoint: one /24 block each
    rows: list[tuple[str, str, float]] = []
    elements = SetElements()

    # -- loading everything -------------------------------------------------------------------
    fresh_table()
    rows.append(
        ("load all", "SetElements.add", timed(lambda: elements.add(TABLE, "dst4", 4, nets)))
    )
    assert len(elements.list(TABLE, "dst4", 4)) == cidrs

    fresh_table()
    rows.append(("load all", "libnftables JSON", timed(lambda: element("add", "dst4", nets))))

    fresh_table()
    with tempfile.NamedTemporaryFile("w", suffix=".nft", delete=False) as f:
        f.write(f"add element inet {TABLE} dst4 {{\n")
        f.write(",\n".join(str(n) for n in nets))
        f.write("\n}\n")
    try:
        load = timed(lambda: subprocess.run(["nft", "-f", f.name], check=True))
        rows.append(("load all", "nft -f (text)", load))
    finally:
        os.unlink(f.name)
    assert len(elements.list(TABLE, "dst4", 4)) == cidrs

    # -- one element on the full set, and on a small one ---------------------------------------
    Op = Callable[[str, ipaddress.IPv4Network], None]

    def one(label: str, set_name: str, add: Op, delete: Op) -> None:
        adds, dels = [], []
        for net in spare[:repeat]:
            adds.append(timed(functools.partial(add, set_name, net)))
            dels.append(timed(functools.partial(delete, set_name, net)))
        rows.append((f"add 1 to {set_name}", label, statistics.median(adds)))
        rows.append((f"delete 1 from {set_name}", label, statistics.median(dels)))

    def nfnl_add(set_name: str, net: ipaddress.IPv4Network) -> None:
        elements.add(TABLE, set_name, 4, [net])

    def nfnl_delete(set_name: str, net: ipaddress.IPv4Network) -> None:
        elements.delete(TABLE, set_name, 4, [net])

    def lib_add(set_name: str, net: ipaddress.IPv4Network) -> None:
        element("add", set_name, [net])

    def lib_delete(set_name: str, net: ipaddress.IPv4Network) -> None:
        element("delete", set_name, [net])

    for set_name in ("dst4", "small4"):
        one("SetElements", set_name, nfnl_add, nfnl_delete)
        one("libnftables JSON", set_name, lib_add, lib_delete)

    # -- reading it back ----------------------------------------------------------------------
    got: set[Any] = set()
    rows.append(
        ("list", "SetElements.list", timed(lambda: got.update(elements.list(TABLE, "dst4", 4))))
    )
    assert got == set(nets), "SetElements.list disagrees with what was loaded"
    listing: list[Any] = []
    cmd = {"list": {"set": {"family": "inet", "table": TABLE, "name": "dst4"}}}
    rows.append(("list", "libnftables JSON", timed(lambda: listing.append(json_cmd(cmd)))))
    listed = listing[0]["nftables"][1]["set"]["elem"]  # json_cmd returns parsed JSON
    assert len(listed) == cidrs
    elements.close()

    print(f"\n{cidrs} random IPv4 CIDRs /24-/32 in inet {TABLE} dst4")
    print(f"(one-CIDR rows: median of {repeat}; small4 is an empty set in the same table)")
    print(f"{'operation':<22} {'method':<20} {'time':>12}")
    print("-" * 56)
    for op, method, secs in rows:
        shown = f"{secs * 1000:9.2f} ms" if secs < 1 else f"{secs:9.2f} s "
        print(f"{op:<22} {method:<20} {shown:>12}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cidrs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(INNER_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.inside_netns:
        return outer([a for a in sys.argv[1:] if a != INNER_FLAG])
    return inner(args.cidrs, args.repeat)


if __name__ == "__main__":
    sys.exit(main())
