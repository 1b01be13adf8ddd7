"""The pin keeper: counts the connections pinned to each AP slot and frees what is over.

It owns the slot bits of conntrack marks the way the applier owns routes: the only task that
changes them. It only ever acts on one slot's connections, found by mark:

* a *draining* slot is counted every :data:`POLL_DRAINING` seconds; once no live connection
  is left, the entries of ended ones (TIME_WAIT, CLOSE) are re-pinned to "not yet pinned"
  and the slot is reported vacated, so the supervisor frees it (a freed number can be
  reused without a late segment of an old connection taking the new AP);
* a *retired* slot (its AP died) is handled as soon as the kernel no longer holds its
  routes: this host's sockets of its connections are aborted (``--abort-sockets``), and
  every entry is re-pinned to "not yet pinned", so its next packet pins it to the AP it is
  routed to (the active one). Then the slot is vacated;
* the *active* slot is counted every :data:`POLL_ACTIVE` seconds, for status; with passive
  path checking on, its connection attempts that never saw a reply are also read every
  :data:`sdnsup.paths.POLL` seconds (the kernel filters them: few, cheap) and reported for
  :class:`sdnsup.paths.PassiveDetector`;
* once, after the first apply: entries carrying a slot no AP holds (an earlier process
  stopped cleanly, or its slot could not be recovered) are re-pinned, so their numbers are
  free.

"Not yet pinned" is the mark with the slot bits clear: such a connection takes the active
AP, and is pinned again by its next packet (see :mod:`sdnsup.nft`).

Results go to ``report`` as one :class:`PinReport` per round. Kernel calls block, so each
round runs in a worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import trio

from sdnsup.conntrack import ConntrackBackend, Entry
from sdnsup.errors import ConntrackError
from sdnsup.paths import POLL as POLL_PATHS
from sdnsup.state import Settings, Slot

log = logging.getLogger("sdnsup")

# A draining slot is freed within this of its last connection ending: a dump filtered by
# mark costs the kernel one walk of its conntrack table (~10 ms per 100k entries) and us only
# the slot's own entries.
POLL_DRAINING = 2.0
# The active slot's count is for status and metrics only.
POLL_ACTIVE = 10.0


@dataclass(frozen=True, slots=True)
class PinReport:
    """What one round found and did."""

    counts: Mapping[int, int] = field(default_factory=dict)  # slot -> live connections
    vacated: frozenset[int] = frozenset()  # slots no connection is pinned to any more
    # retired slot -> (live connections moved to the active AP, local sockets aborted,
    #                  milliseconds from the retirement to the sockets' abort)
    retired: Mapping[int, tuple[int, int, float]] = field(default_factory=dict)
    orphans: int = 0  # connections of slots no AP held, re-pinned
    error: str | None = None
    # passive path checking: the active slot polled, and its attempts without a reply
    polled_slot: int | None = None
    unanswered: tuple[Entry, ...] = ()


class PinKeeper:
    """Counts pinned connections, re-pins those of dead or drained slots.

    Args:
        backend: conntrack and sockets (:class:`sdnsup.conntrack.Conntrack`).
        settings: the marks (the slot field lives in them).
        abort_sockets: destroy this host's sockets of a dead AP's connections.
        report: called in the event loop with each round's :class:`PinReport`.
        offload: runs a round's blocking kernel calls (a worker thread; tests on a mock
            clock run them inline, since a thread's real time would let virtual time race).
        passive: read the active slot's unanswered attempts every round (passive path
            checking, :mod:`sdnsup.paths`).
    """

    def __init__(
        self,
        backend: ConntrackBackend,
        settings: Settings,
        *,
        abort_sockets: bool,
        report: Callable[[PinReport], None],
        offload: Callable[..., Awaitable[PinReport]] = trio.to_thread.run_sync,
        passive: bool = False,
    ) -> None:
        self._offload = offload
        self._passive = passive
        self._backend = backend
        self._settings = settings
        self._abort = abort_sockets
        self._report = report
        self._applied: tuple[Slot, ...] | None = None
        self._retired: dict[int, float] = {}  # slot -> trio.current_time() it was retired
        self._wake = trio.Event()
        self._orphans_checked = False
        self._last_active_count = -POLL_ACTIVE
        self._last_drain_count = -POLL_DRAINING

    def applied(self, slots: tuple[Slot, ...]) -> None:
        """The kernel now holds these slots (called after every apply)."""
        if slots != self._applied:
            self._applied = slots
            self._wake.set()

    def retire(self, number: int) -> None:
        """Slot ``number``'s AP died: re-pin its connections once its routes are gone."""
        self._retired[number] = trio.current_time()
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            applied = self._applied or ()
            draining = any(s.draining for s in applied)
            interval = POLL_DRAINING if draining or self._retired else POLL_ACTIVE
            if self._passive and any(not s.draining for s in applied):
                interval = min(interval, POLL_PATHS)
            with trio.move_on_after(interval):
                await self._wake.wait()
            self._wake = trio.Event()
            if self._applied is None:
                continue  # nothing applied yet: the kernel still holds what it held
            applied, retired = self._applied, dict(self._retired)
            report = await self._offload(self._round, applied, retired, trio.current_time())
            for number in report.retired:
                self._retired.pop(number, None)
            self._report(report)

    def _round(self, applied: tuple[Slot, ...], retired: dict[int, float], now: float) -> PinReport:
        """One round (in a worker thread); ``now``: the event loop's clock as it started."""
        s, backend = self._settings, self._backend
        held = {slot.number: slot for slot in applied}
        counts: dict[int, int] = {}
        vacated: set[int] = set()
        done: dict[int, tuple[int, int, float]] = {}
        orphans = 0
        pending = s.slot_mark(0)
        active = next((n for n, slot in held.items() if not slot.draining), None)
        unanswered: list[Entry] = []
        try:
            if self._passive and active is not None:
                unanswered = backend.unanswered(s.slot_mark(active), s.mask)
            for number, since in sorted(retired.items()):
                if number in held:
                    continue  # its routes are still there: after the next apply
                entries = backend.pinned(s.slot_mark(number), s.mask)
                aborted = backend.abort_sockets(entries) if self._abort else 0
                took = (now - since) * 1000
                backend.repin(entries, pending, s.mask)
                done[number] = (sum(1 for e in entries if e.live), aborted, took)
                vacated.add(number)
            count_active = now - self._last_active_count >= POLL_ACTIVE
            if count_active:
                self._last_active_count = now
            # Rounds come every POLL_PATHS with passive checking: drains need no such pace.
            count_draining = now - self._last_drain_count >= POLL_DRAINING * 0.9
            if count_draining:
                self._last_drain_count = now
            for number, slot in held.items():
                if not (count_draining if slot.draining else count_active):
                    continue
                entries = backend.pinned(s.slot_mark(number), s.mask)
                live = sum(1 for e in entries if e.live)
                counts[number] = live
                if slot.draining and live == 0:
                    backend.repin(entries, pending, s.mask)  # ended ones only
                    vacated.add(number)
            if not self._orphans_checked:
                self._orphans_checked = True
                for number in range(1, s.slots + 1):
                    if number in held or number in retired:
                        continue
                    entries = backend.pinned(s.slot_mark(number), s.mask)
                    if entries:
                        backend.repin(entries, pending, s.mask)
                        orphans += sum(1 for e in entries if e.live)
        except ConntrackError as exc:
            return PinReport(counts, frozenset(vacated), done, orphans, str(exc))
        polled = active if self._passive else None
        return PinReport(counts, frozenset(vacated), done, orphans, None, polled, tuple(unanswered))
