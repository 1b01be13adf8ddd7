"""``scripts/bench datapath``: what sdnsup's ruleset with 100k CIDRs costs the traffic.

Everything runs in a lab of network namespaces (:class:`sdnsup.lab.Lab`: client A, router R,
host B and one AP), removed at the end, also on failure; nothing in the host's namespace
changes. The real sdnsup runs in A with ``-r @FILE`` (100k CIDRs) and ``--ap AP1``.

The comparison isolates the ruleset: the same endpoints, the same path, the same iperf3
servers in B; what differs between the states is only what sdnsup puts in A's kernel (its
nftables table, which also brings conntrack and a NAT hook into A, its policy rule, nexthop
and 100k routes) and the sdnsup process itself:

* **steered** flow, A -> B's 10.10.10.1 (inside a CIDR): *with* sdnsup it is marked and routed
  through AP1 by table 7300; *without*, a plain route ``10.10.10.0/25 via AP1`` in A's main
  table sends it through the very same AP1 (masqueraded there just the same).
* **not steered** flow, A -> B's second address 10.10.10.129 (outside every CIDR): through R in
  every state; *with* sdnsup it pays conntrack, the chains and the rule walk: the cost every
  other flow of the host pays.

Four states: a **bare** A (no ruleset, no conntrack: the headline comparison, target >= 95%);
A with **conntrack** already in use (one stateful nft rule, as on any host with a stateful
firewall or Docker: what sdnsup adds on such a host); A **with sdnsup** (connections pinned
to their AP: the steered flow's packets carry the AP slot's mark, set from the ct mark by a
map lookup); sdnsup's kernel state with the daemon stopped (``kill -9``: the ruleset's cost
alone, without the daemon's CPU on a 2-CPU machine); and an **experiment** on that state (see
EXPERIMENT_RULE), compared with it: the active AP's connections carry no packet mark and the
CIDR table is looked up for every unmarked packet, which spares a locally sent steered
packet its re-route and costs every other packet one more rule and table lookup. Before each
measured block every path is checked with the lab's whoami server (B must see AP1's overlay
address for the steered destination, A's own address for the other), so a state that steers
the wrong way is a failed measurement, not a pretty number. sdnsup is measured only once it is
idle after its start-up (its post-apply work is reported apart). With ``--forwarded`` the
flows also start in a container C behind A (forwarded traffic; A then has Docker-like NAT,
so conntrack, in every state).

The states are visited in mirrored order (bare, conntrack, sdnsup, then sdnsup, conntrack,
bare...) so that drift on a shared machine does not favour one of them. Every flow is one
iperf3 TCP stream and one small-packet UDP stream at full speed (``-b 0``). Reported:
median/min/max over the runs, the ratios with/without paired run by run, and for UDP the time
per packet (1 / packets per second) and what the ruleset adds to it. The exit status is 1 only
when a measurement could not be taken.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import Stat, no_lab_exit, positive_int, print_table, ratio, stat, write_json

from sdnsup.lab import Lab, LabError, WaitTimeout, wait_for

N_CIDRS = 100_000
STEERED_NET = "10.10.10.0/25"  # holds B's 10.10.10.1; one of the N_CIDRS
OTHER_ADDR = "10.10.10.129"  # a second address of B, outside every CIDR
# One iperf3 server per address of B, bound to it: a UDP server on the wildcard address
# answers from B's primary address, which A's socket connected to the second one does not
# accept (iperf3's UDP start-up then hangs).
IPERF_PORTS = {"10.10.10.1": 5201, OTHER_ADDR: 5202}
WHOAMI_PORT = 8080
TARGET_RATIO = 0.95
# iperf3's TCP stream rides on GSO super-packets (up to 64 KiB per trip through the hooks):
# bulk throughput. Small UDP datagrams at full speed show the cost per packet.
UDP_PAYLOAD = 64
# Socket buffers large enough that B's receiver does not drop bursts: with the default ones
# 20-40% of the datagrams were lost at B's socket, a figure of the receiving process and not
# of the path.
UDP_SOCKET_BUFFER = "4M"
# "A host that already tracks connections": one stateful rule registers conntrack in A's
# namespace (as any stateful firewall or Docker does) and changes nothing else.
CONNTRACK_TABLE = (
    "table inet benchct {\n"
    "  chain output { type filter hook output priority filter; ct state established counter; }\n"
    "}\n"
)

BARE, CONNTRACK, SDNSUP = "bare", "conntrack", "sdnsup"
RULESET, UNMARKED = "ruleset", "unmarked"
STATES = (BARE, CONNTRACK, SDNSUP, RULESET, UNMARKED)
STATE_LABELS = {
    BARE: "bare A",
    CONNTRACK: "A with conntrack",
    SDNSUP: "A with sdnsup",
    RULESET: "sdnsup's state, daemon stopped",
    UNMARKED: "experiment: active AP unmarked",
}
# The experiment: sdnsup's state, but packets of connections pinned to the active AP get no
# packet mark (their slot's mark chain emptied) and an extra rule sends every packet without
# sdnsup's flag to the CIDR table first. A locally sent packet then finds its route at the
# first lookup, without the re-route a mark set in the output chain costs. It is not a
# working design as it stands (a reply to an inbound connection from the CIDRs, or a
# connection that existed before sdnsup, would need the mark instead): it measures what such
# a design could save.
EXPERIMENT_RULE = ("not", "fwmark", "0x2000/0x2000", "lookup", "7300", "pref", "7301")

# Bounds: nothing here waits longer than this for anything.
APPLY_TIMEOUT = 90.0  # sdnsup start-up with 100k CIDRs (12 s seen on a loaded machine)
STOP_TIMEOUT = 60.0  # SIGTERM -> 100k routes removed and exit (20 s seen on a loaded machine)
READY_TIMEOUT = 5.0
IPERF_SLACK = 20.0  # on top of the test's duration: connect, exchange of results
BUSY_RETRIES = 3  # iperf3's server serves one test at a time; a slow previous one is retried
# After its first apply of 100k CIDRs sdnsup stays busy for a while (seen: ~9 s at 100% of a
# CPU); on a 2-CPU machine that would be measured as datapath cost. The datapath figures are
# taken once it is idle: less than IDLE_CPU of a CPU over IDLE_SAMPLE, twice in a row.
IDLE_CPU = 0.05
IDLE_SAMPLE = 0.5
IDLE_TIMEOUT = 120.0


class BenchError(Exception):
    """One measurement failed; the other runs still count."""


# --- helpers shared with bench_footprint and bench_soak ---------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid``, all its threads, dead ones included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def wait_idle(pid: int, timeout: float = IDLE_TIMEOUT) -> float:
    """Wait until ``pid`` uses less than IDLE_CPU of a CPU twice in a row; seconds waited.

    Raises:
        WaitTimeout: still busy after ``timeout`` seconds.
    """
    t0 = time.monotonic()
    quiet = 0
    while quiet < 2:
        if time.monotonic() - t0 > timeout:
            raise WaitTimeout(f"process {pid} still busy after {timeout:.0f} s")
        before = cpu_seconds(pid)
        time.sleep(IDLE_SAMPLE)
        quiet = quiet + 1 if cpu_seconds(pid) - before < IDLE_CPU * IDLE_SAMPLE else 0
    return time.monotonic() - t0


def scattered_cidrs(n: int) -> list[ipaddress.IPv4Network]:
    """``n`` distinct /24s scattered over 11.0.0.0-99.255.255.0.

    Slot ``i * stride mod slots`` is a bijection (stride is prime to slots), so the /24s never
    overlap; scattering them (rather than counting up) keeps the kernel's FIB trie and the
    nftables interval set from packing them into a few dense nodes, so that lookups cost what
    a real list of unrelated prefixes costs.
    """
    first, last = 11, 99  # public unicast first octets, clear of 10/8 (the lab) and 100.64/10
    # One /24 per /23 slot: two of them are never adjacent, so sdnsup's merge of adjacent
    # prefixes leaves all n of them.
    slots = (last - first + 1) * 32768
    stride = 40_503  # odd and not a multiple of 89: invertible modulo slots = 89 * 2**15
    if n > slots:
        raise ValueError(f"at most {slots} CIDRs")
    base = first << 24
    return [ipaddress.IPv4Network((base + (i * stride % slots) * 512, 24)) for i in range(n)]


def write_cidr_file(path: Path, n: int, *extra: str) -> Path:
    """A ``-r @FILE`` file: ``extra`` CIDRs first, then scattered /24s, ``n`` lines in all."""
    nets = [*extra, *(str(c) for c in scattered_cidrs(n - len(extra)))]
    path.write_text("".join(f"{c}\n" for c in nets))
    return path


# --- the lab and its states -------------------------------------------------------------------


@dataclass(frozen=True)
class Flow:
    key: str  # "a-steered", "a-other", "c-steered", "c-other"
    label: str
    src_ns: str
    dst: str
    seen: str  # the source address B must see on this path


class Bench:
    """The lab, its servers and the switch between the states."""

    def __init__(self, lab: Lab, cidr_file: Path) -> None:
        self.lab = lab
        self.cidr_file = cidr_file
        self.ap1 = lab.ap(1)
        self.sdnsup: subprocess.Popen[bytes] | None = None
        self.conntrack = False
        self.left = False  # sdnsup's kernel state is in A (running or killed)
        self.unmarked = False
        self.mark_chain = ""  # slot 1's mark rule, to put back after the experiment
        self.route = (STEERED_NET, "via", str(self.ap1.addr), "dev", lab.a_ifname)

    def setup(self) -> None:
        lab = self.lab
        lab.exec(lab.ns_b, "ip", "addr", "add", f"{OTHER_ADDR}/24", "dev", "eth0")
        lab.start_ap_agents()
        lab.serve_whoami(lab.ns_b, WHOAMI_PORT)
        for addr, port in IPERF_PORTS.items():
            server = lab.popen(
                lab.ns_b, "iperf3", "-s", "-B", addr, "-p", str(port), label=f"b-iperf3-{port}"
            )
            if not self._answers(functools.partial(_tcp_open, lab, lab.ns_a, addr, port)):
                raise BenchError(f"iperf3 server in B did not start:\n{lab.logs(server)}")

    @staticmethod
    def _answers(check: Callable[[], bool]) -> bool:
        try:
            return bool(wait_for("a server", READY_TIMEOUT, check, step=0.1))
        except WaitTimeout:
            return False

    def flows(self, sources: Sequence[str]) -> list[Flow]:
        lab = self.lab
        out = []
        for src in sources:
            ns = lab.ns_a if src == "a" else lab.ns_c
            assert ns is not None
            name = src.upper()
            steered = f"steered {name} -> B {lab.b_addr} (via AP1)"
            other = f"not steered {name} -> B {OTHER_ADDR} (via R)"
            out.append(
                Flow(f"{src}-steered", steered, ns, str(lab.b_addr), str(self.ap1.overlay_addr))
            )
            out.append(Flow(f"{src}-other", other, ns, OTHER_ADDR, str(lab.a_addr)))
        return out

    def enter(self, state: str) -> tuple[float, float] | None:
        """Switch A to ``state``. When that starts sdnsup: seconds from its start to its state
        applied and from there to idle; None otherwise (sdnsup not started, or already on)."""
        lab = self.lab
        started = None
        if self.unmarked and state != UNMARKED:  # undo the experiment's two changes
            lab.exec(lab.ns_a, "ip", "rule", "del", *EXPERIMENT_RULE)
            lab.exec(lab.ns_a, "nft", "-f", "-", input=self.mark_chain)
            self.unmarked = False
        if state in (SDNSUP, RULESET, UNMARKED):
            self._set_conntrack(False)
            lab.exec(lab.ns_a, "ip", "route", "del", *self.route, check=False)
            if self.sdnsup is None and (state == SDNSUP or not self.left):
                started = self._start_sdnsup()  # adopts what a killed one left, if any
                self.left = True
            if state != SDNSUP and self.sdnsup is not None:
                # sdnsup's kernel state without the daemon: its CPU is not in the figures,
                # and it cannot heal the experiment's changes away
                self.sdnsup.kill()
                self.sdnsup.wait()
                self.sdnsup = None
            if state == UNMARKED and not self.unmarked:
                chain = ("chain", "inet", "sdnsup", "mark_1")
                listing = lab.exec(lab.ns_a, "nft", "list", *chain).stdout
                rule = next(ln.strip() for ln in listing.splitlines() if "meta mark set" in ln)
                self.mark_chain = f"add rule inet sdnsup mark_1 {rule}\n"
                lab.exec(lab.ns_a, "nft", "flush", *chain)
                lab.exec(lab.ns_a, "ip", "rule", "add", *EXPERIMENT_RULE)
                self.unmarked = True
        else:
            if self.sdnsup is None and self.left:  # a killed sdnsup's state: as an operator
                lab.exec(lab.ns_a, sys.executable, "-m", "sdnsup.cli", "down")
            self.left = False
            self._stop_sdnsup()
            self._set_conntrack(state == CONNTRACK)
            lab.exec(lab.ns_a, "ip", "route", "replace", *self.route)
        return started

    def _set_conntrack(self, on: bool) -> None:
        if on != self.conntrack:
            ruleset = CONNTRACK_TABLE if on else "delete table inet benchct\n"
            self.lab.exec(self.lab.ns_a, "nft", "-f", "-", input=ruleset)
            self.conntrack = on

    def _start_sdnsup(self) -> tuple[float, float]:
        lab = self.lab
        t0 = time.monotonic()
        proc = lab.run_sdnsup(lab.ns_a, "-r", f"@{self.cidr_file}", "--ap", str(self.ap1.addr))
        self.sdnsup = proc

        def applied() -> bool:
            if proc.poll() is not None:
                raise BenchError(f"sdnsup exited {proc.returncode}:\n{lab.logs(proc)}")
            return "applied:" in lab.logs(proc)

        try:
            wait_for("sdnsup to apply 100k CIDRs", APPLY_TIMEOUT, applied, step=0.1)
            seconds = time.monotonic() - t0
            busy = wait_idle(proc.pid)
        except WaitTimeout as exc:
            raise BenchError(f"sdnsup: {exc}:\n{lab.logs(proc)}") from None
        routes = lab.exec(lab.ns_a, "ip", "-4", "route", "show", "table", "7300").stdout
        if routes.count("\n") != N_CIDRS:
            raise BenchError(f"table 7300 holds {routes.count(chr(10))} routes, not {N_CIDRS}")
        return seconds, busy

    def _stop_sdnsup(self) -> None:
        lab = self.lab
        proc, self.sdnsup = self.sdnsup, None
        if proc is not None:
            code = lab.stop(proc, grace=STOP_TIMEOUT)
            if code != 0:
                raise BenchError(f"sdnsup exited {code} on SIGTERM:\n{lab.logs(proc)}")
        tables = lab.exec(lab.ns_a, "nft", "list", "tables").stdout
        if "sdnsup" in tables or lab.exec(lab.ns_a, "ip", "rule", "show", "table", "7300").stdout:
            raise BenchError("sdnsup's state is still in the kernel after it stopped")

    def check_path(self, flow: Flow) -> None:
        seen = self.lab.whoami(flow.src_ns, flow.dst, WHOAMI_PORT)
        if seen != flow.seen:
            raise BenchError(f"{flow.label}: B saw {seen}, expected {flow.seen}")


def _tcp_open(lab: Lab, ns: str, addr: object, port: int) -> bool:
    code = f"import socket; socket.create_connection(({str(addr)!r}, {port}), 1).close()"
    return lab.exec(ns, sys.executable, "-c", code, check=False).returncode == 0


# --- iperf3 -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    tcp_gbps: float  # received by B
    udp_pps: float  # datagrams received by B per second


def iperf3(lab: Lab, flow: Flow, seconds: float, *args: str) -> dict[str, Any]:
    """One iperf3 client run in ``flow``'s source namespace; its JSON report."""
    argv = [
        "iperf3",
        "-c",
        flow.dst,
        "-p",
        str(IPERF_PORTS[flow.dst]),
        "-t",
        f"{seconds:g}",
        "-J",
        "--connect-timeout",
        "3000",
        *args,
    ]
    for _ in range(BUSY_RETRIES):
        proc = lab.exec(flow.src_ns, *argv, check=False, timeout=seconds + IPERF_SLACK)
        try:
            report: dict[str, Any] = json.loads(proc.stdout)
        except ValueError:
            raise BenchError(f"iperf3 {flow.label}: no JSON: {proc.stderr.strip()}") from None
        error = report.get("error")
        if error is None:
            return report
        if "busy" not in str(error):
            raise BenchError(f"iperf3 {flow.label}: {error}")
        time.sleep(1.0)
    raise BenchError(f"iperf3 {flow.label}: the server stayed busy")


