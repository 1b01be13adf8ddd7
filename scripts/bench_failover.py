"""``scripts/bench failover``: the dark window when the active AP dies, with real packets.

Everything runs in one lab of network namespaces (:class:`sdnsup.lab.Lab`: client A, router
R, host B, three APs whose agents answer probes after 5, 40 and 80 ms), removed at the end,
also on failure; nothing in the host's namespace changes. The lab is reused from run to run:
each run starts a fresh sdnsup (so no hold-down or ranking carries over), cuts AP1's link,
and afterwards stops sdnsup (which must leave nothing behind; checked) and brings AP1's link
back. Two settings are measured, ``--runs`` times each (default 20):

- default: sdnsup's defaults (keepalive every 0.2 s, 0.2 s deadline, 3 misses);
- aggressive: the most aggressive keepalive sdnsup accepts (``defaults.MIN_INTERVAL``,
  ``MIN_TIMEOUT``, ``MIN_MISSES``; the config validators refuse anything shorter).

Traffic: a UDP echo server in B answers every datagram with the source address it saw; a
client in A opens a NEW socket every SEND_INTERVAL (a new source port, so a new conntrack
entry, which is what sdnsup steers) and records each reply. The client starts once sdnsup
is connected and stops before sdnsup does, so every conntrack entry it creates is steered
(a reused source port then finds a steered entry; a reply that nevertheless went around
the overlay is counted as "unsteered" and never closes a dark window).

Two long-lived TCP sessions to B are also open through AP1 when it is cut, as an application
sees it: one idle in a blocking ``recv()`` that reconnects (every 50 ms) once the ``recv()``
fails, one sending a line every 100 ms. Per run: when each session failed and how (sdnsup
aborts this host's sockets of a dead AP's connections: ECONNABORTED), and when the
reconnect succeeded through AP2.

Per run: dark window = the longest gap between consecutive replies through an AP, from the
last one before the cut on; and its breakdown: cut -> sdnsup's verdict (its "failover:" log
line: detection), verdict -> AP2's nexthop in A's kernel (``ip -ts monitor``: apply),
nexthop -> first reply through AP2 (routing, conntrack, one send interval); sdnsup runs
with ``--log-level debug``, which adds its own apply duration (the rest of the apply step
is handing the new state to its applier task and worker thread) and every keepalive miss
that did not reach a verdict. False failovers:
any AP change in sdnsup's log other than the one the cut caused, while it ran (counted for
both settings, over the time each was watched; ``--stress N`` adds N CPU-bound loops in A,
to see whether a busy host makes the aggressive keepalive flap). A PNG shows one
representative run (the median dark window) of each setting: replies per 10 ms bin by the
AP that carried them.

All stamps are the same machine's ``time.time()``. ``ip -ts monitor`` stamps an event when
it reads it, so on a busy machine the nexthop stamp can lag by a few ms (a reply through AP2
may even seem to precede it); "verdict -> first reply via AP2" does not depend on it. The
cut is the link-down event in AP1's namespace (``ip -ts monitor link`` there).

Figures only: targets are printed next to them, never asserted. A run that fails (a busy
machine can stall a helper past its deadline) is reported as FAILED with the reason and taken
again, a bounded number of times; the exit status is 1 only when fewer than ``--runs`` runs
could be measured, 77 when no lab can be built here.

The lab helpers of the first part are shared with ``bench_converge`` and ``bench_heal``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import benchlib

from sdnsup import defaults
from sdnsup.lab import Lab, WaitTimeout
from sdnsup.lab import wait_for as lab_wait_for
from sdnsup.lab.commands import LabError
from sdnsup.lab.measure import owns
from sdnsup.lab.services import Ticker, lab_script
from sdnsup.routes import RTPROT_SDNSUP

# --- the lab, shared with bench_converge and bench_heal --------------------------------------

DELAYS = {1: 0.005, 2: 0.040, 3: 0.080}  # AP index -> probe answer delay of its agent
CIDRS = "10.10.10.0/24,fd10:10:10::/64"  # B's subnet (the overlay), both families
ECHO_PORT = 9000
# One new flow every 5 ms: the dark window is known to within 5 ms, and 200 sockets/s stay
# far below the ephemeral port range over the 30 s a UDP conntrack entry lives.
SEND_INTERVAL = 0.005
SOCKET_LIFETIME = 1.0  # a client socket waits this long for its reply, then closes
CC_PORT = 8000

# Bounds: nothing here waits longer than these for anything.
READY_TIMEOUT = 5.0
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

LAB_ERRORS = (LabError, subprocess.SubprocessError, OSError)
T = TypeVar("T")

# B: answer each datagram with what it carried, the source address seen and B's clock.
ECHO_SERVER = """
import json, socket, sys, time
port, until = int(sys.argv[1]), time.time() + float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", port))
s.settimeout(0.5)
print("ready", flush=True)
while time.time() < until:
    try:
        data, addr = s.recvfrom(2048)
    except TimeoutError:
        continue
    now = time.time()
    try:
        msg = json.loads(data)
    except ValueError:
        continue
    msg.update(b=now, seen=addr[0])
    s.sendto(json.dumps(msg).encode(), addr)
