"""``scripts/bench failover``: convergence, failover dark window and flap heal, with real packets.

Everything runs in a lab of network namespaces (:class:`sdnsup.lab.Lab`: client A, router R,
host B, three APs), removed at the end of each run, also on failure; nothing in the host's
namespace changes. sdnsup runs with its default settings (printed first) and steers B's
subnet through the fastest AP; each run starts it fresh and stops it with SIGTERM.

Traffic: a UDP echo server in B answers every datagram with the source address it saw; a
client in A opens a NEW socket every SEND_INTERVAL (a new source port, so a new conntrack
entry, which is what sdnsup steers) and records each reply. Both stamp with ``time.time()``
(same machine, same clock as the launch time taken here).

1. Convergence: launch of the sdnsup process -> first datagram that reaches B through AP1
   (B's receive stamp). Shown next to the interpreter start-up + import cost, AP1's RTT and
   sdnsup's own timeline: its CC request and first probe leaving A (a packet socket in A),
   its routing state reaching the kernel (``ip -ts monitor`` in A).
2. Failover: with traffic on AP1, cut AP1's link; the dark window is the longest gap between
   consecutive replies from the last reply before the cut on; later replies must come
   through AP2 (the next of the ranking). Also sdnsup's own logged detection time.
3. Flap heal (a lab of its own): ``ip link set eth0 down``, 0.3 s, ``up`` in A; from the
   link-up event to the last of sdnsup's nexthops/routes/rules that had to be restored,
   both stamped by ``ip -ts monitor`` in A.

Figures only: the expectations are printed next to them, never asserted. The exit status is
1 only when a measurement could not be taken at all (reported as FAILED, with the reason).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sdnsup import keepalive, netmon, supervisor
from sdnsup.daemon import VERIFY_INTERVAL
from sdnsup.lab import Lab, WaitTimeout, unavailable_reason
from sdnsup.lab import wait_for as lab_wait_for
from sdnsup.lab.apagent import UDP_PORT
from sdnsup.lab.commands import LabError
from sdnsup.routes import RTPROT_SDNSUP

DELAYS = {1: 0.005, 2: 0.040, 3: 0.080}  # AP index -> probe answer delay of its agent
CIDRS = "10.10.10.0/24,fd10:10:10::/64"  # B's subnet (the overlay), both families
ECHO_PORT = 9000
SEND_INTERVAL = 0.005
SOCKET_LIFETIME = 1.0  # a client socket waits this long for its reply, then closes
CLIENT_MAX_SECONDS = 60.0  # the client and the server end on their own after this
FLAP_DOWN = 0.3
CC_PORT = 8000

# Bounds: nothing here waits longer than this for anything.
READY_TIMEOUT = 5.0
CONVERGE_TIMEOUT = 15.0
RANKING_TIMEOUT = 10.0
SETTLE = 0.5  # after the ranking, before a fault: sdnsup idle, traffic steady
AFTER_CUT = 3.0  # traffic recorded after the cut
HEAL_TIMEOUT = 5.0
STOP_TIMEOUT = 10.0

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

# A: stamp the first TCP SYN to the CC and the first UDP probe to an AP port leaving A's
# interface (a packet socket; outgoing frames are seen too): sdnsup's own timeline, on the
# wire, in the very process that is measured.
WIRE_TAP = """
import json, socket, struct, sys, time
ifname, src = sys.argv[1], socket.inet_aton(sys.argv[2])
cc_port, probe_port, until = int(sys.argv[3]), int(sys.argv[4]), time.time() + float(sys.argv[5])
ETH_P_ALL = 3  # outgoing frames reach ETH_P_ALL sockets only
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
s.bind((ifname, ETH_P_ALL))
s.settimeout(0.5)
print(json.dumps({"kind": "ready"}), flush=True)
seen = set()
while time.time() < until and len(seen) < 2:
    try:
        frame = s.recv(256)
    except TimeoutError:
        continue
    now = time.time()
    ip = frame[14:]  # after the Ethernet header: IPv4 only, from A, with 14 bytes of L4
    if frame[12:14] != bytes((8, 0)) or len(ip) < 20 or ip[12:16] != src:
        continue
    hl = (ip[0] & 15) * 4
    if len(ip) < hl + 14:
        continue
    dport = struct.unpack("!H", ip[hl + 2 : hl + 4])[0]
    if ip[9] == 6 and dport == cc_port and ip[hl + 13] & 0x02:
        kind = "cc"
    elif ip[9] == 17 and dport == probe_port:
        kind = "probe"
    else:
        continue
    if kind not in seen:
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
    s.sendto(b"bench%d" % i, (addr, port))
    s.recv(2048)
    rtts.append(time.perf_counter() - t0)
