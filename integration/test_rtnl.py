"""The rtnetlink backend against a real kernel, each test in a throwaway network namespace.

Safety: nothing here touches the root namespace. A netlink socket belongs for good to the
namespace of the thread that created it, so a short-lived thread enters the test namespace
(``setns`` moves only that thread), checks that it really is there, opens the backend and
ends; this process never leaves the root namespace, and every later call of the backend
goes to the test namespace through its socket. ``ip -n NS`` is used only to set up and to
cross-check what the kernel really holds.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from sdnsup.cidrs import KnownNetworks
from sdnsup.routes import Link, Nexthop, Route, Rule
from sdnsup.rtnl import RtnlRoutes

pytestmark = pytest.mark.netns

P = 0xF5  # the protocol the tests write with (sdnsup's own)
OTHER = 99  # someone else's protocol
TABLE = 7300
V4, V6 = socket.AF_INET, socket.AF_INET6
GW4A, GW4B = ipaddress.IPv4Address("192.0.2.2"), ipaddress.IPv4Address("192.0.2.3")
GW6A, GW6B = ipaddress.IPv6Address("2001:db8::2"), ipaddress.IPv6Address("2001:db8::3")
_CLONE_NEWNET = 0x40000000


def ip(ns: str, *args: str, check: bool = True) -> str:
    """``ip -n NS ARGS`` (never in the root namespace); stdout."""
    done = subprocess.run(
        ["ip", "-n", ns, *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check and done.returncode:
        raise AssertionError(f"ip -n {ns} {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def ipj(ns: str, *args: str) -> list[dict[str, Any]]:
    """``ip -n NS -j ARGS`` parsed."""
    out = ip(ns, "-j", *args).strip()
    return json.loads(out) if out else []


def _enter_netns(ns: str) -> None:
    """Move the calling thread (only) into namespace ``ns``, and check that it got there."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.fstat(fd)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
    finally:
        os.close(fd)
    here = os.stat("/proc/thread-self/ns/net")
    if (here.st_dev, here.st_ino) != (target.st_dev, target.st_ino):
        raise RuntimeError(f"thread is not in namespace {ns} after setns")


def _open_backend_in(ns: str) -> RtnlRoutes:
    """An RtnlRoutes whose socket lives in namespace ``ns`` (see the module docstring)."""
    result: dict[str, Any] = {}

    def enter_and_open() -> None:
        try:
            _enter_netns(ns)
            result["backend"] = RtnlRoutes.from_system()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=enter_and_open, name=f"enter-{ns}")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["backend"]


