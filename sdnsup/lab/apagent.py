"""``python -P sdnsup/lab/apagent.py serve``: the probe agent the lab runs in each AP namespace.

The lab's kernel has no ``netem`` qdisc, so latency differences between APs are made here:
every probe is answered ``delay`` seconds after it arrived.

* UDP echo on port 7300 (dual-stack): each datagram (up to 1 KiB) is sent back to its sender
  after ``delay``; sdnsup's ``udp`` probe (``b"SDP1"`` + a 16-byte nonce) expects exactly that.
* TCP on port 7301 (dual-stack): ``GET /health`` is answered ``200 OK`` after ``delay``,
  any other path ``404``; a plain connect that sends nothing (sdnsup's ``tcp`` probe) is
  accepted by the kernel and closed when the client closes.
* ``--control FILE``: JSON ``{"delay": 0.04, "drop": false}``, re-read whenever its
  mtime/inode/size change (one ``stat`` per request). ``drop: true`` stops answering udp and
  http probes without closing any socket: requests are read and forgotten, which is what
  a hung AP looks like. Write it atomically (temp file + rename, :func:`write_control`);
  a missing or malformed file keeps the last good settings.

One thread runs a selector loop with a heap of due replies, so a thousand concurrent probes
each wait their own ``delay``, not each other's. Connections are bounded in number and idle
time. The lab waits for ``--ready-file`` (created once both ports listen), then checks from
A's namespace with ``apagent.py check ADDR...`` that every agent answers.

Standard library only, run by path with ``python -P`` like :mod:`sdnsup.lab.whoami`.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import json
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

UDP_PORT = 7300
TCP_PORT = 7301
HEALTH_PATH = "/health"
MAX_DATAGRAM = 1024
MAX_REQUEST = 8192
MAX_CONNECTIONS = 1024
# A probe connection that neither finishes its request nor closes within this is dropped.
IDLE_TIMEOUT = 30.0
# The longest delay accepted from the control file (a typo must not hang the lab's tests).
MAX_DELAY = 60.0


def write_control(path: Path, delay: float = 0.0, drop: bool = False) -> None:
    """Atomically write an agent's control file (temp file in the same dir, then rename)."""
    if not 0 <= delay <= MAX_DELAY:
        raise ValueError(f"delay must be between 0 and {MAX_DELAY} s, not {delay}")
    data = json.dumps({"delay": delay, "drop": drop}).encode()
    # Imported here, not at the top: this file also runs alone as a server (python -P),
    # which must start fast and never needs to write its own control file.
    from sdnsup.lab.commands import write_atomic

    write_atomic(path, data)


class Control:
    """The agent's settings, re-read from the control file when it changed."""

    def __init__(self, path: Path | None, delay: float = 0.0) -> None:
        self.path = path
        self.delay = delay
        self.drop = False
        self._stamp: tuple[int, int, int] | None = None
        self.refresh()

    def refresh(self) -> None:
        """stat the file; reload it if its mtime, inode or size changed."""
        if self.path is None:
            return
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return
        stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            data = json.loads(self.path.read_text())
            delay = float(data.get("delay", self.delay))
            drop = bool(data.get("drop", False))
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log(f"control file {self.path}: {exc}; keeping delay={self.delay} drop={self.drop}")
            return
        if not 0 <= delay <= MAX_DELAY:
            log(f"control file {self.path}: delay {delay} out of range; ignored")
            return
        if (delay, drop) != (self.delay, self.drop):
            log(f"control: delay={delay * 1000:.1f} ms drop={drop}")
        self.delay, self.drop = delay, drop


def log(message: str) -> None:
    print(f"apagent: {message}", file=sys.stderr, flush=True)


