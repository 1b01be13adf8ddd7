"""The seed's scenario with the real sdnsup process: real netlink, nftables and packets."""

from __future__ import annotations

import pytest

from integration.helpers import owned, start_sdnsup, stop_sdnsup, sysctl, wait_for
from sdnsup.lab import Lab
from sdnsup.state import Settings

pytestmark = pytest.mark.netns

CIDRS = "10.10.10.0/25,fd10:10:10::/112"
# B gets a second address outside the CIDRs above (but on the same LAN, reached the same way)
B_OUTSIDE, B_OUTSIDE6 = "10.10.10.200", "fd10:10:10::1:200"


def ap_arg(lab: Lab, i: int = 1) -> str:
    ap = lab.ap(i)
    return f"{ap.addr}+{ap.addr6}"


def add_outside_address(lab: Lab) -> None:
    b_if = lab.exec(lab.ns_b, "ip", "-o", "-4", "route", "get", "10.10.10.254").stdout.split()[2]
    lab.exec(lab.ns_b, "ip", "addr", "add", f"{B_OUTSIDE}/24", "dev", b_if)
    lab.exec(lab.ns_b, "ip", "addr", "add", f"{B_OUTSIDE6}/64", "dev", b_if, "nodad")


@pytest.mark.parametrize("family", [4, 6])
def test_outbound_through_ap_inbound_and_others_normal(make_lab, family):
    lab = make_lab(n_aps=2, container=True)
    add_outside_address(lab)
    lab.serve_whoami(lab.ns_b)
    lab.serve_whoami(lab.ns_a)
    b = lab.b_addr if family == 4 else lab.b_addr6
    a = lab.a_addr if family == 4 else lab.a_addr6
    outside = B_OUTSIDE if family == 4 else B_OUTSIDE6
    ap = lab.ap(1)
    ap_overlay = str(ap.overlay_addr if family == 4 else ap.overlay_addr6)

    before = lab.open_session(lab.ns_a, b)  # opened before sdnsup starts
    assert before.greeting.strip() == str(a)

    proc = start_sdnsup(lab, "-r", CIDRS, "--ap", ap_arg(lab), "--probe", "icmp")
    # A -> B (in the CIDRs) leaves through the AP: B sees the AP's overlay address.
    assert lab.whoami(lab.ns_a, b) == ap_overlay
    # A -> an address outside the CIDRs takes the normal route: B sees A.
    assert lab.whoami(lab.ns_a, outside) == str(a)
    # B -> A: B is inside the CIDRs; the replies must take the normal route (the seed's
    # problem). whoami on A answers with the peer it saw; a reply through the AP would be lost.
    assert lab.whoami(lab.ns_b, a, source=b) == str(b)
    # A connection opened before sdnsup keeps working, still on its old path.
    assert before.ask("still-there") == f"peer {a} still-there"
    # The container behind A reaches B through the AP.
    assert lab.whoami(lab.ns_c, b) == ap_overlay
    assert stop_sdnsup(lab, proc) == 0


def test_private_ap_interface_with_strict_rp_filter(make_lab):
    lab = make_lab(n_aps=2, ap_link="private", container=True, rp_filter_strict=True)
    lab.serve_whoami(lab.ns_b)
    lab.serve_whoami(lab.ns_a)
    ap = lab.ap(1)
    assert ap.ifname_in_a != lab.a_ifname
    key = f"net.ipv4.conf.{ap.ifname_in_a}.src_valid_mark"
    assert sysctl(lab, lab.ns_a, key) == 0

    proc = start_sdnsup(lab, "-r", CIDRS, "--ap", ap_arg(lab), "--probe", "icmp")
    assert sysctl(lab, lab.ns_a, key) == 1
    assert sysctl(lab, lab.ns_a, f"net.ipv4.conf.{lab.a_ifname}.src_valid_mark") == 0
    assert lab.whoami(lab.ns_a, lab.b_addr) == str(ap.overlay_addr)
    assert lab.whoami(lab.ns_a, lab.b_addr6) == str(ap.overlay_addr6)
    assert lab.whoami(lab.ns_b, lab.a_addr) == str(lab.b_addr)
    assert lab.whoami(lab.ns_b, lab.a_addr6) == str(lab.b_addr6)
    assert lab.whoami(lab.ns_c, lab.b_addr) == str(ap.overlay_addr)
    # After kill -9 the successor still knows the original value and restores it on stop.
    proc.kill()
    proc.wait(5)
    proc = start_sdnsup(lab, "-r", CIDRS, "--ap", ap_arg(lab), "--probe", "icmp")
    assert sysctl(lab, lab.ns_a, key) == 1
    assert stop_sdnsup(lab, proc) == 0
    assert sysctl(lab, lab.ns_a, key) == 0


