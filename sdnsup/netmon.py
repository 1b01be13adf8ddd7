"""The netlink monitor: tells the daemon when to re-read and reconcile its kernel state.

Events are triggers, not truth. The monitor never decides what to write; it calls
``trigger(cause)`` ("link eth1 up (+3 more events)") and the applier re-reads the kernel and
diffs. Pieces, each testable on its own:

* :func:`parse_rtnl` / :func:`parse_nfnl`: datagram bytes -> :class:`Event` values;
* :func:`relevant`: pure, ``(Event, Watch) -> cause | None``;
* :class:`Monitor`: two netlink sockets read concurrently, echo muting, coalescing.

Why :mod:`struct` and not pyroute2 for parsing: the messages we read are small fixed headers
plus a few attributes, and :mod:`sdnsup.rtnl` already parses the same layouts; pyroute2's
message classes cost ~30 us per decode (measured there) against ~2 us here, which matters
in storms (``ip route flush`` of 100k routes), and pyroute2 0.9.7 decodes neither RTA_NH_ID
nor nexthop messages. The nfnetlink side needs only the table/object name attributes.

Kernel facts this module is built on (Linux 6.18, captured in a namespace; the captures are
the fixtures of ``tests/test_netmon.py``):

* ``ip link set X down`` removes the nexthop objects through X and the routes using them
  *without* RTM_DELNEXTHOP/RTM_DELROUTE; ``ip nexthop del`` removes the IPv4 routes using it
  without RTM_DELROUTE. Link and address events of the AP interfaces are therefore heal
  causes in their own right (the kernel re-adds nothing on link up).
* ``ip route replace`` of our route by another owner is an RTM_NEWROUTE with NLM_F_REPLACE
  and a foreign protocol, and no RTM_DELROUTE; ``ip nexthop replace`` of our id likewise.
* nftables changes arrive on NETLINK_NETFILTER group NFNLGRP_NFTABLES, one message per
  object and then NFT_MSG_NEWGEN per transaction. ``nft delete table`` and ``nft flush
  ruleset`` report DELRULE, DELSET, DELCHAIN, then DELTABLE for each table; the elements of
  a deleted set get no DELSETELEM.
* A notification's ``nlmsg_pid`` is the port id of the socket whose request caused it
  (0 for the kernel's own changes): the ``ip``/``nft`` process's socket, or one of ours.

Echoes of our own writes: additions tagged with our protocol are never relevant, and the
kernel drops them before they reach us (a socket filter, :func:`rtnl_filter`) so that a 100k
route apply does not flood the monitor. Deletions made by sdnsup itself (a CIDR removed, the
nftables table replaced) are muted by port id: an event is an echo exactly when its
``nlmsg_pid`` is the port of one of this process's netlink sockets. Anyone else's change
carries another port (the ``ip``/``nft`` process's) or 0 (the kernel), and triggers, however
close in time to ours it comes. Why ``/proc`` (:func:`own_netlink_ports`) rather than
asking each socket (``getsockname``): one of sdnsup's writing sockets is opened by libnftables
inside the Python binding, which does not expose it. The process's socket inodes
(``/proc/self/fd``) matched against the namespace's netlink table (``net/netlink``: inode ->
port id) cover it, the rtnetlink and nfnetlink sockets of :mod:`sdnsup.rtnl` and
:mod:`sdnsup.nfnl`, and any socket opened later, without the writers exposing anything.

Errors: opening or reading a socket fails with :class:`~sdnsup.errors.RoutesError`
(rtnetlink) or :class:`~sdnsup.errors.NftError` (nfnetlink), which ends :meth:`Monitor.run`.
The one expected runtime failure, ENOBUFS (the receive queue overflowed, events were lost),
is not an error: it becomes a trigger, since a full re-check repairs whatever was missed.
Anything else is a bug or a broken system, and restarting with backoff is the supervisor's
single policy (design section 3), not a second retry loop hidden here.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import math
import os
import socket
import struct
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from sdnsup.errors import KernelError, NftError, RoutesError
from sdnsup.netlink import (
    NETLINK_NETFILTER,
    NLM_F_REPLACE,
    attach_filter,
    attrs,
    join,
    leave,
    messages,
    subscribe,
    u32,
)
from sdnsup.nfnl import NFNL_SUBSYS_NFTABLES, NFPROTO_INET
from sdnsup.routes import RTPROT_SDNSUP
from sdnsup.rtnl import (
    FIB_RULE_HDR,
    FRA_PRIORITY,
    FRA_PROTOCOL,
    FRA_TABLE,
    IFINFOMSG,
    IFLA_IFNAME,
    NHA_ID,
    NHA_OIF,
    NHMSG,
    RTA_DST,
    RTA_NH_ID,
    RTA_OIF,
    RTA_TABLE,
    RTM_DELNEXTHOP,
    RTM_DELROUTE,
    RTM_DELRULE,
    RTM_NEWNEXTHOP,
    RTM_NEWROUTE,
    RTM_NEWRULE,
    RTMSG,
)
from sdnsup.state import (
    DEFAULT_PRIORITY,
    DEFAULT_TABLE,
    NFT_TABLE,
    NHID_V4,
    NHID_V6,
    PRIORITY_SPAN,
    Settings,
)

log = logging.getLogger("sdnsup.netmon")

# A burst ends when no relevant event came for COALESCE. One kernel operation queues all its
# notifications within ~1 ms (measured: a link going down and its address/route removals in
# 0.3 ms, a whole nft transaction at once), and scripts issue ``ip``/``nft`` commands 2-5 ms
# apart. 20 ms gathers a link flap or a short script into one trigger and adds only 20 ms to
# the time to heal.
COALESCE = 0.020
# A burst that goes on (a flapping link, 20k route deletions streaming in for 0.5 s) is still
# reported this long after its first event: heal latency stays bounded, and a storm costs
# the applier two re-checks a second instead of one every 20 ms.
SETTLE_MAX = 0.5
OVERFLOW_CAUSE = "netlink overflow, events lost"
# Where own_netlink_ports() looks: the process's descriptors, and the netlink sockets of the
# calling thread's network namespace (port ids are per namespace; thread-self, not self, in
# case a thread was moved with setns).
PROC_FDS = "/proc/self/fd"
PROC_NETLINK = "/proc/thread-self/net/netlink"
# Foreign ports remembered so that a storm from one ``ip`` process costs one /proc read, not
# one per event; forgotten when this many accumulate (every ip/nft run has a new one).
_FOREIGN_MAX = 1024
# Ports compared by the nfnetlink echo filter: a process holds a dozen netlink sockets; the
# BPF jump offsets are 8 bits, and the rest are muted in Python anyway.
_MUTED_PORTS_MAX = 64

# The kernel doubles the value and charges each notification's skb truesize against it.
# sdnsup's own load of 100k CIDRs sends ~13 MiB of set-element notifications in one burst
# (nf_tables packs them into page-sized skbs): 8 MiB overflowed, and every overflow costs a
# full re-read of the kernel. 32 MiB holds it; it is kernel memory, used only while unread.
RCVBUF = 32 << 20
# Notifications are built in skbs of at most NLMSG_GOODSIZE (a page or 8 KiB); 64 KiB is
# ample, and MSG_TRUNC tells us if it ever is not.
_RECV_BYTES = 64 << 10
# Datagrams read per scheduling turn: during a storm the coalescer and the rest of the
# daemon still run.
_READ_BATCH = 64

# --- include/uapi/linux/rtnetlink.h, netlink.h, if.h, if_addr.h, if_link.h --------------
RTNLGRP_LINK = 1
RTNLGRP_IPV4_IFADDR = 5
RTNLGRP_IPV4_ROUTE = 7
RTNLGRP_IPV4_RULE = 8
RTNLGRP_IPV6_IFADDR = 9
RTNLGRP_IPV6_ROUTE = 11
RTNLGRP_IPV6_RULE = 19
RTNLGRP_NEXTHOP = 32
RTNL_GROUPS = (
    RTNLGRP_LINK,
    RTNLGRP_IPV4_IFADDR,
    RTNLGRP_IPV6_IFADDR,
    RTNLGRP_IPV4_ROUTE,
    RTNLGRP_IPV6_ROUTE,
    RTNLGRP_IPV4_RULE,
    RTNLGRP_IPV6_RULE,
    RTNLGRP_NEXTHOP,
)
NFNLGRP_NFTABLES = 7
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_NEWADDR = 20
RTM_DELADDR = 21
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000  # carrier
IFLA_OPERSTATE = 16
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_LABEL = 3
_IFADDRMSG = struct.Struct("=BBBBI")  # family prefixlen flags scope, index
_OPERSTATES = ("unknown", "notpresent", "down", "lowerlayerdown", "testing", "dormant", "up")

# --- include/uapi/linux/netfilter/nf_tables.h, nfnetlink.h -------------------------------
# Message -> (Event.kind, deleted). NFT_MSG_DESTROY* (kernel >= 6.3, "delete if it exists")
# count as deletions too.
_NFT_MESSAGES = {
    0: ("nft-table", False),
    2: ("nft-table", True),
    26: ("nft-table", True),
    3: ("nft-chain", False),
    5: ("nft-chain", True),
    27: ("nft-chain", True),
    6: ("nft-rule", False),
    8: ("nft-rule", True),
    28: ("nft-rule", True),
    9: ("nft-set", False),
    11: ("nft-set", True),
    29: ("nft-set", True),
    12: ("nft-setelem", False),
    14: ("nft-setelem", True),
    30: ("nft-setelem", True),
}
NFT_MSG_NEWGEN = 15
# Attribute 1 is the table name in every message above; the object's own name is:
_NFT_NAME_ATTR = {"nft-chain": 3, "nft-rule": 2, "nft-set": 2, "nft-setelem": 2}
NFTA_GEN_ID = 1
NFTA_GEN_PROC_PID = 2
NFTA_GEN_PROC_NAME = 3
_NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big endian; unused)
_BE32 = struct.Struct(">I")

# --- classic BPF (include/uapi/linux/filter.h, asm-generic/socket.h) ----------------------
BPF_LD_H_ABS = 0x00 | 0x08 | 0x20
BPF_LD_B_ABS = 0x00 | 0x10 | 0x20
BPF_JEQ_K = 0x05 | 0x10
BPF_JSET_K = 0x05 | 0x40
BPF_RET_K = 0x06
BPF_LD_W_ABS = 0x00 | 0x00 | 0x20
_ACCEPT = 0xFFFFFFFF  # "keep the whole packet"

# Event kinds the applier's own writes can cause; only these are ever muted as echoes.
_ECHO_KINDS = frozenset(
    {"route", "rule", "nexthop", "nft-table", "nft-chain", "nft-rule", "nft-set", "nft-setelem"}
)


@dataclass(frozen=True, slots=True)
class Event:
    """One kernel notification, reduced to what :func:`relevant` needs.

    ``kind`` is ``link``, ``addr``, ``route``, ``rule``, ``nexthop``, ``nft-table``,
    ``nft-chain``, ``nft-rule``, ``nft-set``, ``nft-setelem``, ``nft-gen`` (end of an nftables
    transaction) or ``overflow`` (events were lost). ``detail`` is one line for debug logs.
    Fields that do not apply to a kind stay at their defaults.
    """

    kind: str
    detail: str = ""
    deleted: bool = False  # DEL* message (DELLINK, DELROUTE, NFT_MSG_DELTABLE...)
    family: int = 0  # AF_* for rtnetlink; nfgen_family for nftables (1 = inet)
    ifindex: int = 0  # link, addr; route: RTA_OIF; nexthop: NHA_OIF
    ifname: str = ""  # link: IFLA_IFNAME; addr: IFA_LABEL (IPv4 only)
    flags: int = 0  # link: ifi_flags (IFF_UP, IFF_RUNNING, IFF_LOWER_UP)
    change: int = 0  # link: ifi_change, the flags that changed (0: "some state changed")
    operstate: str = ""  # link: IFLA_OPERSTATE ("up", "down", "lowerlayerdown"...)
    prefix: str = ""  # route: destination; addr: address/prefixlen
    table: int = 0  # route, rule
    proto: int = 0  # route: rtm_protocol; rule: FRA_PROTOCOL; nexthop: nh_protocol
    priority: int = 0  # rule
    nhid: int = 0  # route: RTA_NH_ID; nexthop: NHA_ID
    replace: bool = False  # a NEW message carrying NLM_F_REPLACE (it replaced an object)
    nft_table: str = ""  # nft-*: the table's name
    name: str = ""  # nft-chain/nft-set: its name; nft-rule: its chain; nft-setelem: its set
    port: int = 0  # nlmsg_pid: port id of the socket that caused it, 0 for the kernel


@dataclass(frozen=True, slots=True)
class Watch:
    """What sdnsup owns, and the interfaces its nexthops go through.

    ``ifindexes`` None means every interface: use it while no AP interface is known (no AP
    reachable), so that any link coming up or address appearing causes a re-check.
    """

    table: int = DEFAULT_TABLE
    priority: int = DEFAULT_PRIORITY
    proto: int = RTPROT_SDNSUP
    nexthop_ids: frozenset[int] = frozenset({NHID_V4, NHID_V6})
    nft_table: str = NFT_TABLE
    ifindexes: frozenset[int] | None = None
    slots: int = 0  # AP slots: tables table+1.., nexthop ids, rules below priority

    @classmethod
    def for_settings(cls, settings: Settings, ifindexes: Iterable[int] | None = None) -> Watch:
        """The watch for sdnsup's ``settings``, its APs reached through ``ifindexes``."""
        return cls(
            table=settings.table,
            priority=settings.priority,
            nexthop_ids=settings.nhids(),
            nft_table=settings.nft_table,
            ifindexes=None if ifindexes is None else frozenset(ifindexes),
            slots=settings.slots,
        )

    def watches(self, ifindex: int) -> bool:
        return self.ifindexes is None or ifindex in self.ifindexes

    def owns_table(self, table: int) -> bool:
        """The CIDR routes' table, an AP slot's or the path probes' (the one after them)."""
        return self.table <= table <= self.table + self.slots + (1 if self.slots else 0)

    def owns_priority(self, priority: int) -> bool:
        """The CIDR routes' rule or a draining slot's (just below it)."""
        low = self.priority - (PRIORITY_SPAN if self.slots else 0)
        return low <= priority <= self.priority


