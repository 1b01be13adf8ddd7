import ipaddress
import json

from sdnsup.nft import (
    element_commands,
    parse_element,
    render_table,
    ruleset_objects,
    table_commands,
    table_from_listing,
)
from sdnsup.state import Settings

N = ipaddress.ip_network


def rules_of(settings, chain):
    return [
        o["rule"]["expr"]
        for o in ruleset_objects(settings)
        if o.get("rule", {}).get("chain") == chain
    ]


def test_output_chain_is_route_type_so_mark_changes_reroute():
    chains = {o["chain"]["name"]: o["chain"] for o in ruleset_objects(Settings()) if "chain" in o}
    assert chains["output"]["type"] == "route"
    assert chains["prerouting"]["prio"] == -150


def test_marks_are_masked_so_foreign_bits_survive():
    s = Settings(mark=0x100, mask=0x300)
    text = json.dumps(rules_of(s, "prerouting"))
    # set: x & ~(mask & ~mark) | mark  -> keeps every bit outside 0x200
    assert '{"&": [{"ct": {"key": "mark"}}, 4294966783]}, 256]' in text
    clear = json.dumps(rules_of(s, "input"))
    assert '{"&": [{"ct": {"key": "mark"}}, 4294966527]}' in clear  # ~0x300


def test_inbound_connections_get_their_mark_cleared():
    (rule,) = rules_of(Settings(), "input")
    assert rule[0]["match"]["right"] == "new"
    assert rule[-1]["mangle"]["value"] == {"&": [{"ct": {"key": "mark"}}, 0xFFFFEFFF]}


def test_exempt_comes_first():
    first = rules_of(Settings(), "output")[0]
    assert first[0]["match"]["right"] == "@exempt4" and first[1] == {"return": None}


def test_table_commands_replace_atomically_and_round_trip():
    t = render_table(Settings(), {"dst4": frozenset({N("10.0.0.0/24"), N("10.0.1.1/32")})})
    cmds = table_commands(t)
    assert [next(iter(c)) for c in cmds[:3]] == ["add", "delete", "add"]
    # feed the "add" bodies back as if nft listed them
    listing = []
    for c in cmds[3:]:
        kind, body = next(iter(c["add"].items()))
        listing.append({kind: dict(body, handle=1)})
    assert table_from_listing("sdnsup", listing) == t


def test_element_commands_delete_before_add():
    cmds = element_commands(
        "sdnsup", {"dst4": (frozenset({N("10.2.0.0/16")}), frozenset({N("10.1.0.0/16")}))}
    )
    assert [next(iter(c)) for c in cmds] == ["delete", "add"]


def test_parse_element_forms():
    assert parse_element("10.0.0.1") == [N("10.0.0.1/32")]
    assert parse_element({"prefix": {"addr": "fd00::", "len": 64}}) == [N("fd00::/64")]
    assert parse_element({"range": ["10.0.0.0", "10.0.1.255"]}) == [N("10.0.0.0/23")]
