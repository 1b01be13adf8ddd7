"""Operator commands against the real kernel: plan equals run, down cleans up after kill -9."""

from __future__ import annotations

import sys

import pytest

from integration.helpers import owned, start_sdnsup, stop_sdnsup, sysctl
from sdnsup.lab import Lab

pytestmark = pytest.mark.netns

CIDRS = "10.10.10.0/24,10.10.20.0/24,fd10:10:10::/64"
NOTHING = {"rules": [], "routes": [], "nexthops": [], "tables": []}


def cli(lab: Lab, *args: str, check: bool = True):
    return lab.exec(lab.ns_a, sys.executable, "-m", "sdnsup.cli", *args, check=check)


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
    assert '"nftables"' in cli(lab, "plan", *args, "--json").stdout


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
