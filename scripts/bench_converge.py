"""``scripts/bench converge``: process start -> first packet through the AP, phase by phase.

Each run builds a lab of network namespaces (:class:`sdnsup.lab.Lab`: client A, router R,
host B, three APs whose agents answer probes after 5, 40 and 80 ms, the lab CC in R listing
all three), removed at the end, also on failure; nothing in the host's namespace changes.
Traffic runs before sdnsup starts: a client in A opens a new UDP flow to B every 5 ms and B
answers with the source address it saw (see ``bench_failover``). Then sdnsup is launched
with its defaults, steering B's subnet; the run ends with the first datagram that reaches B
through AP1 (the fastest), stamped by B.

The phases, each stamped where it is visible from outside the process (``time.time()`` of
one machine throughout):

- start-up: launch -> sdnsup's TCP SYN to the CC on A's wire (a packet socket in A):
  interpreter, imports, configuration, lock, netlink and nftables set-up;
- discovery: that SYN -> the CC's HTTP answer on the wire;
- answer -> first AP probe on the wire (parsing and validating the AP list);
- probing: first probe -> "AP chosen" in sdnsup's log (the first AP to answer is taken);
- apply: AP chosen -> the last of sdnsup's nexthop/route/rule writes in A's kernel
  (``ip -ts monitor``; the nftables table is written before the rule, the last step);
- state -> first packet at B (one new flow every 5 ms).

For reference, measured in A before each launch: ``python -c pass`` (the interpreter alone),
``python -c "import sdnsup.cli"`` (interpreter + imports) and AP1's UDP echo RTT.

Figures only, printed with what to expect next to them (issue 5 sets no target for this).
A failed run is reported as FAILED with the reason and taken again (a bounded number of
times); the exit status is 1 only when fewer than ``--runs`` runs could be measured, 77 when
no lab can be built here.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import benchlib
from bench_converge_scale import main_scale
from bench_failover import (
    CC_PORT,
    DELAYS,
    SEND_INTERVAL,
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
    start_sdnsup,
    stat_row,
    stop_sdnsup,
    wait_for,
)

from sdnsup.lab import Lab
from sdnsup.lab.apagent import UDP_PORT
from sdnsup.routes import RTPROT_SDNSUP

SCALE_SIZES = (2, 10_000, 100_000)

CONVERGE_TIMEOUT = 15.0  # launch -> first packet through AP1, at most
RUN_BUDGET = 30.0  # the helper processes of a run end on their own after this

# A: stamp the first of each on A's interface (a packet socket sees outgoing frames too):
# TCP SYN to the CC, the CC's first TCP segment with payload (its HTTP answer), UDP to an
# AP's probe port, UDP from it. IPv4 only: the CC and the first probes are IPv4.
WIRE_TAP = """
import json, socket, struct, sys, time
ifname, mine, cc = sys.argv[1], socket.inet_aton(sys.argv[2]), socket.inet_aton(sys.argv[3])
cc_port, probe_port, until = int(sys.argv[4]), int(sys.argv[5]), time.time() + float(sys.argv[6])
ETH_P_ALL = 3  # outgoing frames reach ETH_P_ALL sockets only
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
s.bind((ifname, ETH_P_ALL))
s.settimeout(0.5)
print(json.dumps({"kind": "ready"}), flush=True)
seen = set()
while time.time() < until and len(seen) < 4:
    try:
        frame = s.recv(256)
    except TimeoutError:
        continue
    now = time.time()
    ip = frame[14:]
    if frame[12:14] != bytes((8, 0)) or len(ip) < 20:
        continue
    hl = (ip[0] & 15) * 4
    if len(ip) < hl + 14:
        continue
    src, dst, proto = ip[12:16], ip[16:20], ip[9]
    sport, dport = struct.unpack("!HH", ip[hl : hl + 4])
    kind = None
    if proto == 6 and src == mine and dport == cc_port and ip[hl + 13] & 0x02:
        kind = "cc"
    elif proto == 6 and src == cc and dst == mine and sport == cc_port:
        total = struct.unpack("!H", ip[2:4])[0]
        if total - hl - (ip[hl + 12] >> 4) * 4 > 0:
            kind = "cc_answer"
    elif proto == 17 and src == mine and dport == probe_port:
        kind = "probe"
    elif proto == 17 and dst == mine and sport == probe_port:
        kind = "probe_answer"
    if kind and kind not in seen:
        seen.add(kind)
        print(json.dumps({"kind": kind, "t": now}), flush=True)
