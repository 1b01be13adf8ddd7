"""Command line: ``sdnsup [run] -r CIDRS --ap ADDR``.

``run`` is the default subcommand, so ``sudo sdnsup -r 10.10.10.0/24`` works as in the seed.
Exit codes: 0 clean stop, 64 bad usage (nothing applied), 75 another instance runs,
77 missing privileges (nothing touched), 70 kernel or internal failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from sdnsup import __version__
from sdnsup.aps import parse_static_aps
from sdnsup.cidrs import parse_cidrs
from sdnsup.errors import ConfigError, SdnsupError
from sdnsup.state import (
    DEFAULT_MARK,
    DEFAULT_MASK,
    DEFAULT_PRIORITY,
    DEFAULT_TABLE,
    Settings,
)

log = logging.getLogger("sdnsup")

SUBCOMMANDS = ("run",)

RUN_EPILOG = f"""\
how it steers traffic:
  New connections to the CIDRs (from this host or forwarded for containers) get the mark
  {DEFAULT_MARK:#x} on their conntrack entry; every packet of a marked connection gets the
  packet mark, and 'ip rule fwmark MARK/MASK lookup TABLE' sends it to the AP. Connections
  that arrive from the CIDRs are never marked, so their replies take the normal route (the
  seed's inbound-reply problem). Existing connections are left alone.

defaults and why:
  --mark/--mask {DEFAULT_MARK:#x}/{DEFAULT_MASK:#x}  bit 12, unused by kube-proxy (0x4000/0x8000),
                    Cilium (0x0f00), Istio (0x539), wg-quick (0xca6c), Tailscale
                    (0xff0000), Calico (0xffff0000); only these bits are changed.
  --table {DEFAULT_TABLE}       not Tailscale's 52, wg-quick's 51820 or the seed's 100.
  --priority {DEFAULT_PRIORITY}    before main (32766), after Tailscale's rules (5210-5270).

examples:
  sdnsup -r 10.10.10.0/24,10.10.20.0/24 --ap 10.77.0.11
  sdnsup -r @/etc/sdnsup/cidrs.txt --ap 10.77.0.11+fd77::11   (dual-stack AP)
  sdnsup -r 10.0.0.0/8 --ap 10.77.0.11,10.77.0.12 --no-ap blackhole
"""


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number (e.g. 0x1000 or 4096)"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdnsup",
        description="Steer traffic for chosen CIDRs through the fastest SDN access point, "
        "with policy routing and conntrack marks, and keep it working.",
    )
    parser.add_argument("--version", action="version", version=f"sdnsup {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="apply the routing and stay in the foreground (default command)",
        description="Apply the routing for CIDRS through an AP and keep it until SIGTERM/SIGINT, "
        "then remove everything sdnsup added.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "-r",
        "--routes",
        action="append",
        required=True,
        metavar="CIDRS",
        help="comma-separated CIDRs to steer (IPv4 and IPv6), or @FILE with one CIDR per line "
        "('#' comments); repeatable",
    )
    run.add_argument(
        "--ap",
        required=True,
        metavar="APS",
        help="static AP list, in order of preference: ADDR, or ADDR4+ADDR6 for a dual-stack AP, "
        "comma-separated. IPv6 CIDRs need an AP with an IPv6 address.",
    )
    run.add_argument(
        "--allow-default",
        action="store_true",
        help="accept 0.0.0.0/0 and ::/0 (refused by default: it would steer everything)",
    )
    run.add_argument(
        "--no-ap",
        choices=("fallback", "blackhole"),
        default="fallback",
        help="when no AP is usable: 'fallback' sends the traffic the normal route (default), "
        "'blackhole' drops it (fail closed)",
    )
    run.add_argument(
        "--mark", type=_int, default=DEFAULT_MARK, help="mark bits to set (%(default)#x)"
    )
    run.add_argument(
        "--mask", type=_int, default=DEFAULT_MASK, help="mark bits sdnsup owns (%(default)#x)"
    )
    run.add_argument(
        "--table", type=_int, default=DEFAULT_TABLE, help="routing table (%(default)s)"
    )
    run.add_argument(
        "--priority", type=_int, default=DEFAULT_PRIORITY, help="policy rule priority (%(default)s)"
    )
    run.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="log verbosity (%(default)s)",
    )
    return parser


def _with_default_command(argv: Sequence[str]) -> list[str]:
    argv = list(argv)
    if argv and (argv[0] in SUBCOMMANDS or argv[0] in ("-h", "--help", "--version")):
        return argv
    return ["run", *argv] if argv else argv


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level.upper(),
        format="%(asctime)s sdnsup %(levelname)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S%z",
    )


def cmd_run(args: argparse.Namespace) -> int:
    import trio

    from sdnsup.daemon import RUN_DIR, RunConfig, serve
    from sdnsup.preflight import InstanceLock, check_privileges, netns_id

    # Validate everything before touching anything.
    cidrs = parse_cidrs(args.routes, allow_default=args.allow_default)
    aps = parse_static_aps(args.ap)
    if cidrs.v6 and not any(ap.addr6 for ap in aps):
        raise ConfigError(
            f"{len(cidrs.v6)} IPv6 CIDRs given but no AP has an IPv6 address; "
            "write a dual-stack AP as --ap 10.77.0.11+fd77::11"
        )
    if cidrs.v4 and not any(ap.addr4 for ap in aps):
        raise ConfigError(f"{len(cidrs.v4)} IPv4 CIDRs given but no AP has an IPv4 address")
    settings = Settings(mark=args.mark, mask=args.mask, table=args.table, priority=args.priority)
    config = RunConfig(cidrs=cidrs, aps=aps, settings=settings, no_ap=args.no_ap)
    check_privileges()
    _setup_logging(args.log_level)
    # Kernel backends load libnftables and open netlink sockets: only now.
    from sdnsup.applier import Applier
    from sdnsup.nft import LibNftables
    from sdnsup.rtnl import RtnlRoutes
    from sdnsup.sysctl import ProcSysctl

    with InstanceLock():
        applier = Applier(
            RtnlRoutes.from_system(),
            LibNftables(),
            ProcSysctl(),
            sysctl_record=RUN_DIR / f"sysctl-{netns_id()}.json",
        )
        log.info(
            "starting: %d IPv4 + %d IPv6 CIDRs, APs %s, mark %#x/%#x table %d priority %d",
            len(cidrs.v4),
            len(cidrs.v6),
            ", ".join(str(ap) for ap in aps),
            settings.mark,
            settings.mask,
            settings.table,
            settings.priority,
        )
        trio.run(serve, config, applier)
    log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_with_default_command(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        parser.print_help()
        return 64
    try:
        return cmd_run(args)
    except SdnsupError as exc:
        print(f"sdnsup: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