def _listen(kind: int, port: int, host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(512)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Conn:
    """One accepted TCP connection and what was read from it."""

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.buf = b""
        self.last = now
        self.answered = False  # a reply is scheduled or was dropped: read and discard the rest
        self.closed = False


class Agent:
    """The selector loop: UDP echo, HTTP health, scheduled replies, idle connections."""

    def __init__(self, control: Control, host: str, udp_port: int, tcp_port: int) -> None:
        self.control = control
        self.udp = _listen(socket.SOCK_DGRAM, udp_port, host)
        try:
            self.tcp = _listen(socket.SOCK_STREAM, tcp_port, host)
        except BaseException:
            self.udp.close()
            raise
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.udp, selectors.EVENT_READ, self._on_udp)
        self.sel.register(self.tcp, selectors.EVENT_READ, self._on_accept)
        self.conns: dict[int, _Conn] = {}
        self.due: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.counts = {"udp": 0, "http": 0, "dropped": 0}

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn)
        self.sel.close()
        self.udp.close()
        self.tcp.close()

    def _later(self, delay: float, action: Callable[[], None]) -> None:
        heapq.heappush(self.due, (time.monotonic() + delay, next(self._seq), action))

    # --- udp -------------------------------------------------------------------------------

    def _on_udp(self) -> None:
        for _ in range(256):  # drain a burst, but let the rest of the loop run too
            try:
                data, peer = self.udp.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. an ICMP error queued by a previous sendto
                log(f"udp recv: {exc}")
                return
            self.control.refresh()
            if self.control.drop:
                self.counts["dropped"] += 1
                continue
            self.counts["udp"] += 1
            self._later(self.control.delay, self._udp_sender(data, peer))

    def _udp_sender(self, data: bytes, peer: tuple[str, int]) -> Callable[[], None]:
        return lambda: self._udp_send(data, peer)

    def _udp_send(self, data: bytes, peer: tuple[str, int]) -> None:
        try:
            self.udp.sendto(data, peer)
        except OSError as exc:  # the prober is gone, a full buffer: it is only a probe
            log(f"udp send to {peer[0]}: {exc}")

    # --- tcp / http ------------------------------------------------------------------------

    def _on_accept(self) -> None:
        for _ in range(64):
            try:
                sock, _peer = self.tcp.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ECONNABORTED, EMFILE...
                log(f"accept: {exc}")
                return
            if len(self.conns) >= MAX_CONNECTIONS:
                sock.close()
                continue
            sock.setblocking(False)
            conn = _Conn(sock, time.monotonic())
            self.conns[sock.fileno()] = conn
            self.sel.register(sock, selectors.EVENT_READ, lambda c=conn: self._on_read(c))

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.conns.pop(conn.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn.sock)
        conn.sock.close()

    def _on_read(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not chunk:  # the client closed: a tcp probe, or an http prober that gave up
            self._close(conn)
            return
        conn.last = time.monotonic()
        if conn.answered:
            return
        conn.buf += chunk
        if b"\r\n\r\n" not in conn.buf and b"\n\n" not in conn.buf:
            if len(conn.buf) > MAX_REQUEST:
                self._reply(conn, 431, "request too large\n")
            return
        conn.answered = True
        self.control.refresh()
        if self.control.drop:
            self.counts["dropped"] += 1
            return  # keep the connection open and silent, like a hung AP
        self.counts["http"] += 1
        parts = conn.buf.split(b"\n", 1)[0].decode("latin-1").split()
        if len(parts) >= 2 and parts[0] in ("GET", "HEAD") and parts[1] == HEALTH_PATH:
            status, body = 200, "ok\n"
        elif len(parts) >= 2 and parts[0] in ("GET", "HEAD"):
            status, body = 404, "not found\n"
        else:
            status, body = 400, "bad request\n"
        self._later(self.control.delay, lambda: self._reply(conn, status, body))

    def _reply(self, conn: _Conn, status: int, body: str) -> None:
        if conn.closed:
            return
        reasons = {200: "OK", 400: "Bad Request", 404: "Not Found", 431: "Too Large"}
        head = (
            f"HTTP/1.0 {status} {reasons.get(status, 'Error')}\r\n"
            "Content-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(OSError):
            # A few hundred bytes always fit in a fresh socket's send buffer.
            conn.sock.send((head + body).encode())
        self._close(conn)

    # --- the loop --------------------------------------------------------------------------

    def _expire_idle(self, now: float) -> None:
        for conn in [c for c in self.conns.values() if now - c.last > IDLE_TIMEOUT]:
            self._close(conn)

    def run(self) -> None:
        next_idle_check = time.monotonic() + 1.0
        while True:
            now = time.monotonic()
            timeout = min(next_idle_check, self.due[0][0] if self.due else now + 1.0) - now
            for key, _events in self.sel.select(max(0.0, timeout)):
                key.data()
            now = time.monotonic()
            while self.due and self.due[0][0] <= now:
                _, _, action = heapq.heappop(self.due)
                action()
            if now >= next_idle_check:
                self._expire_idle(now)
                next_idle_check = now + 1.0


# --- check: does every agent answer (run from A's namespace) -----------------------------------


def check(addrs: list[str], udp_port: int, tcp_port: int, timeout: float) -> list[str]:
    """Addresses whose agent did not answer a udp echo and ``GET /health`` within ``timeout``."""
    deadline = time.monotonic() + timeout
    missing = list(addrs)
    while missing and time.monotonic() < deadline:
        missing = [a for a in missing if not _answers(a, udp_port, tcp_port, deadline)]
        if missing:
            time.sleep(0.02)
    return missing


def _answers(addr: str, udp_port: int, tcp_port: int, deadline: float) -> bool:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    wait = max(0.05, min(1.0, deadline - time.monotonic()))
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as u:
            u.settimeout(wait)
            u.connect((addr, udp_port))
            nonce = b"SDP1" + os.urandom(16)
            u.send(nonce)
            if u.recv(MAX_DATAGRAM) != nonce:
                return False
        with socket.create_connection((addr, tcp_port), timeout=wait) as t:
            t.sendall(f"GET {HEALTH_PATH} HTTP/1.0\r\n\r\n".encode())
            return t.recv(64).startswith(b"HTTP/1.0 200")
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apagent.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the agent")
    serve.add_argument("--host", default="::", help="address to bind (default :: dual-stack)")
    serve.add_argument("--control", type=Path, help="JSON control file, re-read on change")
    serve.add_argument("--delay", type=float, default=0.0, help="initial delay in seconds")
    serve.add_argument("--ready-file", type=Path, help="created once both ports listen")
    chk = sub.add_parser("check", help="exit 0 once every agent at ADDR... answers")
    chk.add_argument("addrs", nargs="+")
    chk.add_argument("--timeout", type=float, default=5.0)
    for p in (serve, chk):
        p.add_argument("--udp-port", type=int, default=UDP_PORT)
        p.add_argument("--tcp-port", type=int, default=TCP_PORT)
    args = parser.parse_args(argv)

    if args.command == "check":
        missing = check(args.addrs, args.udp_port, args.tcp_port, args.timeout)
        for addr in missing:
            print(f"agent at {addr} does not answer", file=sys.stderr)
        return 1 if missing else 0

    agent = Agent(Control(args.control, args.delay), args.host, args.udp_port, args.tcp_port)
    log(
        f"listening on [{args.host}] udp {args.udp_port}, tcp {args.tcp_port}; "
        f"delay={agent.control.delay * 1000:.1f} ms drop={agent.control.drop}"
    )
    # The lab stops its processes with SIGTERM: exit through `finally` to log the counts.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.ready_file is not None:
        args.ready_file.touch()
    try:
        agent.run()
    except KeyboardInterrupt:
        pass
    finally:
        log(f"answered {agent.counts}")
        agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
