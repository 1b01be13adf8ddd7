"""``python -m sdnsup.lab.whoami``: a TCP server that tells each client its address.

On every connection it first writes the peer's address as one line (``"10.10.10.11\\n"``;
IPv4-mapped IPv6 addresses are shown as plain IPv4), then answers each line received with
``peer <addr> <line>``, so a long-lived connection can be checked again and again (did it
survive a routing change, and which source address does it still carry?).

It listens on ``::`` dual-stack by default, one thread per connection. With ``--ready-file``
it creates that file once it is listening, which is how the lab knows it may connect.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import socketserver
import sys
from pathlib import Path


def display_address(host: str) -> str:
    """``host`` as the lab reports it: IPv4-mapped shown as IPv4, no ``%scope`` suffix."""
    host = host.split("%", 1)[0]
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


class WhoamiHandler(socketserver.StreamRequestHandler):
    """Greet with the peer address, then echo every line prefixed by ``peer <addr>``."""

    def handle(self) -> None:
        peer = display_address(self.client_address[0])
        print(f"connection from {peer} port {self.client_address[1]}", file=sys.stderr)
        try:
            self.wfile.write(f"{peer}\n".encode())
            for raw in self.rfile:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                self.wfile.write(f"peer {peer} {line}\n".encode())
        except OSError as exc:  # reset by the peer, broken pipe...
            print(f"connection from {peer} ended: {exc}", file=sys.stderr)


class WhoamiServer(socketserver.ThreadingTCPServer):
    """Threaded TCP server; dual-stack when bound to an IPv6 address."""

    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, host: str, port: int) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), WhoamiHandler, bind_and_activate=False)
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            self.server_bind()
            self.server_activate()
        except OSError:
            self.server_close()
            raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdnsup.lab.whoami", description=__doc__)
    parser.add_argument("--host", default="::", help="address to bind (default :: dual-stack)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--ready-file", type=Path, help="created once the server listens")
    args = parser.parse_args(argv)

    with WhoamiServer(args.host, args.port) as server:
        print(f"whoami listening on [{args.host}]:{args.port}", file=sys.stderr, flush=True)
        if args.ready_file is not None:
            args.ready_file.touch()
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
