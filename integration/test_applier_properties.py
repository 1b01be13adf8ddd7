"""A sample of the applier's property tests against the real kernel, in a lab namespace.

Hypothesis draws short sequences of steps (apply a desired state, damage the kernel with
``ip``/``nft``/``sysctl`` and heal, restart with other settings) that one long-lived applier
runs inside client A of a lab (real netlink, libnftables and nfnetlink, as the daemon uses
them). After every apply, the kernel, read with ``ip -j``, ``nft -j`` and ``sysctl``, must
hold exactly what the desired state implies, applying it again must write nothing, and other
software's rule, route and nftables table must be untouched. Each sequence ends with a
teardown that must leave nothing of sdnsup's and every sysctl as it was.

One lab serves every example (building one per example would cost more than the examples);
each example starts from a clean kernel, and the lab is removed at the end, also on failure.
The same file, run as ``python test_applier_properties.py --serve``, is that applier: it
reads one JSON command per line and answers one JSON line.
"""

from __future__ import annotations

import ipaddress
import json
import select
import subprocess
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from integration.helpers import wait_for
from sdnsup.applier import Applier
from sdnsup.lab import Lab
from sdnsup.lab.measure import owns
from sdnsup.nft import LibNftables, render_table, table_from_listing
from sdnsup.routes import RTPROT_SDNSUP
from sdnsup.rtnl import RtnlRoutes
from sdnsup.state import NHID_V4, NHID_V6, DesiredState, Settings
from sdnsup.sysctl import ProcSysctl

# --- the applier inside the namespace (``--serve``) -----------------------------------------------


def serve(record: Path) -> None:
    """Answer commands from stdin, one JSON line each, until stdin closes.

    ``{"op": "apply", "state": {...}}`` -> ``{"writes": {...}, "again": N, "belief": bool}``
    (the writes of the apply, those of applying it again, and whether what the applier
    believes equals a fresh read); ``{"op": "resync"}``; ``{"op": "restart"}`` (a new
    Applier, as after kill -9); ``{"op": "teardown"}``. A failure answers ``{"error": ...}``.
    """

    def new_applier() -> Applier:
        return Applier(RtnlRoutes.from_system(), LibNftables(), ProcSysctl(), sysctl_record=record)

    applier = new_applier()
    for line in sys.stdin:
        cmd = json.loads(line)
        answer: dict[str, Any] = {}
        try:
            if cmd["op"] == "apply":
                desired = decode_state(cmd["state"])
                answer["writes"] = dict(applier.apply(desired).writes)
                answer["again"] = applier.apply(desired).total_writes
                applied = applier.applied
                assert applied is not None
                # valid_mark is only known in a rendered state, never read back
                answer["belief"] = replace(applied, valid_mark=frozenset()) == applier.read_kernel()
            elif cmd["op"] == "resync":
                applier.resync()
            elif cmd["op"] == "restart":
                applier = new_applier()
            elif cmd["op"] == "teardown":
                answer["writes"] = dict(applier.teardown().writes)
        except Exception as exc:  # reported to the test, which fails with it
            answer["error"] = "".join(traceback.format_exception(exc))
        print(json.dumps(answer), flush=True)


# --- desired states as JSON ---------------------------------------------------------------------