"""

# A: a new socket (new source port, new conntrack entry) every interval; one JSON line per
# reply: seq, sent (A), b (B's receive stamp), seen (source address B saw), recv (A).
ECHO_CLIENT = """
import json, selectors, socket, sys, time
host, port, interval, life, until = sys.argv[1], int(sys.argv[2]), *map(float, sys.argv[3:6])
until += time.time()
sel = selectors.DefaultSelector()
opened = []
seq = 0
next_send = time.time()
while time.time() < until:
    now = time.time()
    if now >= next_send:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        try:
            s.sendto(json.dumps({"seq": seq, "sent": now}).encode(), (host, port))
        except OSError:
            pass
        sel.register(s, selectors.EVENT_READ)
        opened.append((now, s))
        seq += 1
        next_send += interval
        if next_send < now:
            next_send = now + interval
    for key, _ in sel.select(max(0.0, next_send - time.time())):
        try:
            data = key.fileobj.recv(2048)
        except OSError:
            continue
        msg = json.loads(data)
        msg["recv"] = time.time()
        print(json.dumps(msg), flush=True)
    while opened and opened[0][0] < time.time() - life:
        sel.unregister(opened[0][1])
        opened.pop(0)[1].close()
"""


class BenchError(Exception):
    """One measurement of one run failed; the other runs still count."""


def wait_for(what: str, timeout: float, predicate: Callable[[], Any], step: float = 0.01) -> Any:
    """:func:`sdnsup.lab.wait_for`, failing as a BenchError (a measurement not taken)."""
    try:
        return lab_wait_for(what, timeout, predicate, step)
    except WaitTimeout as exc:
        raise BenchError(str(exc)) from None


def python(code: str, *args: object) -> list[str]:
    """argv running ``code`` with this interpreter (stdlib only: starts in ~20 ms)."""
    return [sys.executable, "-c", code, *(str(a) for a in args)]


def json_lines(lab: Lab, proc: subprocess.Popen[bytes]) -> list[dict[str, Any]]:
    """The JSON lines a lab process printed so far (a line being written is skipped)."""
    out = []
    for line in lab.logs(proc).splitlines():
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict):
                out.append(obj)
    return out


MONITOR_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)\] (.*)$")


def monitor_events(text: str) -> list[tuple[float, str]]:
    """``ip -ts monitor`` output (local time, microseconds) -> (epoch seconds, first line of
    each event)."""
    events = []
    for line in text.splitlines():
        m = MONITOR_STAMP.match(line)
        if m:
            events.append((datetime.fromisoformat(m.group(1)).timestamp(), m.group(2)))
    return events


def start_monitor(lab: Lab, *objects: str, ns: str | None = None) -> subprocess.Popen[bytes]:
    """``ip -ts monitor OBJECTS`` in A (or ``ns``). It subscribes before its first read; the
    short sleep is slack for its start-up, so that the event that follows is not missed."""
    ns = ns or lab.ns_a
    label = f"{ns.removeprefix(lab.prefix)}-monitor"
    proc = lab.popen(ns, "ip", "-ts", "monitor", *objects, label=label)
    time.sleep(0.15)
    return proc


def link_is_up(event: str, ifname: str) -> bool | None:
    """For a link event of ``ifname`` (``2: eth0@if4: <...,UP,...>``) whether it is
    administratively up; None for any other event."""
    m = re.match(rf"\d+: {re.escape(ifname)}(?:@\S+)?: <([^>]*)>", event)
    return None if m is None else "UP" in m.group(1).split(",")


LOG_STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d{4}) ")


def log_records(lab: Lab, proc: subprocess.Popen[bytes], pattern: str) -> list[tuple[float, str]]:
    """sdnsup's text log lines matching ``pattern``, with their time (epoch seconds). The log
    writes milliseconds, truncated: half a millisecond is added to centre the error."""
    out = []
    for line in lab.logs(proc).splitlines():
        m = LOG_STAMP.match(line)
        if m and re.search(pattern, line):
            stamp = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
            out.append((stamp + 0.0005, line))
    return out


def lab_with_cc(lab: Lab) -> str:
    """Start the AP agents (DELAYS), the lab CC listing every AP and a whoami server in B (for
    the long-lived sessions); the CC's URL."""
    lab.start_ap_agents(DELAYS)
    url = lab.start_cc(port=CC_PORT)
    lab.set_cc()
    lab.serve_whoami(lab.ns_b)
    return url


def overlay(lab: Lab, i: int) -> str:
    """The address B sees for traffic through AP ``i``."""
    return str(lab.ap(i).overlay_addr)