print(statistics.median(rtts))
"""


class BenchError(Exception):
    """One measurement of one run failed; the run's other figures still count."""


# --- small helpers ---------------------------------------------------------------------------


def wait_for(what: str, timeout: float, predicate: Callable[[], Any], step: float = 0.01) -> Any:
    """:func:`sdnsup.lab.wait_for`, failing as a BenchError (a measurement not taken)."""
    try:
        return lab_wait_for(what, timeout, predicate, step)
    except WaitTimeout as exc:
        raise BenchError(str(exc)) from None


def python(code: str, *args: object) -> list[str]:
    return [sys.executable, "-c", code, *(str(a) for a in args)]


def replies(lab: Lab, client: subprocess.Popen[bytes]) -> list[dict[str, Any]]:
    """The client's replies so far (a line being written is skipped)."""
    out = []
    for line in lab.logs(client).splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)\] (.*)$")


def monitor_events(text: str) -> list[tuple[float, str]]:
    """``ip -ts monitor`` output -> (epoch seconds, first line of each event)."""
    events = []
    for line in text.splitlines():
        m = STAMP.match(line)
        if m:
            events.append((datetime.fromisoformat(m.group(1)).timestamp(), m.group(2)))
    return events


def log_lines(lab: Lab, proc: subprocess.Popen[bytes], pattern: str) -> list[str]:
    return [ln for ln in lab.logs(proc).splitlines() if re.search(pattern, ln)]


def start_sdnsup(lab: Lab, url: str) -> tuple[subprocess.Popen[bytes], float]:
    """Launch sdnsup (default settings) in A; the process and its launch time (time.time())."""
    launched = time.time()
    return lab.run_sdnsup(lab.ns_a, "-r", CIDRS, "--cc", url), launched


def stop_sdnsup(lab: Lab, proc: subprocess.Popen[bytes]) -> None:
    code = lab.stop(proc, grace=STOP_TIMEOUT)
    if code != 0:
        raise BenchError(f"sdnsup exited {code} on SIGTERM:\n{lab.logs(proc)}")


def wait_ranking(lab: Lab, proc: subprocess.Popen[bytes]) -> None:
    """Wait for sdnsup's first full probe ranking (the failover order), then let it settle."""

    def ranked() -> bool:
        if proc.poll() is not None:
            raise BenchError(f"sdnsup exited {proc.returncode}:\n{lab.logs(proc)}")
        return bool(log_lines(lab, proc, "probe ranking"))

    wait_for("sdnsup's probe ranking", RANKING_TIMEOUT, ranked)
    time.sleep(SETTLE)


def lab_with_cc(lab: Lab) -> str:
    lab.start_ap_agents(DELAYS)
    url = lab.start_cc(port=CC_PORT)
    lab.set_cc()
    return url


def overlay(lab: Lab, i: int) -> str:
    return str(lab.ap(i).overlay_addr)


# --- 1 and 2: convergence, then failover, in one lab -----------------------------------------


@dataclass
class Convergence:
    seconds: float  # sdnsup launch -> first datagram through AP1 at B
    startup: float  # python -c "import sdnsup.cli" in A, wall clock
    # sdnsup's own timeline, from its launch: CC request and first probe on the wire, the
    # last of its first nexthop/route/rule writes in the kernel
    cc: float
    probe: float
    kernel: float
    ap_rtt: float  # AP1's UDP echo, median
    logged_rtt: float | None  # what sdnsup logged for the AP it chose first


