"""sdnsup.probe: anti-flap rules, hold-down, ranking, probe_all on a MockClock, and
probe_once against loopback servers (real sockets, no root needed; a probe that must time
out does so on a MockClock)."""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from sdnsup.aps import AccessPoint, ProbeSpec
from sdnsup.errors import SdnsupError
from sdnsup.probe import (
    HOLD_DOWN,
    MIN_GAIN_ABS,
    MIN_GAIN_REL,
    N_GOOD,
    PROBE_SPACING,
    UDP_MAGIC,
    Hysteresis,
    ProbeFailed,
    ProbeResult,
    _inet_checksum,
    _parse_echo_reply,
    open_icmp_socket,
    probe_all,
    probe_once,
    rank,
    should_switch,
)

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")


def ap(i: int, kind: str = "udp", port: int = 7300, path: str = "/health") -> AccessPoint:
    return AccessPoint(
        f"ap{i}",
        addr4=ipaddress.IPv4Address(f"10.77.0.{10 + i}"),
        probe=ProbeSpec(kind, port, path),  # type: ignore[arg-type]
    )


AP1, AP2, AP3, AP4 = ap(1), ap(2), ap(3), ap(4)


def res(
    rtt_ms: float | None, received: int = 3, sent: int = 3, a: AccessPoint = AP1
) -> ProbeResult:
    return ProbeResult(a, None if rtt_ms is None else rtt_ms / 1000, sent, received)


# --- should_switch ---------------------------------------------------------------------------


def test_constants_are_tailscales_rule() -> None:
    assert MIN_GAIN_ABS == 0.010
    assert MIN_GAIN_REL == 0.33


@pytest.mark.parametrize(
    ("current", "candidate", "switch"),
    [
        # absolute gap: 10 ms is not enough, 10.5 ms is (relative gap far above 33% here)
        (res(20.0), res(10.0), False),
        (res(20.0), res(9.5), True),
        # relative gap: current 100 ms needs > 33 ms; 33 ms is not enough, 34 ms is
        (res(100.0), res(67.5), False),
        (res(100.0), res(66.5), True),
        # both needed: 40 ms faster but only 20% (200 -> 160)
        (res(200.0), res(160.0), False),
        # 50% faster but only 1.5 ms
        (res(3.0), res(1.5), False),
        # slower or equal: never
        (res(50.0), res(50.0), False),
        (res(10.0), res(80.0), False),
        # dead current: any live candidate, however slow or lossy
        (res(None, received=0), res(900.0), True),
        (res(None, received=0), res(80.0, received=1), True),
        # dead candidate: never, not even for a dead current AP
        (res(50.0), res(None, received=0), False),
        (res(None, received=0), res(None, received=0), False),
        # lossy candidate: loses 1/3 while current loses nothing -> no, however fast
        (res(100.0), res(5.0, received=2), False),
        # equal loss is fine
        (res(100.0, received=2), res(5.0, received=2), True),
        # less loss is fine too, when also clearly faster
        (res(100.0, received=1), res(5.0), True),
        # ... but less loss alone is not a reason to switch
        (res(100.0, received=2), res(95.0), False),
        # loss compares as a fraction, whatever the counts
        (res(100.0, received=2, sent=6), res(5.0, received=1, sent=3), True),
    ],
)
def test_should_switch(current: ProbeResult, candidate: ProbeResult, switch: bool) -> None:
    assert should_switch(current, candidate) is switch


def test_should_switch_reads_only_result_fields() -> None:
    class Like:  # what the supervisor's fakes look like: no loss/alive properties
        def __init__(self, rtt: float | None, received: int) -> None:
            self.ap, self.rtt, self.sent, self.received = AP1, rtt, 3, received

    assert should_switch(Like(0.1, 3), Like(0.01, 3))  # type: ignore[arg-type]
    assert not should_switch(Like(0.1, 3), Like(0.01, 1))  # type: ignore[arg-type]


