"""Connections pinned to an AP slot: find them in conntrack, re-pin them, end their sockets.

Three operations, all in O(connections of one slot), never of the whole table:

* :meth:`Conntrack.pinned`: the entries whose mark carries one slot's value. The dump asks
  the kernel to filter by mark (``CTA_MARK`` + ``CTA_MARK_MASK`` in the dump request, which
  ``conntrack -L -m VALUE/MASK`` also uses), so a host with a million unrelated entries
  costs the kernel one walk and this process only the slot's own entries;
* :meth:`Conntrack.repin`: change the slot bits of those entries' marks (an update,
  ``IPCTNL_MSG_CT_NEW`` without ``NLM_F_CREATE``, carrying ``CTA_MARK_MASK``: the kernel
  sets ``mark = mark & ~MASK ^ VALUE``, so other tools' bits of the mark stay as they are);
* :meth:`Conntrack.unanswered`: the same, narrowed by the kernel to the entries that never
  saw a reply (``CTA_STATUS`` 0 under ``CTA_STATUS_MASK`` IPS_SEEN_REPLY, Linux >= 5.19):
  the connection attempts through an AP that got nowhere, what gray-failure detection
  counts (:mod:`sdnsup.paths`), at the cost of the few such entries only;
* :meth:`Conntrack.abort_sockets`: destroy this host's TCP sockets of those connections,
  ``SOCK_DESTROY`` on NETLINK_SOCK_DIAG with the connection's four-tuple (what ``ss -K``
  does; needs CONFIG_INET_DIAG_DESTROY, present on Debian kernels). The application's
  blocked ``recv()`` returns ECONNABORTED at once, and the kernel sends the peer a RST.

The original tuple of a conntrack entry is the connection as its first packet saw it: for
a socket of this host, its own addresses and ports (sdnsup's masquerade rewrites only the
reply tuple). An entry of a forwarded connection (a container's) matches no local socket:
its destroy fails with ENOENT and is simply not counted.

Kernel references: include/uapi/linux/netfilter/nfnetlink_conntrack.h, nf_conntrack_tcp.h,
inet_diag.h; net/netfilter/nf_conntrack_netlink.c (ctnetlink_change_mark, the dump filter).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from sdnsup.errors import ConntrackError
from sdnsup.netlink import (
    NETLINK_NETFILTER,
    NETLINK_SOCK_DIAG,
    NLA_F_NESTED,
    NLM_F_REQUEST,
    Netlink,
    attr,
    attrs,
    message,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
SOCK_DESTROY = 21

CTA_TUPLE_ORIG = 1
CTA_PROTOINFO = 4
CTA_MARK = 8
CTA_ZONE = 18
CTA_MARK_MASK = 21
CTA_STATUS = 3
CTA_STATUS_MASK = 26  # kernel >= 5.19: a dump filtered by status bits
IPS_SEEN_REPLY = 1 << 1
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_TUPLE_ZONE = 3
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_STATE = 1

# enum tcp_conntrack: a connection in TIME_WAIT or CLOSE has ended; its entry only lingers
# (2 minutes, 10 s) to absorb late segments, and no longer holds its AP.
TCP_CONNTRACK_TIME_WAIT = 7
TCP_CONNTRACK_CLOSE = 8
_ENDED = frozenset({TCP_CONNTRACK_TIME_WAIT, TCP_CONNTRACK_CLOSE})

INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_ALL_STATES = 0xFFFFFFFF

_NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big endian, 0 here)
_BE32 = struct.Struct(">I")
_BE16 = struct.Struct(">H")
# struct inet_diag_req_v2 with its struct inet_diag_sockid: family, protocol, ext, pad,
# states; sport, dport (big endian), src[16], dst[16], interface, cookie[2].
_DIAG_REQ = struct.Struct("=BBBBI2s2s16s16sIII")


@dataclass(frozen=True, slots=True)
class Entry:
    """One conntrack entry, reduced to its original tuple, TCP state and mark."""

    family: int  # AF_INET or AF_INET6
    proto: int  # IPPROTO_TCP, IPPROTO_UDP...
    src: IPAddress
    dst: IPAddress
    sport: int
    dport: int
    mark: int
    tcp_state: int | None = None  # enum tcp_conntrack; None for other protocols
    zone: int = 0
    replied: bool = True  # IPS_SEEN_REPLY: the far side answered at least once

    @property
    def live(self) -> bool:
        """False for a TCP connection that has ended (TIME_WAIT, CLOSE)."""
        return self.tcp_state not in _ENDED

    def __str__(self) -> str:
        name = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}.get(self.proto, "ip")
        return f"{name} {self.src}:{self.sport} -> {self.dst}:{self.dport}"


class ConntrackBackend(Protocol):
    """The seam to the kernel's connection tracking and sockets (fakes in tests)."""

    def pinned(self, value: int, mask: int) -> list[Entry]:
        """Every entry whose ``mark & mask == value``, both families.

        Raises:
            ConntrackError: the dump failed.
        """
        ...

    def unanswered(self, value: int, mask: int) -> list[Entry]:
        """The entries whose ``mark & mask == value`` that never saw a reply.

        Raises:
            ConntrackError: the dump failed.
        """
        ...

    def repin(self, entries: Iterable[Entry], value: int, mask: int) -> int:
        """Set the ``mask`` bits of each entry's mark to ``value``; how many were changed
        (an entry that ended meanwhile is not an error).

        Raises:
            ConntrackError: the socket failed.
        """
        ...

    def abort_sockets(self, entries: Iterable[Entry]) -> int:
        """Destroy this host's TCP sockets of ``entries``; how many were destroyed.

        Raises:
            ConntrackError: the socket failed, or the kernel cannot destroy sockets.
        """
        ...