@dataclass
class Failover:
    dark: float  # longest gap between consecutive replies from the last one before the cut
    cut_to_next: float  # cut -> first reply through AP2
    detection: float | None  # from sdnsup's log line
    after: str  # the addresses B saw after the dark window


def traffic(lab: Lab) -> subprocess.Popen[bytes]:
    """Start the echo server in B and the client in A; return the client once replies flow."""
    argv = python(ECHO_SERVER, ECHO_PORT, CLIENT_MAX_SECONDS + 30)
    server = lab.popen(lab.ns_b, *argv, label="b-echo")
    wait_for("the echo server in B", READY_TIMEOUT, lambda: "ready" in lab.logs(server))
    argv = python(
        ECHO_CLIENT, lab.b_addr, ECHO_PORT, SEND_INTERVAL, SOCKET_LIFETIME, CLIENT_MAX_SECONDS
    )
    client = lab.popen(lab.ns_a, *argv, label="a-echo")
    wait_for("replies to the client in A", READY_TIMEOUT, lambda: replies(lab, client))
    return client


def measure_convergence(
    lab: Lab, url: str, client: subprocess.Popen[bytes]
) -> tuple[Convergence, subprocess.Popen[bytes]]:
    t0 = time.time()
    lab.exec(lab.ns_a, sys.executable, "-c", "import sdnsup.cli")
    startup = time.time() - t0
    ap_rtt = float(lab.exec(lab.ns_a, *python(AP_RTT, lab.ap(1).addr, UDP_PORT, 5)).stdout)
    # Started after the RTT probe, whose packets it would take for sdnsup's.
    tap_argv = python(WIRE_TAP, lab.a_ifname, lab.a_addr, CC_PORT, UDP_PORT, CONVERGE_TIMEOUT + 5)
    tap = lab.popen(lab.ns_a, *tap_argv, label="a-tap")
    monitor = lab.popen(lab.ns_a, "ip", "-ts", "monitor", "nexthop", "rule", "route",
                        label="a-monitor")  # fmt: skip
    wait_for("the wire tap in A", READY_TIMEOUT, lambda: "ready" in lab.logs(tap))
    time.sleep(0.2)  # ip monitor subscribes at once; this is only slack

    proc, launched = start_sdnsup(lab, url)
    ap1 = overlay(lab, 1)

    def first_via_ap1() -> dict[str, Any] | None:
        if proc.poll() is not None:
            raise BenchError(f"sdnsup exited {proc.returncode}:\n{lab.logs(proc)}")
        return next((r for r in replies(lab, client) if r["seen"] == ap1), None)

    first = wait_for("a datagram through AP1", CONVERGE_TIMEOUT, first_via_ap1)
    wire = {r["kind"]: r["t"] - launched for r in replies(lab, tap) if "t" in r}
    writes = [
        t - launched
        for t, e in monitor_events(lab.logs(monitor))
        if f"proto {RTPROT_SDNSUP}" in e and not e.startswith("Deleted ") and t <= first["b"]
    ]
    if len(wire) < 2 or not writes:
        raise BenchError(f"sdnsup's timeline is incomplete: wire {wire}, kernel writes {writes}")
    chosen = log_lines(lab, proc, r"AP chosen: ap1 .*first to answer, ([\d.]+) ms")
    logged = re.search(r"first to answer, ([\d.]+) ms", chosen[0]) if chosen else None
    conv = Convergence(
        seconds=first["b"] - launched,
        startup=startup,
        cc=wire["cc"],
        probe=wire["probe"],
        kernel=max(writes),
        ap_rtt=ap_rtt,
        logged_rtt=float(logged.group(1)) / 1000 if logged else None,
    )
    return conv, proc


