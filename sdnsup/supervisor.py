"""The supervisor: finds the APs, picks the fastest, keeps it under keepalive, fails over.

It owns the *decision* (which AP is active) and nothing in the kernel: every decision becomes
a desired state posted to the applier's mailbox. Its tasks, all in one nursery:

- directory: the static ``--ap`` list, or the CC's list (initial discovery with retries,
  then a refresh every ``ttl``; a failed refresh keeps the current AP);
- prober: probes every AP concurrently; the first AP to answer is taken at once when there is
  none (selection does not wait for the slowest AP's deadline); the full ranking then decides
  whether a clearly better AP is worth a switch (:func:`sdnsup.probe.should_switch`);
- keepalive: races probes of the active AP against their deadline; after K misses it fails
  over straight to the next live AP of the last ranking (no CC round trip on the critical
  path), then asks for a re-probe and a CC refresh in the background. With no live AP, the
  no-AP policy applies and sdnsup keeps looking (the seed's "run the access flow again").

An AP declared dead comes back only after a hold-down and several good probes in a row
(:class:`sdnsup.probe.Hysteresis`): fail-back flaps without one (mwan3 asks for 5 good rounds).

A change of AP breaks no live connection unless its AP died: each AP that carries pinned
connections keeps an AP slot (:mod:`sdnsup.slots`). The AP that stops being active drains:
its connections keep it, under a slower keepalive (``drain_interval``), until the pin keeper
(:mod:`sdnsup.pins`) reports that none is left; if it dies meanwhile, its slot is retired
and its connections follow the active AP at once.
"""

from __future__ import annotations

import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from sdnsup import keepalive
from sdnsup.aps import AccessPoint, ProbeSpec
from sdnsup.errors import DiscoveryError, SdnsupError
from sdnsup.pins import PinReport
from sdnsup.probe import Hysteresis
from sdnsup.slots import SlotEntry, SlotTable
from sdnsup.state import DesiredState, Slot

log = logging.getLogger("sdnsup")

# A full probe round every 30 s (±20% so a fleet does not probe in step) finds a faster AP
# within a minute; while no AP is usable, every 2 s.
REPROBE_INTERVAL = 30.0
NO_AP_REPROBE_INTERVAL = 2.0
JITTER = 0.2
# Ranking probes: 3 per AP (loss is meaningful), each with a 1 s deadline: an AP slower
# than that is useless for interactive traffic.
PROBE_COUNT = 3
PROBE_TIMEOUT = 1.0
# A failed CC refresh is retried with full-jitter backoff up to this, keeping the current AP.
REFRESH_RETRY_CAP = 60.0


class Phase(enum.Enum):
    DISCOVERING = "discovering"
    CONNECTED = "connected"
    FAILING_OVER = "failing over"
    NO_AP = "no AP"


class ProbeResultLike(Protocol):
    """What the supervisor needs of a probe result (see :class:`sdnsup.probe.ProbeResult`)."""

    @property
    def ap(self) -> AccessPoint: ...
    @property
    def rtt(self) -> float | None: ...
    @property
    def sent(self) -> int: ...
    @property
    def received(self) -> int: ...


ProbeAll = Callable[..., Awaitable[Sequence[Any]]]
ProbeOnce = Callable[..., Awaitable[float]]
ShouldSwitch = Callable[[Any, Any], bool]


@dataclass
class Status:
    """What the supervisor knows, for ``sdnsup status`` and logs. Times are wall clock."""

    phase: Phase = Phase.DISCOVERING
    active: AccessPoint | None = None
    active_since: float | None = None
    aps: tuple[AccessPoint, ...] = ()
    ranking: tuple[Any, ...] = ()
    last_rtt: dict[str, float] = field(default_factory=dict)
    failovers: int = 0
    last_failover: str | None = None
    last_failover_at: float | None = None
    cc_last_refresh: float | None = None
    cc_error: str | None = None
    cc_url: str | None = None
    heals: int = 0
    last_heal: str | None = None
    last_heal_at: float | None = None
    started_at: float = field(default_factory=time.time)
    slots: SlotTable = field(default_factory=lambda: SlotTable(0))
    sockets_aborted: int = 0  # local sockets of dead APs' connections
    pins_error: str | None = None  # the pin keeper's last error, None once a round succeeds


