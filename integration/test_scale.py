"""The real daemon with 100k CIDRs: a stop in every phase, a restart after ``kill -9`` and a
reload. The figures (how fast) are ``scripts/bench converge --cidrs 100000``; these tests
check what must hold whatever the speed, with limits a loaded CI machine meets."""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from integration.helpers import owned, start_sdnsup, wait_for
from sdnsup.lab import Lab

pytestmark = pytest.mark.netns

N = 100_000
NOTHING = {"rules": [], "routes": [], "nexthops": [], "tables": []}
# The bound for a stop is a second plus the teardown itself; CI machines get slack.
STOP_BOUND = 1.0
SLACK = 1.0
NEW_CIDR = "12.0.0.0/28"  # outside every CIDR of cidr_file()


def ap_arg(lab: Lab) -> str:
    ap = lab.ap(1)
    return f"{ap.addr}+{ap.addr6}"


def cidr_file(lab: Lab, n: int = N) -> Path:
    """``n`` /28s in 11.0.0.0/8, none adjacent (so none merges with another)."""
    assert lab.tmpdir is not None
    path = lab.tmpdir / f"cidrs-{n}.txt"
    base = int(ipaddress.IPv4Address("11.0.0.0"))
    path.write_text("".join(f"{ipaddress.IPv4Network((base + i * 32, 28))}\n" for i in range(n)))
    return path


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def teardown_seconds(log: str) -> float:
    """The teardown's own time, from its log line (``teardown: ... in 141.5 ms``); 0 if the
    process stopped before it owned anything."""
    m = re.search(r"teardown: .* in ([0-9.]+) ms", log)
    return float(m.group(1)) / 1000 if m else 0.0


def table_routes(lab: Lab, *selector: str) -> list[str]:
    out = lab.exec(lab.ns_a, "ip", "-4", "route", "show", "table", "7300", *selector).stdout
    return out.splitlines()


@pytest.mark.parametrize(
    "when",
    [
        "while parsing",
        "once the CIDRs are read",
        "during the first apply",
        "right after the first apply",
        "idle",
    ],
)
def test_a_stop_in_any_phase_exits_0_within_a_second_and_leaves_nothing(make_lab, when):
    """SIGTERM at any moment of a start with 100k CIDRs: exit 0 within a second plus the
    teardown, and nothing of sdnsup left in the kernel. An apply under way stops at its next
    batch and its teardown removes what it had written."""
    lab = make_lab(n_aps=1)
    # Parsing 100k CIDRs takes about 0.3 s; three times as many leave a safe window for a
    # signal to land in the middle of it.
    path = cidr_file(lab, 3 * N if when == "while parsing" else N)
    proc = lab.run_sdnsup(lab.ns_a, "-r", f"@{path}", "--ap", ap_arg(lab), "--probe", "icmp")

    def logged(text: str) -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"sdnsup exited {proc.returncode}:\n{lab.logs(proc)}")
        return text in lab.logs(proc)

    if when == "while parsing":
        # The CIDRs are parsed before logging starts: wait for CPU time past the imports.
        wait_for(lambda: cpu_seconds(proc.pid) >= 0.4, 20, "sdnsup to be parsing", step=0.01)
        assert "CIDRs: " not in lab.logs(proc)  # still parsing
    elif when == "once the CIDRs are read":
        wait_for(lambda: logged("CIDRs: "), 20, "the CIDRs line", step=0.005)
    elif when == "during the first apply":
        wait_for(lambda: logged("AP chosen: "), 20, "the AP choice", step=0.005)
        assert "applied:" not in lab.logs(proc)  # the first apply (about 1 s) is under way
    else:
        wait_for(lambda: logged("applied:"), 30, "the first apply", step=0.005)
        if when == "idle":
            time.sleep(1.0)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0, lab.logs(proc)
    took = time.monotonic() - sent
    log = lab.logs(proc)
    assert took < STOP_BOUND + teardown_seconds(log) + SLACK, log[-3000:]
    assert "Traceback" not in log
    assert owned(lab) == NOTHING
    if when == "during the first apply":
        assert "applied:" not in log  # the apply was abandoned, not finished first


def test_a_restart_adopts_everything_with_no_write_and_a_reload_writes_only_the_difference(
    make_lab,
):
    lab = make_lab(n_aps=1)
    path = cidr_file(lab)
    args = ("-r", f"@{path}", "--ap", ap_arg(lab), "--probe", "icmp", "--log-level", "debug")
    proc = start_sdnsup(lab, *args)
    try:
        assert len(table_routes(lab)) == N

        # SIGHUP with the file's last CIDR replaced: one route and one element in, one of
        # each out, nothing else written.
        lines = path.read_text().splitlines()
        old = lines[-1]
        path.write_text("\n".join([*lines[:-1], NEW_CIDR]) + "\n")
        seen = len(lab.logs(proc))
        proc.send_signal(signal.SIGHUP)

        def reload_applied() -> str | None:
            m = re.search(r"DEBUG applied: .*\[([^\]]*)\]", lab.logs(proc)[seen:])
            return m.group(1) if m else None

        writes = wait_for(reload_applied, 20, "the reload to be applied")
        assert re.fullmatch(r"2 nft element, 2 route in [0-9.]+ ms", writes), writes
        assert "reloaded: IPv4 CIDRs 100000 -> 100000 (+1 -1)" in lab.logs(proc)
        assert table_routes(lab, NEW_CIDR) and not table_routes(lab, old)
        assert len(table_routes(lab)) == N

        # kill -9, then the same command: everything found is adopted, nothing written.
        proc.kill()
        proc.wait(10)
        assert len(table_routes(lab)) == N  # the kernel keeps steering meanwhile
        proc = start_sdnsup(lab, *args)
        log = lab.logs(proc)
        assert "adopted what an earlier sdnsup left in the kernel (killed or crashed)" in log
        first = re.search(r"INFO applied: .*", log)
        assert first is not None and "[no changes in " in first.group(0), first
        assert table_routes(lab, NEW_CIDR) and len(table_routes(lab)) == N
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
    assert proc.returncode == 0, lab.logs(proc)
    assert owned(lab) == NOTHING