def test_sigterm_leaves_nothing_and_kill9_restart_has_no_duplicates(make_lab):
    lab = make_lab(n_aps=1)
    # Foreign state that must survive: a table, a rule, a nexthop and a route of others.
    lab.exec(lab.ns_a, "nft", "add table inet foreign; add chain inet foreign c")
    lab.exec(
        lab.ns_a, "ip", "rule", "add", "fwmark", "0x4000/0x4000", "lookup", "100", "pref", "100"
    )
    lab.exec(lab.ns_a, "ip", "nexthop", "add", "id", "7", "via", "172.31.1.1", "dev", lab.a_ifname)
    lab.exec(lab.ns_a, "ip", "route", "add", "192.0.2.0/24", "nhid", "7", "table", "7300")
    before_rules = lab.exec(lab.ns_a, "ip", "rule").stdout

    cidrs = "10.10.10.0/24,10.10.20.0/24,fd10:10:10::/64"
    proc = start_sdnsup(lab, "-r", cidrs, "--ap", ap_arg(lab), "--probe", "icmp")
    state = owned(lab)
    # per family: the CIDR routes' rule and nexthop, the AP slot's nexthop and default route
    assert (len(state["rules"]), len(state["routes"]), len(state["nexthops"])) == (2, 5, 4)
    proc.kill()
    proc.wait(5)
    proc = start_sdnsup(lab, "-r", cidrs, "--ap", ap_arg(lab), "--probe", "icmp")
    assert (
        "adopted what an earlier sdnsup left in the kernel (killed or crashed): 4 nexthops, "
        "5 routes, 2 policy rules, nftables table inet sdnsup"
    ) in lab.logs(proc)
    state = owned(lab)
    assert len(state["rules"]) == 2, state["rules"]  # one per family
    assert sorted(r["dst"] for r in state["routes"]) == [
        "10.10.10.0/24",
        "10.10.20.0/24",
        "default",
        "default",
        "fd10:10:10::/64",
    ]
    assert len(state["nexthops"]) == 4 and state["tables"] == ["sdnsup"]
    assert stop_sdnsup(lab, proc) == 0
    assert owned(lab) == {"rules": [], "routes": [], "nexthops": [], "tables": []}
    assert lab.exec(lab.ns_a, "ip", "rule").stdout == before_rules
    assert (
        "192.0.2.0/24 nhid 7" in lab.exec(lab.ns_a, "ip", "route", "show", "table", "7300").stdout
    )
    assert "table inet foreign" in lab.exec(lab.ns_a, "nft", "list", "tables").stdout


def test_foreign_mark_bit_survives(make_lab):
    lab = make_lab(n_aps=1)
    lab.serve_whoami(lab.ns_b)
    # Another tool marks connections to B with bit 0x4000 (kube-proxy's masquerade bit).
    lab.exec(
        lab.ns_a,
        "nft",
        "add table inet foreign; "
        "add chain inet foreign out { type route hook output priority -200; }; "
        f"add rule inet foreign out ip daddr {lab.b_addr} ct mark set ct mark | 0x4000",
    )
    proc = start_sdnsup(lab, "-r", "10.10.10.0/24", "--ap", ap_arg(lab), "--probe", "icmp")
    assert lab.whoami(lab.ns_a, lab.b_addr) == str(lab.ap(1).overlay_addr)
    entries = lab.exec(lab.ns_a, "conntrack", "-L", "-p", "tcp", "-d", str(lab.b_addr)).stdout
    marks = {int(f.split("=")[1]) for f in entries.split() if f.startswith("mark=")}
    # kube-proxy's bit kept; sdnsup's flag and the AP's slot (1) in sdnsup's own bits
    assert marks == {0x4000 | Settings().slot_mark(1)}, entries
    assert stop_sdnsup(lab, proc) == 0


def test_second_instance_refused_and_bad_input_exit_64(make_lab):
    lab = make_lab(n_aps=1)
    proc = start_sdnsup(lab, "-r", "10.10.10.0/24", "--ap", ap_arg(lab), "--probe", "icmp")
    second = lab.run_sdnsup(lab.ns_a, "-r", "10.10.10.0/24", "--ap", ap_arg(lab), "--probe", "icmp")
    assert second.wait(10) == 75
    assert "already running" in lab.logs(second)
    bad = lab.run_sdnsup(lab.ns_a, "-r", "10.10.10.1/24", "--ap", ap_arg(lab), "--probe", "icmp")
    assert bad.wait(10) == 64
    assert "did you mean 10.10.10.0/24" in lab.logs(bad)
    assert stop_sdnsup(lab, proc) == 0


def test_without_cap_net_admin_nothing_is_touched(make_lab):
    lab = make_lab(n_aps=1)
    proc = lab.popen(
        lab.ns_a,
        "setpriv",
        "--bounding-set=-net_admin",
        "--inh-caps=-net_admin",
        *_python_cli("-r", "10.10.10.0/24", "--ap", ap_arg(lab), "--probe", "icmp"),
        label="a-sdnsup-nocap",
    )
    assert proc.wait(10) == 77
    assert "CAP_NET_ADMIN" in lab.logs(proc)
    assert owned(lab) == {"rules": [], "routes": [], "nexthops": [], "tables": []}


def _python_cli(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "sdnsup.cli", *args]


def test_stop_within_two_seconds(make_lab):
    import time

    lab = make_lab(n_aps=1)
    proc = start_sdnsup(lab, "-r", "10.10.10.0/24", "--ap", ap_arg(lab), "--probe", "icmp")
    t0 = time.monotonic()
    assert stop_sdnsup(lab, proc) == 0
    assert time.monotonic() - t0 < 2.0
    wait_for(lambda: owned(lab)["tables"] == [], 1, "table removal")