def start_sdnsup(lab: Lab, url: str, *extra: str) -> tuple[subprocess.Popen[bytes], float]:
    """Launch sdnsup in A steering CIDRS via the lab CC; the process and its launch time."""
    launched = time.time()
    return lab.run_sdnsup(lab.ns_a, "-r", CIDRS, "--cc", url, *extra), launched


def stop_sdnsup(lab: Lab, proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM; sdnsup must tear down and exit 0 on its own."""
    code = lab.stop(proc, grace=STOP_TIMEOUT)
    if code != 0:
        raise BenchError(f"sdnsup exited {code} on SIGTERM:\n{lab.logs(proc)[-3000:]}")


def alive(lab: Lab, proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        raise BenchError(f"sdnsup exited {proc.returncode}:\n{lab.logs(proc)[-3000:]}")


def wait_ranking(lab: Lab, proc: subprocess.Popen[bytes]) -> None:
    """Wait for sdnsup's first full probe ranking (the failover order) and its first apply
    (on a busy machine the ranking can come first): from then on new flows are steered."""

    def ready() -> bool:
        alive(lab, proc)
        logs = lab.logs(proc)
        return "probe ranking" in logs and "applied:" in logs

    wait_for("sdnsup's probe ranking and first apply", START_TIMEOUT, ready)


def echo_server(lab: Lab, seconds: float, port: int = ECHO_PORT) -> subprocess.Popen[bytes]:
    """The echo server in B, running at most ``seconds``."""
    server = lab.popen(lab.ns_b, *python(ECHO_SERVER, port, seconds), label=f"b-echo-{port}")
    wait_for("the echo server in B", READY_TIMEOUT, lambda: "ready" in lab.logs(server))
    return server


def echo_client(lab: Lab, seconds: float, port: int = ECHO_PORT) -> subprocess.Popen[bytes]:
    """The client in A, sending for at most ``seconds``; returned once replies come back."""
    argv = python(ECHO_CLIENT, lab.b_addr, port, SEND_INTERVAL, SOCKET_LIFETIME, seconds)
    client = lab.popen(lab.ns_a, *argv, label=f"a-echo-{port}")
    wait_for("replies to the client in A", READY_TIMEOUT, lambda: json_lines(lab, client))
    return client


Obj = tuple[str, str, str]  # ("nexthop", id, via), ("route", dst, via), ("rule", family, pref)


def sdnsup_objects(lab: Lab) -> set[Obj]:
    """sdnsup's nexthops, routes and policy rules in A, as comparable tuples."""

    def js(*argv: str) -> list[dict[str, Any]]:
        out = lab.exec(lab.ns_a, "ip", "-j", *argv).stdout.strip()
        return json.loads(out) if out else []

    objs = {
        ("nexthop", str(n["id"]), n.get("gateway", "none"))
        for n in js("nexthop", "show")
        if owns(n)
    }
    for fam in ("-4", "-6"):
        routes = js(fam, "route", "show", "table", "all", "proto", str(RTPROT_SDNSUP))
        objs |= {("route", r["dst"], r.get("gateway", "none")) for r in routes}
        rules = js(fam, "rule", "show")
        objs |= {("rule", fam, str(r["priority"])) for r in rules if owns(r)}
    return objs


def nft_table(lab: Lab) -> Any:
    """sdnsup's nftables table in A as JSON without handles (comparable); None if absent."""
    out = lab.exec(lab.ns_a, "nft", "-j", "list", "table", "inet", "sdnsup", check=False)
    if out.returncode != 0:
        return None

    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k != "handle"}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return strip([o for o in json.loads(out.stdout)["nftables"] if "metainfo" not in o])


def attempts(runs: int) -> int:
    """How many tries ``runs`` good runs may take: on a busy machine a run fails now and then
    (a stalled process misses a deadline of the harness), and is taken again."""
    return runs + max(2, runs // 4)


def repeat(runs: int, once: Callable[[], T], errors: list[str]) -> list[T]:
    """``once()`` until it succeeded ``runs`` times or :func:`attempts` ran out; each failure
    (a BenchError or a lab error) is appended to ``errors``."""
    done: list[T] = []
    for attempt in range(1, attempts(runs) + 1):
        if len(done) >= runs:
            break
        print(f"run {len(done) + 1}/{runs}...", file=sys.stderr, flush=True)
        try:
            done.append(once())
        except (BenchError, *LAB_ERRORS) as exc:
            errors.append(f"attempt {attempt}: {exc}")
    return done


def ms(seconds: float | None, digits: int = 1) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.{digits}f} ms"


def stat_row(label: str, values: Sequence[float | None], target: str = "") -> list[str]:
    """A table row: p50, min, max and n of a figure (seconds shown in ms), then its target."""
    vals = [v for v in values if v is not None]
    if not vals:
        return [label, "-", "-", "-", "0", target]
    s = benchlib.stat(vals)
    return [label, ms(s.median), ms(s.min), ms(s.max), str(s.n), target]


