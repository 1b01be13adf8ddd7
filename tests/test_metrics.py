"""Prometheus metrics: rendering from a Status, --metrics parsing, the HTTP server."""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from sdnsup import metrics
from sdnsup.aps import AccessPoint
from sdnsup.errors import ConfigError
from sdnsup.metrics import render, serve_metrics
from sdnsup.options import parse_listen
from sdnsup.slots import SlotEntry, SlotTable
from sdnsup.supervisor import PathHealth, Phase, Status


@dataclass(frozen=True)
class Result:
    ap: AccessPoint
    rtt: float | None
    sent: int = 3
    received: int = 3


def ap(i: int, ap_id: str | None = None) -> AccessPoint:
    return AccessPoint(ap_id or f"ap{i}", addr4=ipaddress.IPv4Address(f"10.77.0.{10 + i}"))


AP1, AP2, AP3 = ap(1), ap(2), ap(3)


def filled_status() -> Status:
    st = Status(
        phase=Phase.CONNECTED,
        kernel_via={4: AP1.addr4},
        active=AP1,
        active_since=1_700_000_100.0,
        aps=(AP1, AP2, AP3),
        ranking=(Result(AP1, 0.0055), Result(AP2, 0.0409, 3, 2), Result(AP3, None, 3, 0)),
        last_rtt={"ap1": 0.0052, "ap2": 0.0409, "gone": 0.001},
        failovers=2,
        cc_last_refresh=1_700_000_050.5,
        cc_url="https://cc.example.net",
        heals=5,
        started_at=1_700_000_000.25,
        slots=SlotTable(7),
        sockets_aborted=4,
    )
    gone = AccessPoint("drained", addr4=ipaddress.IPv4Address("10.77.0.19"))
    st.slots.entries[1] = SlotEntry(1, AP1, "active", 0.0, pinned=9)
    st.slots.entries[2] = SlotEntry(2, gone, "draining", 0.0, pinned=3)
    st.paths["ap2"] = PathHealth("broken", "forwards nothing", 0.0)
    st.track["icmp@10.10.10.5"] = ("timeout", None)
    st.suspicions, st.path_failures = 3, 1
    return st


