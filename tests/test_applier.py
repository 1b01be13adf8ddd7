import ipaddress
import itertools
import random
import socket

import pytest

from sdnsup.applier import Applier, KernelState, diff, render
from sdnsup.errors import KernelError
from sdnsup.routes import RTPROT_SDNSUP, Link, Nexthop, Route, Rule
from sdnsup.state import EMPTY, NHID_V4, NHID_V6, DesiredState, Settings, Slot, slot_nhid
from tests.fakes import FakeNft, FakeRoutes, FakeSysctl, link

N = ipaddress.ip_network
A = ipaddress.ip_address
AP1, AP2, AP6 = A("10.77.0.11"), A("10.77.0.12"), A("fd77::11")
FOREIGN = 4  # RTPROT_STATIC: somebody else's objects


def make(links=None, sysctl=None):
    routes = FakeRoutes(
        links
        or {
            "10.77.0.11": link(2, "eth0"),
            "10.77.0.12": link(2, "eth0"),
            "10.77.0.13": link(3, "eth1"),
            "fd77::11": link(2, "eth0"),
        }
    )
    nft = FakeNft()
    ctl = FakeSysctl(sysctl or {})
    return Applier(routes, nft, ctl), routes, nft, ctl


def state(cidrs="10.10.10.0/24,10.10.20.0/24", ap4=AP1, ap6=None, **kw):
    nets = [N(c) for c in cidrs.split(",") if c]
    return DesiredState(
        cidrs4=frozenset(n for n in nets if n.version == 4),
        cidrs6=frozenset(n for n in nets if n.version == 6),
        ap4=ap4,
        ap6=ap6,
        **kw,
    )


def test_apply_builds_rule_routes_nexthop_and_table():
    applier, routes, nft, _ = make()
    result = applier.apply(state())
    assert routes.dump().splitlines() == [
        f"nexthop {NHID_V4:#x} 10.77.0.11 if2 proto {RTPROT_SDNSUP}",
        f"route 10.10.10.0/24 table 7300 nhid {NHID_V4:#x} proto {RTPROT_SDNSUP}",
        f"route 10.10.20.0/24 table 7300 nhid {NHID_V4:#x} proto {RTPROT_SDNSUP}",
        f"rule fam2 prio 7300 fwmark 0x2000/0x2000 lookup 7300 proto {RTPROT_SDNSUP}",
    ]
    table = nft.tables["sdnsup"]
    assert table.set("dst4") == {N("10.10.10.0/24"), N("10.10.20.0/24")}
    assert table.set("exempt4") == {N("10.77.0.11/32")}
    assert result.writes["route"] == 2 and result.writes["nexthop"] == 1


def test_same_state_twice_writes_nothing():
    applier, routes, nft, ctl = make()
    applier.apply(state())
    before = (routes.writes, nft.transactions, ctl.writes)
    result = applier.apply(state())
    assert result.total_writes == 0
    assert (routes.writes, nft.transactions, ctl.writes) == before


def test_switching_ap_is_one_nexthop_replace():
    applier, routes, nft, _ = make()
    cidrs = ",".join(f"10.{i // 256}.{i % 256}.0/24" for i in range(1000))
    applier.apply(state(cidrs))
    routes.calls.clear()
    before = nft.transactions
    result = applier.apply(state(cidrs, ap4=AP2))
    # the exempt set follows the AP, so nftables sees one element transaction
    assert routes.calls == [f"replace_nexthop {NHID_V4}"]
    assert nft.transactions == before + 1
    assert result.writes == {"nexthop": 1, "nft element": 2}
    assert f"nexthop {NHID_V4:#x} 10.77.0.12 if2" in routes.dump()