def measure(lab: Lab, flow: Flow, seconds: float) -> Sample:
    tcp = iperf3(lab, flow, seconds)
    gbps = tcp["end"]["sum_received"]["bits_per_second"] / 1e9
    udp = iperf3(
        lab, flow, seconds, "-u", "-b", "0", "-l", str(UDP_PAYLOAD), "-w", UDP_SOCKET_BUFFER
    )
    got = udp["end"]["sum_received"]
    received = got["packets"] - got["lost_packets"]
    if received <= 0 or got["seconds"] <= 0:
        raise BenchError(f"iperf3 {flow.label}: no UDP datagram arrived")
    return Sample(gbps, received / got["seconds"])


# --- runs -------------------------------------------------------------------------------------

Results = dict[str, dict[int, Sample]]  # state -> run -> sample


@dataclass
class Runs:
    results: dict[str, Results]  # flow key -> ...
    applied: list[float] = field(default_factory=list)  # sdnsup start -> 100k CIDRs applied
    busy: list[float] = field(default_factory=list)  # applied -> sdnsup idle
    cpu: list[float] = field(default_factory=list)  # sdnsup's share of a CPU while measured
    errors: list[str] = field(default_factory=list)


def run_all(bench: Bench, flows: list[Flow], runs: int, seconds: float) -> Runs:
    out = Runs({f.key: {s: {} for s in STATES} for f in flows})
    for run in range(runs):
        order = STATES if run % 2 == 0 else STATES[::-1]
        print(f"run {run + 1}/{runs} ({', '.join(order)})...", file=sys.stderr, flush=True)
        for state in order:
            try:
                started = bench.enter(state)
            except (BenchError, LabError, subprocess.SubprocessError) as exc:
                out.errors.append(f"run {run + 1}: switching to {state}: {exc}")
                continue
            if started is not None:
                out.applied.append(started[0])
                out.busy.append(started[1])
            proc = bench.sdnsup
            t0, cpu0 = time.monotonic(), cpu_seconds(proc.pid) if proc else 0.0
            for flow in flows:
                try:
                    bench.check_path(flow)
                    out.results[flow.key][state][run] = measure(bench.lab, flow, seconds)
                except (BenchError, LabError, subprocess.SubprocessError) as exc:
                    out.errors.append(f"run {run + 1}, {state}, {flow.label}: {exc}")
            if proc is not None and proc.poll() is None:
                out.cpu.append((cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0))
    try:
        bench.enter(BARE)
    except (BenchError, LabError, subprocess.SubprocessError) as exc:
        out.errors.append(f"stopping sdnsup at the end: {exc}")
    return out