def relevant(event: Event, watch: Watch) -> str | None:
    """Whether ``event`` calls for a re-check of sdnsup's kernel state, and why.

    Pure: the same event and watch always give the same answer.

    Relevant: any change of state of a watched link (the kernel flushes nexthops and routes
    through a downed link without a delete event per object, and re-adds nothing on up);
    address changes on a watched link; deletion of our routes (protocol and table), policy
    rule (protocol and priority), nexthops (id) or anything in our nftables table (and the
    table itself); another owner replacing our route or nexthop in place; lost events.
    Not relevant: additions, which are our own writes (our protocol) or someone else's
    objects, which sdnsup never touches; anything outside our table, ids and interfaces.

    Returns:
        A short cause for operators ("route 10.10.10.0/24 deleted from table 7300"), or None.
    """
    kind = event.kind
    if kind == "overflow":
        return OVERFLOW_CAUSE
    if kind == "link":
        if not watch.watches(event.ifindex):
            return None
        name = event.ifname or f"#{event.ifindex}"
        if event.deleted:
            return f"link {name} removed"
        if not event.flags & IFF_UP:
            return f"link {name} down"
        if not event.flags & IFF_LOWER_UP:
            return f"link {name} up without carrier"
        return f"link {name} up"
    if kind == "addr":
        if not watch.watches(event.ifindex):
            return None
        where = event.ifname or f"interface #{event.ifindex}"
        return f"address {event.prefix} {'deleted from' if event.deleted else 'added on'} {where}"
    if kind == "route":
        if not watch.owns_table(event.table):
            return None
        if event.deleted:
            if event.proto != watch.proto:
                return None
            return f"route {event.prefix} deleted from table {event.table}"
        if event.replace and event.proto != watch.proto:
            return f"route {event.prefix} in table {event.table} replaced by protocol {event.proto}"
        return None
    if kind == "rule":
        if event.deleted and event.proto == watch.proto and watch.owns_priority(event.priority):
            return f"policy rule {event.priority} deleted"
        return None
    if kind == "nexthop":
        if event.nhid not in watch.nexthop_ids:
            return None
        if event.deleted:
            return f"nexthop {event.nhid:#x} deleted"
        if event.proto != watch.proto:
            return f"nexthop {event.nhid:#x} replaced by protocol {event.proto}"
        return None
    if kind.startswith("nft-"):
        if not event.deleted or event.family != NFPROTO_INET or event.nft_table != watch.nft_table:
            return None
        table = f"inet {event.nft_table}"
        if kind == "nft-table":
            return f"nftables table {table} deleted"
        if kind == "nft-chain":
            return f"nftables chain {table} {event.name} deleted"
        if kind == "nft-rule":
            return f"nftables rule deleted from chain {table} {event.name}"
        if kind == "nft-set":
            return f"nftables set {table} {event.name} deleted"
        if kind == "nft-setelem":
            return f"nftables element deleted from set {table} {event.name}"
    return None


