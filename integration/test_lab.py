"""The lab itself (no sdnsup involved): topology, services, teardown.

These tests pin down what the sdnsup integration tests rely on: who sees which address along
which path, that sessions notice a broken connection, and that nothing is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sdnsup.lab import Lab, LabError, cleanup, cleanup_stale, list_namespaces
from sdnsup.lab.teardown import namespace_pids

netns = pytest.mark.netns
MakeLab = Callable[..., Lab]
REPO = Path(__file__).resolve().parents[1]


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (orphans are reaped by init, eventually)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _route(lab: Lab, *args: str) -> None:
    """``ip route ...`` inside A (never in the root namespace)."""
    lab.exec(lab.ns_a, "ip", *args)


# --- the underlay: A <-> B through the router ----------------------------------------------


@netns
def test_a_reaches_b_through_the_router_with_its_own_address(lab: Lab) -> None:
    lab.serve_whoami(lab.ns_b)
    assert lab.whoami(lab.ns_a, lab.b_addr) == "172.31.1.2"
    assert lab.whoami(lab.ns_a, lab.b_addr6) == "fd31:1::2"


@netns
def test_b_reaches_a(lab: Lab) -> None:
    lab.serve_whoami(lab.ns_a, port=9000)
    assert lab.whoami(lab.ns_b, lab.a_addr, port=9000) == "10.10.10.1"
    assert lab.whoami(lab.ns_b, lab.a_addr6, port=9000) == "fd10:10:10::1"


@netns
def test_roles_resolve_and_foreign_namespaces_are_refused(lab: Lab) -> None:
    assert lab.exec("a", "ip", "-br", "addr", "show", "eth0").stdout.startswith("eth0@")
    with pytest.raises(ValueError, match="not a namespace of lab"):
        lab.exec("sdnt-not-ours", "true")


@netns
def test_no_ipv6_address_is_tentative(lab: Lab) -> None:
    for ns in lab.namespaces:
        out = lab.exec(ns, "ip", "-6", "address", "show").stdout
        assert "tentative" not in out, f"{ns}:\n{out}"


@netns
def test_aps_have_no_default_route_and_masquerade_on_the_overlay(lab: Lab) -> None:
    for ap in lab.aps:
        assert lab.exec(ap.ns, "ip", "-4", "route", "show", "default").stdout == ""
        assert lab.exec(ap.ns, "ip", "-6", "route", "show", "default").stdout == ""
        ruleset = lab.exec(ap.ns, "nft", "list", "ruleset").stdout
        assert 'oifname "ov0" masquerade' in ruleset
        assert "table ip6 lab" in ruleset


# --- through an access point ---------------------------------------------------------------


@netns
@pytest.mark.parametrize("family", [4, 6])
def test_forcing_traffic_through_an_ap_shows_its_overlay_address(lab: Lab, family: int) -> None:
    lab.serve_whoami(lab.ns_b)
    for ap in lab.aps:
        if family == 4:
            _route(lab, "route", "replace", f"{lab.b_addr}/32", "via", str(ap.addr))
            assert lab.whoami(lab.ns_a, lab.b_addr) == str(ap.overlay_addr)
        else:
            _route(lab, "-6", "route", "replace", f"{lab.b_addr6}/128", "via", str(ap.addr6))
            assert lab.whoami(lab.ns_a, lab.b_addr6) == str(ap.overlay_addr6)


@netns
def test_session_keeps_one_connection_and_notices_when_it_breaks(lab: Lab) -> None:
    lab.serve_whoami(lab.ns_b)
    session = lab.open_session(lab.ns_a, lab.b_addr)
    assert session.greeting == "172.31.1.2"
    assert session.ask("hello") == "peer 172.31.1.2 hello"
    assert session.ask("hello again with spaces") == "peer 172.31.1.2 hello again with spaces"
    assert session.peer() == "172.31.1.2"

    # Rerouting an established connection through AP1 (without sdnsup's conntrack marks)
    # changes its source address on the way: B does not know it, and the session breaks.
    _route(lab, "route", "add", f"{lab.b_addr}/32", "via", str(lab.ap(1).addr))
    assert session.ask("after reroute", timeout=2) is None
    # ... while new connections take the new path.
    assert lab.whoami(lab.ns_a, lab.b_addr) == "10.10.10.11"
    session.close()
    assert not session.alive


@netns
def test_many_sessions_at_once(lab: Lab) -> None:
    lab.serve_whoami(lab.ns_b)
    sessions = [lab.open_session(ns, lab.b_addr6) for ns in (lab.ns_a, lab.ns_a, lab.ap(1).ns)]
    for i, session in enumerate(sessions):
        assert session.ask(f"q{i}") is not None
    assert [s.peer() for s in sessions] == ["fd31:1::2", "fd31:1::2", "fd10:10:10::11"]


@netns
def test_ap_link_down_and_up(lab: Lab) -> None:
    lab.serve_whoami(lab.ns_b)
    ap = lab.ap(1)
    _route(lab, "route", "add", f"{lab.b_addr}/32", "via", str(ap.addr))
    _route(lab, "-6", "route", "add", f"{lab.b_addr6}/128", "via", str(ap.addr6))
    assert lab.whoami(lab.ns_a, lab.b_addr) == "10.10.10.11"

    lab.ap_link_down(1)
    assert lab.whoami(lab.ns_a, lab.b_addr, timeout=1) is None
    assert lab.whoami(lab.ns_a, lab.b_addr6, timeout=1) is None

    lab.ap_link_up(1)  # IPv6 addresses survive (keep_addr_on_down) and need no DAD
    assert lab.whoami(lab.ns_a, lab.b_addr, timeout=5) == "10.10.10.11"
    assert lab.whoami(lab.ns_a, lab.b_addr6, timeout=5) == "fd10:10:10::11"


# --- options -------------------------------------------------------------------------------


@netns
def test_container_reaches_b_masqueraded_behind_a(make_lab: MakeLab) -> None:
    lab = make_lab(n_aps=1, container=True)
    assert lab.ns_c is not None
    lab.serve_whoami(lab.ns_b)
    assert lab.whoami(lab.ns_c, lab.b_addr) == "172.31.1.2"
    assert lab.whoami(lab.ns_c, lab.b_addr6) == "fd31:1::2"
    # and from A's point of view, C is reachable directly
    lab.serve_whoami(lab.ns_c)
    assert lab.whoami(lab.ns_a, lab.c_addr) == "10.88.0.1"


@netns
def test_private_mode_aps_only_through_eth1(make_lab: MakeLab) -> None:
    lab = make_lab(n_aps=2, ap_link="private")
    ap = lab.ap(1)
    assert ap.ifname_in_a == "eth1" and str(ap.addr) == "10.77.0.11"
    route = lab.exec(lab.ns_a, "ip", "route", "get", str(ap.addr)).stdout
    assert "dev eth1" in route and "src 10.77.0.2" in route

    lab.serve_whoami(ap.ns)
    assert lab.whoami(lab.ns_a, ap.addr) == "10.77.0.2"
    assert lab.whoami(lab.ns_a, ap.addr6) == "fd77::2"

    lab.serve_whoami(lab.ns_b)
    # Through AP1 with eth1's address: fine, B sees AP1's overlay address.
    _route(lab, "route", "add", f"{lab.b_addr}/32", "via", str(ap.addr), "dev", "eth1")
    assert lab.whoami(lab.ns_a, lab.b_addr) == "10.10.10.11"
    # With A's public (eth0) address the AP cannot answer: it has no route back. This is the
    # trap sdnsup must avoid by using the outgoing interface's address.
    assert lab.whoami(lab.ns_a, lab.b_addr, timeout=1, source=lab.a_addr) is None


@netns
def test_strict_rp_filter_on_every_interface_of_a(make_lab: MakeLab) -> None:
    lab = make_lab(n_aps=1, ap_link="private", container=True, rp_filter_strict=True)
    for iface in ("all", "default", "lo", "eth0", "eth1", "ctr0"):
        out = lab.exec(lab.ns_a, "sysctl", "-n", f"net.ipv4.conf.{iface}.rp_filter").stdout
        assert out.strip() == "1", iface
    assert lab.exec(lab.ns_r, "sysctl", "-n", "net.ipv4.conf.all.rp_filter").stdout.strip() == "0"


@netns
def test_three_ap_lab_builds_fast() -> None:
    with Lab.create(n_aps=3, container=True) as lab:
        assert lab.build_seconds is not None
        assert lab.build_seconds < 2.0, f"took {lab.build_seconds:.2f}s"


# --- processes -----------------------------------------------------------------------------


@netns
def test_popen_logs_and_stop(lab: Lab) -> None:
    proc = lab.popen("b", "sh", "-c", "echo out; echo err >&2; exec sleep 60")
    deadline = time.monotonic() + 5
    while "err" not in lab.logs(proc) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "out" in lab.logs(proc) and "err" in lab.logs(proc)
    assert lab.stop(proc) == -signal.SIGTERM


@netns
def test_run_sdnsup_starts_the_cli_in_the_namespace(lab: Lab) -> None:
    proc = lab.run_sdnsup(lab.ns_a, "--help", env={"SDNSUP_LAB_TEST": "1"})
    assert isinstance(proc.args, list)
    assert proc.args[:7] == ["ip", "netns", "exec", lab.ns_a, sys.executable, "-m", "sdnsup.cli"]
    proc.wait(timeout=60)
    assert lab.logs(proc).strip(), "sdnsup --help printed nothing (nor a traceback)"


# --- teardown ------------------------------------------------------------------------------


@netns
def test_with_block_removes_namespaces_and_processes() -> None:
    with Lab.create(n_aps=2, container=True) as lab:
        prefix = lab.prefix
        server = lab.serve_whoami(lab.ns_b)
        assert len(list_namespaces(prefix)) == 6
    assert list_namespaces(prefix) == []
    assert server.poll() is not None
    lab.down()  # idempotent


@netns
def test_with_block_cleans_up_when_the_body_raises() -> None:
    with pytest.raises(RuntimeError, match="boom"), Lab.create(n_aps=1) as lab:
        prefix = lab.prefix
        lab.serve_whoami(lab.ns_b)
        raise RuntimeError("boom")
    assert list_namespaces(prefix) == []


@netns
def test_cleanup_by_prefix_then_down_is_harmless() -> None:
    lab = Lab.up(n_aps=1)
    try:
        assert sorted(cleanup(lab.prefix)) == sorted(lab.namespaces)
        assert list_namespaces(lab.prefix) == []
    finally:
        lab.down()
    with pytest.raises(LabError, match="not up"):
        lab.exec(lab.ns_a, "true")


@netns
def test_stale_lab_of_a_killed_process_is_removed() -> None:
    prefix = f"sdnt-stale{os.getpid() % 100000}-"
    script = textwrap.dedent(
        f"""
        import time
        from sdnsup.lab import Lab
        lab = Lab.up(n_aps=1, prefix={prefix!r})
        lab.serve_whoami(lab.ns_b)
        print("up", flush=True)
        time.sleep(60)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    try:
        assert owner.stdout is not None
        assert owner.stdout.readline() == b"up\n"
        owner.kill()  # no atexit, no finally: the namespaces (and whoami in B) stay behind
        owner.wait()
        left = list_namespaces(prefix)
        assert len(left) == 4
        orphans = [pid for pids in namespace_pids(left).values() for pid in pids]
        assert orphans, "whoami should still run in B"

        tmpdirs = list(Path(tempfile.gettempdir()).glob(f"{prefix}*"))
        assert len(tmpdirs) == 1

        assert set(left) <= set(cleanup_stale())
        assert list_namespaces(prefix) == []
        assert not tmpdirs[0].exists()
        assert not any(_running(pid) for pid in orphans)
    finally:
        owner.kill()
        owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()
        cleanup(prefix)


# --- the CI policy on skipped integration tests ---------------------------------------------

if os.environ.get("SDNSUP_LAB_SELFTEST_SKIP") == "1":

    def test_selftest_always_skips() -> None:
        pytest.skip("self-test of the CI skip policy")


@pytest.mark.parametrize(("ci", "expected_rc"), [("true", 1), ("", 0)])
def test_skipped_integration_test_fails_the_run_on_ci(ci: str, expected_rc: int) -> None:
    env = {**os.environ, "CI": ci, "SDNSUP_LAB_SELFTEST_SKIP": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"{Path(__file__)}::test_selftest_always_skips",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == expected_rc, proc.stdout + proc.stderr
    assert "1 skipped" in proc.stdout
    assert ("integration tests skipped on CI" in proc.stdout) == (ci == "true")