def test_a_new_table_gets_its_elements_apart_and_an_existing_one_is_swapped_whole():
    """Creating the table is cheaper in two transactions (ruleset, then elements) and safe:
    nothing is steered before it exists. A table that exists is replaced in one, so that
    steering never pauses while it changes."""
    applier, _, nft, _ = make()
    applier.apply(state())
    assert nft.calls == ["create"]
    assert nft.tables["sdnsup"].set("dst4") == {N("10.10.10.0/24"), N("10.10.20.0/24")}
    # someone edits sdnsup's ruleset: the heal swaps the whole table
    t = nft.tables["sdnsup"]
    nft.tables["sdnsup"] = type(t)(t.name, "[]", t.elements, t.shards, t.pins)
    applier.resync()
    applier.apply(state())
    assert nft.calls == ["create", "replace"]
    # someone deletes it: created again
    del nft.tables["sdnsup"]
    applier.resync()
    applier.apply(state())
    assert nft.calls == ["create", "replace", "create"]
    assert nft.tables["sdnsup"].set("dst4") == {N("10.10.10.0/24"), N("10.10.20.0/24")}


def test_changing_one_cidr_touches_only_it():
    applier, routes, nft, _ = make()
    applier.apply(state("10.1.0.0/16,10.2.0.0/16,10.3.0.0/16"))
    routes.calls.clear()
    result = applier.apply(state("10.1.0.0/16,10.2.0.0/16,10.4.0.0/16"))
    assert routes.calls == ["add_routes 1", "delete_routes 1"]
    assert result.writes == {"route": 2, "nft element": 2}
    assert nft.tables["sdnsup"].set("dst4") == {
        N("10.1.0.0/16"),
        N("10.2.0.0/16"),
        N("10.4.0.0/16"),
    }


def test_teardown_removes_only_what_sdnsup_owns():
    applier, routes, nft, _ = make()
    foreign_nh = Nexthop(7, socket.AF_INET, A("10.77.0.1"), 2)
    foreign_route = Route(N("192.168.0.0/16"), 7300, 7)
    foreign_rule = Rule(socket.AF_INET, 100, 0x4000, 0x4000, 100)
    routes.replace_nexthop(foreign_nh, FOREIGN)
    routes.add_routes([foreign_route], FOREIGN)
    routes.add_rules([foreign_rule], FOREIGN)
    nft.tables["docker"] = object()  # type: ignore[assignment]
    applier.apply(state("10.10.10.0/24,fd10::/64", ap6=AP6))
    applier.teardown()
    assert routes.nexthops(FOREIGN) == {foreign_nh}
    assert routes.routes(FOREIGN) == {foreign_route}
    assert routes.rules(FOREIGN) == {foreign_rule}
    assert routes.nexthops(RTPROT_SDNSUP) == set()
    assert routes.routes(RTPROT_SDNSUP) == set()
    assert routes.rules(RTPROT_SDNSUP) == set()
    assert set(nft.tables) == {"docker"}


def test_teardown_deletes_nexthops_without_listing_their_routes_and_sweeps_strays():
    applier, routes, _, _ = make()
    applier.apply(state(",".join(f"10.{i}.0.0/16" for i in range(50))))
    # a route of sdnsup's protocol on somebody else's nexthop (an older sdnsup's leftover)
    routes.replace_nexthop(Nexthop(7, socket.AF_INET, A("10.77.0.1"), 2), FOREIGN)
    routes.add_routes([Route(N("192.168.0.0/16"), 7300, 7)], RTPROT_SDNSUP)
    routes.calls.clear()
    result = applier.teardown()
    assert routes.routes(RTPROT_SDNSUP) == set() and routes.nexthops(RTPROT_SDNSUP) == set()
    # the 50 routes went with their nexthop; only the stray one was deleted by itself
    assert result.writes["route"] == 1
    assert [c for c in routes.calls if c.startswith("delete_routes")] == ["delete_routes 1"]


def test_leftovers_of_a_killed_run_are_adopted_without_duplicates():
    applier, routes, nft, _ = make()
    applier.apply(state("10.10.10.0/24,10.10.20.0/24"))
    # Same kernel, new process with a changed CIDR list and table: reads, then fixes.
    other = Applier(routes, nft, FakeSysctl())
    wanted = state("10.10.10.0/24,10.10.30.0/24", settings=Settings(table=7400))
    other.apply(wanted)
    assert routes.routes(RTPROT_SDNSUP) == {
        Route(N("10.10.10.0/24"), 7400, NHID_V4),
        Route(N("10.10.30.0/24"), 7400, NHID_V4),
    }
    assert routes.rules(RTPROT_SDNSUP) == {Rule(socket.AF_INET, 7300, 0x2000, 0x2000, 7400)}
    assert other.apply(wanted).total_writes == 0