def _rank(event: Event) -> int:
    """How telling a cause is: the kernel reports a table's rules, sets and chains deleted
    before the table itself, and "table deleted" is what the operator needs to read."""
    return 2 if event.kind == "nft-table" else 1


# --- parsing ------------------------------------------------------------------------------


def _text(payload: bytes | None) -> str:
    return "" if payload is None else payload.split(b"\0", 1)[0].decode(errors="replace")


def _prefix(family: int, raw: bytes | None, length: int) -> str:
    """``raw``/``length`` as a prefix; no RTA_DST means the default route (all zero)."""
    try:
        if family == socket.AF_INET:
            return str(ipaddress.IPv4Network((raw or bytes(4), length), strict=False))
        if family == socket.AF_INET6:
            return str(ipaddress.IPv6Network((raw or bytes(16), length), strict=False))
    except ValueError:
        pass  # a malformed attribute; the kernel never sends one
    return f"family {family} prefix /{length}"


def _link(mtype: int, port: int, data: bytes, start: int, end: int) -> Event:
    family, _type, index, flags, change = IFINFOMSG.unpack_from(data, start)
    a = attrs(data, start + IFINFOMSG.size, end)
    oper = a.get(IFLA_OPERSTATE)
    operstate = _OPERSTATES[oper[0]] if oper and oper[0] < len(_OPERSTATES) else ""
    name = _text(a.get(IFLA_IFNAME))
    deleted = mtype == RTM_DELLINK
    return Event(
        "link",
        f"{'del' if deleted else 'new'} link {name or index} flags {flags:#x} "
        f"change {change:#x} operstate {operstate or '?'}",
        deleted=deleted,
        family=family,
        ifindex=index,
        ifname=name,
        flags=flags,
        change=change,
        operstate=operstate,
        port=port,
    )


