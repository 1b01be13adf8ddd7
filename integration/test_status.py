"""sdnsup status against a running daemon in the lab, and with none running."""

from __future__ import annotations

import ipaddress
import json
import sys
import time

import pytest

from integration.helpers import start_sdnsup, stop_sdnsup, wait_for
from sdnsup.aps import AccessPoint, parse_static_aps
from sdnsup.choice import rendezvous_key
from sdnsup.lab import Lab

pytestmark = pytest.mark.netns


def status(lab: Lab, *args: str):
    return lab.exec(lab.ns_a, sys.executable, "-m", "sdnsup.cli", "status", *args, check=False)


def host_preferring(first: AccessPoint, second: AccessPoint) -> str:
    """A host id whose weighted choice puts ``first`` before ``second`` (near-equal APs)."""
    return next(
        f"h{i}"
        for i in range(100)
        if rendezvous_key(f"h{i}", first) > rendezvous_key(f"h{i}", second)
    )


def test_status_reflects_a_failover_within_a_second(make_lab):
    lab: Lab = make_lab(n_aps=2)
    lab.start_ap_agents({1: 0.005, 2: 0.030})
    url = lab.start_cc()
    lab.set_cc()
    proc = start_sdnsup(lab, "-r", "10.10.10.0/24,fd10:10:10::/64", "--cc", url)
    wait_for(lambda: status(lab).returncode == 0, 10, "status to say connected")
    snap = json.loads(status(lab, "--json").stdout)
    assert snap["schema"] == 1 and snap["state"] == "connected"
    assert snap["active_ap"]["id"] == "ap1" and snap["cidrs"] == {
        "ipv4": 1,
        "ipv6": 1,
        "read": 2,
        "duplicates": 0,
        "merged": 0,
    }
    assert {ap["id"] for ap in snap["aps"]} == {"ap1", "ap2"}
    human = status(lab).stdout
    assert "connected via ap1" in human and "ap2" in human

    lab.ap_link_down(1)
    wait_for(lambda: "failover" in lab.logs(proc), 10, "the failover")
    seen_at = time.monotonic()
    snap = json.loads(status(lab, "--json").stdout)
    assert time.monotonic() - seen_at < 1.0
    assert snap["active_ap"]["id"] == "ap2"
    assert snap["failovers"]["count"] == 1 and "ap1" in snap["failovers"]["last_cause"]
    assert "failovers" in status(lab).stdout
    assert stop_sdnsup(lab, proc) == 0

    gone = status(lab)
    assert gone.returncode == 3
    assert "not running" in gone.stdout and "nothing of sdnsup's is in the kernel" in gone.stdout


def test_status_without_daemon_reports_leftovers_after_kill9(make_lab):
    lab: Lab = make_lab(n_aps=1)
    lab.start_ap_agents({1: 0.005})
    url = lab.start_cc()
    lab.set_cc()
    proc = start_sdnsup(lab, "-r", "10.10.10.0/24", "--cc", url)
    proc.kill()
    proc.wait(5)
    out = status(lab)
    assert out.returncode == 3
    assert "left in the kernel" in out.stdout and "sdnsup down" in out.stdout


def test_an_ap_at_this_hosts_own_address_is_rejected_and_status_tells_the_truth(make_lab):
    """It answers its pings (this host answers itself) and is the fastest, but the kernel
    cannot use it as next hop: sdnsup says so, leaves it for the next AP, and status says
    connected only once the kernel routes through that one."""
    lab: Lab = make_lab(n_aps=1)
    lab.serve_whoami(lab.ns_b)
    ap = lab.ap(1)
    own, other = parse_static_aps(f"{lab.a_addr},{ap.addr}")
    host = host_preferring(own, other)
    proc = start_sdnsup(
        lab,
        *("-r", "10.10.10.0/24", "--ap", f"{own.id},{other.id}", "--probe", "icmp"),
        *("--host-id", host),
    )
    wait_for(lambda: "rejected: an address of this host" in lab.logs(proc), 10, "the rejection")
    wait_for(lambda: status(lab).returncode == 0, 10, "status to say connected")
    snap = json.loads(status(lab, "--json").stdout)
    assert snap["active_ap"]["id"] == str(ap.addr) and snap["kernel"]["routed"] is True
    assert snap["kernel"]["apply_failures"] == 0  # never an "invalid gateway" apply loop
    assert lab.whoami(lab.ns_a, lab.b_addr) == str(ap.overlay_addr)
    time.sleep(3)  # a probe round later it is still away
    assert json.loads(status(lab, "--json").stdout)["active_ap"]["id"] == str(ap.addr)
    assert "apply failed" not in lab.logs(proc)
    assert stop_sdnsup(lab, proc) == 0


def test_an_ap_off_every_connected_network_is_left_for_one_that_carries_the_cidrs(make_lab):
    """An AP the host reaches only through a gateway answers its pings, but cannot be the
    next hop: sdnsup leaves it for an AP on a connected network instead of reporting
    "not routed" for as long as it runs."""
    lab: Lab = make_lab(n_aps=2)
    lab.serve_whoami(lab.ns_b)
    ap1, ap2 = lab.ap(1), lab.ap(2)
    far = "10.88.0.1"  # an address of AP1's, one hop away from A
    lab.exec(ap1.ns, "ip", "addr", "add", f"{far}/32", "dev", "lo")
    lab.exec(lab.ns_a, "ip", "route", "add", f"{far}/32", "via", str(ap1.addr))
    off, on = parse_static_aps(f"{far},{ap2.addr}")
    host = host_preferring(off, on)
    proc = start_sdnsup(
        lab,
        *("-r", "10.10.10.0/24", "--ap", f"{off.id},{on.id}", "--probe", "icmp"),
        *("--host-id", host),
    )
    wait_for(lambda: "cannot carry the CIDRs" in lab.logs(proc), 10, "leaving the far AP")
    assert f"via {ap1.addr}" in lab.logs(proc)  # the evidence: the gateway the host uses
    wait_for(lambda: status(lab).returncode == 0, 10, "status to say connected")
    snap = json.loads(status(lab, "--json").stdout)
    assert snap["active_ap"]["id"] == str(ap2.addr) and snap["kernel"]["routed"] is True
    assert lab.whoami(lab.ns_a, lab.b_addr) == str(ap2.overlay_addr)
    assert stop_sdnsup(lab, proc) == 0


def test_an_ap_inside_the_steered_cidrs_keeps_carrying_them(make_lab):
    """The CIDRs cover the AP's own network: the AP's address is exempt from steering, so its
    keepalive and the next hop itself take the normal route; it is kept, not rejected."""
    lab: Lab = make_lab(n_aps=1)
    lab.serve_whoami(lab.ns_b)
    ap = lab.ap(1)
    lan = ipaddress.ip_network(f"{ap.addr}/24", strict=False)
    proc = start_sdnsup(lab, "-r", f"{lan},10.10.10.0/24", "--ap", str(ap.addr), "--probe", "icmp")
    wait_for(lambda: status(lab).returncode == 0, 10, "status to say connected")
    assert lab.whoami(lab.ns_a, lab.b_addr) == str(ap.overlay_addr)
    time.sleep(3)  # a few keepalives later: still alive, still routed
    snap = json.loads(status(lab, "--json").stdout)
    assert snap["state"] == "connected" and snap["failovers"]["count"] == 0
    assert "failover" not in lab.logs(proc)
    assert stop_sdnsup(lab, proc) == 0