# --- figures and tables -----------------------------------------------------------------------


def paired(results: Results, figure: str, a: str, b: str) -> tuple[Stat, Stat] | None:
    """``figure`` in states ``a`` and ``b`` over the runs where both were measured."""
    runs = sorted(set(results[a]) & set(results[b]))
    if not runs:
        return None
    first = stat(getattr(results[a][r], figure) for r in runs)
    second = stat(getattr(results[b][r], figure) for r in runs)
    return first, second


def verdict(r: Stat) -> str:
    return f">= {TARGET_RATIO:.0%}" + ("" if r.median >= TARGET_RATIO else "  MISSED")


def pct(r: Stat) -> str:
    return f"{r.median:.1%} ({r.min:.1%}-{r.max:.1%})"


def report(flows: list[Flow], runs: Runs, n_runs: int, seconds: float) -> dict[str, Any]:
    rows: list[list[str]] = []
    cost_rows: list[list[str]] = []
    figures: dict[str, Any] = {}
    tests = (
        ("tcp_gbps", "TCP, 1 stream", "Gbit/s", 1.0, 2),
        ("udp_pps", f"UDP {UDP_PAYLOAD} B", "kpps", 1e-3, 0),
    )
    for flow in flows:
        results = runs.results[flow.key]
        fig: dict[str, Any] = {"label": flow.label}
        for figure, name, unit, scale, digits in tests:
            got = {
                s: stat(getattr(v, figure) for v in results[s].values())
                for s in STATES
                if results[s]
            }
            vs_bare = paired(results, figure, BARE, SDNSUP)
            vs_ct = paired(results, figure, CONNTRACK, SDNSUP)
            ex_ct = paired(results, figure, RULESET, UNMARKED)
            r_bare = ratio(vs_bare[1], vs_bare[0]) if vs_bare else None
            r_ct = ratio(vs_ct[1], vs_ct[0]) if vs_ct else None
            r_ex = ratio(ex_ct[1], ex_ct[0]) if ex_ct else None
            shown = [
                stat(v * scale for v in got[s].values).fmt(unit, digits) if s in got else "-"
                for s in STATES
            ]
            rows.append(
                [
                    flow.label,
                    name,
                    *shown,
                    pct(r_bare) if r_bare else "-",
                    pct(r_ct) if r_ct else "-",
                    pct(r_ex) if r_ex else "-",
                    verdict(r_bare) if r_bare else "",
                ]
            )
            fig[figure] = {
                "unit": unit,
                **got,
                "ratio_sdnsup_to_bare": r_bare,
                "ratio_sdnsup_to_conntrack": r_ct,
                "ratio_experiment_to_ruleset": r_ex,
            }
        per_packet = {
            s: stat(1e9 / v.udp_pps for v in results[s].values()) for s in STATES if results[s]
        }
        added: dict[str, Stat] = {}
        for key, base, state in (
            (BARE, BARE, SDNSUP),
            (CONNTRACK, CONNTRACK, SDNSUP),
            (RULESET, CONNTRACK, RULESET),
            (UNMARKED, CONNTRACK, UNMARKED),
        ):
            pair = paired(results, "udp_pps", base, state)
            if pair:
                ns_base, ns_with = (stat(1e9 / v for v in p.values) for p in pair)
                added[key] = stat(
                    w - b for b, w in zip(ns_base.values, ns_with.values, strict=True)
                )
        cost_rows.append(
            [
                flow.label,
                *(per_packet[s].fmt("ns", 0) if s in per_packet else "-" for s in STATES),
                *(
                    added[b].fmt("ns", 0) if b in added else "-"
                    for b in (BARE, CONNTRACK, RULESET, UNMARKED)
                ),
            ]
        )
        fig["udp_ns_per_packet"] = {**per_packet, **{f"added_vs_{b}": s for b, s in added.items()}}
        figures[flow.key] = fig
    heads = [STATE_LABELS[s] for s in STATES]
    print_table(
        f"datapath: sdnsup's ruleset + {N_CIDRS:,} CIDRs vs none, same path "
        f"({n_runs} runs x {seconds:g} s per iperf3 test; median (min-max))",
        [
            "flow",
            "test",
            *heads,
            "sdnsup/bare",
            "sdnsup/conntrack",
            "experiment/ruleset",
            "target (vs bare)",
        ],
        rows,
    )
    print_table(
        "datapath: time per packet, UDP at full speed (1 / datagrams per second received)",
        [
            "flow",
            *heads,
            "sdnsup: added vs bare",
            "added vs conntrack",
            "ruleset: added vs conntrack",
            "experiment: added vs conntrack",
        ],
        cost_rows,
    )
    return figures