def _addr(mtype: int, port: int, data: bytes, start: int, end: int) -> Event:
    family, prefixlen, _flags, _scope, index = _IFADDRMSG.unpack_from(data, start)
    a = attrs(data, start + _IFADDRMSG.size, end)
    # IFA_LOCAL is the local address on point-to-point links, where IFA_ADDRESS is the peer.
    raw = a.get(IFA_LOCAL) or a.get(IFA_ADDRESS) or b""
    try:
        prefix = f"{ipaddress.ip_address(raw)}/{prefixlen}"
    except ValueError:
        prefix = f"?/{prefixlen}"
    deleted = mtype == RTM_DELADDR
    label = _text(a.get(IFA_LABEL))
    return Event(
        "addr",
        f"{'del' if deleted else 'new'} address {prefix} on {label or index}",
        deleted=deleted,
        family=family,
        ifindex=index,
        ifname=label,
        prefix=prefix,
        port=port,
    )


def _route(mtype: int, port: int, flags: int, data: bytes, start: int, end: int) -> Event:
    family, dst_len, _s, _t, table, proto, _scope, _type, _f = RTMSG.unpack_from(data, start)
    a = attrs(data, start + RTMSG.size, end)
    table = u32(a.get(RTA_TABLE), table)  # rtm_table only holds tables < 256
    prefix = _prefix(family, a.get(RTA_DST), dst_len)
    nhid = u32(a.get(RTA_NH_ID))
    deleted = mtype == RTM_DELROUTE
    replace = not deleted and bool(flags & NLM_F_REPLACE)
    return Event(
        "route",
        f"{'del' if deleted else 'replace' if replace else 'new'} route {prefix} "
        f"table {table} proto {proto} nhid {nhid:#x}",
        deleted=deleted,
        family=family,
        ifindex=u32(a.get(RTA_OIF)),
        prefix=prefix,
        table=table,
        proto=proto,
        nhid=nhid,
        replace=replace,
        port=port,
    )


def _rule(mtype: int, port: int, data: bytes, start: int, end: int) -> Event:
    family, _d, _s, _t, table, _r1, _r2, _action, _f = FIB_RULE_HDR.unpack_from(data, start)
    a = attrs(data, start + FIB_RULE_HDR.size, end)
    proto = a.get(FRA_PROTOCOL)
    priority = u32(a.get(FRA_PRIORITY))
    table = u32(a.get(FRA_TABLE), table)
    deleted = mtype == RTM_DELRULE
    return Event(
        "rule",
        f"{'del' if deleted else 'new'} rule priority {priority} table {table} "
        f"proto {proto[0] if proto else 0}",
        deleted=deleted,
        family=family,
        table=table,
        proto=proto[0] if proto else 0,
        priority=priority,
        port=port,
    )


def _nexthop(mtype: int, port: int, flags: int, data: bytes, start: int, end: int) -> Event:
    family, _scope, proto, _resvd, _nhflags = NHMSG.unpack_from(data, start)
    a = attrs(data, start + NHMSG.size, end)
    nhid = u32(a.get(NHA_ID))
    deleted = mtype == RTM_DELNEXTHOP
    replace = not deleted and bool(flags & NLM_F_REPLACE)
    return Event(
        "nexthop",
        f"{'del' if deleted else 'replace' if replace else 'new'} nexthop {nhid:#x} proto {proto}",
        deleted=deleted,
        family=family,
        ifindex=u32(a.get(NHA_OIF)),
        proto=proto,
        nhid=nhid,
        replace=replace,
        port=port,
    )