def _nested(kind: int, payload: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, payload)


def _tuple(entry: Entry) -> bytes:
    """CTA_TUPLE_ORIG of ``entry``: what the kernel looks an entry up by."""
    v4 = entry.family == socket.AF_INET
    ip = attr(CTA_IP_V4_SRC if v4 else CTA_IP_V6_SRC, entry.src.packed)
    ip += attr(CTA_IP_V4_DST if v4 else CTA_IP_V6_DST, entry.dst.packed)
    proto = attr(CTA_PROTO_NUM, bytes([entry.proto]))
    proto += attr(CTA_PROTO_SRC_PORT, _BE16.pack(entry.sport))
    proto += attr(CTA_PROTO_DST_PORT, _BE16.pack(entry.dport))
    return _nested(CTA_TUPLE_ORIG, _nested(CTA_TUPLE_IP, ip) + _nested(CTA_TUPLE_PROTO, proto))


def parse_entry(data: bytes, start: int, end: int) -> Entry | None:
    """One IPCTNL_MSG_CT_NEW message (a dump answer) as an :class:`Entry`; None if it is
    not an IPv4/IPv6 entry with ports (ICMP and others are never pinned by port)."""
    family = data[start]
    a = attrs(data, start + _NFGENMSG.size, end)
    orig = a.get(CTA_TUPLE_ORIG)
    if orig is None:
        return None
    t = attrs(orig, 0, len(orig))
    ip = attrs(t.get(CTA_TUPLE_IP, b""), 0, len(t.get(CTA_TUPLE_IP, b"")))
    pr = attrs(t.get(CTA_TUPLE_PROTO, b""), 0, len(t.get(CTA_TUPLE_PROTO, b"")))
    if family == socket.AF_INET and CTA_IP_V4_SRC in ip and CTA_IP_V4_DST in ip:
        src: IPAddress = ipaddress.IPv4Address(ip[CTA_IP_V4_SRC])
        dst: IPAddress = ipaddress.IPv4Address(ip[CTA_IP_V4_DST])
    elif family == socket.AF_INET6 and CTA_IP_V6_SRC in ip and CTA_IP_V6_DST in ip:
        src = ipaddress.IPv6Address(ip[CTA_IP_V6_SRC])
        dst = ipaddress.IPv6Address(ip[CTA_IP_V6_DST])
    else:
        return None
    if CTA_PROTO_SRC_PORT not in pr or CTA_PROTO_DST_PORT not in pr:
        return None
    state = None
    info = a.get(CTA_PROTOINFO)
    if info is not None:
        tcp = attrs(info, 0, len(info)).get(CTA_PROTOINFO_TCP)
        if tcp is not None:
            raw = attrs(tcp, 0, len(tcp)).get(CTA_PROTOINFO_TCP_STATE)
            state = raw[0] if raw else None
    zone = a.get(CTA_ZONE)
    status = a.get(CTA_STATUS)
    return Entry(
        family,
        pr.get(CTA_PROTO_NUM, b"\0")[0],
        src,
        dst,
        _BE16.unpack(pr[CTA_PROTO_SRC_PORT][:2])[0],
        _BE16.unpack(pr[CTA_PROTO_DST_PORT][:2])[0],
        _BE32.unpack(a[CTA_MARK][:4])[0] if CTA_MARK in a else 0,
        state,
        _BE16.unpack(zone[:2])[0] if zone else 0,
        status is None or bool(_BE32.unpack(status[:4])[0] & IPS_SEEN_REPLY),
    )