# --- results and ranking ---------------------------------------------------------------------


def test_loss_and_alive() -> None:
    assert res(5.0).loss == 0.0 and res(5.0).alive
    assert res(5.0, received=1).loss == pytest.approx(2 / 3)
    assert res(None, received=0).loss == 1.0 and not res(None, received=0).alive
    assert ProbeResult(AP1, None, 0, 0).loss == 1.0


def test_rank_live_then_loss_then_rtt_and_stable() -> None:
    dead = res(None, received=0, a=AP1)
    lossy_fast = res(5.0, received=2, a=AP2)
    slow = res(80.0, a=AP3)
    fast = res(40.0, a=AP4)
    tie = res(40.0, a=ap(5))
    ranking = rank([dead, lossy_fast, slow, fast, tie])
    assert [r.ap.id for r in ranking] == ["ap4", "ap5", "ap3", "ap2", "ap1"]
    # ties keep the input (CC preference) order
    assert [r.ap.id for r in rank([tie, fast])] == ["ap5", "ap4"]


# --- hysteresis ------------------------------------------------------------------------------


def test_hysteresis_needs_hold_down_and_good_streak() -> None:
    h = Hysteresis()
    assert (h.n_good, h.hold_down) == (N_GOOD, HOLD_DOWN) == (3, 10.0)
    assert h.usable("ap1", 0.0)  # never died
    assert h.record("ap1", False, 0.0)  # probes of live APs do not matter here

    h.mark_dead("ap1", 100.0)
    assert not h.usable("ap1", 100.0) and h.is_held("ap1")
    # three good probes early: still held until the hold-down has passed
    for t in (101.0, 102.0, 103.0):
        assert not h.record("ap1", True, t)
    assert not h.usable("ap1", 109.9)
    assert h.usable("ap1", 110.0)
    assert not h.is_held("ap1")


def test_hysteresis_a_failure_restarts_the_streak_not_the_hold_down() -> None:
    h = Hysteresis(n_good=3, hold_down=10.0)
    h.mark_dead("ap1", 0.0)
    assert not h.record("ap1", True, 11.0)
    assert not h.record("ap1", True, 12.0)
    assert not h.record("ap1", False, 13.0)  # streak back to 0
    assert not h.record("ap1", True, 14.0)
    assert not h.record("ap1", True, 15.0)
    assert h.record("ap1", True, 16.0)
    # dying again starts over
    h.mark_dead("ap1", 20.0)
    assert not h.record("ap1", True, 21.0)
    assert h.usable("ap2", 21.0)  # other APs are not affected


# --- probe_all on virtual time ---------------------------------------------------------------


def fake_probe(
    delays: dict[str, float | None], log: list[tuple[str, float]] | None = None
) -> Callable[..., Awaitable[float]]:
    """A probe answering after ``delays[ap.id]`` virtual seconds; None: never answers."""

    async def probe(a: AccessPoint, *, timeout: float) -> float:
        start = trio.current_time()
        if log is not None:
            log.append((a.id, start))
        delay = delays[a.id]
        if delay is None:
            await trio.sleep_forever()
        assert delay is not None
        if delay > timeout:
            await trio.sleep(timeout)
            raise ProbeFailed("timeout")
        await trio.sleep(delay)
        return trio.current_time() - start

    return probe


