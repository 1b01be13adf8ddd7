"""The applier against the real kernel: fewest writes, exact read-back, AP switch with packets."""

from __future__ import annotations

import ipaddress
import json
import sys
from pathlib import Path

import pytest

from integration.helpers import owned
from sdnsup.lab import Lab

pytestmark = pytest.mark.netns

DRIVER = str(Path(__file__).with_name("drive_applier.py"))


def drive(lab: Lab, cidrs: str, ap4: object, ap6: object = "-", *flags: str) -> dict:
    out = lab.exec(lab.ns_a, sys.executable, DRIVER, cidrs, str(ap4), str(ap6), *flags).stdout
    return json.loads(out)


def test_switching_ap_moves_new_connections_with_one_nexthop_write(make_lab):
    lab = make_lab(n_aps=2)
    lab.serve_whoami(lab.ns_b)
    ap1, ap2 = lab.ap(1), lab.ap(2)
    cidrs = "10.10.10.0/24,10.10.20.0/24,fd10:10:10::/64"

    first = drive(lab, cidrs, ap1.addr, ap1.addr6)
    assert first["again"] == 0 and first["matches_kernel"]
    assert lab.whoami(lab.ns_a, lab.b_addr) == str(ap1.overlay_addr)

    switch = drive(lab, cidrs, ap2.addr, ap2.addr6)
    # one nexthop per family; the exempt sets follow the AP (one element out, one in each)
    assert switch["writes"] == {"nexthop": 2, "nft element": 4}
    assert switch["again"] == 0 and switch["matches_kernel"]
    assert lab.whoami(lab.ns_a, lab.b_addr) == str(ap2.overlay_addr)
    assert lab.whoami(lab.ns_a, lab.b_addr6) == str(ap2.overlay_addr6)

    drive(lab, "", "-", "-", "--teardown")
    assert owned(lab) == {"rules": [], "routes": [], "nexthops": [], "tables": []}


def test_cidr_change_touches_only_changed_routes_and_elements(make_lab):
    lab = make_lab(n_aps=1)
    ap = lab.ap(1)
    base = [f"10.{i}.0.0/16" for i in range(1, 51)]
    drive(lab, ",".join(base), ap.addr)
    changed = [*base[1:], "10.200.0.0/16"]
    result = drive(lab, ",".join(changed), ap.addr)
    assert result["writes"] == {"route": 2, "nft element": 2}
    assert result["matches_kernel"]
    routes = {r["dst"] for r in owned(lab)["routes"]}
    assert routes == {c for c in changed}


def test_large_cidr_lists_are_sharded_and_steer_like_one_set(make_lab, tmp_path):
    lab = make_lab(n_aps=1)
    lab.serve_whoami(lab.ns_b)
    ap = lab.ap(1)
    # 20k /28s in 10.128.0.0/9 plus B's subnet: more than two shards' worth (SHARD_SIZE 8192)
    others = [str(ipaddress.IPv4Network((int(ipaddress.IPv4Address("10.128.0.0")) + 16 * i, 28)))
              for i in range(20_000)]  # fmt: skip
    listing = tmp_path / "cidrs.txt"
    listing.write_text("\n".join([*others, "10.10.10.0/24"]))
    first = drive(lab, f"@{listing}", ap.addr)
    assert first["again"] == 0 and first["matches_kernel"]
    sets = lab.exec(lab.ns_a, "nft", "-j", "list", "sets", "inet").stdout
    names = sorted(o["set"]["name"] for o in json.loads(sets)["nftables"] if "set" in o)
    assert [n for n in names if n.startswith("dst4")] == [f"dst4_{i}" for i in range(4)]
    # B's subnet sits in one of the shards: its lookup rule steers it like any other
    assert lab.whoami(lab.ns_a, lab.b_addr) == str(ap.overlay_addr)

    listing.write_text("\n".join([*others[1:], "10.10.10.0/24", "10.200.0.0/16"]))
    changed = drive(lab, f"@{listing}", ap.addr)
    assert changed["writes"] == {"route": 2, "nft element": 2}
    assert changed["matches_kernel"]
    listing.write_text("\n".join(others))  # others[0] back; B's subnet and 10.200/16 gone
    assert drive(lab, f"@{listing}", ap.addr)["writes"] == {"route": 3, "nft element": 3}
    assert lab.whoami(lab.ns_a, lab.b_addr) == str(lab.a_addr)  # B no longer steered
    drive(lab, "", "-", "-", "--teardown")
    assert owned(lab) == {"rules": [], "routes": [], "nexthops": [], "tables": []}


@pytest.mark.parametrize(
    ("mark", "mask"), [("0x2000", "0x3082"), ("0x100", "0x700"), ("0x1", "0xf0000001")]
)
def test_table_read_back_equals_rendered_for_any_mark(make_lab, mark, mask):
    lab = make_lab(n_aps=1)
    code = (
        "import ipaddress as I\n"
        "from sdnsup.nft import LibNftables, render_table\n"
        "from sdnsup.state import Settings\n"
        f"t = render_table(Settings(mark={mark}, mask={mask}), "
        "{'dst4': frozenset({I.ip_network('10.0.0.0/24'), I.ip_network('10.9.9.9/32')}), "
        "'dst6': frozenset({I.ip_network('fd00::/64')})}, "
        "[(I.ip_address('10.77.0.11'), 1), (I.ip_address('fd77::11'), 3)])\n"
        "b = LibNftables(); b.replace(t); print(b.read('sdnsup') == t)\n"
    )
    assert lab.exec(lab.ns_a, sys.executable, "-c", code).stdout.strip() == "True"
