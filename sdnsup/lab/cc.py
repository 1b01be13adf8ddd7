"""``python -P sdnsup/lab/cc.py --control FILE``: the lab's control center (CC).

Serves ``GET /v1/aps`` (the CC protocol of the design, section 4) from a JSON control file
that is re-read on every request, so a test changes the CC's behaviour by rewriting it
(atomically: :func:`write_control`)::

    {"mode": "ok", "answer": {"aps": [...], "ttl": 60}, "slow_seconds": 10}

``mode`` is one of:

``ok``        ``200`` with ``answer`` as JSON.
``500``       ``500 Internal Server Error`` with a short text body.
``garbage``   ``200``, ``Content-Type: application/json``, and a body that is not JSON.
``slow``      waits ``slow_seconds``, then answers like ``ok`` (a client's timeout fires).
``oversize``  ``200`` streaming about 2 MiB of *valid* JSON (``answer`` padded with junk
              APs) without ``Content-Length``: only a client that bounds what it reads
              rejects it.

A refused connection is made by stopping the process. With ``--token-file``, requests
without ``Authorization: Bearer <token>`` get ``401`` (the file is re-read per request).
Other paths get ``404``. One line per request goes to stderr: client address, method, path,
status and the wall-clock time (``cc: 172.31.1.2 GET /v1/aps 200 at 1764645000.123``).
``--ready-file`` is created once the server listens.

Standard library only, run by path with ``python -P`` like :mod:`sdnsup.lab.whoami`.
"""

from __future__ import annotations

import argparse
import hmac
import json
import signal
import socket
import sys
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MODES = ("ok", "500", "garbage", "slow", "oversize")
OVERSIZE_BYTES = 2 * 1024 * 1024
DEFAULT_SLOW_SECONDS = 10.0


def write_control(
    path: Path,
    mode: str = "ok",
    answer: Mapping[str, Any] | None = None,
    slow_seconds: float = DEFAULT_SLOW_SECONDS,
) -> None:
    """Atomically write the CC's control file (temp file in the same dir, then rename)."""
    if mode not in MODES:
        raise ValueError(f"CC mode must be one of {', '.join(MODES)}, not {mode!r}")
    data = json.dumps(
        {"mode": mode, "answer": dict(answer or {}), "slow_seconds": slow_seconds}
    ).encode()
    # Imported here, not at the top: this file also runs alone as a server (python -P),
    # which must start fast and never needs to write its own control file.
    from sdnsup.lab.commands import write_atomic

    write_atomic(path, data)


class CCHandler(BaseHTTPRequestHandler):
    server: CCServer
    server_version = "sdnsup-lab-cc/1"
    protocol_version = "HTTP/1.0"  # one request per connection: simple, and what tests want

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # _log writes the one line per request, with the path; the stdlib's would repeat it.
        return

    def log_message(self, format: str, *args: Any) -> None:
        # Still reached by log_error (malformed requests): keep it, on one line.
        print(f"cc: {self.client_address[0]} {format % args}", file=sys.stderr, flush=True)

    def _log(self, status: int) -> None:
        peer = self.client_address[0]
        line = f"cc: {peer} {self.command} {self.path} {status} at {time.time():.3f}"
        print(line, file=sys.stderr, flush=True)

    def _send(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self._log(status)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="sdnsup-lab"')
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        token_file = self.server.token_file
        if token_file is None:
            return True
        try:
            token = token_file.read_text().strip()
        except OSError:
            return False
        given = self.headers.get("Authorization", "")
        return bool(token) and hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/v1/aps":
            self._send(404, b"not found\n")
            return
        if not self._authorized():
            self._send(401, b"missing or wrong bearer token\n")
            return
        try:
            control = json.loads(self.server.control.read_text())
            mode = control.get("mode", "ok")
            answer = control.get("answer", {})
            slow = float(control.get("slow_seconds", DEFAULT_SLOW_SECONDS))
        except (OSError, ValueError, AttributeError) as exc:
            self._send(503, f"lab CC control file unusable: {exc}\n".encode())
            return
        if mode == "500":
            self._send(500, b"internal server error (lab CC mode 500)\n")
        elif mode == "garbage":
            self._send(200, b"<html>this is not JSON {{{\n", "application/json")
        elif mode == "oversize":
            self._oversize(answer)
        else:
            if mode == "slow":
                time.sleep(max(0.0, slow))
            self._send(200, json.dumps(answer).encode(), "application/json")

    def _oversize(self, answer: Mapping[str, Any]) -> None:
        """About 2 MiB of valid JSON, streamed without Content-Length (close-delimited)."""
        self._log(200)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        rest = {k: v for k, v in answer.items() if k != "aps"}
        head = json.dumps({**rest, "aps": []})[:-2]  # ends with '"aps": [' (dropped "]}")
        items = [json.dumps(ap) for ap in answer.get("aps", [])]
        junk = json.dumps({"id": "x" * 64, "addr": "192.0.2.1", "note": "y" * 400})
        sent = 0
        try:
            self.wfile.write((head + ",".join(items)).encode())
            sep = "," if items else ""
            while sent < OVERSIZE_BYTES:
                chunk = sep + ",".join([junk] * 128)
                sep = ","
                self.wfile.write(chunk.encode())
                sent += len(chunk)
            self.wfile.write(b"]}")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading at its size limit: that is the point


class CCServer(ThreadingHTTPServer):
    """Threaded HTTP server; dual-stack when bound to an IPv6 address."""

    daemon_threads = True  # a "slow" request must not delay stopping the server
    allow_reuse_address = True

    def __init__(self, host: str, port: int, control: Path, token_file: Path | None) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.control = control
        self.token_file = token_file
        super().__init__((host, port), CCHandler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cc.py", description=__doc__)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--control", type=Path, required=True, help="JSON control file")
    parser.add_argument("--token-file", type=Path, help="require this bearer token")
    parser.add_argument("--ready-file", type=Path, help="created once the server listens")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with CCServer(args.host, args.port, args.control, args.token_file) as server:
        print(f"cc: listening on [{args.host}]:{args.port}", file=sys.stderr, flush=True)
        if args.ready_file is not None:
            args.ready_file.touch()
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