def run_virtual(fn: Callable[[], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        with trio.fail_after(60):  # virtual seconds: an absolute bound on the test
            return await fn()

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_probe_all_reports_answers_as_they_come_and_ranks_everything() -> None:
    delays: dict[str, float | None] = {"ap1": 0.080, "ap2": 0.005, "ap3": 0.040, "ap4": None}
    firsts: list[tuple[str, float, int, int]] = []
    started: list[tuple[str, float]] = []

    async def go() -> tuple[Any, float]:
        t0 = trio.current_time()

        def on_answer(r: ProbeResult) -> None:
            assert r.rtt is not None
            firsts.append((r.ap.id, trio.current_time() - t0, r.sent, r.received))

        ranking = await probe_all(
            [AP1, AP2, AP3, AP4],
            timeout=1.0,
            count=3,
            on_answer=on_answer,
            probe=fake_probe(delays, started),
        )
        return ranking, trio.current_time() - t0

    ranking, elapsed = run_virtual(go)
    # the first call came at 5 ms, for the 5 ms AP: long before the 80 ms one answered;
    # then one call per answer, in the order they came
    ap_id, at, sent, received = firsts[0]
    assert ap_id == "ap2" and at == pytest.approx(0.005) and (sent, received) == (1, 1)
    assert [f[0] for f in firsts] == ["ap2"] * 3 + ["ap3"] * 3 + ["ap1"] * 3
    assert [f[1] for f in firsts] == sorted(f[1] for f in firsts)
    # the ranking follows the delays; the silent AP is dead after its deadline
    assert [r.ap.id for r in ranking] == ["ap2", "ap3", "ap1", "ap4"]
    assert [r.rtt for r in ranking[:3]] == pytest.approx([0.005, 0.040, 0.080])
    assert ranking[3].rtt is None and (ranking[3].sent, ranking[3].received) == (3, 0)
    assert all((r.sent, r.received) == (3, 3) for r in ranking[:3])
    # every AP got 3 probes, spaced PROBE_SPACING apart, all starting together
    assert sorted(t for a, t in started if a == "ap1") == pytest.approx(
        [0.0, PROBE_SPACING, 2 * PROBE_SPACING]
    )
    # the round ends with the last probe's deadline
    assert elapsed == pytest.approx(2 * PROBE_SPACING + 1.0)


def test_probe_all_without_dead_aps_ends_with_the_slowest_answer() -> None:
    delays: dict[str, float | None] = {"ap1": 0.005, "ap2": 0.040, "ap3": 0.080}

    async def go() -> float:
        t0 = trio.current_time()
        await probe_all([AP1, AP2, AP3], timeout=1.0, count=3, probe=fake_probe(delays))
        return trio.current_time() - t0

    assert run_virtual(go) == pytest.approx(2 * PROBE_SPACING + 0.080)


def test_probe_all_loss_and_median() -> None:
    answers = {"ap1": iter([0.010, None, 0.030]), "ap2": iter([0.050, 0.070, 0.060])}

    async def probe(a: AccessPoint, *, timeout: float) -> float:
        rtt = next(answers[a.id])
        if rtt is None:
            raise SdnsupError("lost")  # any SdnsupError counts as a lost probe
        await trio.sleep(rtt)
        return rtt

    async def go() -> Any:
        return await probe_all([AP1, AP2], timeout=1.0, count=3, spacing=0.0, probe=probe)

    ranking = run_virtual(go)
    # ap1 is faster but lost a probe: the loss-free ap2 ranks first
    assert [(r.ap.id, r.received) for r in ranking] == [("ap2", 3), ("ap1", 2)]
    assert ranking[0].rtt == pytest.approx(0.060)  # median of 50/70/60
    assert ranking[1].rtt == pytest.approx(0.020)  # median of the two answers


def test_probe_all_with_no_answer_never_calls_on_answer() -> None:
    called: list[ProbeResult] = []

    async def go() -> Any:
        return await probe_all(
            [AP1, AP2],
            timeout=0.2,
            on_answer=called.append,
            probe=fake_probe({"ap1": None, "ap2": 0.5}),
        )

    ranking = run_virtual(go)
    assert called == []
    assert all(r.rtt is None and not r.alive for r in ranking)


def test_probe_all_empty_and_bad_arguments() -> None:
    assert run_virtual(lambda: probe_all([], timeout=1.0)) == ()
    with pytest.raises(ValueError, match="count"):
        run_virtual(lambda: probe_all([AP1], timeout=1.0, count=0))
    with pytest.raises(ValueError, match="timeout"):
        run_virtual(lambda: probe_all([AP1], timeout=0))


def test_probe_all_propagates_bugs_in_probe_functions() -> None:
    async def broken(a: AccessPoint, *, timeout: float) -> float:
        raise KeyError("bug")

    with pytest.raises(ExceptionGroup) as info:
        run_virtual(lambda: probe_all([AP1], timeout=1.0, count=1, probe=broken))
    assert info.group_contains(KeyError)


# --- probe_once against loopback servers (real sockets) --------------------------------------


def on_loopback(kind: str, port: int, path: str = "/health") -> AccessPoint:
    return AccessPoint("lo", addr4=LOOPBACK, probe=ProbeSpec(kind, port, path))  # type: ignore[arg-type]


async def udp_echo(stray: bool, *, task_status: trio.TaskStatus[int]) -> None:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        task_status.started(sock.getsockname()[1])
        while True:
            data, peer = await sock.recvfrom(2048)
            if stray:  # something else first: must be ignored, not taken as the answer
                await sock.sendto(UDP_MAGIC + b"\0" * 16, peer)
                await sock.sendto(b"junk", peer)
            await sock.sendto(data, peer)


async def http_server(answer: bytes, *, task_status: trio.TaskStatus[int]) -> None:
    requests: list[bytes] = []

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
            requests.append(data)
            if answer:
                await stream.send_all(answer)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


def run_real(
    fn: Callable[[trio.Nursery], Awaitable[Any]], clock: trio.testing.MockClock | None = None
) -> Any:
    """Run ``fn`` with a nursery, on the real clock unless given a MockClock."""

    async def main() -> Any:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                result = await fn(nursery)
                nursery.cancel_scope.cancel()
                return result

    return trio.run(main, clock=clock)


def until_timeout() -> trio.testing.MockClock:
    """Virtual time over real loopback sockets for a probe that must time out: the clock
    jumps to the probe's deadline only after every task waited 10 ms (real), far longer than
    a TCP handshake on loopback takes."""
    return trio.testing.MockClock(autojump_threshold=0.01)


def unused_port(kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.parametrize("stray", [False, True])
def test_udp_probe_echo(stray: bool) -> None:
    async def go(nursery: trio.Nursery) -> float:
        port = await nursery.start(udp_echo, stray)
        return await probe_once(on_loopback("udp", port), timeout=2.0)

    rtt = run_real(go)
    assert 0 < rtt < 1.0


def test_udp_probe_refused_fast_and_silent_times_out() -> None:
    port = unused_port(socket.SOCK_DGRAM)

    async def refused(nursery: trio.Nursery) -> float:
        t0 = trio.current_time()
        with pytest.raises(ProbeFailed) as info:
            await probe_once(on_loopback("udp", port), timeout=2.0)
        assert info.value.reason == "connection refused"
        assert isinstance(info.value.__cause__, OSError)
        assert info.value.__cause__.errno == errno.ECONNREFUSED
        return trio.current_time() - t0

    assert run_real(refused) < 1.0

    async def silent(nursery: trio.Nursery) -> None:
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            await sock.bind(("127.0.0.1", 0))  # bound, never answers
            t0 = trio.current_time()
            with pytest.raises(ProbeFailed, match="no answer within 100 ms") as info:
                await probe_once(on_loopback("udp", sock.getsockname()[1]), timeout=0.1)
            assert info.value.reason == "timeout"
            assert "udp probe of AP lo at [127.0.0.1]" in str(info.value)
            assert trio.current_time() - t0 == pytest.approx(0.1)

    run_real(silent, until_timeout())


def test_tcp_probe_connect_and_refused() -> None:
    async def go(nursery: trio.Nursery) -> float:
        port = await nursery.start(http_server, b"")
        return await probe_once(on_loopback("tcp", port), timeout=2.0)

    assert 0 < run_real(go) < 1.0

    async def refused(nursery: trio.Nursery) -> None:
        with pytest.raises(ProbeFailed, match="connection refused"):
            await probe_once(on_loopback("tcp", unused_port(socket.SOCK_STREAM)), timeout=2.0)

    run_real(refused)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", None),
        (b"HTTP/1.1 204 No Content\r\n\r\n", None),
        (b"HTTP/1.0 500 Internal Server Error\r\n\r\n", "HTTP status 500"),
        (b"HTTP/1.0 301 Moved\r\nLocation: /x\r\n\r\n", "HTTP status 301"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", "not an HTTP status line"),
        (b"HTTP/1.0 200", "closed before a status line"),
        (b"HTTP/1.0 200 " + b"x" * 2000, "status line too long"),
    ],
)
def test_http_probe_statuses(answer: bytes, error: str | None) -> None:
    async def go(nursery: trio.Nursery) -> float | ProbeFailed:
        port = await nursery.start(http_server, answer)
        try:
            return await probe_once(on_loopback("http", port, "/health"), timeout=2.0)
        except ProbeFailed as exc:
            return exc

    outcome = run_real(go)
    if error is None:
        assert isinstance(outcome, float) and 0 < outcome < 1.0
    else:
        assert isinstance(outcome, ProbeFailed)
        assert error in str(outcome)
        assert "http probe of AP lo at [127.0.0.1]:" in str(outcome)


def test_http_probe_refuses_paths_that_could_inject_headers() -> None:
    async def go(nursery: trio.Nursery) -> None:
        for path in ("/a b", "/x\r\nHost: evil", "health", "/é"):
            with pytest.raises(ProbeFailed, match="not a plain absolute path"):
                await probe_once(on_loopback("http", 1, path), timeout=1.0)

    run_real(go)


def test_http_probe_silent_server_times_out() -> None:
    async def go(nursery: trio.Nursery) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with listeners[0]:  # the kernel accepts; nobody ever answers
            t0 = trio.current_time()
            with pytest.raises(ProbeFailed, match="no answer within 100 ms"):
                await probe_once(on_loopback("http", port), timeout=0.1)
            assert trio.current_time() - t0 == pytest.approx(0.1)

    run_real(go, until_timeout())


def test_probe_once_arguments() -> None:
    async def go(nursery: trio.Nursery) -> None:
        with pytest.raises(ValueError, match="positive"):
            await probe_once(on_loopback("udp", 1), timeout=0)
        with pytest.raises(ProbeFailed, match="unknown probe kind 'smoke'"):
            await probe_once(on_loopback("smoke", 1), timeout=1.0)

    run_real(go)


def test_icmp_probe_loopback() -> None:
    async def go(nursery: trio.Nursery) -> float | None:
        try:
            sock, _raw = open_icmp_socket(socket.AF_INET)
        except ProbeFailed:
            return None  # neither ping_group_range nor CAP_NET_RAW: nothing to test
        sock.close()
        return await probe_once(on_loopback("icmp", 0), timeout=2.0)

    rtt = run_real(go)
    if rtt is None:
        pytest.skip("no ICMP socket for this user")
    assert 0 < rtt < 1.0


def test_icmp_helpers() -> None:
    # RFC 1071's example: the checksum of 0001 f203 f4f5 f6f7 is ~ddf2 = 220d
    assert _inet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert _inet_checksum(b"\x00\x01\x02") == _inet_checksum(b"\x00\x01\x02\x00")
    icmp = struct.pack("!BBHHH", 0, 0, 0, 0x1234, 7) + b"n" * 16
    ip_header = bytes([0x45]) + b"\0" * 19
    assert _parse_echo_reply(ip_header + icmp, socket.AF_INET, raw=True) == (
        0,
        0x1234,
        7,
        b"n" * 16,
    )
    assert _parse_echo_reply(icmp, socket.AF_INET, raw=False) == (0, 0x1234, 7, b"n" * 16)
    assert _parse_echo_reply(b"\x45", socket.AF_INET, raw=True) is None
    assert _parse_echo_reply(b"", socket.AF_INET6, raw=True) is None
