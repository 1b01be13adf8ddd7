"""Service integration with the real daemon: systemd notify messages and Prometheus metrics."""

from __future__ import annotations

import socket
import sys
import time

import pytest

from integration.helpers import start_sdnsup, stop_sdnsup, wait_for
from sdnsup.lab import Lab

pytestmark = pytest.mark.netns


def test_systemd_notify_ready_watchdog_stopping_in_order(make_lab, tmp_path):
    lab: Lab = make_lab(n_aps=1)
    lab.start_ap_agents({1: 0.005})
    url = lab.start_cc()
    lab.set_cc()
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    proc = lab.run_sdnsup(
        lab.ns_a,
        "-r", "10.10.10.0/24", "--cc", url,
        env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"},
    )  # fmt: skip
    messages: list[str] = []

    def receive_until(pred, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not pred():
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                pass

    receive_until(lambda: any("READY=1" in m for m in messages), 20)
    ready = next(i for i, m in enumerate(messages) if "READY=1" in m)
    assert "waiting for the AP list" in messages[ready]  # READY once it serves status
    # then a STATUS line once the routes are applied
    receive_until(lambda: any("AP 172.31.1.11" in m for m in messages[ready:]), 20)
    assert any("STATUS=" in m and "AP 172.31.1.11" in m for m in messages[ready:])
    receive_until(lambda: sum("WATCHDOG=1" in m for m in messages) >= 3, 5)
    assert sum("WATCHDOG=1" in m for m in messages) >= 3
    assert stop_sdnsup(lab, proc) == 0
    receive_until(lambda: any("STOPPING=1" in m for m in messages), 5)
    stopping = next(i for i, m in enumerate(messages) if "STOPPING=1" in m)
    assert ready < stopping
    sock.close()


def test_metrics_are_served_when_asked(make_lab):
    lab: Lab = make_lab(n_aps=2)
    lab.start_ap_agents({1: 0.005, 2: 0.030})
    url = lab.start_cc()
    lab.set_cc()
    proc = start_sdnsup(lab, "-r", "10.10.10.0/24", "--cc", url, "--metrics", "127.0.0.1:9730")
    fetch = (
        "import urllib.request;"
        "print(urllib.request.urlopen('http://127.0.0.1:9730/metrics', timeout=3).read().decode())"
    )

    def scraped() -> str:
        out = lab.exec(lab.ns_a, sys.executable, "-c", fetch, check=False)
        return out.stdout if "sdnsup_ap_rtt_seconds" in out.stdout else ""

    text = wait_for(scraped, 15, "metrics with AP RTTs")
    assert 'sdnsup_state{state="connected"} 1' in text
    assert 'sdnsup_active_ap_info{ap="ap1"} 1' in text
    assert "sdnsup_failovers_total 0" in text
    assert stop_sdnsup(lab, proc) == 0


def test_systemd_ready_does_not_wait_for_a_cc_that_is_down(make_lab, tmp_path):
    """Boot is not held up by the CC: READY comes once sdnsup serves status, which says
    what it waits for; the routes follow when the CC answers."""
    lab: Lab = make_lab(n_aps=1)
    lab.start_ap_agents({1: 0.005})
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    # No CC started: its address refuses every connection.
    proc = lab.run_sdnsup(
        lab.ns_a,
        "-r", "10.10.10.0/24", "--cc", "http://172.31.1.1:8000", "--state-dir", "none",
        env={"NOTIFY_SOCKET": str(path)},
    )  # fmt: skip
    messages: list[str] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any("READY=1" in m for m in messages):
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
    assert any("READY=1" in m for m in messages), messages
    wait_for(lambda: "CC attempt 1 failed" in lab.logs(proc), 10, "a failed CC attempt")
    assert "applied:" not in lab.logs(proc)  # the CC is still down: ready all the same
    assert stop_sdnsup(lab, proc) == 0
    sock.close()