def test_no_ap_fallback_removes_rule_and_keeps_routes_on_blackhole():
    applier, routes, _, _ = make()
    applier.apply(state())
    routes.calls.clear()
    applier.apply(state(ap4=None))
    assert routes.rules(RTPROT_SDNSUP) == set()
    assert routes.nexthops(RTPROT_SDNSUP) == {Nexthop(NHID_V4, socket.AF_INET, None, 0)}
    assert len(routes.routes(RTPROT_SDNSUP)) == 2
    assert routes.calls == [f"replace_nexthop {NHID_V4}", "delete_rules 1"]


def test_no_ap_blackhole_keeps_rule():
    applier, routes, _, _ = make()
    applier.apply(state(ap4=None, no_ap="blackhole"))
    assert len(routes.rules(RTPROT_SDNSUP)) == 1
    assert routes.nexthops(RTPROT_SDNSUP) == {Nexthop(NHID_V4, socket.AF_INET, None, 0)}


def test_unreachable_or_routed_ap_is_reported_and_treated_as_no_ap():
    applier, routes, _, _ = make(links={"10.77.0.11": link(2, "eth0", gateway="172.31.1.1")})
    result = applier.apply(state())
    assert "not on a directly connected network" in result.problems[0]
    assert "via 172.31.1.1 on eth0" in result.unusable[A("10.77.0.11")]
    assert routes.rules(RTPROT_SDNSUP) == set()
    result = applier.apply(state(ap4=A("10.99.0.1")))
    assert "unreachable" in result.problems[0]
    # a link that is down, for a moment: the keepalive decides, not the apply
    assert result.unusable == {} and result.rejected == {}


def test_an_ap_at_this_hosts_own_address_is_rejected_not_written():
    """The kernel refuses a nexthop via its own address ("invalid gateway"): the apply
    must not fail forever, it renders no AP and names the reason."""
    own = Link(ifindex=1, ifname="lo", gateway=None, prefsrc=None, local=True)
    applier, routes, _, _ = make(links={"10.77.0.11": own})
    result = applier.apply(state())
    assert result.problems == [
        "AP 10.77.0.11 is an address of this host, which cannot be a next hop"
    ]
    assert result.rejected == {
        A("10.77.0.11"): "an address of this host, which cannot be a next hop"
    }
    assert result.ap_links == {} and routes.rules(RTPROT_SDNSUP) == set()
    assert routes.nexthops(RTPROT_SDNSUP) == {Nexthop(NHID_V4, socket.AF_INET, None, 0)}


def test_v6_without_ap6_follows_no_ap_policy_v4_unaffected():
    applier, routes, _, _ = make()
    applier.apply(state("10.10.10.0/24,fd10::/64"))
    assert routes.rules(RTPROT_SDNSUP) == {Rule(socket.AF_INET, 7300, 0x2000, 0x2000, 7300)}
    assert Nexthop(NHID_V6, socket.AF_INET6, None, 0) in routes.nexthops(RTPROT_SDNSUP)


def test_strict_rp_filter_sets_src_valid_mark_and_teardown_restores():
    sysctl = {
        "net/ipv4/conf/all/rp_filter": 1,
        "net/ipv4/conf/eth1/rp_filter": 0,
        "net/ipv4/conf/eth1/src_valid_mark": 0,
        "net/ipv4/conf/eth0/rp_filter": 2,
        "net/ipv4/conf/eth0/src_valid_mark": 0,
    }
    applier, _, _, ctl = make(sysctl=sysctl)
    applier.apply(state(ap4=A("10.77.0.13")))  # on eth1, strict via "all"
    assert ctl.values["net/ipv4/conf/eth1/src_valid_mark"] == 1
    assert ctl.values["net/ipv4/conf/eth0/src_valid_mark"] == 0  # never touched
    applier.apply(state(ap4=AP1))  # eth0: loose (max(1, 2) = 2), eth1 restored
    assert ctl.values["net/ipv4/conf/eth1/src_valid_mark"] == 0
    applier.apply(state(ap4=A("10.77.0.13")))
    applier.teardown()
    assert ctl.values == sysctl


