"""The supervisor's decisions, with fake probes on trio's MockClock (virtual time)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import trio
import trio.testing

from sdnsup.aps import AccessPoint
from sdnsup.errors import SdnsupError
from sdnsup.probe import HOLD_DOWN
from sdnsup.supervisor import Phase, Supervisor


@dataclass(frozen=True)
class Result:
    ap: AccessPoint
    rtt: float | None
    sent: int = 3
    received: int = 3


def ap(i: int) -> AccessPoint:
    return AccessPoint(f"ap{i}", addr4=ipaddress.IPv4Address(f"10.77.0.{10 + i}"))


AP1, AP2, AP3 = ap(1), ap(2), ap(3)


class World:
    """Fake APs: an RTT per AP (None = dead); probes take that long in virtual time."""

    def __init__(self, rtts: dict[AccessPoint, float | None]) -> None:
        self.rtts = dict(rtts)
        self.posted: list[AccessPoint | None] = []
        self.rounds = 0

    async def probe_once(self, ap: AccessPoint, *, timeout: float) -> float:
        rtt = self.rtts.get(ap)
        if rtt is None or rtt > timeout:
            await trio.sleep(timeout)
            raise SdnsupError(f"{ap.id} did not answer")
        await trio.sleep(rtt)
        return rtt

    async def probe_all(self, aps, *, timeout, count, on_first=None):
        self.rounds += 1
        results: list[Result] = []

        async def one(a: AccessPoint) -> None:
            try:
                rtt = await self.probe_once(a, timeout=timeout)
            except SdnsupError:
                results.append(Result(a, None, count, 0))
                return
            result = Result(a, rtt)
            if on_first is not None and all(r.rtt is None for r in results):
                on_first(result)
            results.append(result)

        async with trio.open_nursery() as nursery:
            for a in aps:
                nursery.start_soon(one, a)
        return sorted(results, key=lambda r: (r.rtt is None, r.rtt or 0))

    def make(self, aps, **kw) -> Supervisor:
        def should_switch(cur, cand):
            return cand.rtt is not None and (
                cur.rtt is None or (cur.rtt - cand.rtt > 0.010 and cand.rtt < cur.rtt * 0.67)
            )

        return Supervisor(
            aps=aps,
            desired_for=lambda active, known: active,  # the test records the AP itself
            post=self.posted.append,
            probe_all=self.probe_all,
            probe_once=self.probe_once,
            should_switch=should_switch,
            **kw,
        )


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

    async def discover(client):
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
