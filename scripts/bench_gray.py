"""``scripts/bench gray``: how fast sdnsup finds an AP that answers probes but forwards nothing.

Everything runs in one lab of network namespaces (client A, router R, host B with three
addresses inside the CIDRs, two APs whose agents answer after 5 and 40 ms, the lab CC),
removed at the end, also on failure; nothing in the host's namespace changes. Each run starts
a fresh sdnsup, waits until it steers through AP1, then cuts AP1's *overlay* side (its
``ov0`` link, inside AP1's namespace): AP1 keeps answering its probes from A, and answers
forwarded packets with ICMP net unreachable. Measured, ``--runs`` times each:

* **passive** (the defaults, nothing configured): a new TCP connection A -> B every 100 ms,
  to B's three addresses in turn. Figures: the cut -> sdnsup's suspicion and its failover
  (its log lines), and the cut -> the first new connection through AP2 (what users see).
  Target: < 3 s.
* **track** (``--track tcp:8080@10.10.10.1``, no traffic at all): the cut -> failover.
  Target: < 1.5 s.

Then the false-positive run: one of B's three addresses stops answering for ``--quiet``
seconds (default 60) under the same traffic: sdnsup must not suspect, let alone fail over.

Prints the tables and writes bench-results/gray.json. Exit status 1 only when a measurement
could not be taken (or the false-positive run failed over: a correctness result).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import benchlib
from bench_failover import log_records

from sdnsup.lab import Lab, LabError, WaitTimeout, wait_for
from sdnsup.lab.traffic import A_TO_B, ConnectionStream

CIDRS = "10.10.10.0/24,fd10:10:10::/64"
HOSTS = ("10.10.10.1", "10.10.10.2", "10.10.10.3")
DELAYS = {1: 0.005, 2: 0.040}
START_TIMEOUT = 15.0
VERDICT_TIMEOUT = 15.0
TARGETS = {"passive": 3.0, "track": 1.5}


class BenchError(Exception):
    """A measurement could not be taken."""


def setup(lab: Lab) -> str:
    lab.start_ap_agents(DELAYS)
    url = lab.start_cc()
    lab.set_cc()
    for host in HOSTS[1:]:
        lab.exec(lab.ns_b, "ip", "addr", "add", f"{host}/24", "dev", "eth0")
    lab.serve_whoami(lab.ns_b)
    return url


def start(lab: Lab, url: str, *extra: str) -> subprocess.Popen[bytes]:
    proc = lab.run_sdnsup(lab.ns_a, "-r", CIDRS, "--cc", url, *extra)
    overlay = str(lab.ap(1).overlay_addr)
    try:
        wait_for("sdnsup via AP1", START_TIMEOUT, lambda: lab.whoami(lab.ns_a, HOSTS[0]) == overlay)
    except WaitTimeout as exc:
        raise BenchError(f"{exc}:\n{lab.logs(proc)[-2000:]}") from None
    return proc


def finish(lab: Lab, proc: subprocess.Popen[bytes]) -> None:
    code = lab.stop(proc, grace=10.0)
    lab.ap_overlay_up(1)
    if code != 0:
        raise BenchError(f"sdnsup exited {code} on SIGTERM")


def verdict(lab: Lab, proc: subprocess.Popen[bytes], cut: float) -> tuple[float | None, float]:
    """(cut -> suspicion, cut -> failover) from sdnsup's log (epoch seconds)."""
    try:
        wait_for(
            "the failover", VERDICT_TIMEOUT, lambda: log_records(lab, proc, "forwards nothing")
        )
    except WaitTimeout:
        raise BenchError(f"no failover:\n{lab.logs(proc)[-2000:]}") from None
    failover = log_records(lab, proc, "forwards nothing")[0][0] - cut
    suspect = log_records(lab, proc, "suspect:")
    return (suspect[0][0] - cut if suspect else None), failover


def passive_run(lab: Lab, url: str) -> dict[str, float | None]:
    proc = start(lab, url)
    try:
        with ConnectionStream(lab, interval=0.1, b_hosts=HOSTS, max_seconds=60) as stream:
            time.sleep(1.0)
            stream.mark("cut")
            cut = time.time()
            lab.ap_overlay_down(1)
            recovery = stream.wait_healthy(VERDICT_TIMEOUT, via=[str(lab.ap(2).overlay_addr)])
            failed = stream.report().by_direction[A_TO_B][1]
        suspect, failover = verdict(lab, proc, cut)
    finally:
        finish(lab, proc)
    return {"suspect": suspect, "failover": failover, "first_via_ap2": recovery,
            "failed_connections": float(failed)}  # fmt: skip