def samples(text: str) -> dict[str, str]:
    """``{series: value}`` of every sample line."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            assert series not in out, f"duplicate series {series}"
            out[series] = value
    return out


def test_render_golden_lines():
    text = render(filled_status(), cidrs4=12, cidrs6=3)
    assert text.endswith("\n")
    got = samples(text)
    assert got == {
        "sdnsup_up": "1",
        'sdnsup_state{state="discovering"}': "0",
        'sdnsup_state{state="connected"}': "1",
        'sdnsup_state{state="failing_over"}': "0",
        'sdnsup_state{state="no_ap"}': "0",
        # keepalive's last RTT wins over the round's; "gone" is no longer listed
        'sdnsup_ap_rtt_seconds{ap="ap1"}': "0.0052",
        'sdnsup_ap_rtt_seconds{ap="ap2"}': "0.0409",
        'sdnsup_ap_alive{ap="ap1"}': "1",
        'sdnsup_ap_alive{ap="ap2"}': "1",
        'sdnsup_ap_alive{ap="ap3"}': "0",
        'sdnsup_ap_probe_loss_ratio{ap="ap1"}': "0",
        'sdnsup_ap_probe_loss_ratio{ap="ap2"}': "0.3333333333333333",
        'sdnsup_ap_probe_loss_ratio{ap="ap3"}': "1",
        'sdnsup_ap_alive{ap="drained"}': "0",
        'sdnsup_active_ap_info{ap="ap1"}': "1",
        **{
            f'sdnsup_ap_role{{ap="{ap}",role="{role}"}}': "1" if role == current else "0"
            for ap, current in (
                ("ap1", "active"),
                ("ap2", "idle"),
                ("ap3", "idle"),
                ("drained", "draining"),
            )
            for role in ("active", "draining", "idle")
        },
        'sdnsup_ap_pinned_connections{ap="ap1"}': "9",
        'sdnsup_ap_pinned_connections{ap="drained"}': "3",
        'sdnsup_ap_path_state{ap="ap2",state="ok"}': "0",
        'sdnsup_ap_path_state{ap="ap2",state="suspect"}': "0",
        'sdnsup_ap_path_state{ap="ap2",state="broken"}': "1",
        "sdnsup_path_suspicions_total": "3",
        "sdnsup_path_failures_total": "1",
        'sdnsup_track_target_up{target="icmp@10.10.10.5",via="active"}': "0",
        'sdnsup_track_target_up{target="icmp@10.10.10.5",via="other"}': "1",
        "sdnsup_slots_used": "2",
        "sdnsup_slots_capacity": "7",
        "sdnsup_sockets_aborted_total": "4",
        "sdnsup_failovers_total": "2",
        "sdnsup_heals_total": "5",
        "sdnsup_kernel_routed": "1",
        "sdnsup_apply_failures_total": "0",
        'sdnsup_reloads_total{result="ok"}': "0",
        'sdnsup_reloads_total{result="failed"}': "0",
        'sdnsup_cidrs{family="ipv4"}': "12",
        'sdnsup_cidrs{family="ipv6"}': "3",
        "sdnsup_cc_up": "1",
        "sdnsup_cc_last_refresh_timestamp_seconds": "1700000050.5",
        "sdnsup_saved_list_error": "0",
        "sdnsup_start_time_seconds": "1700000000.25",
    }


def test_render_help_and_type_lines():
    text = render(filled_status(), cidrs4=1, cidrs6=0)
    lines = text.splitlines()
    assert "# TYPE sdnsup_failovers_total counter" in lines
    assert "# TYPE sdnsup_heals_total counter" in lines
    assert "# TYPE sdnsup_ap_rtt_seconds gauge" in lines
    # every family: HELP, then TYPE, then its samples, and nothing of it elsewhere
    names = [line.split()[2] for line in lines if line.startswith("# TYPE ")]
    assert len(names) == len(set(names))
    for name in names:
        help_at = lines.index(next(x for x in lines if x.startswith(f"# HELP {name} ")))
        assert lines[help_at + 1].startswith(f"# TYPE {name} ")
    current = None
    for line in lines:
        if line.startswith("# TYPE "):
            current = line.split()[2]
        elif not line.startswith("#"):
            assert re.match(rf"{current}(\{{| )", line), line
    # sample syntax: name{label="value",...} number
    sample = re.compile(
        r'^[a-z_]+(\{[a-z_]+="(?:[^"\\\n]|\\.)*"(,[a-z_]+="(?:[^"\\\n]|\\.)*")*\})? \S+$'
    )
    assert all(sample.match(x) for x in lines if not x.startswith("#"))


def test_render_escapes_label_values():
    odd = ap(4, 'ap "4"\\west\nline')
    st = Status(phase=Phase.CONNECTED, active=odd, aps=(odd,), last_rtt={odd.id: 0.001})
    lines = render(st, cidrs4=0, cidrs6=0).splitlines()
    # backslash -> \\, quote -> \", newline -> \n (format 0.0.4)
    assert 'sdnsup_ap_rtt_seconds{ap="ap \\"4\\"\\\\west\\nline"} 0.001' in lines
    assert 'sdnsup_active_ap_info{ap="ap \\"4\\"\\\\west\\nline"} 1' in lines
    assert "line" not in [x.split()[0] for x in lines]  # the newline did not split a line


def test_render_while_discovering():
    st = Status(started_at=1_700_000_000.0)
    got = samples(render(st, cidrs4=1, cidrs6=0))
    assert got['sdnsup_state{state="discovering"}'] == "1"
    assert not any(s.startswith("sdnsup_active_ap_info{") for s in got)
    assert not any(s.startswith("sdnsup_ap_") for s in got)
    # no CC: no cc_up; never refreshed: no timestamp (0 would mean "54 years stale")
    assert "sdnsup_cc_up" not in got
    assert "sdnsup_cc_last_refresh_timestamp_seconds" not in got
    assert got["sdnsup_failovers_total"] == "0"


def test_render_cc_down_and_failover_in_progress():
    st = filled_status()
    st.cc_error = "CC https://cc.example.net did not answer within 5 s"
    st.phase = Phase.FAILING_OVER
    got = samples(render(st, cidrs4=1, cidrs6=0))
    assert got["sdnsup_cc_up"] == "0"
    assert got['sdnsup_state{state="failing_over"}'] == "1"
    # not CONNECTED: the active AP's liveness comes from its last round again
    assert got['sdnsup_ap_alive{ap="ap1"}'] == "1"


def test_render_no_ap():
    st = filled_status()
    st.phase, st.active = Phase.NO_AP, None
    got = samples(render(st, cidrs4=1, cidrs6=0))
    assert got['sdnsup_state{state="no_ap"}'] == "1"
    assert not any(s.startswith("sdnsup_active_ap_info{") for s in got)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9730", ("127.0.0.1", 9730)),
        ("[::1]:9730", ("::1", 9730)),
        (":9730", ("", 9730)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("[::]:65535", ("::", 65535)),
        (" 10.0.0.1:9730 ", ("10.0.0.1", 9730)),
    ],
)
def test_parse_listen(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "9730",
        "127.0.0.1",
        "127.0.0.1:",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:http",
        "127.0.0.1:-1",
        "::1:9730",
        "[::1]",
        "[127.0.0.1]:9730",
        "[nope]:9730",
        "localhost:9730",
        "300.1.1.1:9730",
        "",
    ],
)
def test_parse_listen_rejects(text):
    with pytest.raises(ConfigError, match="ADDR:PORT"):
        parse_listen(text)


# --- the server ------------------------------------------------------------------------------


async def exchange(port: int, request: bytes, host: str = "127.0.0.1") -> bytes:
    """Send ``request`` and read the response until the server closes."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


