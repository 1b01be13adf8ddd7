"""The real :class:`~sdnsup.routes.RoutesBackend`: rtnetlink on a raw socket, batched.

Why not pyroute2's ``IPRoute``: it does one blocking round trip per object (~0.3 ms per route)
and its message classes are slow to build (measured ~100 us to encode one RTM_NEWROUTE,
~30 us to decode one); at 100k routes that is tens of seconds. Route, nexthop and rule
messages are small fixed layouts, so this module packs and parses them with :mod:`struct`
and keeps the netlink protocol itself (sequence numbers, acks, dumps) in one small class,
:class:`Netlink`.

Writes are batched: many requests go out in one ``sendmsg``. The kernel handles a netlink
buffer message by message, in order, and answers every refused request with an error ack
carrying its sequence number, which maps it back to its object (see :meth:`Netlink.batch`
for how the end of a batch is detected without one ack per request). A batch is cut into
windows small enough that a window's acks always fit in the receive buffer (otherwise the
kernel drops acks: ENOBUFS).

Kernel references: include/uapi/linux/{netlink,rtnetlink,nexthop,fib_rules}.h.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TypeVar

from sdnsup.cidrs import NO_KNOWN_NETWORKS, KnownNetworks
from sdnsup.errors import RoutesError
from sdnsup.netlink import (
    NLA,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    U32,
    Netlink,
    attr,
    attr_u32,
    attrs,
    message,
    u32,
)
from sdnsup.routes import Failure, Foreign, IPAddress, IPNetwork, Link, Nexthop, Route, Rule

T = TypeVar("T")
W = TypeVar("W", Route, Nexthop, Rule)  # what a batch of RtnlRoutes writes
B = TypeVar("B")  # what any batch writes

# --- include/uapi/linux/rtnetlink.h -------------------------------------------------------
RTM_GETLINK = 18
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26
RTM_NEWRULE = 32
RTM_DELRULE = 33
RTM_GETRULE = 34
RTM_NEWNEXTHOP = 104
RTM_DELNEXTHOP = 105
RTM_GETNEXTHOP = 106
RTN_UNICAST = 1
RTN_LOCAL = 2
RTN_BLACKHOLE = 6
RTN_UNREACHABLE = 7
RTN_PROHIBIT = 8
RTN_THROW = 9
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_NOWHERE = 255
RT_TABLE_UNSPEC = 0
RT_TABLE_COMPAT = 252  # rtm_table of a route whose real table (> 255) is in RTA_TABLE
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PREFSRC = 7
RTA_TABLE = 15
RTA_VIA = 18
RTA_NH_ID = 30  # kernel >= 5.3; pyroute2 0.9.7 does not decode it
IFLA_IFNAME = 3

# --- include/uapi/linux/nexthop.h (kernel >= 5.3) -----------------------------------------
NHA_ID = 1
NHA_GROUP = 2
NHA_BLACKHOLE = 4
NHA_OIF = 5
NHA_GATEWAY = 6
NHA_FDB = 11

# --- include/uapi/linux/fib_rules.h -------------------------------------------------------
FRA_IIFNAME = 3
FRA_PRIORITY = 6
FRA_FWMARK = 10
FRA_TABLE = 15
FRA_FWMASK = 16
FRA_PROTOCOL = 21  # kernel >= 4.17
FR_ACT_TO_TBL = 1

# Wire layouts, native byte order (netlink is host-endian; addresses are network order).
RTMSG = struct.Struct("=BBBBBBBBI")  # family dst_len src_len tos table protocol scope type, flags
# struct fib_rule_hdr: family dst_len src_len tos table res1 res2 action, flags
FIB_RULE_HDR = struct.Struct("=BBBBBBBBI")
NHMSG = struct.Struct("=BBBBI")  # nh_family nh_scope nh_protocol resvd, nh_flags
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change

# A full route request in one pack: nlmsghdr, rtmsg, RTA_TABLE, RTA_DST, RTA_NH_ID. add_routes
# is the hot path (100k routes), and one struct call is ~5x faster than assembling attributes.
_ROUTE_V4 = struct.Struct("=IHHII BBBBBBBBI HHI HH4s HHI")
_ROUTE_V6 = struct.Struct("=IHHII BBBBBBBBI HHI HH16s HHI")

_DUMP_ATTEMPTS = 3
# Errors of a route lookup that mean "no usable route": no route, unreachable, a blackhole
# route (EINVAL), prohibit (EACCES), throw (EAGAIN).
_UNREACHABLE = frozenset(
    {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EINVAL, errno.EACCES, errno.EAGAIN}
)


def _ip(payload: bytes | None) -> IPAddress | None:
    if payload is None:
        return None
    if len(payload) == 4:
        return ipaddress.IPv4Address(payload)
    if len(payload) == 16:
        return ipaddress.IPv6Address(payload)
    return None


def _route_message(
    kind: int, flags: int, seq: int, route: Route, proto: int, scope: int, rtype: int
) -> bytes:
    """A complete RTM_NEWROUTE/RTM_DELROUTE for ``route``.

    The table always goes in RTA_TABLE (32 bits); rtm_table can only hold tables < 256.
    """
    dst = route.dst
    table = route.table
    v4 = dst.version == 4
    family = socket.AF_INET if v4 else socket.AF_INET6
    rtm_table = table if table < 256 else RT_TABLE_COMPAT
    if route.nhid:
        layout = _ROUTE_V4 if v4 else _ROUTE_V6
        return layout.pack(
            # nlmsghdr
            layout.size, kind, flags, seq, 0,
            # rtmsg: family dst_len src_len tos table protocol scope type, flags
            family, dst.prefixlen, 0, 0, rtm_table, proto, scope, rtype, 0,
            # attributes: (nla_len, nla_type, value)
            8, RTA_TABLE, table,
            8 if v4 else 20, RTA_DST, dst.network_address.packed,
            8, RTA_NH_ID, route.nhid,
        )  # fmt: skip
    # A route without a nexthop object (nhid 0), e.g. a leftover to delete: not a hot path.
    body = RTMSG.pack(family, dst.prefixlen, 0, 0, rtm_table, proto, scope, rtype, 0)
    body += attr_u32(RTA_TABLE, table) + attr(RTA_DST, dst.network_address.packed)
    return message(kind, flags, seq, body)


def _nexthop_message(kind: int, flags: int, seq: int, nexthop: Nexthop, proto: int) -> bytes:
    """A complete RTM_NEWNEXTHOP/RTM_DELNEXTHOP (struct nhmsg + NHA_* attributes).

    For a delete only ``nexthop.id`` matters. For a create: a gateway goes with NHA_OIF (the
    kernel requires the device); no gateway and no ifindex is NHA_BLACKHOLE, which the
    kernel refuses alongside NHA_OIF/NHA_GATEWAY; no gateway with an ifindex is a
    device-only nexthop. nh_scope must be 0 in a request: the kernel computes it.
    """
    payload = attr_u32(NHA_ID, nexthop.id)
    if kind == RTM_DELNEXTHOP:
        return message(kind, flags, seq, NHMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + payload)
    if nexthop.gateway is not None:
        payload += attr_u32(NHA_OIF, nexthop.ifindex)
        payload += attr(NHA_GATEWAY, nexthop.gateway.packed)
    elif nexthop.ifindex:
        payload += attr_u32(NHA_OIF, nexthop.ifindex)
    else:
        payload += attr(NHA_BLACKHOLE, b"")
    return message(kind, flags, seq, NHMSG.pack(nexthop.family, 0, proto, 0, 0) + payload)


def _rule_message(kind: int, flags: int, seq: int, rule: Rule, proto: int | None) -> bytes:
    """A complete RTM_NEWRULE/RTM_DELRULE: ``fwmark MARK/MASK [iif IF] lookup TABLE pref P``.

    ``proto`` None leaves FRA_PROTOCOL out (a delete then matches any protocol).
    """
    table = rule.table
    body = FIB_RULE_HDR.pack(
        rule.family, 0, 0, 0, table if table < 256 else RT_TABLE_UNSPEC, 0, 0, FR_ACT_TO_TBL, 0
    )
    body += attr_u32(FRA_PRIORITY, rule.priority)
    body += attr_u32(FRA_FWMARK, rule.fwmark)
    body += attr_u32(FRA_FWMASK, rule.fwmask)
    body += attr_u32(FRA_TABLE, table)
    if rule.iifname:
        body += attr(FRA_IIFNAME, rule.iifname.encode() + b"\0")
    if proto is not None:
        body += attr(FRA_PROTOCOL, bytes([proto]))
    return message(kind, flags, seq, body)


def _parse_rule(data: bytes, start: int, end: int) -> tuple[int, Rule]:
    """One RTM_NEWRULE message: its protocol (FRA_PROTOCOL, 0 when absent) and the rule."""
    family, _d, _s, _t, table, _r1, _r2, _action, _f = FIB_RULE_HDR.unpack_from(data, start)
    a = attrs(data, start + FIB_RULE_HDR.size, end)
    rproto = a.get(FRA_PROTOCOL)
    return rproto[0] if rproto else 0, Rule(
        family,
        u32(a.get(FRA_PRIORITY)),
        u32(a.get(FRA_FWMARK)),
        u32(a.get(FRA_FWMASK)),
        u32(a.get(FRA_TABLE), table),
        a.get(FRA_IIFNAME, b"").split(b"\0", 1)[0].decode(errors="replace"),
    )


class RtnlRoutes:
    """:class:`~sdnsup.routes.RoutesBackend` over rtnetlink, in the current network namespace.

    The namespace is fixed when the object is created (the socket stays in it even if the
    thread later moves). Calls are serialised by a lock, so the object may be shared by
    worker threads (e.g. ``trio.to_thread``), but calls never run concurrently.

    Nexthops: a gateway nexthop needs ``ifindex`` (the kernel refuses a gateway without a
    device); ``gateway=None, ifindex=0`` is a blackhole; ``gateway=None`` with an ifindex is a
    device-only nexthop (``ip nexthop add id N dev IF``). A blackhole keeps its ``family``:
    IPv6 routes can only use an AF_INET6 nexthop, blackhole included.

    Deletes: the protocol's delete calls carry no protocol, so by default they match any;
    :meth:`delete_routes` and :meth:`delete_rules` take an optional ``proto=`` that makes
    the kernel spare another owner's identical object.
    """

    def __init__(self, nl: Netlink | None = None) -> None:
        """Open the rtnetlink socket (or use ``nl``).

        Raises:
            RoutesError: the socket cannot be opened.
        """
        if nl is None:
            try:
                nl = Netlink()
            except OSError as exc:
                raise RoutesError(f"cannot open an rtnetlink socket: {exc}") from exc
        self._nl = nl
        self._lock = threading.Lock()

    @classmethod
    def from_system(cls) -> RtnlRoutes:
        """The backend for the calling thread's network namespace.

        Raises:
            RoutesError: the socket cannot be opened.
        """
        return cls()

    def close(self) -> None:
        """Close the socket; the object is unusable afterwards."""
        with self._lock:
            self._nl.close()

    def __enter__(self) -> RtnlRoutes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reads ------------------------------------------------------------------------------

    def _dump(
        self, what: str, kind: int, body: bytes, parse: Callable[[int, bytes, int, int], T | None]
    ) -> list[T]:
        """Dump and parse, retrying when a concurrent change interrupted the dump.

        Raises:
            RoutesError: the socket failed, the kernel refused, or every attempt was
                interrupted.
        """
        with self._lock:
            for _ in range(_DUMP_ATTEMPTS):
                try:
                    out, interrupted = self._nl.dump(kind, body, parse)
                except OSError as exc:
                    raise RoutesError(f"cannot read {what} from the kernel: {exc}") from exc
                if not interrupted:
                    return out
        raise RoutesError(
            f"cannot read {what}: the kernel interrupted {_DUMP_ATTEMPTS} dumps in a row "
            "because they changed meanwhile; retry later"
        )

    def routes(self, proto: int, known: KnownNetworks = NO_KNOWN_NETWORKS) -> set[Route]:
        """Every route tagged ``proto`` in any table, both families; destinations are
        ``known``'s network objects where it has them.

        A route that does not use a nexthop object is returned with ``nhid=0``.

        Raises:
            RoutesError: the dump failed.
        """

        def parse(mtype: int, data: bytes, start: int, end: int) -> Route | None:
            # The hot loop of a 100k-route dump: look at the three attributes we need and
            # skip the others (RTA_OIF, RTA_GATEWAY... of the nexthop) without slicing them.
            family, dst_len, _s, _t, table, rproto, _sc, _ty, _f = RTMSG.unpack_from(data, start)
            if mtype != RTM_NEWROUTE or rproto != proto:
                return None
            raw = None
            nhid = 0
            found = 0  # the kernel puts the nexthop's own attributes last: stop before them
            pos = start + RTMSG.size
            while pos + 4 <= end and found < 3:
                size, kind = unpack_nla(data, pos)
                if kind == RTA_DST:
                    raw = data[pos + 4 : pos + size]
                    found += 1
                elif kind == RTA_TABLE:
                    table = unpack_u32(data, pos + 4)[0]
                    found += 1
                elif kind == RTA_NH_ID:
                    nhid = unpack_u32(data, pos + 4)[0]
                    found += 1
                if size < 4:
                    break  # malformed; the kernel never sends this
                pos += (size + 3) & ~3
            dst: ipaddress.IPv4Network | ipaddress.IPv6Network
            address = int.from_bytes(raw, "big") if raw else 0
            if family == socket.AF_INET:
                dst = known.ipv4(address, dst_len)
            else:
                dst = known.ipv6(address, dst_len)
            return Route(dst, table, nhid)

        unpack_nla = NLA.unpack_from
        unpack_u32 = U32.unpack_from
        out: set[Route] = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            # rtm_protocol in a dump request is a kernel-side filter under strict checking.
            body = RTMSG.pack(family, 0, 0, 0, RT_TABLE_UNSPEC, proto, 0, 0, 0)
            out.update(self._dump("routes", RTM_GETROUTE, body, parse))
        return out

    def nexthops(self, proto: int) -> set[Nexthop]:
        """Every nexthop object tagged ``proto``.

        Nexthop groups and FDB nexthops (which sdnsup never creates) are not returned.

        Raises:
            RoutesError: the dump failed.
        """

        def parse(mtype: int, data: bytes, start: int, end: int) -> Nexthop | None:
            family, _scope, nproto, _r, _flags = NHMSG.unpack_from(data, start)
            if mtype != RTM_NEWNEXTHOP or nproto != proto:
                return None
            a = attrs(data, start + NHMSG.size, end)
            if NHA_GROUP in a or NHA_FDB in a or NHA_ID not in a:
                return None
            return Nexthop(u32(a[NHA_ID]), family, _ip(a.get(NHA_GATEWAY)), u32(a.get(NHA_OIF)))

        # struct nhmsg, all zero: strict checking refuses any header field in a dump request.
        body = NHMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        return set(self._dump("nexthops", RTM_GETNEXTHOP, body, parse))

    def foreign_nexthops(self, proto: int) -> set[int]:
        """The ids of the nexthop objects (groups and FDB nexthops included) other software
        owns.

        Raises:
            RoutesError: the dump failed.
        """

        def parse(mtype: int, data: bytes, start: int, end: int) -> int | None:
            nproto = NHMSG.unpack_from(data, start)[2]
            if mtype != RTM_NEWNEXTHOP or nproto == proto:
                return None
            return u32(attrs(data, start + NHMSG.size, end).get(NHA_ID))

        body = NHMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        return set(self._dump("nexthops", RTM_GETNEXTHOP, body, parse))

    def rules(self, proto: int) -> set[Rule]:
        """Every policy rule tagged ``proto`` (FRA_PROTOCOL), both families.

        Raises:
            RoutesError: the dump failed.
        """

        def parse(mtype: int, data: bytes, start: int, end: int) -> Rule | None:
            rproto, rule = _parse_rule(data, start, end)
            return rule if mtype == RTM_NEWRULE and rproto == proto else None

        out: set[Rule] = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            body = FIB_RULE_HDR.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
            out.update(self._dump("policy rules", RTM_GETRULE, body, parse))
        return out

    def foreign_objects(
        self,
        proto: int,
        *,
        tables: Collection[int],
        priorities: Collection[int],
        nhids: Collection[int],
        routes: Mapping[int, Collection[IPNetwork]],
    ) -> list[Foreign]:
        """Objects another tool (a protocol other than ``proto``) holds where sdnsup would
        write: policy rules at ``priorities`` or looking up ``tables``, routes to one of
        ``routes[table]`` in a table, and nexthops with one of ``nhids``; each described
        for an error message.

        Raises:
            RoutesError: a dump failed.
        """

        def rule(mtype: int, data: bytes, start: int, end: int) -> Foreign | None:
            rproto, r = _parse_rule(data, start, end)
            if mtype != RTM_NEWRULE or rproto == proto:
                return None
            if r.priority not in priorities and r.table not in tables:
                return None
            fam = "IPv4" if r.family == socket.AF_INET else "IPv6"
            return Foreign(
                f"{fam} policy rule priority {r.priority} lookup {r.table} (proto {rproto})"
            )

        def route(mtype: int, data: bytes, start: int, end: int) -> Foreign | None:
            family, dst_len, _s, _t, table, rproto, _sc, _ty, _f = RTMSG.unpack_from(data, start)
            if mtype != RTM_NEWROUTE or rproto == proto:
                return None
            if table != RT_TABLE_COMPAT and table not in tables:
                # The header holds tables below 256 itself: the main table's routes (all of
                # a full routing table on a router) are skipped without parsing attributes.
                return None
            a = attrs(data, start + RTMSG.size, end)
            table = u32(a.get(RTA_TABLE), table)
            if table not in tables:
                return None
            raw = a.get(RTA_DST) or bytes(4 if family == socket.AF_INET else 16)
            dst = ipaddress.ip_network((raw, dst_len))
            if dst not in routes.get(table, ()):
                return None  # another destination in the same table: it stays, untouched
            return Foreign(f"route {dst} in table {table} (proto {rproto})", route=(table, dst))

        def nexthop(mtype: int, data: bytes, start: int, end: int) -> Foreign | None:
            _family, _scope, nproto, _r, _flags = NHMSG.unpack_from(data, start)
            a = attrs(data, start + NHMSG.size, end)
            nhid = u32(a.get(NHA_ID))
            if mtype != RTM_NEWNEXTHOP or nproto == proto or nhid not in nhids:
                return None
            return Foreign(f"nexthop id {nhid} ({nhid:#x}, proto {nproto})", nhid=nhid)

        found: list[Foreign] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            body = FIB_RULE_HDR.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
            found += self._dump("policy rules", RTM_GETRULE, body, rule)
            body = RTMSG.pack(family, 0, 0, 0, RT_TABLE_UNSPEC, 0, 0, 0, 0)
            found += self._dump("routes", RTM_GETROUTE, body, route)
        found += self._dump(
            "nexthops", RTM_GETNEXTHOP, NHMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0), nexthop
        )
        return found

    def resolve(self, addr: IPAddress) -> Link | None:
        """Where the kernel sends packets for ``addr`` without a mark (``ip route get``).

        This is a full lookup through the policy rules, like ``ip route get``: with no mark
        sdnsup's own rule does not apply, so it normally ends in the main table.

        Returns:
            The outgoing link, or None when the kernel has no usable route (unreachable,
            blackhole, prohibit, throw).

        Raises:
            RoutesError: the socket failed or the kernel refused the request itself.
        """
        v4 = addr.version == 4
        family = socket.AF_INET if v4 else socket.AF_INET6
        body = RTMSG.pack(family, 32 if v4 else 128, 0, 0, 0, 0, 0, 0, 0)
        body += attr(RTA_DST, addr.packed)
        with self._lock:
            try:
                _mtype, data, start, end = self._nl.request(RTM_GETROUTE, body)
            except OSError as exc:
                # A blackhole route answers EINVAL, prohibit EACCES, throw EAGAIN.
                if exc.errno in _UNREACHABLE:
                    return None
                raise RoutesError(f"route lookup for {addr} failed: {exc}") from exc
            rtype = RTMSG.unpack_from(data, start)[7]
            if rtype in (RTN_BLACKHOLE, RTN_UNREACHABLE, RTN_PROHIBIT, RTN_THROW):
                return None
            a = attrs(data, start + RTMSG.size, end)
            ifindex = u32(a.get(RTA_OIF))
            gateway = _ip(a.get(RTA_GATEWAY))
            via = a.get(RTA_VIA)  # an IPv4 route via an IPv6 gateway: struct rtvia
            if gateway is None and via is not None:
                gateway = _ip(via[2:])
            ifname = self._ifname(ifindex)
            prefsrc = _ip(a.get(RTA_PREFSRC))
            return Link(ifindex, ifname, gateway, prefsrc, local=rtype == RTN_LOCAL)

    def _ifname(self, ifindex: int) -> str:
        """Interface name by index, asked on our socket so that it is our namespace's."""
        body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, ifindex, 0, 0)
        try:
            _mtype, data, start, end = self._nl.request(RTM_GETLINK, body)
        except OSError as exc:
            raise RoutesError(f"cannot read the name of interface {ifindex}: {exc}") from exc
        name = attrs(data, start + IFINFOMSG.size, end).get(IFLA_IFNAME, b"")
        return name.split(b"\0", 1)[0].decode(errors="replace")

    # --- writes -----------------------------------------------------------------------------

    def _batch(
        self,
        what: str,
        items: Iterable[W],
        encode: Callable[[W, int], bytes],
        ok: frozenset[int] = frozenset(),
    ) -> list[Failure]:
        """Run :meth:`Netlink.batch` under the lock, mapping socket failures.

        Raises:
            RoutesError: the socket failed; part of the batch may have been applied.
        """
        with self._lock:
            try:
                return [Failure(item, err) for item, err in self._nl.batch(items, encode, ok)]
            except OSError as exc:
                hint = ""
                if exc.errno == errno.ENOBUFS:
                    hint = " (acknowledgements were lost: the receive buffer overflowed)"
                raise RoutesError(
                    f"netlink socket failed while {what}{hint}: {exc}; part of the change "
                    "may be applied, re-read the kernel state"
                ) from exc

    def add_routes(self, routes: Sequence[Route], proto: int) -> list[Failure]:
        """Create or replace ``routes`` (unicast via nexthop object ``nhid``), tagged ``proto``.

        A route replaces any route with the same (dst, table) and metric, whoever owns it.

        Returns:
            One failure per route the kernel refused, e.g. EINVAL "Nexthop id does not
            exist", or EINVAL for an IPv6 route on an IPv4 nexthop.

        Raises:
            RoutesError: the netlink socket failed.
        """
        flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE
        return self._batch(
            "adding routes",
            routes,
            lambda r, seq: _route_message(
                RTM_NEWROUTE, flags, seq, r, proto, RT_SCOPE_UNIVERSE, RTN_UNICAST
            ),
        )

    def delete_routes(self, routes: Sequence[Route], *, proto: int | None = None) -> list[Failure]:
        """Delete ``routes``, matched on (dst, table) and on ``nhid`` unless it is 0.

        Args:
            routes: the routes to delete.
            proto: also match the protocol (the kernel honours it in a delete); None, the
                default and all :class:`~sdnsup.routes.RoutesBackend` offers, matches any.

        Returns:
            One failure per route the kernel refused to delete. A route already gone
            (ESRCH, ENOENT) is not a failure; neither is one that now uses another nexthop
            or has another protocol, nor one whose nexthop no longer exists.

        Raises:
            RoutesError: the netlink socket failed.
        """
        flags = NLM_F_REQUEST
        # Scope NOWHERE, type 0 and protocol 0 mean "any" in a delete request.
        failures = self._batch(
            "deleting routes",
            routes,
            lambda r, seq: _route_message(
                RTM_DELROUTE, flags, seq, r, proto or 0, RT_SCOPE_NOWHERE, 0
            ),
            frozenset({errno.ESRCH, errno.ENOENT}),
        )
        # A delete naming a nexthop id that does not exist is refused with EINVAL ("Nexthop
        # id does not exist"); no route can use a missing nexthop, so the route is gone.
        return [
            f
            for f in failures
            if not (f.error.errno == errno.EINVAL and isinstance(f.item, Route) and f.item.nhid)
        ]

    def replace_nexthop(self, nexthop: Nexthop, proto: int) -> list[Failure]:
        """Create the nexthop object ``nexthop.id`` or replace it in place.

        Replacing keeps every route that uses the id and switches all of them at once.

        Returns:
            A one-element list if the kernel refused, e.g. ENETUNREACH for a gateway not
            reachable on ``ifindex``, EINVAL for a gateway without ifindex or for an IPv4
            nexthop under IPv6 routes; else empty.

        Raises:
            RoutesError: the netlink socket failed.
        """
        flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE
        return self._batch(
            "replacing a nexthop",
            [nexthop],
            lambda nh, seq: _nexthop_message(RTM_NEWNEXTHOP, flags, seq, nh, proto),
        )

    def delete_nexthops(self, ids: Iterable[int]) -> list[Failure]:
        """Delete nexthop objects by id; the kernel deletes the routes using them too.

        Nexthop ids are global: the kernel deletes by id whatever the protocol. A nexthop
        that does not exist (ENOENT) is not a failure. As only the id is known, a failure's
        item is ``Nexthop(id, AF_UNSPEC, None, 0)``.

        Raises:
            RoutesError: the netlink socket failed.
        """
        flags = NLM_F_REQUEST
        return self._batch(
            "deleting nexthops",
            [Nexthop(i, socket.AF_UNSPEC, None, 0) for i in ids],
            lambda nh, seq: _nexthop_message(RTM_DELNEXTHOP, flags, seq, nh, 0),
            frozenset({errno.ENOENT}),
        )

    def add_rules(self, rules: Sequence[Rule], proto: int) -> list[Failure]:
        """Add ``fwmark/mask lookup table priority`` rules tagged ``proto``, without duplicates.

        The kernel would keep duplicate rules, so the request carries NLM_F_EXCL and EEXIST
        counts as success. The kernel's duplicate check includes the protocol (seen on 6.18):
        an identical rule of another protocol does not stop ours from being added.

        Returns:
            One failure per rule the kernel refused.

        Raises:
            RoutesError: the netlink socket failed.
        """
        flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL
        return self._batch(
            "adding policy rules",
            rules,
            lambda r, seq: _rule_message(RTM_NEWRULE, flags, seq, r, proto),
            frozenset({errno.EEXIST}),
        )

    def delete_rules(self, rules: Sequence[Rule], *, proto: int | None = None) -> list[Failure]:
        """Delete the rule matching every field of each :class:`Rule`.

        Args:
            rules: the rules to delete.
            proto: also match the protocol. None, the default and all
                :class:`~sdnsup.routes.RoutesBackend` offers, matches any: of two rules
                identical but for their protocol the kernel then deletes the first it finds,
                which may not be ours.

        Returns:
            One failure per rule the kernel refused to delete; a rule that does not exist
            (ENOENT) is not a failure.

        Raises:
            RoutesError: the netlink socket failed.
        """
        flags = NLM_F_REQUEST
        return self._batch(
            "deleting policy rules",
            rules,
            lambda r, seq: _rule_message(RTM_DELRULE, flags, seq, r, proto),
            frozenset({errno.ENOENT}),
        )
