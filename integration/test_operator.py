"""Operator commands against the real kernel: plan equals run, down cleans up after kill -9."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import pytest

from integration.helpers import owned, start_sdnsup, stop_sdnsup, sysctl, wait_for
from sdnsup.lab import Lab

pytestmark = pytest.mark.netns

CIDRS = "10.10.10.0/24,10.10.20.0/24,fd10:10:10::/64"
NOTHING = {"rules": [], "routes": [], "nexthops": [], "tables": []}


def cli(lab: Lab, *args: str, check: bool = True):
    """``sdnsup ARGS`` in A, never reading the host's /etc/sdnsup (plan and check would)."""
    argv = ("env", "SDNSUP_CONFIG=none", sys.executable, "-m", "sdnsup.cli", *args)
    return lab.exec(lab.ns_a, *argv, check=check)


def test_plan_applied_by_hand_equals_what_run_installs(make_lab, tmp_path):
    lab = make_lab(n_aps=1, ap_link="private", rp_filter_strict=True)
    ap = lab.ap(1)
    args = ["-r", CIDRS, "--ap", f"{ap.addr}+{ap.addr6}"]
    proc = start_sdnsup(lab, *args, "--probe", "icmp")
    by_run = lab.exec(lab.ns_a, "nft", "list", "table", "inet", "sdnsup").stdout
    state_by_run = owned(lab)
    key = f"net.ipv4.conf.{ap.ifname_in_a}.src_valid_mark"
    assert sysctl(lab, lab.ns_a, key) == 1
    assert stop_sdnsup(lab, proc) == 0
    assert owned(lab) == NOTHING

    text = cli(lab, "plan", *args).stdout
    nft_part, ip_part = text.split("# routing:")
    (tmp_path / "plan.nft").write_text(nft_part)
    lab.exec(lab.ns_a, "nft", "-f", str(tmp_path / "plan.nft"))
    for line in ip_part.splitlines():
        if line.startswith(("ip ", "sysctl ")):
            lab.exec(lab.ns_a, *line.split())
    assert lab.exec(lab.ns_a, "nft", "list", "table", "inet", "sdnsup").stdout == by_run
    assert owned(lab) == state_by_run
    assert f"sysctl -w {key}=1" in text
    doc = json.loads(cli(lab, "plan", *args, "--json").stdout)  # one JSON document
    assert doc["nftables"] and all(line in doc["commands"] for line in ip_part.splitlines()
                                   if line.startswith(("ip ", "sysctl ")))  # fmt: skip


def test_down_after_kill9_leaves_the_kernel_clean(make_lab):
    lab = make_lab(n_aps=1, ap_link="private", rp_filter_strict=True)
    ap = lab.ap(1)
    key = f"net.ipv4.conf.{ap.ifname_in_a}.src_valid_mark"
    proc = start_sdnsup(lab, "-r", CIDRS, "--ap", f"{ap.addr}+{ap.addr6}", "--probe", "icmp")
    refused = cli(lab, "down", check=False)
    assert refused.returncode == 75 and "already running" in refused.stderr
    proc.kill()
    proc.wait(5)
    assert owned(lab) != NOTHING and sysctl(lab, lab.ns_a, key) == 1
    done = cli(lab, "down")
    assert "removed" in done.stdout
    assert owned(lab) == NOTHING
    assert sysctl(lab, lab.ns_a, key) == 0
    again = cli(lab, "down")
    assert "nothing of sdnsup's" in again.stdout


