"""The supervisor's decisions, with fake probes on trio's MockClock (virtual time)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import trio
import trio.testing

from sdnsup import probe
from sdnsup.aps import AccessPoint, Target
from sdnsup.errors import SdnsupError
from sdnsup.pins import PinReport
from sdnsup.probe import HOLD_DOWN, should_switch
from sdnsup.state import Slot
from sdnsup.supervisor import Phase, Supervisor


def ap(i: int) -> AccessPoint:
    return AccessPoint(f"ap{i}", addr4=ipaddress.IPv4Address(f"10.77.0.{10 + i}"))


AP1, AP2, AP3 = ap(1), ap(2), ap(3)


@dataclass(frozen=True)
class Posted:
    """What the supervisor posted (the fields of a DesiredState it sets)."""

    active: AccessPoint | None
    slots: tuple
    probe_via4: object
    probe_targets: frozenset
    probe_via6: object = None


PROBE_MARK = 0x2  # any values: the fake tells probes through the other AP by it,
BYPASS_MARK = 0x80  # and those taking the normal route by this one


class World:
    """Fake APs: an RTT per AP (None = dead); probes take that long in virtual time."""

    def __init__(self, rtts: dict[AccessPoint, float | None]) -> None:
        self.rtts = dict(rtts)
        self.posted: list[AccessPoint | None] = []
        self.posted_at: list[float] = []
        self.slots: list[tuple[Slot, ...]] = []  # the slots of every posted state
        self.probed: list[tuple[float, AccessPoint]] = []  # keepalive probes (time, AP)
        self.retired: list[int] = []
        self.rounds = 0
        self.round_times: list[float] = []  # when each probe round began
        self.sup: Supervisor | None = None
        self.last = Posted(None, (), None, frozenset())
        self.broken: set[AccessPoint] = set()  # APs that answer probes but forward nothing
        self.down: set[object] = set()  # target addresses that answer through no AP
        self.normal_route = False  # whether the CIDRs are reachable without any AP
        self.path_probes: list[tuple[float, Target, AccessPoint | None]] = []

    def post(self, state: Posted) -> None:
        self.posted.append(state.active)
        self.posted_at.append(trio.current_time())
        self.slots.append(state.slots)
        self.last = state
        if self.sup is not None:
            self.sup.applied(state)  # as if the applier applied it at once

    async def probe_target(self, target: Target, mark: int | None, timeout: float) -> str | None:
        """A path probe: through the active AP (no mark) or the AP the probe routes lead to."""
        if mark == BYPASS_MARK:
            via = "normal route" if self.normal_route else None
        elif mark is None:
            via = self.sup.active if self.sup is not None else None
        else:
            via = next((a for a in self.rtts if a.addr4 == self.last.probe_via4), None)
            if target.addr not in self.last.probe_targets:
                via = None  # no probe route to it: the probe goes nowhere useful
        self.path_probes.append((trio.current_time(), target, via))
        if via is None or via in self.broken or target.addr in self.down:
            await trio.sleep(timeout)
            return "timeout"
        await trio.sleep(0.005)
        return None

    async def probe_once(self, ap: AccessPoint, *, timeout: float) -> float:
        self.probed.append((trio.current_time(), ap))
        return await self.answer(ap, timeout=timeout)

    async def answer(self, ap: AccessPoint, *, timeout: float) -> float:
        """The fake network: ``ap`` answers after its RTT, or never."""
        rtt = self.rtts.get(ap)
        if rtt is None or rtt > timeout:
            await trio.sleep(timeout)
            raise SdnsupError(f"{ap.id} did not answer")
        await trio.sleep(rtt)
        return rtt

    async def probe_all(self, aps, *, timeout, count, on_answer=None):
        """The daemon's own round (:func:`sdnsup.probe.probe_all`: its spacing, its
        ranking), probing the fake network (not counted in ``probed``)."""
        self.rounds += 1
        self.round_times.append(trio.current_time())
        return await probe.probe_all(
            aps, timeout=timeout, count=count, on_answer=on_answer, probe=self.answer
        )

    def make(self, aps, **kw) -> Supervisor:
        kw.setdefault("retire", self.retired.append)
        kw.setdefault("probe_target", self.probe_target)
        kw.setdefault("probe_mark", PROBE_MARK)
        kw.setdefault("bypass_mark", BYPASS_MARK)
        self.sup = Supervisor(
            aps=aps,
            # the test records the active AP, the slots and the probe routes themselves
            desired_for=lambda active, known, slots, probes: Posted(
                active, slots, probes[0].addr4 if probes[0] else None, probes[1]
            ),
            post=self.post,
            probe_all=self.probe_all,
            probe_once=self.probe_once,
            should_switch=should_switch,
            **kw,
        )
        return self.sup


def run(world: World, sup: Supervisor, scenario) -> None:
    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.run)
            await scenario()
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_fastest_is_chosen_without_waiting_for_the_slowest():
    world = World({AP1: 0.080, AP2: 0.005, AP3: 0.040})
    sup = world.make([AP1, AP2, AP3])
    chosen_at = []

    async def scenario():
        while sup.active is None:  # noqa: ASYNC110
            await trio.sleep(0.001)
        chosen_at.append(trio.current_time())
        await trio.sleep(1)

    run(world, sup, scenario)
    assert world.posted[0] == AP2
    assert chosen_at[0] < 0.02  # decided at the 5 ms answer, not the 80 ms one
    assert sup.status.phase is Phase.CONNECTED


def test_failover_goes_to_next_live_ap_of_the_ranking():
    world = World({AP1: 0.005, AP2: 0.040, AP3: 0.020})
    sup = world.make([AP1, AP2, AP3])

    async def scenario():
        await trio.sleep(2)
        world.rtts[AP1] = None  # the active AP dies
        rounds = world.rounds
        await trio.sleep(1.0)
        # failed over to AP3 (next in the ranking) before any new probe round decided it
        assert sup.active == AP3
        assert world.rounds <= rounds + 1
        await trio.sleep(5)

    run(world, sup, scenario)
    assert world.posted[:2] == [AP1, AP3]
    assert sup.status.failovers == 1
    assert "detected" in (sup.status.last_failover or "")


def test_all_dead_then_one_returns_after_hold_down():
    world = World({AP1: 0.005, AP2: 0.010})
    sup = world.make([AP1, AP2])

    async def scenario():
        await trio.sleep(1)
        world.rtts[AP1] = world.rtts[AP2] = None
        await trio.sleep(3)
        assert sup.active is None and sup.status.phase is Phase.NO_AP
        world.rtts[AP2] = 0.010
        await trio.sleep(HOLD_DOWN / 2)
        assert sup.active is None  # still held down
        await trio.sleep(HOLD_DOWN)
        assert sup.active == AP2

    run(world, sup, scenario)
    assert None in world.posted


def test_a_jittery_ap_does_not_cause_flapping_but_a_clearly_faster_one_wins_once():
    world = World({AP1: 0.040, AP2: 0.060})
    sup = world.make([AP1, AP2], reprobe_interval=5.0)

    async def scenario():
        await trio.sleep(1)
        for rtt in (0.035, 0.045, 0.032, 0.048, 0.036):  # AP2 jitters around AP1
            world.rtts[AP2] = rtt
            await trio.sleep(6)
        world.rtts[AP2] = 0.005  # now clearly faster: >10 ms and >33% better
        await trio.sleep(12)

    run(world, sup, scenario)
    switches = [a for i, a in enumerate(world.posted) if i == 0 or a != world.posted[i - 1]]
    assert switches == [AP1, AP2]


def test_cc_refresh_failure_keeps_the_current_ap_and_new_list_is_used():
    from sdnsup.errors import DiscoveryError

    world = World({AP1: 0.005})

    @dataclass
    class Directory:
        aps: tuple
        ttl: float
        track: tuple = ()

    class CC:
        def __init__(self):
            self.answers = [Directory((AP1,), 10.0)]
            self.calls = 0

        async def fetch(self):
            self.calls += 1
            answer = self.answers[0] if self.answers else None
            if answer is None:
                raise DiscoveryError("CC refused the connection")
            return answer

    cc = CC()

    async def discover(client, on_retry):
        return await client.fetch()

    sup = world.make(None, cc=cc, discover=discover)

    async def scenario():
        await trio.sleep(1)
        assert sup.active == AP1
        cc.answers = []  # CC down
        await trio.sleep(30)
        assert sup.active == AP1 and sup.status.cc_error
        world.rtts[AP1] = None  # AP dies while the CC is down
        world.rtts[AP2] = 0.008
        await trio.sleep(5)
        assert sup.active is None
        cc.answers = [Directory((AP2,), 10.0)]  # CC back, with a new AP
        await trio.sleep(90)
        assert sup.active == AP2

    run(world, sup, scenario)


# --- AP slots: the AP that stops being active drains ------------------------------------------


def slot(number, ap, draining=False):
    return Slot(number, ap.addr4, ap.addr6, draining)


def test_a_faster_ap_takes_new_connections_while_the_old_one_drains_then_is_freed():
    world = World({AP1: 0.040, AP2: 0.060})
    sup = world.make([AP1, AP2], reprobe_interval=5.0, drain_interval=1.0)

    async def scenario():
        await trio.sleep(1)
        assert world.slots[-1] == (slot(1, AP1),)
        world.rtts[AP2] = 0.005
        with trio.fail_after(7):
            while sup.active != AP2:  # noqa: ASYNC110 - virtual time
                await trio.sleep(0.01)
        # AP1 keeps its slot, draining: its connections keep it
        assert world.slots[-1] == (slot(1, AP1, draining=True), slot(2, AP2))
        # ...and stays under a keepalive at the slower cadence
        switched = trio.current_time()
        await trio.sleep(3)
        probes = [t for t, a in world.probed if a == AP1 and t > switched]
        assert 3 <= len(probes) <= 4  # every second (and maybe one probe round)
        sup.on_pins(PinReport(counts={1: 3}))
        assert sup.slots.entries[1].pinned == 3
        await trio.sleep(3)
        assert world.slots[-1][0].draining  # still draining: 3 connections left
        sup.on_pins(PinReport(counts={1: 0}, vacated=frozenset({1})))
        assert world.slots[-1] == (slot(2, AP2),)
        before = len([1 for _, a in world.probed if a == AP1])
        await trio.sleep(5)
        # its keepalive stopped with the slot (only probe rounds reach it now)
        assert len([1 for _, a in world.probed if a == AP1]) - before <= 1

    run(world, sup, scenario)
    assert world.retired == []


def test_a_draining_ap_that_dies_is_retired_and_its_connections_follow_the_active_one():
    world = World({AP1: 0.040, AP2: 0.060})
    sup = world.make([AP1, AP2], reprobe_interval=5.0, drain_interval=1.0)

    async def scenario():
        await trio.sleep(1)
        world.rtts[AP2] = 0.005
        await trio.sleep(7)
        assert world.slots[-1][0] == slot(1, AP1, draining=True)
        world.rtts[AP1] = None
        await trio.sleep(4)  # 3 misses at a 1 s interval
        assert world.retired == [1]
        assert world.slots[-1] == (slot(2, AP2),)  # its routes go: packets take the active AP
        assert sup.slots.entries[1].role == "dead"  # ... but the number is not free yet
        sup.on_pins(PinReport(vacated=frozenset({1}), retired={1: (2, 1, 3.0)}))
        assert 1 not in sup.slots.entries and sup.status.sockets_aborted == 1

    run(world, sup, scenario)
    assert sup.active == AP2


def test_the_active_ap_dying_retires_its_slot_and_fail_back_reuses_the_draining_slot():
    world = World({AP1: 0.005, AP2: 0.020, AP3: 0.040})
    sup = world.make([AP1, AP2, AP3], reprobe_interval=5.0)

    async def scenario():
        await trio.sleep(1)
        world.rtts[AP1] = None
        await trio.sleep(2)
        assert sup.active == AP2 and world.retired == [1]
        assert world.slots[-1] == (slot(2, AP2),)
        # AP1 comes back: after the hold-down it is chosen again, AP2 drains
        world.rtts[AP1] = 0.005
        sup.on_pins(PinReport(vacated=frozenset({1})))
        await trio.sleep(HOLD_DOWN + 12)
        assert sup.active == AP1
        assert world.slots[-1] == (slot(1, AP1), slot(2, AP2, draining=True))
        # and back to AP2: it takes its own slot again, without a new number
        world.rtts[AP1] = 0.100
        await trio.sleep(12)
        assert sup.active == AP2
        assert world.slots[-1] == (slot(1, AP1, draining=True), slot(2, AP2))

    run(world, sup, scenario)


def test_no_optional_switch_while_every_slot_holds_connections():
    aps = [ap(i) for i in range(1, 6)]
    world = World({a: 0.200 for a in aps})
    world.rtts[aps[0]] = 0.150
    sup = world.make(aps, reprobe_interval=5.0, slot_capacity=3)

    async def scenario():
        await trio.sleep(1)
        # each AP in turn becomes clearly faster; none drains (connections stay pinned)
        for a, rtt in zip(aps[1:], (0.080, 0.040, 0.015, 0.003), strict=True):
            world.rtts[a] = rtt
            await trio.sleep(13)
        # three slots: aps 0-2 took them; 3 and 4 are faster but would leave new
        # connections unpinned, so sdnsup stays on aps[2]
        assert sup.active == aps[2]
        assert [s.number for s in world.slots[-1]] == [1, 2, 3]
        sup.on_pins(PinReport(counts={1: 0}, vacated=frozenset({1})))
        await trio.sleep(13)
        assert sup.active == aps[4]  # a slot was freed: the fastest wins it
        assert world.slots[-1][0] == slot(1, aps[4])

    run(world, sup, scenario)


def test_recovered_slots_drain_and_the_chosen_ap_reuses_its_own():
    world = World({AP1: 0.040, AP2: 0.005})
    recovered = (slot(3, AP1), slot(5, AP2, draining=True))
    sup = world.make([AP1, AP2], recovered=recovered)

    async def scenario():
        await trio.sleep(0.001)
        assert world.posted == []  # nothing decided, nothing applied: the kernel keeps all
        await trio.sleep(1)

    run(world, sup, scenario)
    assert sup.active == AP2
    assert world.slots[0] == (slot(3, AP1, draining=True), slot(5, AP2))


# --- gray failures: an AP that answers its probes but forwards nothing ------------------------

from sdnsup.conntrack import Entry  # noqa: E402
from sdnsup.paths import PassiveDetector  # noqa: E402


def unanswered(*dsts: str, port: int = 443) -> tuple[Entry, ...]:
    """Connection attempts through the active AP that never saw a reply, one per destination."""
    return tuple(
        Entry(2, 6, ipaddress.ip_address("172.31.1.2"), ipaddress.ip_address(d), 40000 + i,
              port, 0x2002, 1, replied=False)
        for i, d in enumerate(dsts)
    )  # fmt: skip


async def poll(sup: Supervisor, entries: tuple[Entry, ...], seconds: float) -> None:
    """What the pin keeper reports every 0.5 s while ``entries`` stay unanswered."""
    end = trio.current_time() + seconds
    while trio.current_time() < end:
        slot = sup.slots.active.number if sup.slots.active else None
        sup.on_pins(PinReport(polled_slot=slot, unanswered=entries))
        await trio.sleep(0.5)


def test_unanswered_attempts_to_three_destinations_confirmed_through_another_ap_fail_over():
    world = World({AP1: 0.005, AP2: 0.020})
    sup = world.make([AP1, AP2], passive=PassiveDetector())

    async def scenario():
        await trio.sleep(1)
        world.broken.add(AP1)  # its overlay side died; it still answers probes
        t0 = trio.current_time()
        await poll(sup, unanswered("10.10.10.1", "10.10.10.2", "10.10.20.3"), 3)
        assert sup.active == AP2
        # compared: the same destinations, through AP1 and, by the probe mark, through AP2
        compared = {(str(t.addr), t.port, via) for _, t, via in world.path_probes}
        assert ("10.10.10.1", 443, AP1) in compared and ("10.10.10.1", 443, AP2) in compared
        first = min(t for t, *_ in world.path_probes)
        assert 1.0 <= first - t0 <= 2.0  # an attempt is unanswered after 1 s, polled at 0.5 s

    run(world, sup, scenario)
    assert sup.status.path_failures == 1 and sup.status.paths["ap1"].state == "broken"
    assert "forwards nothing" in (sup.status.last_failover or "")
    assert world.retired == [1]  # its connections move, its sockets are aborted


def test_one_dead_destination_never_moves_anything():
    world = World({AP1: 0.005, AP2: 0.020})
    sup = world.make([AP1, AP2], passive=PassiveDetector())

    async def scenario():
        await trio.sleep(1)
        world.down.add(ipaddress.ip_address("10.10.10.9"))
        # a minute of failed attempts to one server, a new one every poll
        for i in range(120):
            sup.on_pins(
                PinReport(polled_slot=1, unanswered=unanswered(*["10.10.10.9"] * (i % 7 + 1)))
            )
            await trio.sleep(0.5)

    run(world, sup, scenario)
    assert sup.active == AP1 and world.path_probes == [] and sup.status.suspicions == 0


def test_destinations_down_through_every_ap_clear_the_suspicion_and_are_excused():
    world = World({AP1: 0.005, AP2: 0.020})
    sup = world.make([AP1, AP2], passive=PassiveDetector())
    dead = ("10.10.10.1", "10.10.10.2", "10.10.10.3")

    async def scenario():
        await trio.sleep(1)
        world.down.update(ipaddress.ip_address(d) for d in dead)
        await poll(sup, unanswered(*dead), 30)

    run(world, sup, scenario)
    assert sup.active == AP1
    assert sup.status.suspicions == 1  # confirmed once, then excused: no probing every poll
    assert sup.status.paths["ap1"].state == "ok"


def test_no_failover_on_suspicion_without_another_live_ap_to_compare_with():
    world = World({AP1: 0.005, AP2: None})
    sup = world.make([AP1, AP2], passive=PassiveDetector())

    async def scenario():
        await trio.sleep(1)
        world.broken.add(AP1)
        await poll(sup, unanswered("10.10.10.1", "10.10.10.2", "10.10.10.3"), 5)

    run(world, sup, scenario)
    assert sup.active == AP1 and sup.status.path_failures == 0


def test_tracked_targets_lost_through_the_active_ap_only_fail_over_within_a_second():
    world = World({AP1: 0.005, AP2: 0.020})
    targets = (
        Target(ipaddress.ip_address("10.10.10.1")),
        Target(ipaddress.ip_address("10.10.20.1"), "tcp", 22),
    )
    sup = world.make([AP1, AP2], track=targets)

    async def scenario():
        await trio.sleep(2)
        assert sup.active == AP1 and sup.status.track  # probed, fine
        assert world.last.probe_targets == {t.addr for t in targets}  # routed via AP2
        world.broken.add(AP1)
        t0 = trio.current_time()
        while sup.active == AP1:  # noqa: ASYNC110 - virtual time
            await trio.sleep(0.01)
        assert trio.current_time() - t0 < 1.0

    run(world, sup, scenario)
    assert "tracked targets answer only another way" in (sup.status.last_failover or "")


def test_tracked_targets_lost_through_every_ap_change_nothing():
    world = World({AP1: 0.005, AP2: 0.020})
    target = Target(ipaddress.ip_address("10.10.10.1"))
    sup = world.make([AP1, AP2], track=(target,))

    async def scenario():
        await trio.sleep(2)
        world.down.add(target.addr)
        await trio.sleep(30)

    run(world, sup, scenario)
    assert sup.active == AP1 and sup.status.path_failures == 0
    assert sup.status.track[str(target)] == ("timeout", "timeout")


def test_every_ap_broken_while_the_normal_route_answers_ends_on_the_no_ap_path():
    world = World({AP1: 0.005, AP2: 0.020, AP3: 0.040})
    world.normal_route = True
    sup = world.make([AP1, AP2, AP3], passive=PassiveDetector(), reprobe_interval=5.0)

    async def scenario():
        await trio.sleep(1)
        world.broken.update({AP1, AP2, AP3})  # every AP's overlay side is down
        for _ in range(20):
            await poll(sup, unanswered("10.10.10.1", "10.10.10.2", "10.10.10.3"), 1)
            if sup.active is None:
                break
        assert sup.active is None and sup.status.phase is Phase.NO_AP
        world.broken.clear()  # back: used again after the hold-down
        await trio.sleep(HOLD_DOWN + 12)
        assert sup.active is not None

    run(world, sup, scenario)
    # AP1 and the AP it was compared with are held down together: one comparison each
    assert sup.status.path_failures <= 2


def test_an_ap_whose_path_stays_broken_is_held_down_longer_each_time():
    world = World({AP1: 0.005, AP2: 0.040})
    target = Target(ipaddress.ip_address("10.10.10.1"))
    sup = world.make([AP1, AP2], track=(target,), reprobe_interval=1.0)
    switches: list[tuple[float, AccessPoint | None]] = []

    async def scenario():
        await trio.sleep(2)
        world.broken.add(AP1)  # its tunnel stays down; its probes answer all along
        last = sup.active
        end = trio.current_time() + 120
        while trio.current_time() < end:
            if sup.active != last:
                last = sup.active
                switches.append((trio.current_time(), last))
            await trio.sleep(0.05)

    run(world, sup, scenario)
    back = [t for t, ap in switches if ap == AP1]
    left = [t for t, ap in switches if ap == AP2]
    # each time it comes back it fails again; the time away doubles: 10, 20, 40 s (+ probes)
    away = [b - a for a, b in zip(left, back, strict=False)]
    assert len(away) >= 3 and away[0] < 15 and away[1] > 19 and away[2] > 39, away


# --- fleet behaviour: the saved list, the refresh schedule, the weighted choice --------------

from sdnsup.choice import rendezvous_key  # noqa: E402
from sdnsup.discovery import parse_answer  # noqa: E402
from sdnsup.errors import DiscoveryError  # noqa: E402
from sdnsup.savedlist import SavedList  # noqa: E402

TTL = 60.0


class RecordingCC:
    """A CC whose answers and failures the test sets; it records when it was asked."""

    def __init__(self, aps: tuple[AccessPoint, ...], ttl: float = TTL) -> None:
        self.body = answer_body(aps, ttl)
        self.asked: list[float] = []
        self.down = False
        self.overloaded: float | None = None  # Retry-After of a 429 answer

    async def fetch(self):
        self.asked.append(trio.current_time())
        if self.overloaded is not None:
            raise DiscoveryError("CC answered 429", overloaded=True, retry_after=self.overloaded)
        if self.down:
            raise DiscoveryError("CC refused the connection")
        return parse_answer(self.body)


def answer_body(aps, ttl=TTL) -> bytes:
    import json

    return json.dumps(
        {"aps": [{"id": a.id, "addr": str(a.addr4), "weight": a.weight} for a in aps], "ttl": ttl}
    ).encode()


def fleet_ap(i: int, weight: int = 1) -> AccessPoint:
    return AccessPoint(f"ap{i}", addr4=ipaddress.IPv4Address(f"10.77.0.{10 + i}"), weight=weight)


async def discover_once(client, on_retry):
    return await client.fetch()


def test_a_saved_list_is_used_at_once_and_the_cc_asked_later():
    world = World({AP1: 0.005, AP2: 0.040})
    cc = RecordingCC((AP1, AP2))
    saved = SavedList(parse_answer(cc.body), "https://cc", 1000.0)
    kept: list[tuple[object, float]] = []

    async def save(directory, at):
        kept.append((directory, at))

    sup = world.make(None, cc=cc, discover=discover_once, saved=saved, save=save)

    async def scenario():
        await trio.sleep(0.1)
        assert sup.active == AP1 and cc.asked == []  # steering before asking anything
        assert sup.status.aps_source == "saved" and sup.status.aps_fetched_at == 1000.0
        await trio.sleep(1.2 * TTL)
        assert cc.asked and sup.status.aps_source == "cc"

    run(world, sup, scenario)
    assert 0 < cc.asked[0] <= 1.2 * TTL  # a running timer's remaining time, at most 1.2 ttl
    assert len(kept) == len(cc.asked) and kept[0][0] == parse_answer(cc.body)


def test_without_a_saved_list_the_cc_is_asked_first_and_refreshed_over_a_ttl():
    world = World({AP1: 0.005})
    cc = RecordingCC((AP1,))
    sup = world.make(None, cc=cc, discover=discover_once)

    async def scenario():
        await trio.sleep(3 * TTL)

    run(world, sup, scenario)
    assert cc.asked[0] == 0.0
    assert 0.5 * TTL <= cc.asked[1] <= 1.5 * TTL  # the first refresh: spread over a ttl
    assert all(
        0.8 * TTL <= b - a <= 1.2 * TTL for a, b in zip(cc.asked[1:], cc.asked[2:], strict=False)
    )


def test_a_cc_outage_with_a_working_ap_is_retried_at_the_normal_period():
    world = World({AP1: 0.005})
    cc = RecordingCC((AP1,))
    sup = world.make(None, cc=cc, discover=discover_once)

    async def scenario():
        await trio.sleep(1)
        cc.down = True
        await trio.sleep(10 * TTL)
        assert sup.active == AP1 and "refused" in (sup.status.cc_error or "")

    run(world, sup, scenario)
    gaps = [b - a for a, b in zip(cc.asked[1:], cc.asked[2:], strict=False)]
    assert gaps and min(gaps) >= 0.8 * TTL  # no fast retries: the host has an AP


def test_without_any_ap_the_cc_is_asked_soon_and_a_429_is_obeyed():
    world = World({AP1: 0.005})
    cc = RecordingCC((AP1,))
    sup = world.make(None, cc=cc, discover=discover_once)

    async def scenario():
        await trio.sleep(1)
        cc.overloaded = 200.0
        world.rtts[AP1] = None  # the only AP dies: this host is dark
        died = trio.current_time()
        await trio.sleep(5)
        assert sup.active is None
        asked = [t for t in cc.asked if t > died]
        assert len(asked) == 1 and asked[0] - died < 3  # asked soon: it has no AP
        await trio.sleep(190)
        assert len([t for t in cc.asked if t > died]) == 1  # Retry-After: 200 s

    run(world, sup, scenario)


def test_an_ap_death_spreads_the_reprobe_and_asks_the_cc_once_within_half_a_ttl():
    world = World({AP1: 0.005, AP2: 0.040})
    cc = RecordingCC((AP1, AP2))
    sup = world.make(None, cc=cc, discover=discover_once, reprobe_interval=1000.0)
    seen: dict[str, float] = {}

    async def scenario():
        await trio.sleep(2)
        asked, rounds = len(cc.asked), world.rounds
        world.rtts[AP1] = None
        while sup.active != AP2:  # noqa: ASYNC110 - virtual time
            await trio.sleep(0.01)
        seen["died"] = world.posted_at[world.posted.index(AP2)]
        await trio.sleep(1.1)
        assert world.rounds == rounds + 1  # one re-probe, within a second of the failover
        assert seen["died"] <= world.round_times[-1] <= seen["died"] + 1  # it needed none
        await trio.sleep(TTL / 2)
        # The periodic refresh keeps its schedule and may come just after
        # died + ttl/2; only requests inside that half ttl are the death's.
        half = seen["died"] + TTL / 2
        extra = [t for t in cc.asked[asked:] if seen["died"] < t <= half]
        assert len(extra) <= 1  # at most one extra request (none if the periodic came)

    run(world, sup, scenario)


def test_near_equal_aps_are_chosen_by_this_hosts_weighted_key():
    aps = [fleet_ap(1), fleet_ap(2), fleet_ap(3, weight=2)]
    rtts = {aps[0]: 0.0050, aps[1]: 0.0053, aps[2]: 0.0061}
    for host in ("alpha", "bravo", "charlie", "delta"):
        world = World(rtts)
        sup = world.make(aps, host_id=host)
        chosen: list[float] = []

        async def scenario(sup=sup, chosen=chosen):
            while sup.active is None:  # noqa: ASYNC110 - virtual time
                await trio.sleep(0.001)
            chosen.append(trio.current_time())
            await trio.sleep(100)

        run(world, sup, scenario)
        top = max(aps, key=lambda a: rendezvous_key(host, a))
        assert world.posted[0] == top and sup.active == top, host  # and it stays there
        assert chosen[0] < 0.020  # the first answers' window, not the 1 s probe deadline


def test_a_failing_first_cc_request_shows_in_status_until_an_answer():
    """The log's "CC attempt N failed" is also status's CC error (it once said none)."""
    from sdnsup import control, discovery

    world = World({AP1: 0.005})
    cc = RecordingCC((AP1,))
    cc.down = True

    async def discover(client, on_retry):
        return await discovery.discover(client, on_retry=on_retry)

    sup = world.make(None, cc=cc, discover=discover)

    def cc_error() -> object:
        return control.snapshot(sup.status, cidrs4=1, cidrs6=0, pid=1)["cc"]["error"]

    async def scenario():
        await trio.sleep(5)
        assert len(cc.asked) >= 2 and sup.active is None
        error = cc_error()
        assert isinstance(error, str) and "CC refused the connection" in error
        assert error.startswith("attempt ")
        assert sup.status.cc_next_refresh is not None
        cc.down = False
        await trio.sleep(70)
        assert sup.active == AP1 and cc_error() is None

    run(world, sup, scenario)


def test_an_ap_the_kernel_rejects_as_next_hop_is_left_and_not_chosen_again():
    """A CC listing this host's own address as an AP: the apply renders no route through
    it and says why; the supervisor leaves it at once and does not come back to it."""
    from types import SimpleNamespace

    from sdnsup.applier import ApplyResult

    world = World({AP1: 0.005, AP2: 0.020})
    sup = world.make([AP1, AP2], reprobe_interval=5.0)

    def kernel_result(active):
        result = ApplyResult()
        if active == AP1:
            result.rejected[AP1.addr4] = "an address of this host, which cannot be a next hop"
        else:
            result.ap_links[4] = object()
        return result

    def apply(state):
        desired = SimpleNamespace(
            cidrs4=frozenset({"10.10.10.0/24"}),
            cidrs6=frozenset(),
            ap4=state.active.addr4 if state.active else None,
            ap6=None,
        )
        sup.applied(desired, kernel_result(state.active))

    async def scenario():
        await trio.sleep(1)
        assert sup.active == AP1  # the fastest, before the kernel had its say
        apply(world.last)
        assert sup.active == AP2 and "AP ap1 (10.77.0.11) rejected: an address of this host" in (
            sup.status.last_failover
        )
        apply(world.last)
        assert sup.status.kernel_routed
        await trio.sleep(60)  # rounds rank AP1 first all along: it stays away
        assert sup.active == AP2 and world.posted.count(AP1) == 1

    run(world, sup, scenario)


def test_an_ap_off_every_connected_network_is_left_and_retried_less_often_each_time():
    """The CC lists an AP the host reaches only through a gateway: it answers probes, yet
    the CIDRs take the no-AP path. The host leaves it for one that carries them, comes back
    after a hold-down that doubles while the AP stays unusable, and stays once it is not.
    Once seen on a connected network, going off it is a link flap, not a reason to leave."""
    from types import SimpleNamespace

    from sdnsup.applier import ApplyResult

    off_link = {"on": True}
    why = "not on a directly connected network (the main table reaches it via 172.31.1.1)"

    class Kernel(World):
        def post(self, state):
            self.posted.append(state.active)
            self.posted_at.append(trio.current_time())
            self.last = state
            result = ApplyResult()
            if state.active == AP1 and off_link["on"]:
                result.unusable[AP1.addr4] = why
            elif state.active is not None:
                result.ap_links[4] = object()
            desired = SimpleNamespace(
                cidrs4=frozenset({"10.10.10.0/24"}),
                cidrs6=frozenset(),
                ap4=state.active.addr4 if state.active else None,
                ap6=None,
            )
            if self.sup is not None:
                self.sup.applied(desired, result)

    world = Kernel({AP1: 0.005, AP2: 0.020})
    sup = world.make([AP1, AP2], reprobe_interval=5.0)

    async def scenario():
        await trio.sleep(1)
        assert sup.active == AP2 and "AP ap1 (10.77.0.11) cannot carry the CIDRs" in (
            sup.status.last_failover or ""
        )
        assert sup.status.kernel_routed
        await trio.sleep(120)
        # hold-downs of 10, 20, 40, 80 s: five tries in two minutes, not one every 10 s
        assert 2 <= world.posted.count(AP1) <= 5
        off_link["on"] = False  # a route to the AP's network appeared
        await trio.sleep(400)
        assert sup.active == AP1 and sup.status.kernel_routed
        failovers = sup.status.failovers
        off_link["on"] = True  # its link goes down (the default route is on another one)
        world.post(world.last)  # the heal that follows
        assert sup.active == AP1 and sup.status.failovers == failovers  # a flap: keepalive's call
        assert not sup.status.kernel_routed

    run(world, sup, scenario)


def test_connected_means_the_kernel_routes_through_the_active_ap_in_its_families():
    from types import SimpleNamespace

    from sdnsup.applier import ApplyResult

    world = World({AP1: 0.005})
    sup = world.make([AP1])

    def applied(links):
        result = ApplyResult()
        result.ap_links.update({v: object() for v in links})
        desired = SimpleNamespace(
            cidrs4=frozenset({"10.10.10.0/24"}),
            cidrs6=frozenset({"fd10::/64"}),
            ap4=AP1.addr4,
            ap6=None,  # an IPv4-only AP: the IPv6 CIDRs take the no-AP path
        )
        sup.applied(desired, result)

    async def scenario():
        await trio.sleep(1)
        applied({4})
        assert sup.status.kernel_routed  # it carries every family it has an address for
        applied(set())  # unreachable: the kernel falls back
        assert not sup.status.kernel_routed
        applied({4})
        sup.apply_failed("nexthop 0x5d5d0004: Nexthop has invalid gateway")
        assert not sup.status.kernel_routed  # a failed apply: the kernel may differ
        applied({4})
        assert sup.status.kernel_routed and sup.status.apply_error is None

    run(world, sup, scenario)


def test_a_crashed_watch_is_restarted_by_the_daemon_and_carries_on_with_the_same_ap(caplog):
    """A bug in one of the supervisor's loops (here: a probe round raising) used to end the
    daemon; supervised like every other task, it restarts 1 s later, keeps its AP and slots,
    and its keepalive goes on."""
    from sdnsup.daemon import supervised

    world = World({AP1: 0.005, AP2: 0.040})
    sup = world.make([AP1, AP2], reprobe_interval=5.0)
    rounds = {"n": 0}
    real_probe_all = world.probe_all

    async def buggy_probe_all(aps, **kw):
        rounds["n"] += 1
        if rounds["n"] == 2:
            raise RuntimeError("a bug in a probe round")
        return await real_probe_all(aps, **kw)

    sup._probe_all = buggy_probe_all
    crashed_at = []

    async def main():
        async with trio.open_nursery() as nursery:
            await sup.start()
            nursery.start_soon(supervised, "supervisor", sup.watch)
            with trio.fail_after(30):
                while rounds["n"] < 2:  # noqa: ASYNC110 - virtual time
                    await trio.sleep(0.01)
            crashed_at.append(trio.current_time())
            posted = list(world.posted)
            await trio.sleep(10)
            # restarted: more rounds, the same AP, nothing new posted, keepalive probes on
            assert rounds["n"] >= 3
            assert sup.active == AP1 and world.posted == posted
            assert any(a == AP1 and t > crashed_at[0] + 2 for t, a in world.probed)
            nursery.cancel_scope.cancel()

    with caplog.at_level("ERROR", logger="sdnsup"):
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert "task supervisor crashed, restarting in 1 s" in caplog.text


def test_heals_reloads_and_the_cc_url_reach_status_through_the_supervisor_alone():
    from sdnsup import control

    world = World({ap(1): 0.01})
    sup = world.make([ap(1)], cc_url="https://cc.example", saved_error="saved.json: corrupt")
    sup.healed("nftables table inet sdnsup deleted")
    sup.reloaded(None)
    sup.reloaded("cidrs.txt:3: 'x' is not a CIDR")
    snap = control.snapshot(sup.status, cidrs4=1, cidrs6=0, pid=1, no_ap="fallback")
    assert snap["heals"]["count"] == 1
    assert snap["heals"]["last_cause"] == "nftables table inet sdnsup deleted"
    assert (snap["reload"]["count"], snap["reload"]["failures"]) == (1, 1)
    assert snap["reload"]["error"] == "cidrs.txt:3: 'x' is not a CIDR"
    sup.reloaded(None)  # a good reload clears the last refusal
    assert (
        control.snapshot(sup.status, cidrs4=1, cidrs6=0, pid=1, no_ap="fallback")["reload"]["error"]
        is None
    )
    assert snap["cc"]["url"] == "https://cc.example"
    assert snap["ap_list"]["saved_error"] == "saved.json: corrupt"