def jittered(seconds: float) -> float:
    return seconds * random.uniform(1 - JITTER, 1 + JITTER)


def _ms(seconds: float | None) -> str:
    return "dead" if seconds is None else f"{seconds * 1000:.1f} ms"


class Supervisor:
    """Decides the active AP. Posts desired states with ``post(desired)``; never blocks on it.

    Args:
        aps: the static AP list, or None to ask the CC.
        desired_for: builds the desired state for an active AP (None: no AP), the
            currently known APs (all of them are exempt from steering) and the AP slots.
        post: hands a desired state to the applier (latest wins).
        slot_capacity: how many AP slots the mark holds.
        recovered: slots an earlier process left in the kernel (their connections keep
            their AP), probed with ``default_probe`` until the directory names their AP.
        retire: tells the pin keeper that a slot's AP died.
        drain_interval: keepalive interval of a draining AP.
        cc: the CC client (with ``fetch()``) when there is no static list.
        discover: initial discovery with retries: ``await discover(cc)``; raises
            :class:`~sdnsup.errors.DiscoveryError` when the retries are exhausted.
        probe_all / probe_once / should_switch: see :mod:`sdnsup.probe`.
    """

    def __init__(
        self,
        *,
        aps: Sequence[AccessPoint] | None,
        desired_for: Callable[
            [AccessPoint | None, Sequence[AccessPoint], tuple[Slot, ...]], DesiredState
        ],
        post: Callable[[DesiredState], None],
        probe_all: ProbeAll,
        probe_once: ProbeOnce,
        should_switch: ShouldSwitch,
        cc: Any = None,
        discover: Callable[[Any], Awaitable[Any]] | None = None,
        keepalive_interval: float = keepalive.KEEPALIVE_INTERVAL,
        keepalive_timeout: float = keepalive.KEEPALIVE_TIMEOUT,
        keepalive_misses: int = keepalive.KEEPALIVE_MISSES,
        reprobe_interval: float = REPROBE_INTERVAL,
        slot_capacity: int = 7,
        recovered: Sequence[Slot] = (),
        default_probe: ProbeSpec | None = None,
        retire: Callable[[int], None] = lambda _number: None,
        drain_interval: float = keepalive.DRAIN_INTERVAL,
    ) -> None:
        self.status = Status(slots=SlotTable(slot_capacity))
        self.slots = self.status.slots
        self._retire = retire
        self._drain_interval = drain_interval
        self._decided = False  # nothing is posted before the first decision
        self._slots_changed = trio.Event()
        self._slot_full_logged: str | None = None
        found = self.slots.recover(recovered, aps or (), default_probe or ProbeSpec(), time.time())
        if found:
            log.info(
                "kept %d AP slots of the previous run, their connections keep their AP: %s",
                len(found),
                ", ".join(f"slot {e.number} {e.ap}" for e in found),
            )
        self._static = tuple(aps) if aps is not None else None
        self._desired_for = desired_for
        self._post = post
        self._probe_all = probe_all
        self._probe_once = probe_once
        self._should_switch = should_switch
        self._cc = cc
        self._discover = discover
        self._ka = (keepalive_interval, keepalive_timeout, keepalive_misses)
        self._reprobe_interval = reprobe_interval
        self._ttl = 60.0
        self._hysteresis = Hysteresis()
        self._reprobe = trio.Event()
        self._refresh = trio.Event()
        self._active_changed = trio.Event()
        self._ka_scope: trio.CancelScope | None = None

    # --- decisions ---------------------------------------------------------------------------

    @property
    def active(self) -> AccessPoint | None:
        return self.status.active

    def _known(self) -> list[AccessPoint]:
        """The directory's APs, then those only a slot still knows (exempt from steering)."""
        known = list(self.status.aps)
        known += [e.ap for e in self.slots.entries.values() if e.ap not in known]
        return known

    def _desired(self) -> DesiredState:
        return self._desired_for(self.status.active, self._known(), self.slots.state())

    def _set_active(
        self, ap: AccessPoint | None, phase: Phase, line: str, died: AccessPoint | None = None
    ) -> None:
        """Make ``ap`` the AP new connections take; ``died``: the AP whose death caused it
        (its slot is retired, its connections follow ``ap``)."""
        st = self.status
        now = time.time()
        if died is not None:
            gone = self.slots.find(died)
            if gone is not None:
                self.slots.retire(gone.number, now)
                self._retire(gone.number)
        before = self.slots.active
        changed = ap != st.active
        if ap is None:
            self.slots.deactivate(now)
        elif self.slots.activate(ap, now) is None:
            log.warning(
                "AP %s has no slot: all %d hold pinned connections; its new connections follow "
                "whichever AP is active until a slot is freed",
                ap,
                self.slots.capacity,
            )
        if before is not None and before.role == "draining":
            line += f"; {before.ap} drains (slot {before.number}): its connections keep it"
        st.phase = phase
        if changed:
            st.active = ap
            st.active_since = now if ap else None
            if self._ka_scope is not None:
                self._ka_scope.cancel()
            self._active_changed.set()
            self._active_changed = trio.Event()
        log.info("%s", line)
        self._decided = True
        self._post(self._desired())
        self._slots_changed.set()

    def _result_for(self, ap: AccessPoint | None) -> Any:
        return next((r for r in self.status.ranking if r.ap == ap), None)

    def _eligible(self, result: Any, now: float) -> bool:
        live = result.rtt is not None and result.received > 0
        return live and self._hysteresis.usable(result.ap.id, now)

    def _count_probes(self, ranking: Sequence[Any], now: float) -> None:
        """Feed a round's probes of held-down APs to the hysteresis (once per round)."""
        for r in ranking:
            key = r.ap.id
            if not self._hysteresis.is_held(key):
                continue
            if r.received < r.sent:
                self._hysteresis.record(key, False, now)
            for _ in range(r.received):
                self._hysteresis.record(key, True, now)
            if self._hysteresis.usable(key, now):
                log.info("AP %s is back: held down, then answered every probe", key)

    def _first_answer(self, result: Any) -> None:
        if self.active is None and not self._hysteresis.is_held(result.ap.id):
            self._set_active(
                result.ap,
                Phase.CONNECTED,
                f"AP chosen: {result.ap} (first to answer, {_ms(result.rtt)})",
            )

    def consider(self, ranking: Sequence[Any]) -> None:
        """Take a completed probe ranking into account (best first)."""
        now = trio.current_time()
        st = self.status
        # Log a ranking when its order or the set of live APs changed: a steady network
        # makes no noise, every 30 s, forever.
        shape = [(r.ap.id, r.rtt is not None) for r in ranking]
        changed = shape != [(r.ap.id, r.rtt is not None) for r in st.ranking]
        st.ranking = tuple(ranking)
        for r in ranking:
            if r.rtt is not None:
                st.last_rtt[r.ap.id] = r.rtt
        self._count_probes(ranking, now)
        log.log(
            logging.INFO if changed else logging.DEBUG,
            "probe ranking: %s",
            ", ".join(f"{r.ap.id} {_ms(r.rtt)}" + (f" {r.sent - r.received}/{r.sent} lost"
                      if r.received < r.sent and r.rtt is not None else "") for r in ranking),
        )  # fmt: skip
        eligible = [r for r in ranking if self._eligible(r, now)]
        current = self._result_for(self.active)
        if not eligible:
            if self.active is None and st.phase is not Phase.NO_AP:
                self._set_active(None, Phase.NO_AP, "no AP answers: traffic takes the no-AP path")
                self._refresh.set()
            return
        best = eligible[0]
        if self.active is None:
            self._set_active(best.ap, Phase.CONNECTED, f"AP chosen: {best.ap} ({_ms(best.rtt)})")
        elif self.active not in st.aps:
            self._set_active(
                best.ap,
                Phase.CONNECTED,
                f"AP {self.active} is no longer listed; switched to {best.ap} ({_ms(best.rtt)})",
            )
        elif best.ap != self.active and (current is None or self._should_switch(current, best)):
            if self.slots.find(best.ap) is None and self.slots.free_number() is None:
                # Switching would leave the faster AP's connections unpinned: the next switch
                # would break them. Stay until a slot drains.
                if self._slot_full_logged != best.ap.id:
                    self._slot_full_logged = best.ap.id
                    log.info(
                        "staying on AP %s although %s is faster: all %d AP slots hold "
                        "pinned connections",
                        self.active,
                        best.ap,
                        self.slots.capacity,
                    )
                return
            self._slot_full_logged = None
            self._set_active(
                best.ap,
                Phase.CONNECTED,
                f"switched to faster AP {best.ap} ({_ms(best.rtt)}) from {self.active} "
                f"({_ms(current.rtt if current else None)})",
            )

    def on_death(self, death: keepalive.Death) -> None:
        """The active AP missed K probes: fail over to the next live AP of the last ranking."""
        now = trio.current_time()
        st = self.status
        self._hysteresis.mark_dead(death.ap.id, now)
        st.failovers += 1
        st.last_failover_at = time.time()
        st.phase = Phase.FAILING_OVER
        cause = (
            f"AP {death.ap} dead: {death.misses} probes missed, detected "
            f"{death.detection * 1000:.0f} ms after its last answer ({death.last_error})"
        )
        st.last_failover = cause
        nxt = next(
            (
                r
                for r in st.ranking
                if r.ap != death.ap and r.ap in st.aps and self._eligible(r, now)
            ),
            None,
        )
        if nxt is not None:
            self._set_active(
                nxt.ap,
                Phase.CONNECTED,
                f"failover: {cause}; now via {nxt.ap} ({_ms(nxt.rtt)})",
                died=death.ap,
            )
        else:
            self._set_active(
                None,
                Phase.NO_AP,
                f"failover: {cause}; no other live AP, traffic takes the no-AP path",
                died=death.ap,
            )
        # Confirm the choice and learn what changed, off the critical path.
        self._reprobe.set()
        self._refresh.set()

    def set_directory(self, aps: Sequence[AccessPoint], ttl: float | None = None) -> None:
        st = self.status
        old = {a.id for a in st.aps}
        new = {a.id for a in aps}
        st.aps = tuple(aps)
        self.slots.update_directory(aps)
        if ttl is not None:
            self._ttl = ttl
        if old != new:
            added, removed = sorted(new - old), sorted(old - new)
            log.info(
                "AP list: %d APs%s%s",
                len(aps),
                f", new {', '.join(added)}" if added and old else "",
                f", gone {', '.join(removed)}" if removed else "",
            )
            self._reprobe.set()
        if self._decided:
            # the exempt set follows the list of known APs
            self._post(self._desired())
            self._slots_changed.set()

    def on_drain_death(self, entry: SlotEntry, death: keepalive.Death) -> None:
        """A draining AP missed K probes: its connections follow the active AP."""
        now = trio.current_time()
        self._hysteresis.mark_dead(entry.ap.id, now)
        self.slots.retire(entry.number, time.time())
        self._retire(entry.number)
        pinned = "" if entry.pinned is None else f" with {entry.pinned} pinned connections"
        log.info(
            "draining AP %s dead%s: %d probes missed, detected %.0f ms after its last answer "
            "(%s); its connections now follow %s",
            entry.ap,
            pinned,
            death.misses,
            death.detection * 1000,
            death.last_error,
            self.active or "the no-AP path",
        )
        self._post(self._desired())
        self._slots_changed.set()

    def on_pins(self, report: PinReport) -> None:
        """Take the pin keeper's round into account: counts, freed slots, dead APs' sockets."""
        st = self.status
        for number, count in report.counts.items():
            entry = self.slots.entries.get(number)
            if entry is not None:
                entry.pinned = count
        for number, (moved, aborted, took) in sorted(report.retired.items()):
            st.sockets_aborted += aborted
            log.info(
                "slot %d: %d connections of its dead AP re-pinned to follow %s, %d local "
                "sockets aborted %.0f ms after the verdict",
                number,
                moved,
                self.active or "the no-AP path",
                aborted,
                took,
            )
        changed = False
        for number in sorted(report.vacated):
            entry = self.slots.vacated(number)
            if entry is None:
                continue
            changed = True
            if entry.role == "draining":
                log.info(
                    "AP %s drained: no connection pinned to it any more after %.0f s; slot %d "
                    "freed",
                    entry.ap,
                    max(0.0, time.time() - entry.since),
                    number,
                )
        if report.orphans:
            log.info(
                "%d connections pinned to slots no AP holds any more now follow the active AP",
                report.orphans,
            )
        if report.error != st.pins_error:
            if report.error is not None:
                log.warning("connection pins: %s", report.error)
            st.pins_error = report.error
        if changed and self._decided:
            self._post(self._desired())
            self._slots_changed.set()

    # --- tasks -------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Discover, then probe, watch and refresh until cancelled.

        Raises:
            DiscoveryError: initial discovery exhausted ``--retries``.
        """
        if self._static is not None:
            self.set_directory(self._static)
        else:
            assert self._discover is not None
            directory = await self._discover(self._cc)
            self.status.cc_last_refresh = time.time()
            self.set_directory(directory.aps, directory.ttl)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._probe_loop)
            nursery.start_soon(self._keepalive_loop)
            nursery.start_soon(self._drain_loop)
            if self._cc is not None:
                nursery.start_soon(self._refresh_loop)
            task_status.started()

    async def _probe_loop(self) -> None:
        while True:
            self._reprobe = trio.Event()
            ranking = await self._probe_all(
                self.status.aps,
                timeout=PROBE_TIMEOUT,
                count=PROBE_COUNT,
                on_first=self._first_answer,
            )
            self.consider(ranking)
            interval = NO_AP_REPROBE_INTERVAL if self.active is None else self._reprobe_interval
            with trio.move_on_after(jittered(interval)):
                await self._reprobe.wait()

    async def _keepalive_loop(self) -> None:
        interval, timeout, misses = self._ka
        while True:
            ap = self.active
            if ap is None:
                await self._active_changed.wait()
                continue
            with trio.CancelScope() as scope:
                self._ka_scope = scope

                def seen(rtt: float, ap: AccessPoint = ap) -> None:
                    self.status.last_rtt[ap.id] = rtt

                death = await keepalive.watch(
                    ap,
                    self._probe_once,
                    interval=interval,
                    probe_timeout=timeout,
                    misses=misses,
                    on_rtt=seen,
                )
            self._ka_scope = None
            if not scope.cancelled_caught and self.active == ap:
                self.on_death(death)

    async def _drain_loop(self) -> None:
        """Keep one slow keepalive per draining AP (none before the first decision: until
        then nothing is applied, and a death would have nowhere to send its connections)."""
        watching: dict[int, tuple[AccessPoint, trio.CancelScope]] = {}
        async with trio.open_nursery() as nursery:
            while True:
                self._slots_changed = trio.Event()
                want = {e.number: e.ap for e in self.slots.draining()} if self._decided else {}
                for number, (ap, scope) in list(watching.items()):
                    if want.get(number) != ap:
                        scope.cancel()
                        del watching[number]
                for number, ap in want.items():
                    if number not in watching:
                        scope = trio.CancelScope()
                        watching[number] = (ap, scope)
                        nursery.start_soon(self._watch_draining, number, ap, scope)
                await self._slots_changed.wait()

    async def _watch_draining(self, number: int, ap: AccessPoint, scope: trio.CancelScope) -> None:
        _interval, timeout, misses = self._ka
        with scope:
            death = await keepalive.watch(
                ap,
                self._probe_once,
                interval=self._drain_interval,
                probe_timeout=timeout,
                misses=misses,
            )
            entry = self.slots.entries.get(number)
            if entry is not None and entry.role == "draining" and entry.ap == ap:
                self.on_drain_death(entry, death)

    async def _refresh_loop(self) -> None:
        failures = 0
        idle = 0  # refreshes in a row that found no usable AP
        while True:
            if failures:
                delay = random.uniform(0, min(REFRESH_RETRY_CAP, 2.0**failures))
            elif self.active is None and idle:
                # No usable AP: ask the CC again soon (the seed's "run the access flow
                # again"), backing off with full jitter so a fleet in trouble does not
                # hammer the CC in step.
                delay = random.uniform(0, min(REFRESH_RETRY_CAP, 2.0**idle))
            else:
                delay = jittered(self._ttl)
            with trio.move_on_after(delay):
                await self._refresh.wait()
            self._refresh = trio.Event()
            try:
                directory = await self._cc.fetch()
            except DiscoveryError as exc:
                failures += 1
                self.status.cc_error = str(exc)
                keep = f"keeping AP {self.active.id}" if self.active else "no AP in use"
                log.warning("CC refresh failed (%s): %s", keep, exc)
                continue
            except SdnsupError as exc:  # pragma: no cover - defensive: never kill the loop
                failures += 1
                log.warning("CC refresh failed: %s", exc)
                continue
            failures = 0
            idle = idle + 1 if self.active is None else 0
            self.status.cc_error = None
            self.status.cc_last_refresh = time.time()
            self.set_directory(directory.aps, directory.ttl)