def test_partial_failure_is_reported_and_retried_next_time():
    applier, routes, _, _ = make()
    routes.fail_routes.add(N("10.10.20.0/24"))
    with pytest.raises(KernelError, match=r"10\.10\.20\.0/24"):
        applier.apply(state())
    assert len(routes.routes(RTPROT_SDNSUP)) == 1
    routes.fail_routes.clear()
    routes.calls.clear()
    applier.apply(state())
    assert routes.calls == ["add_routes 1"]


def test_diff_is_pure_and_empty_for_equal_states():
    target, _ = render(state(), lambda a: link(2, "eth0"))
    assert not diff(target, target)
    assert diff(KernelState(), target).add_routes


STATES = [
    EMPTY,
    state(),
    state(ap4=AP2),
    state(ap4=A("10.77.0.13")),
    state(ap4=None),
    state(ap4=None, no_ap="blackhole"),
    state("10.10.10.0/24"),
    state("10.10.10.0/24,fd10:10:10::/64", ap6=AP6),
    state("fd10:10:10::/64", ap4=None, ap6=AP6),
    state(settings=Settings(mark=0x100, mask=0x700, table=100, priority=100)),
    state(ap4=AP1, slots=(Slot(1, AP1),)),
    state(ap4=AP2, slots=(Slot(1, AP1, draining=True), Slot(2, AP2))),
    state(ap4=AP1, slots=(Slot(1, AP1), Slot(2, AP2, draining=True))),
    state("10.10.10.0/24,fd10:10:10::/64", ap6=AP6, slots=(Slot(3, AP1, AP6),)),
    state(ap4=None, slots=(Slot(2, AP2, draining=True),)),
    state(slots=(Slot(1, AP1),), probe_via4=AP2, probe_targets=frozenset({A("10.10.10.5")})),
]


@pytest.mark.parametrize("seed", range(20))
def test_every_state_can_follow_every_other(seed):
    """Replay states in random order; each must land exactly where a fresh apply lands."""
    order = random.Random(seed).sample(list(itertools.product(STATES, repeat=1)) * 3, 12)
    applier, routes, nft, _ = make()
    for (s,) in order:
        applier.apply(s)
        fresh, fresh_routes, fresh_nft, _ = make()
        fresh.apply(s)
        assert routes.dump() == fresh_routes.dump()
        assert nft.tables == fresh_nft.tables
        assert applier.apply(s).total_writes == 0
        # and what the applier believes equals what a re-read finds
        assert applier.applied == applier.read_kernel()


def test_after_a_partial_failure_the_applied_state_matches_the_kernel():
    applier, routes, _, _ = make()
    applier.apply(state("10.1.0.0/16,10.2.0.0/16"))
    routes.fail_routes.add(N("10.3.0.0/16"))
    with pytest.raises(KernelError):
        applier.apply(state("10.1.0.0/16,10.3.0.0/16"))
    # the set elements changed, the route for 10.3.0.0/16 did not: the record says exactly that
    assert applier.applied == applier.read_kernel()
    assert applier.applied.table.set("dst4") == {N("10.1.0.0/16"), N("10.3.0.0/16")}


COMPAT = "net/ipv4/nexthop_compat_mode"


def test_nexthop_compat_mode_goes_off_while_steering_and_comes_back():
    applier, _, _, ctl = make(sysctl={COMPAT: 1})
    result = applier.apply(state())
    # Mode 1 makes an AP switch cost kernel time per route: off while sdnsup's routes exist.
    assert ctl.values[COMPAT] == 0 and result.writes["sysctl"] == 1
    assert applier.apply(state(ap4=AP2)).writes == {"nexthop": 1, "nft element": 2}
    applier.teardown()
    assert ctl.values[COMPAT] == 1


