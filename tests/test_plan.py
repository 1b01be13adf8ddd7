"""``sdnsup plan``: what run would install, as text to review or JSON to parse."""

import ipaddress
import json

from sdnsup.aps import parse_static_aps
from sdnsup.cidrs import parse_cidrs
from sdnsup.desired import RunConfig, desired_for
from sdnsup.plan import plan
from sdnsup.state import Slot
from tests.fakes import link

CONFIG = RunConfig(
    cidrs=parse_cidrs(["10.10.10.0/24,fd10::/64"]),
    aps=parse_static_aps("10.77.0.11+fd77::11"),
)
LINKS = {"10.77.0.11": link(2, "eth1"), "fd77::11": link(2, "eth1")}


def desired():
    ap = CONFIG.aps[0]
    return desired_for(CONFIG, ap, CONFIG.aps, (Slot(1, ap.addr4, ap.addr6),))


def resolve(addr):
    return LINKS.get(str(addr))


def test_plan_text_has_the_nft_table_and_the_ip_commands():
    text = plan(desired(), resolve)
    assert "table inet sdnsup {" in text
    assert "ip route replace 10.10.10.0/24 nhid 1566375940 table 7300 proto 245" in text
    assert "ip -4 nexthop replace id 1566375940 via 10.77.0.11 dev eth1 proto 245" in text


def test_plan_json_is_one_json_document():
    """A tool reads `plan --json` with a JSON parser: no comments or ip lines around it."""
    doc = json.loads(plan(desired(), resolve, as_json=True))
    assert set(doc) == {"notes", "nftables", "commands"}
    assert any("add" in cmd or "table" in json.dumps(cmd) for cmd in doc["nftables"])
    assert "ip route replace 10.10.10.0/24 nhid 1566375940 table 7300 proto 245" in doc["commands"]
    assert all(not c.startswith("#") for c in doc["commands"])
    assert any("nexthop objects" in note for note in doc["notes"])
    # a problem (the AP unreachable) is a note, not a comment line
    unreachable = plan(desired(), lambda addr: None, as_json=True)
    notes = json.loads(unreachable)["notes"]
    assert any(str(ipaddress.ip_address("10.77.0.11")) in n and "unreachable" in n for n in notes)