def test_sighup_reloads_the_cidrs_without_a_gap_and_keeps_them_on_a_bad_file(make_lab, tmp_path):
    """A reload adds the new CIDRs while a steered session stays up and the policy rules
    never leave the kernel; a broken file is refused, said in the log and in status, and
    the running CIDRs stay."""
    lab = make_lab(n_aps=1)
    lab.start_ap_agents({1: 0.005})
    lab.serve_whoami(lab.ns_b)
    ap = lab.ap(1)
    listing = tmp_path / "cidrs.txt"
    listing.write_text("10.10.20.0/24\nfd10:10:10::/64\n")
    proc = start_sdnsup(lab, "-r", f"@{listing}", "--ap", f"{ap.addr}+{ap.addr6}")
    session = lab.open_ticker(lab.ns_a, lab.b_addr6)
    assert session.wait_open() == str(ap.overlay_addr6)
    assert lab.whoami(lab.ns_a, lab.b_addr) != str(ap.overlay_addr)  # not steered yet

    gaps: list[str] = []
    stop = threading.Event()

    def watch_rules() -> None:  # bounded: until stop, at most 60 s
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            for fam in ("-4", "-6"):
                out = lab.exec(lab.ns_a, "ip", fam, "rule", "show", "priority", "7300").stdout
                if "lookup 7300" not in out:
                    gaps.append(f"{fam} rule missing at {time.monotonic():.3f}")

    watcher = threading.Thread(target=watch_rules, daemon=True)
    watcher.start()
    try:
        listing.write_text("10.10.20.0/24\n10.10.10.0/24\nfd10:10:10::/64\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: lab.whoami(lab.ns_a, lab.b_addr) == str(ap.overlay_addr),
            10,
            "B's IPv4 net steered after the reload",
        )
        assert "reloaded: IPv4 CIDRs 1 -> 2 (+1 -0)" in lab.logs(proc)

        listing.write_text("10.10.20.0/24\n10.10.10.300/24\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload failed" in lab.logs(proc), 10, "the refused reload logged")
        status = json.loads(cli(lab, "status", "--json").stdout)
        assert status["reload"]["count"] == 1 and status["reload"]["failures"] == 1
        assert "'10.10.10.300/24' is not a CIDR" in status["reload"]["error"]
        assert lab.whoami(lab.ns_a, lab.b_addr) == str(ap.overlay_addr)  # still steered
        # a new CIDR whose route another tool already holds in table 7300: refused too
        gw = str(lab.router_addr)
        theirs = ("10.10.30.0/24", "via", gw, "table", "7300", "proto", "static")
        lab.exec(lab.ns_a, "ip", "route", "add", *theirs)
        listing.write_text("10.10.20.0/24\n10.10.10.0/24\n10.10.30.0/24\nfd10:10:10::/64\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: json.loads(cli(lab, "status", "--json").stdout)["reload"]["failures"] == 2,
            10,
            "the second refused reload",
        )
        error = json.loads(cli(lab, "status", "--json").stdout)["reload"]["error"]
        assert "route 10.10.30.0/24 in table 7300 (proto 4)" in error
        assert (
            "10.10.30.0/24 via" in lab.exec(lab.ns_a, "ip", "route", "show", "table", "7300").stdout
        )
        lab.exec(lab.ns_a, "ip", "route", "del", "10.10.30.0/24", "table", "7300")
        assert proc.poll() is None
        time.sleep(1)  # the session keeps talking after the reloads
    finally:
        stop.set()
        watcher.join(10)
    report = session.stop()
    assert report.errors == [] and report.lost == 0 and report.sent > 0, report
    assert set(report.peers) == {str(ap.overlay_addr6)}
    assert gaps == []
    assert stop_sdnsup(lab, proc) == 0
    assert owned(lab) == NOTHING