def test_nexthop_compat_mode_is_kept_when_others_use_nexthop_objects(caplog):
    applier, routes, _, ctl = make(sysctl={COMPAT: 1})
    routes.replace_nexthop(Nexthop(7, socket.AF_INET, AP1, 2), FOREIGN)  # e.g. FRR's
    with caplog.at_level("INFO"):
        applier.apply(state())
        applier.apply(state(ap4=AP2))
    assert ctl.values[COMPAT] == 1 and ctl.writes == 0
    kept = [r.getMessage() for r in caplog.records if "nexthop_compat_mode=1" in r.getMessage()]
    assert len(kept) == 1 and "1 nexthop objects of other software" in kept[0]


def test_nexthop_compat_keep_never_touches_it():
    routes, ctl = FakeRoutes({"10.77.0.11": link(2, "eth0")}), FakeSysctl({COMPAT: 1})
    applier = Applier(routes, FakeNft(), ctl, nexthop_compat="keep")
    applier.apply(state())
    applier.teardown()
    assert ctl.writes == 0


def test_sysctl_record_restores_after_a_crash_including_older_records(tmp_path):
    record = tmp_path / "sysctl.json"
    # written by an earlier version: interface names mean src_valid_mark
    record.write_text('{"eth1": 0, "net/ipv4/nexthop_compat_mode": 1}')
    ctl = FakeSysctl({"net/ipv4/conf/eth1/src_valid_mark": 1, COMPAT: 0})
    applier = Applier(FakeRoutes(), FakeNft(), ctl, sysctl_record=record)
    applier.teardown()
    assert ctl.values == {"net/ipv4/conf/eth1/src_valid_mark": 0, COMPAT: 1}
    assert not record.exists()


def test_after_a_reread_that_found_nothing_to_do_the_next_apply_compares_by_identity():
    applier, _, _, _ = make()
    desired = state(",".join(f"10.{i}.0.0/16" for i in range(50)))
    applier.apply(desired)
    applier.resync()  # a heal: the kernel is read back into fresh objects
    assert not applier.apply(desired).total_writes
    assert applier.applied is not None
    assert applier.applied.routes[(7300, NHID_V4)] is desired.cidrs4


# --- AP slots: pinned connections keep their AP through a switch ------------------------------

SLOT1, SLOT2 = slot_nhid(4, 1), slot_nhid(4, 2)


def test_a_slot_has_its_nexthop_default_route_and_pin_but_no_rule_while_active():
    applier, routes, nft, _ = make()
    applier.apply(state(slots=(Slot(1, AP1),)))
    dump = routes.dump()
    assert f"nexthop {SLOT1:#x} 10.77.0.11 if2" in dump
    assert f"route 0.0.0.0/0 table 7301 nhid {SLOT1:#x}" in dump
    # the only rule is the one of the CIDR routes: the active AP's connections take them
    assert routes.rules(RTPROT_SDNSUP) == {Rule(socket.AF_INET, 7300, 0x2000, 0x2000, 7300)}
    assert '"10.77.0.11"' in nft.tables["sdnsup"].pins and "8194" in nft.tables["sdnsup"].pins


def test_switch_adds_the_old_slots_rules_before_it_repoints_the_active_nexthop():
    applier, routes, _, _ = make()
    applier.apply(state(slots=(Slot(1, AP1),)))
    routes.calls.clear()
    result = applier.apply(state(ap4=AP2, slots=(Slot(1, AP1, draining=True), Slot(2, AP2))))
    # new slot's objects, then the old slot's rules, and only then the switch itself
    assert routes.calls == [
        f"replace_nexthop {SLOT2}",
        "add_routes 1",
        "add_rules 2",
        f"replace_nexthop {NHID_V4}",
    ]
    assert result.writes == {"nexthop": 2, "route": 1, "rule": 2, "nft pins": 1, "nft element": 1}
    mark1 = Settings().slot_mark(1)
    assert routes.rules(RTPROT_SDNSUP) == {
        Rule(socket.AF_INET, 7298, mark1, 0x3082, 254, "eth0"),
        Rule(socket.AF_INET, 7299, mark1, 0x3082, 7301),
        Rule(socket.AF_INET, 7300, 0x2000, 0x2000, 7300),
    }


