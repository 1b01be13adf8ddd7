"""Fault matrix, process and CC half: faults of the CC and of the sdnsup process itself.

Every fault is injected while a :class:`~sdnsup.lab.traffic.ConnectionStream` opens new TCP
connections A -> B (steered) and B -> A (inbound, answered by the normal route); every test
ends with full service (``wait_healthy``, through the AP sdnsup should use) and a consistent
kernel, or, for a stop, a clean kernel and working unsteered connections. Each records the
stream's report with :func:`faultlib.record`; ``scripts/bench faults`` summarises them.

Faults: the CC down (at start, and while running), slow, and answering garbage; sdnsup
``kill -9`` under supervisord; SIGTERM in the middle of a 50k-CIDR apply; two instances
started at once; the disk holding the log folder full during a failover.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from integration import faultlib
from integration.helpers import owned, start_sdnsup, stop_sdnsup, wait_for
from integration.test_supervisord import supervisord_conf
from sdnsup.lab import Lab
from sdnsup.lab.measure import owns
from sdnsup.lab.processes import LAB_HOST_ID
from sdnsup.lab.services import python_module
from sdnsup.lab.traffic import ConnectionStream, StreamReport

pytestmark = pytest.mark.netns

CIDRS = ",".join(faultlib.CIDRS)
# The lab CC's port (Lab.start_cc's default): its URL is known before it runs, so sdnsup can
# be started against a CC that is down.
CC_PORT = 8000
# Generous limits: these tests check behaviour; scripts/bench measures the times.
RECOVERY_TIMEOUT = 30.0
CONVERGE_TIMEOUT = 60.0
# The CC's ttl is clamped to at least 10 s (sdnsup.discovery.MIN_TTL): the quickest way to
# make a running sdnsup ask the CC again, so a fault while running is met within ~12 s.
FAST_TTL = 10
# The CC answer's read timeout is 5 s (sdnsup.discovery.READ_TIMEOUT): a CC slower than that
# is an error that is retried; a slow one within it is waited for.
SLOWER_THAN_TIMEOUT = 8.0
SLOW_BUT_IN_TIME = 2.0
# Enough CIDRs that the first apply takes a second or more (README: 100k in about 2.5 s),
# so a SIGTERM sent as it starts lands in the middle of it. Not 100k: an apply in progress is
# not interrupted (it finishes in its worker thread) and teardown then re-reads every route,
# so the stop takes the rest of the apply plus a read-back; at 100k on a loaded 2-vCPU host
# that reached supervisord's 10 s (7.2 s apply + 2.7 s teardown measured).
BIG_CIDR_COUNT = 50_000
# supervisord's stopwaitsecs in the shipped program section (and supervisord's default).
STOPWAITSECS = 10.0
# A log disk small enough to fill in a moment. tmpfs limits pages, not inodes: once it is
# full, the log file can still be created, only not written (ENOSPC).
LOG_DISK_SIZE = "256k"
# Exit code of a second instance (sdnsup.errors.LockError, EX_TEMPFAIL).
EXIT_LOCKED = 75
LOCK_MESSAGE = "another sdnsup is already running in this network namespace"


# --- helpers ----------------------------------------------------------------------------------


def overlay(lab: Lab, i: int) -> str:
    """The address B sees for a connection steered through AP ``i``."""
    return str(lab.ap(i).overlay_addr)


def cc_url(lab: Lab) -> str:
    return f"http://{lab.router_addr}:{CC_PORT}"


def aps_lab(make_lab: Callable[..., Lab], n_aps: int = 2, **cc: Any) -> Lab:
    """A lab like faultlib's (APs behind A's second link, AP1 fastest) with the CC's answer
    set by ``cc`` (the CC is not started)."""
    lab = make_lab(n_aps=n_aps, ap_link="private")
    lab.start_ap_agents({i: faultlib.DELAYS[i] for i in range(1, n_aps + 1)})
    lab.set_cc(**cc)
    return lab


def alive(lab: Lab, proc: subprocess.Popen[bytes]) -> None:
    assert proc.poll() is None, f"sdnsup exited {proc.returncode}:\n{lab.logs(proc)}"


def wait_logged(
    lab: Lab, proc: subprocess.Popen[bytes], pattern: str, timeout: float, after: int = 0
) -> str:
    """Wait for an output line of sdnsup matching ``pattern``, among its lines from index
    ``after`` on; sdnsup must keep running meanwhile."""

    def found() -> str | None:
        alive(lab, proc)
        text = lab.logs(proc).splitlines()[after:]
        return next((ln for ln in text if re.search(pattern, ln)), None)

    return wait_for(found, timeout, f"sdnsup to log /{pattern}/")


def line_count(lab: Lab, proc: subprocess.Popen[bytes]) -> int:
    return len(lab.logs(proc).splitlines())


def status(lab: Lab) -> dict[str, Any]:
    """``sdnsup status --json`` of A's daemon ({} when none answers)."""
    out = lab.exec(lab.ns_a, sys.executable, "-m", "sdnsup.cli", "status", "--json", check=False)
    return json.loads(out.stdout) if out.stdout.strip() else {}


