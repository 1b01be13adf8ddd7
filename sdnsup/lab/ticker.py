"""``python sdnsup/lab/ticker.py ADDR PORT``: a long-lived connection that counts what it loses.

The client side of :mod:`sdnsup.lab.whoami` for the question "did this connection survive?":

* default (``--interval 0.1``): one TCP connection that sends ``tick N`` every interval and
  waits for the server's ``peer <addr> tick N``, like an SSH session or a database pool that
  talks all the time;
* ``--idle``: one TCP connection that sends nothing and sits in a blocking ``recv()``, like
  a pool connection waiting for its next query; when that ``recv()`` fails, the client
  reconnects (every 50 ms, each attempt bounded by ``--timeout``) until a new connection
  brings its greeting.

It writes one JSON line per event to stdout, with ``time.monotonic()`` timestamps (one
clock for every process of the machine): ``{"ev": "open", "t": .., "peer": "10.10.10.11"}``
(the address the server saw: which AP carried it), ``{"ev": "tick", "seq": N, "t": ..,
"rtt": .., "peer": ..}`` for each answered line, ``{"ev": "late", "seq": N, "t": ..}`` for a
line unanswered within ``--timeout``, ``{"ev": "error", "t": .., "err": "ECONNRESET",
"text": ..}`` when the connection breaks, ``{"ev": "reopen", "t": .., "peer": ..}`` when an
idle client reconnected, and ``{"ev": "end", "t": .., "sent": N, "answered": N}`` at the end.
It stops on SIGTERM, when stdin closes, after ``--seconds``, or (ticking) when the
connection breaks. Stdlib only, so it starts in tens of milliseconds.
"""

from __future__ import annotations

import argparse
import errno
import json
import signal
import socket
import sys
import threading
import time


def emit(**event: object) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def connect(addr: str, port: int, timeout: float) -> tuple[socket.socket, str]:
    sock = socket.create_connection((addr, port), timeout=timeout)
    greeting = sock.makefile("rb").readline()
    if not greeting:
        sock.close()
        raise ConnectionResetError(errno.ECONNRESET, "closed before its greeting")
    return sock, greeting.decode().strip()


def tick(sock: socket.socket, interval: float, timeout: float, stop: threading.Event) -> None:
    sent = answered = 0
    buf = b""
    sock.settimeout(0.02)
    due = time.monotonic()
    waiting: dict[int, float] = {}  # seq -> sent at
    while not stop.is_set():
        now = time.monotonic()
        if now >= due:
            sent += 1
            try:
                sock.sendall(f"tick {sent}\n".encode())
            except OSError as exc:
                emit(ev="error", t=time.monotonic(), err=_errname(exc), text=str(exc))
                break
            waiting[sent] = now
            due += interval
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            chunk = None
        except OSError as exc:
            emit(ev="error", t=time.monotonic(), err=_errname(exc), text=str(exc))
            break
        if chunk == b"":
            emit(ev="error", t=time.monotonic(), err="EOF", text="closed by the server")
            break
        if chunk:
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                parts = line.decode(errors="replace").split()
                if len(parts) == 4 and parts[0] == "peer" and parts[2] == "tick":
                    seq = int(parts[3])
                    at = waiting.pop(seq, None)
                    if at is not None:
                        answered += 1
                        now = time.monotonic()
                        emit(ev="tick", seq=seq, t=now, rtt=round(now - at, 4), peer=parts[1])
        now = time.monotonic()
        for seq, at in sorted(waiting.items()):
            if now - at > timeout:
                del waiting[seq]
                emit(ev="late", seq=seq, t=now)
    emit(ev="end", t=time.monotonic(), sent=sent, answered=answered)


def idle(sock: socket.socket, addr: str, port: int, timeout: float, stop: threading.Event) -> None:
    sock.settimeout(None)
    try:
        data = sock.recv(65536)
        if stop.is_set():
            return
        err, text = ("EOF", "closed by the server") if not data else ("DATA", repr(data))
    except OSError as exc:
        err, text = _errname(exc), str(exc)
    emit(ev="error", t=time.monotonic(), err=err, text=text)
    while not stop.is_set():
        try:
            again, peer = connect(addr, port, timeout)
        except OSError:
            time.sleep(0.05)
            continue
        emit(ev="reopen", t=time.monotonic(), peer=peer)
        again.close()
        return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("addr")
    parser.add_argument("port", type=int)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=600.0, help="stop after this long")
    parser.add_argument("--idle", action="store_true", help="block in recv(), then reconnect")
    args = parser.parse_args(argv)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def watch_stdin() -> None:
        sys.stdin.read()  # returns at EOF: the driver closed it
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    timer = threading.Timer(args.seconds, stop.set)
    timer.daemon = True
    timer.start()
    try:
        sock, peer = connect(args.addr, args.port, args.timeout)
    except OSError as exc:
        emit(ev="error", t=time.monotonic(), err=_errname(exc), text=f"connect: {exc}")
        return 1
    emit(ev="open", t=time.monotonic(), peer=peer)
    worker = threading.Thread(
        target=idle if args.idle else tick,
        args=(sock, args.addr, args.port, args.timeout, stop)
        if args.idle
        else (sock, args.interval, args.timeout, stop),
        daemon=True,
    )
    worker.start()
    while worker.is_alive() and not stop.is_set():
        worker.join(0.05)
    stop.set()
    worker.join(args.timeout + 1)
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
