"""A bounded stream of short TCP connections both ways through a lab, to measure faults.

:class:`ConnectionStream` runs a client in A that opens a NEW connection (so a new conntrack
entry, which is what sdnsup steers) to a :mod:`~sdnsup.lab.whoami` server in B every
``interval`` seconds, and a client in B doing the same to a server in A on A's LAN address.
Each connection must connect and bring the server's greeting within ``timeout``:

* A -> B: B's greeting names the source address B saw, so each attempt tells which path it
  took (with sdnsup steering, an AP's overlay address; A's own address on the normal route).
* B -> A: the seed's hard problem. A reply to an inbound connection steered into the overlay
  leaves masqueraded by the AP, B drops it and the connection fails.

The clients are small stdlib-only scripts (``python -c``) that multiplex their attempts with
``selectors``, so many attempts can be in flight while a path is dark, and write one JSON line
per finished attempt to a file the stream reads. Both end on their own after ``max_seconds``.
Timestamps are ``time.monotonic()`` in every process: CLOCK_MONOTONIC is one clock for the
whole machine (``ip netns exec`` creates no time namespace), so they compare across processes.

Usage::

    with ConnectionStream(lab) as stream:
        stream.mark("rule deleted")
        lab.exec(lab.ns_a, "ip", "rule", "del", "pref", "7300")
        seconds = stream.wait_healthy(10, via={str(lab.ap(1).overlay_addr)})
    report = stream.report()
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from sdnsup.lab.commands import LabError
from sdnsup.lab.services import stop_processes

if TYPE_CHECKING:
    from sdnsup.lab.processes import Lab

A_TO_B = "a->b"
B_TO_A = "b->a"
DIRECTIONS = (A_TO_B, B_TO_A)

# Away from the whoami port tests use (8080), so a stream can run next to their servers.
DEFAULT_STREAM_PORT = 8181
# Until both directions have worked once, a fault measured would mean nothing.
START_TIMEOUT = 10.0
# How many failure reasons a report keeps per direction, for assertion messages.
MAX_FAILURES_KEPT = 5
# Polling step of wait_healthy: well below the attempt interval, cheap for the reader.
POLL_STEP = 0.02
# After max_seconds a client stops starting attempts; those in flight end within `timeout`.
# Margin for the interpreter start-up on a loaded machine before the client's clock starts.
EXIT_MARGIN = 5.0

# One client: a NEW TCP connection to host:port every interval (hosts in turn when argv[1]
# lists several, comma-separated), non-blocking and multiplexed so that a dark path does not
# delay later attempts; one JSON line per finished attempt: seq, t0/t1 (monotonic start/end),
# ok, seen (the greeting: the peer address the server saw) or err (why it failed). Stdlib
# only: it starts in tens of milliseconds.
CLIENT = r"""
import errno, json, os, selectors, socket, sys, time
hosts, port = sys.argv[1].split(","), int(sys.argv[2])
interval, timeout, seconds = float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
family = socket.AF_INET6 if ":" in hosts[0] else socket.AF_INET
sel = selectors.DefaultSelector()
pending = {}  # socket -> [seq, t0, buffer]
out = sys.stdout

def finish(sock, ok, seen=None, err=None):
    seq, t0, _ = pending.pop(sock)
    try:
        sel.unregister(sock)
    except (KeyError, ValueError):
        pass
    sock.close()
    rec = {"seq": seq, "t0": t0, "t1": time.monotonic(), "ok": ok}
    rec["seen" if ok else "err"] = seen if ok else err
    out.write(json.dumps(rec) + "\n")
    out.flush()

start = time.monotonic()
until = start + seconds
next_start = start
seq = 0
while True:
    now = time.monotonic()
    if now >= until and not pending:
        break
    if now >= next_start and now < until:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        pending[sock] = [seq, now, b""]
        seq += 1
        next_start += interval
        if next_start < now:  # fell behind (a stalled machine): do not burst to catch up
            next_start = now + interval
        code = sock.connect_ex((hosts[(seq - 1) % len(hosts)], port))
        if code in (0, errno.EINPROGRESS):
            sel.register(sock, selectors.EVENT_WRITE)
        else:
            finish(sock, False, err="connect: " + os.strerror(code))
    now = time.monotonic()
    for sock, (_, t0, _) in list(pending.items()):
        if now - t0 > timeout:
            phase = "greeting" if sel.get_key(sock).events == selectors.EVENT_READ else "connect"
            finish(sock, False, err="timeout waiting for " + phase)
    wake = [next_start] if next_start < until else []
    wake += [t0 + timeout for _, t0, _ in pending.values()]
    if not wake:
        continue
    for key, events in sel.select(max(0.0, min(wake) - time.monotonic())):
        sock = key.fileobj
        if sock not in pending:
            continue
        if key.events == selectors.EVENT_WRITE:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                finish(sock, False, err="connect: " + os.strerror(code))
            else:
                sel.modify(sock, selectors.EVENT_READ)
            continue
        try:
            data = sock.recv(256)
        except OSError as exc:
            finish(sock, False, err="greeting: " + (exc.strerror or str(exc)))
            continue
        if not data:
            finish(sock, False, err="closed before the greeting")
            continue
        pending[sock][2] += data
        if b"\n" in pending[sock][2]:
            line = pending[sock][2].split(b"\n", 1)[0]
            finish(sock, True, seen=line.decode("utf-8", "replace").strip())
