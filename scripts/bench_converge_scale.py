"""``scripts/bench converge --cidrs N[,N...]``: the real daemon's own path at N CIDRs, phase by
phase, beside the applier alone measured in the same lab and run.

Each run builds a fresh lab (:class:`sdnsup.lab.Lab`, as ``bench converge``: the CC in R
listing three APs whose agents answer after 5, 40 and 80 ms), writes a CIDR file of N entries
(B's two subnets and N-2 /28s in 11.0.0.0/8, none adjacent) and, in A, before the daemon:

- *parse alone*: :func:`sdnsup.cidrs.parse_cidrs` on that file;
- *applier alone*: the same :class:`~sdnsup.applier.Applier` the daemon uses, from scratch,
  applying :func:`sdnsup.daemon.desired_for` through AP1 (what the daemon's first apply
  writes), then its teardown;

then launches ``sdnsup -r @FILE --cc URL`` with traffic flowing (a new UDP flow to B every
5 ms) and stamps, from outside the process where possible (``time.time()`` of one machine):

- launch -> CIDRs parsed: the log's "CIDRs:" line;
- -> AP chosen: the log's "AP chosen:" line;
- -> kernel state written: the log's "applied:" line (logged when the apply returns);
- -> first packet at B through AP1 (B's clock);
- applied -> idle: the first 100 ms without CPU time (``/proc/PID/stat``, sampled every
  10 ms) after "applied:";
- idle RSS and peak RSS (``VmRSS``/``VmHWM``), then SIGTERM -> exit.

The ratio row divides "launch -> kernel state written" by (applier alone + parse alone):
issue 14's target is at most 1.3.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import benchlib
from bench_failover import (
    CIDRS,
    STAT_HEAD,
    BenchError,
    alive,
    echo_client,
    echo_server,
    json_lines,
    lab_with_cc,
    log_records,
    maybe_stat,
    monitor_events,
    overlay,
    python,
    repeat,
    start_monitor,
    stat_row,
    wait_for,
)

from sdnsup.lab import Lab

RUN_BUDGET = 90.0  # the helper processes of a run end on their own after this
CONVERGE_TIMEOUT = 60.0
IDLE_QUIET = 0.1  # idle: no CPU time for this long
IDLE_TIMEOUT = 20.0

# In A: parse the file, apply what the daemon's first apply would, tear down; JSON figures.
ALONE = """
import ipaddress, json, sys, time
from sdnsup.applier import Applier
from sdnsup.aps import parse_static_aps
from sdnsup.cidrs import parse_cidrs
from sdnsup.desired import RunConfig, desired_for
from sdnsup.nft import LibNftables
from sdnsup.rtnl import RtnlRoutes
from sdnsup.sysctl import ProcSysctl
path, aps = sys.argv[1], parse_static_aps(sys.argv[2])
t0 = time.perf_counter()
cidrs = parse_cidrs(["@" + path])
parse = time.perf_counter() - t0
config = RunConfig(cidrs=cidrs, aps=aps)
applier = Applier(RtnlRoutes.from_system(), LibNftables(), ProcSysctl())
t0 = time.perf_counter()
applier.apply(desired_for(config, aps[0]))
apply = time.perf_counter() - t0
applier.teardown()
print(json.dumps({"parse": parse, "apply": apply}))
"""


@dataclass
class ScaleRun:
    n: int
    parse_alone: float
    apply_alone: float
    phases: dict[str, float]
    idle_rss: int  # kB
    peak_rss: int  # kB
    stop: float
    reload: dict[str, float]
    restart: dict[str, float]


PHASES = (
    ("parsed", "launch -> CIDRs parsed (log)"),
    ("chosen", "CIDRs parsed -> AP chosen (log)"),
    ("written", "AP chosen -> kernel state written (log 'applied:')"),
    ("packet", "kernel state written -> first packet at B via AP1"),
    ("idle", "applied -> daemon idle (no CPU for 100 ms)"),
)


def cidr_file(lab: Lab, n: int) -> str:
    """B's subnet (so that traffic to B is steered) and n-2 /28s elsewhere, each with a gap
    after it: adjacent ones would be merged by the daemon's CIDR union into a few prefixes."""
    assert lab.tmpdir is not None
    path = lab.tmpdir / f"cidrs-{n}.txt"
    base = int(ipaddress.IPv4Address("11.0.0.0"))
    lines = [
        *CIDRS.split(","),
        *(str(ipaddress.IPv4Network((base + i * 32, 28))) for i in range(n - 2)),
    ]
    path.write_text("\n".join(lines[:n]) + "\n")
    return str(path)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in kB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def idle_since(pid: int, timeout: float) -> float:
    """When the process began its first IDLE_QUIET without CPU time (epoch seconds)."""
    deadline = time.time() + timeout
    last, since = cpu_seconds(pid), time.time()
    while time.time() - since < IDLE_QUIET:
        if time.time() > deadline:
            raise BenchError(f"the daemon was not idle within {timeout:.0f} s")
        time.sleep(0.01)
        now = cpu_seconds(pid)
        if now != last:
            last, since = now, time.time()
    return since