def test_fail_back_repoints_the_active_nexthop_before_the_slot_leaves_its_rules():
    applier, routes, _, _ = make()
    applier.apply(state(ap4=AP2, slots=(Slot(1, AP1, draining=True), Slot(2, AP2))))
    routes.calls.clear()
    applier.apply(state(ap4=AP1, slots=(Slot(1, AP1), Slot(2, AP2, draining=True))))
    assert routes.calls == ["add_rules 2", f"replace_nexthop {NHID_V4}", "delete_rules 2"]


def test_rule_to_a_repointed_table_comes_after_the_repoint():
    # no AP (fallback: no rule), then an AP: the rule must not lead to the blackhole first
    applier, routes, _, _ = make()
    applier.apply(state(ap4=None))
    routes.calls.clear()
    applier.apply(state(slots=(Slot(1, AP1),)))
    assert routes.calls.index(f"replace_nexthop {NHID_V4}") < routes.calls.index("add_rules 1")


def test_a_freed_slot_leaves_nothing_and_an_unreachable_one_is_reported():
    applier, routes, nft, _ = make()
    applier.apply(state(ap4=AP2, slots=(Slot(1, AP1, draining=True), Slot(2, AP2))))
    applier.apply(state(ap4=AP2, slots=(Slot(2, AP2),)))
    assert routes.nexthops(RTPROT_SDNSUP) == {
        Nexthop(NHID_V4, socket.AF_INET, AP2, 2),
        Nexthop(SLOT2, socket.AF_INET, AP2, 2),
    }
    assert len(routes.rules(RTPROT_SDNSUP)) == 1
    assert '"10.77.0.11"' not in nft.tables["sdnsup"].pins
    result = applier.apply(state(ap4=AP2, slots=(Slot(1, A("10.99.0.1"), draining=True),)))
    assert result.problems == ["AP of slot 1 10.99.0.1 is unreachable: no route to it"]


def test_slot_aps_are_exempt_from_steering():
    applier, _, nft, _ = make()
    applier.apply(state(ap4=AP2, slots=(Slot(1, AP1, draining=True), Slot(2, AP2))))
    assert nft.tables["sdnsup"].set("exempt4") == {N("10.77.0.11/32"), N("10.77.0.12/32")}


def test_recover_slots_reads_what_an_earlier_process_left():
    applier, routes, nft, _ = make()
    wanted = state("10.10.10.0/24,fd10::/64", ap4=AP2, ap6=None,
                   slots=(Slot(1, AP1, AP6, draining=True), Slot(2, AP2)))  # fmt: skip
    applier.apply(wanted)
    other = Applier(routes, nft, FakeSysctl())
    assert other.recover_slots(Settings()) == wanted.slots
    assert make()[0].recover_slots(Settings()) == ()


def test_path_probes_get_host_routes_through_the_compared_ap_only():
    applier, routes, nft, _ = make()
    targets = frozenset({A("10.10.10.5"), A("10.10.20.9"), A("fd10::5")})
    applier.apply(state(slots=(Slot(1, AP1),), probe_via4=AP2, probe_targets=targets))
    probe_nh = slot_nhid(4, 0xFF)
    s = Settings()
    assert Nexthop(probe_nh, socket.AF_INET, AP2, 2) in routes.nexthops(RTPROT_SDNSUP)
    assert {r.dst for r in routes.routes(RTPROT_SDNSUP) if r.table == s.probe_table} == {
        N("10.10.10.5/32"),
        N("10.10.20.9/32"),
    }  # host routes, no default: and no IPv6 one (no IPv6 CIDR, no IPv6 AP to compare)
    assert Rule(socket.AF_INET, 7299, s.probe_mark, s.mask, s.probe_table) in routes.rules(
        RTPROT_SDNSUP
    )
    # a restarted process does not take the probe nexthop for an AP slot
    assert Applier(routes, nft, FakeSysctl()).recover_slots(s) == (Slot(1, AP1),)
    applier.apply(state(slots=(Slot(1, AP1),)))
    assert not [r for r in routes.routes(RTPROT_SDNSUP) if r.table == s.probe_table]
    assert len(routes.rules(RTPROT_SDNSUP)) == 1


