"""Property tests: for any sequence of desired states, the kernel ends as the last one says.

The applier runs on the fake kernel of :mod:`tests.fakes` through sequences of steps:

* apply a desired state: CIDRs of both families (none at all included), an AP per family that
  is on-link, routed, unreachable or absent, AP slots (active or draining, their APs as
  reachable or not as the active AP's), CC addresses to exempt, either no-AP policy;
* damage the kernel the way an operator or a flapping link does (delete the table, a set
  element, a route, every route of the table, a nexthop, the rule; put sysctls back; leave a
  stray object tagged as sdnsup's), then heal as the daemon does: re-read, apply again;
* make the kernel refuse a route, the nexthops, the rules or nftables transactions, then
  retry as the daemon does (a fresh read, then apply);
* restart (a new Applier on the same kernel, as after ``kill -9``), possibly with other
  mark/mask/table/priority settings.

After every apply the kernel must hold exactly what an independent model of the desired
state says (objects, set contents, sysctls), other software's objects must be untouched,
what the applier believes must equal a fresh read, and applying the same state again must
write nothing. At the end, teardown leaves nothing of sdnsup and every sysctl as it was.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sdnsup.applier import Applier
from sdnsup.errors import KernelError, NftError
from sdnsup.nft import NftTable, render_table
from sdnsup.routes import RTPROT_SDNSUP, Failure, Link, Nexthop, Route, Rule
from sdnsup.state import NHID_V4, NHID_V6, DesiredState, NoApPolicy, Settings, Slot, slot_nhid
from tests.fakes import FakeNft, FakeRoutes, FakeSysctl, link

IPv4Network = ipaddress.IPv4Network
IPv6Network = ipaddress.IPv6Network
A = ipaddress.ip_address
N = ipaddress.ip_network


def prop_settings(max_examples: int) -> settings:
    """The shared profile (see the root conftest.py) with this file's example count."""
    return settings(max_examples=max_examples, suppress_health_check=[HealthCheck.too_slow])


# --- the fake host -----------------------------------------------------------------------------

# Where each AP address leads (`ip route get`): on-link on eth0 or eth1, via a gateway (not
# usable as a next hop), or nowhere (not in the table: unreachable).
LINKS: dict[str, Link] = {
    "10.77.0.11": link(2, "eth0"),
    "10.77.0.12": link(2, "eth0"),
    "10.78.0.13": link(3, "eth1"),
    "10.99.0.1": link(2, "eth0", gateway="10.77.0.1"),
    "fd77::11": link(2, "eth0"),
    "fd78::13": link(3, "eth1"),
    "fd99::1": link(2, "eth0", gateway="fd77::1"),
}
AP4S = [None, "10.77.0.11", "10.77.0.12", "10.78.0.13", "10.99.0.1", "10.200.0.1"]
AP6S = [None, "fd77::11", "fd78::13", "fd99::1", "fd20::1"]
# eth1 has strict rp_filter (max(all, eth1) == 1), eth0 loose: only an IPv4 AP on eth1 needs
# src_valid_mark. nexthop_compat_mode starts at the kernel default.
SYSCTLS = {
    "net/ipv4/conf/all/rp_filter": 0,
    "net/ipv4/conf/eth0/rp_filter": 2,
    "net/ipv4/conf/eth1/rp_filter": 1,
    "net/ipv4/conf/eth0/src_valid_mark": 0,
    "net/ipv4/conf/eth1/src_valid_mark": 0,
    "net/ipv4/nexthop_compat_mode": 1,
}
VALID_MARK = "net/ipv4/conf/{}/src_valid_mark"
COMPAT = "net/ipv4/nexthop_compat_mode"

FOREIGN = 4  # RTPROT_STATIC: another program's objects, never to be touched
FOREIGN_NH = Nexthop(7, socket.AF_INET, A("10.77.0.1"), 2)
FOREIGN_ROUTE = Route(N("192.168.0.0/16"), 100, 7)
FOREIGN_RULE = Rule(socket.AF_INET, 100, 0x4000, 0x4000, 100)
FOREIGN_TABLE = NftTable("docker", "[]")