@dataclass
class Netns:
    name: str
    ifindex: int  # of v0, which has 192.0.2.1/24 and 2001:db8::1/64


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A namespace with lo up and a veth pair v0/v1 up, addressed on v0; always deleted."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2")
    name = f"sdnt-rtnl-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        ip(name, "link", "set", "lo", "up")
        ip(name, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        ip(name, "link", "set", "v0", "up")
        ip(name, "link", "set", "v1", "up")
        ip(name, "addr", "add", "192.0.2.1/24", "dev", "v0")
        ip(name, "addr", "add", "2001:db8::1/64", "dev", "v0", "nodad")
        ifindex = ipj(name, "link", "show", "v0")[0]["ifindex"]
        yield Netns(name, ifindex)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


@pytest.fixture
def rt(netns: Netns) -> Iterator[RtnlRoutes]:
    backend = _open_backend_in(netns.name)
    try:
        # Belt and braces (the inode check already guarantees it): the socket sees our v0.
        link = backend.resolve(GW4A)
        assert link is not None and link.ifindex == netns.ifindex and link.ifname == "v0"
        yield backend
    finally:
        backend.close()


def v4_routes(n: int, nhid: int, table: int = TABLE) -> list[Route]:
    return [
        Route(ipaddress.IPv4Network((0x0A000000 + (i << 8), 24)), table, nhid) for i in range(n)
    ]


def v6_routes(n: int, nhid: int, table: int = TABLE) -> list[Route]:
    base = int(ipaddress.IPv6Address("2001:db8:1000::"))
    return [Route(ipaddress.IPv6Network((base + (i << 80), 48)), table, nhid) for i in range(n)]


def gw_nexthops(ns: Netns) -> tuple[Nexthop, Nexthop]:
    return Nexthop(4, V4, GW4A, ns.ifindex), Nexthop(6, V6, GW6A, ns.ifindex)


# --- routes -------------------------------------------------------------------------------


def test_add_routes_v4_and_v6_reads_back_exactly(rt: RtnlRoutes, netns: Netns) -> None:
    nh4, nh6 = gw_nexthops(netns)
    assert rt.replace_nexthop(nh4, P) == []
    assert rt.replace_nexthop(nh6, P) == []
    routes = v4_routes(1000, nh4.id) + v6_routes(100, nh6.id)

    assert rt.add_routes(routes, P) == []

    assert rt.routes(P) == set(routes)
    assert rt.nexthops(P) == {nh4, nh6}
    kernel4 = ipj(netns.name, "-4", "route", "show", "table", str(TABLE))
    kernel6 = ipj(netns.name, "-6", "route", "show", "table", str(TABLE))
    assert {r["dst"] for r in kernel4} == {str(r.dst) for r in routes if r.dst.version == 4}
    assert {r["dst"] for r in kernel6} == {str(r.dst) for r in routes if r.dst.version == 6}
    assert {(r["nhid"], r["protocol"], r["gateway"]) for r in kernel4} == {(4, str(P), str(GW4A))}
    assert {(r["nhid"], r["protocol"], r["gateway"]) for r in kernel6} == {(6, str(P), str(GW6A))}
    # read with the desired networks at hand: the very objects come back (no new ones)
    known = KnownNetworks(r.dst for r in routes)
    by_value = {r.dst: r.dst for r in routes}
    again = rt.routes(P, known)
    assert again == set(routes) and all(r.dst is by_value[r.dst] for r in again)


def test_add_is_create_or_replace(rt: RtnlRoutes, netns: Netns) -> None:
    nh4, _ = gw_nexthops(netns)
    other = Nexthop(5, V4, GW4B, netns.ifindex)
    for nh in (nh4, other):
        assert rt.replace_nexthop(nh, P) == []
    routes = v4_routes(10, nh4.id)
    assert rt.add_routes(routes, P) == []
    assert rt.add_routes(routes, P) == []  # again: no EEXIST, no duplicate
    moved = v4_routes(10, other.id)
    assert rt.add_routes(moved, P) == []
    assert rt.routes(P) == set(moved)
    assert len(ipj(netns.name, "-4", "route", "show", "table", str(TABLE))) == 10


def test_many_windows_and_failures_spread_over_them(rt: RtnlRoutes, netns: Netns) -> None:
    """10k routes span several sendmsg windows; every 997th one names a missing nexthop."""
    nh4, _ = gw_nexthops(netns)
    assert rt.replace_nexthop(nh4, P) == []
    routes = v4_routes(10_000, nh4.id)
    bad = {i for i in range(0, len(routes), 997)}
    routes = [Route(r.dst, r.table, 999) if i in bad else r for i, r in enumerate(routes)]

    failures = rt.add_routes(routes, P)

    assert [f.item for f in failures] == [routes[i] for i in sorted(bad)]
    assert {f.error.errno for f in failures} == {errno.EINVAL}
    assert "Nexthop id does not exist" in str(failures[0].error)
    assert rt.routes(P) == {r for i, r in enumerate(routes) if i not in bad}


def test_route_to_missing_nexthop_is_a_failure_not_an_exception(
    rt: RtnlRoutes, netns: Netns
) -> None:
    nh4, _ = gw_nexthops(netns)
    rt.replace_nexthop(nh4, P)
    good = v4_routes(2, nh4.id)
    bad4 = Route(ipaddress.ip_network("10.200.0.0/16"), TABLE, 4242)
    bad6 = Route(ipaddress.ip_network("2001:db8:dead::/48"), TABLE, 6262)
    wrong_family = Route(ipaddress.ip_network("2001:db8:beef::/48"), TABLE, nh4.id)

    failures = rt.add_routes([good[0], bad4, bad6, wrong_family, good[1]], P)

    assert [f.item for f in failures] == [bad4, bad6, wrong_family]
    assert all(isinstance(f.error, OSError) and f.error.errno == errno.EINVAL for f in failures)
    assert rt.routes(P) == set(good)


def test_delete_routes(rt: RtnlRoutes, netns: Netns) -> None:
    nh4, nh6 = gw_nexthops(netns)
    rt.replace_nexthop(nh4, P)
    rt.replace_nexthop(nh6, P)
    routes = v4_routes(300, nh4.id) + v6_routes(30, nh6.id)
    assert rt.add_routes(routes, P) == []
    gone, kept = routes[::2], routes[1::2]

    assert rt.delete_routes(gone) == []
    assert rt.routes(P) == set(kept)
    assert rt.delete_routes(gone) == []  # already gone: not a failure
    # A route value whose nhid differs from the kernel's is not that route: kept, no failure.
    assert rt.delete_routes([Route(kept[0].dst, TABLE, nh6.id)]) == []
    assert kept[0] in rt.routes(P)
    # Naming a nexthop that does not exist: the route cannot exist either.
    assert rt.delete_routes([Route(kept[0].dst, TABLE, 5555)]) == []

    assert rt.delete_routes(kept) == []
    assert rt.routes(P) == set()
    assert ip(netns.name, "-4", "route", "show", "table", str(TABLE), check=False) == ""
    assert ip(netns.name, "-6", "route", "show", "table", str(TABLE), check=False) == ""


def test_tables_below_and_above_255(rt: RtnlRoutes, netns: Netns) -> None:
    nh4, nh6 = gw_nexthops(netns)
    rt.replace_nexthop(nh4, P)
    rt.replace_nexthop(nh6, P)
    routes = v4_routes(3, nh4.id, table=100) + v4_routes(3, nh4.id, table=70000)
    routes += v6_routes(2, nh6.id, table=100) + v6_routes(2, nh6.id, table=70000)
    assert rt.add_routes(routes, P) == []
    assert rt.routes(P) == set(routes)
    assert len(ipj(netns.name, "-4", "route", "show", "table", "70000")) == 3
    assert len(ipj(netns.name, "-6", "route", "show", "table", "100")) == 2


# --- nexthops -----------------------------------------------------------------------------


def _gateway(ns: str, dst: str, mark: int) -> str | None:
    """The gateway of ``ip route get DST mark MARK`` in ``ns``; None if no route or on-link."""
    done = subprocess.run(
        ["ip", "-n", ns, "-j", "route", "get", dst, "mark", str(mark)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return json.loads(done.stdout)[0].get("gateway") if done.returncode == 0 else None


def test_replace_nexthop_switches_every_route(rt: RtnlRoutes, netns: Netns) -> None:
    nh4, nh6 = gw_nexthops(netns)
    rt.replace_nexthop(nh4, P)
    rt.replace_nexthop(nh6, P)
    routes = v4_routes(500, nh4.id) + v6_routes(50, nh6.id)
    assert rt.add_routes(routes, P) == []
    rules = [Rule(V4, 100, 0x10, 0xFF, TABLE), Rule(V6, 100, 0x10, 0xFF, TABLE)]
    assert rt.add_rules(rules, P) == []
    assert _gateway(netns.name, "10.0.7.1", 0x10) == str(GW4A)
    assert _gateway(netns.name, "2001:db8:1003::1", 0x10) == str(GW6A)
    assert _gateway(netns.name, "10.0.7.1", 0) is None  # no mark: main table, no route

    assert rt.replace_nexthop(Nexthop(nh4.id, V4, GW4B, netns.ifindex), P) == []
    assert rt.replace_nexthop(Nexthop(nh6.id, V6, GW6B, netns.ifindex), P) == []

    assert _gateway(netns.name, "10.0.7.1", 0x10) == str(GW4B)
    assert _gateway(netns.name, "2001:db8:1003::1", 0x10) == str(GW6B)
    assert rt.routes(P) == set(routes)  # same routes, same nhid
    assert rt.nexthops(P) == {
        Nexthop(nh4.id, V4, GW4B, netns.ifindex),
        Nexthop(nh6.id, V6, GW6B, netns.ifindex),
    }


def test_blackhole_nexthop(rt: RtnlRoutes, netns: Netns) -> None:
    hole4, hole6 = Nexthop(4, V4, None, 0), Nexthop(6, V6, None, 0)
    assert rt.replace_nexthop(hole4, P) == []
    assert rt.replace_nexthop(hole6, P) == []
    assert rt.nexthops(P) == {hole4, hole6}
    assert "blackhole" in ip(netns.name, "nexthop", "show", "id", "4")
    routes = v4_routes(20, 4) + v6_routes(5, 6)
    assert rt.add_routes(routes, P) == []
    assert rt.add_rules([Rule(V4, 100, 0x10, 0xFF, TABLE)], P) == []
    assert _gateway(netns.name, "10.0.3.1", 0x10) is None  # dropped, not leaked to main

    # AP back: the blackhole becomes a gateway in place, and back again.
    assert rt.replace_nexthop(Nexthop(4, V4, GW4A, netns.ifindex), P) == []
    assert _gateway(netns.name, "10.0.3.1", 0x10) == str(GW4A)
    assert rt.replace_nexthop(hole4, P) == []
    assert _gateway(netns.name, "10.0.3.1", 0x10) is None
    assert rt.routes(P) == set(routes)

    # IPv6 routes cannot use an IPv4 nexthop, blackhole included: a failure, nothing changes.
    failures = rt.replace_nexthop(Nexthop(6, V4, None, 0), P)
    assert [f.item for f in failures] == [Nexthop(6, V4, None, 0)]
    assert rt.nexthops(P) == {hole4, hole6}


def test_nexthop_refusals_are_failures(rt: RtnlRoutes, netns: Netns) -> None:
    no_dev = Nexthop(7, V4, GW4A, 0)
    off_link = Nexthop(8, V4, ipaddress.IPv4Address("198.51.100.1"), netns.ifindex)
    for nh in (no_dev, off_link):
        failures = rt.replace_nexthop(nh, P)
        assert [f.item for f in failures] == [nh]
        assert failures[0].error.errno is not None
    assert rt.nexthops(P) == set()


def test_delete_nexthops_takes_their_routes(rt: RtnlRoutes, netns: Netns) -> None:
    nh4, nh6 = gw_nexthops(netns)
    rt.replace_nexthop(nh4, P)
    rt.replace_nexthop(nh6, P)
    assert rt.add_routes(v4_routes(100, nh4.id) + v6_routes(10, nh6.id), P) == []

    assert rt.delete_nexthops([nh4.id]) == []
    assert rt.nexthops(P) == {nh6}
    assert {r.nhid for r in rt.routes(P)} == {nh6.id}
    assert rt.delete_nexthops([nh4.id, nh6.id, 12345]) == []  # missing ones are no failure
    assert rt.nexthops(P) == set() and rt.routes(P) == set()
    assert ip(netns.name, "nexthop", "show") == ""


# --- rules --------------------------------------------------------------------------------


def test_rules_add_twice_is_one_rule(rt: RtnlRoutes, netns: Netns) -> None:
    rules = [
        Rule(V4, 100, 0x10, 0xFF, TABLE),
        Rule(V6, 100, 0x10, 0xFF, TABLE),
        Rule(V4, 101, 0x20000, 0xF0000, 200),
    ]
    assert rt.add_rules(rules, P) == []
    assert rt.add_rules(rules, P) == []

    assert rt.rules(P) == set(rules)
    mine4 = [r for r in ipj(netns.name, "-4", "rule", "show") if r.get("protocol") == str(P)]
    mine6 = [r for r in ipj(netns.name, "-6", "rule", "show") if r.get("protocol") == str(P)]
    assert sorted((r["priority"], r["fwmark"], r["fwmask"], r["table"]) for r in mine4) == [
        (100, "0x10", "0xff", str(TABLE)),
        (101, "0x20000", "0xf0000", "200"),
    ]
    assert len(mine6) == 1

    assert rt.delete_rules(rules) == []
    assert rt.rules(P) == set()
    assert rt.delete_rules(rules) == []  # missing: not a failure
    remaining = ipj(netns.name, "-4", "rule", "show") + ipj(netns.name, "-6", "rule", "show")
    assert {r["table"] for r in remaining} == {"local", "main", "default"}


# --- other owners -------------------------------------------------------------------------


def test_objects_of_other_protocols_are_ignored_and_untouched(rt: RtnlRoutes, netns: Netns) -> None:
    ns = netns.name
    ip(ns, *f"nexthop add id 50 via {GW4B} dev v0 proto {OTHER}".split())
    ip(ns, *f"route add 10.99.0.0/16 nhid 50 table {TABLE} proto {OTHER}".split())
    ip(ns, *f"route add 10.98.0.0/16 via {GW4B} table {TABLE}".split())  # proto boot
    ip(ns, *f"rule add fwmark 0x20 lookup {TABLE} pref 200 proto {OTHER}".split())
    nh4, _ = gw_nexthops(netns)
    mine = Rule(V4, 100, 0x10, 0xFF, TABLE)

    assert rt.replace_nexthop(nh4, P) == []
    assert rt.add_routes(v4_routes(5, nh4.id), P) == []
    assert rt.add_rules([mine], P) == []

    assert rt.nexthops(P) == {nh4}
    assert rt.routes(P) == set(v4_routes(5, nh4.id))
    assert rt.rules(P) == {mine}
    # Reading another protocol works the same way.
    assert rt.routes(OTHER) == {Route(ipaddress.ip_network("10.99.0.0/16"), TABLE, 50)}
    assert rt.nexthops(OTHER) == {Nexthop(50, V4, GW4B, netns.ifindex)}
    assert rt.rules(OTHER) == {Rule(V4, 200, 0x20, 0xFFFFFFFF, TABLE)}

    assert rt.delete_routes(v4_routes(5, nh4.id)) == []
    assert rt.delete_rules([mine]) == []
    assert rt.delete_nexthops([nh4.id]) == []

    table = {r["dst"] for r in ipj(ns, "-4", "route", "show", "table", str(TABLE))}
    assert table == {"10.99.0.0/16", "10.98.0.0/16"}
    assert [n["id"] for n in ipj(ns, "nexthop", "show")] == [50]
    assert [r["priority"] for r in ipj(ns, "rule", "show") if r.get("fwmark")] == [200]


# --- resolve ------------------------------------------------------------------------------


def test_resolve(rt: RtnlRoutes, netns: Netns) -> None:
    ns = netns.name
    ip(ns, "route", "add", "198.51.100.0/24", "via", "192.0.2.254")
    ip(ns, "-6", "route", "add", "2001:db8:77::/48", "via", "2001:db8::fe")
    ip(ns, "route", "add", "blackhole", "203.0.113.0/24")
    ip(ns, "route", "add", "unreachable", "203.0.114.0/24")
    src4, src6 = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("2001:db8::1")

    assert rt.resolve(GW4A) == Link(netns.ifindex, "v0", None, src4)
    assert rt.resolve(GW6A) == Link(netns.ifindex, "v0", None, src6)
    assert rt.resolve(ipaddress.ip_address("198.51.100.9")) == Link(
        netns.ifindex, "v0", ipaddress.ip_address("192.0.2.254"), src4
    )
    assert rt.resolve(ipaddress.ip_address("2001:db8:77::9")) == Link(
        netns.ifindex, "v0", ipaddress.ip_address("2001:db8::fe"), src6
    )
    for unreachable in ("8.8.8.8", "203.0.113.1", "203.0.114.1", "2001:db9::1"):
        assert rt.resolve(ipaddress.ip_address(unreachable)) is None, unreachable


def test_deletes_restricted_to_a_protocol_spare_identical_foreign_objects(
    rt: RtnlRoutes, netns: Netns
) -> None:
    """Another protocol's rule/route identical to ours survives a delete given ``proto``."""
    ns = netns.name
    ip(ns, *f"rule add fwmark 0x10/0xff lookup {TABLE} pref 100 proto {OTHER}".split())
    ip(ns, *f"-6 route add 2001:db8:1000::/48 via {GW6B} table {TABLE} proto {OTHER}".split())
    rule = Rule(V4, 100, 0x10, 0xFF, TABLE)
    assert rt.add_rules([rule], P) == []  # the foreign twin does not count as "exists"
    assert rt.rules(P) == {rule} and rt.rules(OTHER) == {rule}
    foreign_route = Route(ipaddress.ip_network("2001:db8:1000::/48"), TABLE, 0)
    assert rt.routes(OTHER) == {foreign_route}

    assert rt.delete_rules([rule], proto=P) == []
    assert rt.delete_routes([foreign_route], proto=P) == []  # not ours: "already gone"

    assert rt.rules(P) == set() and rt.rules(OTHER) == {rule}
    assert rt.routes(OTHER) == {foreign_route}


# --- the socket itself --------------------------------------------------------------------


def test_an_aborted_dump_does_not_wedge_the_socket(rt: RtnlRoutes, netns: Netns) -> None:
    """A dump abandoned midway (here: the parser raises) is drained by the next call."""
    from sdnsup import rtnl  # private internals, on purpose

    nh4, _ = gw_nexthops(netns)
    rt.replace_nexthop(nh4, P)
    routes = v4_routes(3000, nh4.id)  # several dump datagrams
    assert rt.add_routes(routes, P) == []

    def explode(*_args: object) -> None:
        raise ValueError("parser failure")

    body = rtnl.RTMSG.pack(V4, 0, 0, 0, 0, P, 0, 0, 0)
    with pytest.raises(ValueError, match="parser failure"):
        rt._nl.dump(rtnl.RTM_GETROUTE, body, explode)

    assert rt.routes(P) == set(routes)
    assert rt.delete_routes(routes[:10]) == []
    assert len(rt.routes(P)) == 2990