def test_other_tools_objects_in_sdnsups_space_are_found_and_named():
    """What a start would overwrite by key (a route by destination and table, a nexthop
    by id) is found first; the same objects outside sdnsup's space, or sdnsup's own, are
    not conflicts."""
    from sdnsup.applier import foreign_error

    applier, routes, _, _ = make()
    s = Settings()
    static = 4
    routes.nh[NHID_V4] = (Nexthop(NHID_V4, socket.AF_INET, A("192.0.2.1"), 2), static)
    routes.nh[99] = (Nexthop(99, socket.AF_INET, A("192.0.2.1"), 2), static)  # elsewhere
    routes.nh[slot_nhid(6, 3)] = (Nexthop(slot_nhid(6, 3), socket.AF_INET6, None, 0), static)
    foreign = Route(ipaddress.ip_network("10.10.10.0/24"), 7300, 0)  # a CIDR sdnsup steers
    routes.rt[(foreign.dst, 7300)] = (foreign, static)
    default = Route(ipaddress.ip_network("0.0.0.0/0"), 7302, 0)  # a slot's default route
    routes.rt[(default.dst, 7302)] = (default, static)
    routes.rt[(foreign.dst, 254)] = (Route(foreign.dst, 254, 0), static)  # the main table
    other = ipaddress.ip_network("192.0.2.0/24")  # in sdnsup's table, but not one it writes
    routes.rt[(other, 7300)] = (Route(other, 7300, 0), static)
    routes.ru[Rule(socket.AF_INET, 7299, 0x1, 0x1, 100)] = static
    routes.ru[Rule(socket.AF_INET, 100, 0x1, 0x1, 7308)] = static  # looks up a probe table
    routes.ru[Rule(socket.AF_INET, 7301, 0x1, 0x1, 100)] = static  # above its priorities
    found = applier.foreign_objects(s, [ipaddress.ip_network("10.10.10.0/24")])
    assert sorted(found) == sorted(
        [
            f"nexthop id {NHID_V4:#x} (proto 4)",
            f"nexthop id {slot_nhid(6, 3):#x} (proto 4)",
            "route 10.10.10.0/24 in table 7300 (proto 4)",
            "route 0.0.0.0/0 in table 7302 (proto 4)",
            "rule priority 7299 lookup 100 (proto 4)",
            "rule priority 100 lookup 7308 (proto 4)",
        ]
    )
    error = str(foreign_error(s, found))
    assert "sdnsup never overwrites or deletes what it did not create" in error
    assert "route 10.10.10.0/24 in table 7300 (proto 4)" in error
    # sdnsup's own objects are never conflicts
    applier2, *_ = make()
    applier2.apply(state())
    assert applier2.foreign_objects(s, [ipaddress.ip_network("10.10.10.0/24")]) == []


def test_a_stop_during_a_large_first_apply_ends_it_between_route_batches():
    """SIGTERM while 100k routes are being written: the apply stops at the next batch,
    records what it wrote, and teardown removes exactly that (it used to write them all)."""
    from sdnsup.applier import ROUTE_BATCH

    applier, routes, nft, _ = make()
    big = ",".join(str(ipaddress.IPv4Network((0x0B000000 + i * 512, 24))) for i in range(35_000))
    real_add = routes.add_routes

    def add_routes(batch, proto):
        failures = real_add(batch, proto)
        applier.abort()  # the signal arrives while the first batch is written
        return failures

    routes.add_routes = add_routes
    with pytest.raises(KernelError, match=f"stopped by request after {ROUTE_BATCH} routes"):
        applier.apply(state(big))
    assert len(routes.routes(RTPROT_SDNSUP)) == ROUTE_BATCH  # one batch, not 35,000
    assert nft.read("sdnsup") is None and routes.rules(RTPROT_SDNSUP) == set()
    routes.add_routes = real_add
    applier.teardown()
    assert routes.dump() == ""
    assert not applier.aborting  # teardown cleared the request: applies work again
    applier.apply(state())
    assert routes.rules(RTPROT_SDNSUP)