def measure_failover(
    lab: Lab, proc: subprocess.Popen[bytes], client: subprocess.Popen[bytes]
) -> Failover:
    ap1, ap2 = overlay(lab, 1), overlay(lab, 2)
    wait_ranking(lab, proc)
    # The ranking comes at a fixed offset from the keepalive's first probe: without this the
    # cut would hit the same point of the keepalive cycle in every run.
    time.sleep(random.uniform(0, keepalive.KEEPALIVE_INTERVAL))
    cut = time.time()
    lab.ap_link_down(1)
    time.sleep(AFTER_CUT)
    got = sorted(replies(lab, client), key=lambda r: r["recv"])
    before = [r for r in got if r["recv"] < cut]
    if not before or before[-1]["seen"] != ap1:
        raise BenchError("traffic was not going through AP1 before the cut")
    window = [before[-1], *(r for r in got if r["recv"] >= cut)]
    if len(window) < 2:
        raise BenchError(f"no reply at all in the {AFTER_CUT:.0f} s after the cut")
    gaps = [(b["recv"] - a["recv"], b) for a, b in itertools.pairwise(window)]
    dark, resumed = max(gaps, key=lambda g: g[0])
    after = [r for r in window if r["recv"] >= resumed["recv"]]
    seen = sorted({r["seen"] for r in after})
    first_next = next((r for r in window if r["seen"] == ap2), None)
    if first_next is None:
        raise BenchError(f"no reply through AP2 after the cut (seen: {', '.join(seen)})")
    line = log_lines(lab, proc, r"failover: .*detected (\d+) ms")
    detected = re.search(r"detected (\d+) ms", line[0]) if line else None
    return Failover(
        dark=dark,
        cut_to_next=first_next["recv"] - cut,
        detection=float(detected.group(1)) / 1000 if detected else None,
        after=", ".join(seen),
    )


# --- 3: flap heal, in a lab of its own ------------------------------------------------------


@dataclass
class Heal:
    seconds: float  # link-up event -> the last restored object's event
    last: str  # which kind of object completed the state
    restored: int  # how many objects had to be restored


Obj = tuple[str, str, str]  # ("nexthop", id, via), ("route", dst, via), ("rule", family, pref)


def sdnsup_objects(lab: Lab) -> set[Obj]:
    """sdnsup's nexthops, routes and policy rules in A, as comparable tuples."""
    ours = (str(RTPROT_SDNSUP), hex(RTPROT_SDNSUP))

    def js(*argv: str) -> list[dict[str, Any]]:
        out = lab.exec(lab.ns_a, "ip", "-j", *argv).stdout.strip()
        return json.loads(out) if out else []

    objs = {
        ("nexthop", str(n["id"]), n.get("gateway", "none"))
        for n in js("nexthop", "show")
        if str(n.get("protocol")) in ours
    }
    for fam in ("-4", "-6"):
        routes = js(fam, "route", "show", "table", "all", "proto", str(RTPROT_SDNSUP))
        objs |= {("route", r["dst"], r.get("gateway", "none")) for r in routes}
        rules = js(fam, "rule", "show")
        objs |= {("rule", fam, str(r["priority"])) for r in rules if str(r.get("protocol")) in ours}
    return objs


def restores(obj: Obj, event: str) -> bool:
    """Whether a monitor event (re-)establishes ``obj`` as it was before the flap."""
    kind, key, value = obj
    if event.startswith("Deleted "):
        return False
    if kind == "nexthop":
        return event.startswith(f"id {key} via {value} ")
    if kind == "route":
        return event.startswith(f"{key} ") and f" via {value} " in event
    # IPv4 and IPv6 rules print alike: the caller lets each event count for one rule only
    return event.startswith(f"{value}:") and f"proto {RTPROT_SDNSUP}" in event


def link_is_up(event: str, ifname: str) -> bool | None:
    """For a link event of ``ifname`` (``2: eth0@if4: <...,UP,...>``) whether it is
    administratively up; None for any other event."""
    m = re.match(rf"\d+: {re.escape(ifname)}(?:@\S+)?: <([^>]*)>", event)
    return None if m is None else "UP" in m.group(1).split(",")


def heal_time(events: list[tuple[float, str]], ifname: str, needed: set[Obj]) -> Heal | None:
    """From the first link-up event after a link-down one to the event that restored the
    last of ``needed``; None while that has not happened yet."""
    states = [(i, link_is_up(e, ifname)) for i, (_, e) in enumerate(events)]
    down = next((i for i, up in states if up is False), None)
    up = next((i for i, up in states if up and down is not None and i > down), None)
    if up is None:
        return None
    later = list(enumerate(events))[up + 1 :]
    used: set[int] = set()
    last = (events[up][0], "nothing")
    for obj in sorted(needed):
        hit = next((i for i, (_, e) in later if i not in used and restores(obj, e)), None)
        if hit is None:
            return None
        used.add(hit)
        last = max(last, (events[hit][0], obj[0]))
    return Heal(last[0] - events[up][0], last[1], len(needed))