def split(response: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status, *headers = head.decode().split("\r\n")
    return status, dict(h.split(": ", 1) for h in headers), body


def run_server(client, get_text=lambda: "sdnsup_up 1\n", host="127.0.0.1"):
    """Start serve_metrics on an ephemeral port, run ``client(port)``, stop the server."""

    async def main():
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve_metrics, host, 0, get_text)
                assert port > 0
                result = await client(port)
                nursery.cancel_scope.cancel()
        return result

    return trio.run(main)


def test_round_trip():
    text = render(filled_status(), cidrs4=12, cidrs6=3)

    async def client(port):
        return await exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n")

    status, headers, body = split(run_server(client, lambda: text))
    assert status == "HTTP/1.0 200 OK"
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert int(headers["Content-Length"]) == len(body)
    assert body.decode() == text


def test_round_trip_ipv6_all_addresses():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")

    async def client(port):
        try:
            v6 = await exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n", host="::1")
        except OSError:
            v6 = None  # IPv6 loopback disabled on this host
        v4 = await exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n", host="127.0.0.1")
        return v6, v4

    v6, v4 = run_server(client, host="")
    assert split(v4)[0] == "HTTP/1.0 200 OK"
    assert v6 is None or split(v6)[0] == "HTTP/1.0 200 OK"


def test_get_text_runs_per_scrape():
    calls = []

    def get_text():
        calls.append(1)
        return f"sdnsup_heals_total {len(calls)}\n"

    async def client(port):
        a = await exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n")
        b = await exchange(port, b"GET /metrics?x=1 HTTP/1.0\n\n")
        return a, b

    a, b = run_server(client, get_text)
    assert split(a)[2] == b"sdnsup_heals_total 1\n"
    assert split(b)[2] == b"sdnsup_heals_total 2\n"


