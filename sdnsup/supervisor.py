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

An AP that answers its probes but forwards nothing (a gray failure) is found from the traffic
itself and from tracked targets, and confirmed by comparing with another live AP before
anything moves (:mod:`sdnsup.paths`); a confirmed one is handled like a dead AP.

A change of AP breaks no live connection unless its AP died: each AP that carries pinned
connections keeps an AP slot (:mod:`sdnsup.slots`). The AP that stops being active drains:
its connections keep it, under a slower keepalive (``drain_interval``), until the pin keeper
(:mod:`sdnsup.pins`) reports that none is left; if it dies meanwhile, its slot is retired
and its connections follow the active AP at once.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from sdnsup import defaults, keepalive, paths
from sdnsup.aps import AccessPoint, ProbeSpec, Target
from sdnsup.choice import ShouldSwitch, choose, window
from sdnsup.choice import eligible as choice_eligible
from sdnsup.discovery import Directory, Fetcher, OnRetry
from sdnsup.errors import DiscoveryError, SdnsupError
from sdnsup.paths import Failure, PassiveDetector, ProbeTarget, describe_failures
from sdnsup.pins import PinReport
from sdnsup.probe import HOLD_DOWN, Hysteresis, ProbeResult
from sdnsup.refresh import Outcome, RefreshSchedule
from sdnsup.savedlist import SavedList
from sdnsup.slots import SlotEntry, SlotTable
from sdnsup.state import DesiredState, Slot

if TYPE_CHECKING:  # the applier loads libnftables; only its result type is needed here
    from sdnsup.applier import ApplyResult

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# What desired_for needs to route path probes: the AP to compare with, and the targets.
Probes = tuple[AccessPoint | None, frozenset[IPAddress]]

log = logging.getLogger("sdnsup")

# While no AP is usable, a probe round every 2 s (defaults.REPROBE_INTERVAL otherwise).
NO_AP_REPROBE_INTERVAL = 2.0

JITTER = 0.2
# Ranking probes: 3 per AP (loss is meaningful), each with a 1 s deadline: an AP slower
# than that is useless for interactive traffic.
PROBE_COUNT = 3
PROBE_TIMEOUT = 1.0
# After an AP death the survivors are re-probed within this (uniformly): the hosts of a dead
# AP do not all probe every AP in the same instant (the failover itself needs no probe).
REPROBE_SPREAD = 1.0
# An AP whose path fails again within this of its last path failure (a tunnel that stays
# down: its probes answer all along, so the plain hold-down would bring it back every ~12 s)
# is held down twice as long as the last time, up to PATH_HOLD_DOWN_MAX.
PATH_STRIKE_WINDOW = 600.0
PATH_HOLD_DOWN_MAX = 320.0
# An AP the kernel can never use as next hop (this host's own address) is held down this long:
# it answers probes (we answer ourselves), so only the hold-down keeps it from being chosen
# again; an hour, not forever, in case the address moves off this host.
REJECTED_HOLD_DOWN = 3600.0


class Phase(enum.Enum):
    DISCOVERING = "discovering"
    CONNECTED = "connected"
    FAILING_OVER = "failing over"
    NO_AP = "no AP"


ProbeAll = Callable[..., Awaitable[Sequence[ProbeResult]]]
ProbeOnce = Callable[..., Awaitable[float]]


