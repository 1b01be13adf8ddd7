"""The status snapshot, its human view, and the control socket (real AF_UNIX in tmp_path)."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import stat
import time

import pytest
import trio
import trio.testing

from sdnsup import control
from sdnsup.aps import AccessPoint, ProbeSpec
from sdnsup.control import (
    SCHEMA_VERSION,
    ControlError,
    QueryError,
    default_socket_path,
    exit_code,
    query,
    render,
    serve_control,
    snapshot,
)
from sdnsup.probe import ProbeResult
from sdnsup.slots import SlotEntry, SlotTable
from sdnsup.supervisor import PathHealth, Phase, Status

T0 = 1_764_100_000.0  # 2025-11-25T19:46:40Z
NOW = T0 + 3600.0

AP1 = AccessPoint("ap1", addr4=ipaddress.IPv4Address("172.31.1.11"))
AP2 = AccessPoint(
    "ap2",
    addr4=ipaddress.IPv4Address("172.31.1.12"),
    addr6=ipaddress.IPv6Address("fd31:1::12"),
    probe=ProbeSpec("http", 7301, "/health"),
)
AP3 = AccessPoint("ap3", addr6=ipaddress.IPv6Address("fd31:1::13"), probe=ProbeSpec("icmp", 0))
AP4 = AccessPoint("ap4", addr4=ipaddress.IPv4Address("172.31.1.14"), weight=2)
# no longer listed by the CC, still carrying connections
AP5 = AccessPoint("ap5", addr4=ipaddress.IPv4Address("172.31.1.15"))


def filled_status() -> Status:
    st = Status(
        phase=Phase.CONNECTED,
        kernel_via={4: AP2.addr4},
        active=AP2,
        active_since=NOW - 192.04,
        aps=(AP1, AP2, AP3, AP4),
        ranking=(
            ProbeResult(AP2, 0.00262, 3, 3),
            ProbeResult(AP1, 0.04123, 3, 2),
            ProbeResult(AP3, None, 3, 0),
        ),
        last_rtt={"ap1": 0.04123, "ap2": 0.00251, "ap3": 0.0199},
        failovers=1,
        last_failover="AP ap1 (172.31.1.11) dead: 3 probes missed",
        last_failover_at=NOW - 303.46,
        cc_last_refresh=NOW - 12.0,
        cc_error="CC answered HTTP 503",
        cc_url="https://cc.example.net",
        heals=2,
        last_heal="nftables table inet sdnsup deleted",
        last_heal_at=NOW - 5.0,
        started_at=T0,
        slots=SlotTable(7),
        sockets_aborted=2,
        cc_next_refresh=NOW + 41.3,
        aps_source="saved",
        aps_fetched_at=NOW - 8000.0,
        host_id="4c4c4544",
    )
    st.slots.entries[2] = SlotEntry(2, AP2, "active", NOW - 192.04, pinned=7)
    st.slots.entries[1] = SlotEntry(1, AP1, "draining", NOW - 192.04, pinned=3)
    st.slots.entries[3] = SlotEntry(3, AP5, "draining", NOW - 500.0, pinned=1)
    st.paths["ap1"] = PathHealth("broken", "tracked targets answer only another way", NOW - 303.46)
    st.paths["ap2"] = PathHealth("ok", "tracked targets: through it 1/1 answered", NOW - 1.0)
    st.track["tcp:22@10.10.10.5"] = (None, None)
    st.path_failures = 1
    return st


def ap_row(
    ap,
    *,
    probe,
    rtt,
    probed,
    rank,
    loss,
    alive,
    active,
    role="idle",
    slot=None,
    pinned=None,
    path=None,
):
    return {
        "id": ap.id,
        "addr": str(ap.addr4) if ap.addr4 else None,
        "addr6": str(ap.addr6) if ap.addr6 else None,
        "weight": ap.weight,
        "probe": probe,
        "rtt_ms": rtt,
        "probed": probed,
        "rank": rank,
        "loss": loss,
        "alive": alive,
        "active": active,
        "role": role,
        "slot": slot,
        "pinned": pinned,
        "path": path,
    }


UDP = {"kind": "udp", "port": 7300, "path": None}

GOLDEN = {
    "schema": 1,
    "pid": 4242,
    "time": "2025-11-25T20:46:40.000Z",
    "started_at": "2025-11-25T19:46:40.000Z",
    "uptime_s": 3600.0,
    "state": "connected",
    "connected": True,
    "host_id": "4c4c4544",
    "no_ap_policy": "fallback",
    "active_ap": {
        "id": "ap2",
        "addr": "172.31.1.12",
        "addr6": "fd31:1::12",
        "since": "2025-11-25T20:43:27.960Z",
        "since_ago_s": 192.0,
        "rtt_ms": 2.5,
    },
    "aps": [
        ap_row(
            AP1,
            probe=UDP,
            rtt=41.2,
            probed=True,
            rank=2,
            loss=0.333,
            alive=True,
            active=False,
            role="draining",
            slot=1,
            pinned=3,
            path={
                "state": "broken",
                "evidence": "tracked targets answer only another way",
                "at": "2025-11-25T20:41:36.540Z",
            },
        ),
        ap_row(
            AP2,
            probe={"kind": "http", "port": 7301, "path": "/health"},
            rtt=2.5,
            probed=True,
            rank=1,
            loss=0.0,
            alive=True,
            active=True,
            role="active",
            slot=2,
            pinned=7,
            path={
                "state": "ok",
                "evidence": "tracked targets: through it 1/1 answered",
                "at": "2025-11-25T20:46:39.000Z",
            },
        ),
        ap_row(
            AP3,
            probe={"kind": "icmp", "port": None, "path": None},
            rtt=19.9,
            probed=True,
            rank=3,
            loss=1.0,
            alive=False,
            active=False,
        ),
        ap_row(
            AP4, probe=UDP, rtt=None, probed=False, rank=None, loss=None, alive=None, active=False
        ),
        ap_row(
            AP5,
            probe=UDP,
            rtt=None,
            probed=False,
            rank=None,
            loss=None,
            alive=None,
            active=False,
            role="draining",
            slot=3,
            pinned=1,
        ),
    ],
    "cidrs": {"ipv4": 2, "ipv6": 1},
    "paths": {
        "suspicions": 0,
        "failures": 1,
        "track": [{"target": "tcp:22@10.10.10.5", "active": None, "other": None}],
    },
    "slots": {"used": 3, "capacity": 7, "sockets_aborted": 2, "error": None},
    "failovers": {
        "count": 1,
        "last_cause": "AP ap1 (172.31.1.11) dead: 3 probes missed",
        "last_at": "2025-11-25T20:41:36.540Z",
        "last_ago_s": 303.5,
    },
    "heals": {
        "count": 2,
        "last_cause": "nftables table inet sdnsup deleted",
        "last_at": "2025-11-25T20:46:35.000Z",
        "last_ago_s": 5.0,
    },
    "reload": {"count": 0, "failures": 0, "last_at": None, "error": None},
    "kernel": {"routed": True, "problems": [], "apply_error": None, "apply_failures": 0},
    "cc": {
        "url": "https://cc.example.net",
        "last_refresh": "2025-11-25T20:46:28.000Z",
        "last_refresh_ago_s": 12.0,
        "next_request_in_s": 41.3,
        "error": "CC answered HTTP 503",
    },
    "ap_list": {
        "source": "saved",
        "received": "2025-11-25T18:33:20.000Z",
        "age_s": 8000.0,
        "saved_error": None,
    },
}


def filled_snapshot() -> dict:
    return snapshot(filled_status(), cidrs4=2, cidrs6=1, pid=4242, now=NOW, no_ap="fallback")


# --- snapshot --------------------------------------------------------------------------------


def test_snapshot_golden():
    snap = filled_snapshot()
    assert snap == GOLDEN
    # JSON-able as is, and unchanged by a round trip (no tuples, no non-str keys)
    assert json.loads(json.dumps(snap, sort_keys=True)) == snap


def test_snapshot_types_and_units():
    snap = filled_snapshot()
    for ap in snap["aps"]:
        assert ap["rtt_ms"] is None or isinstance(ap["rtt_ms"], float)
        assert ap["loss"] is None or 0.0 <= ap["loss"] <= 1.0
    assert isinstance(snap["uptime_s"], float)
    assert snap["time"].endswith("Z")


def test_snapshot_of_a_fresh_daemon_is_mostly_null():
    snap = snapshot(Status(started_at=T0), cidrs4=1, cidrs6=0, pid=1, now=T0 + 0.04)
    assert snap["state"] == "discovering"
    assert snap["connected"] is False
    assert snap["active_ap"] is None
    assert snap["aps"] == []
    assert snap["no_ap_policy"] is None
    assert snap["uptime_s"] == 0.0
    assert snap["failovers"] == {
        "count": 0,
        "last_cause": None,
        "last_at": None,
        "last_ago_s": None,
    }
    assert snap["heals"] == {"count": 0, "last_cause": None, "last_at": None, "last_ago_s": None}
    assert snap["cc"] == {
        "url": None,
        "last_refresh": None,
        "last_refresh_ago_s": None,
        "next_request_in_s": None,
        "error": None,
    }


def test_snapshot_shows_an_active_ap_the_directory_dropped_and_clamps_clock_steps():
    st = Status(phase=Phase.CONNECTED, active=AP1, active_since=NOW + 5, aps=(AP2,), started_at=T0)
    snap = snapshot(st, cidrs4=0, cidrs6=0, pid=1, now=NOW)
    assert [(a["id"], a["active"]) for a in snap["aps"]] == [("ap2", False), ("ap1", True)]
    assert snap["active_ap"]["since_ago_s"] == 0.0  # wall clock stepped back: not negative


def test_snapshot_failing_over_is_not_connected():
    st = Status(phase=Phase.FAILING_OVER, active=AP1, aps=(AP1,))
    assert snapshot(st, cidrs4=0, cidrs6=0, pid=1)["connected"] is False


# --- render and exit code --------------------------------------------------------------------


def test_render_connected():
    text = render(filled_snapshot())
    lines = text.splitlines()
    assert lines[0] == (
        "sdnsup (pid 4242): connected via ap2 (172.31.1.12+fd31:1::12) for 3m12s, last RTT 2.5 ms"
    )
    assert "up 1h00m, steering 2 IPv4 + 1 IPv6 CIDRs" in lines
    header = next(line for line in lines if "LAST RTT" in line)
    rows = {line.split()[0]: line for line in lines if line.strip()}
    active = rows["*"]
    assert active.split() == [
        "*", "ap2", "172.31.1.12+fd31:1::12", "1", "http:7301/health", "2.5", "ms", "0%",
        "alive", "ok", "active", "(slot", "2)", "7",
    ]  # fmt: skip
    assert rows["ap1"].split()[1:] == [
        "172.31.1.11", "1", "udp:7300", "41.2", "ms", "33%", "alive", "broken", "draining", "(slot",
        "1)", "3",
    ]  # fmt: skip
    assert rows["ap3"].split()[1:] == [
        "fd31:1::13", "1", "icmp", "19.9", "ms", "100%", "dead", "-", "idle", "-"
    ]  # fmt: skip
    assert rows["ap4"].split()[1:] == [
        "172.31.1.14", "2", "udp:7300", "-", "-", "not", "probed", "-", "idle", "-"
    ]  # fmt: skip
    assert rows["ap5"].split()[-4:] == ["draining", "(slot", "3)", "1"]
    assert "AP slots:  3 of 7 in use, 2 sockets of dead APs aborted" in lines
    assert (
        "path checks: 0 suspicions, 1 APs found forwarding nothing; tracked through the active "
        "AP: tcp:22@10.10.10.5 ok"
    ) in lines
    # aligned: every column starts at the same offset in the header and the rows
    for col in (
        "ADDRESS",
        "WEIGHT",
        "PROBE",
        "LAST RTT",
        "LOSS",
        "STATE",
        "PATH",
        "ROLE",
        "PINNED",
    ):
        at = header.index(col)
        for row in (rows["*"], rows["ap1"], rows["ap3"], rows["ap4"]):
            assert row[at - 1] == " " and row[at] != " ", (col, row)
    assert "failovers: 1, last 5m03s ago: AP ap1 (172.31.1.11) dead: 3 probes missed" in lines
    assert "heals:     2, last 5s ago: nftables table inet sdnsup deleted" in lines
    assert "CC:        https://cc.example.net, last refresh 12s ago, next request in 41s" in lines
    assert (
        "AP list:   from disk, received from the CC 2h13m ago; the CC has not confirmed it yet"
    ) in lines
    assert "CC error:  CC answered HTTP 503" in lines
    assert text.endswith("\n") and "\x1b" not in text


@pytest.mark.parametrize(
    ("status", "no_ap", "line"),
    [
        (Status(), None, "discovering: no AP chosen yet"),
        (
            Status(phase=Phase.NO_AP, aps=(AP1,)),
            "fallback",
            "no AP answers: traffic to the CIDRs takes the normal route; still probing",
        ),
        (
            Status(phase=Phase.NO_AP),
            "blackhole",
            "no AP answers: traffic to the CIDRs is dropped (--no-ap blackhole); still probing",
        ),
        (Status(phase=Phase.FAILING_OVER, active=AP1), None, "failing over from ap1 (172.31.1.11)"),
    ],
)
def test_render_not_connected(status, no_ap, line):
    text = render(snapshot(status, cidrs4=1, cidrs6=0, pid=7, no_ap=no_ap))
    assert text.splitlines()[0] == f"sdnsup (pid 7): {line}"
    assert "failovers: 0" in text
    assert "heals:     0" in text


def test_render_static_aps_and_no_cc():
    ap = AccessPoint("10.77.0.11", addr4=ipaddress.IPv4Address("10.77.0.11"))
    st = Status(
        phase=Phase.CONNECTED,
        active=ap,
        active_since=NOW - 4000,
        aps=(ap,),
        kernel_via={4: ap.addr4},
    )
    text = render(snapshot(st, cidrs4=1, cidrs6=0, pid=7, now=NOW))
    assert "connected via 10.77.0.11 for 1h06m" in text
    assert "CC:        none (static --ap list)" in text


@pytest.mark.parametrize(
    ("snap", "code"),
    [
        (None, 3),
        ({"connected": True, "state": "connected"}, 0),
        ({"connected": False, "state": "discovering"}, 1),
        ({"connected": False, "state": "no AP"}, 1),
        ({"connected": False, "state": "failing over"}, 1),
        ({"error": "unknown request"}, 4),
    ],
)
def test_exit_code(snap, code):
    assert exit_code(snap) == code


def test_exit_code_of_real_snapshots():
    assert exit_code(filled_snapshot()) == 0
    assert exit_code(snapshot(Status(), cidrs4=0, cidrs6=0, pid=1)) == 1


def test_default_socket_path_is_per_namespace():
    assert str(default_socket_path(4026531840)) == "/run/sdnsup/control-4026531840.sock"
    ino = os.stat("/proc/self/ns/net").st_ino
    assert default_socket_path() == control.RUN_DIR / f"control-{ino}.sock"


# --- server and client -----------------------------------------------------------------------


def sock_path(tmp_path):
    return tmp_path / "run" / "control.sock"


def serve_and(tmp_path, client, *, get_snapshot=None, clock=None, **kwargs):
    """Run serve_control in tmp_path, run ``await client(path)``, then cancel the server.

    A client that queries from a thread (:func:`query` blocks) needs the real clock: a
    MockClock would jump past the deadlines while the thread waits for the kernel."""
    path = sock_path(tmp_path)
    get_snapshot = get_snapshot or filled_snapshot

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_control(
                path, get_snapshot, task_status=task_status, **kwargs
            ))  # fmt: skip
            with trio.fail_after(10):
                result = await client(path)
            nursery.cancel_scope.cancel()
        return result

    return trio.run(main, clock=clock)


async def query_in_thread(path, timeout=2.0):
    return await trio.to_thread.run_sync(query, path, timeout)


async def raw_request(path, data: bytes, *, eof: bool = False) -> bytes:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        await sock.connect(str(path))
        await sock.send(data)
        if eof:
            sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := await sock.recv(65536):
            reply += chunk
    return reply


def test_round_trip(tmp_path):
    assert serve_and(tmp_path, query_in_thread) == filled_snapshot()


def test_socket_is_0600_in_a_0700_dir_and_gone_after_cancel(tmp_path):
    path = sock_path(tmp_path)

    async def check(path):
        return os.lstat(path), os.lstat(path.parent)

    sock_st, dir_st = serve_and(tmp_path, check)
    assert stat.S_ISSOCK(sock_st.st_mode)
    assert stat.S_IMODE(sock_st.st_mode) == 0o600
    assert stat.S_ISDIR(dir_st.st_mode)
    assert stat.S_IMODE(dir_st.st_mode) == 0o700
    assert not path.exists()
    assert path.parent.is_dir()  # the directory stays (the sysctl record lives there too)
    assert query(path) is None


def test_umask_is_restored(tmp_path):
    before = os.umask(0o022)
    try:

        async def umask_now(path):
            now = os.umask(0o022)
            os.umask(now)
            return now

        assert serve_and(tmp_path, umask_now) == 0o022
    finally:
        os.umask(before)


def test_stale_socket_is_replaced(tmp_path):
    path = sock_path(tmp_path)
    path.parent.mkdir(mode=0o700)
    # a socket file nobody listens on: what a SIGKILLed daemon leaves behind
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    assert query(path) is None  # ECONNREFUSED: no daemon

    async def client(path):
        return stat.S_IMODE(os.lstat(path).st_mode), await query_in_thread(path)

    mode, snap = serve_and(tmp_path, client)
    assert mode == 0o600
    assert snap["pid"] == 4242  # a listener now answers at the same path


def test_query_on_missing_path_or_dir_returns_none(tmp_path):
    assert query(tmp_path / "nope.sock") is None
    assert query(tmp_path / "no-dir" / "nope.sock") is None


def run_server(path):
    async def main():
        await serve_control(path, filled_snapshot)

    trio.run(main)


def test_symlink_at_socket_path_is_refused(tmp_path):
    path = sock_path(tmp_path)
    path.parent.mkdir(mode=0o700)
    target = tmp_path / "precious"
    target.write_text("keep me")
    path.symlink_to(target)
    with pytest.raises(ControlError, match="is a symlink"):
        run_server(path)
    assert path.is_symlink() and target.read_text() == "keep me"


def test_regular_file_at_socket_path_is_refused(tmp_path):
    path = sock_path(tmp_path)
    path.parent.mkdir(mode=0o700)
    path.write_text("not a socket")
    with pytest.raises(ControlError, match="not a socket"):
        run_server(path)
    assert path.read_text() == "not a socket"


def test_group_writable_run_dir_is_refused(tmp_path):
    path = sock_path(tmp_path)
    path.parent.mkdir()
    path.parent.chmod(0o770)
    with pytest.raises(ControlError, match="writable by group or others"):
        run_server(path)
    assert not path.exists()


def test_symlinked_run_dir_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "run").symlink_to(real)
    with pytest.raises(ControlError, match="is a symlink"):
        run_server(sock_path(tmp_path))
    assert list(real.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_run_dir_owned_by_someone_else_is_refused(tmp_path):
    path = sock_path(tmp_path)
    path.parent.mkdir(mode=0o700)
    os.chown(path.parent, 12345, 12345)
    with pytest.raises(ControlError, match="owned by uid 12345"):
        run_server(path)


def test_unknown_and_oversized_requests_get_an_error(tmp_path):
    async def client(path):
        return (
            await raw_request(path, b"reboot\n"),
            await raw_request(path, b"x" * 5000 + b"\n"),
            await raw_request(path, b"status", eof=True),  # no newline, then EOF: still answered
        )

    unknown, oversized, no_newline = serve_and(tmp_path, client)
    assert json.loads(unknown) == {
        "error": "unknown request 'reboot'; the only request is 'status'"
    }
    assert json.loads(oversized) == {"error": "request longer than 256 bytes"}
    assert unknown.endswith(b"\n") and unknown.count(b"\n") == 1
    assert json.loads(no_newline)["schema"] == SCHEMA_VERSION


def test_reply_is_one_sorted_json_line(tmp_path):
    async def client(path):
        return await raw_request(path, b"status\r\n")

    reply = serve_and(tmp_path, client)
    assert reply == (json.dumps(filled_snapshot(), sort_keys=True) + "\n").encode()


def test_a_failing_snapshot_answers_an_error_and_keeps_serving(tmp_path):
    calls = []

    def get_snapshot():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return filled_snapshot()

    async def client(path):
        first = await raw_request(path, b"status\n")
        return first, await query_in_thread(path)

    first, second = serve_and(tmp_path, client, get_snapshot=get_snapshot)
    assert "internal error" in json.loads(first)["error"]
    assert second == filled_snapshot()


def test_query_raises_on_an_error_answer(tmp_path):
    def get_snapshot():
        return {"error": "nope"}

    async def client(path):
        with pytest.raises(QueryError, match="answered with an error: nope"):
            await query_in_thread(path)

    serve_and(tmp_path, client, get_snapshot=get_snapshot)


def test_query_refuses_another_schema(tmp_path):
    async def client(path):
        with pytest.raises(QueryError, match="schema 2"):
            await query_in_thread(path)

    serve_and(tmp_path, client, get_snapshot=lambda: {"schema": 2})


def test_query_times_out_on_a_daemon_that_never_answers(tmp_path):
    path = tmp_path / "hung.sock"
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with hung:
        hung.bind(str(path))
        hung.listen(1)  # the kernel accepts the connection; nobody ever answers
        t0 = time.monotonic()
        with pytest.raises(QueryError, match=r"did not answer within 0\.2 s") as info:
            query(path, timeout=0.2)
        assert time.monotonic() - t0 < 1.0
        assert info.value.exit_code == 4


def test_slow_client_is_dropped_without_blocking_others(tmp_path):
    timeout = 0.3

    async def client(path):
        slow = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with slow:
            await slow.connect(str(path))
            t0 = trio.current_time()
            # another client is served at once while the slow one sits there
            other = json.loads(await raw_request(path, b"status\n"))
            served_after = trio.current_time() - t0
            # the slow client, which never sent its line, is then disconnected
            with trio.fail_after(5):
                eof = await slow.recv(100)
            dropped_after = trio.current_time() - t0
        return other, served_after, eof, dropped_after

    # Virtual time: both clients are trio sockets of this process, whose bytes are in the
    # server's buffer when send() returns, so the clock only jumps once every task waits for
    # the next deadline: the slow client's.
    clock = trio.testing.MockClock(autojump_threshold=0)
    other, served_after, eof, dropped_after = serve_and(
        tmp_path, client, timeout=timeout, clock=clock
    )
    assert other["pid"] == 4242
    assert served_after == 0  # not after the slow client's timeout
    assert eof == b""
    assert dropped_after == pytest.approx(timeout)


def test_socket_removed_when_server_is_cancelled_and_not_someone_elses(tmp_path):
    path = sock_path(tmp_path)

    async def main():
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_control, path, filled_snapshot)
                assert path.is_socket()
                scope.cancel()
        assert not path.exists()

    trio.run(main)

    async def replaced():
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, path, filled_snapshot)
            # someone replaces the file while we serve: on exit we must leave theirs alone
            path.unlink()
            path.write_text("theirs")
            nursery.cancel_scope.cancel()

    trio.run(replaced)
    assert path.read_text() == "theirs"


def test_status_command(tmp_path):
    import io

    out = io.StringIO()
    assert control.status_command(tmp_path / "none.sock", out=out) == 3
    assert "not running" in out.getvalue()
    out = io.StringIO()
    assert control.status_command(tmp_path / "none.sock", as_json=True, out=out) == 3
    gone = json.loads(out.getvalue())
    assert gone["state"] == "not running" and gone["connected"] is False
    assert gone["socket"] == str(tmp_path / "none.sock") and gone["leftovers"] is None
    out = io.StringIO()
    code = control.status_command(
        tmp_path / "none.sock", as_json=True, out=out, leftovers=lambda: "2 nexthops left"
    )
    assert code == 3 and json.loads(out.getvalue())["leftovers"] == "2 nexthops left"

    async def client(path):
        human, js = io.StringIO(), io.StringIO()
        codes = await trio.to_thread.run_sync(
            lambda: (
                control.status_command(path, out=human),
                control.status_command(path, as_json=True, out=js),
            )
        )
        return codes, human.getvalue(), js.getvalue()

    codes, human, js = serve_and(tmp_path, client)
    assert codes == (0, 0)
    assert human == render(filled_snapshot())
    assert json.loads(js) == filled_snapshot()


def test_handler_drops_a_silent_client_after_the_default_timeout():
    async def main():
        a, b = trio.socket.socketpair()
        with a, b, trio.fail_after(60):  # virtual seconds: a handler that never drops fails
            t0 = trio.current_time()
            await control._handle(trio.SocketStream(a), filled_snapshot, control.REQUEST_TIMEOUT)
            return trio.current_time() - t0

    clock = trio.testing.MockClock(autojump_threshold=0)
    assert trio.run(main, clock=clock) == control.REQUEST_TIMEOUT


def test_status_text_shows_merged_cidrs_and_a_refused_reload():
    from sdnsup.supervisor import Status

    st = Status(reloads=2, reload_failures=1, reload_error="cidrs.txt:3: 'x' is not a CIDR")
    read = {"read": 6187, "duplicates": 968, "merged": 3862, "steered": 1357}
    snap = control.snapshot(st, cidrs4=1300, cidrs6=57, pid=7, now=1e9, cidrs_read=read)
    assert snap["cidrs"] == {
        "ipv4": 1300, "ipv6": 57, "read": 6187, "duplicates": 968, "merged": 3862,
    }  # fmt: skip
    text = control.render(snap)
    assert (
        "steering 1300 IPv4 + 57 IPv6 CIDRs (6187 read: 968 duplicates, 3862 merged into "
        "wider or adjacent prefixes)"
    ) in text
    assert (
        "reloads:   2, 1 refused; the last was refused, the running configuration kept: "
        "cidrs.txt:3: 'x' is not a CIDR"
    ) in text


def test_a_chosen_ap_the_kernel_does_not_route_through_is_not_connected():
    from sdnsup.supervisor import Phase, Status

    st = Status(
        phase=Phase.CONNECTED,
        active=AP1,
        kernel_via={4: None},
        kernel_problems=("AP 172.31.1.11 is unreachable: no route to it",),
    )
    snap = control.snapshot(st, cidrs4=1, cidrs6=0, pid=7, now=1e9)
    assert snap["state"] == "not routed" and snap["connected"] is False
    assert control.exit_code(snap) == 1
    assert "chosen, but the kernel does not route the CIDRs through it: AP 172.31.1.11 is " in (
        control.render(snap)
    )
    st.kernel_via = {4: AP1.addr4}
    st.apply_error = "nexthop 0x5d5d0004: Nexthop has invalid gateway"
    snap = control.snapshot(st, cidrs4=1, cidrs6=0, pid=7, now=1e9)
    assert not snap["connected"] and snap["kernel"]["apply_error"] == st.apply_error
    st.apply_error = None
    assert control.exit_code(control.snapshot(st, cidrs4=1, cidrs6=0, pid=7, now=1e9)) == 0
    # a failover posted but not applied yet: the kernel still routes through the old AP
    st.active = AP2
    assert control.exit_code(control.snapshot(st, cidrs4=1, cidrs6=0, pid=7, now=1e9)) == 1
