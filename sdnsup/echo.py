"""Long-lived probe sockets: one socket per probed AP, not one per probe.

A probe on a fresh socket has a fresh source port (UDP) or ICMP identifier, so every
stateful device on the path (conntrack here, a firewall or NAT on the way, the AP's own
conntrack) creates a new flow entry for each probe and keeps it for its UDP timeout (30 s
in Linux, 120 s for a flow that saw an answer). At 5 keepalive probes a second plus the
probe rounds, that is about 150 live entries per host on every such device, millions for a
fleet. With one socket per AP it is one entry per AP.

:class:`Prober` keeps a socket per ``(kind, address, port)`` for ``udp`` and ``icmp``
probes, and one reader task per socket that hands each answer to the probe waiting for it
(matched by its nonce, so concurrent probes of one AP share the socket, and a late answer
to a probe that gave up is dropped). ``tcp`` and ``http`` probes measure a connection, so
they still open one each (:func:`sdnsup.probe.probe_once`).

A socket that misses an answer is replaced: its successor gets a new source port or ICMP
identifier, and with it new state on every device on the path (a NAT mapping dropped in the
middle, a source address that changed under a connected socket). So a dead AP is probed
over a fresh socket each time, as before; only a healthy one keeps its socket, which is
where the savings are. The old socket is closed once its last pending probe is done.

Errors are those of :func:`sdnsup.probe.probe_once`: :class:`~sdnsup.probe.ProbeFailed`
with the same messages; an ICMP error for a connected UDP socket (port unreachable) fails
every probe pending on it at once, since it cannot be told which datagram it was for.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from sdnsup.aps import AccessPoint
from sdnsup.probe import (
    _ICMP_HEADER,
    ICMP6_ECHO_REPLY,
    ICMP6_ECHO_REQUEST,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    NONCE_BYTES,
    UDP_MAGIC,
    UDP_RECV_MAX,
    ProbeFailed,
    _family,
    _inet_checksum,
    _parse_echo_reply,
    _short_reason,
    open_icmp_socket,
    probe_once,
)

__all__ = ["IDLE", "Prober"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Key = tuple[str, IPAddress, int]

# Every listed AP is probed at least every probe round (30 s +-20%; 2 s without an AP): a
# socket idle this long belongs to an AP no longer listed, and is closed.
IDLE = 120.0
# ICMP errors a connected UDP socket reports on its next receive: they concern one datagram
# sent, not the socket, which stays usable.
_DATAGRAM_ERRORS = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.EMSGSIZE}
)


class _Wait:
    """One probe waiting for its answer: when it came, or the error that ended it."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.arrived: float | None = None
        self.error: OSError | None = None


