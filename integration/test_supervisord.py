"""sdnsup under a real supervisord (started in the client namespace with scripts' config)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from integration.helpers import owned, wait_for
from sdnsup.lab import Lab
from sdnsup.lab.processes import LAB_HOST_ID

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = ROOT / "scripts" / "supervisord" / "sdnsup.conf"


def supervisord_conf(tmp: Path, command: str) -> Path:
    program = PROGRAM.read_text()
    # The shipped program section, with only the command and the log path made local.
    program, n = re.subn(r"(?m)^command=.*(?:\n[ \t]+\S.*)*", f"command={command}", program)
    assert n == 1
    program = re.sub(r"(?m)^stdout_logfile=.*", f"stdout_logfile={tmp}/sdnsup.log", program)
    conf = tmp / "supervisord.conf"
    conf.write_text(
        f"""[supervisord]
nodaemon=true
logfile={tmp}/supervisord.log
pidfile={tmp}/supervisord.pid
childlogdir={tmp}

[unix_http_server]
file={tmp}/supervisor.sock

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{tmp}/supervisor.sock

{program}"""
    )
    return conf


def test_kill9_restart_converges_and_stop_tears_down(make_lab, tmp_path):
    lab: Lab = make_lab(n_aps=2)
    lab.start_ap_agents({1: 0.005, 2: 0.030})
    url = lab.start_cc()
    lab.set_cc()
    command = (
        f"{sys.executable} -m sdnsup.cli -r 10.10.10.0/24,fd10:10:10::/64 --cc {url}"
        f" --log-dir {tmp_path}/logs --state-dir {tmp_path}/state --config none"
        f" --host-id {LAB_HOST_ID}"
    )
    conf = supervisord_conf(tmp_path, command)
    lab.popen(lab.ns_a, "supervisord", "-c", str(conf), label="a-supervisord")

    def ctl(*args: str) -> str:
        return lab.exec(lab.ns_a, "supervisorctl", "-c", str(conf), *args, check=False).stdout

    def converged() -> bool:
        state = owned(lab)
        counts = (len(state["rules"]), len(state["routes"]), len(state["nexthops"]))
        # per family: one rule; the CIDR route and the AP slot's default; two nexthops
        return counts == (2, 4, 4) and state["tables"] == ["sdnsup"]

    wait_for(lambda: "RUNNING" in ctl("status", "sdnsup"), 30, "supervisord to start sdnsup")
    wait_for(converged, 30, "sdnsup to apply its state")
    pid = int(ctl("pid", "sdnsup").strip())

    lab.exec(lab.ns_a, "kill", "-9", str(pid))

    def restarted() -> bool:
        new = ctl("pid", "sdnsup").strip()
        return new.isdigit() and int(new) not in (0, pid) and "RUNNING" in ctl("status")

    wait_for(restarted, 30, "supervisord to restart sdnsup")
    wait_for(converged, 30, "the restarted sdnsup to converge")
    # Exactly one of each, even after settling: no duplicates from the killed process.
    assert converged()

    out = ctl("stop", "sdnsup")
    assert "stopped" in out, out
    log = (tmp_path / "supervisord.log").read_text()
    assert re.search(r"stopped: sdnsup \(exit status 0\)", log), log
    assert owned(lab) == {"rules": [], "routes": [], "nexthops": [], "tables": []}
    sdnsup_log = (tmp_path / "sdnsup.log").read_text()
    assert "teardown: removed" in sdnsup_log
    ctl("shutdown")


def test_a_bad_configuration_goes_fatal_quickly_instead_of_looping(make_lab, tmp_path):
    """A typo under the shipped program section: a few quick retries, then FATAL with the
    error in the log (it used to stay in BACKOFF for about an hour)."""
    lab: Lab = make_lab(n_aps=1)
    command = f"{sys.executable} -m sdnsup.cli -r 10.10.10.300/24 --ap 10.77.0.11 --config none"
    conf = supervisord_conf(tmp_path, command)
    lab.popen(lab.ns_a, "supervisord", "-c", str(conf), label="a-supervisord")

    def ctl(*args: str) -> str:
        return lab.exec(lab.ns_a, "supervisorctl", "-c", str(conf), *args, check=False).stdout

    try:
        wait_for(lambda: "FATAL" in ctl("status", "sdnsup"), 30, "sdnsup to be FATAL")
        log = (tmp_path / "supervisord.log").read_text()
        assert log.count("spawned: 'sdnsup'") == 4, log  # the first start and 3 retries
        assert "'10.10.10.300/24' is not a CIDR" in (tmp_path / "sdnsup.log").read_text()
        assert owned(lab) == {"rules": [], "routes": [], "nexthops": [], "tables": []}
    finally:
        ctl("shutdown")