STAT_HEAD = ("measurement", "p50", "min", "max", "n", "target")


def maybe_stat(values: Sequence[float | None]) -> benchlib.Stat | None:
    vals = [v for v in values if v is not None]
    return benchlib.stat(vals) if vals else None


# --- failover -------------------------------------------------------------------------------

BIN = 0.010  # the plot's bins: replies per 10 ms (two send intervals)
AFTER_SWITCH = 0.3  # traffic recorded after the first reply through AP2 (and in the plot)
DARK_TARGET = {"default": 1.0, "aggressive": 0.3}
# AP changes in sdnsup's log; only the one failover of AP1 after the cut is expected.
AP_CHANGE = r"failover: |switched to (faster )?AP|is no longer listed|no AP answers"
# At debug level sdnsup logs the duration of every apply ("applied: ... in 2.1 ms]") and each
# keepalive miss that did not reach the verdict ("answered again after 1 missed probes"):
# the apply's own share of the failover, and how close the keepalive came to a false one.
DEBUG_LOG = ("--log-level", "debug")
APPLIED = re.compile(r"applied: .* in ([\d.]+) ms\]$")
NEAR_MISS = re.compile(r"answered again after (\d+) missed probes")


@dataclass(frozen=True)
class Setting:
    """One keepalive setting: its name, the flags it takes, and its timers."""

    name: str
    interval: float
    timeout: float
    misses: int
    explicit: bool = True  # False: no flags at all (sdnsup's own defaults)

    @property
    def args(self) -> tuple[str, ...]:
        """The keepalive flags (none for sdnsup's defaults)."""
        if not self.explicit:
            return ()
        return (
            "--keepalive-interval", f"{self.interval:g}",
            "--keepalive-timeout", f"{self.timeout:g}",
            "--keepalive-misses", str(self.misses),
        )  # fmt: skip

    def verdict_after_failure(self) -> tuple[float, float]:
        """When the verdict comes after the AP fails (see sdnsup.keepalive): the missed
        probes run back to back, each lasting the deadline; the first starts up to one
        interval after the failure."""
        first = (self.misses - 1) * max(self.interval, self.timeout) + self.timeout
        return first, first + self.interval

    def describe(self) -> str:
        lo, hi = self.verdict_after_failure()
        return (
            f"{self.name}: keepalive every {self.interval:g} s, deadline {self.timeout:g} s,"
            f" dead after {self.misses} misses -> verdict {lo * 1000:.0f}-{hi * 1000:.0f} ms"
            " after the AP fails"
        )


SETTINGS = {
    "default": Setting(
        "default", defaults.KEEPALIVE_INTERVAL, defaults.KEEPALIVE_TIMEOUT,
        defaults.KEEPALIVE_MISSES, explicit=False,
    ),
    "aggressive": Setting(
        "aggressive", defaults.MIN_INTERVAL, defaults.MIN_TIMEOUT, defaults.MIN_MISSES
    ),
}  # fmt: skip


@dataclass
class Run:
    """One failover: figures in seconds, from the cut unless said otherwise."""

    setting: str
    dark: float  # longest gap between replies through an AP
    dark_start: float  # the last reply through AP1 before the dark window (from the cut)
    verdict: float  # sdnsup's "failover:" log line
    switch: float | None  # AP2's IPv4 nexthop in A's kernel
    first_next: float  # the first reply through AP2
    logged_detection: float  # what sdnsup logged: from AP1's last answer to the verdict
    unsteered: int  # replies that did not go through an AP (should be 0)
    timeline: list[tuple[float, str]]  # (recv - cut, "ap1" | "ap2" | "other") per reply
    apply_took: float | None  # the switch's apply in sdnsup, as sdnsup measured it
    false_failovers: list[str] = field(default_factory=list)  # other AP changes
    watched: float = 0.0  # seconds sdnsup ran with an AP, outside the expected failover
    near_misses: int = 0  # keepalive probes missed without a verdict (fewer than K in a row)
    # A session pinned to AP1, idle in a blocking recv(): when that recv() failed, and when
    # the application's reconnect (every 50 ms) succeeded; and a session talking all along
    # (a line every 100 ms): when it failed. Errors as errno names (ECONNABORTED...).
    idle_error: float | None = None
    reconnected: float | None = None
    talking_error: float | None = None
    session_errors: list[str] = field(default_factory=list)


def ap_of(lab: Lab, seen: str) -> str:
    for ap in lab.aps:
        if seen == str(ap.overlay_addr):
            return f"ap{ap.index}"
    return "other"


def restore_ap1(lab: Lab) -> None:
    """AP1's link up, and its agent answering from A again (the cut lasts one run)."""
    lab.ap_link_up(1)
    argv = lab_script("apagent", "check", str(lab.ap(1).addr), "--timeout", str(READY_TIMEOUT))
    result = lab.exec(lab.ns_a, *argv, check=False, timeout=READY_TIMEOUT + 10)
    if result.returncode != 0:
        raise BenchError(f"AP1 does not answer after its link came back: {result.stderr}")


