"""What the fault-matrix tests share: a lab with a running sdnsup, kernel-state checks, reports.

A fault test injects one fault while a :class:`~sdnsup.lab.traffic.ConnectionStream` runs
both ways, waits for full service, checks that A's kernel holds exactly sdnsup's intended
state and records the stream's figures (``scripts/bench faults`` prints them as a table)::

    @pytest.fixture(scope="module")
    def flab() -> Iterator[FaultLab]:
        with fault_lab() as fl:          # 3 APs (5/20/40 ms), a CC, sdnsup on AP1
            yield fl

    def test_rule_deleted(flab):
        with flab.case(), flab.stream() as stream:
            stream.mark("rule deleted")
            flab.lab.exec(flab.lab.ns_a, "ip", "rule", "del", "pref", "7300")
            stream.wait_healthy(10, via=[flab.overlay(1)])
            assert_consistent(flab.lab, 1)
        record("rule deleted", stream.report())

The lab uses ``ap_link="private"`` by default: the APs sit behind A's second interface, so a
fault on A's interface to the APs does not touch A's LAN link, which B -> A connections use.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import pytest

from integration.helpers import START_TIMEOUT, owned, start_sdnsup, stop_sdnsup, wait_for
from sdnsup.lab import Lab, LabError, unavailable_reason
from sdnsup.lab.measure import owns
from sdnsup.lab.topology import APLink
from sdnsup.lab.traffic import ConnectionStream, StreamReport
from sdnsup.nft import Network, render_table, table_from_listing
from sdnsup.state import NHID_V4, NHID_V6, Settings, slot_of_nhid

FAULT_REPORT_ENV = "SDNSUP_FAULT_REPORT"

# Three APs with clearly different delays: the ranking (and so the failover order) is 1, 2, 3
# whatever the noise of a shared machine (Tailscale's switch rule needs >10 ms and >33%).
DELAYS: Mapping[int, float] = {1: 0.005, 2: 0.020, 3: 0.040}
# B's subnet both ways, plus an IPv4 CIDR with nothing behind it: "one route per CIDR" is
# checked on more than one route.
CIDRS: tuple[str, ...] = ("10.10.10.0/24", "10.10.20.0/24", "fd10:10:10::/64")
# Generous bounds for tests; the measured figures go to the report.
READY_TIMEOUT = 20.0
SETTINGS = Settings()


# --- the report ---------------------------------------------------------------------------


def record(fault: str, report: StreamReport, note: str = "") -> None:
    """Append one JSON line about ``fault`` to the file named by $SDNSUP_FAULT_REPORT.

    The line holds the fault, connections attempted and failed (in total and per direction:
    ``{"a->b": [attempted, failed], ...}``), the recovery seconds (None: not recovered or no
    mark), ``note`` and the pytest test running. A no-op when the variable is unset or empty.
    """
    path = os.environ.get(FAULT_REPORT_ENV)
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    line = {
        "fault": fault,
        "test": test,
        "attempted": report.attempted,
        "failed": report.failed,
        "by_direction": {d: list(v) for d, v in report.by_direction.items()},
        "recovery": report.recovery,
        "seen_by_b": report.seen_by_b,
        "note": note,
    }
    # One write on an O_APPEND descriptor: lines from several test processes do not interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


# --- kernel state ---------------------------------------------------------------------------


def _json(lab: Lab, *argv: str) -> Any:
    proc = lab.exec(lab.ns_a, *argv, check=False)
    # A routing table nobody ever wrote to does not exist (iproute2 exits 2 saying so):
    # for these checks that is an empty table.
    if proc.returncode != 0 and "does not exist" in proc.stderr:
        return []
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    out = proc.stdout.strip()
    return json.loads(out) if out else []


def default_exempt(lab: Lab) -> set[str]:
    """What sdnsup exempts in a fault lab: the CC (in R, on its LAN address) and every AP."""
    exempt = {str(lab.router_addr)}
    exempt |= {str(a) for ap in lab.aps for a in (ap.addr, ap.addr6)}
    return exempt


def assert_consistent(
    lab: Lab,
    ap: int,
    *,
    cidrs: Collection[str] = CIDRS,
    exempt: Collection[str] | None = None,
    settings: Settings = SETTINGS,
) -> None:
    """A's kernel holds exactly sdnsup's intended state, steering through AP number ``ap``,
    with no other AP carrying pinned connections (no draining slot).

    That is: one ``inet sdnsup`` table (no sdnsup table in another family) equal to what
    sdnsup renders, its sets holding ``cidrs`` and ``exempt`` (default
    :func:`default_exempt`) and its pins naming the AP's slot; one policy rule per family
    (fwmark, table, priority, proto); two nexthops per family, proto sdnsup, via the AP's
    address on A's interface to it: the CIDR routes' and the AP's slot's; in the table,
    exactly one route per CIDR, through the first; in the slot's table, one default route
    through the second; no other sdnsup route.

    Raises:
        AssertionError: naming every difference.
    """
    target = lab.ap(ap)
    nets: list[Network] = [ipaddress.ip_network(c) for c in cidrs]
    exempt_nets: list[Network] = [ipaddress.ip_network(e) for e in (exempt or default_exempt(lab))]
    problems: list[str] = []

    tables = [
        (o["table"]["family"], o["table"]["name"])
        for o in _json(lab, "nft", "-j", "list", "tables")["nftables"]
        if "table" in o
    ]
    ours = [t for t in tables if t[1] == settings.nft_table]
    if ours != [("inet", settings.nft_table)]:
        problems.append(f"nft tables named {settings.nft_table}: {ours}")
    else:
        listing = _json(lab, "nft", "-j", "list", "table", "inet", settings.nft_table)
        have = table_from_listing(settings.nft_table, listing["nftables"])
        elements: dict[str, frozenset[Network]] = {
            "dst4": frozenset(n for n in nets if n.version == 4),
            "dst6": frozenset(n for n in nets if n.version == 6),
            "exempt4": frozenset(n for n in exempt_nets if n.version == 4),
            "exempt6": frozenset(n for n in exempt_nets if n.version == 6),
        }
        pins = [
            (ipaddress.ip_address(nh["gateway"]), key[1])
            for nh in _json(lab, "ip", "-j", "nexthop", "show")
            if owns(nh) and (key := slot_of_nhid(nh["id"])) and key[1]
        ]
        want = render_table(settings, elements, pins)
        if have.ruleset != want.ruleset:
            problems.append(f"nft table inet {settings.nft_table} differs from sdnsup's ruleset")
        if have.pins != want.pins:
            problems.append(f"pins {have.pins}, want {want.pins} (the slots' nexthops)")
        for name in sorted(set(have.elements) | set(want.elements)):
            if have.set(name) != want.set(name):
                got = sorted(map(str, have.set(name)))
                problems.append(f"set {name}: {got}, want {sorted(map(str, want.set(name)))}")

    for fam, gateway in (("-4", target.addr), ("-6", target.addr6)):
        version = 4 if fam == "-4" else 6
        rules = [
            r
            for r in _json(lab, "ip", "-j", fam, "rule", "show")
            if owns(r)
            or r.get("priority") == settings.priority
            or str(r.get("table")) == str(settings.table)
        ]
        want_rule = {
            "priority": settings.priority,
            "fwmark": hex(settings.mark),
            "fwmask": hex(settings.mark),
            "table": str(settings.table),
        }
        if len(rules) != 1 or any(rules[0].get(k) != v for k, v in want_rule.items()):
            problems.append(f"IPv{version} policy rules: {rules}, want one like {want_rule}")

        nexthops = [n for n in _json(lab, "ip", "-j", fam, "nexthop", "show") if owns(n)]
        want_nh = {"gateway": str(gateway), "dev": target.ifname_in_a}
        ids = sorted(slot_of_nhid(n["id"]) or (0, -1) for n in nexthops)
        if [i[1] > 0 for i in ids] != [False, True] or any(
            n.get(k) != v for n in nexthops for k, v in want_nh.items()
        ):
            problems.append(
                f"IPv{version} nexthops: {nexthops}, want two like {want_nh}: the CIDR "
                "routes' and one AP slot's"
            )
        nhid = (NHID_V4 if version == 4 else NHID_V6) if len(nexthops) == 2 else None
        slot_nh = next((n["id"] for n in nexthops if n["id"] != nhid), None)

        table = _json(lab, "ip", "-j", fam, "route", "show", "table", str(settings.table))
        dsts = sorted(r["dst"] for r in table)
        want_dsts = sorted(str(n) for n in nets if n.version == version)
        if dsts != want_dsts:
            problems.append(f"IPv{version} routes in table {settings.table}: {dsts}")
        if nhid is not None and any(r.get("nhid") != nhid for r in table):
            problems.append(f"IPv{version} routes not all through nexthop {nhid}: {table}")
        stray = [
            r
            for r in _json(lab, "ip", "-j", fam, "route", "show", "table", "all")
            if owns(r) and str(r.get("table")) != str(settings.table)
        ]
        slot_route = [r for r in stray if r.get("dst") == "default" and r.get("nhid") == slot_nh]
        if len(stray) != 1 or len(slot_route) != 1:
            problems.append(
                f"IPv{version} sdnsup routes outside table {settings.table}: {stray}, want one "
                f"default route through the AP slot's nexthop {slot_nh}"
            )
    assert not problems, f"A's kernel is not sdnsup's state via AP {ap}:\n" + "\n".join(problems)


def assert_clean(lab: Lab, settings: Settings = SETTINGS) -> None:
    """Nothing of sdnsup's is left in A: no table, rule, nexthop or route of its own, and
    nothing in its routing table or at its rule priority.

    Raises:
        AssertionError: naming what is left.
    """
    left = {k: v for k, v in owned(lab).items() if v}
    for fam in ("-4", "-6"):
        rules = [
            r
            for r in _json(lab, "ip", "-j", fam, "rule", "show")
            if r.get("priority") == settings.priority or str(r.get("table")) == str(settings.table)
        ]
        if rules:
            left[f"rules{fam}"] = rules
        table = _json(lab, "ip", "-j", fam, "route", "show", "table", str(settings.table))
        if table:
            left[f"table {settings.table}{fam}"] = table
    tables = [
        o["table"]
        for o in _json(lab, "nft", "-j", "list", "tables")["nftables"]
        if "table" in o and o["table"]["name"] == settings.nft_table
    ]
    if tables:
        left["nft tables"] = tables
    assert not left, f"sdnsup left state behind in A: {left}"


# --- a lab with a running sdnsup ------------------------------------------------------------


class FaultLab:
    """A lab with AP agents, a CC and (usually) a running sdnsup, shared by fault tests.

    Build it with :func:`fault_lab`. Between tests, :meth:`case` puts the lab back in its
    healthy state and makes sure sdnsup runs and steers through AP 1.
    """

    def __init__(
        self,
        lab: Lab,
        url: str,
        *,
        delays: Mapping[int, float] = DELAYS,
        cidrs: Sequence[str] = CIDRS,
        args: Sequence[str] = (),
    ) -> None:
        self.lab = lab
        self.url = url
        self.delays = dict(delays)
        self.cidrs = tuple(cidrs)
        self.args = tuple(args)
        self.proc: subprocess.Popen[bytes] | None = None

    # --- sdnsup ---------------------------------------------------------------------------

    def start_sdnsup(self, *extra: str) -> subprocess.Popen[bytes]:
        """Start sdnsup in A (``-r CIDRS --cc URL``, the lab's args, ``extra``) and wait for
        its first apply."""
        if self.proc is not None and self.proc.poll() is None:
            raise LabError("sdnsup already runs in this fault lab: stop_sdnsup() first")
        argv = ("-r", ",".join(self.cidrs), "--cc", self.url, *self.args, *extra)
        self.proc = start_sdnsup(self.lab, *argv)
        return self.proc

    def stop_sdnsup(self) -> int | None:
        """SIGTERM sdnsup and return its exit code (None if none was running)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is not None:
            return proc.returncode
        return stop_sdnsup(self.lab, proc)

    def logs(self) -> str:
        """What the current (or last) sdnsup logged."""
        return self.lab.logs(self.proc) if self.proc is not None else ""

    # --- the lab ------------------------------------------------------------------------------

    def overlay(self, ap: int) -> str:
        """The address B sees for a connection through AP ``ap``."""
        return str(self.lab.ap(ap).overlay_addr)

    def overlay6(self, ap: int) -> str:
        """The address B sees for an IPv6 connection through AP ``ap``."""
        return str(self.lab.ap(ap).overlay_addr6)

    def overlays(self) -> set[str]:
        """Every AP's overlay address, both families: "B sees the connection come through
        some AP"."""
        return {str(a) for ap in self.lab.aps for a in (ap.overlay_addr, ap.overlay_addr6)}

    def ap_by_overlay(self, seen: str | None) -> int | None:
        """The AP whose overlay address (either family) B saw, None for another address."""
        return next(
            (
                ap.index
                for ap in self.lab.aps
                if seen in (str(ap.overlay_addr), str(ap.overlay_addr6))
            ),
            None,
        )

    def active_ap(self) -> int | None:
        """The AP sdnsup's IPv4 nexthop points at in A's kernel, None if none."""
        for nh in _json(self.lab, "ip", "-j", "-4", "nexthop", "show"):
            if owns(nh):
                return next(
                    (ap.index for ap in self.lab.aps if str(ap.addr) == nh.get("gateway")), None
                )
        return None

    def via(self) -> str | None:
        """The address B sees for one new connection from A now (None: it failed)."""
        return self.lab.whoami(self.lab.ns_a, self.lab.b_addr, timeout=2)

    def restore(self) -> None:
        """Undo every fault the tests inject: AP links up, agents answering with their
        delays, the CC answering with every AP, A's links up with their default routes."""
        lab = self.lab
        for ap in lab.aps:
            lab.ap_link_up(ap.index)
            lab.ap_overlay_up(ap.index)
            lab.set_ap_drop(ap.index, False)
            lab.set_ap_delay(ap.index, self.delays.get(ap.index, 0.0))
        for ifname in (lab.a_ifname, lab.a_private_ifname):
            if ifname:
                lab.exec(lab.ns_a, "ip", "link", "set", ifname, "up")
        # The kernel drops the default routes with a link; a network manager would put them
        # back. Only when missing: a replace is a route event sdnsup would react to.
        for fam, gateway in (("-4", lab.router_addr), ("-6", lab.router_addr6)):
            if not _json(lab, "ip", "-j", fam, "route", "show", "default"):
                lab.exec(lab.ns_a, "ip", fam, "route", "replace", "default", "via", str(gateway))
        if lab.cc_process is None:
            lab.start_cc()
        lab.set_cc()

    def ready(self, *, fresh: bool = False, ap: int = 1, timeout: float = READY_TIMEOUT) -> None:
        """Restore the lab, and make sure sdnsup runs and steers through AP ``ap`` in a
        consistent state; with ``fresh`` (or when it does not), start a new sdnsup, which
        also forgets the hold-downs of APs an earlier test killed.

        Raises:
            AssertionError / WaitTimeout: sdnsup did not get there within ``timeout``.
        """
        self.restore()
        running = self.proc is not None and self.proc.poll() is None
        if running and not fresh:
            with contextlib.suppress(AssertionError):
                assert_consistent(self.lab, ap, cidrs=self.cidrs)
                if self.via() == self.overlay(ap):
                    return
        self.stop_sdnsup()
        # A new sdnsup starts as on a first boot: the AP list an earlier case left on disk
        # may lack an AP (a CC drain), and starting from it would steer through another AP
        # first, leaving that AP draining the connections that checked the path.
        shutil.rmtree(self.lab.state_dir, ignore_errors=True)
        self.start_sdnsup()
        wait_for(lambda: self.via() == self.overlay(ap), timeout, f"traffic through AP {ap}")
        assert_consistent(self.lab, ap, cidrs=self.cidrs)

    @contextlib.contextmanager
    def case(self, *, fresh: bool = False, ap: int = 1) -> Iterator[FaultLab]:
        """One fault test: :meth:`ready` first; when the body raises, print every lab
        process's log (pytest shows it with the failure)."""
        self.ready(fresh=fresh, ap=ap)
        try:
            yield self
        except BaseException:
            self._print_logs()
            raise

    def stream(self, **kwargs: Any) -> ConnectionStream:
        """A :class:`ConnectionStream` in this lab (keyword arguments go to it)."""
        return ConnectionStream(self.lab, **kwargs)

    def _print_logs(self) -> None:
        if self.lab.is_up:
            print(f"\n----- logs of lab {self.lab.prefix} -----\n{self.lab.all_logs()}")


@contextlib.contextmanager
def fault_lab(
    *,
    n_aps: int = 3,
    delays: Mapping[int, float] = DELAYS,
    ap_link: APLink = "private",
    cidrs: Sequence[str] = CIDRS,
    args: Sequence[str] = (),
    start: bool = True,
) -> Iterator[FaultLab]:
    """A lab with ``n_aps`` AP agents (``delays``), a CC listing them all, a whoami server
    in B (port 8080, for :meth:`FaultLab.via`) and, with
    ``start``, sdnsup steering ``cidrs`` through AP 1 (``args`` added to its command line).

    Everything is torn down at the end, whatever happened; a sdnsup still running is stopped
    with SIGTERM first. Skips the test when this machine cannot build a lab.
    """
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with Lab.create(n_aps=n_aps, ap_link=ap_link) as lab:
        try:
            lab.start_ap_agents(delays)
            url = lab.start_cc()
            lab.set_cc()
            lab.serve_whoami(lab.ns_b)  # for via(): one connection, the address B sees
            flab = FaultLab(lab, url, delays=delays, cidrs=cidrs, args=args)
            if start:
                flab.start_sdnsup()
                wait_for(lambda: flab.via() == flab.overlay(1), START_TIMEOUT, "AP 1 in use")
            yield flab
            flab.stop_sdnsup()
        except BaseException:
            print(f"\n----- logs of lab {lab.prefix} -----\n{lab.all_logs()}", file=sys.stderr)
            raise


__all__ = [
    "CIDRS",
    "DELAYS",
    "FAULT_REPORT_ENV",
    "FaultLab",
    "assert_clean",
    "assert_consistent",
    "default_exempt",
    "fault_lab",
    "record",
]