@dataclass
class Status:
    """What the supervisor knows, for ``sdnsup status`` and logs. Times are wall clock."""

    phase: Phase = Phase.DISCOVERING
    active: AccessPoint | None = None
    active_since: float | None = None
    aps: tuple[AccessPoint, ...] = ()
    ranking: tuple[ProbeResult, ...] = ()
    last_rtt: dict[str, float] = field(default_factory=dict)
    failovers: int = 0
    last_failover: str | None = None
    last_failover_at: float | None = None
    cc_last_refresh: float | None = None
    cc_error: str | None = None
    cc_url: str | None = None
    cc_next_refresh: float | None = None  # when the next CC request is due
    # where the AP list in use came from: "cc", "saved" (the saved list, from disk, until
    # the CC answers) or "static" (--ap); when the CC sent it
    aps_source: str = ""
    aps_fetched_at: float | None = None
    saved_error: str | None = None  # the saved list could not be read or written
    host_id: str = ""
    heals: int = 0
    last_heal: str | None = None
    last_heal_at: float | None = None
    started_at: float = field(default_factory=time.time)
    slots: SlotTable = field(default_factory=lambda: SlotTable(0))
    sockets_aborted: int = 0  # local sockets of dead APs' connections
    pins_error: str | None = None  # the pin keeper's last error, None once a round succeeds
    # path health (sdnsup.paths): AP id -> its last verdict; tracked target -> its last
    # results through the active AP and through the AP compared with (None: answered)
    paths: dict[str, PathHealth] = field(default_factory=dict)
    track: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    suspicions: int = 0
    path_failures: int = 0
    # The kernel's truth, from the applier: IP version -> the AP address the last apply routes
    # that family's CIDRs through (None: not through an AP; no dict before any apply), the
    # problems it met, and the last failed apply's error (None once one succeeds)
    kernel_via: dict[int, IPAddress | None] | None = None
    kernel_problems: tuple[str, ...] = ()
    apply_error: str | None = None
    apply_failures: int = 0
    # SIGHUP: reloads applied and refused; the last refusal's reason (None once one works)
    reloads: int = 0
    reload_failures: int = 0
    reload_error: str | None = None
    reloaded_at: float | None = None

    @property
    def kernel_routed(self) -> bool:
        """Whether the kernel, as the last apply left it, routes every family's CIDRs
        through the active AP (the only meaning of "connected")."""
        ap, via = self.active, self.kernel_via
        if ap is None or via is None or self.apply_error is not None:
            return False
        want = {4: ap.addr4, 6: ap.addr6}
        return bool(via) and all(addr is not None and addr == want[v] for v, addr in via.items())


