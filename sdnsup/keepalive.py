"""The keepalive racer: probe the active AP on a short interval, declare it dead after K misses.

Each probe is raced against its deadline (the probe function owns the deadline); a probe that
answers resets the miss count. Detection time is measured from the last good answer, which is
what an operator wants to know: how long traffic may have been dark before sdnsup noticed.

Defaults: with a 0.2 s interval, a 0.2 s deadline and 3 misses, the verdict comes 0.8 s
after the AP's last answer (3 intervals, then the third probe's deadline), which is 0.6 to
0.8 s after the AP actually failed, depending on where in the probe cycle it did: inside the
1 s dark-window goal, while a single lost probe (a busy AP, one dropped datagram) never
causes a failover. Three misses is also what BFD
deployments commonly use as their detect multiplier.

In general, with an interval I, a deadline T >= I and K misses, the verdict comes K x T after
the first missed probe started (missed probes run back to back), so K x T to K x T + I after
the AP failed. The most aggressive settings sdnsup accepts are ``MIN_INTERVAL``,
``MIN_TIMEOUT`` and ``MIN_MISSES`` of :mod:`sdnsup.defaults` (0.05 s, 0.05 s, 2): a verdict
100-150 ms after the failure. Below them a probe's verdict says more about the host's
scheduler than about the AP (see the reasons there).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from sdnsup.aps import AccessPoint
from sdnsup.defaults import KEEPALIVE_INTERVAL, KEEPALIVE_MISSES, KEEPALIVE_TIMEOUT
from sdnsup.errors import SdnsupError

log = logging.getLogger(__name__)


ProbeOnce = Callable[..., Awaitable[float]]


@dataclass(frozen=True, slots=True)
class Death:
    """Why and when an AP was declared dead."""

    ap: AccessPoint
    misses: int
    detection: float  # seconds from the last good answer (or the start) to the verdict
    last_error: str


async def watch(
    ap: AccessPoint,
    probe: ProbeOnce,
    *,
    interval: float = KEEPALIVE_INTERVAL,
    probe_timeout: float = KEEPALIVE_TIMEOUT,
    misses: int = KEEPALIVE_MISSES,
    on_rtt: Callable[[float], None] | None = None,
) -> Death:
    """Probe ``ap`` every ``interval`` until ``misses`` probes in a row fail; return why.

    Args:
        ap: the AP to watch.
        probe: ``await probe(ap, timeout=...)`` returns the RTT in seconds or raises an
            :class:`~sdnsup.errors.SdnsupError` (a miss).
        on_rtt: called with every good RTT (for status and metrics).

    Runs until the AP is dead or the caller cancels it (e.g. because the active AP changed).
    """
    last_ok = trio.current_time()
    missed = 0
    last_error = ""
    while True:
        started = trio.current_time()
        try:
            rtt = await probe(ap, timeout=probe_timeout)
        except SdnsupError as exc:
            missed += 1
            last_error = str(exc)
            if missed >= misses:
                return Death(ap, missed, trio.current_time() - last_ok, last_error)
        else:
            if missed:
                log.debug("AP %s answered again after %d missed probes", ap.id, missed)
            missed = 0
            last_ok = trio.current_time()
            if on_rtt is not None:
                on_rtt(rtt)
        await trio.sleep_until(started + interval)
