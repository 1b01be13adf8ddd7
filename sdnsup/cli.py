"""Command line: ``sdnsup [run] -r CIDRS --ap ADDR``.

``run`` is the default subcommand, so ``sudo sdnsup -r 10.10.10.0/24`` works as in the seed.
Exit codes: 0 clean stop, 64 bad usage (nothing applied), 75 another instance runs,
77 missing privileges (nothing touched), 70 kernel or internal failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import ipaddress
import logging
import os
import signal
import socket
import sys
import urllib.parse
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from sdnsup import __version__
from sdnsup.errors import EX_USAGE, ConfigError, SdnsupError

if TYPE_CHECKING:
    from sdnsup.config import RunOptions
    from sdnsup.desired import RunConfig
    from sdnsup.routes import IPNetwork
    from sdnsup.state import Settings

log = logging.getLogger("sdnsup")

SUBCOMMANDS = ("run", "check", "plan", "down", "status", "lab")


def run_epilog() -> str:
    """The end of ``run --help``: how it steers, with the defaults (state is imported only
    here, so that the commands that do not show it start faster)."""
    from sdnsup.state import DEFAULT_MARK, DEFAULT_MASK, DEFAULT_PRIORITY, DEFAULT_TABLE

    return f"""\
how it steers traffic:
  New connections to the CIDRs (from this host or forwarded for containers) get the mark
  {DEFAULT_MARK:#x} on their conntrack entry; after routing, the AP their first packet went to
  is written into the mark (its slot): every later packet follows that AP for as long as it
  lives, whichever AP becomes active ('ip rule fwmark MARK/MASK' sends it there). Connections
  that arrive from the CIDRs are never marked, so their replies take the normal route (the
  seed's inbound-reply problem). Existing connections are left alone.

defaults and why:
  --mark/--mask {DEFAULT_MARK:#x}/{DEFAULT_MASK:#x}
                    the steered flag (bit 13) and 7 AP slots (bits 1, 7, 12): used by none
                    of kube-proxy (0x4000), Calico (0xffff0000), Tailscale (0xff0000),
                    Cilium (0x0f00, identities), wg-quick (0xca6c) or Istio (0x539) in their
                    default modes; only these bits are changed.
  --table {DEFAULT_TABLE}       (and one table per AP slot after it) not Tailscale's 52, wg-quick's
                    51820 or the seed's 100.
  --priority {DEFAULT_PRIORITY}    before main (32766), after Tailscale's rules (5210-5270).

choosing and keeping the AP:
  With --cc, sdnsup asks the control center for its AP list (GET URL/v1/aps), retrying with
  exponential backoff and full jitter (1 s doubling to 60 s; unlimited unless --retries),
  and refreshes it every 'ttl' the CC gives. It probes every AP concurrently and takes the
  first to answer; a later probe round switches only to an AP >10 ms and >33% faster. The
  active AP is probed every --keepalive-interval; after --keepalive-misses misses in a row it
  is dead and traffic moves at once to the next live AP of the last ranking (with the
  defaults, within 0.6-0.8 s). A dead AP is reused only after 10 s and a clean probe round.
  An AP that stops being chosen while alive drains: its connections keep it until they end
  (it is probed every --drain-interval); when an AP with connections dies they move to the
  active AP, and this host's sockets of them are aborted at once (--abort-sockets).

examples:
  sdnsup -r 10.10.10.0/24 --cc https://cc.example.net --cc-token-file /etc/sdnsup/cc.token
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


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors exiting 64 (EX_USAGE, as documented) instead of 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; with ``command``, only that subcommand gets its options (run's and
    check's import :mod:`sdnsup.options`, and with it the runtime modules their defaults
    come from: ``status``, a health check, answers several times faster without them)."""
    run_options = command in (None, "run", "check")
    parser = _Parser(
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
        epilog=run_epilog() if command in (None, "run") else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if run_options:
        from sdnsup.options import add_run_arguments

        add_run_arguments(run)

    plan = sub.add_parser(
        "plan",
        help="print the nftables ruleset and routing run would install (no root needed)",
        description="Print exactly what 'run' would install: the nftables table in nft syntax "
        "(loadable with nft -f; --json for libnftables JSON) and the policy rules, nexthops "
        "and routes as the equivalent ip commands. Review it before a deployment.",
    )
    if command in (None, "plan"):
        from sdnsup.options import add_run_arguments

        add_run_arguments(plan)
        plan.add_argument(
            "--json",
            action="store_true",
            help="one JSON document: nftables (the libnftables JSON run sends), commands, notes",
        )

    check = sub.add_parser(
        "check",
        help="validate what run would use, start nothing (exit 0 valid, 64 not)",
        description="Validate everything 'run' would use with these options, like nginx -t: "
        "flags, SDNSUP_* variables and the config file (the same sources, the same rules), "
        "the CIDR files (read and merged, with their counts), the CC URL and token file; as "
        "root also the kernel: no other tool's policy rules, routes or nexthops where sdnsup "
        "would write. Nothing is changed. Exit code 0 valid, 64 not (the errors are printed).",
    )
    if run_options:
        add_run_arguments(check)

    status = sub.add_parser(
        "status",
        help="what the running daemon is doing (exit 0 connected, 1 not, 3 not running)",
        description="Ask the daemon of this network namespace (over its root-only socket "
        "in /run/sdnsup) for its state, APs with their last RTT and loss, CIDR counts, "
        "failovers, heals and CC refreshes. Exit code: 0 connected, 1 running but not "
        "connected, 3 not running, 4 unknown; usable as a health check. With no daemon "
        "running it says whether sdnsup left anything in the kernel.",
    )
    status.add_argument("--json", action="store_true", help="one JSON object (schema 1)")
    sub.add_parser(
        "lab",
        help="build the test lab of network namespaces to experiment with: "
        "'sdnsup lab up --help', 'sdnsup lab down PREFIX|--stale'",
        add_help=False,
    )
    sub.add_parser(
        "down",
        help="remove everything sdnsup added to the kernel, with no daemon running",
        description="Remove sdnsup's nftables table, policy rules, nexthops and routes (found "
        "by sdnsup's route protocol 245) and restore the sysctls it changed, e.g. after "
        "kill -9. Refuses while a daemon runs in this network namespace: stop that instead.",
    )
    return parser


def _with_default_command(argv: Sequence[str]) -> list[str]:
    argv = list(argv)
    if argv and (argv[0] in SUBCOMMANDS or argv[0] in ("-h", "--help", "--version")):
        return argv
    return ["run", *argv] if argv else argv


def read_token(path: Path | None) -> str | None:
    """The CC token from ``--cc-token-file`` or ``SDNSUP_CC_TOKEN``; never from argv."""
    if path is not None:
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --cc-token-file {path}: {exc.strerror}") from exc
        if not token:
            raise ConfigError(f"--cc-token-file {path} is empty")
        if path.stat().st_mode & 0o004:
            log.warning("%s is readable by every user; chmod 600 it", path)
        return token
    from sdnsup.options import TOKEN_ENV  # imported by run and check already

    return os.environ.get(TOKEN_ENV) or None


def cc_addresses(url: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    """The CC's addresses, exempt from steering so control traffic never enters the overlay."""
    host = urllib.parse.urlsplit(url).hostname
    if not host:
        raise ConfigError(f"--cc {url!r} is not a URL like https://cc.example.net")
    try:
        return (ipaddress.ip_address(host),)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        # Not fatal: the CC may resolve later; until then its address is not exempt.
        log.warning("cannot resolve CC host %s (%s); its traffic is not exempt", host, exc)
        return ()
    return tuple(dict.fromkeys(ipaddress.ip_address(i[4][0]) for i in infos))


def run_config(opts: RunOptions) -> RunConfig:
    """What run does with these options (plan shows the same)."""
    from sdnsup.desired import RunConfig

    return RunConfig(
        cidrs=opts.cidrs,
        aps=opts.aps,
        settings=opts.settings,
        no_ap=opts.no_ap,
        exempt=cc_addresses(opts.cc) if opts.cc else (),
        verify_interval=opts.verify_interval,
    )


class _StopRequested(BaseException):
    """SIGTERM or SIGINT before the daemon serves: nothing of sdnsup's is in the kernel."""


class _EarlyStop:
    """SIGTERM/SIGINT from the start of ``run`` until the daemon's own handling takes over.

    Parsing 100k CIDRs takes most of a second: a stop then must end the process cleanly
    (exit 0), not kill it (SIGTERM's default) or print a traceback. While ``raising``, the
    signal interrupts whatever runs; once trio runs it is only recorded, and the daemon's
    signal task acts on it as soon as it starts (:func:`sdnsup.daemon.serve`).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.raising = True

    def __call__(self, signum: int, frame: object) -> None:
        self.signum = signum
        if self.raising:
            raise _StopRequested(signum)


def cmd_run(args: argparse.Namespace) -> int:
    early = _EarlyStop()
    signal.signal(signal.SIGTERM, early)
    signal.signal(signal.SIGINT, early)
    try:
        return _run(args, early)
    except _StopRequested as stop:
        name = signal.Signals(stop.args[0]).name
        log.warning("received %s before anything was applied: stopped", name)
        return 0


def _run(args: argparse.Namespace, early: _EarlyStop) -> int:
    import trio

    from sdnsup.daemon import RUN_DIR, first_sdnsup_error
    from sdnsup.preflight import (
        InstanceLock,
        check_privileges,
        live_netns,
        netns_suffix,
        sweep_run_dir,
    )

    # SIGHUP reloads once the daemon serves; until then it must not kill the process (its
    # default action), which would leave state in the kernel with no teardown.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Validate everything before touching anything: flags, SDNSUP_* and the config file.
    from sdnsup.config import resolve

    opts = resolve(args)
    from sdnsup import discovery

    check_privileges()
    from sdnsup.logs import LogSetupError, setup_logging

    # Logging first: the token checks warn (clear text over http, a world-readable file), and
    # a warning printed before logging is set up is in no log and breaks --log-format json.
    # One file per network namespace: sdnsup.log in the host's, sdnsup-NAME.log in another.
    logfile = f"sdnsup{netns_suffix()}.log"
    try:
        setup_logging(
            level=opts.log_level, log_dir=opts.log_dir, fmt=opts.log_format, filename=logfile
        )
    except LogSetupError as exc:
        # A folder another user planted in /tmp must not keep the network down: stderr only
        # (supervisord and journald keep it), and say so on every start until it is fixed.
        setup_logging(level=opts.log_level, log_dir=None, fmt=opts.log_format)
        log.warning("NOT LOGGING TO A FILE: %s; logging to stderr only until that is fixed", exc)
    token = read_token(opts.cc_token_file) if opts.cc else None
    cc = (
        discovery.CCClient(opts.cc, token=token, ca_file=opts.cc_ca)
        if opts.cc is not None
        else None
    )
    for warning in opts.warnings:
        log.warning("%s", warning)
    log.info("configuration: %s", opts.describe())
    log.info("CIDRs: %s", opts.cidrs.report)
    config = run_config(opts)
    # Kernel backends load libnftables and open netlink sockets: only now.
    from sdnsup import assembly

    with InstanceLock():
        stale = sweep_run_dir(RUN_DIR, live_netns())
        if stale:
            log.info(
                "removed %d files of network namespaces that no longer exist from %s: %s",
                len(stale),
                RUN_DIR,
                ", ".join(stale),
            )
        daemon = assembly.build(opts, config, cc)
        reload = functools.partial(
            reload_config, args, opts, daemon.config, daemon.applier.foreign_objects
        )

        # From here the daemon's signal task handles stops; one arriving before it starts
        # is recorded and acted on when it does.
        early.raising = False
        try:
            trio.run(
                functools.partial(
                    daemon.run, stop_pending=lambda: early.signum is not None, reload=reload
                )
            )
        except BaseException as exc:
            found = first_sdnsup_error(exc)
            if found is None:
                raise
            raise found from exc
    log.info("stopped")
    return 0


# What a reload (SIGHUP) applies: the CIDRs, from these options and the files they name.
# Everything else is bound into running tasks, sockets and kernel objects at start.
RELOADED = frozenset({"routes", "allow_default", "strict_cidrs", "max_cidrs", "cidrs"})


def reload_config(
    args: argparse.Namespace,
    running: RunOptions,
    config: RunConfig,
    foreign: Callable[[Settings, Collection[IPNetwork]], list[str]] | None = None,
) -> RunConfig:
    """SIGHUP: the run configuration as its sources say now (the file, CIDR files, the
    environment), in a worker thread. Options that only a restart can apply are named in a
    warning and keep their running value. ``foreign``: finds other tools' objects where the
    new CIDRs would be written (:meth:`sdnsup.applier.Applier.foreign_objects`).

    Raises:
        ConfigError: the new configuration is invalid, or another tool holds a route the
            new CIDRs would write (the caller keeps the running configuration).
    """
    from sdnsup.config import resolve

    new = resolve(args, previous=config.cidrs)
    later = [
        f.name
        for f in dataclasses.fields(new)
        if f.name not in RELOADED | {"sources", "warnings"}
        and getattr(new, f.name) != getattr(running, f.name)
    ]
    if later:
        log.warning(
            "reload: %s changed; a restart applies %s, the running value is kept until then",
            ", ".join(k.replace("_", "-") for k in later),
            "it" if len(later) == 1 else "them",
        )
    if foreign is not None:
        added: frozenset[IPNetwork] = new.cidrs.v4 - config.cidrs.v4
        added |= new.cidrs.v6 - config.cidrs.v6
        conflicts = foreign(config.settings, added) if added else []
        if conflicts:
            from sdnsup.applier import foreign_error

            raise foreign_error(config.settings, conflicts)
    return dataclasses.replace(config, cidrs=new.cidrs)


def cmd_plan(args: argparse.Namespace) -> int:
    from sdnsup.config import resolve
    from sdnsup.desired import desired_for
    from sdnsup.plan import plan
    from sdnsup.rtnl import RtnlRoutes
    from sdnsup.state import Slot
    from sdnsup.sysctl import ProcSysctl, strict_rp_filter

    # The same sources and rules as run (flags, SDNSUP_*, the config file); with no AP source
    # it shows the state without an AP. APs from a CC are not asked for: none is shown active.
    opts = resolve(args, need_ap_source=False)
    cidrs, aps = opts.cidrs, opts.aps
    config = run_config(opts)
    # What a fresh start installs: the first AP active, in the first AP slot.
    first = aps[0] if aps else None
    slots = (Slot(1, first.addr4, first.addr6),) if first else ()
    desired = desired_for(config, first, aps, slots)
    # Route lookups and sysctl reads need no privilege: the plan shows the real interface
    # towards the AP and whether strict rp_filter makes src_valid_mark necessary.
    routes = RtnlRoutes.from_system()
    try:
        text = plan(
            desired,
            routes.resolve,
            lambda ifname: strict_rp_filter(ProcSysctl(), ifname),
            as_json=args.json,
            nexthop_compat=opts.nexthop_compat,
        )
    finally:
        routes.close()
    sys.stdout.write(text)
    # stderr: stdout stays loadable (nft -f, a JSON parser)
    print(f"sdnsup plan: CIDRs: {cidrs.report}", file=sys.stderr)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from sdnsup.applier import Applier
    from sdnsup.daemon import RUN_DIR
    from sdnsup.preflight import InstanceLock, check_privileges, netns_id

    check_privileges()
    with InstanceLock():  # a running daemon owns the kernel state: refuse (exit 75)
        applier = Applier.from_system(sysctl_record=RUN_DIR / f"sysctl-{netns_id()}.json")
        result = applier.teardown()
    if result.total_writes:
        print(f"sdnsup down: removed {result.summary()}")
    else:
        print("sdnsup down: nothing of sdnsup's was in the kernel")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from sdnsup import control

    return control.status_command(as_json=args.json, leftovers=leftovers)


def leftovers() -> str:
    """What sdnsup left in the kernel of this namespace, for ``status`` with no daemon."""
    from sdnsup.applier import Applier
    from sdnsup.preflight import check_privileges

    try:
        check_privileges()
        found = Applier.from_system().read_kernel(elements=False)
    except SdnsupError as exc:
        return f"cannot look for leftovers in the kernel: {exc}"
    listed = found.summary()
    if not listed:
        return "nothing of sdnsup's is in the kernel"
    return f"left in the kernel by an earlier run: {listed}; 'sdnsup down' removes them"


def cmd_check(args: argparse.Namespace) -> int:
    from sdnsup.check import can_read_kernel, check
    from sdnsup.config import resolve

    opts = resolve(args)

    def kernel_conflicts(opts: RunOptions) -> list[str]:
        from sdnsup.applier import Applier
        from sdnsup.nft import LibNftables
        from sdnsup.rtnl import RtnlRoutes
        from sdnsup.sysctl import ProcSysctl

        with RtnlRoutes.from_system() as routes:
            applier = Applier(routes, LibNftables(), ProcSysctl())
            settings = applier.with_free_nexthop_ids(opts.settings)
            return applier.foreign_objects(settings, opts.cidrs.v4 | opts.cidrs.v6)

    lines = check(
        opts,
        read_token=lambda o: read_token(o.cc_token_file),
        kernel_conflicts=kernel_conflicts if can_read_kernel() else None,
    )
    for line in lines:
        print(line)
    print("sdnsup check: OK, run would start with this configuration")
    return 0


COMMANDS = {
    "run": cmd_run,
    "check": cmd_check,
    "plan": cmd_plan,
    "down": cmd_down,
    "status": cmd_status,
}


def cmd_lab(argv: list[str]) -> int:
    """``sdnsup lab up [...]`` keeps a lab (CC, APs, remote host) until Ctrl-C;
    ``sdnsup lab down PREFIX|--stale`` removes what a killed lab left."""
    from sdnsup.lab.__main__ import main as lab_main

    return lab_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "lab":
        return cmd_lab(argv[1:])
    argv = _with_default_command(argv)
    parser = build_parser(argv[0] if argv and argv[0] in SUBCOMMANDS else "")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EX_USAGE
    try:
        return COMMANDS[args.command](args)
    except SdnsupError as exc:
        print(f"sdnsup: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
