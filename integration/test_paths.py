"""Gray failures: an AP whose overlay side died keeps answering its probes; real sdnsup,
real packets. sdnsup must find it from the traffic (no configuration), or from tracked
targets, and never fail over for a destination that is down."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from integration.helpers import start_sdnsup, stop_sdnsup, wait_for
from sdnsup.lab import Lab
from sdnsup.lab.traffic import A_TO_B, B_TO_A, ConnectionStream

pytestmark = pytest.mark.netns

CIDRS = "10.10.10.0/24,fd10:10:10::/64"
# Three hosts in the CIDRs: B's address and two more on B.
HOSTS = ("10.10.10.1", "10.10.10.2", "10.10.10.3")
# Generous: tests check behaviour, scripts/bench gray measures the detection times.
PASSIVE_BOUND = 8.0  # target < 3 s
TRACK_BOUND = 5.0  # target < 1.5 s


def gray_lab(make_lab, n_aps: int = 2) -> tuple[Lab, str]:
    lab = make_lab(n_aps=n_aps)
    # AP 1 clearly the fastest (> 10 ms and > 33%): chosen again once usable
    lab.start_ap_agents({i: 0.005 if i == 1 else 0.040 for i in range(1, n_aps + 1)})
    url = lab.start_cc()
    lab.set_cc()
    for host in HOSTS[1:]:
        lab.exec(lab.ns_b, "ip", "addr", "add", f"{host}/24", "dev", "eth0")
    lab.serve_whoami(lab.ns_b)
    return lab, url


def overlay(lab: Lab, i: int) -> str:
    return str(lab.ap(i).overlay_addr)


def logged(lab: Lab, proc: subprocess.Popen[bytes], pattern: str) -> list[str]:
    return [line for line in lab.logs(proc).splitlines() if re.search(pattern, line)]


def stream(lab: Lab) -> ConnectionStream:
    """New connections A -> the three hosts in turn (and B -> A), every 100 ms."""
    return ConnectionStream(lab, interval=0.1, b_hosts=HOSTS, max_seconds=180)


def test_traffic_to_three_hosts_finds_an_ap_whose_overlay_died(make_lab):
    lab, url = gray_lab(make_lab)
    proc = start_sdnsup(lab, "-r", CIDRS, "--cc", url)
    with stream(lab) as s:
        s.mark("AP 1's overlay side dies")
        lab.ap_overlay_down(1)
        recovery = s.wait_healthy(PASSIVE_BOUND * 2, via=[overlay(lab, 2)])
        s.stay_healthy(1.0)
        assert s.report().by_direction[B_TO_A][1] == 0  # inbound never failed
    assert recovery < PASSIVE_BOUND, f"{recovery:.2f} s"
    suspect = logged(lab, proc, r"AP ap1 .* suspect: \d+ unanswered connection attempts")
    assert suspect, lab.logs(proc)
    line = logged(lab, proc, "failover: AP ap1 .* forwards nothing")[0]
    assert "through it 0/" in line and "through the other AP 3/3 answered" in line
    assert stop_sdnsup(lab, proc) == 0


def test_a_tracked_target_finds_it_without_any_traffic(make_lab):
    lab, url = gray_lab(make_lab)
    proc = start_sdnsup(lab, "-r", CIDRS, "--cc", url, "--track", f"tcp:8080@{HOSTS[0]}")
    time.sleep(1)
    cut = time.monotonic()
    lab.ap_overlay_down(1)
    wait_for(lambda: logged(lab, proc, "failover: AP ap1 .* forwards nothing"), 10, "failover")
    took = time.monotonic() - cut
    assert took < TRACK_BOUND, f"{took:.2f} s"
    line = logged(lab, proc, "failover: AP ap1")[0]
    assert "tracked targets answer only another way, 2 rounds in a row" in line
    assert lab.whoami(lab.ns_a, HOSTS[0]) == overlay(lab, 2)
    assert stop_sdnsup(lab, proc) == 0


def test_one_host_that_stops_answering_never_causes_a_failover(make_lab):
    lab, url = gray_lab(make_lab)
    proc = start_sdnsup(lab, "-r", CIDRS, "--cc", url)
    # 10.10.10.3 goes away: its connection attempts fail, the other two hosts answer
    lab.exec(lab.ns_b, "ip", "addr", "del", f"{HOSTS[2]}/24", "dev", "eth0")
    with stream(lab) as s:
        time.sleep(60)  # a minute of traffic
        report = s.report()
    tried, failed = report.by_direction[A_TO_B]
    assert tried > 400 and failed >= tried // 4  # a third of the attempts failed all along
    assert report.seen_by_b.keys() == {overlay(lab, 1)}
    assert not logged(lab, proc, "failover|suspect"), lab.logs(proc)
    assert stop_sdnsup(lab, proc) == 0


def test_the_ap_is_reused_only_after_the_hold_down_once_its_overlay_is_back(make_lab):
    lab, url = gray_lab(make_lab)
    proc = start_sdnsup(
        lab, "-r", CIDRS, "--cc", url, "--track", f"tcp:8080@{HOSTS[0]}", "--reprobe-interval", "1"
    )
    lab.ap_overlay_down(1)
    wait_for(lambda: logged(lab, proc, "failover: AP ap1 .* forwards nothing"), 10, "failover")
    lab.ap_overlay_up(1)
    back = time.monotonic()
    wait_for(lambda: lab.whoami(lab.ns_a, HOSTS[0]) == overlay(lab, 1), 40, "AP 1 again")
    # the 10 s hold-down, then 3 good probes: not at once
    assert time.monotonic() - back > 8.0
    assert logged(lab, proc, "switched to faster AP ap1")
    assert stop_sdnsup(lab, proc) == 0


def test_every_overlay_dead_takes_the_no_ap_path_then_recovers(make_lab):
    lab, url = gray_lab(make_lab)
    proc = start_sdnsup(lab, "-r", CIDRS, "--cc", url, "--reprobe-interval", "1")
    direct = str(lab.a_addr)  # the normal route: B sees A itself
    with stream(lab) as s:
        s.mark("every AP's overlay side dies")
        lab.ap_overlay_down(1)
        lab.ap_overlay_down(2)
        s.wait_healthy(30, via=[direct])  # the no-AP policy (fallback): the normal route
        assert logged(lab, proc, "no other live AP, traffic takes the no-AP path")
        s.mark("overlays back")
        lab.ap_overlay_up(1)
        lab.ap_overlay_up(2)
        s.wait_healthy(40, via=[overlay(lab, 1), overlay(lab, 2)])
        assert s.report().by_direction[B_TO_A][1] == 0
    assert stop_sdnsup(lab, proc) == 0
