"""Long-lived probe sockets (sdnsup.echo) against loopback servers: real sockets, no root."""

from __future__ import annotations

import errno
import ipaddress
import socket

import pytest
import trio
import trio.testing

from sdnsup.aps import AccessPoint, ProbeSpec
from sdnsup.echo import IDLE, Prober
from sdnsup.probe import ProbeFailed, open_icmp_socket, probe_all

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
# Virtual time over real loopback sockets: the clock jumps only after every task waited this
# long (real seconds), which a loopback answer never takes, so it never jumps past one.
REAL_IO = 0.01


def on_loopback(kind: str, port: int, ap_id: str = "lo") -> AccessPoint:
    return AccessPoint(ap_id, addr4=LOOPBACK, probe=ProbeSpec(kind, port))  # type: ignore[arg-type]


class Echo:
    """A UDP echo server that records the source port of every datagram."""

    def __init__(self) -> None:
        self.ports: list[int] = []
        self.silent = False
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            await sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
            task_status.started()
            while True:
                data, peer = await sock.recvfrom(2048)
                self.ports.append(peer[1])
                if not self.silent:
                    await sock.sendto(data, peer)


def run(fn, clock: trio.testing.MockClock | None = None) -> object:
    async def main():
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                result = await fn(nursery)
                nursery.cancel_scope.cancel()
                return result

    return trio.run(main, clock=clock)


def test_every_probe_of_an_ap_uses_one_socket():
    echo = Echo()

    async def go(nursery):
        await nursery.start(echo.serve)
        ap = on_loopback("udp", echo.port)
        async with Prober().open() as prober:
            for _ in range(20):  # keepalive probes
                assert 0 < await prober.probe(ap, timeout=1.0) < 0.5
            # a probe round: 3 concurrent probes per AP on the same socket
            ranking = await probe_all([ap], timeout=1.0, probe=prober.probe)
            assert ranking[0].received == 3
            return prober.opened

    assert run(go) == 1
    assert len(echo.ports) == 23 and len(set(echo.ports)) == 1  # one source port: one flow


def test_a_missed_answer_gives_the_next_probe_a_new_socket():
    echo = Echo()

    async def go(nursery):
        await nursery.start(echo.serve)
        ap = on_loopback("udp", echo.port)
        async with Prober().open() as prober:
            await prober.probe(ap, timeout=1.0)
            echo.silent = True
            t0 = trio.current_time()
            with pytest.raises(ProbeFailed, match="no answer within 100 ms") as info:
                await prober.probe(ap, timeout=0.1)
            assert trio.current_time() - t0 == pytest.approx(0.1)
            assert info.value.reason == "timeout"
            assert "udp probe of AP lo at [127.0.0.1]" in str(info.value)
            echo.silent = False
            await prober.probe(ap, timeout=1.0)
            await prober.probe(ap, timeout=1.0)
            return prober.opened, prober.open_sockets

    assert run(go, trio.testing.MockClock(autojump_threshold=REAL_IO)) == (2, 1)  # old one closed
    assert len(set(echo.ports)) == 2 and echo.ports[-1] == echo.ports[-2]


def test_refused_fails_fast_and_the_socket_stays_usable():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def go(nursery):
        async with Prober().open() as prober:
            t0 = trio.current_time()
            with pytest.raises(ProbeFailed) as info:
                await prober.probe(on_loopback("udp", port), timeout=2.0)
            assert trio.current_time() - t0 < 1.0
            assert info.value.reason == "connection refused"
            assert info.value.__cause__.errno == errno.ECONNREFUSED

    run(go)


def test_concurrent_probes_each_get_their_own_answer():
    echo = Echo()

    async def go(nursery):
        await nursery.start(echo.serve)
        ap = on_loopback("udp", echo.port)
        rtts: list[float] = []
        async with Prober().open() as prober:

            async def one():
                rtts.append(await prober.probe(ap, timeout=1.0))

            async with trio.open_nursery() as inner:
                for _ in range(5):
                    inner.start_soon(one)
        return rtts

    assert len(run(go)) == 5


def test_sockets_of_aps_no_longer_probed_are_closed():
    first, second = Echo(), Echo()
    clock = trio.testing.MockClock(autojump_threshold=REAL_IO)

    async def go(nursery):
        await nursery.start(first.serve)
        await nursery.start(second.serve)
        old, new = on_loopback("udp", first.port, "old"), on_loopback("udp", second.port, "new")
        async with Prober().open() as prober:
            await prober.probe(old, timeout=1.0)
            await prober.probe(new, timeout=1.0)
            assert prober.open_sockets == 2
            # probes of the listed AP only, every 30 s for longer than IDLE (virtual time)
            end = trio.current_time() + 2 * IDLE
            while trio.current_time() < end:
                await prober.probe(new, timeout=1.0)
                clock.jump(30)
            return prober.open_sockets

    async def main():
        with trio.fail_after(1000):
            async with trio.open_nursery() as nursery:
                result = await go(nursery)
                nursery.cancel_scope.cancel()
                return result

    assert trio.run(main, clock=clock) == 1


def test_icmp_probes_share_one_socket():
    async def go(nursery):
        try:
            sock, _raw = open_icmp_socket(socket.AF_INET)
        except ProbeFailed:
            return None
        sock.close()
        ap = on_loopback("icmp", 0)
        async with Prober().open() as prober:
            for _ in range(5):
                assert 0 < await prober.probe(ap, timeout=1.0) < 0.5
            ranking = await probe_all([ap], timeout=1.0, probe=prober.probe)
            assert ranking[0].received == 3
            return prober.opened

    opened = run(go)
    if opened is None:
        pytest.skip("no ICMP socket for this user")
    assert opened == 1


def test_tcp_probes_still_open_a_connection_each():
    async def go(nursery):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, lambda s: s.aclose(), listeners)
        async with Prober().open() as prober:
            await prober.probe(on_loopback("tcp", port), timeout=1.0)
            return prober.opened

    assert run(go) == 0