def measure_heal(lab: Lab, url: str) -> Heal:
    proc, _ = start_sdnsup(lab, url)
    wait_ranking(lab, proc)
    before = sdnsup_objects(lab)
    argv = ("ip", "-ts", "monitor", "link", "nexthop", "rule", "route")
    monitor = lab.popen(lab.ns_a, *argv, label="a-monitor")
    time.sleep(0.3)  # it subscribes at once; this is only slack
    dev = lab.a_ifname
    down_at = time.monotonic()
    lab.exec(lab.ns_a, "ip", "link", "set", dev, "down")
    # What is gone while the link is down (sdnsup reacts within ~COALESCE + apply, long
    # before this): those objects, and only those, must come back after the link-up.
    time.sleep(max(0.0, down_at + FLAP_DOWN - 0.1 - time.monotonic()))
    needed = before - sdnsup_objects(lab)
    time.sleep(max(0.0, down_at + FLAP_DOWN - time.monotonic()))
    lab.exec(lab.ns_a, "ip", "link", "set", dev, "up")
    # The kernel dropped the default route with the link; a network manager would put it
    # back (sockets need it to pick a source address), so the lab does too, as the tests do.
    lab.exec(lab.ns_a, "ip", "route", "replace", "default", "via", str(lab.router_addr))

    def healed() -> Heal | None:
        return heal_time(monitor_events(lab.logs(monitor)), dev, needed)

    try:
        heal: Heal = wait_for("the state to be restored after the flap", HEAL_TIMEOUT, healed)
    except BenchError as exc:
        raise BenchError(f"{exc}; sdnsup's log:\n{lab.logs(proc)}") from None
    after = sdnsup_objects(lab)
    if after != before:
        raise BenchError(f"state after the heal differs: {sorted(before)} -> {sorted(after)}")
    stop_sdnsup(lab, proc)
    return heal


# --- runs and the table ----------------------------------------------------------------------


@dataclass
class Results:
    convergence: list[Convergence] = field(default_factory=list)
    failover: list[Failover] = field(default_factory=list)
    heal: list[Heal] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def run_once(i: int, res: Results) -> None:
    try:
        with Lab.create(n_aps=len(DELAYS)) as lab:
            url = lab_with_cc(lab)
            client = traffic(lab)
            conv, proc = measure_convergence(lab, url, client)
            res.convergence.append(conv)
            res.failover.append(measure_failover(lab, proc, client))
            stop_sdnsup(lab, proc)
    except (BenchError, LabError, subprocess.SubprocessError) as exc:
        res.errors.append(f"run {i} convergence/failover: {exc}")
    try:
        with Lab.create(n_aps=len(DELAYS)) as lab:
            res.heal.append(measure_heal(lab, lab_with_cc(lab)))
    except (BenchError, LabError, subprocess.SubprocessError) as exc:
        res.errors.append(f"run {i} flap heal: {exc}")


Row = tuple[str, str, str, str, str]