SETTINGS = [
    Settings(),
    Settings(mark=0x100, mask=0x700, table=7400, priority=7400),
    Settings(mark=0x2000, mask=0x2006, table=51, priority=100),
]


class FlakyRoutes(FakeRoutes):
    """FakeRoutes that can also refuse nexthops and rules (it refuses chosen routes itself)."""

    def __init__(self, links: dict[str, Link]) -> None:
        super().__init__(links)
        self.refuse: set[str] = set()

    def replace_nexthop(self, nexthop: Nexthop, proto: int) -> list[Failure]:
        if "nexthop" in self.refuse:
            return [Failure(nexthop, OSError(errno.EINVAL, "Invalid argument"))]
        return super().replace_nexthop(nexthop, proto)

    def add_rules(self, rules: Sequence[Rule], proto: int) -> list[Failure]:
        if "rule" in self.refuse:
            return [Failure(r, OSError(errno.ENOBUFS, "No buffer space available")) for r in rules]
        return super().add_rules(rules, proto)


class FlakyNft(FakeNft):
    """FakeNft whose transactions can be refused, all or nothing like the kernel's."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse = False

    def _check(self) -> None:
        if self.refuse:
            raise NftError("nftables refused the transaction: Cannot allocate memory")

    def replace(self, table: NftTable) -> None:
        self._check()
        super().replace(table)

    def update_elements(self, *args: Any, **kwargs: Any) -> None:
        self._check()
        super().update_elements(*args, **kwargs)

    def delete(self, name: str) -> bool:
        self._check()
        return super().delete(name)


@dataclass
class Host:
    routes: FlakyRoutes
    nft: FlakyNft
    ctl: FakeSysctl
    record: Path
    foreign_nh: bool

    @classmethod
    def make(cls, tmp: Path, foreign_nh: bool) -> Host:
        host = cls(
            FlakyRoutes(LINKS), FlakyNft(), FakeSysctl(SYSCTLS), tmp / "sysctl.json", foreign_nh
        )
        if foreign_nh:
            host.routes.replace_nexthop(FOREIGN_NH, FOREIGN)
            host.routes.add_routes([FOREIGN_ROUTE], FOREIGN)
        host.routes.add_rules([FOREIGN_RULE], FOREIGN)
        host.nft.tables[FOREIGN_TABLE.name] = FOREIGN_TABLE
        return host

    def applier(self) -> Applier:
        # The sysctl record survives a restart, as /run/sdnsup does after kill -9.
        return Applier(self.routes, self.nft, self.ctl, sysctl_record=self.record)

    def counters(self) -> tuple[int, int, int]:
        return self.routes.writes, self.nft.transactions, self.ctl.writes


# --- the model: what the kernel must hold for a desired state ----------------------------------


@dataclass(frozen=True)
class Kernel:
    nexthops: frozenset[Nexthop] = frozenset()
    routes: frozenset[Route] = frozenset()
    rules: frozenset[Rule] = frozenset()
    table: tuple[str, dict[str, frozenset[Any]], str] | None = None  # ruleset, sets, pins
    sysctls: dict[str, int] = field(default_factory=lambda: dict(SYSCTLS))


def model(desired: DesiredState, foreign_nh: bool) -> Kernel:
    """The documented outcome of ``desired`` (README "What sdnsup installs", design §2)."""
    if desired.empty:
        return Kernel()
    s = desired.settings
    nexthops, routes, rules = set(), set(), set()
    sysctls = dict(SYSCTLS)
    for cidrs, ap, nhid, family in (
        (desired.cidrs4, desired.ap4, NHID_V4, socket.AF_INET),
        (desired.cidrs6, desired.ap6, NHID_V6, socket.AF_INET6),
    ):
        if not cidrs:
            continue
        found = LINKS.get(str(ap)) if ap is not None else None
        usable = found is not None and found.gateway is None
        if usable:
            assert found is not None
            nexthops.add(Nexthop(nhid, family, ap, found.ifindex))
        else:
            nexthops.add(Nexthop(nhid, family, None, 0))  # blackhole: an AP back = 1 replace
        routes |= {Route(c, s.table, nhid) for c in cidrs}
        # No usable AP: "fallback" drops the rule (normal routing), "blackhole" keeps it.
        if usable or desired.no_ap == "blackhole":
            rules.add(Rule(family, s.priority, s.mark, s.mark, s.table))
        if family == socket.AF_INET and usable:
            assert found is not None
            strict = (
                max(
                    SYSCTLS["net/ipv4/conf/all/rp_filter"],
                    SYSCTLS[f"net/ipv4/conf/{found.ifname}/rp_filter"],
                )
                == 1
            )
            if strict:
                sysctls[VALID_MARK.format(found.ifname)] = 1
    # Each slot whose AP is usable: its nexthop, a default route in its table, a pin; while
    # draining, a rule sending its replies the normal way and one sending the rest to its
    # table. Its AP is exempt whether usable or not.
    pins, hosts4, hosts6 = [], set(), set()
    for slot in desired.slots:
        for addr, hosts, cidrs in ((slot.addr4, hosts4, desired.cidrs4),
                                   (slot.addr6, hosts6, desired.cidrs6)):  # fmt: skip
            if addr is None:
                continue
            hosts.add(N(addr))
            found = LINKS.get(str(addr))
            if not cidrs or found is None or found.gateway is not None:
                continue
            v = addr.version
            family = socket.AF_INET if v == 4 else socket.AF_INET6
            nhid = slot_nhid(v, slot.number)
            nexthops.add(Nexthop(nhid, family, addr, found.ifindex))
            routes.add(Route(N("0.0.0.0/0" if v == 4 else "::/0"), s.table + slot.number, nhid))
            pins.append((addr, slot.number))
            if slot.draining:
                mark = s.slot_mark(slot.number)
                rules.add(Rule(family, s.priority - 2, mark, s.mask, 254, found.ifname))
                rules.add(Rule(family, s.priority - 1, mark, s.mask, s.table + slot.number))
                if v == 4 and found.ifname == "eth1":  # strict, see SYSCTLS
                    sysctls[VALID_MARK.format(found.ifname)] = 1
    # Compat mode off while steering, unless other software has nexthop objects.
    if not foreign_nh:
        sysctls[COMPAT] = 0
    hosts4 |= {N(desired.ap4)} if desired.ap4 is not None else set()
    hosts6 |= {N(desired.ap6)} if desired.ap6 is not None else set()
    elements = {
        "dst4": frozenset(desired.cidrs4),
        "dst6": frozenset(desired.cidrs6),
        "exempt4": frozenset(desired.exempt4 | hosts4),
        "exempt6": frozenset(desired.exempt6 | hosts6),
    }
    elements = {k: v for k, v in elements.items() if v}
    table = render_table(s, elements, pins)  # the chains and rules have their own tests
    return Kernel(
        frozenset(nexthops),
        frozenset(routes),
        frozenset(rules),
        (table.ruleset, elements, table.pins),
        sysctls,
    )


def observe(host: Host, table: str) -> Kernel:
    found = host.nft.tables.get(table)
    return Kernel(
        frozenset(host.routes.nexthops(RTPROT_SDNSUP)),
        frozenset(host.routes.routes(RTPROT_SDNSUP)),
        frozenset(host.routes.rules(RTPROT_SDNSUP)),
        None
        if found is None
        else (found.ruleset, {k: v for k, v in found.elements.items() if v}, found.pins),
        dict(host.ctl.values),
    )


def check_foreign(host: Host) -> None:
    assert host.routes.rules(FOREIGN) == {FOREIGN_RULE}
    assert host.routes.nexthops(FOREIGN) == ({FOREIGN_NH} if host.foreign_nh else set())
    assert host.routes.routes(FOREIGN) == ({FOREIGN_ROUTE} if host.foreign_nh else set())
    assert host.nft.tables.get(FOREIGN_TABLE.name) == FOREIGN_TABLE


def check_belief(applier: Applier) -> None:
    """What the applier believes equals a fresh read (valid_mark is only known when rendered)."""
    assert applier.applied is not None
    assert replace(applier.applied, valid_mark=frozenset()) == applier.read_kernel()


# --- desired states and steps ------------------------------------------------------------------


def _nets(version: int) -> st.SearchStrategy[Any]:
    """``10.A.B.0/len`` or ``fd0A:B00::/len`` with small A and B: nested, adjacent and
    repeated networks are common."""
    bits = 32 if version == 4 else 128
    base = int(N("10.0.0.0/8" if version == 4 else "fd00::/8").network_address)
    net = IPv4Network if version == 4 else IPv6Network
    return st.builds(
        lambda a, b, plen: net((base | a << (bits - 16) | b << (bits - 24), plen), strict=False),
        st.integers(0, 7),
        st.integers(0, 7),
        st.integers(8, bits),
    )


def _disjoint(candidates: Iterable[Any]) -> frozenset[Any]:
    """What the CLI lets through: no CIDR overlapping another (but any overlap across states)."""
    kept: list[Any] = []
    for n in candidates:
        if not any(n.overlaps(k) for k in kept):
            kept.append(n)
    return frozenset(kept)


@dataclass(frozen=True)
class State:
    cidrs4: frozenset[IPv4Network]
    cidrs6: frozenset[IPv6Network]
    ap4: str | None
    ap6: str | None
    exempt4: frozenset[IPv4Network]
    exempt6: frozenset[IPv6Network]
    no_ap: NoApPolicy
    slots: tuple[Slot, ...] = ()

    def desired(self, s: Settings) -> DesiredState:
        return DesiredState(
            cidrs4=self.cidrs4,
            cidrs6=self.cidrs6,
            ap4=None if self.ap4 is None else ipaddress.IPv4Address(self.ap4),
            ap6=None if self.ap6 is None else ipaddress.IPv6Address(self.ap6),
            exempt4=self.exempt4,
            exempt6=self.exempt6,
            no_ap=self.no_ap,
            settings=s,
            slots=self.slots,
        )


CC4 = [N("192.0.2.10/32"), N("10.77.0.11/32")]  # a CC address, and one equal to an AP's
CC6 = [N("2001:db8::10/128"), N("fd77::11/128")]


def draw_state(draw: st.DrawFn, pool4: list[Any], pool6: list[Any]) -> State:
    def some(pool: list[Any], most: int) -> frozenset[Any]:
        if not pool:
            return frozenset()
        picks = draw(st.lists(st.integers(0, len(pool) - 1), max_size=most))
        return _disjoint(pool[i] for i in picks)

    return State(
        cidrs4=some(pool4, 6),
        cidrs6=some(pool6, 4),
        ap4=draw(st.sampled_from(AP4S)),
        ap6=draw(st.sampled_from(AP6S)),
        exempt4=some(CC4, 2),
        exempt6=some(CC6, 2),
        no_ap=draw(st.sampled_from(NO_AP)),
        slots=draw(_slots()),
    )


def _slots() -> st.SearchStrategy[tuple[Slot, ...]]:
    """Up to three slots (numbers 1-3: every SETTINGS holds them), APs from the same pool."""
    one = st.builds(
        lambda a4, a6, draining: (a4, a6, draining),
        st.sampled_from(AP4S),
        st.sampled_from(AP6S),
        st.booleans(),
    )
    return st.lists(one, max_size=3).map(
        lambda items: tuple(
            Slot(
                n,
                None if a4 is None else ipaddress.IPv4Address(a4),
                None if a6 is None else ipaddress.IPv6Address(a6),
                draining,
            )
            for n, (a4, a6, draining) in enumerate(items, 1)
            if a4 is not None or a6 is not None
        )
    )


NO_AP: list[NoApPolicy] = ["fallback", "blackhole"]
DAMAGE = [
    "delete table",
    "delete element",
    "delete route",
    "flush route table",
    "delete nexthop",
    "link down",
    "delete rule",
    "reset sysctls",
    "stray route",
    "stray rule",
]


REFUSALS = ["route", "nexthop", "rule", "nft"]
STEPS = ["apply", "apply", "apply nothing", "damage", "damage", "refuse", "restart"]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[bool, list[tuple[Any, ...]]]:
    """Whether other software has nexthop objects, and the steps."""
    pool4 = draw(st.lists(_nets(4), max_size=8))
    pool6 = draw(st.lists(_nets(6), max_size=6))
    steps: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(STEPS))
        if kind == "apply":
            steps.append(("apply", draw_state(draw, pool4, pool6)))
        elif kind == "apply nothing":
            state = draw_state(draw, [], [])
            steps.append(("apply", state))
        elif kind == "damage":
            steps.append(("damage", draw(st.sampled_from(DAMAGE)), draw(st.integers(0, 99))))
        elif kind == "refuse":
            what = draw(st.sampled_from(REFUSALS))
            steps.append(("refuse", draw_state(draw, pool4, pool6), what, draw(st.integers(0, 99))))
        else:
            steps.append(("restart", draw(st.sampled_from(SETTINGS))))
    return draw(st.booleans()), steps


def _pick(items: Iterable[Any], index: int) -> Any:
    ordered = sorted(items, key=str)
    return ordered[index % len(ordered)] if ordered else None


def damage(host: Host, kind: str, index: int, s: Settings) -> None:
    """Change the fake kernel behind the applier's back, as the kernel or an operator would."""
    routes, ours = host.routes, RTPROT_SDNSUP
    if kind == "delete table":  # nft delete table inet sdnsup
        host.nft.tables.pop(s.nft_table, None)
    elif kind == "delete element":  # nft delete element inet sdnsup dst4 { ... }
        table = host.nft.tables.get(s.nft_table)
        if table is not None and table.elements:
            name = _pick(table.elements, index)
            gone = _pick(table.elements[name], index)
            rest = {k: v - {gone} if k == name else v for k, v in table.elements.items()}
            host.nft.tables[s.nft_table] = replace(
                table, elements={k: v for k, v in rest.items() if v}
            )
    elif kind == "delete route":  # ip route del DST table T
        r = _pick(routes.routes(ours), index)
        if r is not None:
            del routes.rt[(r.dst, r.table)]
    elif kind == "flush route table":  # ip route flush table T
        routes.rt = {k: v for k, v in routes.rt.items() if v[0].table != s.table}
    elif kind == "delete nexthop":  # ip nexthop del id N: its routes go with it
        nh = _pick(routes.nexthops(ours), index)
        if nh is not None:
            routes.delete_nexthops([nh.id])
    elif kind == "link down":  # the kernel flushes nexthops on a downed link, and their routes
        ids = [n.id for n, p in routes.nh.values() if p == ours and n.ifindex == 2 + index % 2]
        routes.delete_nexthops(ids)
    elif kind == "delete rule":  # ip rule del ...
        r = _pick(routes.rules(ours), index)
        if r is not None:
            del routes.ru[r]
    elif kind == "reset sysctls":  # someone puts the defaults back
        host.ctl.values.update(SYSCTLS)
    elif kind == "stray route":  # a leftover tagged as ours, e.g. from an older CIDR list
        nh = _pick(routes.nexthops(ours), index)
        if nh is not None:
            dst = N("10.255.0.0/16" if nh.family == socket.AF_INET else "fdff::/16")
            routes.rt[(dst, s.table)] = (Route(dst, s.table, nh.id), ours)
    elif kind == "stray rule":  # a leftover rule of an older configuration
        routes.ru[Rule(socket.AF_INET, 7999, 0x8000, 0x8000, 7999)] = ours


