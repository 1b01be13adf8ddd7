"""``scripts/bench footprint``: what the idle sdnsup daemon costs the host.

Everything runs in a lab of network namespaces (:class:`sdnsup.lab.Lab`: client A, router R,
host B, three APs with probe agents, the lab CC), removed at the end, also on failure; nothing
in the host's namespace changes. The real sdnsup runs in A with its default settings (a
keepalive probe of the active AP every 0.2 s, a probe round of all APs every 30 s, a CC refresh
every ``ttl`` = 60 s, a full kernel re-read every 120 s), first with B's two subnets, then with
100k CIDRs.

Once sdnsup has its first probe ranking and is idle (its start-up is not what is measured),
its process is sampled from /proc every second for ``--seconds`` (default 60):

* RSS (``VmRSS``) at the start and the end of the window, its growth and its maximum; the
  peak over the process's life (``VmHWM``, the start-up and the first apply included);
* CPU: utime + stime (+ those of waited-for children) over wall time, as a share of one CPU,
  for the whole window and per 10 s window (median/min/max);
* wake-ups per second: voluntary + involuntary context switches of all its threads
  (``/proc/PID/task/*/status``; every switch away from the CPU is one sleep or preemption,
  so one wake-up after it), per thread so that a thread ending does not count backwards;
* threads and open file descriptors (by kind).

Targets: idle RSS < 60 MB, CPU < 1%. The exit status is 1 only when a measurement could not
be taken.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_datapath import wait_idle, write_cidr_file
from benchlib import Stat, no_lab_exit, print_table, stat, write_json

from sdnsup import defaults
from sdnsup.defaults import VERIFY_INTERVAL
from sdnsup.lab import Lab, LabError, WaitTimeout, wait_for

DELAYS = {1: 0.005, 2: 0.040, 3: 0.080}  # AP index -> probe answer delay (as bench failover)
CIDRS = ("10.10.10.0/24", "fd10:10:10::/64")  # B's subnets, both families
N_BIG = 100_000
SAMPLE_INTERVAL = 1.0
WINDOW = 10.0  # seconds per CPU / wake-up window: several keepalive cycles, a dozen windows
WARMUP = 5.0  # after the first ranking and idle: the first keepalive cycles are not counted
TARGET_RSS_MB = 60.0
TARGET_CPU = 0.01
MB = 1024 * 1024

# Bounds: nothing here waits longer than this for anything.
START_TIMEOUT = 90.0  # to the first probe ranking; 100k CIDRs take ~2-30 s depending on load
STOP_TIMEOUT = 60.0


class BenchError(Exception):
    """A measurement could not be taken."""


# --- /proc (shared with bench_soak) ------------------------------------------------------------


@dataclass(frozen=True)
class ProcSample:
    """One reading of a process from /proc."""

    t: float  # time.monotonic()
    rss: int  # bytes, VmRSS
    hwm: int  # bytes, VmHWM: peak RSS over the process's life
    cpu: float  # seconds: utime + stime + cutime + cstime
    switches: dict[int, int]  # thread id -> voluntary + nonvoluntary context switches
    fds: int


def _status_fields(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _kb(value: str) -> int:
    return int(value.split()[0]) * 1024


def sample(pid: int) -> ProcSample:
    """Read ``pid``'s memory, CPU, context switches and fd count.

    Raises:
        FileNotFoundError: the process is gone.
    """
    t = time.monotonic()
    proc = Path(f"/proc/{pid}")
    status = _status_fields(proc / "status")
    stat_fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(v) for v in stat_fields[11:15])  # utime stime cutime cstime
    switches = {}
    for task in (proc / "task").iterdir():
        try:
            st = _status_fields(task / "status")
        except FileNotFoundError:  # the thread ended while we looked
            continue
        switches[int(task.name)] = int(st["voluntary_ctxt_switches"]) + int(
            st["nonvoluntary_ctxt_switches"]
        )
    return ProcSample(
        t=t,
        rss=_kb(status["VmRSS"]),
        hwm=_kb(status["VmHWM"]),
        cpu=ticks / os.sysconf("SC_CLK_TCK"),
        switches=switches,
        fds=len(os.listdir(proc / "fd")),
    )


def switches_between(a: ProcSample, b: ProcSample) -> int:
    """Context switches from ``a`` to ``b``: per thread, so a thread that ended in between
    does not make the sum go backwards (its last switches are lost, a few at most)."""
    return sum(n - a.switches.get(tid, 0) for tid, n in b.switches.items())


def fd_kinds(pid: int) -> dict[str, int]:
    """Open fds of ``pid`` by kind: socket, pipe, anon_inode:[eventpoll]..., file, dev."""
    kinds: Counter[str] = Counter()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:
            continue
        if target.startswith(("socket:", "pipe:")):
            kinds[target.split(":")[0]] += 1
        elif target.startswith("anon_inode:"):
            kinds[target] += 1
        elif target.startswith("/dev/"):
            kinds["dev"] += 1
        else:
            kinds["file"] += 1
    return dict(sorted(kinds.items()))


def is_sdnsup(pid: int) -> bool:
    """Whether ``pid`` is the sdnsup daemon itself (``ip netns exec`` execs, no wrapper)."""
    try:
        return b"sdnsup.cli" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False


# --- one phase --------------------------------------------------------------------------------


@dataclass
class Footprint:
    label: str
    samples: list[ProcSample] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)
    status_ms: list[float] = field(default_factory=list)  # `sdnsup status --json` wall times

    @property
    def wall(self) -> float:
        return self.samples[-1].t - self.samples[0].t

    def windows(self, window: float) -> list[tuple[ProcSample, ProcSample]]:
        """Consecutive (start, end) sample pairs about ``window`` seconds apart."""
        out = []
        start = self.samples[0]
        for s in self.samples[1:]:
            if s.t - start.t >= window - SAMPLE_INTERVAL / 2:
                out.append((start, s))
                start = s
        return out or [(self.samples[0], self.samples[-1])]

    def figures(self) -> dict[str, Any]:
        first, last = self.samples[0], self.samples[-1]
        wins = self.windows(WINDOW)
        return {
            "seconds": self.wall,
            "rss_start_mb": first.rss / MB,
            "rss_end_mb": last.rss / MB,
            "rss_growth_mb": (last.rss - first.rss) / MB,
            "rss_max_mb": max(s.rss for s in self.samples) / MB,
            "rss_peak_lifetime_mb": last.hwm / MB,
            "cpu": (last.cpu - first.cpu) / self.wall,
            "cpu_windows": stat((b.cpu - a.cpu) / (b.t - a.t) for a, b in wins),
            "wakeups_per_s": switches_between(first, last) / self.wall,
            "wakeups_windows": stat(switches_between(a, b) / (b.t - a.t) for a, b in wins),
            "threads": stat(self.threads),
            "fds": stat(s.fds for s in self.samples),
            "fd_kinds_end": self.kinds,
            "status_ms": stat(self.status_ms),
        }


STATUS_RUNS = 15
TARGET_STATUS_MS = 80.0


def status_times(lab: Lab) -> list[float]:
    """Wall milliseconds of ``sdnsup status --json`` against the running daemon, as an
    operator's health check runs it (a new interpreter each time)."""
    times = []
    for _ in range(STATUS_RUNS):
        t0 = time.perf_counter()
        lab.exec(lab.ns_a, sys.executable, "-m", "sdnsup.cli", "status", "--json")
        times.append((time.perf_counter() - t0) * 1000)
    return times


