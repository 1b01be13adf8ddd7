"""The daemon: one trio nursery, one applier task that owns the kernel, structured shutdown.

Tasks: the applier (the only one that writes to the kernel), the supervisor (discovery,
probing, keepalive, failover: :mod:`sdnsup.supervisor`), the netlink monitor (heal triggers:
:mod:`sdnsup.netmon`), a slow periodic verification, and the signal watcher. Every task but
the applier only posts messages to the applier's :class:`Mailbox`.

A task that crashes is logged and restarted with backoff; one that keeps crashing takes the
process down (exit 70) so supervisord restarts it: never a silent hang. SIGTERM/SIGINT cancel
the nursery; teardown then runs shielded with a deadline, because it runs inside a cancelled
scope and must finish well inside supervisord's ``stopwaitsecs`` (10 s).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from sdnsup.applier import Applier, ApplyResult
from sdnsup.backoff import Backoff
from sdnsup.cidrs import CidrSet
from sdnsup.desired import RunConfig, desired_for
from sdnsup.errors import ConfigError, KernelError, SdnsupError
from sdnsup.pins import PinKeeper
from sdnsup.state import DesiredState
from sdnsup.supervisor import Status, Supervisor

if TYPE_CHECKING:
    from sdnsup.netmon import Watch
    from sdnsup.notify import Notifier

log = logging.getLogger("sdnsup")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Teardown deletes one rule, one table and one nexthop per family (the kernel drops the
# routes with their nexthop), which takes milliseconds even with 100k CIDRs (~150 ms); 2 s
# leaves room for a loaded host and stays far inside supervisord's stopwaitsecs of 10 s.
TEARDOWN_TIMEOUT = 2.0
# A failed apply is retried from a fresh read of the kernel, backing off up to this.
APPLY_RETRY_FIRST = 0.5
APPLY_RETRY_MAX = 30.0
# ... and never more than half a percent of one CPU: the pause between two verifications is
# at least 200 times what the last full re-read took (at 100k CIDRs, 1-3 s: every 5-10 min).
VERIFY_CPU_SHARE = 0.005
# A crashed task is restarted after 1, 2, 4 ... 30 s; 5 crashes within 5 minutes end the
# process instead (supervisord then restarts it from a clean slate).
RESTART_FIRST = 1.0
RESTART_MAX = 30.0
CRASH_LIMIT = 5
CRASH_WINDOW = 300.0
RUN_DIR = Path("/run/sdnsup")


def describe(desired: DesiredState, result: ApplyResult) -> str:
    """One operator line: what is steered where, and what it cost."""
    paths = []
    for version, cidrs, ap in ((4, desired.cidrs4, desired.ap4), (6, desired.cidrs6, desired.ap6)):
        if not cidrs:
            continue
        link = result.ap_links.get(version)
        where = f"AP {ap} on {link.ifname}" if link else f"no AP ({desired.no_ap})"
        paths.append(f"{len(cidrs)} IPv{version} CIDRs -> {where}")
    return "; ".join(paths) + f" [{result.summary()}]"


class Mailbox:
    """The applier's inbox: a 1-slot, latest-wins channel of desired states, plus heal
    requests. Posting never blocks, so a decision or a netlink burst can never stall the
    task that sends it; the applier always works on the newest state, once per wake-up."""

    def __init__(self) -> None:
        self._desired: DesiredState | None = None
        self._heals: list[str] = []
        self._wake = trio.Event()
        self.latest: DesiredState | None = None  # the newest state ever posted
        self.last_reread = 0.0  # seconds the last apply that re-read the kernel took

    def post(self, desired: DesiredState) -> None:
        self._desired = self.latest = desired
        self._wake.set()

    def heal(self, cause: str) -> None:
        if len(self._heals) < 100:
            self._heals.append(cause)
        self._wake.set()

    async def take(self) -> tuple[DesiredState | None, list[str]]:
        """Wait for news: the newest desired state (None if unchanged) and heal causes."""
        await self._wake.wait()
        self._wake = trio.Event()
        desired, heals = self._desired, self._heals
        self._desired, self._heals = None, []
        return desired, heals


async def applier_task(
    applier: Applier,
    mailbox: Mailbox,
    *,
    on_applied: Callable[[DesiredState, ApplyResult], None] | None = None,
    on_healed: Callable[[str], None] | None = None,
    on_failed: Callable[[str], None] | None = None,
    unwatched: Callable[[], AbstractContextManager[None]] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Apply the newest desired state whenever there is news; heal on request.

    ``unwatched``: the monitor's :meth:`~sdnsup.netmon.Monitor.unwatched_nftables`, entered
    while new CIDRs are written (see below).

    A heal re-reads the kernel (someone else changed it) before applying. A failed apply is
    retried with backoff from a fresh read. The applier's netlink calls block, so they run
    in a worker thread; trio's default (not abandoning the thread on cancel) means a write
    in progress always completes and ``applied`` stays true to the kernel.
    """
    task_status.started()
    # A restarted applier task picks up where the crashed one was: the newest state, re-read.
    current: DesiredState | None = mailbox.latest
    if current is not None:
        mailbox.heal("applier task restarted")
    first = True
    backoff = Backoff(APPLY_RETRY_FIRST, APPLY_RETRY_MAX)
    bulk_done: DesiredState | None = None  # the last state whose CIDRs were written unwatched
    while True:
        desired, heals = await mailbox.take()
        if desired is not None:
            current = desired
        if current is None:
            continue
        if heals:
            applier.resync()
        state = current
        # New CIDRs (the first apply, a reload) write many set elements. Every listener of
        # nftables events makes the kernel build a notification per element: about 1 s more
        # for 100k, even if the listener's filter drops them all. The monitor leaves that
        # group meanwhile; the generation tells whether anyone else committed in between.
        bulk = unwatched is not None and (
            bulk_done is None
            or state.cidrs4 is not bulk_done.cidrs4
            or state.cidrs6 is not bulk_done.cidrs6
        )
        try:
            if bulk and unwatched is not None:
                mark = await trio.to_thread.run_sync(applier.nft_mark)
                with unwatched():
                    result = await trio.to_thread.run_sync(applier.apply, state)
                if await trio.to_thread.run_sync(applier.nft_changed_since, mark):
                    mailbox.heal("nftables changed by another process while sdnsup wrote its CIDRs")
                bulk_done = state
            else:
                result = await trio.to_thread.run_sync(applier.apply, state)
        except KernelError as exc:
            if applier.aborting:
                # The stop that asked for it cancels this task here: not a failure to log.
                await trio.lowlevel.checkpoint()
            delay = backoff.take()
            log.error("apply failed, retrying in %.1f s: %s", delay, exc)
            if on_failed is not None:
                on_failed(str(exc))
            applier.resync()
            await trio.sleep(delay)
            mailbox.heal("retry after a failed apply")
            continue
        backoff.reset()
        if heals:
            mailbox.last_reread = result.seconds
        for problem in result.problems:
            log.warning("%s", problem)
        if heals and result.total_writes:
            more = f" (+{len(heals) - 1} more)" if len(heals) > 1 else ""
            log.info("healed after %s%s: %s", heals[0], more, describe(state, result))
            if on_healed is not None:
                on_healed(heals[0])
        elif first or (result.total_writes and not heals):
            found = applier.found_at_start if first else ""
            if found:
                log.info(
                    "adopted what an earlier sdnsup left in the kernel (killed or crashed): "
                    "%s; kept what fits, removed the rest",
                    found,
                )
            log.log(
                logging.INFO if first else logging.DEBUG, "applied: %s", describe(state, result)
            )
        first = False
        if on_applied is not None:
            on_applied(state, result)