def parse_rtnl(data: bytes, size: int | None = None) -> list[Event]:
    """The link, address, route, rule and nexthop events of one rtnetlink datagram.

    Args:
        data: the datagram (or a receive buffer holding it).
        size: its length, if ``data`` is a longer buffer.

    Returns:
        One :class:`Event` per message of a known type; others (and malformed messages,
        which the kernel does not send) are skipped.
    """
    out = []
    for mtype, flags, _seq, port, start, end in messages(data, len(data) if size is None else size):
        try:
            if mtype in (RTM_NEWLINK, RTM_DELLINK):
                out.append(_link(mtype, port, data, start, end))
            elif mtype in (RTM_NEWADDR, RTM_DELADDR):
                out.append(_addr(mtype, port, data, start, end))
            elif mtype in (RTM_NEWROUTE, RTM_DELROUTE):
                out.append(_route(mtype, port, flags, data, start, end))
            elif mtype in (RTM_NEWRULE, RTM_DELRULE):
                out.append(_rule(mtype, port, data, start, end))
            elif mtype in (RTM_NEWNEXTHOP, RTM_DELNEXTHOP):
                out.append(_nexthop(mtype, port, flags, data, start, end))
        except struct.error:
            log.debug("skipping a truncated rtnetlink message of type %d", mtype)
    return out


def parse_nfnl(data: bytes, size: int | None = None) -> list[Event]:
    """The nftables table/chain/rule/set/element and generation events of one datagram.

    Args:
        data: the datagram (or a receive buffer holding it).
        size: its length, if ``data`` is a longer buffer.

    Returns:
        One :class:`Event` per nftables message of a known type, in order; a transaction's
        objects come first and its ``nft-gen`` (NFT_MSG_NEWGEN) last.
    """
    out = []
    for mtype, _flags, _seq, port, start, end in messages(
        data, len(data) if size is None else size
    ):
        if mtype >> 8 != NFNL_SUBSYS_NFTABLES or end - start < _NFGENMSG.size:
            continue
        msg = mtype & 0xFF
        family = data[start]
        a = attrs(data, start + _NFGENMSG.size, end)
        if msg == NFT_MSG_NEWGEN:
            gen = a.get(NFTA_GEN_ID)
            pid = a.get(NFTA_GEN_PROC_PID)
            out.append(
                Event(
                    "nft-gen",
                    f"nftables generation {_BE32.unpack(gen)[0] if gen else '?'} committed by "
                    f"{_text(a.get(NFTA_GEN_PROC_NAME))}[{_BE32.unpack(pid)[0] if pid else '?'}]",
                    port=port,
                )
            )
            continue
        known = _NFT_MESSAGES.get(msg)
        if known is None:
            continue  # objects, flowtables...: sdnsup creates none
        kind, deleted = known
        table = _text(a.get(1))
        name = _text(a.get(_NFT_NAME_ATTR[kind])) if kind in _NFT_NAME_ATTR else ""
        out.append(
            Event(
                kind,
                f"{'del' if deleted else 'new'} {kind} {family}/{table} {name}".rstrip(),
                deleted=deleted,
                family=family,
                nft_table=table,
                name=name,
                port=port,
            )
        )
    return out


# --- the kernel-side echo filter ----------------------------------------------------------


def _wire16(value: int) -> int:
    """A host-endian u16 field as a BPF half-word load sees it (always big endian)."""
    return int.from_bytes(struct.pack("=H", value), "big")


def rtnl_filter(proto: int) -> list[tuple[int, int, int, int]]:
    """Classic BPF for the rtnetlink socket: drop route/nexthop messages we never act on.

    Dropped in the kernel, before they take receive-buffer space or wake us: our own added
    routes and nexthops (protocol ``proto``; a 100k-route apply would otherwise queue 100k
    echoes and overflow the buffer), route additions that replace nothing (main-table
    churn of a routing daemon) and deletions of routes that are not ours. This is only a
    pre-filter, looser than :func:`relevant`, which still sees every message kept.

    Offsets: nlmsghdr (type at 4, flags at 6), then struct rtmsg (rtm_protocol at 16 + 5) or
    struct nhmsg (nh_protocol at 16 + 2). rtnetlink sends one notification per skb, so the
    first message is the only one.

    Returns:
        The program as (code, jt, jf, k) instructions.
    """
    # (label, code, k, jump-if-true label, jump-if-false label)
    source: list[tuple[str, int, int, str, str]] = [
        ("", BPF_LD_H_ABS, 4, "", ""),
        ("", BPF_JEQ_K, _wire16(RTM_NEWROUTE), "new_route", ""),
        ("", BPF_JEQ_K, _wire16(RTM_DELROUTE), "del_route", ""),
        ("", BPF_JEQ_K, _wire16(RTM_NEWNEXTHOP), "new_nexthop", ""),
        ("", BPF_RET_K, _ACCEPT, "", ""),
        # RTM_NEWROUTE: keep a foreign protocol's replace (it may have replaced our route).
        ("new_route", BPF_LD_B_ABS, 16 + 5, "", ""),
        ("", BPF_JEQ_K, proto, "drop", ""),
        ("", BPF_LD_H_ABS, 6, "", ""),
        ("", BPF_JSET_K, _wire16(NLM_F_REPLACE), "accept", "drop"),
        # RTM_DELROUTE: keep ours.
        ("del_route", BPF_LD_B_ABS, 16 + 5, "", ""),
        ("", BPF_JEQ_K, proto, "accept", "drop"),
        # RTM_NEWNEXTHOP: keep a foreign protocol's (it may have replaced our id).
        ("new_nexthop", BPF_LD_B_ABS, 16 + 2, "", ""),
        ("", BPF_JEQ_K, proto, "drop", "accept"),
        ("drop", BPF_RET_K, 0, "", ""),
        ("accept", BPF_RET_K, _ACCEPT, "", ""),
    ]
    where = {label: i for i, (label, *_rest) in enumerate(source) if label}
    # Jumps count instructions after the next one; an empty label falls through.
    return [
        (code, where[jt] - i - 1 if jt else 0, where[jf] - i - 1 if jf else 0, k)
        for i, (_label, code, k, jt, jf) in enumerate(source)
    ]


