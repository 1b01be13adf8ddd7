"""The fault matrix, network half: every fault injected while connections run both ways.

One lab (three APs answering after 5/20/40 ms, a CC, the APs behind A's second interface)
and, where sound, one sdnsup serve every test of this module: the kernel-state faults are
healed by the same process one after another, as they would be on a long-lived host. Faults
that kill an AP start a fresh sdnsup, since a dead AP stays out of use for a hold-down.

Each test ends with what a user needs: connections A -> B work again and go through the AP
sdnsup should use, connections B -> A never failed (none of these faults touches A's LAN
link), and A's kernel holds exactly sdnsup's state. The stream's figures go to
$SDNSUP_FAULT_REPORT (``scripts/bench faults`` prints them).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Collection, Iterator

import pytest

from integration.faultlib import (
    FaultLab,
    assert_clean,
    assert_consistent,
    default_exempt,
    fault_lab,
    record,
)
from integration.helpers import owned, wait_for
from sdnsup.lab.services import Ticker
from sdnsup.lab.traffic import B_TO_A, ConnectionStream
from sdnsup.state import DEFAULT_PRIORITY, DEFAULT_TABLE, NFT_TABLE

pytestmark = pytest.mark.netns

# Generous limits: a test checks that service comes back, the benchmark reports how fast.
HEAL_TIMEOUT = 10.0
FAILOVER_TIMEOUT = 10.0
# An AP declared dead is reused only after sdnsup's 10 s hold-down and 3 good probes.
COMEBACK_TIMEOUT = 30.0
# How long an interface stays down in a flap: `ip link set down; ip link set up` by an
# operator or a flapping cable, shorter than sdnsup's keepalive detection (3 x 0.2 s).
FLAP_DOWN = 0.3
# After recovery, the stream must stay clean this long: service came back for good, not
# for one lucky streak between two heals.
STEADY = 0.5


@pytest.fixture(scope="module")
def flab() -> Iterator[FaultLab]:
    with fault_lab() as fl:
        yield fl


def _assert_inbound_never_failed(stream: ConnectionStream) -> None:
    attempted, failed = stream.report().by_direction[B_TO_A]
    assert attempted > 0
    assert failed == 0, f"B -> A connections failed:\n{stream.report()}"


def _heal_case(
    flab: FaultLab, fault: str, inject: Callable[[FaultLab], object], family: int = 4
) -> None:
    """Inject a kernel-state fault into the running sdnsup's state; check it heals to AP 1
    (with the connection stream on IPv4, or IPv6 with ``family`` 6)."""
    expected = flab.overlay(1) if family == 4 else flab.overlay6(1)
    with flab.case(), flab.stream(family=family) as stream:
        stream.mark(fault)
        inject(flab)
        recovery = stream.wait_healthy(HEAL_TIMEOUT, via=[expected])
        stream.stay_healthy(STEADY)
        assert_consistent(flab.lab, 1)
        assert stream.last_seen_by_b() == expected
        assert flab.proc is not None and flab.proc.poll() is None, "sdnsup exited"
    _assert_inbound_never_failed(stream)
    record(fault, stream.report(), note=f"healed, A -> B via AP 1 after {recovery:.3f} s")


def _a(flab: FaultLab, *argv: str) -> None:
    flab.lab.exec(flab.lab.ns_a, *argv)


# --- someone changes sdnsup's kernel state --------------------------------------------------


def test_external_route_deletion_heals(flab: FaultLab) -> None:
    _heal_case(
        flab,
        "route deleted",
        lambda fl: _a(fl, "ip", "route", "del", "10.10.10.0/24", "table", str(DEFAULT_TABLE)),
    )


def test_route_table_flush_heals(flab: FaultLab) -> None:
    def flush(fl: FaultLab) -> None:
        for fam in ("-4", "-6"):
            _a(fl, "ip", fam, "route", "flush", "table", str(DEFAULT_TABLE))

    _heal_case(flab, "ip route flush table", flush)


def test_policy_rule_deletion_heals(flab: FaultLab) -> None:
    def delete(fl: FaultLab) -> None:
        for fam in ("-4", "-6"):
            _a(fl, "ip", fam, "rule", "del", "pref", str(DEFAULT_PRIORITY))

    # Both families' rules go; the stream checks IPv6 (the other heal tests check IPv4).
    _heal_case(flab, "rule deleted (IPv4 and IPv6)", delete, family=6)


def test_nexthop_deletion_heals(flab: FaultLab) -> None:
    def delete(fl: FaultLab) -> None:
        # Deleting a nexthop object takes every route through it along (kernel semantics).
        listing = fl.lab.exec(fl.lab.ns_a, "ip", "-j", "nexthop", "show").stdout
        ids = [str(nh["id"]) for nh in json.loads(listing) if str(nh.get("protocol")) == "245"]
        assert len(ids) == 4  # per family: the CIDR routes' and the active AP slot's
        for nhid in ids:
            _a(fl, "ip", "nexthop", "del", "id", nhid)

    _heal_case(flab, "nexthop deleted", delete)


def test_nft_table_deletion_heals(flab: FaultLab) -> None:
    _heal_case(
        flab, "nft table deleted", lambda fl: _a(fl, "nft", "delete", "table", "inet", NFT_TABLE)
    )


def test_set_element_deletion_heals(flab: FaultLab) -> None:
    _heal_case(
        flab,
        "set element deleted",
        lambda fl: _a(fl, "nft", f"delete element inet {NFT_TABLE} dst4 {{ 10.10.10.0/24 }}"),
    )


def test_nft_flush_ruleset_heals(flab: FaultLab) -> None:
    _heal_case(flab, "nft flush ruleset", lambda fl: _a(fl, "nft", "flush", "ruleset"))


# --- interfaces flap ------------------------------------------------------------------------


def _flap_case(
    flab: FaultLab, fault: str, down: Callable[[], object], up: Callable[[], object]
) -> None:
    """A short flap: service comes back through whichever AP sdnsup then uses (AP 1 if its
    keepalive did not declare it dead, else the next of the ranking), consistently."""
    with flab.case(), flab.stream() as stream:
        stream.mark(fault)
        down()
        time.sleep(FLAP_DOWN)
        up()
        recovery = stream.wait_healthy(FAILOVER_TIMEOUT, via=flab.overlays())
        stream.stay_healthy(STEADY)
        ap = flab.ap_by_overlay(stream.last_seen_by_b())
        assert ap is not None
        # Traffic, kernel and sdnsup agree on the AP in use.
        assert flab.active_ap() == ap
        assert_consistent(flab.lab, ap)
    _assert_inbound_never_failed(stream)
    record(fault, stream.report(), note=f"A -> B via AP {ap} after {recovery:.3f} s")


def test_client_interface_flap_heals(flab: FaultLab) -> None:
    lab = flab.lab
    ifname = lab.ap(1).ifname_in_a  # A's interface to the APs, not its LAN link
    assert ifname != lab.a_ifname

    def link(state: str) -> Callable[[], object]:
        return lambda: lab.exec(lab.ns_a, "ip", "link", "set", ifname, state)

    _flap_case(flab, "client interface flap", link("down"), link("up"))


def test_ap_interface_flap_heals(flab: FaultLab) -> None:
    lab = flab.lab
    _flap_case(flab, "AP interface flap", lambda: lab.ap_link_down(1), lambda: lab.ap_link_up(1))


# --- APs die ----------------------------------------------------------------------------------


def _active_ap_death(flab: FaultLab, fault: str, kill: Callable[[], object]) -> None:
    with flab.case(fresh=True), flab.stream() as stream:
        stream.mark(fault)
        kill()
        recovery = stream.wait_healthy(FAILOVER_TIMEOUT, via=[flab.overlay(2)])
        stream.stay_healthy(STEADY)
        assert stream.last_seen_by_b() == flab.overlay(2)  # the next of the ranking
        assert_consistent(flab.lab, 2)
    _assert_inbound_never_failed(stream)
    record(fault, stream.report(), note=f"failed over to AP 2 after {recovery:.3f} s")


def test_active_ap_link_cut_fails_over(flab: FaultLab) -> None:
    _active_ap_death(flab, "active AP link cut", lambda: flab.lab.ap_link_down(1))


def test_active_ap_agent_dropping_fails_over(flab: FaultLab) -> None:
    # The AP still forwards but answers no probe: sdnsup must leave it all the same.
    _active_ap_death(flab, "active AP stops answering", lambda: flab.lab.set_ap_drop(1, True))


def test_active_ap_forwarding_nothing_is_found_from_the_traffic(flab: FaultLab) -> None:
    """A gray failure: AP 1's overlay side dies, its probe agent keeps answering. New
    connections to three hosts in the CIDRs show it (passive checking, the default)."""
    lab = flab.lab
    hosts = ("10.10.10.1", "10.10.10.2", "10.10.10.3")
    for host in hosts[1:]:
        lab.exec(lab.ns_b, "ip", "addr", "replace", f"{host}/24", "dev", "eth0")
    fault = "active AP forwards nothing (overlay side down)"
    with flab.case(fresh=True), flab.stream(interval=0.1, b_hosts=hosts) as stream:
        stream.mark(fault)
        lab.ap_overlay_down(1)
        recovery = stream.wait_healthy(FAILOVER_TIMEOUT, via=[flab.overlay(2)])
        stream.stay_healthy(STEADY)
        assert_consistent(lab, 2)
        assert "forwards nothing" in flab.logs()
    _assert_inbound_never_failed(stream)
    record(fault, stream.report(), note=f"found from the traffic, via AP 2 after {recovery:.3f} s")


def test_all_aps_dead_then_back(flab: FaultLab) -> None:
    lab = flab.lab
    direct = str(lab.a_addr)  # the normal route leaves by A's LAN interface
    with flab.case(fresh=True), flab.stream() as stream:
        stream.mark("all APs dead")
        for index in range(1, len(lab.aps) + 1):
            lab.ap_link_down(index)
        # No AP: the default no-AP policy sends the traffic the normal route (B sees A).
        fallback = stream.wait_healthy(FAILOVER_TIMEOUT, via=[direct])
        stream.stay_healthy(STEADY)
        assert not owned(lab)["rules"]  # the no-AP fallback: no policy rule steers
        stream.mark("all APs back")
        for index in range(1, len(lab.aps) + 1):
            lab.ap_link_up(index)
        back = stream.wait_healthy(COMEBACK_TIMEOUT, via=flab.overlays())
        stream.stay_healthy(STEADY)
        ap = flab.ap_by_overlay(stream.last_seen_by_b())
        assert ap is not None
        assert_consistent(lab, ap)
    _assert_inbound_never_failed(stream)
    record(
        "all APs dead, then back",
        stream.report(),
        note=f"fallback to the normal route after {fallback:.3f} s; back through AP {ap} "
        f"{back:.3f} s after the APs returned (hold-down)",
    )


# --- the AP changes under live sessions -------------------------------------------------------

# Long-lived sessions (a line every 100 ms) through the AP in use when the fault comes; each
# must carry this many lines after sdnsup logged the change (a switch can take only 0.5 s).
SESSION_LINES = 10
# A CC change is seen at the next refresh: within 12 s with the shortest ttl (10 s +-20%).
CHANGE_TIMEOUT = 20.0


def _open_sessions(flab: FaultLab) -> dict[str, Ticker]:
    lab = flab.lab
    sessions = {
        f"IPv{family}": lab.open_ticker(lab.ns_a, lab.b_addr if family == 4 else lab.b_addr6)
        for family in (4, 6)
    }
    assert [t.wait_open() for t in sessions.values()] == [flab.overlay(1), flab.overlay6(1)]
    return sessions


def _sessions_note(sessions: dict[str, Ticker], before: dict[str, int]) -> str:
    """Stop the sessions once each sent :data:`SESSION_LINES` lines beyond ``before`` (its
    count when the change came), and check that none lost a line or changed AP."""
    wait_for(
        lambda: all(t.report().sent >= before[n] + SESSION_LINES for n, t in sessions.items()),
        SESSION_LINES * 0.5,
        f"{SESSION_LINES} more lines on each session",
    )
    reports = {name: t.stop() for name, t in sessions.items()}
    for name, report in reports.items():
        assert report.errors == [] and report.lost == 0, f"{name} session: {report}"
        assert len(report.peers) == 1, f"{name}: {report}"
    lines = sum(r.sent for r in reports.values())
    return f"{len(reports)} live sessions kept their AP: {lines} lines, 0 lost, 0 resets"


def _change_case(
    flab: FaultLab,
    fault: str,
    change: Callable[[], object],
    expect: str,
    prepare: Callable[[], object] = lambda: None,
    exempt: Collection[str] | None = None,
) -> None:
    """A change of AP that is not a death: new connections move to AP 2 (``expect`` is the
    log line saying why), live sessions stay on AP 1 and lose nothing. ``prepare`` runs
    before sdnsup starts."""
    with flab.case(fresh=True):
        flab.stop_sdnsup()
        prepare()
        flab.start_sdnsup("--reprobe-interval", "1")  # find the faster AP at once
        with flab.stream() as stream:
            sessions = _open_sessions(flab)
            time.sleep(0.5)
            stream.mark(fault)
            change()
            wait_for(lambda: expect in flab.logs(), CHANGE_TIMEOUT, expect)
            before = {name: t.report().sent for name, t in sessions.items()}
            recovery = stream.wait_healthy(FAILOVER_TIMEOUT, via=[flab.overlay(2)])
            note = _sessions_note(sessions, before)
        # the sessions ended: AP 1 drains completely, and only AP 2's state is left
        wait_for(lambda: "drained" in flab.logs(), HEAL_TIMEOUT, "AP 1 drained")
        wait_for(lambda: _consistent(flab, 2, exempt), HEAL_TIMEOUT, "AP 2's state only")
    _assert_inbound_never_failed(stream)
    record(fault, stream.report(), note=f"{note}; new connections via AP 2 after {recovery:.3f} s")


def _consistent(flab: FaultLab, ap: int, exempt: Collection[str] | None) -> bool:
    try:
        assert_consistent(flab.lab, ap, exempt=exempt)
    except AssertionError:
        return False
    return True


def test_switch_to_a_faster_ap_keeps_live_sessions(flab: FaultLab) -> None:
    def faster() -> None:
        flab.lab.set_ap_delay(1, 0.060)
        flab.lab.set_ap_delay(2, 0.0)

    _change_case(flab, "switch to a faster AP", faster, "switched to faster AP ap2")


def test_cc_drain_of_the_active_ap_keeps_live_sessions(flab: FaultLab) -> None:
    # The CC's next answer (ttl 10 s, the shortest sdnsup follows) no longer lists AP 1.
    # sdnsup starts as on a first boot (no saved list, whose ttl would be the older 60 s),
    # so it asks the CC at once and learns the 10 s.
    def prepare() -> None:
        flab.lab.set_cc(ttl=10)
        shutil.rmtree(flab.lab.state_dir, ignore_errors=True)

    _change_case(
        flab,
        "CC drains the active AP",
        lambda: flab.lab.set_cc(aps=[2, 3], ttl=10),
        "no longer listed; switched to ap2",
        prepare=prepare,
        # once drained, AP 1 is known to nobody: no longer exempt
        exempt=default_exempt(flab.lab) - {str(flab.lab.ap(1).addr), str(flab.lab.ap(1).addr6)},
    )


def test_death_of_the_sessions_ap_ends_them_at_once(flab: FaultLab) -> None:
    lab = flab.lab
    with flab.case(fresh=True), flab.stream() as stream:
        sessions = _open_sessions(flab)
        idle = lab.open_ticker(lab.ns_a, lab.b_addr, idle=True)
        stream.mark("death of the AP carrying live sessions")
        cut = time.monotonic()
        lab.ap_link_down(1)
        recovery = stream.wait_healthy(FAILOVER_TIMEOUT, via=[flab.overlay(2)])
        gone, back = idle.wait_for("error", 10), idle.wait_for("reopen", 10)
        assert gone is not None and back is not None, idle.report()
        assert gone["err"] == "ECONNABORTED" and back["peer"] == flab.overlay(2)
        for name, ticker in sessions.items():
            error = ticker.wait_for("error", 10)
            assert error is not None and error["err"] == "ECONNABORTED", (name, ticker.report())
        stream.stay_healthy(STEADY)
        assert_consistent(lab, 2)
    _assert_inbound_never_failed(stream)
    record(
        "death of the AP carrying live sessions",
        stream.report(),
        note=f"a blocked recv() failed {gone['t'] - cut:.3f} s after the AP died "
        f"(ECONNABORTED), a new session worked {back['t'] - cut:.3f} s after; new "
        f"connections via AP 2 after {recovery:.3f} s",
    )


# --- connections that conntrack did not see open ----------------------------------------------

# A: accept one connection, then stay silent until the trigger file appears, then greet.
SILENT_SERVER = r"""
import os, socket, sys, time
port, trigger, until = int(sys.argv[1]), sys.argv[2], time.monotonic() + float(sys.argv[3])
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port))
srv.listen()
srv.settimeout(max(0.1, until - time.monotonic()))
print("ready", flush=True)
conn, peer = srv.accept()
print("accepted", peer[0], flush=True)
while not os.path.exists(trigger) and time.monotonic() < until:
    time.sleep(0.02)
