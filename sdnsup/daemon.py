"""The daemon: one trio nursery, one applier task that owns the kernel, structured shutdown.

Every other task only sends desired states to the applier through a channel. SIGTERM/SIGINT
cancel the nursery; teardown then runs shielded with a deadline, because it runs inside a
cancelled scope and must finish well inside supervisord's ``stopwaitsecs`` (10 s).
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from sdnsup.applier import Applier, ApplyResult
from sdnsup.aps import AccessPoint
from sdnsup.cidrs import CidrSet
from sdnsup.errors import KernelError
from sdnsup.state import DesiredState, NoApPolicy, Settings

log = logging.getLogger("sdnsup")

# Teardown deletes one rule, one table and one nexthop per family (the kernel drops the
# routes with their nexthop), which takes milliseconds; 2 s leaves room for a loaded host
# and stays far inside supervisord's default stopwaitsecs of 10 s.
TEARDOWN_TIMEOUT = 2.0
# A failed apply is retried from a fresh read of the kernel, backing off up to this.
APPLY_RETRY_MAX = 30.0
APPLY_RETRY_FIRST = 0.5
RUN_DIR = Path("/run/sdnsup")


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Everything ``sdnsup run`` was asked to do."""

    cidrs: CidrSet
    aps: tuple[AccessPoint, ...]
    settings: Settings = field(default_factory=Settings)
    no_ap: NoApPolicy = "fallback"


def desired_for(config: RunConfig, ap: AccessPoint | None) -> DesiredState:
    """The state that steers the configured CIDRs through ``ap`` (None: no AP)."""
    exempt4 = frozenset(ipaddress.IPv4Network(a.addr4) for a in config.aps if a.addr4)
    exempt6 = frozenset(ipaddress.IPv6Network(a.addr6) for a in config.aps if a.addr6)
    return DesiredState(
        cidrs4=config.cidrs.v4,
        cidrs6=config.cidrs.v6,
        ap4=ap.addr4 if ap else None,
        ap6=ap.addr6 if ap else None,
        exempt4=exempt4,
        exempt6=exempt6,
        no_ap=config.no_ap,
        settings=config.settings,
    )


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


async def applier_task(
    applier: Applier,
    states: trio.MemoryReceiveChannel[DesiredState],
    *,
    on_applied: Callable[[DesiredState, ApplyResult], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Apply each desired state received, retrying failures with backoff.

    The applier's netlink calls block, so they run in a worker thread; trio's default
    (not abandoning the thread on cancel) means a write in progress always completes and
    ``applied`` stays true to the kernel.
    """
    task_status.started()
    first = True
    async for desired in states:
        delay = APPLY_RETRY_FIRST
        while True:
            try:
                result = await trio.to_thread.run_sync(applier.apply, desired)
            except KernelError as exc:
                log.error("apply failed, retrying in %.1f s: %s", delay, exc)
                applier.resync()
                await trio.sleep(delay)
                delay = min(delay * 2, APPLY_RETRY_MAX)
                continue
            for problem in result.problems:
                log.warning("%s", problem)
            # The first apply is always logged: after a restart that adopts an intact state
            # it writes nothing, and the operator still needs to see that sdnsup is serving.
            if first or result.total_writes or result.problems:
                log.info("applied: %s", describe(desired, result))
            first = False
            if on_applied is not None:
                on_applied(desired, result)
            break


async def _cancel_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s, tearing down", signal.Signals(signum).name)
            scope.cancel()
            return


async def serve(config: RunConfig, applier: Applier) -> None:
    """Run until SIGTERM/SIGINT, then remove everything sdnsup owns.

    Raises:
        KernelError: teardown failed or did not finish in time (the kernel may still hold
            sdnsup's objects; ``sdnsup down`` or a restart removes them).
    """
    started = time.monotonic()
    send, receive = trio.open_memory_channel[DesiredState](1)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signal, nursery.cancel_scope)
            await nursery.start(applier_task, applier, receive)
            # Discovery and probing (the next step of the supervisor) will pick the AP; for
            # now the first static AP is the active one.
            await send.send(desired_for(config, config.aps[0] if config.aps else None))
    finally:
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
