"""The netlink mechanism every kernel seam of sdnsup shares: constants, wire layouts, the
attribute codec, error acks with their extended-ack text, and the sockets:

* :class:`Netlink`, the request engine (requests, dumps, windowed batches, nfnetlink
  transactions) for NETLINK_ROUTE (:mod:`sdnsup.rtnl`), NETLINK_NETFILTER
  (:mod:`sdnsup.conntrack`, :mod:`sdnsup.nfnl`) and NETLINK_SOCK_DIAG;
* :func:`subscribe`, a non-blocking socket joined to multicast groups, which
  :mod:`sdnsup.netmon` reads its events from.

Protocol-specific messages (rtnetlink's routes, rules and nexthops; nftables' set elements;
conntrack entries; the events netmon parses) stay in their modules; this one knows only
netlink itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import socket
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple, TypeVar

T = TypeVar("T")
B = TypeVar("B")  # what a batch writes

# --- include/uapi/linux/netlink.h ---------------------------------------------------------
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_MIN_TYPE = 0x10  # below: control messages
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLM_F_REPLACE = 0x100  # modifiers of NEW requests
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100  # flags of an NLMSG_ERROR ack
NLM_F_ACK_TLVS = 0x200
NLMSGERR_ATTR_MSG = 1
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NETLINK_GET_STRICT_CHK = 12
# Not exported by the socket module; asm-generic/socket.h.
SO_ATTACH_FILTER = 26
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

# --- further netlink.h / netfilter / socket constants, shared by sdnsup's netlink users ----
NETLINK_SOCK_DIAG = 4
NETLINK_NETFILTER = 12
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_DROP_MEMBERSHIP = 2
NLMSGERR_ATTR_OFFS = 2
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

# Wire layouts, native byte order (netlink is host-endian; addresses are network order).
NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLA = struct.Struct("=HH")  # nla_len, nla_type
U32 = struct.Struct("=I")
I32 = struct.Struct("=i")
NLA_U32 = struct.Struct("=HHI")
HDR_LEN = NLMSGHDR.size

# Requested socket buffers. The receive buffer bounds how many acks may be in flight (the
# kernel doubles the value and counts each ack's skb "truesize", ~0.7-1.3 KiB, against it);
# SO_*BUFFORCE needs CAP_NET_ADMIN, without it we get at most net.core.[rw]mem_max.
_RCVBUF = 8 << 20
_SNDBUF = 1 << 20
_ACK_TRUESIZE = 2048  # a pessimistic bound, also covers acks carrying an extack message
# Requests per sendmsg. Measured on 100k routes: 64 to 4096 all take the same time; 1024
# bounds the worst case (every request refused) to ~1 MiB of queued acks.
_MAX_WINDOW = 1024
_MAX_SEND_BYTES = 256 << 10
_RECV_BYTES = 256 << 10  # dump replies come in skbs of at most 32 KiB; a link reply is small
_TIMEOUT = 30.0  # seconds; the kernel answers in the sendmsg call, this is a safety net

Buffer = bytes | bytearray | memoryview


# One received message: (type, flags, seq, port, body start, body end); the body is
# data[start:end] of its datagram, after the nlmsghdr; port is the sender's port id, 0 for
# the kernel. A plain tuple: a NamedTuple costs 25 ms more per 100k routes read back.
Header = tuple[int, int, int, int, int, int]


def align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute (struct nlattr + payload + padding to 4 bytes)."""
    size = NLA.size + len(payload)
    return NLA.pack(size, kind) + payload + b"\0" * (align(size) - size)


def attr_u32(kind: int, value: int) -> bytes:
    return NLA_U32.pack(8, kind, value)


def attrs(data: bytes, start: int, end: int) -> dict[int, bytes]:
    """Attribute payloads of ``data[start:end]`` by type (nested/byte-order bits masked off)."""
    out = {}
    unpack = NLA.unpack_from
    while start + 4 <= end:
        size, kind = unpack(data, start)
        if size < 4:
            break  # malformed; the kernel never sends this
        out[kind & 0x3FFF] = data[start + 4 : start + size]
        start += (size + 3) & ~3
    return out