"""


@dataclass(frozen=True)
class Attempt:
    """One connection attempt of a stream, as its client reported it."""

    direction: str
    seq: int
    t0: float  # time.monotonic() when it started
    t1: float  # when it succeeded or failed
    ok: bool
    seen: str | None = None  # the greeting: the source address the server saw
    err: str | None = None


@dataclass(frozen=True)
class StreamReport:
    """The figures of a :class:`ConnectionStream` so far."""

    attempted: int
    failed: int
    by_direction: dict[str, tuple[int, int]]  # "a->b" / "b->a" -> (attempted, failed)
    # Seconds from the last mark() to the first success of the healthy streak, max over the
    # directions; 0.0 when no attempt ending after the mark failed (nor, with `via`, took
    # another path); None with no mark, or when a direction has not recovered yet.
    recovery: float | None
    failures: tuple[str, ...]  # the first few failure reasons, for assertion messages
    # How many successful A -> B connections B saw from each source address.
    seen_by_b: dict[str, int] = field(default_factory=dict)
    label: str | None = None  # the last mark's label

    def __str__(self) -> str:
        dirs = ", ".join(f"{d} {n} attempted {f} failed" for d, (n, f) in self.by_direction.items())
        rec = "not recovered" if self.recovery is None else f"recovered in {self.recovery:.3f} s"
        seen = ", ".join(f"{a} x{n}" for a, n in sorted(self.seen_by_b.items()))
        lines = [f"stream after {self.label!r}: {dirs}; {rec}; B saw {seen or 'nothing'}"]
        lines += [f"  {reason}" for reason in self.failures]
        return "\n".join(lines)


@dataclass
class _Client:
    direction: str
    proc: subprocess.Popen[bytes]
    path: Path
    reader: IO[str]
    partial: str = ""
    noise: list[str] = field(default_factory=list)
    attempts: dict[int, Attempt] = field(default_factory=dict)


class ConnectionStream:
    """A bounded stream of short TCP connections, both ways: A -> B (to a whoami server in B)
    and B -> A (to a server in A on A's LAN address), a NEW connection (new conntrack entry)
    every ``interval`` s per direction; each must connect and get its greeting within
    ``timeout``.

    ``family`` 6 connects to B's and A's IPv6 addresses instead (B then sees an AP's IPv6
    overlay address). ``b_hosts``: addresses of B that A connects to in turn (several
    destinations, e.g. extra addresses the test gave B), instead of its main one. Use it as a
    context manager: entering starts the servers (on ``port``, dual-stack) and the clients
    and waits until both directions have succeeded once; leaving
    stops everything it started. The clients end on their own after ``max_seconds``. Not
    thread-safe.

    Raises:
        LabError: on entering, a direction did not work within START_TIMEOUT seconds.
    """

    def __init__(
        self,
        lab: Lab,
        *,
        interval: float = 0.05,
        timeout: float = 1.0,
        max_seconds: float = 120.0,
        port: int = DEFAULT_STREAM_PORT,
        family: int = 4,
        b_hosts: Collection[object] = (),
    ) -> None:
        if interval <= 0 or timeout <= 0 or max_seconds <= 0:
            raise ValueError("interval, timeout and max_seconds must be positive")
        if family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, not {family}")
        self.family = family
        self.b_hosts = [str(h) for h in b_hosts]
        self.lab = lab
        self.interval = interval
        self.timeout = timeout
        self.max_seconds = max_seconds
        self.port = port
        self._servers: list[subprocess.Popen[bytes]] = []
        self._clients: dict[str, _Client] = {}
        self._mark: tuple[str, float] | None = None
        self._via: frozenset[str] | None = None
        self._started = time.monotonic()

    # --- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> ConnectionStream:
        lab = self.lab
        if lab.tmpdir is None or not lab.is_up:
            raise LabError("a ConnectionStream needs a lab that is up")
        try:
            self._servers.append(lab.serve_whoami(lab.ns_b, self.port))
            self._servers.append(lab.serve_whoami(lab.ns_a, self.port))
            b_addr, a_addr = (
                (lab.b_addr, lab.a_addr) if self.family == 4 else (lab.b_addr6, lab.a_addr6)
            )
            self._start_client(A_TO_B, lab.ns_a, ",".join(self.b_hosts or [str(b_addr)]))
            self._start_client(B_TO_A, lab.ns_b, str(a_addr))
            self._wait_started()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_started(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not all(self._successes(d) for d in DIRECTIONS):
            if time.monotonic() > deadline:
                raise LabError(
                    f"the connection stream did not start within {START_TIMEOUT:.0f} s:\n"
                    f"{self.report()}{self._noise()}"
                )
            time.sleep(POLL_STEP)

    def __exit__(self, *exc: object) -> None:
        stop_processes([c.proc for c in self._clients.values()] + self._servers, grace=1.0)
        self._collect()  # the last lines, so report() after exit has every attempt
        for client in self._clients.values():
            client.reader.close()
        self._servers.clear()

    def _start_client(self, direction: str, ns: str, host: str) -> None:
        assert self.lab.tmpdir is not None
        tag = direction.replace("->", "to")
        path = self.lab.tmpdir / f"stream-{tag}-{self.port}-{time.monotonic_ns()}.jsonl"
        argv = [sys.executable, "-c", CLIENT, host, str(self.port)]
        argv += [str(self.interval), str(self.timeout), str(self.max_seconds)]
        with open(path, "wb") as out:
            proc = self.lab.popen(
                ns, *argv, label=f"stream-{tag}", stdout=out, stderr=subprocess.STDOUT
            )
        self._clients[direction] = _Client(
            direction, proc, path, open(path, encoding="utf-8", errors="replace")
        )

    # --- reading the clients' lines ---------------------------------------------------------

    def _collect(self) -> None:
        for client in self._clients.values():
            if client.reader.closed:
                continue
            text = client.partial + client.reader.read()
            lines = text.split("\n")
            client.partial = lines.pop()  # a line being written is read next time
            for line in lines:
                try:
                    rec: dict[str, Any] = json.loads(line)
                except ValueError:
                    if line.strip() and len(client.noise) < MAX_FAILURES_KEPT:
                        client.noise.append(line.strip())  # stderr: a traceback, a warning
                    continue
                attempt = Attempt(
                    direction=client.direction,
                    seq=int(rec["seq"]),
                    t0=float(rec["t0"]),
                    t1=float(rec["t1"]),
                    ok=bool(rec["ok"]),
                    seen=rec.get("seen"),
                    err=rec.get("err"),
                )
                client.attempts[attempt.seq] = attempt

    def attempts(self, direction: str) -> list[Attempt]:
        """The finished attempts of ``direction`` in the order they started, up to the first
        one still in flight (so a streak is never judged past an attempt that may yet fail)."""
        self._collect()
        done = self._clients[direction].attempts if direction in self._clients else {}
        out = []
        for seq in range(len(done)):
            attempt = done.get(seq)
            if attempt is None:
                break
            out.append(attempt)
        return out

    def _successes(self, direction: str) -> int:
        return sum(a.ok for a in self.attempts(direction))

    def last_seen_by_b(self) -> str | None:
        """The source address B saw on the newest successful A -> B connection."""
        for attempt in reversed(self.attempts(A_TO_B)):
            if attempt.ok:
                return attempt.seen
        return None

    # --- faults and recovery ------------------------------------------------------------------

    def mark(self, label: str) -> None:
        """Note that a fault is injected now; recovery is measured from the last mark."""
        self._mark = (label, time.monotonic())
        self._via = None

    def _good(self, attempt: Attempt) -> bool:
        if not attempt.ok:
            return False
        return attempt.direction != A_TO_B or self._via is None or attempt.seen in self._via

    def _recovery(self, direction: str, streak: int) -> float | None:
        """Seconds from the mark to the first success of a trailing run of at least ``streak``
        good attempts among those that ended after the mark; 0.0 when none of those went
        wrong (and ``streak`` of them succeeded); None when not recovered (yet)."""
        if self._mark is None:
            return None
        marked = self._mark[1]
        after = [a for a in self.attempts(direction) if a.t1 >= marked]
        run = 0
        for attempt in reversed(after):
            if not self._good(attempt):
                break
            run += 1
        if run < streak:
            return None
        if run == len(after):
            return 0.0
        return after[len(after) - run].t1 - marked

    def wait_healthy(
        self, timeout: float, streak: int = 5, *, via: Collection[str] | None = None
    ) -> float:
        """Block until, after the last mark, ``streak`` consecutive attempts succeeded in each
        direction, and return the recovery seconds (see :class:`StreamReport`).

        Args:
            timeout: seconds to wait at most.
            streak: consecutive good attempts needed in each direction.
            via: when given, an A -> B success counts only if B saw one of these source
                addresses (the path sdnsup should use); report() then measures the same way.

        Raises:
            LabError: not healthy within ``timeout``; the message holds the report.
            ValueError: no mark() was made.
        """
        if self._mark is None:
            raise ValueError("wait_healthy() measures from a mark(): call mark() first")
        self._via = frozenset(via) if via is not None else None
        deadline = time.monotonic() + timeout
        while True:
            values = [self._recovery(d, streak) for d in DIRECTIONS]
            if all(v is not None for v in values):
                return max(v for v in values if v is not None)
            if time.monotonic() > deadline:
                want = f" through {', '.join(sorted(self._via))}" if self._via else ""
                raise LabError(
                    f"no {streak} good connections in a row{want} in each direction within "
                    f"{timeout:.1f} s of {self._mark[0]!r}:\n{self.report()}"
                )
            if any(c.proc.poll() is not None for c in self._clients.values()):
                raise LabError(
                    f"a stream client ended (max_seconds?):\n{self.report()}{self._noise()}"
                )
            time.sleep(POLL_STEP)

    def stay_healthy(self, seconds: float) -> None:
        """Watch the stream for ``seconds`` (after :meth:`wait_healthy`): every attempt that
        finishes meanwhile must be good (same ``via`` rule), so service came back for good.

        Raises:
            LabError: an attempt went wrong; the message holds the report.
        """
        seen = {d: len(self.attempts(d)) for d in DIRECTIONS}
        deadline = time.monotonic() + seconds
        while True:
            for direction in DIRECTIONS:
                bad = [a for a in self.attempts(direction)[seen[direction] :] if not self._good(a)]
                if bad:
                    what = bad[0].err or f"went through {bad[0].seen}"
                    raise LabError(
                        f"{direction} #{bad[0].seq} went wrong after recovery ({what}):\n"
                        f"{self.report()}"
                    )
            if time.monotonic() > deadline:
                return
            time.sleep(POLL_STEP)

    def report(self, streak: int = 1) -> StreamReport:
        """The figures so far (while running and after exit); recovery as of now, with a
        healthy streak of ``streak`` attempts (the one wait_healthy confirmed, by default)."""
        by_direction: dict[str, tuple[int, int]] = {}
        failures: list[str] = []
        seen: Counter[str] = Counter()
        recoveries: list[float | None] = []
        for direction in DIRECTIONS:
            attempts = self.attempts(direction) if direction in self._clients else []
            bad = [a for a in attempts if not a.ok]
            by_direction[direction] = (len(attempts), len(bad))
            failures += [
                f"{direction} #{a.seq} at {self._since(a):+.3f} s: {a.err}"
                for a in bad[:MAX_FAILURES_KEPT]
            ]
            if direction == A_TO_B:
                seen.update(a.seen for a in attempts if a.ok and a.seen)
            recoveries.append(self._recovery(direction, streak))
        recovery = None
        if all(r is not None for r in recoveries):
            recovery = max(r for r in recoveries if r is not None)
        return StreamReport(
            attempted=sum(n for n, _ in by_direction.values()),
            failed=sum(f for _, f in by_direction.values()),
            by_direction=by_direction,
            recovery=recovery,
            failures=tuple(failures),
            seen_by_b=dict(seen),
            label=self._mark[0] if self._mark else None,
        )

    def _since(self, attempt: Attempt) -> float:
        """When ``attempt`` ended, relative to the last mark (or to the stream's start)."""
        return attempt.t1 - (self._mark[1] if self._mark is not None else self._started)

    def _noise(self) -> str:
        """What the clients printed that is not an attempt (a traceback), for error messages."""
        lines = [f"{c.direction}: {n}" for c in self._clients.values() for n in c.noise]
        return "".join(f"\n  {line}" for line in lines[:MAX_FAILURES_KEPT])


__all__ = ["A_TO_B", "B_TO_A", "Attempt", "ConnectionStream", "StreamReport"]