def report_sdnsup(runs: Runs, figures: dict[str, Any]) -> None:
    """The sdnsup process around the measurements: start-up, busy time, CPU while measured."""
    rows = []
    for key, label, values, unit in (
        ("start_to_applied", f"start -> {N_CIDRS:,} CIDRs applied", runs.applied, "ms"),
        ("applied_to_idle", "applied -> idle (measurements wait for this)", runs.busy, "ms"),
        ("cpu_while_measured", "its CPU while the datapath was measured", runs.cpu, "%"),
    ):
        if values:
            st = stat(v * 100 for v in values) if unit == "%" else stat(values)
            rows.append([label, st.fmt(unit, 1 if unit == "%" else 0)])
            figures[f"sdnsup_{key}"] = st
    if rows:
        print_table("datapath: the sdnsup process (median (min-max))", ["", "sdnsup"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=positive_int, default=5, help="repeated runs (default 5)")
    parser.add_argument(
        "--seconds",
        type=float,
        default=3.0,
        help="duration of each iperf3 test (default 3, at most 10)",
    )
    parser.add_argument(
        "--forwarded", action="store_true", help="also measure flows from a container C behind A"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= 10:
        parser.error("--seconds must be between 1 and 10")
    if (code := no_lab_exit()) is not None:
        return code
    if shutil.which("iperf3") is None:
        print("FAILED: iperf3 is not installed (scripts/bench installs it)", file=sys.stderr)
        return 1
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sources = ["a", "c"] if args.forwarded else ["a"]
    errors: list[str] = []
    figures: dict[str, Any] = {}
    try:
        with Lab.create(n_aps=1, container=args.forwarded) as lab:
            assert lab.tmpdir is not None
            cidr_file = write_cidr_file(lab.tmpdir / "cidrs.txt", N_CIDRS, STEERED_NET)
            bench = Bench(lab, cidr_file)
            bench.setup()
            flows = bench.flows(sources)
            print(
                f"lab: A, R, B, AP1; sdnsup -r @FILE ({N_CIDRS:,} CIDRs: {STEERED_NET} and "
                f"scattered /24s) --ap {bench.ap1.addr}; iperf3 servers in B; bare and "
                f"conntrack states: route {STEERED_NET} via AP1 in A's main table"
            )
            runs = run_all(bench, flows, args.runs, args.seconds)
            errors = runs.errors
            figures = report(flows, runs, args.runs, args.seconds)
            report_sdnsup(runs, figures)
    except (BenchError, LabError, subprocess.SubprocessError) as exc:
        errors.append(f"lab: {exc}")
    figures["settings"] = {
        "cidrs": N_CIDRS,
        "runs": args.runs,
        "seconds": args.seconds,
        "udp_payload": UDP_PAYLOAD,
        "sources": sources,
        "target_ratio": TARGET_RATIO,
    }
    figures["errors"] = errors
    write_json("datapath", figures)
    for err in errors:
        print(f"FAILED {err}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
