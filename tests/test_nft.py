import ipaddress
import json

from sdnsup.nft import (
    NftTable,
    merge_shards,
    parse_element,
    render_table,
    ruleset_objects,
    shard_count,
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
    s = Settings(mark=0x100, mask=0x700)
    text = json.dumps(rules_of(s, "prerouting"))
    # set: x & ~(mask & ~mark) | mark  -> keeps every bit outside 0x600
    assert '{"&": [{"ct": {"key": "mark"}}, 4294965759]}, 256]' in text
    clear = json.dumps(rules_of(s, "input"))
    assert '{"&": [{"ct": {"key": "mark"}}, 4294965503]}' in clear  # ~0x700


def test_inbound_connections_get_their_mark_cleared():
    (rule,) = rules_of(Settings(), "input")
    assert rule[0]["match"]["right"] == "new"
    assert rule[-1]["mangle"]["value"] == {"&": [{"ct": {"key": "mark"}}, 0xFFFFCF7D]}


def test_exempt_comes_before_anything_that_marks():
    rules = [json.dumps(r) for r in rules_of(Settings(), "output")]
    exempt = next(i for i, r in enumerate(rules) if "@exempt4" in r)
    marking = [i for i, r in enumerate(rules) if '"mangle"' in r]
    assert rules[exempt].endswith('{"return": null}]') and exempt < min(marking)


def test_established_unmarked_traffic_leaves_at_the_first_rule():
    # every packet of the host's other connections: two conntrack checks, then gone
    first = rules_of(Settings(), "output")[0]
    assert [x["match"]["op"] for x in first[:2]] == ["!=", "=="]
    assert first[0]["match"]["right"] == "new" and first[-1] == {"return": None}
    assert first[1]["match"] == {
        "op": "==",
        "left": {"&": [{"ct": {"key": "mark"}}, 0x3082]},
        "right": 0,
    }


def test_every_slot_value_restores_its_own_packet_mark():
    s = Settings()
    (vmap,) = [r[0]["vmap"] for r in rules_of(s, "output") if "vmap" in r[0]]
    targets = {value: verdict["goto"]["target"] for value, verdict in vmap["data"]["set"]}
    assert targets == {
        **{s.slot_mark(n): f"mark_{n}" for n in range(s.slots + 1)},
        s.probe_mark: "mark_probe",
    }
    assert len(targets) == 9  # the flag alone (not pinned yet), slots 1-7, path probes
    for n in range(s.slots + 1):
        ((statement,),) = rules_of(s, f"mark_{n}")
        assert statement["mangle"]["key"] == {"meta": {"key": "mark"}}
        assert statement["mangle"]["value"]["|"][1] == s.slot_mark(n)


def test_new_connections_are_pinned_after_routing_in_the_original_direction_only():
    rules = [json.dumps(r) for r in rules_of(Settings(), "pinning")]
    assert '"right": 8192' in rules[0] and rules[0].endswith('{"return": null}]')  # only unpinned
    assert '"direction"' in rules[1] and '"reply"' in rules[1]
    assert rules[2] == '[{"jump": {"target": "pins"}}]'
    # routed elsewhere than to an AP: the normal route, for life
    assert '"@exempt4"' in rules[3] and '"!="' in rules[3]


def test_pins_name_each_slot_address_and_round_trip_apart_from_the_ruleset():
    s = Settings()
    a4, a6 = ipaddress.ip_address("10.77.0.11"), ipaddress.ip_address("fd77::12")
    t = render_table(s, {"dst4": frozenset({N("10.0.0.0/24")})}, [(a6, 2), (a4, 1)])
    pins = json.loads(t.pins)
    assert [p[0]["match"]["right"] for p in pins] == ["10.77.0.11", "fd77::12"]
    assert pins[1][1]["mangle"]["value"]["|"][1] == s.slot_mark(2)
    other = render_table(s, {"dst4": frozenset({N("10.0.0.0/24")})}, [(a4, 1)])
    assert other.ruleset == t.ruleset and other.pins != t.pins


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


def test_parse_element_forms():
    assert parse_element("10.0.0.1") == [N("10.0.0.1/32")]
    assert parse_element({"prefix": {"addr": "fd00::", "len": 64}}) == [N("fd00::/64")]
    assert parse_element({"range": ["10.0.0.0", "10.0.1.255"]}) == [N("10.0.0.0/23")]


def test_small_sets_stay_one_set_large_ones_are_sharded_by_powers_of_two():
    assert [shard_count(n) for n in (0, 8192, 8193, 16385, 100_000, 10**7)] == [1, 1, 2, 4, 16, 64]


def test_sharded_table_has_a_lookup_rule_per_shard_and_round_trips():
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    nets = frozenset(ipaddress.IPv4Network((base + 16 * i, 28)) for i in range(20_000))
    t = render_table(Settings(), {"dst4": nets, "dst6": frozenset({N("fd00::/64")})})
    assert t.shards == {"dst4": 4}
    parts = t.kernel_sets()
    assert sorted(parts) == ["dst4_0", "dst4_1", "dst4_2", "dst4_3", "dst6"]
    # every CIDR in exactly one shard, and shards balanced (hash of address and length)
    assert set().union(*(parts[f"dst4_{i}"] for i in range(4))) == nets
    assert all(4000 < len(parts[f"dst4_{i}"]) < 6000 for i in range(4))
    rights = [x["match"]["right"] for e in rules_of_table(t, "output") for x in e if "match" in x]
    lookups = [r for r in rights if str(r).startswith("@dst")]
    assert lookups == ["@dst4_0", "@dst4_1", "@dst4_2", "@dst4_3", "@dst6"]
    listing = []
    for c in table_commands(t)[3:]:
        kind, body = next(iter(c["add"].items()))
        listing.append({kind: dict(body, handle=1)})
    assert table_from_listing("sdnsup", listing) == t


def test_a_cidr_in_the_wrong_shard_makes_the_table_differ_so_it_is_reloaded():
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    nets = frozenset(ipaddress.IPv4Network((base + 16 * i, 28)) for i in range(9000))
    t = render_table(Settings(), {"dst4": nets})
    parts = dict(t.kernel_sets())
    moved = next(iter(parts["dst4_0"]))
    parts["dst4_0"] -= {moved}
    parts["dst4_1"] |= {moved}
    read = merge_shards(NftTable(t.name, t.ruleset), parts)
    assert read.set("dst4") == nets and read.ruleset != t.ruleset


def rules_of_table(table, chain):
    return [
        o["rule"]["expr"]
        for o in json.loads(table.ruleset)
        if o.get("rule", {}).get("chain") == chain
    ]


def test_a_tcp_connection_adopted_mid_stream_is_never_steered():
    # conntrack sees an inbound connection that predates it as NEW on this host's reply:
    # that reply must leave the chain before the steering lookups
    rules = rules_of(Settings(), "output")
    adopt = next(i for i, r in enumerate(rules) if "tcp" in json.dumps(r))
    steer = next(i for i, r in enumerate(rules) if "@dst4" in json.dumps(r))
    assert adopt < steer and rules[adopt][-1] == {"return": None}
    assert rules[adopt][1]["match"]["op"] == "!=" and rules[adopt][1]["match"]["right"] == "syn"
