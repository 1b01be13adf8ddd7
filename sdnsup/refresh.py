"""When to ask the CC again: a schedule that keeps a fleet's requests spread over the ttl.

One host asking the CC every ``ttl`` is nothing; a hundred thousand hosts doing it *in step*
is a denial of service. Every rule here exists to keep the fleet's requests spread, whatever
happened to the fleet (a power event, a deploy, a CC outage, an AP death):

- **Periodic refresh**: every ``ttl x U(0.8, 1.2)``. The jitter keeps hosts that happen to be
  in step from staying so.
- **Start with a saved list** (:mod:`sdnsup.savedlist`): the host steers at once from the
  list, and asks the CC after a delay distributed like the *remaining time of a running
  refresh timer* (the residual life of the renewal process above): a fleet that restarts
  within one second then asks the CC at its steady rate, N/ttl, instead of N in that second.
  That residual is drawn exactly: a period ``T`` length-biased (an instant falls in a period
  with probability proportional to its length; for ``U(0.8, 1.2) x ttl`` that is
  ``ttl x sqrt(U(0.64, 1.44))``), then ``U(0, T)``.
- **Start without one** (first boot): the host asks at once (it has nothing else); its first
  refresh then comes after ``ttl x U(0.5, 1.5)``, so a fleet that booted together spreads
  over a whole ttl after one round instead of staying in a 40%-wide wave for many.
- **A failed refresh with a working AP** retries at the normal period: the host loses
  nothing by waiting, and a CC outage sees the fleet's steady rate instead of a retry storm.
  The fast full-jitter backoff (1 s doubling to 60 s, :func:`sdnsup.discovery.
  backoff_ceiling`) is only for a host with **no usable AP**: it is dark, and the CC may
  know APs it does not.
- **The CC says "back off"** (HTTP 429 or 503): the next attempt waits the normal period
  even without an AP; ``Retry-After`` is honoured (never sooner, up to 20% later so the
  hosts it was sent to do not return in step; at most 10 minutes).
- **An AP death** (the host failed over to another AP) asks for at most one extra refresh,
  at ``U(0, ttl/2)``, without moving the periodic schedule, and none when the periodic
  refresh comes within ``ttl/2`` anyway: the host then has a fresh list within ``ttl/2``
  either way, and when the busiest AP of a fleet dies (half the hosts), the CC sees about
  1.5x its steady rate instead of the whole half in one burst.

The schedule is pure bookkeeping: the caller passes the time (``trio.current_time()`` in the
daemon, the simulated clock in ``scripts/bench fleet``) and the random source.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from sdnsup.discovery import DEFAULT_TTL, backoff_ceiling

__all__ = ["FIRST_SPREAD", "JITTER", "Outcome", "RefreshSchedule"]

# The periodic refresh: ttl x U(1 - JITTER, 1 + JITTER).
JITTER = 0.2
# The first refresh after asking at start: ttl x U(1 - FIRST_SPREAD, 1 + FIRST_SPREAD).
FIRST_SPREAD = 0.5
# Of Retry-After: never sooner than asked, up to this fraction later.
RETRY_AFTER_JITTER = 0.2


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one request to the CC went: ``ok`` (a valid list), else whether the CC said it is
    ``overloaded`` (429/503) and the ``retry_after`` it asked for."""

    ok: bool
    overloaded: bool = False
    retry_after: float | None = None


class RefreshSchedule:
    """When the next CC request is due; see the module docstring for the rules.

    Two timers: the periodic one, and at most one extra refresh after an AP death. ``due`` is
    the earlier of the two; :meth:`fire` says the caller is asking now, :meth:`done` how it
    went. Times are seconds on any monotonic clock.
    """

    def __init__(self, ttl: float = DEFAULT_TTL, rng: random.Random | None = None) -> None:
        self.ttl = ttl
        self._rng = rng or random.Random()
        self._periodic = math.inf
        self._extra: float | None = None
        self._firing: str | None = None
        self._failures = 0  # failed or AP-less requests in a row while the host had no AP

    @property
    def due(self) -> float:
        """When the next request should go (``inf``: nothing scheduled)."""
        return self._periodic if self._extra is None else min(self._periodic, self._extra)

    @property
    def extra_due(self) -> float | None:
        """When the extra refresh after an AP death is due (None: none pending)."""
        return self._extra

    def jittered(self, ttl: float | None = None) -> float:
        """One periodic interval."""
        return (ttl or self.ttl) * self._rng.uniform(1 - JITTER, 1 + JITTER)

    def residual(self) -> float:
        """The remaining time of a periodic timer observed at a random instant."""
        low, high = (1 - JITTER) ** 2, (1 + JITTER) ** 2
        period = self.ttl * math.sqrt(self._rng.uniform(low, high))
        return self._rng.uniform(0.0, period)

    def start(self, now: float, *, saved: bool) -> None:
        """The host just started: with a ``saved`` list it has not asked yet (residual
        delay); without one it has just asked (first refresh spread over a ttl)."""
        if saved:
            self._periodic = now + self.residual()
        else:
            spread = self._rng.uniform(1 - FIRST_SPREAD, 1 + FIRST_SPREAD)
            self._periodic = now + self.ttl * spread

    def fire(self, now: float) -> str:
        """The caller asks the CC now (at or after :attr:`due`); which timer that was:
        ``"periodic"`` or ``"extra"``."""
        if self._extra is not None and self._extra <= self._periodic:
            self._extra = None
            self._firing = "extra"
        else:
            self._firing = "periodic"
        return self._firing

    def done(self, now: float, outcome: Outcome, *, has_ap: bool, ttl: float | None = None) -> None:
        """The request fired at ``now`` went as ``outcome``; ``has_ap``: the host has a usable
        AP (after the answer was taken into account); ``ttl``: the one the answer gave."""
        if ttl is not None:
            self.ttl = ttl
        firing, self._firing = self._firing, None
        if outcome.ok and has_ap:
            self._failures = 0
            if firing == "periodic":
                self._periodic = now + self.jittered()
            return
        if has_ap:
            # a failed refresh with a working AP: the normal period, nothing faster
            self._failures = 0
            if firing == "periodic":
                self._periodic = now + self._back_off(self.jittered(), outcome)
            return
        # no usable AP: full-jitter backoff, unless the CC asked for patience
        self._failures += 1
        delay = self._rng.uniform(0.0, backoff_ceiling(self._failures))
        if outcome.overloaded:
            delay = max(delay, self.jittered())
        self._periodic = now + self._back_off(delay, outcome)
        self._extra = None

    def _back_off(self, delay: float, outcome: Outcome) -> float:
        if outcome.retry_after is None:
            return delay
        asked = outcome.retry_after * self._rng.uniform(1.0, 1.0 + RETRY_AFTER_JITTER)
        return max(delay, asked)

    def ap_died(self, now: float) -> None:
        """The host's AP died and it failed over to another one: one extra refresh at
        ``U(0, ttl/2)`` unless one is pending or the periodic one comes within ttl/2."""
        if self._extra is not None or self._periodic - now <= self.ttl / 2:
            return
        self._extra = now + self._rng.uniform(0.0, self.ttl / 2)

    def no_ap(self, now: float) -> None:
        """The host has no usable AP any more: ask soon (the first step of the backoff),
        unless something is due sooner or a backoff is already running."""
        if self._failures:
            return
        self._periodic = min(self._periodic, now + self._rng.uniform(0.0, backoff_ceiling(1)))