def note(**figures: float | int) -> str:
    return ", ".join(
        f"{k} {v:.2f} s" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()
    )


def assert_untouched(lab: Lab) -> None:
    """Nothing of sdnsup's in A's kernel before its first apply. (faultlib.assert_clean is
    for after a stop: it lists sdnsup's routing table, which the kernel creates with the
    first route, and `ip route show table 7300` fails while it does not exist.)"""
    assert owned(lab) == {"rules": [], "routes": [], "nexthops": [], "tables": []}


def no_failures(report: StreamReport) -> None:
    assert report.attempted > 0 and report.failed == 0, str(report)


# --- the CC -----------------------------------------------------------------------------------


def test_cc_down_at_start_retries_and_converges_once_back(make_lab):
    lab = aps_lab(make_lab)
    with ConnectionStream(lab) as stream:
        stream.mark("CC down at start")
        proc = lab.run_sdnsup(lab.ns_a, "-r", CIDRS, "--cc", cc_url(lab))
        wait_logged(lab, proc, r"CC attempt 2 failed: .*refused", CONVERGE_TIMEOUT)
        # No AP list, nothing applied: traffic takes the normal route meanwhile.
        assert_untouched(lab)
        stream.wait_healthy(RECOVERY_TIMEOUT, via=[str(lab.a_addr)])
        back = time.monotonic()
        assert lab.start_cc() == cc_url(lab)
        wait_logged(lab, proc, r"applied:", CONVERGE_TIMEOUT)
        converged = time.monotonic() - back
        stream.wait_healthy(RECOVERY_TIMEOUT, via=[overlay(lab, 1)])
        faultlib.assert_consistent(lab, 1)
    report = stream.report()
    faultlib.record("CC down at start", report, note(converged_after_cc_back=converged))
    no_failures(report)  # unsteered, then steered: no new connection failed
    assert stop_sdnsup(lab, proc) == 0
    faultlib.assert_clean(lab)


def test_cc_slow_at_start_times_out_then_a_slow_answer_in_time_is_used(make_lab):
    lab = aps_lab(make_lab, mode="slow", slow_seconds=SLOWER_THAN_TIMEOUT)
    url = lab.start_cc()
    with ConnectionStream(lab) as stream:
        stream.mark("CC slow at start")
        proc = lab.run_sdnsup(lab.ns_a, "-r", CIDRS, "--cc", url)
        wait_logged(lab, proc, r"CC attempt 1 failed: .*did not answer within", CONVERGE_TIMEOUT)
        assert_untouched(lab)
        lab.set_cc(mode="slow", slow_seconds=SLOW_BUT_IN_TIME)
        fixed = time.monotonic()
        wait_logged(lab, proc, r"applied:", CONVERGE_TIMEOUT)
        converged = time.monotonic() - fixed
        stream.wait_healthy(RECOVERY_TIMEOUT, via=[overlay(lab, 1)])
        faultlib.assert_consistent(lab, 1)
    report = stream.report()
    faultlib.record("CC slow at start", report, note(converged_after_cc_in_time=converged))
    no_failures(report)
    assert stop_sdnsup(lab, proc) == 0


