"""Live connections through AP changes: real sdnsup, real sessions, real packets.

Every test keeps long-lived sessions open (from A and from the container C behind it, IPv4
and IPv6, a line every 100 ms each) while the AP changes, and a stream of new connections
both ways (B -> A must keep answering). A change of AP must lose no line and reset no
session, unless the session's AP died: then the session must fail fast and a new one work.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from integration import faultlib
from integration.helpers import start_sdnsup, stop_sdnsup, wait_for
from integration.test_supervisord import supervisord_conf
from sdnsup.lab import Lab
from sdnsup.lab.processes import LAB_HOST_ID
from sdnsup.lab.services import Ticker
from sdnsup.lab.traffic import B_TO_A, ConnectionStream

pytestmark = pytest.mark.netns

CIDRS = "10.10.10.0/24,fd10:10:10::/64"
# A probe round every second, so that a faster AP is found at once.
FAST = ("--reprobe-interval", "1")
# Generous: tests check behaviour, scripts/bench measures how fast.
DEATH_BOUND = 5.0


def pinning_lab(
    make_lab, delays: dict[int, float], ttl: float = 60, **kw: object
) -> tuple[Lab, str]:
    lab = make_lab(n_aps=len(delays), container=True, **kw)
    lab.start_ap_agents(delays)
    url = lab.start_cc()
    lab.set_cc(ttl=ttl)
    lab.serve_whoami(lab.ns_b)
    return lab, url


def overlay(lab: Lab, i: int, family: int = 4) -> str:
    ap = lab.ap(i)
    return str(ap.overlay_addr if family == 4 else ap.overlay_addr6)


def logged(lab: Lab, proc: subprocess.Popen[bytes], pattern: str) -> list[str]:
    return [line for line in lab.logs(proc).splitlines() if re.search(pattern, line)]


def wait_logged(lab: Lab, proc: subprocess.Popen[bytes], pattern: str, timeout: float) -> str:
    return wait_for(lambda: next(iter(logged(lab, proc, pattern)), None), timeout, pattern)


class Sessions:
    """Long-lived sessions to B: from A and from C, over IPv4 and IPv6."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.tickers: dict[str, Ticker] = {
            f"{who} IPv{family}": lab.open_ticker(ns, lab.b_addr if family == 4 else lab.b_addr6)
            for who, ns in (("A", lab.ns_a), ("C", lab.ns_c))
            for family in (4, 6)
        }
        self.peers = {name: t.wait_open() for name, t in self.tickers.items()}

    def all_via(self, i: int) -> bool:
        return all(
            peer == overlay(self.lab, i, 6 if name.endswith("6") else 4)
            for name, peer in self.peers.items()
        )

    def assert_intact(self, least: int = 20) -> None:
        """Stop them: every line answered, no error, and each kept its path (the AP B saw
        when it opened), having talked at least ``least`` lines."""
        for name, ticker in self.tickers.items():
            report = ticker.stop()
            assert report.errors == [], f"{name}: {report}"
            assert report.lost == 0 and report.late == 0, f"{name}: {report}"
            assert report.sent >= least, f"{name}: {report}"
            assert set(report.peers) == {self.peers[name]}, f"{name} changed path: {report}"


def assert_inbound_answered(stream: ConnectionStream) -> None:
    attempted, failed = stream.report().by_direction[B_TO_A]
    assert attempted > 10 and failed == 0, stream.report()


def new_connection_via(lab: Lab, i: int) -> bool:
    return lab.whoami(lab.ns_a, lab.b_addr) == overlay(lab, i) and lab.whoami(
        lab.ns_c, lab.b_addr6
    ) == overlay(lab, i, 6)


@pytest.mark.parametrize(
    "where",
    [{}, {"ap_link": "private", "rp_filter_strict": True}],
    ids=["shared LAN", "private AP network, strict rp_filter"],
)
def test_a_faster_ap_takes_new_connections_and_live_sessions_keep_theirs(make_lab, where):
    lab, url = pinning_lab(make_lab, {1: 0.005, 2: 0.040}, **where)
    proc = start_sdnsup(lab, "-r", CIDRS, "--cc", url, *FAST)
    with ConnectionStream(lab) as stream:
        sessions = Sessions(lab)
        assert sessions.all_via(1)
        time.sleep(1)
        lab.set_ap_delay(1, 0.080)
        lab.set_ap_delay(2, 0.0)
        line = wait_logged(lab, proc, "switched to faster AP ap2", 10)
        assert f"ap1 ({lab.ap(1).addr}+{lab.ap(1).addr6}) drains (slot 1)" in line
        wait_for(lambda: new_connection_via(lab, 2), 10, "new connections through AP 2")
        time.sleep(1)
        sessions.assert_intact()
        assert_inbound_answered(stream)
    # no session left on AP 1: its slot is freed, nothing of it stays in the kernel
    wait_logged(lab, proc, r"AP ap1 .* drained: no connection pinned to it", 10)
    wait_for(
        lambda: faultlib.assert_consistent(lab, 2, cidrs=CIDRS.split(",")) is None,
        10,
        "only AP 2's state",
    )
    assert stop_sdnsup(lab, proc) == 0


