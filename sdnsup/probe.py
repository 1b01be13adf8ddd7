"""Probing access points: one probe, a concurrent ranking, and the anti-flap rules.

One probe (:func:`probe_once`) measures one round trip to an AP with the kind its
:class:`~sdnsup.aps.ProbeSpec` names. Every probe is raced against its deadline with
:func:`trio.move_on_after`, its socket is always closed, and time is read with
:func:`trio.current_time` (so tests can drive it with :class:`trio.testing.MockClock`):

``udp``
    One datagram to ``port``: :data:`UDP_MAGIC` (4 bytes, ``b"SDP1"``) followed by a random
    16-byte nonce, 20 bytes in all. The answer must be those same 20 bytes, from the probed
    address and port (the socket is connected, so the kernel drops datagrams from anyone
    else and reports an ICMP port-unreachable as a refusal). Datagrams with another payload
    (a late answer to an earlier probe, garbage) are ignored until the deadline. An echo
    agent may refuse to echo datagrams that do not start with the magic, so it is no
    general-purpose reflector; the lab's agent (:mod:`sdnsup.lab.apagent`) echoes anything.
``tcp``
    The time ``connect()`` to ``port`` takes (SYN to SYN-ACK: one round trip, answered by
    the AP's kernel, so it measures the path, not the agent).
``icmp``
    An echo request with a random id, sequence number and nonce payload; the reply must
    match all three and come from the probed address. It uses an unprivileged ICMP
    datagram ("ping") socket when ``net.ipv4.ping_group_range`` admits our group (it also
    governs ICMPv6), else a raw socket (needs CAP_NET_RAW). IPv4 and IPv6.
``http``
    ``GET path HTTP/1.0`` over a bare socket; the RTT runs from sending the request to
    receiving the status line (one round trip plus the server's think time, like the other
    kinds; the TCP handshake is not counted but must fit in the deadline too). Any ``2xx``
    is a success; other statuses, a malformed or missing status line are failures.

Errors: every failure of a probe is a :class:`ProbeFailed` (timeouts, refusals, unreachable
networks, bad answers; the ``OSError`` is chained)::

    SdnsupError
    └── ProbeFailed          one probe got no valid answer before its deadline

Selection: :func:`probe_all` probes every AP concurrently and ranks them (:func:`rank`);
its ``on_answer`` callback fires on every answer as it arrives, so a caller with no AP can
choose among the first answers instead of waiting for the slowest AP's deadline.
:func:`should_switch` is the anti-flap rule for a periodic re-probe and :class:`Hysteresis`
the hold-down for APs that were declared dead.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import math
import secrets
import socket
import statistics
import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import trio

from sdnsup.aps import AccessPoint, ProbeSpec
from sdnsup.errors import SdnsupError

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# --- constants -------------------------------------------------------------------------------

UDP_MAGIC = b"SDP1"
NONCE_BYTES = 16
# Larger than any answer we accept: a longer datagram is not ours, and recv truncates it.
UDP_RECV_MAX = 512
# A status line longer than this is not an answer from a health endpoint.
HTTP_STATUS_LINE_MAX = 1024
HTTP_USER_AGENT = "sdnsup-probe/1"

# probe_all: 3 probes per AP make loss meaningful (0, 1/3, 2/3, 1) at little cost. They are
# spaced so that one burst of loss (a full queue, an ARP/ND resolution in progress on the
# first packet) does not take all three, yet the round still ends 10 ms after the deadline.
PROBE_COUNT = 3
PROBE_SPACING = 0.005

# should_switch: Tailscale's netcheck keeps its preferred DERP region unless another one is
# more than 10 ms *and* more than a third faster (PreferredDERPAbsoluteDiff, and the
# "2/3 of the old latency" rule). The absolute gap ignores jitter between close APs (3 vs
# 1.5 ms is 50% but meaningless); the relative gap ignores noise on far ones (210 vs 195 ms).
MIN_GAIN_ABS = 0.010
MIN_GAIN_REL = 0.33

# Hysteresis: mwan3 brings an interface back after `up` (default 5) good rounds; sdnsup's
# ranking rounds already send PROBE_COUNT probes each, so 3 good probes in a row plus a
# 10 s hold-down (several keepalive deaths would be needed to flap more often than that).
N_GOOD = 3
HOLD_DOWN = 10.0

ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0
ICMP6_ECHO_REQUEST, ICMP6_ECHO_REPLY = 128, 129
_ICMP_HEADER = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence


class ProbeFailed(SdnsupError):
    """One probe got no valid answer before its deadline.

    ``reason`` is the short cause (``"timeout"``, ``"connection refused"``...); the message
    says which AP, kind and address.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