def test_other_tools_objects_where_sdnsup_writes_stop_it_and_are_left_alone(make_lab):
    """A foreign route in table 7300 and a rule at priority 7299: run refuses with each
    named and changes nothing (before: the route was overwritten then deleted); check says
    the same first; once they are gone, both pass. A nexthop at sdnsup's default id is no
    conflict: sdnsup takes other ids (before: it was rewritten to the AP and deleted at
    teardown, with every route using it)."""
    lab = make_lab(n_aps=1)
    ap = lab.ap(1)
    gw = str(lab.router_addr)
    theirs = [
        ("ip", "nexthop", "add", "id", str(0x5D5D0004), "via", gw, "dev", lab.a_ifname),
        ("ip", "route", "add", "10.10.10.0/24", "via", gw, "table", "7300", "proto", "static"),
        ("ip", "rule", "add", "priority", "7299", "lookup", "100"),
    ]
    for argv in theirs:
        lab.exec(lab.ns_a, *argv)

    def snapshot() -> tuple[str, ...]:
        return tuple(
            lab.exec(lab.ns_a, *argv).stdout
            for argv in (
                ("ip", "nexthop", "show"),
                ("ip", "route", "show", "table", "7300"),
                ("ip", "rule", "show"),
            )
        )

    before = snapshot()
    args = ("-r", CIDRS, "--ap", f"{ap.addr}+{ap.addr6}", "--probe", "icmp", "--config", "none")
    checked = cli(lab, "check", *args, check=False)
    assert checked.returncode == 64, checked
    started = cli(lab, "run", *args, check=False)
    assert started.returncode == 64, started
    for out in (checked.stderr, started.stderr):
        assert "sdnsup never overwrites or deletes what it did not create" in out
        assert f"nexthop id {0x5D5D0004}" not in out  # sdnsup takes other ids
        assert "route 10.10.10.0/24 in table 7300 (proto 4)" in out
        assert "IPv4 policy rule priority 7299 lookup 100 (proto 0)" in out
    assert snapshot() == before and owned(lab) == NOTHING
    lab.exec(lab.ns_a, "ip", "rule", "del", "priority", "7299")
    lab.exec(lab.ns_a, "ip", "route", "del", "10.10.10.0/24", "table", "7300")
    assert "sdnsup check: OK" in cli(lab, "check", *args).stdout
    proc = start_sdnsup(lab, *args)
    assert "nexthop ids 0x5d5e0004/0x5d5e0006 and their slots' are used" in lab.logs(proc)
    nexthops = lab.exec(lab.ns_a, "ip", "nexthop", "show").stdout
    assert f"id {0x5D5D0004} via {gw}" in nexthops and f"id {0x5D5E0004} via" in nexthops

    # While it runs, another tool replaces one of its routes: the heal leaves theirs alone
    # and says so in the log and in status, then takes the key back once it is gone.
    lab.exec(lab.ns_a, *theirs[1][:2], "replace", *theirs[1][3:])
    wait_for(
        lambda: "another tool's route 10.10.10.0/24 in table 7300 (proto 4)" in lab.logs(proc),
        10,
        "the heal to name the foreign route",
    )
    table = lab.exec(lab.ns_a, "ip", "route", "show", "table", "7300", "10.10.10.0/24").stdout
    assert f"via {gw}" in table and "proto static" in table, table
    shown = cli(lab, "status", "--json", check=False)
    assert shown.returncode == 1, shown  # not connected: a CIDR is not routed through the AP
    assert "another tool's route" in json.loads(shown.stdout)["kernel"]["apply_error"]
    lab.exec(lab.ns_a, "ip", "route", "del", "10.10.10.0/24", "table", "7300")
    wait_for(lambda: cli(lab, "status", check=False).returncode == 0, 15, "connected again")
    heals = json.loads(cli(lab, "status", "--json").stdout)["heals"]
    assert heals["count"] >= 1 and heals["last_cause"], heals  # the route taken back
    assert stop_sdnsup(lab, proc) == 0
    assert f"id {0x5D5D0004} via {gw}" in lab.exec(lab.ns_a, "ip", "nexthop", "show").stdout


def test_a_log_folder_planted_by_another_user_does_not_stop_sdnsup(make_lab, tmp_path):
    """Another user created the log folder first (in /tmp anyone can): sdnsup neither writes
    into it nor refuses to start; it logs to stderr only, and says so loudly."""
    lab = make_lab(n_aps=1)
    ap = lab.ap(1)
    planted = tmp_path / "planted"
    planted.mkdir(mode=0o777)
    os.chown(planted, 65534, 65534)  # nobody
    proc = start_sdnsup(
        lab, "-r", CIDRS, "--ap", f"{ap.addr}+{ap.addr6}", "--probe", "icmp",
        "--log-dir", str(planted),
    )  # fmt: skip
    logs = lab.logs(proc)
    assert "NOT LOGGING TO A FILE: log directory" in logs and "owned by uid 65534" in logs
    assert list(planted.iterdir()) == []
    assert stop_sdnsup(lab, proc) == 0