async def verify_loop(mailbox: Mailbox, interval: float) -> None:
    """Ask for a full re-read now and then: catches what no netlink event reported.

    The pause is ``interval``, stretched so that verification costs at most
    :data:`VERIFY_CPU_SHARE` of a CPU however many CIDRs there are to re-read.
    """
    while True:
        await trio.sleep(interval)
        # Read only now: the previous verification's re-read has finished by this time.
        await trio.sleep(max(0.0, mailbox.last_reread / VERIFY_CPU_SHARE - interval))
        mailbox.heal("periodic verification")


@dataclass(slots=True)
class Restarts:
    """When a task that ended starts again: after ``backoff``'s delay, which starts over
    once a run lasted longer than :data:`CRASH_WINDOW` (a crash a day is not a crash loop);
    never (None) once it ended ``limit`` times within :data:`CRASH_WINDOW`."""

    limit: int | None = CRASH_LIMIT
    backoff: Backoff = field(default_factory=lambda: Backoff(RESTART_FIRST, RESTART_MAX))
    _ends: list[float] = field(default_factory=list)

    def after(self, began: float, now: float) -> float | None:
        """The delay before the next run of one that ran from ``began`` to ``now``."""
        if now - began > CRASH_WINDOW:
            self.backoff.reset()
        self._ends = [t for t in self._ends if now - t < CRASH_WINDOW] + [now]
        if self.limit is not None and len(self._ends) >= self.limit:
            return None
        return self.backoff.take()