def _garbage(lab: Lab) -> list[tuple[str, dict[str, Any], str]]:
    """Bad CC answers: (mode, set_cc arguments, what sdnsup logs about it)."""
    # A valid list but for one loopback entry: the whole answer must be refused, not half-used.
    poisoned = lab.cc_answer([2], ttl=FAST_TTL)
    poisoned["aps"].append({"id": "evil", "addr": "127.0.0.1", "addr6": "::1"})
    return [
        ("garbage", {}, "not JSON"),
        ("ok", {"answer": poisoned}, r"aps\[1\]\.addr: .*loopback"),
        ("ok", {"answer": {"aps": "ap1", "ttl": FAST_TTL}}, "aps: expected a list"),
        ("oversize", {}, "larger than"),
    ]


def test_cc_garbage_at_start_installs_nothing_and_converges_when_fixed(make_lab):
    lab = aps_lab(make_lab, mode="500")
    url = lab.start_cc()
    with ConnectionStream(lab) as stream:
        stream.mark("CC garbage at start")
        proc = lab.run_sdnsup(lab.ns_a, "-r", CIDRS, "--cc", url)
        seen = 0
        for mode, extra, reason in _garbage(lab):
            lab.set_cc(mode=mode, **extra)
            wait_logged(lab, proc, rf"CC attempt \d+ failed: .*{reason}", CONVERGE_TIMEOUT, seen)
            seen = line_count(lab, proc)
            assert_untouched(lab)  # nothing half-used, no AP taken from a bad list
        lab.set_cc()
        fixed = time.monotonic()
        wait_logged(lab, proc, r"applied:", CONVERGE_TIMEOUT)
        converged = time.monotonic() - fixed
        stream.wait_healthy(RECOVERY_TIMEOUT, via=[overlay(lab, 1)])
        faultlib.assert_consistent(lab, 1)
    report = stream.report()
    faultlib.record("CC garbage at start", report, note(converged_after_cc_fixed=converged))
    no_failures(report)
    assert "Traceback" not in lab.logs(proc)
    assert stop_sdnsup(lab, proc) == 0


# While running, the first bad answers only (not JSON, a poisoned list): each failed refresh
# doubles the retry backoff (up to 2**n s), so all four would take a minute; the start-up
# test covers every kind.
GARBAGE_WHILE_RUNNING = 2
# fault -> (inject, what each failed refresh logs, fix); "garbage" sets each bad answer in turn.
RUNNING: dict[str, tuple[Callable[[Lab], object], list[str], Callable[[Lab], object]]] = {
    "down": (lambda lab: lab.stop_cc(), ["refused"], lambda lab: lab.start_cc()),
    "slow": (
        lambda lab: lab.set_cc(mode="slow", slow_seconds=SLOWER_THAN_TIMEOUT, ttl=FAST_TTL),
        ["did not answer within"],
        lambda lab: lab.set_cc(ttl=FAST_TTL),
    ),
    "garbage": (lambda lab: None, [], lambda lab: lab.set_cc(ttl=FAST_TTL)),
}