def test_a_heal_never_writes_over_what_another_tool_put_in_place_of_sdnsups():
    """Another tool replaces one of sdnsup's CIDR routes (``ip route replace ... table
    7300``) and its nexthop id (``ip nexthop replace id``). The heal that follows re-adds
    everything else of sdnsup's, leaves theirs in place, and fails naming each."""
    applier, routes, _, _ = make()
    applier.apply(state())
    static = 4
    taken = Route(N("10.10.10.0/24"), 7300, 0)
    routes.rt[(taken.dst, 7300)] = (taken, static)
    del routes.rt[(N("10.10.20.0/24"), 7300)]  # and one of sdnsup's routes was deleted
    applier.resync()
    with pytest.raises(KernelError) as err:
        applier.apply(state())
    assert "another tool's route 10.10.10.0/24 in table 7300 (proto 4)" in str(err.value)
    assert routes.rt[(taken.dst, 7300)] == (taken, static)  # theirs, untouched
    assert (N("10.10.20.0/24"), 7300) in routes.rt  # ours, healed
    with pytest.raises(KernelError):  # a retry checks again: still theirs
        applier.apply(state())
    assert routes.rt[(taken.dst, 7300)] == (taken, static)
    del routes.rt[(taken.dst, 7300)]  # they removed it: the next apply takes the key back
    applier.apply(state())
    assert routes.rt[(taken.dst, 7300)][1] == RTPROT_SDNSUP

    theirs = Nexthop(NHID_V4, socket.AF_INET, A("192.0.2.1"), 9)
    routes.nh[NHID_V4] = (theirs, static)
    applier.resync()
    with pytest.raises(KernelError) as err:
        applier.apply(state())
    assert f"another tool's nexthop id {NHID_V4:#x} (proto 4)" in str(err.value)
    assert routes.nh[NHID_V4] == (theirs, static)


def test_nexthop_ids_another_tool_holds_are_left_to_it_and_found_again_after_a_restart():
    """Another tool has a nexthop at sdnsup's default id: sdnsup takes the next base whose
    ids are all free instead of refusing, never touches theirs, and a restarted process
    finds its own ids again from the kernel."""
    from dataclasses import replace

    from sdnsup.state import NHID_BASE

    applier, routes, _, _ = make()
    theirs = Nexthop(NHID_V4, socket.AF_INET, A("192.0.2.1"), 9)
    routes.nh[NHID_V4] = (theirs, 4)
    settings = applier.with_free_nexthop_ids(Settings())
    assert settings.nhid_base == NHID_BASE + 0x10000 and settings.nhid(4) == 0x5D5E0004
    assert applier.foreign_objects(settings, [N("10.10.10.0/24")]) == []
    desired = state(slots=(Slot(1, AP1),), settings=settings)
    applier.apply(desired)
    ours = {nh.id for nh in routes.nexthops(RTPROT_SDNSUP)}
    assert ours == {0x5D5E0004, 0x5D5E0104}
    assert routes.nh[NHID_V4] == (theirs, 4)

    restarted = Applier(routes, FakeNft(), FakeSysctl({}))
    del routes.nh[NHID_V4]  # theirs is gone meanwhile: the restart still takes its own base
    again = restarted.with_free_nexthop_ids(Settings())
    assert again == settings
    assert restarted.recover_slots(again) == (Slot(1, AP1),)
    assert restarted.recover_slots(replace(again, nhid_base=NHID_BASE)) == ()
    restarted.apply(replace(desired, settings=again))
    assert {nh.id for nh in routes.nexthops(RTPROT_SDNSUP)} == ours  # adopted, not rewritten
    restarted.teardown()
    assert routes.nexthops(RTPROT_SDNSUP) == set()