def destroy_request(entry: Entry) -> bytes:
    """The body of a SOCK_DESTROY request for the local socket of ``entry``."""
    return _DIAG_REQ.pack(
        entry.family,
        socket.IPPROTO_TCP,
        0,
        0,
        _ALL_STATES,
        _BE16.pack(entry.sport),
        _BE16.pack(entry.dport),
        entry.src.packed.ljust(16, b"\0"),
        entry.dst.packed.ljust(16, b"\0"),
        0,
        INET_DIAG_NOCOOKIE,
        INET_DIAG_NOCOOKIE,
    )


class Conntrack:
    """:class:`ConntrackBackend` over ctnetlink and sock_diag, in the current namespace.

    Calls are serialised by a lock (worker threads may share the object).
    """

    def __init__(self, ct: Netlink | None = None, diag: Netlink | None = None) -> None:
        """Open the NETLINK_NETFILTER and NETLINK_SOCK_DIAG sockets (or use ``ct``, ``diag``).

        Raises:
            ConntrackError: a socket cannot be opened.
        """
        self._lock = threading.Lock()
        try:
            self._ct = Netlink(NETLINK_NETFILTER) if ct is None else ct
            self._diag = Netlink(NETLINK_SOCK_DIAG) if diag is None else diag
        except OSError as exc:
            raise ConntrackError(f"cannot open a netlink socket for conntrack: {exc}") from exc

    def close(self) -> None:
        self._ct.close()
        self._diag.close()

    def pinned(self, value: int, mask: int) -> list[Entry]:
        return self._dump(value, mask, b"")

    def unanswered(self, value: int, mask: int) -> list[Entry]:
        unreplied = attr(CTA_STATUS, _BE32.pack(0)) + attr(
            CTA_STATUS_MASK, _BE32.pack(IPS_SEEN_REPLY)
        )
        return self._dump(value, mask, unreplied)

    def _dump(self, value: int, mask: int, extra: bytes) -> list[Entry]:
        body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, 0)
        body += attr(CTA_MARK, _BE32.pack(value)) + attr(CTA_MARK_MASK, _BE32.pack(mask))
        body += extra
        kind = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET
        with self._lock:
            try:
                # A dump interrupted by a concurrent change may miss or repeat entries: a
                # count is then off for one poll, which the next poll corrects.
                out, _interrupted = self._ct.dump(
                    kind, body, lambda _t, d, s, e: parse_entry(d, s, e)
                )
            except OSError as exc:
                raise ConntrackError(f"cannot read conntrack entries: {exc}") from exc
        return [e for e in out if e.mark & mask == value]

    def repin(self, entries: Iterable[Entry], value: int, mask: int) -> int:
        kind = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW
        mark = attr(CTA_MARK, _BE32.pack(value)) + attr(CTA_MARK_MASK, _BE32.pack(mask))
        todo = list(entries)

        def encode(entry: Entry, seq: int) -> bytes:
            body = _NFGENMSG.pack(entry.family, 0, 0) + _tuple(entry) + mark
            if entry.zone:
                body += attr(CTA_ZONE, _BE16.pack(entry.zone))
            return message(kind, NLM_F_REQUEST, seq, body)

        with self._lock:
            try:
                failed = self._ct.batch(todo, encode)
            except OSError as exc:
                raise ConntrackError(f"cannot change conntrack marks: {exc}") from exc
        # ENOENT (the connection ended meanwhile) is not an error, but nothing was changed.
        return len(todo) - len(failed)

    def abort_sockets(self, entries: Iterable[Entry]) -> int:
        todo = [e for e in entries if e.proto == socket.IPPROTO_TCP and e.live]

        def encode(entry: Entry, seq: int) -> bytes:
            return message(SOCK_DESTROY, NLM_F_REQUEST, seq, destroy_request(entry))

        with self._lock:
            try:
                failed = self._diag.batch(todo, encode)
            except OSError as exc:
                raise ConntrackError(f"cannot destroy sockets: {exc}") from exc
        refused = [err for _, err in failed if err.errno != errno.ENOENT]
        if refused and len(refused) == len(todo):
            # e.g. EOPNOTSUPP: a kernel built without CONFIG_INET_DIAG_DESTROY
            raise ConntrackError(f"the kernel refused to destroy sockets: {refused[0]}")
        # ENOENT: no socket of this host (a forwarded connection), or it closed meanwhile.
        return len(todo) - len(failed)