@pytest.mark.parametrize("fault", list(RUNNING))
def test_cc_fault_while_running_keeps_the_active_ap(make_lab, fault):
    lab = aps_lab(make_lab, ttl=FAST_TTL)
    url = lab.start_cc()
    proc = start_sdnsup(lab, "-r", CIDRS, "--cc", url)
    inject, reasons, fix = RUNNING[fault]
    steps: list[tuple[Callable[[], object], str]] = [(lambda: None, r) for r in reasons]
    if fault == "garbage":
        steps = [
            (lambda m=mode, x=extra: lab.set_cc(mode=m, **{"ttl": FAST_TTL, **x}), reason)
            for mode, extra, reason in _garbage(lab)[:GARBAGE_WHILE_RUNNING]
        ]
    with ConnectionStream(lab) as stream:
        stream.mark(f"CC {fault} while running")
        seen = line_count(lab, proc)
        inject(lab)
        for step, reason in steps:
            step()
            pattern = rf"CC refresh failed \(keeping AP ap1\): .*{reason}"
            wait_logged(lab, proc, pattern, CONVERGE_TIMEOUT, seen)
            seen = line_count(lab, proc)
            assert status(lab)["cc"]["error"]
            faultlib.assert_consistent(lab, 1)  # the failed refresh changed nothing
        fix(lab)
        fixed = time.monotonic()
        wait_for(lambda: status(lab)["cc"]["error"] is None, CONVERGE_TIMEOUT, "a good refresh")
        refreshed = time.monotonic() - fixed
        # 0.0: no connection after the mark failed or took another path than AP1.
        recovery = stream.wait_healthy(RECOVERY_TIMEOUT, via=[overlay(lab, 1)])
        faultlib.assert_consistent(lab, 1)
    report = stream.report()
    faultlib.record(f"CC {fault} while running", report, note(refreshed_after_fix=refreshed))
    no_failures(report)
    assert recovery == 0.0, str(report)
    snap = status(lab)
    assert snap["connected"] and snap["active_ap"]["id"] == "ap1", snap
    assert "Traceback" not in lab.logs(proc)
    assert stop_sdnsup(lab, proc) == 0
    faultlib.assert_clean(lab)


# --- the process ------------------------------------------------------------------------------


def test_kill9_under_supervisord_restarts_with_one_of_each(make_lab, tmp_path):
    lab = aps_lab(make_lab)
    url = lab.start_cc()
    command = (
        f"{sys.executable} -m sdnsup.cli -r {CIDRS} --cc {url}"
        f" --log-dir {tmp_path}/logs --state-dir {tmp_path}/state --config none"
        f" --host-id {LAB_HOST_ID}"
    )
    conf = supervisord_conf(tmp_path, command)
    output = tmp_path / "sdnsup.log"  # sdnsup's stdout and stderr, as supervisord keeps them
    lab.popen(lab.ns_a, "supervisord", "-c", str(conf), label="a-supervisord")

    def ctl(*args: str) -> str:
        return lab.exec(lab.ns_a, "supervisorctl", "-c", str(conf), *args, check=False).stdout

    def pid() -> int | None:
        out = ctl("pid", "sdnsup").strip()
        return int(out) if out.isdigit() and int(out) > 0 else None

    def applies() -> int:
        return output.read_text(errors="replace").count("applied:") if output.exists() else 0

    try:
        wait_for(applies, CONVERGE_TIMEOUT, "sdnsup under supervisord to apply its state")
        killed = pid()
        assert killed is not None
        with ConnectionStream(lab) as stream:
            stream.mark("kill -9")
            lab.exec(lab.ns_a, "kill", "-9", str(killed))
            t0 = time.monotonic()
            wait_for(
                lambda: pid() not in (None, killed) and "RUNNING" in ctl("status", "sdnsup"),
                CONVERGE_TIMEOUT,
                "supervisord to restart sdnsup",
            )
            restarted = time.monotonic() - t0
            # The new process found the killed one's objects and applied on top of them.
            wait_for(lambda: applies() >= 2, CONVERGE_TIMEOUT, "the restarted sdnsup to apply")
            recovery = stream.wait_healthy(RECOVERY_TIMEOUT, via=[overlay(lab, 1)])
            faultlib.assert_consistent(lab, 1)  # exactly one rule, nexthop, table, route each
        report = stream.report()
        faultlib.record(
            "sdnsup kill -9 under supervisord",
            report,
            note(restarted_after=restarted, recovery=recovery),
        )
        out = ctl("stop", "sdnsup")
        assert "stopped" in out, out
        log = (tmp_path / "supervisord.log").read_text()
        assert re.search(r"stopped: sdnsup \(exit status 0\)", log), log
        faultlib.assert_clean(lab)
    finally:
        ctl("shutdown")