def measure(lab: Lab, label: str, routes: str, url: str, seconds: float) -> Footprint:
    """Start sdnsup with ``-r routes``, wait for its first ranking and idle, sample it."""
    proc = lab.run_sdnsup(lab.ns_a, "-r", routes, "--cc", url)

    def ranked() -> bool:
        if proc.poll() is not None:
            raise BenchError(f"sdnsup exited {proc.returncode}:\n{lab.logs(proc)}")
        return "probe ranking:" in lab.logs(proc) and "applied:" in lab.logs(proc)

    try:
        wait_for("sdnsup's first probe ranking", START_TIMEOUT, ranked, step=0.1)
        wait_idle(proc.pid)
    except WaitTimeout as exc:
        raise BenchError(f"{label}: {exc}:\n{lab.logs(proc)}") from None
    if not is_sdnsup(proc.pid):
        raise BenchError(f"process {proc.pid} is not sdnsup: {proc.args!r}")
    time.sleep(WARMUP)
    fp = Footprint(label)
    print(f"{label}: sampling sdnsup for {seconds:g} s...", file=sys.stderr, flush=True)
    deadline = time.monotonic() + seconds
    next_at = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise BenchError(f"sdnsup exited {proc.returncode}:\n{lab.logs(proc)}")
        fp.samples.append(sample(proc.pid))
        fp.threads.append(len(fp.samples[-1].switches))
        if fp.samples[-1].t >= deadline:
            break
        next_at += SAMPLE_INTERVAL
        time.sleep(max(0.0, min(next_at, deadline) - time.monotonic()))
    fp.kinds = fd_kinds(proc.pid)
    fp.status_ms = status_times(lab)
    code = lab.stop(proc, grace=STOP_TIMEOUT)
    if code != 0:
        raise BenchError(f"{label}: sdnsup exited {code} on SIGTERM:\n{lab.logs(proc)}")
    return fp


# --- the table --------------------------------------------------------------------------------