# --- one probe -------------------------------------------------------------------------------


def _family(addr: IPAddress) -> socket.AddressFamily:
    return socket.AF_INET if addr.version == 4 else socket.AF_INET6


def _set_mark(sock: trio.socket.SocketType, mark: int | None) -> None:
    """Give the probe's packets a packet mark (SO_MARK; needs CAP_NET_ADMIN), which routes
    them through another AP than the active one (sdnsup.paths)."""
    if mark is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)


async def _probe_udp(addr: IPAddress, port: int, mark: int | None = None) -> float:
    with trio.socket.socket(_family(addr), socket.SOCK_DGRAM) as sock:
        _set_mark(sock, mark)
        # connect(): the kernel then only delivers datagrams from addr:port, and turns an
        # ICMP port unreachable into ECONNREFUSED on recv (a fast, clear failure).
        await sock.connect((str(addr), port))
        request = UDP_MAGIC + secrets.token_bytes(NONCE_BYTES)
        start = trio.current_time()
        await sock.send(request)
        while True:
            answer = await sock.recv(UDP_RECV_MAX)
            if answer == request:
                return trio.current_time() - start
            log.debug("udp probe to [%s]:%d: ignored a stray datagram", addr, port)


async def _probe_tcp(addr: IPAddress, port: int, mark: int | None = None) -> float:
    with trio.socket.socket(_family(addr), socket.SOCK_STREAM) as sock:
        _set_mark(sock, mark)
        start = trio.current_time()
        await sock.connect((str(addr), port))
        return trio.current_time() - start


def _check_path(path: str) -> None:
    # The path comes from the CC (untrusted): no spaces or control characters, which could
    # split the request line or inject headers.
    if not path.startswith("/") or any(not 0x21 <= ord(c) <= 0x7E for c in path):
        raise ProbeFailed(f"http probe path {path!r} is not a plain absolute path", "bad path")