def nfnl_filter(ports: Collection[int]) -> list[tuple[int, int, int, int]]:
    """Classic BPF for the nfnetlink socket: drop the echoes of our own nftables writes.

    A first apply of 100k CIDRs makes the kernel multicast every set element it added, about
    13 MiB; read and parsed in the event loop, they held the GIL against the apply's own
    worker thread and tripled its time. nftables sends a transaction's notifications in skbs
    of their own, each message carrying the port id (``nlmsg_pid``, host-endian at offset 12)
    of the socket that made the change, so the first message's port says whose the whole
    datagram is. ``ports``: this process's netlink sockets (:func:`own_netlink_ports`); the
    monitor mutes the echoes that still come (a socket opened since) by port in Python.
    """
    program: list[tuple[int, int, int, int]] = [(BPF_LD_W_ABS, 0, 0, 12)]
    wanted = sorted({p for p in ports if p})[:_MUTED_PORTS_MAX]
    for i, port in enumerate(wanted):
        # A match jumps over the remaining comparisons and the accept, to the drop.
        program.append((BPF_JEQ_K, len(wanted) - i, 0, _wire32(port)))
    program += [(BPF_RET_K, 0, 0, _ACCEPT), (BPF_RET_K, 0, 0, 0)]
    return program


def _wire32(value: int) -> int:
    """A host-endian u32 field as a BPF word load sees it (always big endian)."""
    return int.from_bytes(struct.pack("=I", value), "big")


# --- our own sockets ----------------------------------------------------------------------


def own_netlink_ports(fds: str = PROC_FDS, netlink: str = PROC_NETLINK) -> frozenset[int]:
    """The port ids of this process's netlink sockets in the current network namespace.

    Every one counts, whoever opened it: sdnsup's rtnetlink and nfnetlink sockets, the one
    libnftables opens inside its Python binding, the monitor's own. ``fds`` is read for the
    socket inodes the process holds (``socket:[INODE]`` links), ``netlink`` (columns ``sk
    Eth Pid Groups Rmem Wmem Dump Locks Drops Inode``, ``Pid`` being the port id) for their
    ports. Sockets of other namespaces are not in that table (their ports mean nothing
    here), and unbound sockets (port 0) are left out: 0 is the kernel's port. One set for
    all protocols: a port id is unique only within its protocol, but an autobound one is the
    process's pid or comes from the kernel's count-down below -4096, so another process's
    socket shares one with ours only if it binds that id explicitly.

    Args:
        fds: the descriptor directory (tests pass their own).
        netlink: the netlink socket table (tests pass their own).

    Raises:
        OSError: ``fds`` or ``netlink`` cannot be read.
    """
    inodes = set()
    for name in os.listdir(fds):
        try:
            target = os.readlink(os.path.join(fds, name))
        except OSError:
            continue  # closed meanwhile (or the directory's own descriptor)
        if target.startswith("socket:[") and target.endswith("]"):
            inodes.add(target[8:-1])
    ports = set()
    with open(netlink, encoding="ascii", errors="replace") as table:
        next(table, None)  # the header
        for line in table:
            cols = line.split()
            if len(cols) >= 10 and cols[9] in inodes and cols[2].isdigit() and cols[2] != "0":
                ports.add(int(cols[2]))
    return frozenset(ports)


# --- event sources ------------------------------------------------------------------------

Offer = Callable[[Event], None]
"""``offer(event)``: hand one event to the monitor."""


class EventSource(Protocol):
    """Something that produces events: a netlink socket, or a fake in tests."""

    async def pump(self, offer: Offer) -> None:
        """Read events forever, calling ``offer`` for each.

        Raises:
            KernelError: reading failed.
        """
        ...

    def close(self) -> None:
        """Release the source; idempotent."""
        ...

    def mute(self, ports: frozenset[int]) -> None:
        """Drop, before they are read where possible, the events these sockets caused (our
        own writes); a hint: the monitor still mutes by port whatever arrives."""
        ...

    def pause(self) -> None:
        """Stop receiving events that :meth:`resume` can do without (a source that cannot
        tell keeps receiving everything)."""
        ...

    def resume(self) -> None:
        """Receive again what :meth:`pause` stopped."""
        ...


