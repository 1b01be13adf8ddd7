"""The pin keeper on a fake conntrack, in trio's virtual time."""

from __future__ import annotations

from dataclasses import replace

import trio
import trio.testing

from sdnsup.pins import POLL_ACTIVE, POLL_DRAINING, PinKeeper, PinReport
from sdnsup.state import Settings, Slot
from tests.fakes import FakeConntrack

S = Settings()
PENDING, SLOT1, SLOT2 = S.slot_mark(0), S.slot_mark(1), S.slot_mark(2)


def run(keeper: PinKeeper, scenario) -> None:
    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(keeper.run)
            await scenario()
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def inline(fn, *args):
    return fn(*args)


def make(abort: bool = True) -> tuple[PinKeeper, FakeConntrack, list[PinReport]]:
    ct, reports = FakeConntrack(), []
    keeper = PinKeeper(ct, S, abort_sockets=abort, report=reports.append, offload=inline)
    return keeper, ct, reports


def test_a_draining_slot_is_counted_and_vacated_once_its_last_connection_ended():
    keeper, ct, reports = make()
    ct.add(SLOT1, port=1000)
    ct.add(SLOT1, port=1001, tcp_state=7)  # TIME_WAIT: over, not counted
    ct.add(SLOT2, port=1002)

    async def scenario():
        keeper.applied((Slot(1, draining=True), Slot(2)))
        await trio.sleep(0.01)
        assert reports[-1].counts == {1: 1, 2: 1} and not reports[-1].vacated
        await trio.sleep(POLL_DRAINING)
        assert reports[-1].counts == {1: 1}  # the active slot is counted less often
        ct.entries[0] = replace(ct.entries[0], tcp_state=8)  # the last connection closed
        await trio.sleep(POLL_DRAINING)
        assert reports[-1].vacated == {1}
        # the ended connections' entries no longer carry the slot: its number can be reused
        assert [e.mark for e in ct.entries] == [PENDING, PENDING, SLOT2]

    run(keeper, scenario)


def test_a_retired_slot_waits_for_its_routes_to_go_then_aborts_and_repins():
    keeper, ct, reports = make()
    ct.add(SLOT1, port=1000)  # a local socket
    ct.add(SLOT1, port=1001, local=False)  # a container's connection: no socket here
    ct.add(SLOT2, port=1002)

    async def scenario():
        keeper.applied((Slot(1), Slot(2, draining=True)))
        await trio.sleep(0.01)
        keeper.retire(1)  # the active AP died...
        await trio.sleep(POLL_DRAINING * 2)
        assert ct.aborted == []  # ...but the kernel still routes slot 1: not yet
        keeper.applied((Slot(2, draining=True),))  # the failover was applied
        await trio.sleep(0.01)
        (report,) = [r for r in reports if r.retired]
        moved, aborted, took = report.retired[1]
        assert (moved, aborted) == (2, 1) and took >= POLL_DRAINING * 2 * 1000
        assert 1 in report.vacated
        assert [e.sport for e in ct.aborted] == [1000]
        assert [e.mark for e in ct.entries] == [PENDING, PENDING, SLOT2]

    run(keeper, scenario)


def test_sockets_are_left_alone_without_abort_sockets():
    keeper, ct, reports = make(abort=False)
    ct.add(SLOT1, port=1000)

    async def scenario():
        keeper.applied(())
        keeper.retire(1)
        await trio.sleep(0.01)
        assert reports[-1].retired[1][:2] == (1, 0)

    run(keeper, scenario)
    assert ct.aborted == [] and ct.entries[0].mark == PENDING


def test_orphans_of_slots_no_ap_holds_are_repinned_once():
    keeper, ct, reports = make()
    ct.add(S.slot_mark(5), port=1000)  # left by a run that stopped cleanly

    async def scenario():
        keeper.applied((Slot(1),))
        await trio.sleep(0.01)
        assert reports[-1].orphans == 1 and ct.entries[0].mark == PENDING
        calls = len(ct.calls)
        await trio.sleep(POLL_ACTIVE + 1)
        assert not any(c == f"pinned {S.slot_mark(5):#x}" for c in ct.calls[calls:])

    run(keeper, scenario)


def test_nothing_happens_before_the_first_apply():
    keeper, ct, reports = make()
    ct.add(SLOT1, port=1000)

    async def scenario():
        keeper.retire(1)
        await trio.sleep(POLL_ACTIVE * 2)

    run(keeper, scenario)
    assert reports == [] and ct.calls == []