@pytest.mark.parametrize(
    "request_",
    [
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET /metricsx HTTP/1.0\r\n\r\n",
        b"POST /metrics HTTP/1.0\r\n\r\n",
    ],
)
def test_anything_else_is_404(request_):
    async def client(port):
        return await exchange(port, request_)

    status, headers, body = split(run_server(client))
    assert status == "HTTP/1.0 404 Not Found"
    assert int(headers["Content-Length"]) == len(body)


def test_head_has_no_body():
    async def client(port):
        return await exchange(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")

    status, headers, body = split(run_server(client))
    assert status == "HTTP/1.0 200 OK"
    assert headers["Content-Length"] == str(len("sdnsup_up 1\n"))
    assert body == b""


@pytest.mark.parametrize(
    "request_",
    [
        b"hello\r\n\r\n",
        b"GET /metrics\r\n\r\n",
        b"GET /metrics SPDY/3\r\n\r\n",
        b"GET  /metrics HTTP/1.0\r\n\r\n",
        b"\xff\xfe\r\n\r\n",
    ],
)
def test_malformed_request_is_400(request_):
    async def client(port):
        return await exchange(port, request_)

    assert split(run_server(client))[0] == "HTTP/1.0 400 Bad Request"


def test_oversized_request_is_400():
    async def client(port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            head = b"GET /metrics HTTP/1.0\r\nX: " + b"a" * metrics.MAX_REQUEST_BYTES
            await stream.send_all(head)
            return await stream.receive_some(65536)

    assert run_server(client).startswith(b"HTTP/1.0 400 Bad Request\r\n")


def test_rendering_error_is_500_and_server_survives():
    def broken() -> str:
        raise RuntimeError("bug")

    async def client(port):
        first = await exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n")
        second = await exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n")
        return first, second

    first, second = run_server(client, broken)
    assert split(first)[0] == "HTTP/1.0 500 Internal Server Error"
    assert split(second)[0] == "HTTP/1.0 500 Internal Server Error"


def test_slow_client_is_closed_after_the_read_timeout():
    async def main():
        clock_start = trio.current_time()
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_metrics, "127.0.0.1", 0, lambda: "")
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"GET /metrics HTTP/1.0\r\n")  # never ends the head
                assert await stream.receive_some(100) == b""  # closed, no answer
            nursery.cancel_scope.cancel()
        return trio.current_time() - clock_start

    # virtual time: the server's 5 s deadline passes at once once everything waits
    elapsed = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.05))
    assert elapsed == pytest.approx(metrics.READ_TIMEOUT, abs=0.5)


def test_a_flood_of_idle_connections_cannot_keep_a_scrape_out(monkeypatch):
    """Every slot held by a connection that sends nothing: the next connection closes the
    oldest of them instead of waiting READ_TIMEOUT in the backlog (it used to)."""
    monkeypatch.setattr(metrics, "MAX_CONNECTIONS", 4)

    async def client(port):
        hogs = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(8)]
        scraper = await trio.open_tcp_stream("127.0.0.1", port)
        await scraper.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        data = b""
        with trio.fail_after(1):  # well inside READ_TIMEOUT (5 s)
            while chunk := await scraper.receive_some(65536):
                data += chunk
        await scraper.aclose()
        # the oldest hogs were closed to make room: they read EOF
        with trio.fail_after(1):
            assert await hogs[0].receive_some(100) == b""
        for hog in hogs:
            await hog.aclose()
        return data

    assert split(run_server(client))[0] == "HTTP/1.0 200 OK"


def test_address_in_use_is_a_config_error():
    async def main():
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_metrics, "127.0.0.1", 0, lambda: "")
            with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
                await nursery.start(serve_metrics, "127.0.0.1", port, lambda: "")
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_cancellation_stops_the_server_with_a_client_connected():
    async def main():
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve_metrics, "127.0.0.1", 0, lambda: "")
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                # the connection is accepted, and its handler waits for the request
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
            # the listener is closed: a new connection is refused
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", port)
            await stream.aclose()

    trio.run(main)