RELOADED_CIDR = "12.0.0.0/28"  # outside every CIDR of the file


def reload_run(lab: Lab, proc: Any, path: str) -> dict[str, float]:
    """The file's last CIDR replaced by RELOADED_CIDR, then SIGHUP: the time from the signal
    to the kernel's events for the new route and for the old one's removal (the last write
    of the reload: routes are added, set elements changed, then routes deleted)."""
    with open(path) as f:
        lines = f.read().splitlines()
    old = lines[-1]
    with open(path, "w") as f:
        f.write("\n".join([*lines[:-1], RELOADED_CIDR]) + "\n")
    monitor = start_monitor(lab, "route")
    try:
        signalled = time.time()
        proc.send_signal(signal.SIGHUP)

        def events() -> dict[str, float] | None:
            alive(lab, proc)
            found: dict[str, float] = {}
            for stamp, event in monitor_events(lab.logs(monitor)):
                if event.startswith(RELOADED_CIDR + " ") and "table 7300" in event:
                    found.setdefault("added", stamp)
                if event.startswith(f"Deleted {old} ") and "table 7300" in event:
                    found.setdefault("removed", stamp)
            return found if len(found) == 2 else None

        found = wait_for("the reload's two route events", CONVERGE_TIMEOUT, events)
    finally:
        lab.stop(monitor, grace=1.0)
    return {
        "route_added": found["added"] - signalled,
        "done": max(found.values()) - signalled,
    }


# The restart's flows go to another port than the first client's: a flow opened before the
# first daemon steered anything has an unmarked conntrack entry for 30 s, and a new socket
# that happens to get the same source port would take the normal route with it.
RESTART_PORT = 9001


def restart_run(lab: Lab, url: str, path: str, proc: Any) -> tuple[Any, dict[str, float]]:
    """``kill -9``, then the same command again: launch -> "applied:" (which must say that
    nothing was written) -> idle; and the new UDP flows (one every 5 ms) sent from the kill to
    idle that got no answer, or got it through another AP than AP1."""
    via = overlay(lab, 1)
    echo_server(lab, RUN_BUDGET, RESTART_PORT)
    client = echo_client(lab, RUN_BUDGET, RESTART_PORT)
    killed = time.time()
    proc.kill()
    proc.wait(10)
    launched = time.time()
    new = lab.run_sdnsup(lab.ns_a, "-r", f"@{path}", "--cc", url)
    wait_for(
        "the restarted daemon's 'applied:' line",
        CONVERGE_TIMEOUT,
        lambda: "applied:" in lab.logs(new),
    )
    idle = idle_since(new.pid, IDLE_TIMEOUT)
    applied = log_records(lab, new, r"INFO applied: ")[0]
    if "no changes" not in applied[1]:
        raise BenchError(f"the restarted daemon wrote to the kernel: {applied[1]}")
    time.sleep(SOCKET_WAIT)  # the last flows' replies
    window = [r for r in json_lines(lab, client) if killed <= r["sent"] <= idle]
    if not window:
        raise BenchError("no flow between the kill and the restarted daemon's idle was answered")
    # Sequence numbers count the flows sent: the gaps are those never answered.
    seqs = {r["seq"] for r in window}
    sent = max(seqs) - min(seqs) + 1
    return new, {
        "applied": applied[0] - launched,
        "idle": idle - launched,
        "flows_sent": float(sent),
        "flows_lost": float(sent - len(seqs)),
        "flows_elsewhere": float(sum(1 for r in window if r["seen"] != via)),
    }


SOCKET_WAIT = 1.0


def scale_run(lab: Lab, url: str, n: int) -> ScaleRun:
    path = cidr_file(lab, n)
    ap1 = lab.ap(1)
    alone = json.loads(
        lab.exec(lab.ns_a, *python(ALONE, path, f"{ap1.addr}+{ap1.addr6}"), timeout=120).stdout
    )
    echo_server(lab, RUN_BUDGET)
    client = echo_client(lab, RUN_BUDGET)
    launched = time.time()
    proc = lab.run_sdnsup(lab.ns_a, "-r", f"@{path}", "--cc", url)
    via = overlay(lab, 1)

    def first_via_ap1() -> dict[str, Any] | None:
        alive(lab, proc)
        return next((r for r in json_lines(lab, client) if r["seen"] == via), None)

    try:
        first = wait_for("a datagram through AP1", CONVERGE_TIMEOUT, first_via_ap1)
        wait_for("the 'applied:' line", CONVERGE_TIMEOUT, lambda: "applied:" in lab.logs(proc))
        idle = idle_since(proc.pid, IDLE_TIMEOUT)
        rss, peak = memory(proc.pid)
        stamps = {}
        for key, pattern in (
            ("parsed", r"INFO CIDRs: "),
            ("chosen", r"AP chosen: "),
            ("written", r"INFO applied: "),
        ):
            found = log_records(lab, proc, pattern)
            if not found:
                raise BenchError(f"no log line matching {pattern!r}:\n{lab.logs(proc)[-3000:]}")
            stamps[key] = found[0][0]
        reloaded = reload_run(lab, proc, path)
        idle_since(proc.pid, IDLE_TIMEOUT)
        proc, restarted = restart_run(lab, url, path, proc)
        stopped = time.time()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        stop = time.time() - stopped
        if code != 0:
            raise BenchError(f"sdnsup exited {code} on SIGTERM:\n{lab.logs(proc)[-3000:]}")
    finally:
        lab.stop(client, grace=1.0)
        if proc.poll() is None:
            lab.stop(proc, grace=10.0)
    phases = {
        "parsed": stamps["parsed"] - launched,
        "chosen": stamps["chosen"] - stamps["parsed"],
        "written": stamps["written"] - stamps["chosen"],
        "packet": max(0.0, first["b"] - stamps["written"]),
        "idle": max(0.0, idle - stamps["written"]),
        "total_written": stamps["written"] - launched,
    }
    return ScaleRun(n, alone["parse"], alone["apply"], phases, rss, peak, stop, reloaded, restarted)


