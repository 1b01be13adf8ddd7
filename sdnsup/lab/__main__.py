"""``python -m sdnsup.lab``: bring a lab up by hand, or clean up after one.

``up`` (the default) builds a lab, prints its namespaces and addresses, serves whoami on B and
waits until Ctrl-C / SIGTERM, then removes everything. Explore it meanwhile with e.g.
``ip netns exec <prefix>a ping 10.10.10.1``.

``cleanup PREFIX`` removes every namespace starting with PREFIX (and kills what runs in it);
``cleanup --stale`` removes only labs whose owning process died.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from sdnsup.lab.commands import LabError
from sdnsup.lab.processes import Lab
from sdnsup.lab.teardown import cleanup, cleanup_stale
from sdnsup.lab.topology import unavailable_reason


def _up(args: argparse.Namespace) -> int:
    # A shell starts a background job (`sdnsup lab up &`) with SIGINT ignored, and Python
    # then installs no KeyboardInterrupt handler: `kill -INT` would do nothing. Ctrl-C and
    # kill -INT must always remove the lab.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with Lab.create(
        n_aps=args.aps,
        ap_link="private" if args.private else "shared",
        container=args.container,
        prefix=args.prefix,
        rp_filter_strict=args.strict_rp,
    ) as lab:
        print(lab.describe())
        print(f"built in {lab.build_seconds:.3f}s")
        if not args.no_whoami:
            lab.serve_whoami(lab.ns_b, port=args.port)
            seen = lab.whoami(lab.ns_a, lab.b_addr, port=args.port)
            print(f"whoami on B port {args.port}; from A it sees {seen}")
        if not args.no_cc:
            # AP i answers probes after 5, 40, 80, ... ms: the first AP is the fastest.
            delays = {ap.index: (0.005, 0.040, 0.080)[min(ap.index, 3) - 1] for ap in lab.aps}
            lab.start_ap_agents(delays)
            url = lab.start_cc()
            lab.set_cc()
            print(f"CC at {url}; AP agents answer after "
                  + ", ".join(f"ap{i} {d * 1000:.0f} ms" for i, d in delays.items()))  # fmt: skip
            print(f"try: ip netns exec {lab.ns_a} sdnsup -r 10.10.10.0/24 --cc {url}")
        print("Ctrl-C (or SIGTERM) removes the lab.", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print("\nremoving the lab", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdnsup lab", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    up = sub.add_parser("up", help="build a lab and keep it until interrupted")
    up.add_argument("--aps", type=int, default=2, help="number of access points (default 2)")
    up.add_argument("--private", action="store_true", help="APs on their own LAN (A's eth1)")
    up.add_argument("--container", action="store_true", help="add container C behind A")
    up.add_argument("--strict-rp", action="store_true", help="strict rp_filter on A")
    up.add_argument("--prefix", help="namespace prefix (default sdnt-<random>-)")
    up.add_argument("--port", type=int, default=8080, help="whoami port on B")
    up.add_argument("--no-whoami", action="store_true", help="do not start whoami on B")
    up.add_argument("--no-cc", action="store_true", help="no CC and no AP probe agents")
    clean = sub.add_parser("down", aliases=["cleanup"], help="remove lab namespaces")
    group = clean.add_mutually_exclusive_group(required=True)
    group.add_argument("prefix", nargs="?", help="remove every namespace starting with this")
    group.add_argument("--stale", action="store_true", help="only labs whose owner died")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("up", "down", "cleanup", "-h", "--help"):
        argv.insert(0, "up")  # `up` is the default command
    args = parser.parse_args(argv)

    reason = unavailable_reason()
    if reason:
        print(f"cannot run the lab: {reason}", file=sys.stderr)
        return 77
    try:
        if args.command in ("down", "cleanup"):
            removed = cleanup_stale() if args.stale else cleanup(args.prefix)
            print("\n".join(removed) if removed else "nothing to remove")
            return 0
        return _up(args)
    except (LabError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
