"""AP slot bookkeeping (pure) and the slot encoding in the connection mark."""

from __future__ import annotations

import ipaddress

import pytest

from sdnsup.aps import AccessPoint, ProbeSpec
from sdnsup.errors import ConfigError
from sdnsup.slots import SlotTable
from sdnsup.state import Settings, Slot, deposit, extract, slot_nhid, slot_of_nhid

A = ipaddress.ip_address


def ap(i: int, **kw) -> AccessPoint:
    return AccessPoint(f"ap{i}", addr4=A(f"10.77.0.{10 + i}"), **kw)


def test_slot_numbers_spread_over_a_non_contiguous_mask_and_back():
    field = 0x1082  # bits 1, 7, 12
    values = [deposit(n, field) for n in range(8)]
    assert values == [0, 0x2, 0x80, 0x82, 0x1000, 0x1002, 0x1080, 0x1082]
    assert [extract(v | 0xFFFF0000, field) for v in values] == list(range(8))


def test_default_marks_hold_seven_slots_in_their_own_tables():
    s = Settings()
    assert (s.mark, s.mask, s.slots) == (0x2000, 0x3082, 7)
    assert s.slot_mark(0) == 0x2000 and s.slot_mark(1) == 0x2002 and s.slot_mark(7) == 0x3082
    assert [s.slot_table(n) for n in (1, 7)] == [7301, 7307]
    assert {slot_of_nhid(slot_nhid(v, n)) for v in (4, 6) for n in (0, 3)} == {
        (4, 0), (4, 3), (6, 0), (6, 3),
    }  # fmt: skip
    assert slot_of_nhid(7) is None
    # four bits beside the mark hold the most slots: every slot is a table and a nexthop
    assert Settings(mark=0x2000, mask=0x0F002000).slots == 15


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"mark": 0x2000, "mask": 0x2000}, "leaves 0 bit(s) beside --mark 0x2000"),
        ({"mark": 0x2000, "mask": 0x2002}, "leaves 1 bit(s)"),
        # a mask wider than the slots need would clear other tools' bits for nothing
        ({"mark": 0x2000, "mask": 0xFFFFFFFF}, "has 31 bits beside --mark 0x2000; sdnsup uses"),
        ({"mark": 0x2000, "mask": 0x2F00FF00}, "has 12 bits beside"),
        ({"table": 250}, "sdnsup uses tables 250-258"),
        ({"priority": 2}, "between 3 and 32765"),
    ],
)
def test_settings_that_cannot_hold_the_slots_are_refused(kw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings(**kw)


def test_an_ap_keeps_its_slot_and_the_old_active_one_drains():
    t = SlotTable(3)
    assert t.activate(ap(1), 0).number == 1
    assert t.activate(ap(2), 1).number == 2
    assert [(e.number, e.role) for e in t.entries.values()] == [(1, "draining"), (2, "active")]
    assert t.activate(ap(1), 2).number == 1  # fail-back: its own slot again
    assert t.state() == (Slot(1, A("10.77.0.11")), Slot(2, A("10.77.0.12"), draining=True))


def test_a_number_is_reused_only_once_vacated_and_never_while_active():
    t = SlotTable(2)
    t.activate(ap(1), 0)
    t.activate(ap(2), 0)
    assert t.activate(ap(3), 0) is None  # both numbers hold connections
    assert t.active is None  # ap3 is active without a slot; ap2 drains like ap1
    assert t.vacated(2) is not None
    assert t.activate(ap(3), 0).number == 2
    assert t.vacated(2) is None  # active: a late report does not free it


def test_a_retired_slot_leaves_the_kernel_state_but_keeps_its_number():
    t = SlotTable(2)
    t.activate(ap(1), 0)
    t.retire(1, 1)
    assert t.state() == () and t.free_number() == 2
    assert t.find(ap(1)) is None  # its AP, back later, takes a new slot
    t.vacated(1)
    assert t.free_number() == 1


def test_recovered_slots_find_their_ap_by_address_or_keep_the_address():
    t = SlotTable(7)
    known = [ap(1, probe=ProbeSpec("icmp", 0))]
    found = t.recover(
        [Slot(4, A("10.77.0.11")), Slot(6, A("10.77.0.99"), A("fd77::99")), Slot(9, A("10.0.0.1"))],
        known,
        ProbeSpec("udp", 7300),
        0,
    )
    assert [(e.number, e.ap.id, e.role) for e in found] == [
        (4, "ap1", "draining"),
        (6, "10.77.0.99+fd77::99", "draining"),
    ]  # slot 9 is beyond the capacity of these settings
    assert t.activate(AccessPoint("renamed", addr4=A("10.77.0.11")), 1).number == 4