def track_run(lab: Lab, url: str) -> dict[str, float | None]:
    proc = start(lab, url, "--track", f"tcp:8080@{HOSTS[0]}")
    try:
        time.sleep(1.0)
        cut = time.time()
        lab.ap_overlay_down(1)
        _, failover = verdict(lab, proc, cut)
    finally:
        finish(lab, proc)
    return {"failover": failover}


def quiet_run(lab: Lab, url: str, seconds: float) -> dict[str, Any]:
    proc = start(lab, url)
    lab.exec(lab.ns_b, "ip", "addr", "del", f"{HOSTS[2]}/24", "dev", "eth0")
    try:
        with ConnectionStream(lab, interval=0.1, b_hosts=HOSTS, max_seconds=seconds + 30) as s:
            time.sleep(seconds)
            tried, failed = s.report().by_direction[A_TO_B]
        moved = [line for _, line in log_records(lab, proc, "suspect|failover")]
    finally:
        lab.exec(lab.ns_b, "ip", "addr", "add", f"{HOSTS[2]}/24", "dev", "eth0")
        finish(lab, proc)
    return {"seconds": seconds, "attempted": tried, "failed": failed, "suspicions": moved}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=benchlib.positive_int, default=10, help="(default 10)")
    parser.add_argument("--quiet", type=float, default=60.0, help="false-positive run, s")
    args = parser.parse_args(argv)
    if (code := benchlib.no_lab_exit()) is not None:
        return code
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    runs: dict[str, list[dict[str, float | None]]] = {"passive": [], "track": []}
    errors: list[str] = []
    quiet: dict[str, Any] = {}
    try:
        with Lab.create(n_aps=2) as lab:
            url = setup(lab)
            for name, once in (("passive", passive_run), ("track", track_run)):
                for i in range(args.runs):
                    print(f"{name} run {i + 1}/{args.runs}...", file=sys.stderr, flush=True)
                    try:
                        runs[name].append(once(lab, url))
                    except (BenchError, LabError, subprocess.SubprocessError) as exc:
                        errors.append(f"{name} run {i + 1}: {exc}")
            print("false-positive run...", file=sys.stderr, flush=True)
            quiet = quiet_run(lab, url, args.quiet)
    except (BenchError, LabError, subprocess.SubprocessError) as exc:
        errors.append(f"lab: {exc}")

    def row(label: str, name: str, key: str, target: str = "", unit: str = "ms") -> list[str]:
        values = [r[key] for r in runs[name] if r.get(key) is not None]
        return [label, benchlib.stat(values).fmt(unit, 0) if values else "-", target]

    rows = [
        row("passive: cut -> suspicion (logged)", "passive", "suspect"),
        row("passive: cut -> failover (logged)", "passive", "failover"),
        row("passive: cut -> first new connection via AP2", "passive", "first_via_ap2",
            f"< {TARGETS['passive']:g} s"),
        row("passive: connections A -> B failed meanwhile", "passive", "failed_connections",
            unit="connections"),
        row("track, no traffic: cut -> failover (logged)", "track", "failover",
            f"< {TARGETS['track']:g} s"),
    ]  # fmt: skip
    if quiet:
        rows.append([
            f"one host down, {quiet['seconds']:.0f} s of traffic: suspicions/failovers",
            f"{len(quiet['suspicions'])} ({quiet['failed']} of {quiet['attempted']} connections "
            "failed, all to that host)",
            "0",
        ])  # fmt: skip
    benchlib.print_table(
        f"gray failures: AP1's overlay side cut, its probes still answered ({args.runs} runs "
        "each; median (min-max))",
        ["figure", "measured", "target"],
        rows,
    )
    for err in errors:
        print(f"FAILED {err}")
    benchlib.write_json(
        "gray",
        {
            "runs": runs,
            "passive_first_via_ap2": benchlib.stat(
                [r["first_via_ap2"] for r in runs["passive"] if r["first_via_ap2"] is not None]
            )
            if runs["passive"]
            else None,
            "track_failover": benchlib.stat(
                [r["failover"] for r in runs["track"] if r["failover"] is not None]
            )
            if runs["track"]
            else None,
            "quiet": quiet,
            "errors": errors,
        },
    )
    return 1 if errors or (quiet and quiet["suspicions"]) else 0


if __name__ == "__main__":
    sys.exit(main())