def refuse(host: Host, what: str | None, index: int, desired: DesiredState) -> None:
    """Make the kernel refuse one route, every nexthop, every rule or every nftables
    transaction (``what``), or nothing (None)."""
    refused = _pick(desired.cidrs4 | desired.cidrs6, index) if what == "route" else None
    host.routes.fail_routes = {refused} if refused is not None else set()
    host.routes.refuse = {what} if what in ("nexthop", "rule") else set()
    host.nft.refuse = what == "nft"


def apply_and_check(applier: Applier, host: Host, desired: DesiredState) -> None:
    applier.apply(desired)
    assert observe(host, desired.settings.nft_table) == model(desired, host.foreign_nh)
    check_foreign(host)
    check_belief(applier)
    before = host.counters()
    again = applier.apply(desired)
    assert again.total_writes == 0, f"applying the same state again wrote {again.writes}"
    assert host.counters() == before


# --- the properties ----------------------------------------------------------------------------


@prop_settings(150)
@given(scenarios())
def test_kernel_ends_as_the_last_desired_state_whatever_happened_before(
    scenario: tuple[bool, list[tuple[Any, ...]]],
) -> None:
    foreign_nh, steps = scenario
    with tempfile.TemporaryDirectory() as tmp:
        host = Host.make(Path(tmp), foreign_nh)
        applier = host.applier()
        s = Settings()
        last = DesiredState(settings=s)
        for step in steps:
            if step[0] == "apply":
                last = step[1].desired(s)
                apply_and_check(applier, host, last)
            elif step[0] == "damage":
                damage(host, step[1], step[2], s)
                # The netlink monitor reports it; the daemon re-reads and applies again.
                applier.resync()
                apply_and_check(applier, host, last)
            elif step[0] == "refuse":
                last = step[1].desired(s)
                refuse(host, step[2], step[3], last)
                try:
                    applier.apply(last)
                except KernelError:
                    event(f"{step[2]} refused: partial apply")  # --hypothesis-show-statistics
                    check_belief(applier)  # the record says exactly what was done
                    check_foreign(host)
                refuse(host, None, 0, last)
                # The daemon retries a failed apply from a fresh read.
                applier.resync()
                apply_and_check(applier, host, last)
            else:  # restart, as after kill -9: a new process, maybe with other settings
                s = step[1]
                applier = host.applier()
                last = replace(last, settings=s)
                apply_and_check(applier, host, last)
        applier.teardown()
        assert observe(host, s.nft_table) == Kernel()
        check_foreign(host)
        assert not host.record.exists()  # nothing left to restore