class FalseFailover(BenchError):
    """sdnsup changed AP while no AP had died, which spoilt the run's measurement."""

    def __init__(self, lines: list[str], cause: BenchError) -> None:
        super().__init__(f"false failover ({cause}): " + " | ".join(lines))
        self.lines = lines


def failover_run(lab: Lab, url: str, setting: Setting, idle: float) -> Run:
    """One run: fresh sdnsup on AP1, ``idle`` seconds of steady traffic, AP1's link cut."""
    ap1, ap2 = overlay(lab, 1), overlay(lab, 2)
    _, hi = setting.verdict_after_failure()
    budget = START_TIMEOUT + idle + hi + 5.0  # bounds the helper processes of this run
    server = echo_server(lab, budget)
    monitor = start_monitor(lab, "nexthop")
    ap1_monitor = start_monitor(lab, "link", ns=lab.ap(1).ns)
    proc, launched = start_sdnsup(lab, url, *setting.args, *DEBUG_LOG)
    client = None
    issued = cut = None
    issued_mono = 0.0
    sessions: tuple[Ticker, ...] = ()
    failure = None
    try:
        wait_ranking(lab, proc)
        client = echo_client(lab, budget)

        def via_ap1() -> bool:
            alive(lab, proc)
            return any(r["seen"] == ap1 for r in json_lines(lab, client))

        wait_for("replies through AP1", READY_TIMEOUT, via_ap1)
        idle_session = lab.open_ticker(lab.ns_a, lab.b_addr, idle=True)
        talking = lab.open_ticker(lab.ns_a, lab.b_addr)
        sessions = (idle_session, talking)
        # Steady traffic, sdnsup idle: false failovers would show here. Then a random phase,
        # or the cut would hit the same point of the keepalive cycle in every run.
        time.sleep(idle + random.uniform(0, setting.interval))
        issued, issued_mono = time.time(), time.monotonic()
        lab.ap_link_down(1)
        cut = time.time()

        def through_ap2() -> float | None:
            alive(lab, proc)
            got = [r["recv"] for r in json_lines(lab, client) if r["seen"] == ap2]
            return got[0] if got else None

        first = wait_for("a reply through AP2 after the cut", hi + 3.0, through_ap2)
        time.sleep(max(0.0, first + AFTER_SWITCH - time.time()))
        idle_session.wait_for("reopen", hi + 3.0)
        talking.wait_for("error", 1.0)
    except BenchError as exc:
        failure = exc
    finally:
        # The client stops first: no flow of this run outlives the steering (see docstring).
        if client is not None:
            lab.stop(client, grace=1.0)
        session_reports = [t.stop(timeout=1.0) for t in sessions] if sessions else []
        stopped = time.time()
        stop_sdnsup(lab, proc)
        lab.stop(server, grace=1.0)
        lab.stop(monitor, grace=1.0)
        lab.stop(ap1_monitor, grace=1.0)
        if issued is not None:
            restore_ap1(lab)
            # The moment the link went down in AP1's kernel; the return of `ip link set`
            # comes a few ms later, the process start before it even more.
            uplink = lab.ap(1).uplink_ifname
            cut = next(
                (
                    t
                    for t, e in monitor_events(lab.logs(ap1_monitor))
                    if t >= issued and link_is_up(e, uplink) is False
                ),
                cut,
            )
    left = sdnsup_objects(lab)
    if left or nft_table(lab) is not None:
        raise BenchError(f"sdnsup left state behind after SIGTERM: {sorted(left)}")
    changes = log_records(lab, proc, AP_CHANGE)
    expected = next(
        (
            (t, ln)
            for t, ln in changes
            if cut is not None and t >= cut and "failover: AP ap1 " in ln and "via ap2" in ln
        ),
        None,
    )
    false = [ln for t, ln in changes if (t, ln) != expected]

    def measured() -> Run:
        if failure is not None:
            raise failure
        return analyse(lab, setting, client, monitor, cut, expected, changes)

    try:
        run = measured()
    except BenchError as exc:
        if false:
            raise FalseFailover(false, exc) from exc
        raise
    assert expected is not None and cut is not None  # else analyse() raised
    chosen = log_records(lab, proc, r"AP chosen: ")
    began = chosen[0][0] if chosen else launched
    applied = [
        (t, float(m.group(1)) / 1000)
        for t, ln in log_records(lab, proc, APPLIED.pattern)
        if t >= expected[0] and (m := APPLIED.search(ln))
    ]
    if applied:  # the first apply after the verdict
        run.apply_took = applied[0][1]
    run.near_misses = sum(
        int(m.group(1))
        for _, ln in log_records(lab, proc, NEAR_MISS.pattern)
        if (m := NEAR_MISS.search(ln))
    )
    run.false_failovers = false
    # the dark window itself is not "watched": there an AP change is expected
    run.watched = max(0.0, stopped - began - run.verdict)
    if session_reports:
        # The sessions stamp with time.monotonic(): the cut on that clock.
        cut_mono = issued_mono + (cut - issued)
        idle_report, talking_report = session_reports
        if idle_report.errors:
            run.idle_error = idle_report.errors[0]["t"] - cut_mono
        if idle_report.reopened_at is not None:
            run.reconnected = idle_report.reopened_at - cut_mono
        if talking_report.errors:
            run.talking_error = talking_report.errors[0]["t"] - cut_mono
        run.session_errors = [e["err"] for r in session_reports for e in r.errors]
    return run