async def _probe_http(addr: IPAddress, port: int, path: str) -> float:
    _check_path(path)
    host = f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"
    request = (
        f"GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: {HTTP_USER_AGENT}\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    with trio.socket.socket(_family(addr), socket.SOCK_STREAM) as sock:
        await sock.connect((str(addr), port))
        start = trio.current_time()
        view = memoryview(request)
        while view:
            view = view[await sock.send(view) :]
        received = b""
        while b"\n" not in received:
            if len(received) >= HTTP_STATUS_LINE_MAX:
                raise ProbeFailed("http status line too long", "bad answer")
            chunk = await sock.recv(HTTP_STATUS_LINE_MAX - len(received))
            if not chunk:
                raise ProbeFailed("connection closed before a status line", "bad answer")
            received += chunk
        rtt = trio.current_time() - start
    line = received.split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ProbeFailed(f"not an HTTP status line: {line[:80]!r}", "bad answer")
    status = int(parts[1])
    if not 200 <= status <= 299:
        raise ProbeFailed(f"HTTP status {status}", f"HTTP {status}")
    return rtt


def _inet_checksum(data: bytes) -> int:
    """RFC 1071 checksum (the kernel computes it for ICMPv6 and ping sockets, not raw v4)."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def open_icmp_socket(family: socket.AddressFamily) -> tuple[trio.socket.SocketType, bool]:
    """An ICMP(v6) socket for echo probes, and whether it is a raw one.

    A datagram ("ping") socket needs no privilege but only works when our group is in
    ``net.ipv4.ping_group_range`` (default ``1 0``: nobody, root included); otherwise a raw
    socket, which needs CAP_NET_RAW.

    Raises:
        ProbeFailed: neither socket could be opened (message says how to fix it).
    """
    proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
    try:
        return trio.socket.socket(family, socket.SOCK_DGRAM, proto), False
    except OSError as dgram_exc:  # EACCES outside ping_group_range; EPROTONOSUPPORT if absent
        try:
            sock = trio.socket.socket(family, socket.SOCK_RAW, proto)
        except OSError as exc:
            raise ProbeFailed(
                "icmp probes need CAP_NET_RAW or net.ipv4.ping_group_range to include this "
                f"process's group ({dgram_exc.strerror}; raw: {exc.strerror})",
                "no icmp socket",
            ) from exc
        _only_echo_replies(sock, family)
        return sock, True


# <linux/icmp.h> ICMP_FILTER and <linux/icmpv6.h> ICMPV6_FILTER: bitmaps of message types
# the kernel does *not* deliver to a raw socket (bit set = blocked).
_SOL_RAW, _ICMP_FILTER, _ICMPV6_FILTER = 255, 1, 1


def _only_echo_replies(sock: trio.socket.SocketType, family: socket.AddressFamily) -> None:
    """Spare a raw socket the namespace's other ICMP traffic (best effort: we match anyway)."""
    with contextlib.suppress(OSError):
        if family == socket.AF_INET:
            blocked = 0xFFFFFFFF & ~(1 << ICMP_ECHO_REPLY)
            sock.setsockopt(_SOL_RAW, _ICMP_FILTER, struct.pack("=I", blocked))
        else:
            words = [0xFFFFFFFF] * 8
            words[ICMP6_ECHO_REPLY >> 5] &= ~(1 << (ICMP6_ECHO_REPLY & 31))
            sock.setsockopt(socket.IPPROTO_ICMPV6, _ICMPV6_FILTER, struct.pack("=8I", *words))


def _parse_echo_reply(
    data: bytes, family: socket.AddressFamily, raw: bool
) -> tuple[int, int, int, bytes] | None:
    """(type, id, seq, payload) of an ICMP message as received, None if too short."""
    if family == socket.AF_INET and raw:
        # Raw IPv4 sockets deliver the IP header too; IHL is in 32-bit words.
        if not data:
            return None
        data = data[(data[0] & 0x0F) * 4 :]
    if len(data) < _ICMP_HEADER.size:
        return None
    icmp_type, _code, _sum, ident, seq = _ICMP_HEADER.unpack_from(data)
    return icmp_type, ident, seq, data[_ICMP_HEADER.size :]


async def _probe_icmp(addr: IPAddress, mark: int | None = None) -> float:
    family = _family(addr)
    v4 = family == socket.AF_INET
    request_type, reply_type = (
        (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY) if v4 else (ICMP6_ECHO_REQUEST, ICMP6_ECHO_REPLY)
    )
    ident, seq = secrets.randbits(16), secrets.randbits(16)
    nonce = secrets.token_bytes(NONCE_BYTES)
    sock, raw = open_icmp_socket(family)
    with sock:
        _set_mark(sock, mark)
        packet = _ICMP_HEADER.pack(request_type, 0, 0, ident, seq) + nonce
        if v4:  # ping sockets recompute it; raw IPv4 sockets send what we give them
            packet = _ICMP_HEADER.pack(request_type, 0, _inet_checksum(packet), ident, seq) + nonce
        start = trio.current_time()
        await sock.sendto(packet, (str(addr), 0))
        if not raw:
            # A ping socket replaces the identifier with its own "port"; the kernel only
            # delivers replies carrying it.
            ident = sock.getsockname()[1]
        while True:
            data, source = await sock.recvfrom(UDP_RECV_MAX)
            rtt = trio.current_time() - start
            # A raw socket sees every echo reply of the namespace (and, if the ICMP filter
            # was refused, errors and our own request to a local address too): match all.
            parsed = _parse_echo_reply(data, family, raw)
            if parsed is None or parsed != (reply_type, ident, seq, nonce):
                continue
            if ipaddress.ip_address(source[0].split("%", 1)[0]) != addr:
                continue
            return rtt


async def probe_address(
    kind: str, addr: IPAddress, port: int = 0, *, mark: int | None = None
) -> float:
    """One ``udp``/``tcp``/``icmp`` probe of ``addr`` (no deadline: the caller's), its
    packets carrying ``mark`` if given; the RTT.

    Raises:
        OSError: refused, unreachable... (the caller decides what an error means).
        ProbeFailed: no ICMP socket could be opened; an unknown kind.
    """
    if kind == "udp":
        return await _probe_udp(addr, port, mark)
    if kind == "tcp":
        return await _probe_tcp(addr, port, mark)
    if kind == "icmp":
        return await _probe_icmp(addr, mark)
    raise ProbeFailed(f"unknown probe kind {kind!r}", "unknown kind")


def _short_reason(exc: OSError) -> str:
    if exc.errno is not None and exc.errno in (errno.ECONNREFUSED, errno.ECONNRESET):
        return "connection refused" if exc.errno == errno.ECONNREFUSED else "connection reset"
    return (exc.strerror or type(exc).__name__).lower()


async def probe_once(ap: AccessPoint, *, timeout: float, addr: IPAddress | None = None) -> float:
    """Probe ``ap`` once with the kind its :class:`~sdnsup.aps.ProbeSpec` names.

    Args:
        ap: the AP; ``ap.probe`` says how (kind, port, path).
        timeout: the deadline in seconds for the whole probe (connect included).
        addr: the address to probe (for instance ``ap.addr6`` of a dual-stack AP); default
            ``ap.addr``.

    Returns:
        The round-trip time in seconds.

    Raises:
        ProbeFailed: no valid answer before the deadline, connection refused, network
            unreachable, a bad answer (wrong HTTP status, malformed status line), or no
            ICMP socket could be opened.
        ValueError: ``timeout`` is not positive.
    """
    if not timeout > 0:
        raise ValueError(f"probe timeout must be positive, not {timeout!r}")
    target = addr if addr is not None else ap.addr
    spec: ProbeSpec = ap.probe
    where = f"[{target}]" if spec.kind == "icmp" else f"[{target}]:{spec.port}"
    what = f"{spec.kind} probe of AP {ap.id} at {where}"
    with trio.move_on_after(timeout):
        try:
            if spec.kind == "http":
                return await _probe_http(target, spec.port, spec.path)
            if spec.kind in ("udp", "tcp", "icmp"):
                return await probe_address(spec.kind, target, spec.port)
        except ProbeFailed as exc:
            raise ProbeFailed(f"{what}: {exc}", exc.reason) from exc
        except OSError as exc:
            reason = _short_reason(exc)
            raise ProbeFailed(f"{what}: {reason}", reason) from exc
        raise ProbeFailed(f"{what}: unknown probe kind {spec.kind!r}", "unknown kind")
    raise ProbeFailed(f"{what}: no answer within {timeout * 1000:.0f} ms", "timeout")


# --- results and ranking ---------------------------------------------------------------------


def _loss(sent: int, received: int) -> float:
    return 1.0 if sent <= 0 else 1.0 - min(received, sent) / sent


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What a probe round learnt about one AP.

    ``rtt`` is the median RTT of the probes that were answered (seconds), None when none
    was: the AP is dead for this round.
    """

    ap: AccessPoint
    rtt: float | None
    sent: int
    received: int

    @property
    def loss(self) -> float:
        """Fraction of probes lost, 0.0 to 1.0 (1.0 when none was sent)."""
        return _loss(self.sent, self.received)

    @property
    def alive(self) -> bool:
        """Whether at least one probe was answered."""
        return self.rtt is not None and self.received > 0


Ranking = tuple[ProbeResult, ...]


def rank(results: Iterable[ProbeResult]) -> Ranking:
    """Order results best first: live before dead, then by loss, then by median RTT.

    The sort is stable: ties keep the input order (the CC's order of preference).
    """
    return tuple(
        sorted(
            results,
            key=lambda r: (not r.alive, r.loss, r.rtt if r.rtt is not None else math.inf),
        )
    )


ProbeOnce = Callable[..., Awaitable[float]]
"""``await probe(ap, timeout=seconds) -> rtt``, raising :class:`SdnsupError` on a miss."""


async def probe_all(
    aps: Iterable[AccessPoint],
    *,
    timeout: float,
    count: int = PROBE_COUNT,
    on_answer: Callable[[ProbeResult], None] | None = None,
    spacing: float = PROBE_SPACING,
    probe: ProbeOnce = probe_once,
) -> Ranking:
    """Probe every AP ``count`` times, all concurrently, and rank them.

    All probes run in a nursery this function owns, so nothing outlives the call. AP ``i``'s
    k-th probe starts ``k * spacing`` after the round started and has its own ``timeout``;
    the round ends when every probe was answered or hit its deadline, at most
    ``(count - 1) * spacing + timeout`` after it began.

    Deciding early: since all APs are probed at the same moment, answers arrive fastest AP
    first. ``on_answer`` is called as soon as each one arrives, with a provisional result
    for that single probe (``sent=1, received=1``). A caller with no AP in use can choose
    among the first answers right away instead of waiting for the slowest AP's deadline;
    the returned ranking then refines the choice. A plain callback keeps this function a
    simple awaitable: there is no background task, and no channel the caller must drain. A
    caller that wants to react in another task can ``send_nowait`` on a channel or set a
    :class:`trio.Event` from the callback.

    Args:
        aps: the APs to probe (duplicates are probed and ranked separately).
        timeout: deadline of each probe, in seconds.
        count: probes per AP (at least 1).
        on_answer: called synchronously from the probing task with every successful answer
            of the round, as it arrives; it must not block. An exception it raises cancels
            the round and propagates.
        spacing: seconds between the probes of one AP.
        probe: the probe function, :func:`probe_once` by default (injectable for tests):
            ``await probe(ap, timeout=timeout)`` returns an RTT or raises
            :class:`~sdnsup.errors.SdnsupError`; it is also cut off at ``timeout`` here.

    Returns:
        The :data:`Ranking` (see :func:`rank`), one result per AP; an AP whose probes all
        failed has ``rtt=None``.

    Raises:
        ValueError: ``count`` < 1 or ``timeout`` not positive.
        Whatever ``on_answer`` raises; any non-:class:`SdnsupError` from ``probe`` (a bug).
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    if not timeout > 0:
        raise ValueError(f"probe timeout must be positive, not {timeout!r}")
    targets = tuple(aps)
    rtts: list[list[float]] = [[] for _ in targets]
    start = trio.current_time()

    async def one(i: int, k: int) -> None:
        await trio.sleep_until(start + k * spacing)
        ap = targets[i]
        rtt: float | None = None
        # The probe function enforces its deadline; this scope also bounds injected ones.
        with trio.move_on_after(timeout):
            try:
                rtt = await probe(ap, timeout=timeout)
            except SdnsupError as exc:
                log.debug("probe %d of AP %s failed: %s", k + 1, ap.id, exc)
        if rtt is None:
            return
        rtts[i].append(rtt)
        if on_answer is not None:
            on_answer(ProbeResult(ap, rtt, 1, 1))

    async with trio.open_nursery() as nursery:
        for k in range(count):
            for i in range(len(targets)):
                nursery.start_soon(one, i, k)
    return rank(
        ProbeResult(ap, statistics.median(r) if r else None, count, len(r))
        for ap, r in zip(targets, rtts, strict=True)
    )


# --- anti-flap -------------------------------------------------------------------------------


def should_switch(current: ProbeResult, candidate: ProbeResult) -> bool:
    """Whether a periodic re-probe should move from ``current`` to ``candidate``.

    * A dead candidate never wins; a dead current AP loses to any live candidate.
    * Otherwise the candidate must not lose more probes than the current AP, and must be
      faster by more than :data:`MIN_GAIN_ABS` (10 ms) *and* by more than
      :data:`MIN_GAIN_REL` (33%) of the current RTT: Tailscale netcheck's rule for leaving
      its home DERP region. The absolute gap keeps close APs (3 vs 1.5 ms) from flapping on
      jitter, the relative one far APs (210 vs 195 ms) on noise.

    Only ``rtt``, ``sent`` and ``received`` are read, so any result-like object works.
    """
    if candidate.rtt is None or candidate.received <= 0:
        return False
    if current.rtt is None or current.received <= 0:
        return True
    if _loss(candidate.sent, candidate.received) > _loss(current.sent, current.received):
        return False
    gain = current.rtt - candidate.rtt
    return gain > MIN_GAIN_ABS and gain > MIN_GAIN_REL * current.rtt


@dataclass
class Hysteresis:
    """Hold-down for APs declared dead; pure bookkeeping, the clock is passed in.

    An AP marked dead (:meth:`mark_dead`, e.g. after the keepalive's K misses) is usable
    again only once :attr:`hold_down` seconds have passed since it died *and* its last
    :attr:`n_good` probes in a row were answered (a failed probe restarts the count, not
    the hold-down). Fail-back flaps without this: an AP that drops every few seconds would
    win every re-probe in between. Keys are AP ids.
    """

    n_good: int = N_GOOD
    hold_down: float = HOLD_DOWN
    _died: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _streak: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _hold: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    def mark_dead(self, key: str, now: float, hold_down: float | None = None) -> None:
        """``key`` was declared dead at ``now`` (held down ``hold_down`` s, default
        :attr:`hold_down`)."""
        self._died[key] = now
        self._streak[key] = 0
        self._hold[key] = self.hold_down if hold_down is None else hold_down

    def record(self, key: str, ok: bool, now: float) -> bool:
        """Count one probe of ``key`` (answered or not); whether it is usable afterwards."""
        if key in self._died:
            self._streak[key] = self._streak[key] + 1 if ok else 0
        return self.usable(key, now)

    def usable(self, key: str, now: float) -> bool:
        """Whether ``key`` may be chosen at ``now``; forgets a recovered AP's history."""
        died = self._died.get(key)
        if died is None:
            return True
        if now - died >= self._hold[key] and self._streak[key] >= self.n_good:
            del self._died[key], self._streak[key], self._hold[key]
            return True
        return False

    def is_held(self, key: str) -> bool:
        """Whether ``key`` is marked dead and not yet recovered."""
        return key in self._died

    def observe(self, ranking: Iterable[ProbeResult], now: float) -> list[str]:
        """Count a probe round's probes of the held-down APs (once per round); the ids of
        those that are usable again after it."""
        back = []
        for r in ranking:
            key = r.ap.id
            if not self.is_held(key):
                continue
            if r.received < r.sent:
                self.record(key, False, now)
            for _ in range(r.received):
                self.record(key, True, now)
            if self.usable(key, now):
                back.append(key)
        return back


__all__ = [
    "HOLD_DOWN",
    "MIN_GAIN_ABS",
    "MIN_GAIN_REL",
    "NONCE_BYTES",
    "N_GOOD",
    "PROBE_COUNT",
    "PROBE_SPACING",
    "UDP_MAGIC",
    "Hysteresis",
    "ProbeFailed",
    "ProbeOnce",
    "ProbeResult",
    "Ranking",
    "open_icmp_socket",
    "probe_address",
    "probe_all",
    "probe_once",
    "rank",
    "should_switch",
]