@prop_settings(60)
@given(scenarios())
def test_a_fresh_process_reaches_the_same_kernel_as_a_long_running_one(
    scenario: tuple[bool, list[tuple[Any, ...]]],
) -> None:
    """Leftovers of any history are adopted: a restarted applier given the last state ends
    where one that only ever saw that state does (Tailscale's TestRouterStates, generated)."""
    history = [step[1].desired(Settings()) for step in scenario[1] if step[0] == "apply"]
    if not history:
        return
    with tempfile.TemporaryDirectory() as tmp:
        old_dir, new_dir = Path(tmp) / "old", Path(tmp) / "new"
        old_dir.mkdir()
        new_dir.mkdir()
        old = Host.make(old_dir, foreign_nh=False)
        applier = old.applier()
        for desired in history[:-1]:
            applier.apply(desired)
        old.applier().apply(history[-1])  # a new process on the old kernel
        fresh = Host.make(new_dir, foreign_nh=False)
        fresh.applier().apply(history[-1])
        assert observe(old, "sdnsup") == observe(fresh, "sdnsup")


@pytest.mark.parametrize("kind", DAMAGE)
def test_every_damage_kind_changes_the_kernel(kind: str) -> None:
    """Each damage step really damages a steering kernel, so the healing checks above are not
    vacuous."""
    with tempfile.TemporaryDirectory() as tmp:
        host = Host.make(Path(tmp), foreign_nh=False)
        desired = State(
            frozenset({N("10.1.0.0/16")}),
            frozenset({N("fd01::/64")}),
            "10.78.0.13",
            "fd77::11",
            frozenset(),
            frozenset(),
            "fallback",
        ).desired(Settings())
        host.applier().apply(desired)
        before = observe(host, "sdnsup")
        damage(host, kind, 0, Settings())
        assert observe(host, "sdnsup") != before