def report(phases: list[Footprint], seconds: float) -> dict[str, Any]:
    figs = [p.figures() for p in phases]

    def each(fn: Callable[[dict[str, Any]], str]) -> list[str]:
        return [fn(f) for f in figs]

    def mb(v: float) -> str:
        return f"{v:.1f} MB"

    def pct(s: Stat) -> str:
        return f"{s.median:.2%} ({s.min:.2%}-{s.max:.2%})"

    # The targets are for the idle daemon with a short CIDR list (the first phase); the 100k
    # phase is shown for what it costs.
    rss_ok = figs[0]["rss_end_mb"] < TARGET_RSS_MB
    cpu_ok = figs[0]["cpu"] < TARGET_CPU
    rows = [
        [
            "RSS at the end of the window",
            *each(lambda f: mb(f["rss_end_mb"])),
            f"< {TARGET_RSS_MB:.0f} MB ({phases[0].label})" + ("" if rss_ok else "  MISSED"),
        ],
        ["RSS growth over the window", *each(lambda f: f"{f['rss_growth_mb']:+.2f} MB"), ""],
        ["RSS max over the window", *each(lambda f: mb(f["rss_max_mb"])), ""],
        [
            "peak RSS of its life (VmHWM)",
            *each(lambda f: mb(f["rss_peak_lifetime_mb"])),
            "start-up and first apply included",
        ],
        [
            "CPU, whole window (share of one CPU)",
            *each(lambda f: f"{f['cpu']:.2%}"),
            f"< {TARGET_CPU:.0%} ({phases[0].label})" + ("" if cpu_ok else "  MISSED"),
        ],
        [f"CPU per {WINDOW:.0f} s window", *each(lambda f: pct(f["cpu_windows"])), ""],
        [
            "wake-ups per second, whole window",
            *each(lambda f: f"{f['wakeups_per_s']:.1f}/s"),
            f"keepalive: {1 / defaults.KEEPALIVE_INTERVAL:.0f} probes/s",
        ],
        [
            f"wake-ups per second per {WINDOW:.0f} s window",
            *each(lambda f: f["wakeups_windows"].fmt("/s", 1)),
            "",
        ],
        ["threads", *each(lambda f: _range(f["threads"])), ""],
        ["open fds", *each(lambda f: _range(f["fds"])), ""],
        [
            f"`sdnsup status --json` wall time ({STATUS_RUNS} runs)",
            *each(
                lambda f: (
                    f"{f['status_ms'].median:.0f} ms "
                    f"({f['status_ms'].min:.0f}-{f['status_ms'].max:.0f})"
                )
            ),
            f"< {TARGET_STATUS_MS:.0f} ms",
        ],
        [
            "open fds at the end, by kind",
            *each(lambda f: ", ".join(f"{k} {n}" for k, n in f["fd_kinds_end"].items())),
            "",
        ],
    ]
    print_table(
        f"footprint: idle sdnsup over {seconds:g} s (defaults: keepalive every "
        f"{defaults.KEEPALIVE_INTERVAL:g} s, probe round every "
        f"{defaults.REPROBE_INTERVAL:g} s, CC refresh every 60 s, re-read every "
        f"{VERIFY_INTERVAL:g} s; 3 APs)",
        ["figure", *(p.label for p in phases), "target"],
        rows,
    )
    return {p.label: f for p, f in zip(phases, figs, strict=True)}


def _range(s: Stat) -> str:
    return f"{s.median:.0f}" if s.min == s.max else f"{s.median:.0f} ({s.min:.0f}-{s.max:.0f})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="idle time sampled per phase (default 60)"
    )
    parser.add_argument("--no-100k", action="store_true", help="skip the 100k-CIDR phase")
    args = parser.parse_args(argv)
    if not 2 <= args.seconds <= 3600:
        parser.error("--seconds must be between 2 and 3600")
    if (code := no_lab_exit()) is not None:
        return code
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    errors: list[str] = []
    phases: list[Footprint] = []
    try:
        with Lab.create(n_aps=len(DELAYS)) as lab:
            assert lab.tmpdir is not None
            lab.start_ap_agents(DELAYS)
            url = lab.start_cc()
            lab.set_cc()
            small = f"{len(CIDRS)} CIDRs"
            phases.append(measure(lab, small, ",".join(CIDRS), url, args.seconds))
            if not args.no_100k:
                big = write_cidr_file(lab.tmpdir / "cidrs.txt", N_BIG, *CIDRS)
                phases.append(measure(lab, f"{N_BIG:,} CIDRs", f"@{big}", url, args.seconds))
    except (BenchError, LabError, subprocess.SubprocessError, OSError) as exc:
        errors.append(str(exc))
    figures: dict[str, Any] = {}
    if phases:
        figures = report(phases, args.seconds)
    figures["settings"] = {
        "seconds": args.seconds,
        "aps": len(DELAYS),
        "target_rss_mb": TARGET_RSS_MB,
        "target_cpu": TARGET_CPU,
    }
    figures["errors"] = errors
    write_json("footprint", figures)
    for err in errors:
        print(f"FAILED {err}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