def row(label: str, values: Sequence[float | None], expected: str = "", unit: str = "ms") -> Row:
    """A table row: p50, max and each run's value, in ``unit`` (seconds shown as ms)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return (label, "-", "-", "-", expected)
    scale = 1000 if unit == "ms" else 1
    p50, top = (f"{v * scale:.1f} {unit}" for v in (statistics.median(vals), max(vals)))
    return (label, p50, top, " ".join(f"{v * scale:.0f}" for v in vals), expected)


def print_table(head: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def report(res: Results, runs: int) -> None:
    c, f, h = res.convergence, res.failover, res.heal
    ka = keepalive
    # The K-th missed probe starts K intervals after the last good one and fails at its
    # deadline: K x interval + deadline after the last answer (minus its RTT); the cut falls
    # anywhere in the interval after that answer.
    verdict = ka.KEEPALIVE_MISSES * ka.KEEPALIVE_INTERVAL + ka.KEEPALIVE_TIMEOUT
    dark = f"< 1 s ({verdict - ka.KEEPALIVE_INTERVAL:.1f}-{verdict:.1f} s + apply)"
    beyond = [x.seconds - x.cc for x in c]
    rows = [
        row("convergence: launch -> first packet at B via AP1", [x.seconds for x in c],
            "start-up + a few RTTs of AP1"),
        row("  python -c 'import sdnsup.cli' (interpreter + import)", [x.startup for x in c]),
        row("  launch -> CC request on the wire (whole start-up)", [x.cc for x in c]),
        row("  CC request -> first AP probe on the wire", [x.probe - x.cc for x in c]),
        row("  first probe -> routing state in the kernel", [x.kernel - x.probe for x in c]),
        row(f"  state -> first packet at B (one per {SEND_INTERVAL * 1000:.0f} ms)",
            [x.seconds - x.kernel for x in c]),
        row("  convergence beyond start-up (CC request -> B)", beyond, "a few RTTs of AP1"),
        row("  ... in AP1 RTTs", [v / x.ap_rtt for v, x in zip(beyond, c, strict=True)],
            unit="RTT"),
        row("  AP1's RTT (udp echo, median of 5)", [x.ap_rtt for x in c]),
        row("  AP1's RTT as sdnsup logged it", [x.logged_rtt for x in c]),
        row("failover: dark window (longest reply gap)", [x.dark for x in f], dark),
        row("  cut -> first reply via AP2", [x.cut_to_next for x in f]),
        row("  detection logged by sdnsup (from last answer)", [x.detection for x in f],
            f"{verdict:.1f} s - RTT (misses x interval + deadline)"),
        row("flap heal: link up -> sdnsup's state restored", [x.seconds for x in h],
            f"< 100 ms (coalesce {netmon.COALESCE * 1000:.0f} ms + apply)"),
    ]  # fmt: skip
    print_table(("measurement", "p50", "max", f"each run ({runs} runs)", "expected"), rows)
    print()
    seen = "; ".join(sorted({x.after for x in f})) or "-"
    print(f"B saw after the failover dark window: {seen} (AP2's overlay address is 10.10.10.12)")
    kinds = "; ".join(sorted({f"{x.last} ({x.restored} objects restored)" for x in h})) or "-"
    print(f"flap heal completed by the last: {kinds}")
    for err in res.errors:
        print(f"FAILED {err}")


def print_settings(runs: int) -> None:
    ka, sv = keepalive, supervisor
    delays = ", ".join(f"AP{i} {d * 1000:.0f} ms" for i, d in DELAYS.items())
    print("sdnsup with its default settings (none overridden):")
    print(
        f"  keepalive every {ka.KEEPALIVE_INTERVAL} s, probe deadline {ka.KEEPALIVE_TIMEOUT} s,"
        f" dead after {ka.KEEPALIVE_MISSES} misses; re-probe every {sv.REPROBE_INTERVAL:.0f} s"
        f" +-{sv.JITTER:.0%}; netlink coalesce {netmon.COALESCE * 1000:.0f} ms;"
        f" verify every {VERIFY_INTERVAL:.0f} s"
    )
    print(
        f"lab: 3 APs whose agents answer probes after {delays}; the lab CC lists all three;"
        f" CIDRs {CIDRS}"
    )
    print(
        f"traffic: a new UDP socket from A to B every {SEND_INTERVAL * 1000:.0f} ms; runs: {runs},"
        " a fresh lab for each run of each measurement kind\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=5, help="repeated runs (default 5)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be 1 or more")
    reason = unavailable_reason()
    if reason is not None:
        print(f"cannot build a lab here: {reason}", file=sys.stderr)
        return 77
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    print_settings(args.runs)
    res = Results()
    for i in range(1, args.runs + 1):
        print(f"run {i}/{args.runs}...", file=sys.stderr, flush=True)
        run_once(i, res)
    report(res, args.runs)
    return 0 if not res.errors else 1


if __name__ == "__main__":
    sys.exit(main())
