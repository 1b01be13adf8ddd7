"""The composition root: every collaborator of a running daemon, built and wired in one place.

:func:`build` turns resolved options into a :class:`Daemon`: the applier (the only owner of
the kernel), the supervisor (the only writer of :class:`~sdnsup.supervisor.Status`), the pin
keeper, the change monitor, the prober, the systemd notifier and the mailbox between them.
:meth:`Daemon.run` hands them to :func:`sdnsup.daemon.serve`. The command line
(:mod:`sdnsup.cli`) only validates, sets up logging and takes the instance lock around this.

Building reads the kernel (free nexthop ids, other tools' objects where sdnsup would write,
the previous run's AP slots) and writes nothing: a conflict stops the start before anything
is applied.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from sdnsup import control, discovery, probe, savedlist
from sdnsup.applier import Applier, foreign_error
from sdnsup.choice import default_host_id
from sdnsup.config import RunOptions
from sdnsup.conntrack import Conntrack
from sdnsup.daemon import RUN_DIR, Mailbox, serve
from sdnsup.desired import RunConfig, desired_for
from sdnsup.echo import Prober
from sdnsup.netmon import Monitor, Watch
from sdnsup.notify import Notifier
from sdnsup.paths import PassiveDetector
from sdnsup.pins import PinKeeper
from sdnsup.preflight import netns_id
from sdnsup.supervisor import Supervisor

log = logging.getLogger("sdnsup")


@dataclass(frozen=True, slots=True)
class Daemon:
    """A daemon ready to run: its configuration (with the nexthop ids it took) and every
    collaborator, wired to each other."""

    config: RunConfig
    applier: Applier
    mailbox: Mailbox
    supervisor: Supervisor
    keeper: PinKeeper
    monitor: Monitor
    notifier: Notifier
    prober: Prober
    cc: discovery.CCClient | None
    metrics: tuple[str, int] | None

    async def run(
        self, *, stop_pending: Callable[[], bool], reload: Callable[[], RunConfig] | None
    ) -> None:
        """Serve until SIGTERM/SIGINT, then tear down (see :func:`sdnsup.daemon.serve`)."""
        try:
            async with self.prober.open():
                await serve(
                    self.config,
                    self.applier,
                    mailbox=self.mailbox,
                    supervisor=self.supervisor,
                    monitor=self.monitor,
                    control_path=control.default_socket_path(),
                    notifier=self.notifier,
                    metrics_listen=self.metrics,
                    pins=self.keeper,
                    stop_pending=stop_pending,
                    reload=reload,
                )
        finally:
            if self.cc is not None:
                with trio.CancelScope(shield=True):
                    await self.cc.aclose()


def build(opts: RunOptions, config: RunConfig, cc: discovery.CCClient | None) -> Daemon:
    """Open the kernel backends and wire every collaborator for ``opts``.

    Raises:
        ForeignObjectError: another tool's route, rule or nexthop is where sdnsup writes.
        KernelError: a kernel backend cannot be opened or read.
    """
    applier = Applier.from_system(
        sysctl_record=RUN_DIR / f"sysctl-{netns_id()}.json",
        nexthop_compat=opts.nexthop_compat,
    )
    cidrs = config.cidrs
    # Nexthop ids another tool holds are left to it: this run takes a free block (or the
    # one its predecessor used); routes and rules of others where sdnsup writes refuse.
    settings = applier.with_free_nexthop_ids(config.settings)
    config = dataclasses.replace(config, settings=settings)
    conflicts = applier.foreign_objects(settings, cidrs.v4 | cidrs.v6)
    if conflicts:
        raise foreign_error(settings, conflicts)
    # The previous run's AP slots (after kill -9 or a restart): their connections keep
    # their AP. Read before anything is decided, so the first state applied keeps them.
    recovered = applier.recover_slots(settings)
    mailbox = Mailbox()
    keeper = PinKeeper(
        Conntrack(),
        settings,
        abort_sockets=opts.abort_sockets,
        report=lambda report: supervisor.on_pins(report),
        passive=opts.passive_check,
    )
    saved, saved_error, saved_path = None, None, None
    if cc is not None and opts.state_dir is not None:
        saved_path = savedlist.path_for(opts.state_dir)
        try:
            saved = savedlist.SavedList.load(saved_path, cc.url)
        except savedlist.SavedListError as exc:
            saved_error = str(exc)
            log.warning("%s; asking the CC first", exc)

    async def save(directory: discovery.Directory, fetched_at: float) -> None:
        assert cc is not None and saved_path is not None
        entry = savedlist.SavedList(directory, cc.url, fetched_at)
        await trio.to_thread.run_sync(entry.save, saved_path)

    # one long-lived socket per probed AP (sdnsup.echo), open while the daemon runs
    prober = Prober()
    detector = (
        PassiveDetector(destinations=opts.suspect_destinations, window=opts.suspect_window)
        if opts.passive_check
        else None
    )
    supervisor = Supervisor(
        aps=config.aps if opts.ap is not None else None,
        desired_for=lambda ap, known, slots, probes: desired_for(config, ap, known, slots, probes),
        post=mailbox.post,
        probe_all=functools.partial(probe.probe_all, probe=prober.probe),
        probe_once=prober.probe,
        should_switch=probe.should_switch,
        cc=cc,
        discover=lambda client, on_retry: discovery.discover(
            client, retries=opts.retries, on_retry=on_retry
        ),
        keepalive_interval=opts.keepalive_interval,
        keepalive_timeout=opts.keepalive_timeout,
        keepalive_misses=opts.keepalive_misses,
        reprobe_interval=opts.reprobe_interval,
        slot_capacity=settings.slots,
        recovered=recovered,
        default_probe=opts.probe,
        retire=keeper.retire,
        drain_interval=opts.drain_interval,
        passive=detector,
        track=opts.track,
        probe_mark=settings.probe_mark,
        bypass_mark=settings.bypass_mark,
        track_interval=opts.track_interval,
        saved=saved,
        save=save if saved_path is not None else None,
        host_id=opts.host_id or default_host_id(),
        cc_url=cc.url if cc is not None else None,
        saved_error=saved_error,
    )
    monitor = Monitor(Watch.for_settings(settings))
    notifier = Notifier.from_env()  # may warn about NOTIFY_SOCKET: before "starting"
    log.info(
        "starting: %d IPv4 + %d IPv6 CIDRs, %s, mark %#x/%#x table %d priority %d, host id %s",
        len(cidrs.v4),
        len(cidrs.v6),
        f"CC {opts.cc}" if opts.cc else "APs " + ", ".join(str(ap) for ap in config.aps),
        settings.mark,
        settings.mask,
        settings.table,
        settings.priority,
        supervisor.status.host_id,
    )
    return Daemon(
        config=config,
        applier=applier,
        mailbox=mailbox,
        supervisor=supervisor,
        keeper=keeper,
        monitor=monitor,
        notifier=notifier,
        prober=prober,
        cc=cc,
        metrics=opts.metrics,
    )