conn.sendall(b"hello\n")
print("sent", flush=True)
time.sleep(max(0.0, min(3.0, until - time.monotonic())))
"""
# B: connect, then wait for the greeting.
WAITING_CLIENT = r"""
import socket, sys
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print("connected", flush=True)
conn.settimeout(float(sys.argv[3]))
try:
    print("greeting", conn.recv(100).decode().strip(), flush=True)
except OSError as exc:
    print("no greeting:", exc, flush=True)
"""
SILENT_PORT = 9100
SILENT_SECONDS = 30.0


def test_inbound_connection_opened_without_conntrack_survives_sdnsup(flab: FaultLab) -> None:
    """An inbound connection from B accepted while A had no conntrack user at all (before
    sdnsup started, or between an `nft flush ruleset` and the heal) must keep working once
    sdnsup steers: A's next packet on it is a reply, never a new outbound connection."""
    lab = flab.lab
    assert lab.tmpdir is not None
    trigger = lab.tmpdir / f"silent-{time.monotonic_ns()}"
    with flab.case():
        assert flab.stop_sdnsup() == 0  # A has no nftables table now: conntrack is off
        argv = ["-c", SILENT_SERVER, str(SILENT_PORT), str(trigger), str(SILENT_SECONDS)]
        server = lab.popen(lab.ns_a, sys.executable, *argv, label="a-silent")
        wait_for(lambda: "ready" in lab.logs(server), 10, "the silent server in A")
        argv = ["-c", WAITING_CLIENT, str(lab.a_addr), str(SILENT_PORT), "10"]
        client = lab.popen(lab.ns_b, sys.executable, *argv, label="b-waiting")
        wait_for(lambda: "accepted" in lab.logs(server), 10, "B's connection to A")
        flab.start_sdnsup()
        wait_for(lambda: flab.via() == flab.overlay(1), HEAL_TIMEOUT, "steering through AP 1")
        trigger.touch()
        client.wait(SILENT_SECONDS)
        assert "greeting hello" in lab.logs(client), lab.logs(client)


# --- after all of them ------------------------------------------------------------------------


def test_stop_after_the_faults_leaves_nothing(flab: FaultLab) -> None:
    with flab.case():
        assert flab.stop_sdnsup() == 0
        assert_clean(flab.lab)