class NetlinkSource:
    """A non-blocking netlink socket subscribed to its groups, and its parser.

    Not :func:`trio.socket.from_stdlib_socket`: its ``recv`` is a scheduling point per
    datagram. This reads a batch of datagrams with the plain non-blocking socket per wake-up
    and waits with :func:`trio.lowlevel.wait_readable`, what ``trio.socket`` does inside.
    """

    def __init__(
        self,
        sock: socket.socket,
        parse: Callable[[bytes, int], list[Event]],
        name: str,
        error: type[KernelError],
        muter: Callable[[frozenset[int]], list[tuple[int, int, int, int]]] | None = None,
    ) -> None:
        self.sock = sock
        self.parse = parse
        self.name = name
        self.error = error
        self._muter = muter
        self._muted: frozenset[int] | None = None
        self.pausable: tuple[int, ...] = ()  # groups pause() leaves, resume() joins again

    def pause(self) -> None:
        for group in self.pausable:
            with contextlib.suppress(OSError):  # not a member: nothing to leave
                leave(self.sock, group)

    def resume(self) -> None:
        if self.sock.fileno() < 0:
            return  # closed meanwhile (the monitor restarted): its successor subscribed anew
        for group in self.pausable:
            try:
                join(self.sock, group)
            except OSError as exc:
                # Not an apply failure: the periodic re-read still catches what is missed.
                log.error(
                    "cannot watch %s events again: %s; relying on the periodic re-read",
                    self.name,
                    exc,
                )

    def mute(self, ports: frozenset[int]) -> None:
        """Replace the socket's filter with ``muter(ports)`` (a source without one keeps
        its filter). Best effort: a filter the kernel refuses leaves the echoes to Python."""
        if self._muter is None or ports == self._muted:
            return
        try:
            attach_filter(self.sock, self._muter(ports))
        except OSError as exc:
            log.warning("cannot filter our own %s echoes in the kernel: %s", self.name, exc)
            return
        self._muted = ports

    @classmethod
    def open(
        cls,
        protocol: int,
        groups: Iterable[int],
        parse: Callable[[bytes, int], list[Event]],
        name: str,
        error: type[KernelError],
        program: Sequence[tuple[int, int, int, int]] = (),
        muter: Callable[[frozenset[int]], list[tuple[int, int, int, int]]] | None = None,
    ) -> NetlinkSource:
        """Open a netlink socket of ``protocol`` in the caller's namespace and subscribe it.

        The filter goes on before the subscriptions, so no unfiltered message is queued.

        Raises:
            KernelError: (``error``) the socket cannot be opened, filtered or subscribed;
                nothing is left open.
        """
        try:
            sock = subscribe(protocol, groups, RCVBUF, program)
        except OSError as exc:
            hint = " (subscribing needs CAP_NET_ADMIN)" if exc.errno == errno.EPERM else ""
            raise error(f"cannot subscribe to {name} events{hint}: {exc}") from exc
        return cls(sock, parse, name, error, muter)

    async def pump(self, offer: Offer) -> None:
        """Read datagrams until cancelled; parse them and offer every event.

        ENOBUFS (the queue overflowed, events were lost) and a truncated datagram become an
        ``overflow`` event; reading goes on.

        Raises:
            KernelError: (``self.error``) any other socket error.
        """
        sock = self.sock
        buf = bytearray(_RECV_BYTES)
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(_READ_BATCH):
                try:
                    size = sock.recv_into(buf, len(buf), socket.MSG_TRUNC)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise self.error(f"reading {self.name} events failed: {exc}") from exc
                    log.warning("%s events were lost: the receive queue overflowed", self.name)
                    offer(Event("overflow", f"{self.name}: ENOBUFS"))
                    continue
                if size > len(buf):
                    log.warning("%s event of %d bytes truncated", self.name, size)
                    offer(Event("overflow", f"{self.name}: truncated"))
                    size = len(buf)
                for event in self.parse(bytes(buf[:size]), size):
                    offer(event)

    def close(self) -> None:
        self.sock.close()


def open_kernel_sources(watch: Watch) -> list[EventSource]:
    """The rtnetlink and nfnetlink sources of the caller's network namespace, subscribed.

    Raises:
        RoutesError: the rtnetlink socket cannot be opened.
        NftError: the nfnetlink socket cannot be opened (nothing is left open).
    """
    rtnl = NetlinkSource.open(
        socket.NETLINK_ROUTE, RTNL_GROUPS, parse_rtnl, "rtnetlink", RoutesError,
        rtnl_filter(watch.proto),
    )  # fmt: skip
    try:
        nfnl = NetlinkSource.open(
            NETLINK_NETFILTER, (NFNLGRP_NFTABLES,), parse_nfnl, "nftables", NftError,
            muter=nfnl_filter,
        )  # fmt: skip
        nfnl.pausable = (NFNLGRP_NFTABLES,)
    except BaseException:
        rtnl.close()
        raise
    return [rtnl, nfnl]


# --- the monitor --------------------------------------------------------------------------