def spans(data: Buffer, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """``(type, payload start, payload end)`` of each attribute in ``data[start:end]``.

    Beside :func:`attrs` because a nest may repeat a type (nftables' element lists are
    NFTA_LIST_ELEM after NFTA_LIST_ELEM), and because walking a 32 KiB dump reply must not
    copy it; :func:`attrs` stays a loop of its own, being 1.6x faster on the route read-back.
    """
    unpack = NLA.unpack_from
    while start + 4 <= end:
        size, kind = unpack(data, start)
        if size < 4 or start + size > end:
            return  # malformed; the kernel never sends this
        yield kind & NLA_TYPE_MASK, start + 4, start + size
        start += (size + 3) & ~3


def messages(data: Buffer, size: int) -> Iterator[Header]:
    """Each message of the datagram ``data[:size]``; stops at a malformed one."""
    off = 0
    unpack = NLMSGHDR.unpack_from
    while off + HDR_LEN <= size:
        length, kind, flags, seq, port = unpack(data, off)
        if length < HDR_LEN or off + length > size:
            return  # the kernel never sends this
        yield kind, flags, seq, port, off + HDR_LEN, off + length
        off += (length + 3) & ~3


def u32(payload: bytes | None, default: int = 0) -> int:
    return default if payload is None else U32.unpack_from(payload)[0]


def oserror(code: int, extack: str | None = None) -> OSError:
    """OSError for a netlink errno, with the kernel's extended-ack text when there is one."""
    text = os.strerror(code)
    return OSError(code, f"{text}: {extack}" if extack else text)


class Netlink:
    """One netlink socket: sequence numbers, dumps, requests, windowed batches and nfnetlink
    transactions.

    ``protocol``: NETLINK_ROUTE (:mod:`sdnsup.rtnl`), NETLINK_NETFILTER (:mod:`sdnsup.nfnl`,
    conntrack) or NETLINK_SOCK_DIAG (:mod:`sdnsup.conntrack`): the request/ack/dump protocol
    is the same.
    The socket belongs to the network namespace of the thread that created it, for its
    whole life. Not thread-safe; its owner serialises callers.
    """

    def __init__(self, protocol: int = socket.NETLINK_ROUTE) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
        try:
            set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, _RCVBUF)
            set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, _SNDBUF)
            # Error acks echo only the failed request's header, not the whole request...
            set_optional(sock, NETLINK_CAP_ACK)
            # ...plus the kernel's text explaining the error ("Nexthop id does not exist").
            set_optional(sock, NETLINK_EXT_ACK)
            # Lets the kernel filter route dumps by protocol (kernel >= 4.20); older kernels
            # return everything and we filter here anyway.
            set_optional(sock, NETLINK_GET_STRICT_CHK)
            sock.bind((0, 0))
            sock.settimeout(_TIMEOUT)
            rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.rcvbuf = _RCVBUF
        self.sndbuf = _SNDBUF
        self.window = max(16, min(_MAX_WINDOW, rcvbuf // _ACK_TRUESIZE))
        # netlink refuses a sendmsg larger than sndbuf - 32.
        self.send_bytes = max(4096, min(_MAX_SEND_BYTES, sndbuf - 1024))
        self.buf = bytearray(_RECV_BYTES)
        self.seqs = itertools.count(1)
        # Set while an exchange is in progress; still set at the start of the next one if it
        # was aborted (an exception, a timeout), so its leftovers are drained first.
        self.dirty = False

    def close(self) -> None:
        self.sock.close()

    def next_seq(self) -> int:
        return next(self.seqs) & 0xFFFFFFFF

    def recv(self) -> bytes:
        """One datagram (the kernel sends one skb per recv); :func:`messages` splits it."""
        n = self.sock.recv_into(self.buf, len(self.buf), socket.MSG_TRUNC)
        if n > len(self.buf):
            raise OSError(errno.EMSGSIZE, f"netlink message of {n} bytes truncated")
        return bytes(self.buf[:n])

    def begin(self) -> None:
        """Start an exchange: drop the leftovers of an aborted one first."""
        if self.dirty:
            self.drain()
        self.dirty = True

    def drain(self) -> None:
        """Read and drop whatever is queued, e.g. the rest of an aborted dump.

        A dump left half-read would make the next dump fail with EBUSY (reading it, even
        non-blocking, makes the kernel produce the rest until NLMSG_DONE). Stale acks take
        buffer; requests, dumps and batches skip them by sequence number, and
        :meth:`transaction` leaves that to its caller, which knows its batch's numbers.
        """
        try:
            self.sock.setblocking(False)
            while True:
                self.sock.recv_into(self.buf)
        except OSError:
            pass  # EAGAIN: empty (or the socket is closed)
        finally:
            try:
                self.sock.settimeout(_TIMEOUT)
            except OSError:
                pass

    def dump(
        self, kind: int, body: bytes, parse: Callable[[int, bytes, int, int], T | None]
    ) -> tuple[list[T], bool]:
        """Run one dump request, parsing the answers as they arrive.

        Args:
            kind, body: the request (RTM_GET*) and its body (family header, attributes).
            parse: (message type, data, body start, body end) -> object, or None to skip it.

        Returns:
            The parsed objects, and whether the kernel flagged the dump as interrupted by a
            concurrent change (NLM_F_DUMP_INTR: the result may be inconsistent).

        Raises:
            OSError: the socket failed, or the kernel refused the dump.
        """
        self.begin()
        seq = self.next_seq()
        self.sock.send(message(kind, NLM_F_REQUEST | NLM_F_DUMP, seq, body))
        out: list[T] = []
        interrupted = False
        while True:
            data = self.recv()
            for mtype, flags, mseq, _port, start, end in messages(data, len(data)):
                if mseq != seq:
                    continue  # left over from an earlier, aborted operation
                interrupted |= bool(flags & NLM_F_DUMP_INTR)
                if mtype == NLMSG_DONE:
                    # The DONE payload is an int: a negative errno if the dump failed midway.
                    code = -I32.unpack_from(data, start)[0] if end - start >= 4 else 0
                    self.dirty = False  # the dump is complete, even if it failed
                    if code > 0:
                        raise oserror(code)
                    return out, interrupted
                if mtype == NLMSG_ERROR:
                    self.dirty = False  # the kernel refused the dump: nothing follows
                    code, text, _ = parse_ack(flags, data, start, end)
                    raise oserror(code or errno.EIO, text)
                if mtype < NLMSG_MIN_TYPE:
                    continue  # NOOP, OVERRUN: nothing to parse
                item = parse(mtype, data, start, end)
                if item is not None:
                    out.append(item)

    def request(self, kind: int, body: bytes) -> tuple[int, bytes, int, int]:
        """A single request expecting one answer message (e.g. RTM_GETROUTE for an address).

        Raises:
            OSError: the kernel answered with an error, or the socket failed.
        """
        self.begin()
        seq = self.next_seq()
        self.sock.send(message(kind, NLM_F_REQUEST, seq, body))
        while True:
            data = self.recv()
            for mtype, flags, mseq, _port, start, end in messages(data, len(data)):
                if mseq != seq:
                    continue
                self.dirty = False  # the one answer
                if mtype == NLMSG_ERROR:
                    code, text, _ = parse_ack(flags, data, start, end)
                    raise oserror(code or errno.EIO, text)
                return mtype, data, start, end

    def batch(
        self,
        items: Iterable[B],
        encode: Callable[[B, int], bytes],
        ok: frozenset[int] = frozenset(),
    ) -> list[tuple[B, OSError]]:
        """Send one request per item, a window per ``sendmsg``; collect the refusals.

        The requests carry no NLM_F_ACK: the kernel then answers only the ones it refuses
        (an NLMSG_ERROR with their sequence number). Each window ends with an NLMSG_NOOP
        that does carry NLM_F_ACK, a barrier: the kernel handles the messages of a buffer
        in order and acks on our socket in that order, so once the barrier's ack is read
        every refusal of the window has been read too. This reads a handful of datagrams per
        window instead of one per request (measured: 100k routes 1.5 s -> 0.75 s).

        Args:
            items: the objects to write.
            encode: builds the complete netlink message for an object and a sequence number
                (flags: NLM_F_REQUEST and the request's modifiers, not NLM_F_ACK).
            ok: errnos that count as success (EEXIST for an add, ENOENT for a delete...).

        Returns:
            (item, error) for each message the kernel refused, in request order.

        Raises:
            OSError: the socket failed (send, receive, timeout, ENOBUFS); which messages of
            the current window were applied is then unknown.
        """
        self.begin()
        failures: list[tuple[B, OSError]] = []
        it = iter(items)
        while True:
            pending: dict[int, B] = {}
            parts: list[bytes] = []
            size = 0
            for item in it:
                seq = self.next_seq()
                msg = encode(item, seq)
                parts.append(msg)
                pending[seq] = item
                size += len(msg)
                if len(parts) >= self.window or size >= self.send_bytes:
                    break
            if not parts:
                self.dirty = False
                return failures
            barrier = self.next_seq()
            parts.append(message(NLMSG_NOOP, NLM_F_REQUEST | NLM_F_ACK, barrier, b""))
            self.sock.send(b"".join(parts))
            done = False
            while not done:
                data = self.recv()
                for mtype, flags, seq, _port, start, end in messages(data, len(data)):
                    if mtype != NLMSG_ERROR:
                        continue
                    if seq == barrier:
                        done = True
                        continue
                    if seq not in pending:
                        continue  # stale answer of an earlier, aborted operation
                    item = pending.pop(seq)
                    code, text, _ = parse_ack(flags, data, start, end)
                    if code and code not in ok:
                        failures.append((item, oserror(code, text)))

    def reserve(self, acks: int, send_bytes: int) -> None:
        """Grow the socket buffers (as root beyond net.core.[rw]mem_max) so that one
        ``sendmsg`` of ``send_bytes`` fits and ``acks`` answers to it can queue unread."""
        rcvbuf = acks * _ACK_TRUESIZE + (256 << 10)
        if rcvbuf > self.rcvbuf:
            set_buffer(self.sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf)
            self.rcvbuf = rcvbuf
        sndbuf = send_bytes + (64 << 10)
        if sndbuf > self.sndbuf:
            set_buffer(self.sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, sndbuf)
            self.sndbuf = sndbuf

    def transaction(self, batch: bytes, requests: int) -> list[tuple[int, Ack]]:
        """Send an nfnetlink batch (BATCH_BEGIN, ``requests`` messages asking for acks,
        BATCH_END) and read the answers.

        nfnetlink takes a batch from one ``sendmsg`` and runs all of it inside that call,
        so every answer is queued by the time it returns: they are read without blocking.
        A refused batch still acks every message, and acks that overflow the receive buffer
        are dropped (ENOBUFS), so the buffers are sized for the batch first.

        Returns:
            ``(sequence number, ack)`` of each answer queued, in order; the caller keeps
            those of its batch (an aborted earlier exchange may have left others).

        Raises:
            OSError: the batch could not be sent; the kernel processed none of it.
            AnswerLost: it was sent but reading its answers failed; the transaction may or
                may not have been committed.
        """
        self.reserve(requests, len(batch))
        self.begin()
        self.sock.send(batch)
        answers: list[tuple[int, Ack]] = []
        try:
            # Non-blocking, not MSG_DONTWAIT: a socket with a timeout polls before reading.
            self.sock.setblocking(False)
            while True:
                try:
                    n = self.sock.recv_into(self.buf, len(self.buf))
                except BlockingIOError:
                    self.dirty = False
                    return answers
                data = bytes(self.buf[:n])
                for kind, flags, seq, _port, start, end in messages(data, n):
                    if kind == NLMSG_ERROR:
                        answers.append((seq, parse_ack(flags, data, start, end)))
        except OSError as exc:
            raise AnswerLost(exc.errno or errno.EIO, exc.strerror or str(exc)) from exc
        finally:
            with contextlib.suppress(OSError):  # closed meanwhile
                self.sock.settimeout(_TIMEOUT)


class AnswerLost(OSError):
    """A request was sent, but its answer could not be read: its effect is unknown."""


class Ack(NamedTuple):
    """An NLMSG_ERROR message: the answer to one request."""

    code: int  # errno, positive; 0 is success
    text: str | None  # the kernel's extended-ack message ("Nexthop id does not exist")
    offset: int | None  # extended ack: where in the request the attribute at fault starts


def parse_ack(flags: int, data: bytes | bytearray, start: int, end: int) -> Ack:
    """The NLMSG_ERROR message whose body is ``data[start:end]``.

    Layout: struct nlmsgerr { int error; struct nlmsghdr msg; } followed by the original
    payload unless NLM_F_CAPPED, then NLMSGERR_ATTR_* attributes if NLM_F_ACK_TLVS.
    """
    code = -I32.unpack_from(data, start)[0]
    text = offset = None
    if flags & NLM_F_ACK_TLVS:
        tlv = start + 4 + HDR_LEN
        if not flags & NLM_F_CAPPED:
            tlv = start + 4 + align(U32.unpack_from(data, start + 4)[0])
        found = attrs(bytes(data[tlv:end]), 0, end - tlv)  # errors are rare: copy freely
        msg = found.get(NLMSGERR_ATTR_MSG)
        if msg:
            text = msg.split(b"\0", 1)[0].decode(errors="replace")
        offs = found.get(NLMSGERR_ATTR_OFFS)
        if offs is not None and len(offs) >= 4:
            offset = U32.unpack_from(offs)[0]
    return Ack(code, text, offset)


def set_buffer(sock: socket.socket, force: int, plain: int, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


def set_optional(sock: socket.socket, option: int) -> None:
    try:
        sock.setsockopt(SOL_NETLINK, option, 1)
    except OSError:
        pass  # older kernel: we only lose error texts / kernel-side filtering


def message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """A complete netlink message: nlmsghdr (port id 0: the kernel fills in ours) + body."""
    return NLMSGHDR.pack(HDR_LEN + len(body), kind, flags, seq, 0) + body


# --- subscriptions ------------------------------------------------------------------------

_SOCK_FILTER = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k


def subscribe(
    protocol: int,
    groups: Iterable[int],
    rcvbuf: int,
    program: Sequence[tuple[int, int, int, int]] = (),
) -> socket.socket:
    """A non-blocking socket of ``protocol`` in the caller's namespace, joined to ``groups``.

    The filter (classic BPF, ``(code, jt, jf, k)`` instructions) goes on before the
    subscriptions, so no unfiltered message is queued.

    Raises:
        OSError: the socket cannot be opened, filtered or subscribed; nothing is left open.
    """
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, protocol
    )
    try:
        # SO_RCVBUFFORCE needs CAP_NET_ADMIN; without it we get net.core.rmem_max.
        set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf)
        if program:
            attach_filter(sock, program)
        sock.bind((0, 0))
        for group in groups:
            join(sock, group)
    except BaseException:
        sock.close()
        raise
    return sock


def join(sock: socket.socket, group: int) -> None:
    sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)


def leave(sock: socket.socket, group: int) -> None:
    sock.setsockopt(SOL_NETLINK, NETLINK_DROP_MEMBERSHIP, group)


def attach_filter(sock: socket.socket, program: Sequence[tuple[int, int, int, int]]) -> None:
    """SO_ATTACH_FILTER: struct sock_fprog { unsigned short len; struct sock_filter *filter; }.

    The kernel copies the program during the call, so the buffer only has to outlive it;
    attaching replaces the socket's previous filter.
    """
    code = ctypes.create_string_buffer(b"".join(_SOCK_FILTER.pack(*ins) for ins in program))
    sock.setsockopt(
        socket.SOL_SOCKET,
        SO_ATTACH_FILTER,
        struct.pack("@HP", len(program), ctypes.addressof(code)),
    )
