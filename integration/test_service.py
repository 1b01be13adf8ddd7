"""Service integration with the real daemon: systemd notify messages and Prometheus metrics."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from integration.helpers import owned, start_sdnsup, stop_sdnsup, wait_for
from sdnsup.lab import Lab

pytestmark = pytest.mark.netns


def notify_socket(tmp_path: Path) -> tuple[Path, socket.socket]:
    """Where systemd would listen for sd_notify messages: a datagram socket, 0.2 s reads."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    return path, sock


def test_systemd_notify_ready_watchdog_stopping_in_order(make_lab, tmp_path):
    lab: Lab = make_lab(n_aps=1)
    lab.start_ap_agents({1: 0.005})
    url = lab.start_cc()
    lab.set_cc()
    path, sock = notify_socket(tmp_path)
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
    path, sock = notify_socket(tmp_path)
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


UNIT = Path(__file__).resolve().parents[1] / "scripts" / "systemd" / "sdnsup.service"


def unit_setting(key: str) -> str:
    """The value of ``key=`` in the shipped unit (the last one, as systemd reads it)."""
    values = [
        line.split("=", 1)[1].strip()
        for line in UNIT.read_text().splitlines()
        if line.startswith(f"{key}=")
    ]
    assert values, f"{key}= is not in {UNIT}"
    return values[-1]


def test_the_systemd_unit_is_one_systemd_accepts(tmp_path):
    """systemd's own checker reads the shipped unit: every directive known to this systemd,
    every value valid (the only edit: ExecStart names the sdnsup of this checkout)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing (Debian package systemd)")
    exe = Path(sys.executable).with_name("sdnsup")
    unit = tmp_path / "sdnsup.service"
    unit.write_text(
        UNIT.read_text().replace("ExecStart=/usr/local/bin/sdnsup", f"ExecStart={exe}", 1)
    )
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert (out.returncode, out.stderr, out.stdout) == (0, "", ""), out


def test_the_daemon_needs_no_capability_beyond_the_units(make_lab):
    """Under the unit's CapabilityBoundingSet and NoNewPrivileges, sdnsup asks the CC, probes,
    steers traffic through the AP, and removes everything at stop, as with full root."""
    caps = unit_setting("CapabilityBoundingSet").split()
    assert unit_setting("NoNewPrivileges") == "yes"
    keep = ",".join(f"+{c.removeprefix('CAP_').lower()}" for c in caps)
    lab: Lab = make_lab(n_aps=1)
    lab.start_ap_agents({1: 0.005})
    url = lab.start_cc()
    lab.set_cc()
    lab.serve_whoami(lab.ns_b)
    wrapper = ("setpriv", f"--bounding-set=-all,{keep}", "--inh-caps=-all", "--no-new-privs")
    proc = start_sdnsup(lab, "-r", "10.10.10.0/24", "--cc", url, wrapper=wrapper)
    status = f"/proc/{proc.pid}/status"
    bounding = next(x for x in Path(status).read_text().splitlines() if x.startswith("CapBnd:"))
    assert int(bounding.split()[1], 16) == (1 << 12) | (1 << 13), bounding  # NET_ADMIN, NET_RAW
    assert lab.whoami(lab.ns_a, lab.b_addr) == str(lab.ap(1).overlay_addr)
    assert stop_sdnsup(lab, proc) == 0
    assert "Traceback" not in lab.logs(proc)
    assert owned(lab) == {"rules": [], "routes": [], "nexthops": [], "tables": []}