class Monitor:
    """Watches the kernel and calls ``trigger(cause)`` when sdnsup's state needs a re-check.

    ``watch`` may be replaced at any time (``monitor.watch = new``), e.g. when the AP
    interface changes; the next event is judged by the new value. The kernel-side echo
    filter keeps the protocol of the watch that :meth:`run` started with.

    Echoes: a relevant route, rule, nexthop or nftables event whose port id (``nlmsg_pid``)
    is one of this process's netlink sockets is sdnsup's own write, and is muted. The ports
    are read when :meth:`run` starts and again whenever an event brings a non-zero port not
    known yet (a socket opened since); a port found foreign is remembered, so a storm from
    one ``ip`` process costs one read. Port 0 (the kernel's own changes) never is ours, and
    link, address and lost events are never muted, whatever their port. Both ways of being
    wrong are harmless: a socket of ours closed before its echo is read (sdnsup keeps its
    sockets open) makes that echo trigger one needless re-check; if the ports cannot be read
    at all, nothing is muted and every echo costs one re-check, which writes nothing.

    Counters for tests and diagnostics: ``events`` (parsed), ``muted`` (relevant but echoes
    of our own writes), ``triggers`` (calls of ``trigger``).
    """

    def __init__(
        self,
        watch: Watch | None = None,
        *,
        sources: Callable[[Watch], Sequence[EventSource]] = open_kernel_sources,
        own_ports: Callable[[], frozenset[int]] = own_netlink_ports,
    ) -> None:
        """Create a monitor; nothing is opened before :meth:`run`.

        Args:
            watch: what to watch; default ``Watch()`` (sdnsup's defaults, every interface).
            sources: opens the event sources when :meth:`run` starts (tests pass fakes).
            own_ports: the port ids of this process's netlink sockets, called from the trio
                thread (tests pass fakes); it may raise :class:`OSError`.
        """
        self.watch = watch if watch is not None else Watch()
        self._sources = sources
        self._own_ports = own_ports
        self._ours: frozenset[int] = frozenset()
        self._foreign: set[int] = set()
        self._open: Sequence[EventSource] = ()  # the sources run() opened
        self._wake: trio.MemorySendChannel[None] | None = None
        self._cause: str | None = None
        self._rank = 0
        self._count = 0
        self._last = -math.inf  # trio time of the burst's latest event
        self.events = 0
        self.muted = 0
        self.triggers = 0

    @contextlib.contextmanager
    def unwatched_nftables(self) -> Iterator[None]:
        """Leave the nftables event group for the duration (sdnsup writing many set elements:
        each listener costs the kernel a notification per element). Whoever uses this must
        find out by itself whether another process changed nftables meanwhile (the ruleset
        generation: :meth:`sdnsup.applier.Applier.nft_changed_since`)."""
        paused = list(self._open)
        for source in paused:
            source.pause()
        try:
            yield
        finally:
            for source in paused:
                source.resume()

    def _read_ports(self) -> bool:
        try:
            self._ours = self._own_ports()
        except OSError as exc:
            log.warning("cannot list our netlink sockets, echoes are not muted: %s", exc)
            return False
        for source in self._open:
            source.mute(self._ours)
        return True

    def _is_ours(self, port: int) -> bool:
        """Whether ``port`` is one of our sockets' (re-reading the ports for a new one)."""
        if port == 0 or port in self._foreign:
            return False
        if port in self._ours:
            return True
        if not self._read_ports():
            return False  # not remembered: the next event with this port reads again
        if port in self._ours:
            return True
        if len(self._foreign) >= _FOREIGN_MAX:
            self._foreign.clear()
        self._foreign.add(port)
        return False

    def _offer(self, event: Event) -> None:
        """One event from a source: filter, mute, add to the current burst, wake the consumer."""
        self.events += 1
        cause = relevant(event, self.watch)
        if cause is None:
            return
        if event.kind in _ECHO_KINDS and self._is_ours(event.port):
            self.muted += 1
            log.debug("muted (own write): %s [port %d]", event.detail, event.port)
            return
        log.debug("heal cause: %s [%s, port %d]", cause, event.detail, event.port)
        rank = _rank(event)
        if self._cause is None or rank > self._rank:
            self._cause, self._rank = cause, rank
        self._count += 1
        self._last = trio.current_time()
        if self._wake is not None:
            try:
                self._wake.send_nowait(None)
            except trio.WouldBlock:
                pass  # a wake-up is pending already: this event joins that burst

    async def _coalesce(
        self, wakeups: trio.MemoryReceiveChannel[None], trigger: Callable[[str], None]
    ) -> None:
        """One trigger per burst: once no event came for COALESCE, or SETTLE_MAX after the
        burst's first event, whichever is sooner."""
        async for _ in wakeups:
            give_up = trio.current_time() + SETTLE_MAX
            while True:
                # Each later event of the burst sends a new wake-up and moves the deadline.
                with trio.move_on_at(min(self._last + COALESCE, give_up)) as quiet:
                    await wakeups.receive()
                if quiet.cancelled_caught:
                    break
            # A wake-up sent as the deadline passed belongs to this burst too. Nothing can
            # arrive between this and taking the burst (no await).
            with contextlib.suppress(trio.WouldBlock):
                wakeups.receive_nowait()
            cause, count = self._cause, self._count
            self._cause, self._rank, self._count = None, 0, 0
            if cause is None:
                continue
            self.triggers += 1
            trigger(cause if count == 1 else f"{cause} (+{count - 1} more events)")

    async def run(
        self,
        trigger: Callable[[str], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Open the sources and watch until cancelled; start with ``nursery.start``.

        ``task_status.started()`` is called once every source is subscribed: changes made
        before that are not reported, so the daemon re-checks after (re)starting the monitor.

        Args:
            trigger: called in the trio thread with the cause of each burst of relevant
                events, COALESCE after its last event (at most SETTLE_MAX after its first),
                e.g. ``"link eth1 up (+3 more events)"``; it must not block (hand the
                cause to the applier with ``send_nowait``). The cause is the first event's,
                except that a deleted nftables table outranks the deletions of its contents,
                which the kernel reports first.
            task_status: see :meth:`trio.Nursery.start`.

        Raises:
            RoutesError, NftError: a socket could not be opened or read; the sockets are
                closed. Whatever ``trigger`` raises propagates too.
        """
        sources = self._sources(self.watch)
        self._open = sources
        try:
            self._foreign.clear()
            self._read_ports()
            wake, wakeups = trio.open_memory_channel[None](1)
            self._cause, self._rank, self._count = None, 0, 0
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._coalesce, wakeups, trigger)
                    for source in sources:
                        nursery.start_soon(source.pump, self._offer)
                    self._wake = wake
                    task_status.started()
            except BaseExceptionGroup as group:
                # The nursery is an implementation detail: a lone error (a socket failure)
                # is raised as itself. Cancelled and multiple errors stay as they are.
                lone = group.exceptions[0] if len(group.exceptions) == 1 else None
                if isinstance(lone, Exception):
                    raise lone from lone.__cause__
                raise
        finally:
            self._wake = None
            self._open = ()
            for source in sources:
                source.close()