@dataclass(frozen=True)
class State:
    cidrs: tuple[str, ...]
    ap4: str | None
    ap6: str | None
    exempt: tuple[str, ...]
    no_ap: str
    mark: int
    mask: int
    table: int
    priority: int

    @property
    def nets(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(c) for c in self.cidrs]

    def v(self, version: int) -> set[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return {n for n in self.nets if n.version == version}


def decode_state(raw: dict[str, Any]) -> DesiredState:
    s = State(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    exempt = [ipaddress.ip_network(e) for e in s.exempt]
    return DesiredState(
        cidrs4=frozenset(s.v(4)),  # type: ignore[arg-type]
        cidrs6=frozenset(s.v(6)),  # type: ignore[arg-type]
        ap4=None if s.ap4 is None else ipaddress.IPv4Address(s.ap4),
        ap6=None if s.ap6 is None else ipaddress.IPv6Address(s.ap6),
        exempt4=frozenset(e for e in exempt if e.version == 4),  # type: ignore[misc]
        exempt6=frozenset(e for e in exempt if e.version == 6),  # type: ignore[misc]
        no_ap=s.no_ap,  # type: ignore[arg-type]
        settings=Settings(mark=s.mark, mask=s.mask, table=s.table, priority=s.priority),
    )


# --- the test -----------------------------------------------------------------------------------

pytestmark = pytest.mark.netns

# 25 sequences of 3 to 6 steps: 10-20 s on a 2-vCPU VM, well under a minute when shared.
PROPERTY_SETTINGS = settings(
    max_examples=25,  # the shared profile (root conftest.py) sets the rest
    # No "explain" phase: it re-runs a failing example dozens of times, each a real apply.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    # One lab for every example, on purpose; each example starts by cleaning the kernel.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Generous: an apply of a few CIDRs takes milliseconds, but the machine is shared.
ANSWER_TIMEOUT = 20.0
LINK_UP_TIMEOUT = 5.0

# In the private-AP lab, A has eth0 (172.31.1.2/24, fd31:1::2/64; default routes via R) and
# eth1 (10.77.0.2/24, fd77::2/64, where the APs are). The lab makes rp_filter strict in A;
# eth0 is set back to loose, so only an IPv4 AP on eth1 needs src_valid_mark.
AP4S = [None, "10.77.0.11", "10.77.0.12", "172.31.1.50", "10.10.10.1", "10.99.0.1"]
AP6S = [None, "fd77::11", "fd31:1::50", "fd10:10:10::1", "fd99::1"]
# Where each leads: interface name when on-link; the rest is routed via R (10.10.10.1) or
# unreachable (10.99.0.0/24 and fd99::/64 get "unreachable" routes), i.e. no usable AP.
ON_LINK = {
    "10.77.0.11": "eth1",
    "10.77.0.12": "eth1",
    "172.31.1.50": "eth0",
    "fd77::11": "eth1",
    "fd31:1::50": "eth0",
}
STRICT = {"eth1"}
SYSCTL_KEYS = (
    "net.ipv4.conf.eth0.src_valid_mark",
    "net.ipv4.conf.eth1.src_valid_mark",
    "net.ipv4.nexthop_compat_mode",
)
BASELINE = {key: 1 if key.endswith("compat_mode") else 0 for key in SYSCTL_KEYS}
SETTINGS = [
    Settings(),
    Settings(mark=0x100, mask=0x700, table=7400, priority=7400),
    Settings(mark=0x2000, mask=0x2006, table=51, priority=150),
]
# Other software's objects, which sdnsup must never touch.
FOREIGN_TABLE = "100"
FOREIGN_ROUTE = ["ip", "route", "replace", "192.168.0.0/16", "via", "172.31.1.1", "table", "100"]
FOREIGN_SETUP = [
    ["ip", "rule", "add", "pref", "100", "fwmark", "0x4000/0x4000", "lookup", "100"],
    FOREIGN_ROUTE,
    ["ip", "route", "add", "unreachable", "10.99.0.0/24"],
    ["ip", "-6", "route", "add", "unreachable", "fd99::/64"],
    ["nft", "add table inet other; add chain inet other c { type filter hook input priority 0; }"],
    ["sysctl", "-q", "-w", "net.ipv4.conf.eth0.rp_filter=2"],
]
CC_ADDRS = ["192.0.2.10/32", "10.77.0.11/32", "2001:db8::10/128"]
EDGE_CIDRS = ["0.0.0.0/0", "255.255.255.255/32", "::/0", "ffff::/16"]


# --- reading the kernel with the usual tools ------------------------------------------------------

READ_SCRIPT = """
for cmd in "ip -j -4 rule show" "ip -j -6 rule show" "ip -j -4 route show table all" \
    "ip -j -6 route show table all" "ip -j nexthop show" "nft -j list ruleset"; do
  $cmd || echo '[]'
  echo '@@'
done
sysctl -n {keys}
"""


@dataclass(frozen=True)
class Kernel:
    """sdnsup's objects in A, as the tools print them, normalised; and the foreign ones."""

    rules: frozenset[tuple[str, int, int, int, int]] = frozenset()
    routes: frozenset[tuple[str, int, int]] = frozenset()
    nexthops: frozenset[tuple[int, str | None, str | None]] = frozenset()
    sets: dict[str, frozenset[str]] | None = None  # None: no table inet sdnsup
    ruleset: str = ""
    sysctls: dict[str, int] = field(default_factory=lambda: dict(BASELINE))


def _net(text: str, family: str) -> str:
    if text == "default":
        return "0.0.0.0/0" if family == "4" else "::/0"
    return str(ipaddress.ip_network(text))


def _elements(elems: list[Any]) -> frozenset[str]:
    out: set[str] = set()
    for e in elems:
        e = e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e
        if isinstance(e, dict) and "prefix" in e:
            out.add(str(ipaddress.ip_network(f"{e['prefix']['addr']}/{e['prefix']['len']}")))
        elif isinstance(e, dict) and "range" in e:
            lo, hi = (ipaddress.ip_address(a) for a in e["range"])
            out |= {str(n) for n in ipaddress.summarize_address_range(lo, hi)}  # type: ignore[arg-type]
        else:
            out.add(str(ipaddress.ip_network(e)))
    return frozenset(out)


@dataclass
class Observed:
    kernel: Kernel
    foreign: dict[str, Any]


def read_kernel(lab: Lab) -> Observed:
    out = lab.exec(lab.ns_a, "sh", "-c", READ_SCRIPT.format(keys=" ".join(SYSCTL_KEYS))).stdout
    *parts, tail = out.split("@@\n")
    rules4, rules6, routes4, routes6, nexthops, ruleset = (json.loads(p or "[]") for p in parts)
    rules = frozenset(
        (
            fam,
            r["priority"],
            int(r["fwmark"], 16),
            int(r.get("fwmask", "0xffffffff"), 16),
            int(r["table"]),
        )
        for fam, listing in (("4", rules4), ("6", rules6))
        for r in listing
        if owns(r)
    )
    routes = frozenset(
        (_net(r["dst"], fam), int(r["table"]), r["nhid"])
        for fam, listing in (("4", routes4), ("6", routes6))
        for r in listing
        if owns(r)
    )
    nhs = frozenset((n["id"], n.get("gateway"), n.get("dev")) for n in nexthops if owns(n))
    objects = ruleset.get("nftables", []) if isinstance(ruleset, dict) else []
    ours = [o for o in objects if next(iter(o.values())).get("table") == "sdnsup"]
    has_table = any(o.get("table", {}).get("name") == "sdnsup" for o in objects)
    sets = None
    text = ""
    if has_table:
        sets = {o["set"]["name"]: _elements(o["set"].get("elem", [])) for o in ours if "set" in o}
        sets = {k: v for k, v in sets.items() if v}
        text = table_from_listing("sdnsup", ours).ruleset
    values = [int(v) for v in tail.split()]
    foreign = {
        "rules": sorted(json.dumps(r, sort_keys=True) for r in rules4 + rules6 if not owns(r)),
        # Only what other software put there: the kernel itself changes the connected routes
        # of a flapped link (e.g. eth0's fe80::/64 does not come back with keep_addr_on_down).
        "routes": sorted(
            json.dumps(r, sort_keys=True)
            for r in routes4 + routes6
            if not owns(r) and (r.get("table") == FOREIGN_TABLE or r.get("type") == "unreachable")
        ),
        "tables": sorted(
            o["table"]["name"] for o in objects if "table" in o and o["table"]["name"] != "sdnsup"
        ),
    }
    kernel = Kernel(rules, routes, nhs, sets, text, dict(zip(SYSCTL_KEYS, values, strict=True)))
    return Observed(kernel, foreign)


def model(s: State) -> Kernel:
    """What the kernel must hold for ``s`` (README "What sdnsup installs")."""
    if not s.cidrs:
        return Kernel()
    rules, routes, nhs = set(), set(), set()
    sysctls = dict(BASELINE)
    for fam, ap, nhid in (("4", s.ap4, NHID_V4), ("6", s.ap6, NHID_V6)):
        cidrs = s.v(int(fam))
        if not cidrs:
            continue
        dev = ON_LINK.get(ap) if ap is not None else None
        nhs.add((nhid, ap if dev else None, dev))
        routes |= {(str(c), s.table, nhid) for c in cidrs}
        if dev or s.no_ap == "blackhole":
            rules.add((fam, s.priority, s.mark, s.mark, s.table))
        if fam == "4" and dev in STRICT:
            sysctls[f"net.ipv4.conf.{dev}.src_valid_mark"] = 1
    sysctls["net.ipv4.nexthop_compat_mode"] = 0  # no other software has nexthop objects in A
    exempt = {ipaddress.ip_network(e) for e in s.exempt}
    exempt |= {ipaddress.ip_network(a) for a in (s.ap4, s.ap6) if a is not None}
    sets = {
        "dst4": frozenset(str(n) for n in s.v(4)),
        "dst6": frozenset(str(n) for n in s.v(6)),
        "exempt4": frozenset(str(n) for n in exempt if n.version == 4),
        "exempt6": frozenset(str(n) for n in exempt if n.version == 6),
    }
    sets = {k: v for k, v in sets.items() if v}
    settings_ = Settings(mark=s.mark, mask=s.mask, table=s.table, priority=s.priority)
    elements = {k: frozenset(ipaddress.ip_network(e) for e in v) for k, v in sets.items()}
    ruleset = render_table(settings_, elements).ruleset  # type: ignore[arg-type]
    return Kernel(frozenset(rules), frozenset(routes), frozenset(nhs), sets, ruleset, sysctls)


# --- the applier process and the steps ------------------------------------------------------------


class Driver:
    """The applier serving commands inside A."""

    def __init__(self, lab: Lab) -> None:
        assert lab.tmpdir is not None
        record = lab.tmpdir / "sysctl-record.json"
        self.lab = lab
        self.proc = lab.popen(
            lab.ns_a,
            sys.executable,
            __file__,
            "--serve",
            str(record),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            label="applier",
        )

    def ask(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], ANSWER_TIMEOUT)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            raise AssertionError(
                f"the applier did not answer {op} within {ANSWER_TIMEOUT} s:\n"
                f"{self.lab.logs(self.proc)}"
            )
        answer: dict[str, Any] = json.loads(line)
        assert "error" not in answer, f"{op} failed:\n{answer['error']}"
        return answer

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # the driver's loop ends
        self.lab.stop(self.proc)


@dataclass
class Host:
    lab: Lab
    driver: Driver
    foreign: dict[str, Any]

    def sh(self, *argv: str, check: bool = True) -> None:
        self.lab.exec(self.lab.ns_a, *argv, check=check)


@pytest.fixture
def host(make_lab: Any) -> Iterator[Host]:
    lab = make_lab(n_aps=2, ap_link="private", rp_filter_strict=True)
    for argv in FOREIGN_SETUP:
        lab.exec(lab.ns_a, *argv)
    driver = Driver(lab)
    try:
        yield Host(lab, driver, read_kernel(lab).foreign)
    finally:
        driver.close()


def state_for(draw: st.DrawFn, pool: list[str], s: Settings) -> State:
    picks = draw(st.lists(st.sampled_from(pool), max_size=6))
    kept: list[Any] = []
    for n in (ipaddress.ip_network(p) for p in picks):
        if not any(n.version == k.version and n.overlaps(k) for k in kept):
            kept.append(n)
    return State(
        cidrs=tuple(sorted(str(n) for n in kept)),
        ap4=draw(st.sampled_from(AP4S)),
        ap6=draw(st.sampled_from(AP6S)),
        exempt=tuple(draw(st.lists(st.sampled_from(CC_ADDRS), max_size=2, unique=True))),
        no_ap=draw(st.sampled_from(["fallback", "blackhole"])),
        mark=s.mark,
        mask=s.mask,
        table=s.table,
        priority=s.priority,
    )


DAMAGE = [
    "delete table",
    "delete element",
    "delete route",
    "flush route table",
    "delete nexthop",
    "link flap",
    "delete rule",
    "reset sysctls",
    "stray route",
    "stray rule",
]


# Small pools of nested, adjacent and repeated networks, plus the edges of the address space.
_v4 = st.builds(
    lambda a, b, p: str(ipaddress.ip_network(f"10.{a}.{b}.0/{p}", strict=False)),
    st.integers(0, 3),
    st.integers(0, 3),
    st.sampled_from([8, 16, 23, 24, 32]),
)
_v6 = st.builds(
    lambda a, b, p: str(ipaddress.ip_network(f"fd0{a}:{b}::/{p}", strict=False)),
    st.integers(0, 3),
    st.integers(0, 3),
    st.sampled_from([16, 32, 63, 64, 128]),
)


@st.composite
def sequences(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """Steps: ("apply", State), ("damage", kind, index), ("restart", State); the first is
    always an apply, and damage is as frequent as applies."""
    pool = draw(st.lists(_v4, min_size=1, max_size=5)) + draw(st.lists(_v6, min_size=1, max_size=4))
    pool += draw(st.lists(st.sampled_from(EDGE_CIDRS), max_size=2))
    s = SETTINGS[0]
    steps: list[tuple[Any, ...]] = [("apply", state_for(draw, pool, s))]
    for _ in range(draw(st.integers(2, 5))):
        kind = draw(st.sampled_from(["apply", "damage", "damage", "restart"]))
        if kind == "apply":
            steps.append(("apply", state_for(draw, pool, s)))
        elif kind == "damage":
            steps.append(("damage", draw(st.sampled_from(DAMAGE)), draw(st.integers(0, 99))))
        else:
            s = draw(st.sampled_from(SETTINGS))
            steps.append(("restart", state_for(draw, pool, s)))
    return steps


def _pick(items: Any, index: int) -> Any:
    ordered = sorted(items, key=str)
    return ordered[index % len(ordered)] if ordered else None


def damage(host: Host, kind: str, index: int, last: State) -> None:
    """What an operator, another tool or the kernel does behind sdnsup's back."""
    seen = read_kernel(host.lab).kernel
    if kind == "delete table":
        host.sh("nft", "delete table inet sdnsup", check=False)
    elif kind == "delete element" and seen.sets:
        name = _pick(seen.sets, index)
        host.sh("nft", f"delete element inet sdnsup {name} {{ {_pick(seen.sets[name], index)} }}")
    elif kind == "delete route" and seen.routes:
        dst, table, _ = _pick(seen.routes, index)
        host.sh("ip", "route", "del", dst, "table", str(table))
    elif kind == "flush route table":
        for fam in ("-4", "-6"):  # "No such process" when a family has no route there
            host.sh("ip", fam, "route", "flush", "table", str(last.table), check=False)
    elif kind == "delete nexthop" and seen.nexthops:
        host.sh("ip", "nexthop", "del", "id", str(_pick(seen.nexthops, index)[0]))
    elif kind == "link flap":
        # The kernel flushes the nexthops on a downed link, and the routes using them,
        # without a delete event per route.
        dev = ("eth0", "eth1")[index % 2]
        host.sh("ip", "link", "set", dev, "down")
        host.sh("ip", "link", "set", dev, "up")
        wait_links_up(host)
        # The kernel flushed the other software's route via eth0 too; that software puts it
        # back (not sdnsup's business, and not what this test checks).
        host.sh(*FOREIGN_ROUTE)
    elif kind == "delete rule" and seen.rules:
        fam, prio, mark, mask, table = _pick(seen.rules, index)
        host.sh(
            "ip",
            f"-{fam}",
            "rule",
            "del",
            "pref",
            str(prio),
            "fwmark",
            f"{mark:#x}/{mask:#x}",
            "lookup",
            str(table),
        )
    elif kind == "reset sysctls":
        host.sh("sysctl", "-q", "-w", *(f"{k}={v}" for k, v in BASELINE.items()))
    elif kind == "stray route" and seen.nexthops:
        nhid, _, _ = _pick(seen.nexthops, index)
        dst = "10.255.0.0/16" if nhid == NHID_V4 else "fdff::/16"
        host.sh(
            "ip",
            "route",
            "add",
            dst,
            "table",
            str(last.table),
            "nhid",
            str(nhid),
            "proto",
            str(RTPROT_SDNSUP),
        )
    elif kind == "stray rule":
        host.sh(
            "ip",
            "rule",
            "add",
            "pref",
            "7999",
            "fwmark",
            "0x8000/0x8000",
            "lookup",
            "7999",
            "proto",
            str(RTPROT_SDNSUP),
        )


def wait_links_up(host: Host) -> None:
    """After a flap, until the connected routes are back: the AP must resolve on-link again."""

    def on_link() -> bool:
        for addr, dev in ON_LINK.items():
            out = host.lab.exec(host.lab.ns_a, "ip", "-j", "route", "get", addr, check=False).stdout
            got = json.loads(out or "[{}]")[0]
            if got.get("dev") != dev or "gateway" in got:
                return False
        return True

    wait_for(on_link, LINK_UP_TIMEOUT, "A's links to come back up")


def reset(host: Host) -> None:
    """A clean start for an example, whatever the previous one left."""
    host.driver.ask("restart")
    host.driver.ask("teardown")
    for dev in ("eth0", "eth1"):
        host.sh("ip", "link", "set", dev, "up")
    host.sh("sysctl", "-q", "-w", *(f"{k}={v}" for k, v in BASELINE.items()))
    host.sh("ip", "rule", "del", "pref", "7999", check=False)
    wait_links_up(host)
    assert read_kernel(host.lab).kernel == Kernel()


def apply_and_check(host: Host, s: State) -> None:
    event(f"{len(s.cidrs)} CIDRs")  # --hypothesis-show-statistics
    answer = host.driver.ask("apply", state=s.__dict__)
    assert answer["again"] == 0, f"applying the same state again wrote: {answer}"
    assert answer["belief"], "what the applier believes differs from what it reads back"
    seen = read_kernel(host.lab)
    assert seen.kernel == model(s)
    assert seen.foreign == host.foreign


@PROPERTY_SETTINGS
@given(sequences())
def test_the_kernel_ends_as_the_last_desired_state(
    host: Host, steps: list[tuple[Any, ...]]
) -> None:
    reset(host)
    last = steps[0][1]
    for step in steps:
        if step[0] == "apply":
            last = step[1]
            apply_and_check(host, last)
        elif step[0] == "restart":  # a new process (as after kill -9), maybe other settings
            last = step[1]
            host.driver.ask("restart")
            apply_and_check(host, last)
        else:  # damage, then heal as the daemon does: re-read, apply
            event(f"damage: {step[1]}")
            damage(host, step[1], step[2], last)
            host.driver.ask("resync")
            apply_and_check(host, last)
    host.driver.ask("teardown")
    seen = read_kernel(host.lab)
    assert seen.kernel == Kernel()
    assert seen.foreign == host.foreign


if __name__ == "__main__":
    serve(Path(sys.argv[sys.argv.index("--serve") + 1]))