def analyse(
    lab: Lab,
    setting: Setting,
    client: subprocess.Popen[bytes] | None,
    monitor: subprocess.Popen[bytes],
    cut: float | None,
    expected: tuple[float, str] | None,
    changes: list[tuple[float, str]],
) -> Run:
    """The figures of one run from the client's replies, the monitor and sdnsup's verdict."""
    if expected is None:
        lines = "\n".join(ln for _, ln in changes) or "(no AP change logged)"
        raise BenchError(f"no 'failover: AP ap1 ... now via ap2' after the cut:\n{lines}")
    assert client is not None and cut is not None  # set whenever the run got this far
    ap1, ap2 = overlay(lab, 1), overlay(lab, 2)
    got = sorted(json_lines(lab, client), key=lambda r: r["recv"])
    steered = [r for r in got if r["seen"] in (ap1, ap2)]
    before = [r for r in steered if r["recv"] < cut]
    if not before or before[-1]["seen"] != ap1:
        raise BenchError("traffic was not going through AP1 before the cut")
    window = [before[-1], *(r for r in steered if r["recv"] >= cut)]
    gaps = [(b["recv"] - a["recv"], a) for a, b in itertools.pairwise(window)]
    dark, start = max(gaps, key=lambda g: g[0])
    first_next = next(r for r in window if r["seen"] == ap2)
    verdict, line = expected
    detected = re.search(r"detected (\d+) ms", line)
    if detected is None:
        raise BenchError(f"no detection time in: {line}")
    via = re.escape(str(lab.ap(2).addr))
    switch = next(
        (
            t
            for t, e in monitor_events(lab.logs(monitor))
            if t >= cut and re.match(rf"id \d+ via {via} ", e)
        ),
        None,
    )
    return Run(
        setting=setting.name,
        dark=dark,
        dark_start=start["recv"] - cut,
        verdict=verdict - cut,
        switch=None if switch is None else switch - cut,
        first_next=first_next["recv"] - cut,
        logged_detection=float(detected.group(1)) / 1000,
        unsteered=len(got) - len(steered),
        timeline=[(r["recv"] - cut, ap_of(lab, r["seen"])) for r in got],
        apply_took=None,
    )


# --- the plot -------------------------------------------------------------------------------

COLORS = {"ap1": "tab:blue", "ap2": "tab:orange", "ap3": "tab:green", "other": "tab:gray"}