@dataclass(frozen=True, slots=True)
class PathHealth:
    """One AP's path, as far as sdnsup knows: ``ok`` (confirmed forwarding, or a suspicion
    cleared), ``suspect`` (being confirmed) or ``broken`` (confirmed: it forwards nothing),
    with the evidence and when (wall clock)."""

    state: str
    evidence: str
    at: float


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
        passive: the passive path detector (None: passive checking off).
        track: tracked targets (``--track``), besides the CC's.
        probe_mark: the packet mark that routes a path probe through the AP compared with.
        bypass_mark: the packet mark of a path probe that takes the normal route.
        probe_target: the path probe function (:func:`sdnsup.paths.probe_target`).
        track_interval: seconds between rounds of tracked-target probes.
        cc: the CC client (with ``fetch()``) when there is no static list.
        discover: initial discovery with retries: ``await discover(cc, on_retry)``, which
            calls ``on_retry(attempt, error, delay)`` after each failed attempt (see
            :func:`sdnsup.discovery.discover`); raises
            :class:`~sdnsup.errors.DiscoveryError` when the retries are exhausted.
        saved: the saved AP list (:mod:`sdnsup.savedlist`): used at once, and the CC asked
            after a spread delay (:mod:`sdnsup.refresh`) instead of before anything else.
        save: keeps each good CC answer (``await save(directory, fetched_at)``); raises
            :class:`~sdnsup.savedlist.SavedListError`.
        host_id: this host's id, which orders near-equal APs (:mod:`sdnsup.choice`).
        probe_all / probe_once / should_switch: see :mod:`sdnsup.probe`.
    """

    def __init__(
        self,
        *,
        aps: Sequence[AccessPoint] | None,
        desired_for: Callable[
            [AccessPoint | None, Sequence[AccessPoint], tuple[Slot, ...], Probes], DesiredState
        ],
        post: Callable[[DesiredState], None],
        probe_all: ProbeAll,
        probe_once: ProbeOnce,
        should_switch: ShouldSwitch,
        cc: Fetcher | None = None,
        discover: Callable[[Fetcher, OnRetry], Awaitable[Directory]] | None = None,
        keepalive_interval: float = defaults.KEEPALIVE_INTERVAL,
        keepalive_timeout: float = defaults.KEEPALIVE_TIMEOUT,
        keepalive_misses: int = defaults.KEEPALIVE_MISSES,
        reprobe_interval: float = defaults.REPROBE_INTERVAL,
        slot_capacity: int = 7,
        recovered: Sequence[Slot] = (),
        default_probe: ProbeSpec | None = None,
        retire: Callable[[int], None] = lambda _number: None,
        drain_interval: float = defaults.DRAIN_INTERVAL,
        passive: PassiveDetector | None = None,
        track: Sequence[Target] = (),
        probe_mark: int = 0,
        bypass_mark: int = 0,
        probe_target: ProbeTarget = paths.probe_target,
        track_interval: float = defaults.TRACK_INTERVAL,
        saved: SavedList | None = None,
        save: Callable[[Directory, float], Awaitable[None]] | None = None,
        host_id: str = "",
        cc_url: str | None = None,
        saved_error: str | None = None,
    ) -> None:
        # Status is written here only: the daemon reports applies, heals and reloads
        # through the methods below.
        self.status = Status(
            slots=SlotTable(slot_capacity),
            host_id=host_id,
            cc_url=cc_url,
            saved_error=saved_error,
        )
        self._host = host_id
        self._saved = saved
        self._save = save
        self._schedule = RefreshSchedule()
        self._refresh_changed = trio.Event()
        self._reprobe_at = math.inf
        # the first answers of a round while no AP is active (see _answer)
        self._early: list[ProbeResult] = []
        self._early_deadline: float | None = None
        self._early_wake = trio.Event()
        self.slots = self.status.slots
        self._retire = retire
        self._drain_interval = drain_interval
        self._decided = False  # nothing is posted before the first decision
        self._slots_changed = trio.Event()
        self._slot_full_logged: str | None = None
        self._detector = passive
        self._static_track = tuple(track)
        self._cc_track: tuple[Target, ...] = ()
        self._probe_mark = probe_mark
        self._bypass_mark = bypass_mark
        self._probe_target = probe_target
        self._track_interval = track_interval
        # path probes through another AP: the AP, and the targets routed to it
        self._probe_via: AccessPoint | None = None
        self._confirm_targets: frozenset[IPAddress] = frozenset()
        self._track_targets: frozenset[IPAddress] = frozenset()
        self._applied: DesiredState | None = None
        self._applied_changed = trio.Event()
        self._suspicion: list[Failure] = []
        self._suspect = trio.Event()
        self._confirming = False
        self._compared: AccessPoint | None = None  # the other AP of the last comparison
        self._path_strikes: dict[str, tuple[int, float]] = {}  # AP id -> (count, last)
        # AP addresses some apply found on a connected network: off it later means a link
        # that went down (a flap; the keepalive decides), not an AP listed wrongly
        self._seen_on_link: set[IPAddress] = set()
        found = self.slots.recover(recovered, aps or (), default_probe or ProbeSpec(), time.time())
        if found:
            log.info(
                "kept %d AP slots of the previous run, their connections keep their AP: %s",
                len(found),
                ", ".join(f"slot {e.number} {e.ap}" for e in found),
            )
        self._static = tuple(aps) if aps is not None else None
        self._desired_for = desired_for
        self._posted = False  # whether a decision was posted yet (not while discovering)

        def _post(desired: DesiredState) -> None:
            self._posted = True
            post(desired)

        self._post = _post
        self._probe_all = probe_all
        self._probe_once = probe_once
        self._should_switch = should_switch
        self._cc = cc
        self._discover = discover
        self._ka = (keepalive_interval, keepalive_timeout, keepalive_misses)
        self._reprobe_interval = reprobe_interval
        self._hysteresis = Hysteresis()
        self._reprobe = trio.Event()
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

    def set_desired_for(self, desired_for: Callable[..., DesiredState]) -> None:
        """A reload changed what is steered: build states with ``desired_for`` from now on,
        and post the current decision with it at once (the applier diffs it)."""
        self._desired_for = desired_for
        if self._posted:
            self._post(self._desired())

    def _desired(self) -> DesiredState:
        probes = (self._probe_via, self._confirm_targets | self._track_targets)
        return self._desired_for(self.status.active, self._known(), self.slots.state(), probes)

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
            if self._detector is not None:
                self._detector.reset()  # the evidence belonged to the AP before
            if self._ka_scope is not None:
                self._ka_scope.cancel()
            self._active_changed.set()
            self._active_changed = trio.Event()
        log.info("%s", line)
        self._decided = True
        self._post(self._desired())
        self._slots_changed.set()

    def _result_for(self, ap: AccessPoint | None) -> ProbeResult | None:
        return next((r for r in self.status.ranking if r.ap == ap), None)

    def _eligible(self, ranking: Sequence[ProbeResult], now: float) -> list[ProbeResult]:
        """The APs of ``ranking`` this host may choose now (:func:`sdnsup.choice.eligible`)."""
        return choice_eligible(ranking, self.status.aps, lambda k: self._hysteresis.usable(k, now))

    def _answer(self, result: ProbeResult) -> None:
        """One answer of a probe round (a provisional single-probe result). With no AP
        active, the first answer opens a short window in which every AP of its band answers
        too (:func:`sdnsup.choice.window`: 10 ms for nearby APs); the choice among them is
        made when it closes (:meth:`_early_loop`), long before the slowest AP's deadline."""
        if self.active is not None or self._hysteresis.is_held(result.ap.id):
            return
        if result.ap not in self.status.aps or result.rtt is None:
            return
        if self._early_deadline is None:
            self._early_deadline = trio.current_time() + window(result.rtt)
            self._early = []
            self._early_wake.set()
        if all(r.ap != result.ap for r in self._early):  # its first answer only
            self._early.append(result)

    async def _early_loop(self) -> None:
        while True:
            await self._early_wake.wait()
            self._early_wake = trio.Event()
            assert self._early_deadline is not None
            await trio.sleep_until(self._early_deadline)
            answers, self._early, self._early_deadline = self._early, [], None
            if self.active is not None or not answers:
                continue  # the round's ranking decided first
            answers.sort(key=lambda r: r.rtt if r.rtt is not None else math.inf)  # all answered
            choice = choose(
                answers,
                host=self._host,
                active=None,
                listed=True,
                should_switch=self._should_switch,
            )
            if choice is not None:
                r = choice.result
                why = self._why(answers)
                line = f"AP chosen: {r.ap} ({_ms(r.rtt)}, from the first answers{why})"
                self._set_active(r.ap, Phase.CONNECTED, line)

    def _why(self, band: Sequence[ProbeResult]) -> str:
        """How the weighted choice went, for a log line; empty when there was no choice."""
        members = [r for r in band if r is band[0] or not self._should_switch(r, band[0])]
        if len(members) < 2:
            return ""
        return f"; first by this host's weighted choice among {len(members)} near-equal APs"

    def consider(self, ranking: Sequence[ProbeResult]) -> None:
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
        for key in self._hysteresis.observe(ranking, now):
            log.info("AP %s is back: held down, then answered every probe", key)
        log.log(
            logging.INFO if changed else logging.DEBUG,
            "probe ranking: %s",
            ", ".join(f"{r.ap.id} {_ms(r.rtt)}" + (f" {r.sent - r.received}/{r.sent} lost"
                      if r.received < r.sent and r.rtt is not None else "") for r in ranking),
        )  # fmt: skip
        eligible = self._eligible(ranking, now)
        current = self._result_for(self.active)
        if not eligible:
            if self.active is None and st.phase is not Phase.NO_AP:
                self._set_active(None, Phase.NO_AP, "no AP answers: traffic takes the no-AP path")
                self._schedule.no_ap(now)
                self._refresh_changed.set()
            return
        choice = choose(
            eligible,
            host=self._host,
            active=self.active,
            listed=self.active in st.aps,
            should_switch=self._should_switch,
        )
        if choice is None:
            return
        best = choice.result
        if self.active is None:
            why = self._why(eligible)
            self._set_active(
                best.ap, Phase.CONNECTED, f"AP chosen: {best.ap} ({_ms(best.rtt)}{why})"
            )
        elif choice.reason == "unlisted":
            self._set_active(
                best.ap,
                Phase.CONNECTED,
                f"AP {self.active} is no longer listed; switched to {best.ap} ({_ms(best.rtt)})",
            )
        else:
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
            was = f"{self.active} ({_ms(current.rtt if current else None)})"
            if choice.reason == "preferred":
                line = (
                    f"switched to AP {best.ap} ({_ms(best.rtt)}) from {was}: it is back among "
                    "the near-equal APs, where this host's weighted choice puts it first"
                )
            elif current is None or current.rtt is None or current.received <= 0:
                line = (
                    f"switched to AP {best.ap} ({_ms(best.rtt)}) from {self.active}, which did "
                    "not answer this probe round"
                )
            else:
                line = (
                    f"switched to faster AP {best.ap} ({_ms(best.rtt)}) from {was}, more than "
                    f"10 ms and 33% slower than {eligible[0].ap}"
                )
            self._set_active(best.ap, Phase.CONNECTED, line)

    def on_death(self, death: keepalive.Death) -> None:
        """The active AP missed K probes: fail over to the next live AP of the last ranking."""
        self._fail_over(
            death.ap,
            f"AP {death.ap} dead: {death.misses} probes missed, detected "
            f"{death.detection * 1000:.0f} ms after its last answer ({death.last_error})",
        )

    def on_path_broken(self, ap: AccessPoint, evidence: str) -> None:
        """The active AP answers its probes but forwards nothing (confirmed): treat it as
        dead. Its probes keep answering, so the hold-down is what keeps it away: it doubles
        with each path failure that follows the last one closely (see PATH_STRIKE_WINDOW)."""
        st = self.status
        st.path_failures += 1
        hold = self._path_hold_down(ap)
        cause = f"AP {ap} forwards nothing: {evidence}"
        if hold > HOLD_DOWN:
            cause += f"; held down {hold:.0f} s (its path failed again soon after its return)"
        st.paths[ap.id] = PathHealth("broken", evidence, time.time())
        self._fail_over(ap, cause, hold)

    def _path_hold_down(self, ap: AccessPoint) -> float:
        now = trio.current_time()
        strikes, last = self._path_strikes.get(ap.id, (0, -math.inf))
        strikes = strikes + 1 if now - last < PATH_STRIKE_WINDOW else 1
        self._path_strikes[ap.id] = (strikes, now)
        return float(min(PATH_HOLD_DOWN_MAX, HOLD_DOWN * 2.0 ** (strikes - 1)))

    def _fail_over(self, ap: AccessPoint, cause: str, hold_down: float | None = None) -> None:
        now = trio.current_time()
        st = self.status
        self._hysteresis.mark_dead(ap.id, now, hold_down)
        st.failovers += 1
        st.last_failover_at = time.time()
        st.phase = Phase.FAILING_OVER
        st.last_failover = cause
        nxt = self._next_live(ap, now)
        if nxt is not None:
            self._set_active(
                nxt.ap,
                Phase.CONNECTED,
                f"failover: {cause}; now via {nxt.ap} ({_ms(nxt.rtt)})",
                died=ap,
            )
        else:
            self._set_active(
                None,
                Phase.NO_AP,
                f"failover: {cause}; no other live AP, traffic takes the no-AP path",
                died=ap,
            )
        # Confirm the choice and learn what changed, off the critical path and spread out:
        # every host of the dead AP is doing the same right now.
        self._reprobe_soon(random.uniform(0.0, REPROBE_SPREAD))
        if nxt is not None:
            self._schedule.ap_died(now)
        else:
            self._schedule.no_ap(now)
        self._refresh_changed.set()

    def _reprobe_soon(self, delay: float = 0.0) -> None:
        """Start a probe round within ``delay`` seconds (sooner if one is due sooner)."""
        self._reprobe_at = min(self._reprobe_at, trio.current_time() + delay)
        self._reprobe.set()

    def _next_live(self, other_than: AccessPoint | None, now: float) -> ProbeResult | None:
        """The live, usable AP of the last ranking this host would choose if ``other_than``
        were gone: its next one by weighted choice among the near-equal APs left."""
        st = self.status
        eligible = [r for r in self._eligible(st.ranking, now) if r.ap != other_than]
        choice = choose(
            eligible, host=self._host, active=None, listed=True, should_switch=self._should_switch
        )
        return choice.result if choice is not None else None

    def set_directory(
        self,
        aps: Sequence[AccessPoint],
        ttl: float | None = None,
        track: Sequence[Target] = (),
    ) -> None:
        st = self.status
        self._cc_track = tuple(track)
        old = {a.id for a in st.aps}
        new = {a.id for a in aps}
        st.aps = tuple(aps)
        self.slots.update_directory(aps)
        if ttl is not None:
            self._schedule.ttl = ttl
        if old != new:
            added, removed = sorted(new - old), sorted(old - new)
            log.info(
                "AP list: %d APs%s%s",
                len(aps),
                f", new {', '.join(added)}" if added and old else "",
                f", gone {', '.join(removed)}" if removed else "",
            )
            self._reprobe_soon()
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
        self._observe_paths(report)

    def _observe_paths(self, report: PinReport) -> None:
        """Feed the passive detector the active AP's unanswered attempts; a suspicion wakes
        the confirmation task."""
        active = self.slots.active
        if self._detector is None or active is None or report.polled_slot != active.number:
            return
        if self._confirming or report.error is not None:
            return
        failures = self._detector.observe(report.unanswered, trio.current_time())
        if failures:
            self._suspicion = failures
            self._suspect.set()

    def applied(self, desired: DesiredState, result: ApplyResult | None = None) -> None:
        """The applier applied ``desired`` (the daemon calls this after every apply, with
        its :class:`~sdnsup.applier.ApplyResult`; None: as intended, as in tests)."""
        self._applied = desired
        self._applied_changed.set()
        self._applied_changed = trio.Event()
        st, ap = self.status, self.status.active
        st.apply_error = None
        if result is None:
            st.kernel_problems = ()
            addrs = ((4, ap.addr4), (6, ap.addr6)) if ap is not None else ((4, None),)
            st.kernel_via = {version: addr for version, addr in addrs if addr is not None}
            return
        st.kernel_problems = tuple(result.problems)
        # The families the AP serves: an IPv4-only AP among dual-stack ones carries the IPv4
        # CIDRs (the IPv6 ones take the no-AP path) and is connected.
        st.kernel_via = {
            version: want if version in result.ap_links else None
            for version, cidrs, want in (
                (4, desired.cidrs4, desired.ap4),
                (6, desired.cidrs6, desired.ap6),
            )
            if cidrs and want is not None
        }
        rejected = result.rejected
        why = (
            next((rejected[a] for a in (ap.addr4, ap.addr6) if a in rejected), None) if ap else None
        )
        if ap is not None and why is not None:
            # Permanent: held down until the directory changes it (a new list forgets it).
            self._fail_over(ap, f"AP {ap} rejected: {why}", REJECTED_HOLD_DOWN)
            return
        # An AP off every connected network answers its probes (they take the main table)
        # while the CIDRs it should carry take the no-AP path: as useless as a dead one. It
        # may come back (a route or an address added), so it is held down like a failed path,
        # longer each time it fails again soon (an AP listed wrongly does not churn). One that
        # was on a connected network before is behind a link that went down: a flap is
        # over in a moment, and the keepalive tells it from a dead path.
        for version in result.ap_links:
            addr = desired.ap4 if version == 4 else desired.ap6
            if addr is not None:
                self._seen_on_link.add(addr)
        if ap is None:
            return
        used = (desired.ap4 if desired.cidrs4 else None, desired.ap6 if desired.cidrs6 else None)
        mine = [a for a in used if a is not None and a in (ap.addr4, ap.addr6)]
        why = next(
            (
                result.unusable[a]
                for a in mine
                if a in result.unusable and a not in self._seen_on_link
            ),
            None,
        )
        if why is not None:
            self._fail_over(ap, f"AP {ap} cannot carry the CIDRs: {why}", self._path_hold_down(ap))

    def apply_failed(self, error: str) -> None:
        """An apply failed (the applier retries): the kernel may not be what was intended."""
        st = self.status
        st.apply_error = error
        st.apply_failures += 1

    def healed(self, cause: str) -> None:
        """The applier put back what someone removed or changed (``cause``: what it found)."""
        st = self.status
        st.heals += 1
        st.last_heal, st.last_heal_at = cause, time.time()

    def reloaded(self, error: str | None) -> None:
        """A SIGHUP reload was applied (None) or refused, the running configuration kept
        (``error``: why)."""
        st = self.status
        if error is None:
            st.reloads += 1
        else:
            st.reload_failures += 1
        st.reload_error, st.reloaded_at = error, time.time()

    def _track_list(self) -> tuple[Target, ...]:
        """Tracked targets now: ``--track``, the CC's, and the active AP's own."""
        active = self.active.track if self.active is not None else ()
        return tuple(dict.fromkeys((*self._static_track, *self._cc_track, *active)))

    async def _route_probes(
        self, via: AccessPoint, *, confirm: Sequence[Target] | None = None, timeout: float = 2.0
    ) -> bool:
        """Make the kernel route probe-marked packets to the targets through ``via`` (the
        tracked targets, and ``confirm`` if given); whether it does within ``timeout``."""
        if confirm is not None:
            self._confirm_targets = frozenset(t.addr for t in confirm)
        self._track_targets = frozenset(t.addr for t in self._track_list())
        want = self._confirm_targets | self._track_targets
        addrs = (via.addr4, via.addr6)

        def routed() -> bool:
            d = self._applied
            return (
                d is not None and (d.probe_via4, d.probe_via6) == addrs and want <= d.probe_targets
            )

        if self._probe_via != via or not routed():
            self._probe_via = via
            self._post(self._desired())
        with trio.move_on_after(timeout):
            while not routed():
                await self._applied_changed.wait()
            return True
        return False

    async def _path_loop(self) -> None:
        """Confirm each suspicion of the passive detector (one at a time)."""
        while True:
            await self._suspect.wait()
            self._suspect = trio.Event()
            ap, failures = self.active, self._suspicion
            if ap is None or not failures:
                continue
            self._confirming = True
            try:
                await self._confirm(ap, failures)
            finally:
                self._confirming = False
                if self._detector is not None:
                    self._detector.clear()
                if self._confirm_targets:
                    self._confirm_targets = frozenset()
                    self._post(self._desired())

    async def _confirm(self, ap: AccessPoint, failures: list[Failure]) -> None:
        st = self.status
        st.suspicions += 1
        evidence = describe_failures(failures)
        st.paths[ap.id] = PathHealth("suspect", evidence, time.time())
        result = await self._compare(ap, [f.target for f in failures[: paths.CONFIRM_TARGETS]])
        if result is None or self.active != ap:
            return  # could not probe, or something else moved off it meanwhile
        if result.broken:
            self._path_broken(ap, result, f"{evidence}; confirmed: {result.evidence()}")
        elif result.targets_down:
            assert self._detector is not None
            self._detector.excuse((t.addr for t in result.active), trio.current_time())
            note = f"destinations down: {result.evidence()}"
            st.paths[ap.id] = PathHealth("ok", note, time.time())
            log.info(
                "suspicion on AP %s cleared: the destinations answer no way (%s): they are "
                "down, not the path; ignoring them for %.0f s",
                ap,
                result.evidence(),
                paths.EXCUSE,
            )
        else:
            note = f"suspicion cleared: {result.evidence()}"
            st.paths[ap.id] = PathHealth("ok", note, time.time())
            log.info("suspicion on AP %s cleared: %s", ap, result.evidence())

    async def _compare(
        self,
        ap: AccessPoint,
        targets: Sequence[Target],
        *,
        timeout: float = paths.CONFIRM_TIMEOUT,
        quiet: bool = False,
    ) -> paths.Comparison | None:
        """Probe ``targets`` through ``ap`` (active), the next live AP and the normal route;
        None when the probe routes could not be set up in time."""
        other = self._next_live(ap, trio.current_time())
        if not quiet:
            via = f"{other.ap} and the normal route" if other else "the normal route"
            log.warning(
                "AP %s suspect: %s; comparing through %s",
                ap,
                self.status.paths[ap.id].evidence,
                via,
            )
        # a confirmation routes its own targets; tracked targets are always routed
        confirm = None if quiet else targets
        if other is not None and not await self._route_probes(other.ap, confirm=confirm):
            log.warning("path probes of AP %s skipped: the probe routes were not applied", ap)
            return None
        other_mark = self._probe_mark if other is not None else None
        result = await paths.compare(
            targets, self._probe_target, other_mark, self._bypass_mark, timeout
        )
        self._compared = other.ap if other is not None else None
        return result

    def _path_broken(self, ap: AccessPoint, result: paths.Comparison, evidence: str) -> None:
        """Confirmed: ``ap`` forwards nothing; the AP compared with too if it got nothing
        while the normal route got answers (then every AP may be broken)."""
        other = self._compared
        if result.other_broken and other is not None:
            log.warning("AP %s forwards nothing either (%s): held down", other, result.evidence())
            self._hysteresis.mark_dead(other.id, trio.current_time())
            self.status.paths[other.id] = PathHealth("broken", result.evidence(), time.time())
        self.on_path_broken(ap, evidence)

    async def _track_loop(self) -> None:
        """Probe the tracked targets through the active AP, another live AP and the normal
        route every track interval; TRACK_MISSES rounds in a row with nothing answering
        through the active AP while something answers another way make it broken."""
        misses = 0
        quiet_logged = False
        while True:
            started = trio.current_time()
            targets, ap = self._track_list(), self.active
            if not targets or ap is None:
                misses = 0
                await trio.sleep(max(self._track_interval, 1.0))
                continue
            result = await self._compare(ap, targets, timeout=self._track_interval, quiet=True)
            if result is None:
                await trio.sleep_until(started + self._track_interval)
                continue
            self.status.track = {
                str(t): (result.active.get(t), (result.other or result.normal).get(t))
                for t in targets
            }
            if self.active != ap:
                misses = 0
            elif result.broken:
                misses += 1
                if misses >= defaults.TRACK_MISSES:
                    misses = 0
                    self._path_broken(
                        ap,
                        result,
                        f"tracked targets answer only another way, {defaults.TRACK_MISSES} "
                        f"rounds in a row: {result.evidence()}",
                    )
            else:
                misses = 0
                if result.targets_down and not quiet_logged:
                    log.warning(
                        "tracked targets answer no way (%s): they are down, not the APs; "
                        "nothing changes",
                        result.evidence(),
                    )
                quiet_logged = result.targets_down
                if not result.targets_down:
                    self.status.paths[ap.id] = PathHealth(
                        "ok", f"tracked targets: {result.evidence()}", time.time()
                    )
            await trio.sleep_until(started + self._track_interval)

    # --- tasks -------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """:meth:`start`, then :meth:`watch` until cancelled.

        Raises:
            DiscoveryError: initial discovery exhausted ``--retries``.
        """
        await self.start()
        await self.watch(task_status=task_status)

    async def start(self) -> None:
        """Take the first AP list: the static one, the one saved on disk, or the CC's.

        Raises:
            DiscoveryError: initial discovery exhausted ``--retries``.
        """
        st = self.status
        if self._static is not None:
            st.aps_source = "static"
            self.set_directory(self._static)
        elif self._saved is not None:
            saved = self._saved.directory
            st.aps_source, st.aps_fetched_at = "saved", self._saved.fetched_at
            self._schedule.ttl = saved.ttl
            self._schedule.start(trio.current_time(), saved=True)
            log.info(
                "AP list from disk: %d APs, received from the CC %s ago; asking the CC in %.0f s",
                len(saved.aps),
                _age(time.time() - self._saved.fetched_at),
                self._schedule.due - trio.current_time(),
            )
            self.set_directory(saved.aps, saved.ttl, saved.track)
        else:
            assert self._discover is not None and self._cc is not None  # neither static nor saved
            directory = await self._discover(self._cc, self._discovery_failed)
            self._schedule.ttl = directory.ttl
            self._schedule.start(trio.current_time(), saved=False)
            await self._took_answer(directory)

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Probe, keep the active and draining APs under keepalive, check paths and refresh
        the AP list, until cancelled.

        Restartable: its loops work from this object's state (the list, the active AP, the
        slots), so after a crash :func:`sdnsup.daemon.supervised` starts it again and it
        carries on with the same AP.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._probe_loop)
            nursery.start_soon(self._early_loop)
            nursery.start_soon(self._keepalive_loop)
            nursery.start_soon(self._drain_loop)
            nursery.start_soon(self._path_loop)
            nursery.start_soon(self._track_loop)
            if self._cc is not None:
                nursery.start_soon(self._refresh_loop)
            task_status.started()

    def _discovery_failed(self, attempt: int, error: DiscoveryError, delay: float) -> None:
        """A first-boot CC attempt failed: what the log says, status says too."""
        self.status.cc_error = f"attempt {attempt}: {error}"
        self.status.cc_next_refresh = time.time() + delay
        log.warning("CC attempt %d failed: %s; next attempt in %.1f s", attempt, error, delay)

    async def _took_answer(self, directory: Directory) -> None:
        """A good CC answer: use it, and keep it on disk for the next start."""
        st = self.status
        now = time.time()
        st.cc_error = None
        st.cc_last_refresh = st.aps_fetched_at = now
        st.aps_source = "cc"
        self.set_directory(directory.aps, directory.ttl, directory.track)
        if self._save is None:
            return
        try:
            await self._save(directory, now)
        except SdnsupError as exc:
            if str(exc) != st.saved_error:
                log.warning("%s", exc)
            st.saved_error = str(exc)
        else:
            if st.saved_error is not None:
                log.info("AP list saved to disk again")
            st.saved_error = None

    async def _probe_loop(self) -> None:
        while True:
            self._reprobe = trio.Event()
            self._reprobe_at = math.inf
            ranking = await self._probe_all(
                self.status.aps,
                timeout=PROBE_TIMEOUT,
                count=PROBE_COUNT,
                on_answer=self._answer,
            )
            self.consider(ranking)
            interval = NO_AP_REPROBE_INTERVAL if self.active is None else self._reprobe_interval
            deadline = trio.current_time() + jittered(interval)
            while trio.current_time() < min(deadline, self._reprobe_at):
                # a request (_reprobe_soon) sets the event and may move _reprobe_at closer
                with trio.move_on_at(min(deadline, self._reprobe_at)):
                    await self._reprobe.wait()
                self._reprobe = trio.Event()

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
        """Ask the CC when the schedule says (:mod:`sdnsup.refresh`); a failure keeps the
        current list and AP."""
        st, schedule, cc = self.status, self._schedule, self._cc
        assert cc is not None  # started only with a CC
        while True:
            self._refresh_changed = trio.Event()
            due = schedule.due - trio.current_time()
            st.cc_next_refresh = time.time() + max(0.0, due) if math.isfinite(due) else None
            with trio.move_on_at(schedule.due):
                await self._refresh_changed.wait()
                continue  # the schedule changed (an AP died, no AP left): look again
            schedule.fire(trio.current_time())
            try:
                directory = await cc.fetch()
            except DiscoveryError as exc:
                outcome = Outcome(False, exc.overloaded, exc.retry_after)
                schedule.done(trio.current_time(), outcome, has_ap=self.active is not None)
                st.cc_error = str(exc)
                keep = f"keeping AP {self.active.id}" if self.active else "no AP in use"
                log.warning(
                    "CC refresh failed (%s): %s; next attempt in %.0f s",
                    keep,
                    exc,
                    schedule.due - trio.current_time(),
                )
                continue
            await self._took_answer(directory)
            has_ap = self.active is not None
            schedule.done(trio.current_time(), Outcome(True), has_ap=has_ap, ttl=directory.ttl)


def _age(seconds: float) -> str:
    """A duration for a log line: 42 s, 17 min, 5.2 h, 3.1 d."""
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
