"""systemd notifications against a fake NOTIFY_SOCKET (a datagram socket we bind)."""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from sdnsup.notify import MAX_STATUS_BYTES, Notifier, watchdog_loop


@pytest.fixture
def fake_systemd(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd, and its NOTIFY_SOCKET value."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    try:
        yield sock, str(path)
    finally:
        sock.close()


@pytest.fixture
def fake_systemd_abstract() -> Iterator[tuple[socket.socket, str]]:
    name = f"sdnsup-test-{secrets.token_hex(8)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    try:
        yield sock, "@" + name
    finally:
        sock.close()


def pending(sock: socket.socket) -> list[str]:
    """Every datagram waiting on ``sock``, decoded."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(2)


def test_ready_status_stopping_in_order(fake_systemd):
    sock, address = fake_systemd
    with Notifier.from_env({"NOTIFY_SOCKET": address}) as n:
        assert n.enabled
        n.ready("connected via ap1 (5.8 ms)")
        n.status("failover: now via ap2")
        n.stopping()
    assert pending(sock) == [
        "READY=1\nSTATUS=connected via ap1 (5.8 ms)",
        "STATUS=failover: now via ap2",
        "STOPPING=1",
    ]


def test_abstract_socket(fake_systemd_abstract):
    sock, address = fake_systemd_abstract
    with Notifier.from_env({"NOTIFY_SOCKET": address}) as n:
        n.ready("up")
        n.stopping()
    assert pending(sock) == ["READY=1\nSTATUS=up", "STOPPING=1"]


def test_status_cannot_inject_assignments(fake_systemd):
    # An AP id or error text with a newline must not become a READY=1 or MAINPID= line.
    sock, address = fake_systemd
    with Notifier.from_env({"NOTIFY_SOCKET": address}) as n:
        n.status("ap1\nREADY=1\r\nMAINPID=1")
        n.status("x" * 5000)
    injected, long = pending(sock)
    assert injected == "STATUS=ap1 READY=1 MAINPID=1"
    assert long == "STATUS=" + "x" * MAX_STATUS_BYTES


def test_without_notify_socket_everything_is_a_noop(tmp_path):
    n = Notifier.from_env({"WATCHDOG_USEC": "10000000"})
    assert not n.enabled
    assert n.watchdog_interval is None
    n.ready("up")
    n.status("x")
    n.watchdog()
    n.stopping()
    n.close()

    async def main() -> None:
        with trio.move_on_after(1) as scope:
            await watchdog_loop(n)  # returns at once
        assert not scope.cancelled_caught

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.parametrize("bad", ["relative/path", "vsock:2:1234"])
def test_unsupported_notify_socket_is_a_noop(bad, caplog):
    with caplog.at_level(logging.WARNING, logger="sdnsup"):
        n = Notifier.from_env({"NOTIFY_SOCKET": bad})
    assert not n.enabled
    assert "not a path or @name" in caplog.text
    n.ready("up")


def test_watchdog_interval_is_half_of_watchdog_usec(fake_systemd):
    _, address = fake_systemd
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "10000000"}
    assert Notifier.from_env(env).watchdog_interval == 5.0
    env["WATCHDOG_PID"] = str(os.getpid())
    assert Notifier.from_env(env).watchdog_interval == 5.0


@pytest.mark.parametrize("usec", ["0", "-5", "ten", ""])
def test_bad_watchdog_usec_means_no_watchdog(fake_systemd, usec):
    _, address = fake_systemd
    n = Notifier.from_env({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": usec})
    assert n.watchdog_interval is None


def run_watchdog(notifier: Notifier, sock: socket.socket, seconds: float) -> list[float]:
    """Run watchdog_loop for ``seconds`` of virtual time; the times WATCHDOG=1 arrived."""
    arrivals: list[float] = []

    async def main() -> None:
        tsock = trio.socket.from_stdlib_socket(sock.dup())
        with tsock:

            async def receive() -> None:
                while True:
                    data = await tsock.recv(4096)
                    assert data == b"WATCHDOG=1"
                    arrivals.append(trio.current_time())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                with trio.move_on_after(seconds):
                    await nursery.start(watchdog_loop, notifier)
                    await trio.sleep_forever()
                nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return arrivals


def test_watchdog_loop_pings_at_half_the_interval(fake_systemd):
    sock, address = fake_systemd
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}
    with Notifier.from_env(env) as n:
        arrivals = run_watchdog(n, sock, 22.0)
    # at once, then every 5 s (WatchdogSec=10): 0, 5, 10, 15, 20
    assert arrivals == pytest.approx([0.0, 5.0, 10.0, 15.0, 20.0])


def test_watchdog_pid_of_another_process_disables_the_watchdog(fake_systemd):
    sock, address = fake_systemd
    other = str(os.getpid() + 1)  # e.g. a wrapper script's child inherited the variables
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": other}
    with Notifier.from_env(env) as n:
        assert n.watchdog_interval is None
        n.watchdog()
        assert run_watchdog(n, sock, 30.0) == []
        n.ready("up")  # notifications other than the watchdog still go out
    assert pending(sock) == ["READY=1\nSTATUS=up"]


def test_vanished_socket_warns_once_and_never_raises(fake_systemd, caplog):
    sock, address = fake_systemd
    with Notifier.from_env({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"}) as n:
        n.status("before")
        assert pending(sock) == ["STATUS=before"]
        sock.close()
        os.unlink(address)
        with caplog.at_level(logging.DEBUG, logger="sdnsup"):
            n.ready("up")
            n.watchdog()
            n.stopping()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cannot notify systemd (READY=1)" in warnings[0].getMessage()
    assert address in warnings[0].getMessage()
    assert len([r for r in caplog.records if "cannot notify" in r.getMessage()]) == 3


def test_socket_never_bound_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="sdnsup"):
        with Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody")}) as n:
            n.ready("up")
    assert "cannot notify systemd" in caplog.text