def test_the_cc_reordering_then_dropping_the_active_ap_drains_it(make_lab):
    lab, url = pinning_lab(make_lab, {1: 0.005, 2: 0.010}, ttl=10)
    proc = start_sdnsup(lab, "-r", CIDRS, "--cc", url, *FAST)
    with ConnectionStream(lab) as stream:
        sessions = Sessions(lab)
        assert sessions.all_via(1)
        lab.set_cc(aps=[2, 1], ttl=10)  # reordered: nothing to do
        time.sleep(13)  # one refresh (ttl 10 s +-20%)
        assert not logged(lab, proc, "switched|no longer listed|failover")
        lab.set_cc(aps=[2], ttl=10)  # an operator drains AP 1 for maintenance
        line = wait_logged(lab, proc, "AP ap1 .* is no longer listed; switched to ap2", 15)
        assert "drains (slot 1)" in line
        wait_for(lambda: new_connection_via(lab, 2), 10, "new connections through AP 2")
        time.sleep(1)
        sessions.assert_intact()
        assert_inbound_answered(stream)
    wait_logged(lab, proc, r"AP ap1 .* drained: no connection pinned to it", 10)
    assert stop_sdnsup(lab, proc) == 0


def test_fail_back_after_the_hold_down_keeps_the_sessions_of_the_interim_ap(make_lab):
    lab, url = pinning_lab(make_lab, {1: 0.005, 2: 0.040})
    proc = start_sdnsup(lab, "-r", CIDRS, "--cc", url, *FAST)
    lab.set_ap_drop(1, True)  # AP 1 stops answering probes: failover to AP 2
    wait_logged(lab, proc, "failover: AP ap1", 10)
    with ConnectionStream(lab) as stream:
        sessions = Sessions(lab)
        assert sessions.all_via(2)
        lab.set_ap_drop(1, False)  # back: chosen again once held down long enough
        wait_logged(lab, proc, "switched to faster AP ap1", 30)
        wait_for(lambda: new_connection_via(lab, 1), 10, "new connections through AP 1")
        time.sleep(1)
        sessions.assert_intact()
        assert_inbound_answered(stream)
    assert stop_sdnsup(lab, proc) == 0


def test_kill9_and_restart_under_supervisord_keeps_every_session_on_its_ap(
    make_lab, tmp_path: Path
):
    lab, url = pinning_lab(make_lab, {1: 0.005, 2: 0.040})
    command = (
        f"{sys.executable} -m sdnsup.cli -r {CIDRS} --cc {url}"
        f" --log-dir {tmp_path}/logs --state-dir {tmp_path}/state --config none"
        f" --host-id {LAB_HOST_ID}"
    )
    conf = supervisord_conf(tmp_path, command)
    lab.popen(lab.ns_a, "supervisord", "-c", str(conf), label="a-supervisord")

    def ctl(*args: str) -> str:
        return lab.exec(lab.ns_a, "supervisorctl", "-c", str(conf), *args, check=False).stdout

    wait_for(lambda: new_connection_via(lab, 1), 30, "supervisord's sdnsup to steer via AP 1")
    pid = ctl("pid", "sdnsup").strip()
    with ConnectionStream(lab) as stream:
        sessions = Sessions(lab)
        assert sessions.all_via(1)
        # The restarted process will find AP 2 faster and take it: AP 1's sessions must
        # keep AP 1, whose slot the new process recovers from the kernel.
        lab.set_ap_delay(1, 0.080)
        lab.set_ap_delay(2, 0.0)
        lab.exec(lab.ns_a, "kill", "-9", pid)
        wait_for(lambda: ctl("pid", "sdnsup").strip() not in ("", "0", pid), 30, "a restart")
        wait_for(lambda: new_connection_via(lab, 2), 30, "new connections through AP 2")
        time.sleep(1)
        sessions.assert_intact()
        assert_inbound_answered(stream)
    log = (tmp_path / "sdnsup.log").read_text()
    assert re.search(r"kept 1 AP slots of the previous run.*slot 1 172\.31\.1\.11", log), log
    assert "stopped" in ctl("stop", "sdnsup")
    faultlib.assert_clean(lab)


@pytest.mark.parametrize("draining", [False, True], ids=["active", "draining"])
def test_sessions_of_an_ap_that_dies_fail_fast_and_new_ones_work(make_lab, draining):
    lab, url = pinning_lab(make_lab, {1: 0.005, 2: 0.040})
    proc = start_sdnsup(lab, "-r", CIDRS, "--cc", url, *FAST)
    with ConnectionStream(lab) as stream:
        sessions = Sessions(lab)
        idle = lab.open_ticker(lab.ns_a, lab.b_addr, idle=True)
        assert sessions.all_via(1) and idle.wait_open() == overlay(lab, 1)
        if draining:  # AP 2 becomes faster: AP 1 only carries these sessions any more
            lab.set_ap_delay(1, 0.080)
            lab.set_ap_delay(2, 0.0)
            wait_logged(lab, proc, "switched to faster AP ap2", 10)
            time.sleep(0.5)
        cut = time.monotonic()
        lab.ap_link_down(1)
        gone = idle.wait_for("error", 10)
        back = idle.wait_for("reopen", 10)
        assert gone is not None and back is not None, idle.report()
        # this host's socket is aborted: the blocked recv() returns at once, no timeout
        assert gone["err"] == "ECONNABORTED" and gone["t"] - cut < DEATH_BOUND, gone
        assert back["peer"] == overlay(lab, 2) and back["t"] - cut < DEATH_BOUND, back
        for name, ticker in sessions.tickers.items():
            error = ticker.wait_for("error", 10)
            assert error is not None and error["t"] - cut < DEATH_BOUND, (name, ticker.report())
            # A's own sockets are aborted; C's connections move to AP 2, whose far side
            # resets them
            assert error["err"] == ("ECONNABORTED" if name.startswith("A") else "ECONNRESET")
        assert new_connection_via(lab, 2)
        assert_inbound_answered(stream)
    what = "draining AP ap1 .* dead" if draining else "failover: AP ap1"
    wait_logged(lab, proc, what, 5)
    line = wait_logged(lab, proc, r"slot 1: \d+ connections of its dead AP re-pinned", 5)
    assert re.search(r"[1-9]\d* local sockets aborted", line), line
    assert stop_sdnsup(lab, proc) == 0