def report(runs: dict[int, list[ScaleRun]], requested: int) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for n, done in runs.items():
        rows = [
            stat_row("launch -> kernel state written", [r.phases["total_written"] for r in done]),
            *(stat_row(f"  {label}", [r.phases[key] for r in done]) for key, label in PHASES),
            stat_row("applier alone, from scratch (same lab)", [r.apply_alone for r in done]),
            stat_row("parse alone (same file)", [r.parse_alone for r in done], "<= 300 ms"),
            stat_row(
                "SIGHUP, one CIDR changed -> new route in the kernel",
                [r.reload["route_added"] for r in done],
            ),
            stat_row(
                "SIGHUP -> both routes and set elements written",
                [r.reload["done"] for r in done],
                "<= 500 ms",
            ),
            stat_row(
                "kill -9, restart: launch -> 'applied: ... no changes'",
                [r.restart["applied"] for r in done],
            ),
            stat_row(
                "kill -9, restart: launch -> idle", [r.restart["idle"] for r in done], "<= 3 s"
            ),
            stat_row(
                "SIGTERM -> exit, idle (restarted daemon)",
                [r.stop for r in done],
                "<= 1 s + teardown",
            ),
        ]
        ratios = [r.phases["total_written"] / (r.apply_alone + r.parse_alone) for r in done]
        rss = [r.idle_rss / 1024 for r in done]
        peak = [r.peak_rss / 1024 for r in done]
        benchlib.print_table(
            f"converge at {n:,} CIDRs: the daemon's own path, {len(done)} runs", STAT_HEAD, rows
        )
        if done:
            s = benchlib.stat(ratios)
            print(
                "  (launch -> written) / (applier alone + parse alone): "
                f"{s.median:.2f} ({s.min:.2f}-{s.max:.2f}); target <= 1.3"
            )
            mb = benchlib.stat(rss).median, benchlib.stat(peak).median
            print(f"  RSS idle {mb[0]:.0f} MB, peak {mb[1]:.0f} MB")
            sent = sum(r.restart["flows_sent"] for r in done)
            lost = sum(r.restart["flows_lost"] for r in done)
            elsewhere = sum(r.restart["flows_elsewhere"] for r in done)
            print(
                f"  from kill -9 to the restarted daemon idle: {sent:.0f} new UDP flows, "
                f"{lost:.0f} unanswered, {elsewhere:.0f} not through AP1"
            )
        figures[str(n)] = {
            "runs_requested": requested,
            "phases": {key: maybe_stat([r.phases[key] for r in done]) for key, _ in PHASES},
            "launch_to_written": maybe_stat([r.phases["total_written"] for r in done]),
            "apply_alone": maybe_stat([r.apply_alone for r in done]),
            "parse_alone": maybe_stat([r.parse_alone for r in done]),
            "ratio": maybe_stat(ratios),
            "stop": maybe_stat([r.stop for r in done]),
            "reload_route_added": maybe_stat([r.reload["route_added"] for r in done]),
            "reload_done": maybe_stat([r.reload["done"] for r in done]),
            "restart_applied": maybe_stat([r.restart["applied"] for r in done]),
            "restart_idle": maybe_stat([r.restart["idle"] for r in done]),
            "restart_flows": {
                k: sum(r.restart[k] for r in done)
                for k in ("flows_sent", "flows_lost", "flows_elsewhere")
            },
            "rss_idle_mb": maybe_stat(rss),
            "rss_peak_mb": maybe_stat(peak),
        }
    return figures


def main_scale(sizes: list[int], runs: int, errors: list[str]) -> dict[str, Any]:
    done: dict[int, list[ScaleRun]] = {}
    for n in sizes:

        def once(n: int = n) -> ScaleRun:
            with Lab.create(n_aps=3) as lab:
                return scale_run(lab, lab_with_cc(lab), n)

        done[n] = repeat(runs, once, errors)
    return report(done, runs)