class _Echo:
    """One socket to one AP and the probes pending on it."""

    def __init__(self, kind: str, addr: IPAddress, port: int) -> None:
        self.kind = kind
        self.addr = addr
        self.family = _family(addr)
        self.raw = False
        self.ident = secrets.randbits(16)
        self.seq = secrets.randbits(16)
        if kind == "udp":
            plain = socket.socket(self.family, socket.SOCK_DGRAM)
            try:
                # connect(): only the AP's address and port reach the socket, and an ICMP
                # port unreachable becomes ECONNREFUSED (a fast, clear failure). A UDP
                # connect only picks a route and a source: it never blocks.
                plain.connect((str(addr), port))
            except BaseException:
                plain.close()
                raise
            self.sock = trio.socket.from_stdlib_socket(plain)
        else:
            self.sock, self.raw = open_icmp_socket(self.family)
        self.pending: dict[bytes, _Wait] = {}
        self.retiring = False
        self.closed = False
        self.used = trio.current_time()

    def close(self, error: OSError | None = None) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()
        self.fail_all(error or OSError(errno.EBADF, "probe socket closed"))

    def fail_all(self, error: OSError) -> None:
        for wait in self.pending.values():
            wait.error = error
            wait.done.set()
        self.pending.clear()

    def release(self) -> None:
        """A probe is done with the socket: close a retiring one once nobody waits on it."""
        if self.retiring and not self.pending:
            self.close()

    def _request(self) -> tuple[bytes, bytes]:
        """(key, packet) of a new probe; the key is what its answer carries."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        if self.kind == "udp":
            request = UDP_MAGIC + nonce
            return request, request
        v4 = self.family == socket.AF_INET
        kind = ICMP_ECHO_REQUEST if v4 else ICMP6_ECHO_REQUEST
        self.seq = (self.seq + 1) & 0xFFFF
        packet = _ICMP_HEADER.pack(kind, 0, 0, self.ident, self.seq) + nonce
        if v4:  # ping sockets recompute it; raw IPv4 sockets send what we give them
            checksum = _inet_checksum(packet)
            packet = _ICMP_HEADER.pack(kind, 0, checksum, self.ident, self.seq) + nonce
        return nonce, packet

    def _answer_key(self, data: bytes, source: object) -> bytes | None:
        if self.kind == "udp":
            return data  # the socket is connected: only the AP's port reaches it
        reply = ICMP_ECHO_REPLY if self.family == socket.AF_INET else ICMP6_ECHO_REPLY
        parsed = _parse_echo_reply(data, self.family, self.raw)
        if parsed is None or parsed[0] != reply:
            return None
        _type, ident, _seq, payload = parsed
        # A ping socket rewrites the identifier to its own and the kernel delivers only the
        # replies that carry it; a raw one sees every echo reply of the namespace.
        if self.raw and ident != self.ident:
            return None
        assert isinstance(source, tuple)
        if ipaddress.ip_address(str(source[0]).split("%", 1)[0]) != self.addr:
            return None
        return bytes(payload)

    async def read(self) -> None:
        """Hand each answer to its probe until the socket is closed."""
        while not self.closed:
            try:
                data, source = await self.sock.recvfrom(UDP_RECV_MAX)
            except trio.ClosedResourceError:
                return  # closed by close() while waiting here
            except OSError as exc:
                if self.closed:
                    return
                if exc.errno in _DATAGRAM_ERRORS:
                    self.fail_all(exc)
                    continue
                self.close(exc)
                return
            key = self._answer_key(data, source)
            wait = self.pending.pop(key, None) if key is not None else None
            if wait is not None:
                wait.arrived = trio.current_time()
                wait.done.set()

    async def ask(self, port: int) -> float:
        """Send one probe and wait for its answer (the caller bounds the wait); the RTT."""
        key, packet = self._request()
        wait = _Wait()
        self.pending[key] = wait
        try:
            start = trio.current_time()
            if self.kind == "udp":
                await self.sock.send(packet)
            else:
                await self.sock.sendto(packet, (str(self.addr), 0))
            await wait.done.wait()
        finally:
            self.pending.pop(key, None)
        if wait.error is not None:
            raise wait.error
        assert wait.arrived is not None
        return wait.arrived - start


class Prober:
    """Probes APs like :func:`sdnsup.probe.probe_once`, over long-lived sockets.

    ``await prober.probe(ap, timeout=...)`` has probe_once's signature, so it is a drop-in
    ``probe_once``. The sockets and their reader tasks live inside ``async with
    prober.open():``; outside it (before, after) each probe opens its own socket, as
    :func:`~sdnsup.probe.probe_once` does.
    """

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None
        self._sockets: dict[Key, _Echo] = {}
        self._swept = -math.inf
        self.opened = 0  # sockets opened so far (tests and benchmarks read it)

    @asynccontextmanager
    async def open(self) -> AsyncIterator[Prober]:
        """Keep sockets for the duration of the block; all are closed when it ends."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._swept = trio.current_time()
            try:
                yield self
            finally:
                self._nursery = None
                self.close()
                nursery.cancel_scope.cancel()

    def _sweep(self, now: float) -> None:
        """Close the sockets no probe used for IDLE seconds (an AP the CC no longer lists)."""
        self._swept = now
        for key, echo in list(self._sockets.items()):
            if echo.closed or now - echo.used > IDLE:
                del self._sockets[key]
                echo.retiring = True
                echo.release()

    def _socket(self, kind: str, addr: IPAddress, port: int) -> _Echo:
        """The socket for these probes, opened if need be (synchronously: concurrent probes
        of one AP must find the same one)."""
        key: Key = (kind, addr, port)
        now = trio.current_time()
        if now - self._swept > IDLE:
            self._sweep(now)
        echo = self._sockets.get(key)
        if echo is not None and not echo.closed and not echo.retiring:
            echo.used = now
            return echo
        assert self._nursery is not None
        echo = _Echo(kind, addr, port)
        self._sockets[key] = echo
        self.opened += 1
        self._nursery.start_soon(echo.read)
        return echo

    async def probe(
        self, ap: AccessPoint, *, timeout: float, addr: IPAddress | None = None
    ) -> float:
        """One probe of ``ap`` (see :func:`sdnsup.probe.probe_once`): the RTT.

        Raises:
            ProbeFailed: no valid answer before the deadline, refused, unreachable.
            ValueError: ``timeout`` is not positive.
        """
        spec = ap.probe
        if spec.kind not in ("udp", "icmp") or self._nursery is None:
            return await probe_once(ap, timeout=timeout, addr=addr)
        if not timeout > 0:
            raise ValueError(f"probe timeout must be positive, not {timeout!r}")
        target = addr if addr is not None else ap.addr
        port = spec.port if spec.kind == "udp" else 0
        where = f"[{target}]" if spec.kind == "icmp" else f"[{target}]:{port}"
        what = f"{spec.kind} probe of AP {ap.id} at {where}"
        echo: _Echo | None = None
        try:
            with trio.move_on_after(timeout):
                try:
                    echo = self._socket(spec.kind, target, port)
                    return await echo.ask(port)
                except ProbeFailed as exc:
                    raise ProbeFailed(f"{what}: {exc}", exc.reason) from exc
                except OSError as exc:
                    reason = _short_reason(exc)
                    raise ProbeFailed(f"{what}: {reason}", reason) from exc
            # no answer in time: the next probe gets a new socket (see the module docstring)
            if echo is not None:
                echo.retiring = True
            raise ProbeFailed(f"{what}: no answer within {timeout * 1000:.0f} ms", "timeout")
        finally:
            if echo is not None:
                echo.release()

    @property
    def open_sockets(self) -> int:
        return sum(1 for echo in self._sockets.values() if not echo.closed)

    def close(self) -> None:
        for echo in self._sockets.values():
            echo.close()
        self._sockets.clear()