async def supervised(name: str, fn: Callable[[], Awaitable[object]]) -> None:
    """Run ``fn`` forever: restart it with backoff when it crashes, give up when it keeps
    crashing (:class:`Restarts`). SdnsupError that means "stop" (discovery exhausted) is
    not caught here: the caller passes only tasks for which any exception is a crash."""
    restarts = Restarts()
    while True:
        began = trio.current_time()
        try:
            await fn()
        except Exception as exc:  # a crash: log, then restart or give up
            delay = restarts.after(began, trio.current_time())
            if delay is None:
                log.critical(
                    "task %s crashed %d times in %.0f s, exiting: %r",
                    name,
                    restarts.limit,
                    CRASH_WINDOW,
                    exc,
                )
                raise
            log.error("task %s crashed, restarting in %.0f s: %r", name, delay, exc, exc_info=exc)
            await trio.sleep(delay)
        else:
            log.error("task %s returned unexpectedly; restarting", name)
            await trio.sleep(restarts.backoff.current)


class ChangeMonitor(Protocol):
    """What the daemon uses of the kernel change monitor (:class:`sdnsup.netmon.Monitor`)."""

    watch: Watch

    async def run(
        self,
        trigger: Callable[[str], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None: ...

    def unwatched_nftables(self) -> AbstractContextManager[None]: ...


async def monitor_task(
    monitor: ChangeMonitor,
    mailbox: Mailbox,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep the netlink monitor running; after a restart, ask for a heal.

    Ready once the monitor first subscribed, so that nothing the applier does later goes
    unwatched. A monitor that fails (a netlink socket error) is restarted with backoff; the
    events it missed meanwhile are covered by the heal asked for when it is back.
    """
    # Never given up: a netlink socket failure is the kernel's, not a bug, and periodic
    # verification covers the gap however long it lasts.
    restarts = Restarts(limit=None)
    ready = False
    while True:
        failure: list[BaseException] = []
        began = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(monitor.run, mailbox.heal)
                if not ready:
                    task_status.started()
                    ready = True
                else:
                    log.info("netlink monitor is back")
                    mailbox.heal("netlink monitor restarted, events may have been missed")
        except* KernelError as group:  # the nursery wraps the monitor's error in a group
            failure = list(group.exceptions)
        delay = restarts.after(began, trio.current_time())
        assert delay is not None  # no limit
        if failure:
            log.error("netlink monitor failed, restarting in %.0f s: %s", delay, failure[0])
        else:
            log.error("netlink monitor stopped unexpectedly, restarting in %.0f s", delay)
        if not ready:
            # Do not hold the daemon up: periodic verification covers the gap.
            task_status.started()
            ready = True
        await trio.sleep(delay)


SignalSource = Callable[[], AbstractContextManager[AsyncIterator[int]]]


def process_signals() -> AbstractContextManager[AsyncIterator[int]]:
    """The signals the daemon acts on, as this process receives them."""
    return trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


async def _on_signals(
    scope: trio.CancelScope,
    reload: Callable[[], Awaitable[None]] | None,
    on_stop: Callable[[], None] = lambda: None,
    stop_pending: Callable[[], bool] = lambda: False,
    source: SignalSource = process_signals,
) -> None:
    """SIGTERM/SIGINT tear down; SIGHUP reloads (one at a time: a second HUP during a
    reload waits for it, and reloads again, so the newest file always wins).
    ``stop_pending``: whether a stop came before this task listened."""
    with source() as signals:
        if stop_pending():
            log.info("received a stop during start-up, tearing down")
            on_stop()
            scope.cancel()
            return
        async for signum in signals:
            if signum == signal.SIGHUP:
                if reload is None:
                    log.warning("received SIGHUP: this sdnsup has nothing to reload")
                else:
                    await reload()
                continue
            log.info("received %s, tearing down", signal.Signals(signum).name)
            on_stop()  # an apply in its worker thread stops at its next batch
            scope.cancel()
            return


def cidr_change(old: CidrSet, new: CidrSet) -> str:
    """``IPv4 CIDRs 1 -> 2 (+1 -0)`` per family that changed (or ``CIDRs unchanged``), for
    the reload line."""
    if (old.v4, old.v6) == (new.v4, new.v6):
        return f"CIDRs unchanged ({len(new.v4)} IPv4 + {len(new.v6)} IPv6)"
    parts = []
    for version, a, b in ((4, old.v4, new.v4), (6, old.v6, new.v6)):
        added, removed = len(b - a), len(a - b)
        if added or removed:
            parts.append(f"IPv{version} CIDRs {len(a)} -> {len(b)} (+{added} -{removed})")
    return ", ".join(parts)


async def serve(
    config: RunConfig,
    applier: Applier,
    *,
    mailbox: Mailbox | None = None,
    supervisor: Supervisor | None = None,
    monitor: ChangeMonitor | None = None,
    control_path: Path | None = None,
    notifier: Notifier | None = None,
    metrics_listen: tuple[str, int] | None = None,
    pins: PinKeeper | None = None,
    reload: Callable[[], RunConfig] | None = None,
    stop_pending: Callable[[], bool] = lambda: False,
    signals: SignalSource = process_signals,
) -> None:
    """Run until SIGTERM/SIGINT, then remove everything sdnsup owns. SIGHUP reloads.

    Args:
        mailbox: the applier's inbox (the supervisor posts to it).
        supervisor: an object with ``async run()`` deciding the AP and posting desired
            states to ``mailbox`` (None: steer through the first
            static AP, without probing; used by tests of the kernel side alone).
        monitor: a :class:`sdnsup.netmon.Monitor` calling ``trigger(cause)`` when the kernel
            state may need healing (None: only periodic verification). Its watch follows the
            AP interfaces after every apply; it recognises the echoes of sdnsup's own writes
            by the port id of the netlink socket that caused them.
        control_path: where to serve ``sdnsup status`` (None: no status socket). Started
            before discovery so that status answers while sdnsup is still looking for APs;
            an unsafe run directory stops the daemon before it touches the kernel.
        notifier: a :class:`sdnsup.notify.Notifier` (systemd ``Type=notify``): READY once
            the status socket serves (STATUS says what it waits for; without a status
            socket, once the first state is applied), STATUS on changes, WATCHDOG from the
            event loop, STOPPING before teardown. A no-op outside systemd.
        metrics_listen: (host, port) for Prometheus metrics (None: off).
        pins: the :class:`sdnsup.pins.PinKeeper`, told of every applied state (None: no
            counting, no re-pinning; tests of the kernel side alone).
        reload: re-reads the configuration (the file, CIDR files, the environment) and
            returns the new one, or raises :class:`~sdnsup.errors.ConfigError`; called in a
            worker thread on SIGHUP. The new CIDRs are applied like any other change of
            desired state: a diff, so the policy rules never go and pinned connections keep
            their AP. A bad configuration is logged (and shown in status) and the running
            one kept. None: SIGHUP is logged and ignored.
        stop_pending: whether SIGTERM/SIGINT came before serve listened for signals (the
            caller recorded it): then it tears down at once.
        signals: where the signals come from (tests send them through a channel instead of
            signalling their own process).

    Raises:
        DiscoveryError: initial discovery exhausted its retries.
        KernelError: teardown failed or did not finish in time (the kernel may still hold
            sdnsup's objects; ``sdnsup down`` or a restart removes them).
    """
    started = time.monotonic()
    mailbox = mailbox or Mailbox()
    on_healed = supervisor.healed if supervisor is not None else None
    on_failed = supervisor.apply_failed if supervisor is not None else None
    ready = False

    status_sent = ""  # the last STATUS= sent, without its cost

    def on_applied(desired: DesiredState, result: ApplyResult) -> None:
        nonlocal ready, status_sent
        if pins is not None:
            pins.applied(desired.slots)
        if supervisor is not None:
            supervisor.applied(desired, result)
        if monitor is not None:
            from sdnsup.netmon import Watch

            links = [link.ifindex for link in result.ap_links.values()]
            links += [link.ifindex for link in result.slot_links.values()]
            # No AP interface known (AP unreachable): watch every interface, so that the
            # link that brings it back triggers a re-check.
            monitor.watch = Watch.for_settings(desired.settings, links or None)
        if notifier is not None:
            text = describe(desired, result)
            # What is steered where, without the cost: an apply that writes nothing after a
            # restart that adopted everything still replaces "waiting for ..." in systemctl.
            what = text.rsplit(" [", 1)[0]
            if not ready:
                notifier.ready(text)
                ready = True
            elif result.total_writes or what != status_sent:
                notifier.status(text)
            status_sent = what

    reload_lock = trio.Lock()

    async def reload_now() -> None:
        nonlocal config
        assert reload is not None
        async with reload_lock:
            try:
                new = await trio.to_thread.run_sync(reload)
            except ConfigError as exc:
                log.error("reload failed, the running configuration is kept: %s", exc)
                if supervisor is not None:
                    supervisor.reloaded(str(exc))
                return
            old, config = config, new
            log.info("reloaded: %s; CIDRs: %s", cidr_change(old.cidrs, new.cidrs), new.cidrs.report)
            if supervisor is not None:
                supervisor.reloaded(None)
                supervisor.set_desired_for(functools.partial(desired_for, new))
            else:
                mailbox.post(desired_for(new, new.aps[0] if new.aps else None))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                _on_signals,
                nursery.cancel_scope,
                reload_now if reload is not None else None,
                applier.abort,
                stop_pending,
                signals,
            )
            nursery.start_soon(
                supervised,
                "applier",
                lambda: applier_task(
                    applier,
                    mailbox,
                    on_applied=on_applied,
                    on_healed=on_healed,
                    on_failed=on_failed,
                    unwatched=monitor.unwatched_nftables if monitor is not None else None,
                ),
            )
            nursery.start_soon(
                supervised, "verify", lambda: verify_loop(mailbox, config.verify_interval)
            )
            if pins is not None:
                nursery.start_soon(supervised, "pins", pins.run)
            if control_path is not None:
                from sdnsup import control

                status = supervisor.status if supervisor is not None else None

                def get_snapshot() -> dict[str, Any]:
                    return control.snapshot(
                        status or Status(),
                        cidrs4=len(config.cidrs.v4),
                        cidrs6=len(config.cidrs.v6),
                        pid=os.getpid(),
                        no_ap=config.no_ap,
                        cidrs_read=config.cidrs.report.as_dict(),
                    )

                await nursery.start(control.serve_control, control_path, get_snapshot)
                if notifier is not None and not ready:
                    # Ready once it serves: `sdnsup status` answers and says what it waits
                    # for. Waiting for the first AP would block boot for as long as the CC is
                    # down, and units ordered after sdnsup would fail on a timeout instead.
                    notifier.ready("serving; waiting for the AP list and the first AP decision")
                    ready = True
            if monitor is not None:
                await nursery.start(monitor_task, monitor, mailbox)
            if notifier is not None:
                from sdnsup.notify import watchdog_loop

                # Not supervised: it returns at once when systemd set no watchdog.
                nursery.start_soon(watchdog_loop, notifier)
            if metrics_listen is not None:
                from sdnsup import metrics

                def metrics_text() -> str:
                    return metrics.render(
                        supervisor.status if supervisor is not None else Status(),
                        cidrs4=len(config.cidrs.v4),
                        cidrs6=len(config.cidrs.v6),
                        cidrs_read=config.cidrs.report.as_dict(),
                    )

                await nursery.start(metrics.serve_metrics, *metrics_listen, metrics_text)
            if supervisor is not None:
                await supervisor.start()  # a DiscoveryError here ends the daemon
                await supervised("supervisor", supervisor.watch)
            else:
                mailbox.post(desired_for(config, config.aps[0] if config.aps else None))
    finally:
        if notifier is not None:
            notifier.stopping()
        with trio.move_on_after(TEARDOWN_TIMEOUT, shield=True) as scope:
            t0 = time.monotonic()
            result = await trio.to_thread.run_sync(applier.teardown)
            log.info(
                "teardown: removed %s after %.1f s of service",
                result.summary(),
                t0 - started,
            )
        if scope.cancelled_caught:
            raise KernelError(
                f"teardown did not finish within {TEARDOWN_TIMEOUT:.0f} s; "
                "run 'sdnsup down' to remove what is left"
            )


def first_sdnsup_error(exc: BaseException) -> SdnsupError | None:
    """The SdnsupError inside an exception group raised by the nursery, if any."""
    if isinstance(exc, SdnsupError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = first_sdnsup_error(sub)
            if found is not None:
                return found
    return None
