"""``python -m sdnsup.lab.probe ADDR PORT``: the client side of :mod:`sdnsup.lab.whoami`.

One-shot (default): connect, print the address the server saw (its greeting line), exit 0;
exit 1 with a reason on stderr when the connection fails or no greeting comes in time.

``--session``: print the greeting, then for every line read from stdin send it over the *same*
connection and print the server's reply. It exits when stdin closes or the connection breaks.
The lab drives it through :class:`sdnsup.lab.services.Session`.
"""

from __future__ import annotations

import argparse
import socket
import sys


def connect(addr: str, port: int, timeout: float, source: str | None) -> socket.socket:
    """A TCP connection to ``addr``:``port``, optionally from ``source``."""
    src = (source, 0) if source else None
    return socket.create_connection((addr, port), timeout=timeout, source_address=src)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdnsup.lab.probe", description=__doc__)
    parser.add_argument("addr")
    parser.add_argument("port", type=int)
    parser.add_argument("--timeout", type=float, default=3.0, help="connect/greeting timeout")
    parser.add_argument("--source", help="local address to bind before connecting")
    parser.add_argument("--session", action="store_true", help="keep the connection open")
    args = parser.parse_args(argv)

    try:
        sock = connect(args.addr, args.port, args.timeout, args.source)
    except OSError as exc:
        print(f"connect to {args.addr} port {args.port}: {exc}", file=sys.stderr)
        return 1
    with sock:
        reader = sock.makefile("rb")
        try:
            greeting = reader.readline()
        except OSError as exc:
            print(f"no greeting from {args.addr}: {exc}", file=sys.stderr)
            return 1
        if not greeting:
            print(f"{args.addr} closed the connection", file=sys.stderr)
            return 1
        sys.stdout.write(greeting.decode("utf-8", "replace"))
        sys.stdout.flush()
        if not args.session:
            return 0
        # From now on a reply may take as long as TCP retransmissions do: the caller has its
        # own timeout per question and ignores late answers to earlier ones.
        sock.settimeout(None)
        for line in sys.stdin:
            try:
                sock.sendall(line.encode())
                reply = reader.readline()
            except OSError as exc:
                print(f"session to {args.addr} broke: {exc}", file=sys.stderr)
                return 1
            if not reply:
                print(f"{args.addr} closed the session", file=sys.stderr)
                return 1
            sys.stdout.write(reply.decode("utf-8", "replace"))
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