"""

# A: the RTT of an AP's UDP echo (what sdnsup probes), median of a few sequential tries.
AP_RTT = """
import socket, statistics, sys, time
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
rtts = []
for i in range(n):
    t0 = time.perf_counter()
    s.sendto(b"SDP1bench%d" % i, (addr, port))
    s.recv(2048)
    rtts.append(time.perf_counter() - t0)
print(statistics.median(rtts))
"""

PHASES = (
    # key, label, what to expect
    ("startup", "start-up: launch -> CC request (SYN) on the wire",
     "~ python + imports (reference below)"),
    ("discovery", "discovery: CC request -> CC answer on the wire", "a few ms (CC on the LAN)"),
    ("parse", "CC answer -> first AP probe on the wire", "< 10 ms"),
    ("probing", "probing: first probe -> AP chosen (log)", "~ AP1's RTT (first to answer)"),
    ("apply", "apply: AP chosen -> state in the kernel", "~ 10-20 ms (first apply)"),
    ("deliver", "state in the kernel -> first packet at B via AP1",
     f"<= {SEND_INTERVAL * 1000:.0f} ms (one send interval)"),
)  # fmt: skip


@dataclass
class Run:
    total: float  # launch -> first datagram through AP1 at B
    phases: dict[str, float]
    interpreter: float  # python -c pass in A
    imports: float  # python -c "import sdnsup.cli" in A
    ap_rtt: float  # AP1's udp echo, median of 5


def timed(lab: Lab, *argv: str) -> float:
    t0 = time.time()
    lab.exec(lab.ns_a, *argv)
    return time.time() - t0


def converge_run(lab: Lab, url: str) -> Run:
    """One launch in a fresh lab, traffic already flowing; the phases of its convergence."""
    interpreter = timed(lab, sys.executable, "-c", "pass")
    imports = timed(lab, sys.executable, "-c", "import sdnsup.cli")
    ap_rtt = float(lab.exec(lab.ns_a, *python(AP_RTT, lab.ap(1).addr, UDP_PORT, 5)).stdout)
    echo_server(lab, RUN_BUDGET)
    client = echo_client(lab, RUN_BUDGET)
    # Started after the RTT probe, whose packets it would take for sdnsup's.
    argv = python(
        WIRE_TAP, lab.a_ifname, lab.a_addr, lab.router_addr, CC_PORT, UDP_PORT, RUN_BUDGET
    )
    tap = lab.popen(lab.ns_a, *argv, label="a-tap")
    wait_for("the wire tap in A", 5.0, lambda: json_lines(lab, tap))
    monitor = start_monitor(lab, "nexthop", "rule", "route")
    proc, launched = start_sdnsup(lab, url)
    ap1 = overlay(lab, 1)

    def first_via_ap1() -> dict[str, Any] | None:
        alive(lab, proc)
        return next((r for r in json_lines(lab, client) if r["seen"] == ap1), None)

    try:
        first = wait_for("a datagram through AP1", CONVERGE_TIMEOUT, first_via_ap1)
    except BenchError as exc:
        raise BenchError(f"{exc}; sdnsup's log:\n{lab.logs(proc)[-3000:]}") from None
    finally:
        lab.stop(client, grace=1.0)
        stop_sdnsup(lab, proc)
    wire = {r["kind"]: r["t"] for r in json_lines(lab, tap) if "t" in r}
    writes = [
        t
        for t, e in monitor_events(lab.logs(monitor))
        if f"proto {RTPROT_SDNSUP}" in e and not e.startswith("Deleted ") and t <= first["b"]
    ]
    chosen = log_records(lab, proc, r"AP chosen: ap1 ")
    missing = [k for k in ("cc", "cc_answer", "probe") if k not in wire]
    if missing or not writes or not chosen:
        raise BenchError(
            f"sdnsup's timeline is incomplete: wire {sorted(wire)} (missing {missing}), "
            f"{len(writes)} kernel writes, AP chosen logged: {bool(chosen)}"
        )
    marks = [
        launched, wire["cc"], wire["cc_answer"], wire["probe"], chosen[0][0], max(writes),
        first["b"],
    ]  # fmt: skip
    spans = itertools.pairwise(marks)
    phases = {key: b - a for (key, *_), (a, b) in zip(PHASES, spans, strict=True)}
    return Run(first["b"] - launched, phases, interpreter, imports, ap_rtt)


@dataclass
class Results:
    runs: list[Run] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def report(res: Results, runs: int) -> dict[str, Any]:
    done = res.runs
    rows = [stat_row("launch -> first packet at B through AP1", [r.total for r in done],
                     "no target; start-up + a few RTTs")]  # fmt: skip
    for key, label, expect in PHASES:
        rows.append(stat_row(f"  {label}", [r.phases[key] for r in done], expect))
    rows += [
        stat_row("  beyond start-up (CC request -> first packet)",
                 [r.total - r.phases["startup"] for r in done], "a few RTTs of CC and AP1"),
        stat_row("reference: python -c pass (interpreter alone)", [r.interpreter for r in done]),
        stat_row("reference: python -c 'import sdnsup.cli'", [r.imports for r in done]),
        stat_row("reference: AP1's RTT (udp echo, median of 5)", [r.ap_rtt for r in done]),
    ]  # fmt: skip
    benchlib.print_table(
        f"converge: sdnsup (defaults) from process start, {len(done)} runs", STAT_HEAD, rows
    )
    if done:
        shares = {k: statistics.median(r.phases[k] / r.total for r in done) for k, *_ in PHASES}
        print("  share of the total (median): "
              + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))  # fmt: skip
    return {
        "runs_requested": runs,
        "total": maybe_stat([r.total for r in done]),
        "phases": {k: maybe_stat([r.phases[k] for r in done]) for k, *_ in PHASES},
        "reference": {
            "interpreter": maybe_stat([r.interpreter for r in done]),
            "imports": maybe_stat([r.imports for r in done]),
            "ap1_rtt": maybe_stat([r.ap_rtt for r in done]),
        },
        "errors": res.errors,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--runs", type=benchlib.positive_int, default=10, help="repeated runs (default 10)"
    )
    parser.add_argument(
        "--cidrs",
        type=lambda text: [benchlib.positive_int(n) for n in text.split(",")],
        default=list(SCALE_SIZES),
        help="CIDR counts of the daemon-path table, beside the applier alone "
        "(default 2,10000,100000; bench_converge_scale.py)",
    )
    parser.add_argument(
        "--scale-runs",
        type=benchlib.positive_int,
        default=3,
        help="repeated runs per CIDR count (default 3)",
    )
    parser.add_argument(
        "--only-scale", action="store_true", help="only the daemon-path table at --cidrs"
    )
    args = parser.parse_args(argv)
    if (code := benchlib.no_lab_exit()) is not None:
        return code
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    delays = ", ".join(f"AP{i} {d * 1000:.0f} ms" for i, d in DELAYS.items())
    runs = args.scale_runs if args.only_scale else args.runs
    print(
        f"sdnsup with its defaults, launched in A with traffic flowing; lab: CC in R, 3 APs"
        f" answering probes after {delays}; a fresh lab per run, {runs} runs"
    )
    res = Results()

    def once() -> Run:
        with Lab.create(n_aps=len(DELAYS)) as lab:
            return converge_run(lab, lab_with_cc(lab))

    figures: dict[str, Any] = {}
    if not args.only_scale:
        res.runs = repeat(args.runs, once, res.errors)
        figures = report(res, args.runs)
    scale_errors: list[str] = []
    figures["daemon_path"] = main_scale(args.cidrs, args.scale_runs, scale_errors)
    for err in res.errors + scale_errors:
        print(f"FAILED {err}")
    benchlib.write_json("converge", figures)
    short = len(res.runs) < args.runs and not args.only_scale
    scale_short = any(
        (f["apply_alone"] is None or f["apply_alone"].n < args.scale_runs)
        for f in figures["daemon_path"].values()
    )
    return 1 if short or scale_short else 0


if __name__ == "__main__":
    sys.exit(main())