def big_cidr_file(lab: Lab, path: Path, n: int) -> Path:
    """``n`` CIDRs: B's networks (IPv4 and IPv6) and /28s in 11.0.0.0/8, away from the lab's."""
    base = int(ipaddress.IPv4Address("11.0.0.0"))
    nets = [str(lab.overlay_net), str(lab.overlay_net6)]
    # every other /28: adjacent ones would be merged into fewer, wider prefixes
    nets += [f"{ipaddress.IPv4Address(base + i * 32)}/28" for i in range(n - len(nets))]
    path.write_text("".join(f"{net}\n" for net in nets))
    return path


def test_sigterm_during_a_large_apply_exits_0_and_leaves_nothing(make_lab, tmp_path):
    lab = aps_lab(make_lab, n_aps=1)
    cidrs = big_cidr_file(lab, tmp_path / "cidrs.txt", BIG_CIDR_COUNT)
    ap = lab.ap(1)
    with ConnectionStream(lab) as stream:
        proc = lab.run_sdnsup(lab.ns_a, "-r", f"@{cidrs}", "--ap", f"{ap.addr}+{ap.addr6}")
        # Once the AP is chosen the applier reads the kernel, then writes its nexthops first,
        # then 50k routes (~0.4 s) and the set elements. A SIGTERM right after "AP chosen"
        # can come before the first write (the fault would then not be injected): wait for
        # the nexthops.
        wait_logged(lab, proc, r"AP chosen: ", CONVERGE_TIMEOUT)

        def writing() -> bool:
            found = lab.exec(lab.ns_a, "ip", "-j", "nexthop", "show", check=False).stdout
            return any(owns(nh) for nh in json.loads(found or "[]"))

        wait_for(writing, CONVERGE_TIMEOUT, "sdnsup's first nexthop written", step=0.002)
        stream.mark("SIGTERM during apply")
        t0 = time.monotonic()
        code = stop_sdnsup(lab, proc)  # SIGTERM, then at most supervisord's 10 s
        stopped = time.monotonic() - t0
        faultlib.assert_clean(lab)
        recovery = stream.wait_healthy(RECOVERY_TIMEOUT, via=[str(lab.a_addr)])
    report = stream.report()
    faultlib.record(
        "SIGTERM during an apply",
        report,
        note(cidrs=BIG_CIDR_COUNT, exited_after=stopped, recovery=recovery),
    )
    logs = lab.logs(proc)
    assert code == 0, logs
    assert stopped < STOPWAITSECS
    # The signal was handled while the apply still ran: its line comes before the apply's
    # result (if the apply got to log one at all).
    handled = logs.index("received SIGTERM")
    assert "applied:" not in logs[:handled], "SIGTERM came after the apply: no fault injected"
    assert re.search(r"teardown: removed .*\d+ nexthop", logs), logs


def test_two_instances_at_once_exactly_one_runs(make_lab):
    lab = aps_lab(make_lab)
    url = lab.start_cc()
    args = ("-r", CIDRS, "--cc", url)
    with ConnectionStream(lab) as stream:
        stream.mark("two instances started at once")
        procs = [lab.run_sdnsup(lab.ns_a, *args) for _ in range(2)]
        wait_for(lambda: any(p.poll() is not None for p in procs), CONVERGE_TIMEOUT, "an exit")
        losers = [p for p in procs if p.poll() is not None]
        winners = [p for p in procs if p.poll() is None]
        assert len(losers) == len(winners) == 1, lab.all_logs()
        wait_logged(lab, winners[0], r"applied:", CONVERGE_TIMEOUT)
        # A third, started against the running daemon, is refused the same way.
        losers.append(lab.run_sdnsup(lab.ns_a, *args))
        assert losers[-1].wait(CONVERGE_TIMEOUT) == EXIT_LOCKED, lab.logs(losers[-1])
        stream.wait_healthy(RECOVERY_TIMEOUT, via=[overlay(lab, 1)])
        faultlib.assert_consistent(lab, 1)  # one copy of the state
    report = stream.report()
    faultlib.record("two instances started at once", report)
    for loser in losers:
        output = lab.logs(loser)
        assert loser.returncode == EXIT_LOCKED, output
        assert f"sdnsup: error: {LOCK_MESSAGE}" in output
        assert "applied:" not in output and "teardown" not in output  # it touched nothing
    alive(lab, winners[0])
    no_failures(report)
    assert stop_sdnsup(lab, winners[0]) == 0
    faultlib.assert_clean(lab)