def representative(runs: Sequence[Run]) -> Run:
    """The run whose dark window is the median (the lower one of an even count)."""
    ordered = sorted(runs, key=lambda r: r.dark)
    return ordered[(len(ordered) - 1) // 2]


def plot(chosen: dict[str, Run], path: Path) -> None:
    """Replies per BIN over time, stacked by AP, one panel per setting, cut and switch
    marked; written to ``path`` (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(chosen), 1, figsize=(11, 3.6 * len(chosen)), squeeze=False)
    for ax, (name, run) in zip(axes[:, 0], chosen.items(), strict=True):
        setting = SETTINGS[name]
        lo = -0.25
        hi = run.first_next + AFTER_SWITCH
        edges = [lo + i * BIN for i in range(int((hi - lo) / BIN) + 1)]
        bottom = [0] * (len(edges) - 1)
        for ap in ("ap1", "ap2", "ap3", "other"):
            counts = [0] * (len(edges) - 1)
            for t, who in run.timeline:
                if who == ap and lo <= t < edges[-1]:
                    counts[int((t - lo) / BIN)] += 1
            if any(counts):
                label = f"replies via {ap.upper()}" if ap != "other" else "not through an AP"
                left = [e * 1000 for e in edges[:-1]]
                ax.bar(left, counts, width=BIN * 1000, bottom=bottom, align="edge",
                       color=COLORS[ap], label=label)  # fmt: skip
                bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
        top = max(bottom, default=1) + 1
        ax.axvline(0, color="red", linestyle="--", linewidth=1.5)
        ax.text(2, top * 0.92, "AP1 link cut", color="red", fontsize=9)
        ax.axvline(run.verdict * 1000, color="black", linestyle=":", linewidth=1.5)
        ax.text(run.verdict * 1000 - 2, top * 0.80, "sdnsup: AP1 dead", fontsize=9, ha="right")
        if run.switch is not None:
            ax.axvline(run.switch * 1000, color="green", linestyle="-", linewidth=1.5)
            ax.text(run.switch * 1000 + 2, top * 0.68, "nexthop -> AP2", color="green", fontsize=9)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        dark_lo = run.dark_start * 1000
        ax.axvspan(dark_lo, dark_lo + run.dark * 1000, color="red", alpha=0.07)
        ax.set_ylim(0, top)
        ax.set_xlim(lo * 1000, hi * 1000)
        ax.set_xlabel("time since AP1's link was cut (ms)")
        ax.set_ylabel(f"replies per {BIN * 1000:.0f} ms")
        ax.set_title(
            f"{setting.describe()}\ndark window {run.dark * 1000:.0f} ms"
            f" (target < {DARK_TARGET[name] * 1000:.0f} ms); run with the median dark window",
            fontsize=10,
        )
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- runs, tables, JSON ---------------------------------------------------------------------


@dataclass
class Results:
    runs: dict[str, list[Run]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    # AP changes while no AP died in runs they spoilt (not in ``runs``), per setting
    spoilt: dict[str, list[str]] = field(default_factory=dict)


# A: one CPU-bound process (for --stress), ending on its own after argv[1] seconds.
BURNER = "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end: pass"


def measure(setting: Setting, runs: int, idle: float, stress: int, res: Results) -> None:
    """``runs`` failovers with ``setting``, in one lab; failed runs are retried a few times.
    With ``stress``, that many busy loops share A's CPUs meanwhile (false failovers?)."""
    done = res.runs.setdefault(setting.name, [])
    with Lab.create(n_aps=len(DELAYS)) as lab:
        url = lab_with_cc(lab)
        lifetime = attempts(runs) * (START_TIMEOUT + idle + 10.0)
        for i in range(stress):
            lab.popen(lab.ns_a, *python(BURNER, lifetime), label=f"a-burner{i}")
        for attempt in range(1, attempts(runs) + 1):
            if len(done) >= runs:
                break
            print(f"{setting.name} run {len(done) + 1}/{runs}...", file=sys.stderr, flush=True)
            try:
                done.append(failover_run(lab, url, setting, idle))
            except FalseFailover as exc:
                # A finding, not a broken measurement: counted, and the run is taken again.
                res.spoilt.setdefault(setting.name, []).extend(exc.lines)
                print(f"  {exc}", file=sys.stderr)
            except (BenchError, *LAB_ERRORS) as exc:
                res.errors.append(f"{setting.name} attempt {attempt}: {exc}")


def report(res: Results, runs: int, idle: float) -> dict[str, Any]:
    figures: dict[str, Any] = {"runs_requested": runs, "idle_seconds": idle, "settings": {}}
    for name, done in res.runs.items():
        setting = SETTINGS[name]
        lo, hi = setting.verdict_after_failure()
        target = f"< {DARK_TARGET[name] * 1000:.0f} ms"
        applies = [r.switch - r.verdict if r.switch is not None else None for r in done]
        after = [r.first_next - r.switch if r.switch is not None else None for r in done]
        rows = [
            stat_row("dark window (longest gap between replies via an AP)",
                     [r.dark for r in done], target),
            stat_row("  its last reply via AP1 -> the cut", [-r.dark_start for r in done],
                     f"< {SEND_INTERVAL * 1000:.0f} ms (one send interval)"),
            stat_row("  cut -> verdict (detection)", [r.verdict for r in done],
                     f"{lo * 1000:.0f}-{hi * 1000:.0f} ms (misses x deadline [+ interval])"),
            stat_row("  verdict -> AP2 nexthop in the kernel (apply)", applies, "a few ms"),
            stat_row("    of which the apply itself (sdnsup's own figure, both nexthops)",
                     [r.apply_took for r in done], "the rest: handing it to the applier"),
            stat_row("  nexthop -> first reply via AP2 (routing, conntrack)", after,
                     f"<= {SEND_INTERVAL * 1000:.0f} ms + RTT"),
            stat_row("  verdict -> first reply via AP2 (apply + the above)",
                     [r.first_next - r.verdict for r in done]),
            stat_row("detection as sdnsup logged it (from AP1's last answer)",
                     [r.logged_detection for r in done]),
            stat_row("session pinned to AP1, idle in recv(): cut -> recv() error",
                     [r.idle_error for r in done], "the verdict + ms (sockets aborted)"),
            stat_row("  cut -> its reconnect succeeded (through AP2)",
                     [r.reconnected for r in done], "the verdict + one RTT"),
            stat_row("session pinned to AP1, talking: cut -> its error",
                     [r.talking_error for r in done], "the verdict + ms"),
        ]  # fmt: skip
        benchlib.print_table(f"failover, {setting.describe()}", STAT_HEAD, rows)
        false = [ln for r in done for ln in r.false_failovers] + res.spoilt.get(name, [])
        watched = sum(r.watched for r in done)
        probes = watched / max(setting.interval, 1e-9)
        unsteered = sum(r.unsteered for r in done)
        dark = maybe_stat([r.dark for r in done])
        if dark is None:
            print("  no run succeeded")
        else:
            over = sum(v >= DARK_TARGET[name] for v in dark.values)
            print(
                f"  p50 {ms(dark.median)}, max {ms(dark.max)} over {dark.n} runs: "
                + (f"{target} in every run" if not over else f"MISSES {target} in {over} runs")
            )
        print(
            f"  false failovers (AP changes while no AP died): {len(false)} in {watched:.1f} s"
            f" watched (~{probes:.0f} keepalive probes)"
        )
        for ln in false[:5]:
            print(f"    {ln}")
        near = sum(r.near_misses for r in done)
        print(
            f"  keepalive probes missed without a verdict (fewer than {setting.misses} in a"
            f" row): {near}"
        )
        print(f"  replies that did not go through an AP: {unsteered} (expected 0)")
        kinds = sorted({e for r in done for e in r.session_errors})
        print(f"  what the pinned sessions saw: {', '.join(kinds) or 'nothing'}")
        figures["settings"][name] = {
            "keepalive": {
                "interval": setting.interval,
                "timeout": setting.timeout,
                "misses": setting.misses,
                "flags": list(setting.args),
            },
            "target_dark_window": DARK_TARGET[name],
            "expected_detection": [lo, hi],
            "dark_window": maybe_stat([r.dark for r in done]),
            "detection": maybe_stat([r.verdict for r in done]),
            "apply": maybe_stat(applies),
            "switch_to_first_reply": maybe_stat(after),
            "verdict_to_first_reply": maybe_stat([r.first_next - r.verdict for r in done]),
            "last_reply_before_cut": maybe_stat([-r.dark_start for r in done]),
            "logged_detection": maybe_stat([r.logged_detection for r in done]),
            "false_failovers": len(false),
            "false_failover_lines": false,
            "watched_seconds": watched,
            "near_misses": sum(r.near_misses for r in done),
            "apply_duration": maybe_stat([r.apply_took for r in done]),
            "unsteered_replies": unsteered,
            "idle_session_recv_error": maybe_stat([r.idle_error for r in done]),
            "idle_session_reconnected": maybe_stat([r.reconnected for r in done]),
            "talking_session_error": maybe_stat([r.talking_error for r in done]),
            "session_errors": sorted({e for r in done for e in r.session_errors}),
        }
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--runs", type=benchlib.positive_int, default=20, help="runs per setting (default 20)"
    )
    parser.add_argument(
        "--setting",
        action="append",
        choices=sorted(SETTINGS),
        help="measure only this setting (repeatable; default: both)",
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=2.0,
        help="seconds of steady traffic before each cut, watched for false failovers (default 2)",
    )
    parser.add_argument(
        "--stress",
        type=int,
        default=0,
        metavar="N",
        help="run N CPU-bound loops in A during the runs, to see whether a busy host causes"
        " false failovers (default 0)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.stress <= 16:
        parser.error("--stress must be between 0 and 16")
    if not 0 <= args.idle <= 60:
        parser.error("--idle must be between 0 and 60 seconds")
    if (code := benchlib.no_lab_exit()) is not None:
        return code
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    names = args.setting or ["default", "aggressive"]
    print(
        "sdnsup failover, AP1's link cut under traffic; sdnsup logs at debug level (its apply"
        " durations and keepalive misses); keepalive settings:"
    )
    for name in names:
        print(f"  {SETTINGS[name].describe()}  {' '.join(SETTINGS[name].args)}")
    delays = ", ".join(f"AP{i} {d * 1000:.0f} ms" for i, d in DELAYS.items())
    print(
        f"lab: 3 APs whose agents answer probes after {delays}; a new UDP flow A -> B every"
        f" {SEND_INTERVAL * 1000:.0f} ms; {args.runs} runs per setting, one lab per setting,"
        f" a fresh sdnsup per run, {args.idle:g} s of steady traffic before each cut"
        + (f"; {args.stress} CPU-bound loops running in A" if args.stress else "")
    )
    res = Results()
    for name in names:
        measure(SETTINGS[name], args.runs, args.idle, args.stress, res)
    figures = report(res, args.runs, args.idle)
    figures["stress_loops"] = args.stress
    chosen = {name: representative(done) for name, done in res.runs.items() if done}
    if chosen:
        png = benchlib.RESULTS_DIR / "failover.png"
        plot(chosen, png)
        figures["plot"] = str(png)
        print(f"\n(timeline of the median run of each setting: {png})")
    for err in res.errors:
        print(f"FAILED {err}")
    benchlib.write_json("failover", figures)
    short = [n for n in names if len(res.runs.get(n, [])) < args.runs]
    return 1 if short else 0


if __name__ == "__main__":
    sys.exit(main())