# sdnsup in the mount namespace `ip netns exec` made for it, on a tmpfs mounted there, so no
# other process sees the tmpfs and it goes away with sdnsup. `ip netns exec` leaves mounts
# slaves of the host's; rprivate also keeps host mounts out while the test runs. The disk is
# filled before sdnsup starts: filled later, the log file's last page would still take a
# few KiB of records (tmpfs allocates whole pages), so when writes fail would be left to luck.
ON_FULL_TMPFS = """
set -e
mount --make-rprivate /
mount -t tmpfs -o size={size},mode=0755 sdnsup-test-logdisk "$1"
mkdir -m 0700 "$1/logs"
dd if=/dev/zero of="$1/filler" bs=4k 2>/dev/null || true
shift
exec "$@"
"""


def test_full_log_disk_does_not_stop_routing_or_failover(make_lab, tmp_path):
    lab = aps_lab(make_lab)
    url = lab.start_cc()
    disk = tmp_path / "logdisk"
    disk.mkdir()
    log_file = disk / "logs" / f"sdnsup-{lab.ns_a}.log"  # one file per network namespace
    options = ("--log-dir", str(log_file.parent), "--config", "none", "--state-dir", "none")
    options += ("--host-id", LAB_HOST_ID)
    argv = python_module("sdnsup.cli", "-r", CIDRS, "--cc", url, *options)
    script = ON_FULL_TMPFS.format(size=LOG_DISK_SIZE)
    proc = lab.popen(lab.ns_a, "sh", "-c", script, "sh", str(disk), *argv, label="a-sdnsup")

    def on_disk(*cmd: str) -> str:
        """Run ``cmd`` in sdnsup's mount namespace, where the tmpfs is; its stdout."""
        done = subprocess.run(
            ["nsenter", "--target", str(proc.pid), "--mount", "--", *cmd],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done
        return done.stdout

    wait_logged(lab, proc, r"applied:", CONVERGE_TIMEOUT)
    assert f"cannot write log file {log_file}: No space left on device" in lab.logs(proc)
    assert on_disk("df", "--output=avail", str(disk)).split()[-1] == "0"
    assert not log_file.parent.exists()  # the tmpfs is invisible out here
    with ConnectionStream(lab) as stream:
        stream.mark("active AP dead, log disk full")
        lab.ap_link_down(1)
        wait_logged(lab, proc, r"failover: AP ap1 .*now via ap2", RECOVERY_TIMEOUT)
        recovery = stream.wait_healthy(RECOVERY_TIMEOUT, via=[overlay(lab, 2)])
        faultlib.assert_consistent(lab, 2)
    report = stream.report()
    faultlib.record("log disk full + AP failover", report, note(recovery=recovery))
    # Nothing reached the file (reported once on stderr, not once per record).
    assert on_disk("stat", "--format=%s", str(log_file)).strip() == "0"
    assert lab.logs(proc).count("cannot write log file") == 1
    # Space freed: the file log resumes with the next record (a heal, here).
    on_disk("rm", f"{disk}/filler")
    lab.exec(lab.ns_a, "ip", "rule", "del", "pref", str(faultlib.SETTINGS.priority))
    wait_for(
        lambda: "healed after" in on_disk("cat", str(log_file)),
        RECOVERY_TIMEOUT,
        "the file log to resume",
    )
    assert stop_sdnsup(lab, proc) == 0
    faultlib.assert_clean(lab)
