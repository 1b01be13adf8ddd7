"""The netlink monitor without root: parsing of captured kernel messages, the pure relevance
function, the kernel-side echo filter (run by a small cBPF interpreter), the listing of our
own netlink ports, echo muting and coalescing on trio's MockClock with a fake event source
and port reader, and the socket reader on a socketpair.

The fixtures are datagrams captured from Linux 6.18 in a network namespace (a monitor socket
subscribed to the same groups, while ``ip``/``nft`` made each change named in the comment).
Setup: veth v0 (ifindex 3, 192.0.2.1/24, 2001:db8::1/64) and v1 (ifindex 2); nexthops
0x5d5d0004 via 192.0.2.2 and 0x5d5d0006 via 2001:db8::2; routes 10.10.10.0/24,
10.10.20.0/24 and 2001:db8:10::/48 in table 7300; rules pref 7300; proto 245 throughout.
"""

import base64
import dataclasses
import errno
import math
import os
import socket
import zlib

import pytest
import trio
import trio.testing

from sdnsup import netmon
from sdnsup.errors import NftError, RoutesError
from sdnsup.netmon import (
    COALESCE,
    OVERFLOW_CAUSE,
    SETTLE_MAX,
    Event,
    Monitor,
    NetlinkSource,
    Watch,
    own_netlink_ports,
    parse_nfnl,
    parse_rtnl,
    relevant,
    rtnl_filter,
)
from sdnsup.state import Settings

# --- captured datagrams ------------------------------------------------------------------

_HEX = {
    # nh4 add
    "NH4_ADD": (
        "3000000068000506b84c076b4d59000002fdf500000000000800010004005d5d080005000300000008000600"
        "c0000202"
    ),
    # nh6 add
    "NH6_ADD": (
        "3c00000068000506b94c076b4f5900000afdf500000000000800010006005d5d080005000300000014000600"
        "20010db8000000000000000000000002"
    ),
    # route4 add
    "ROUTE4_ADD": (
        "4400000018000006b94c076b5159000002180000fcf500010000000008000f00841c0000080001000a0a0a00"
        "08001e0004005d5d08000500c00002020800040003000000"
    ),
    # route6 add
    "ROUTE6_ADD": (
        "9000000018000006b94c076b555900000a300000fcf500010000000008000f00841c00001400010020010db8"
        "001000000000000000000000080006000004000008001e0006005d5d1400050020010db80000000000000000"
        "00000002080004000300000024000c0000000000000000000000000000000000000000000000000000000000"
        "000000000500140000000000"
    ),
    # rule4 add
    "RULE4_ADD": (
        "4c00000020000000b94c076b5759000002000000fc0000010000000008000f00841c000008000e00ffffffff"
        "05001500f500000008000600841c000008000a00001000000800100000100000"
    ),
    # route4 replace foreign
    "ROUTE4_REPLACED": (
        "3c00000018000001ba4c076b6359000002180000fc0400010000000008000f00841c0000080001000a0a1400"
        "08000500c00002030800040003000000"
    ),
    # route4 del
    "ROUTE4_DEL": (
        "4400000019000000ba4c076b6559000002180000fcf500010000000008000f00841c0000080001000a0a0a00"
        "08001e0004005d5d08000500c00002020800040003000000"
    ),
    # route6 replace foreign
    "ROUTE6_REPLACED": (
        "8800000018000001ba4c076b675900000a300000fc0400010000000008000f00841c00001400010020010db8"
        "00100000000000000000000008000600000400001400050020010db800000000000000000000000308000400"
        "0300000024000c00000000000000000000000000000000000000000000000000000000000000000005001400"
        "00000000"
    ),
    # route6 del
    "ROUTE6_FOREIGN_DEL": (
        "8800000019000000ba4c076b695900000a300000fc0400010000000008000f00841c00001400010020010db8"
        "00100000000000000000000008000600000400001400050020010db800000000000000000000000308000400"
        "0300000024000c00000000000000000000000000000000000000000000000000000000000000000005001400"
        "00000000"
    ),
    # rule4 del
    "RULE4_DEL": (
        "4c00000021000000ba4c076b6b59000002000000fc0000010000000008000f00841c000008000e00ffffffff"
        "05001500f500000008000600841c000008000a00001000000800100000100000"
    ),
    # rule6 del
    "RULE6_DEL": (
        "4c00000021000000ba4c076b6d5900000a000000fc0000010000000008000f00841c000008000e00ffffffff"
        "05001500f500000008000600841c000008000a00001000000800100000100000"
    ),
    # nh6 replace foreign
    "NH6_REPLACED": (
        "3c00000068000505bb4c076b6f5900000afd0400000000000800010006005d5d080005000300000014000600"
        "20010db8000000000000000000000003"
    ),
    # nh4 del
    "NH4_DEL": (
        "3000000069000500bb4c076b7159000002fdf500000000000800010004005d5d080005000300000008000600"
        "c0000202"
    ),
    # nh6 del
    "NH6_DEL": (
        "3c00000069000500bb4c076b735900000afd0400000000000800010006005d5d080005000300000014000600"
        "20010db8000000000000000000000003"
    ),
    # main route add
    "MAIN_ROUTE_ADD": (
        "3c00000018000006bb4c076b7559000002180000fe0300010000000008000f00fe00000008000100c6336400"
        "08000500c00002030800040003000000"
    ),
    # main route del
    "MAIN_ROUTE_DEL": (
        "3c00000019000000bb4c076b7759000002180000fe0300010000000008000f00fe00000008000100c6336400"
        "08000500c00002030800040003000000"
    ),
    # addr4 add
    "ADDR4_ADD": (
        "4c00000014000000bb4c076b79590000021881000300000008000100c000020508000200c000020507000300"
        "76300000080008008100000014000600ffffffffffffffffd3220500d3220500"
    ),
    # addr4 del
    "ADDR4_DEL": (
        "4c00000015000000bc4c076b7b590000021881000300000008000100c000020508000200c000020507000300"
        "76300000080008008100000014000600ffffffffffffffffd3220500d3220500"
    ),
    # addr6 add
    "ADDR6_ADD": (
        "480000001400000000000000000000000a408200030000001400010020010db8000000000000000000000005"
        "14000600fffffffffffffffff2220500f22205000800080082000000"
    ),
    # addr4 add
    "KERNEL_ROUTE_ADD": (
        "3c00000018000006000000000000000002200000ff02fe020000000008000f00ff00000008000100c0000205"
        "08000700c00002010800040003000000"
    ),
    # nft setup
    "NFT_NEWTABLE": (
        "3c000000000a0000010000005b590000010000020b00010073646e737570000008000300000000000c000400"
        "00000000000000010800020000000000"
    ),
    # nft setup
    "NFT_NEWGEN": (
        "2c0000000f0a0000010000005b590000000000020800010000000002080002000000595b080003006e667400"
    ),
    # nft setup2
    "NFT_NEWSETELEM": (
        "480000000c0a000400000000ae590000010000140b00010073646e7375700000090002006473743400000000"
        "1c000300180001000c00010008000100000000000800030000000001400000000c0a000400000000ae590000"
        "010000140b00010073646e737570000009000200647374340000000014000300100001000c00010008000100"
        "0a0a0a00480000000c0a000400000000ae590000010000140b00010073646e73757000000900020064737434"
        "000000001c000300180001000c000100080001000a0a0b000800030000000001"
    ),
    # nft del element
    "NFT_DEL_ELEMENT": (
        "400000000e0a0000000000008e590000010000090b00010073646e7375700000090002006473743400000000"
        "14000300100001000c000100080001000a0a0a00480000000e0a0000000000008e590000010000090b000100"
        "73646e73757000000900020064737434000000001c000300180001000c000100080001000a0a0b0008000300"
        "00000001"
    ),
    # nft flush set
    "NFT_FLUSH_SET": (
        "480000000e0a000000000000905900000100000a0b00010073646e7375700000090002006473743400000000"
        "1c000300180001000c000100080001000a0a1f000800030000000001400000000e0a00000000000090590000"
        "0100000a0b00010073646e737570000009000200647374340000000014000300100001000c00010008000100"
        "0a0a1e00480000000e0a000000000000905900000100000a0b00010073646e73757000000900020064737434"
        "000000001c000300180001000c000100080001000a0a15000800030000000001400000000e0a000000000000"
        "905900000100000a0b00010073646e737570000009000200647374340000000014000300100001000c000100"
        "080001000a0a1400480000000e0a000000000000905900000100000a0b00010073646e737570000009000200"
        "64737434000000001c000300180001000c00010008000100000000000800030000000001"
    ),
    # nft del rule
    "NFT_DEL_RULE": (
        "40010000080a000001000000955900000100000b0b00010073646e73757000000b0002006f75747075740000"
        "0c00030000000000000000030801040024000100090001006d6574610000000014000200080002000000000f"
        "08000100000000012c00010008000100636d700020000200080001000000000108000200000000000c000300"
        "0500010002000000340001000c0001007061796c6f6164002400020008000100000000010800020000000001"
        "08000300000000100800040000000004300001000b0001006c6f6f6b75700000200002000900010064737434"
        "00000000080002000000000108000500000000002c0001000e000100696d6d65646961746500000018000200"
        "08000100000000010c000200080001000100000024000100090001006d657461000000001400020008000200"
        "000000030800030000000001"
    ),
    # nft del chain
    "NFT_DEL_CHAIN": (
        "38000000050a000001000000a25900000100000c0b00010073646e73757000000b0003006f75747075740000"
        "0c0002000000000000000002"
    ),
    # nft del set
    "NFT_DEL_SET": (
        "380000000b0a000001000000a45900000100000d0b00010073646e7375700000090002006473743400000000"
        "0c0010000000000000000001"
    ),
    # nft del table
    "NFT_DEL_TABLE": (
        "34000000020a000001000000a65900000100000e0b00010073646e737570000008000300000000000c000400"
        "0000000000000001"
    ),
    # nft other table del
    "NFT_OTHER_TABLE_DEL": (
        "34000000050a000001000000a85900000200000f0a0001006f7468657200000006000300630000000c000200"
        "000000000000000134000000020a000001000000a85900000200000f0a0001006f7468657200000008000300"
        "000000000c0004000000000000000002"
    ),
    # nft flush ruleset
    "NFT_FLUSH_RULESET": (
        "40010000080a000001000000b0590000010000150b00010073646e73757000000b0002006f75747075740000"
        "0c00030000000000000000030801040024000100090001006d6574610000000014000200080002000000000f"
        "08000100000000012c00010008000100636d700020000200080001000000000108000200000000000c000300"
        "0500010002000000340001000c0001007061796c6f6164002400020008000100000000010800020000000001"
        "08000300000000100800040000000004300001000b0001006c6f6f6b75700000200002000900010064737434"
        "00000000080002000000000108000500000000002c0001000e000100696d6d65646961746500000018000200"
        "08000100000000010c000200080001000100000024000100090001006d657461000000001400020008000200"
        "000000030800030000000001380000000b0a000001000000b0590000010000150b00010073646e7375700000"
        "0900020064737434000000000c001000000000000000000138000000050a000001000000b059000001000015"
        "0b00010073646e73757000000b0003006f757470757400000c000200000000000000000234000000020a0000"
        "01000000b0590000010000150b00010073646e737570000008000300000000000c0004000000000000000003"
    ),
    # nft flush ruleset
    "NFT_FLUSH_RULESET_GEN": (
        "2c0000000f0a000001000000b059000000000015080001000000001508000200000059b0080003006e667400"
    ),
}

# A real NEWLINK is 1492 bytes, mostly zeros: kept compressed.
_ZLIB = {
    # link down (zlib + base64)
    "LINK_DOWN": (
        "eNrVUz1LA0EQffflXULUUwKCgkYUPxA0qFjE+BkttLOztPDAShGS1Fem8DdI/oqFlZaW+QHBwspCbOLM7oScx8UT"
        "RNAHl7ebmZ19Mzvz5AA+ojBg0a/p8wpwaVcvAh4G0SaDQ94mmEeUt4OKYg82Wg7zKg7Ufg2dDvOE2CeFt4SnVBwP"
        "C+K3qO72UBLeEd4V3sRbxyUui/++xCmInmnZzyj9HlaUfg9FZR9QqpgPRfe84ix5LR+9V+7ueW1SbAbwiDHKXSMj"
        "fGxqvrXwr3BOmbiSB+fwG/pzWKKa6gL5GKW7DNSD6oV+E23JUfUvr65rQS1A0RrHDf3bUK8U7b7PHyL8U/j05O2E"
        "3Dl+08ySToNnIcyTXu6Bh4KDVkOfeZXcuBu5z+M6uWuaw734YSmD8ETP0qnZm7HombPn/lqNBN1GH3tSfcKXjS/t"
        "CrYmzpX1x/3WDQtzsu7OQjvm5KbUPBPjwh+bnfiMx9HN97u6y9Tjbkot+iGfcNKhrmTMYij1bhvboY298ANClkTU"
    ),
    # link up (zlib + base64)
    "LINK_UP": (
        "eNrVUz1LA0EQffex3iVEvUhAUNBIxA8EDSoWMX5GC+3sLC0MWCmCSX1lCn+D5K9Y2Fla5gcECysLsYkzuxNyHhcj"
        "iKAP7t7ezezsm9mZJwUEiMKCQ28nsGgFePRVLwI+htEmgyJvtitktbdCRbMPFy3FvIoD/b2GTod5UuxTwlvC07A1"
        "L4jfoj7bR0l4R3hXeBNvHY+4LP77Eiev4yjMaL0+CqSEeUXiFzUPaVXMh6J7XnOadi0fvVfuH3htU2wG8Ihxyt0g"
        "JXxsG75z8K9wTpl4kgfn8Bv6M1iimpoCBRijsyzUqzcX5o6MJUPVv7y6rlVrVRSdCdzS34a+tWj3fX4Q4Z8ioCtv"
        "J+TO8Zt2mnSak3Kkl3sgW1BoNcyeV8mNu5H7PK6Tu6Y52osfllIIT8wsndq9GYvuOXvur9VK0G31sSfVJ3zZ+NKu"
        "4RriXFl/3G/dcjAn6+4stGNO3oCap2Kc/2OzE5/xOLr5fld3mXrcG1CLfsgl7FTUlYxZjAw828V26GIv/ADkJUOT"
    ),
    # link up (zlib + base64)
    "LINK_UP_RUNNING": (
        "eNrVkz1LA0EQht+9j1wSop4SEBQ0EvEDQYOKRYyf0UI7O0sLA1aKYFJfmcLfIPkrFnaWlvkBwcLKQmzizO6ExOVi"
        "BBF04PLcZmZn35mbffKBEL2m4NJvOVR6FdCqVgCSGEKLHD5FJ8Ac1X4fZc0kPDR95ioO9HoN7TZzUvxTwi3hNBzN"
        "BYlb1GcnURTuCHeFm3hrB8SSxO9LnpzO42MGSq/zpIS5IvkLmgmtinkouuc107Rr+ei9fP/A7w7lZgMeMU61G0sJ"
        "jx3DOxf/ys6pkkDq4Bp+Q38GS9RT06AQY3SWQq1yc2G+kfFkqPuXV9fVSrWCgjuBW/q3DmVN3+cHPfyphfTJWzG1"
        "c/6Gkyad+qQoS3p5BnJ5H8262fMqtfE08pzbOnlqGiPd/FExhejE3KVTp3vHevecPffXqmJ0qz7+uP5ELxtf+rV5"
        "Blwr67fj1pWLOXnv3IWWFRQM6HnKYu6P3R37jtvWqfe7uks048GAXvSzbMxOn6aSbRbDA8/2sB152Is+AOfCRGQ="
    ),
    # link down (zlib + base64)
    "PEER_NO_CARRIER": (
        "eNrVU7tKA1EQPXd3r7sbokYJCAoaH/jAwvjAIsa3ItjZWVoYsFICJvXaWfgNEvAr/AbttPQDgoiFWNjFmbsTsq6J"
        "EUTQA7vn7s7cuWfmztxrIIUoFCx62/LThY3yLOChE1Ub0ORNRNxj7Bqbhj04eNDMc9gy3/Oo1ZgHxD4ovCw8ZM7x"
        "MCl+U+ZsDznhVeE14SW81VzivPhvSJyMiaMxLN+jRp+HGdrFnDX2DqOKeVt0TxhOkNfI9cvV2R2vLYrNAG7RBx/1"
        "GoS4tEPetfCvcEgZ+JIH5/Ab+pOYppqGgVPopfMUyoXTo/BOtLmTJFX/+KRYKpQKyNr9uCD/c3NL0e77+CDCP0WK"
        "rrxqf/7P8StWgnQqnoUgTXq5B24yGk874Z5XyY27kfs8rpO7ptLdiB/kfAR7yuS9bzVmLLrn4LG1VtVEt2phb1af"
        "4HnxS7uBExLnyvrjfgvKxris67OQidXPb1NzN8ZV9bdmIz7jcdTz/a7uPPW426YWrZBu4qGpKxlj6Gp7toOVwMF6"
        "8A4rPkUt"
    ),
}


def raw(name):
    if name in _HEX:
        return bytes.fromhex(_HEX[name])
    return zlib.decompress(base64.b64decode(_ZLIB[name]))


def parse(name):
    return (parse_nfnl if name.startswith("NFT") else parse_rtnl)(raw(name))


def only(name):
    (event,) = parse(name)
    return event


V0, V1 = 3, 2
WATCH = Watch(ifindexes=frozenset({V0}))  # defaults: table/priority 7300, proto 245, inet sdnsup

# --- parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("NH4_ADD", dict(kind="nexthop", deleted=False, family=socket.AF_INET, nhid=0x5D5D0004,
                         proto=245, ifindex=V0)),
        ("NH6_REPLACED", dict(kind="nexthop", deleted=False, family=socket.AF_INET6,
                              nhid=0x5D5D0006, proto=4, replace=True)),
        ("NH4_DEL", dict(kind="nexthop", deleted=True, nhid=0x5D5D0004, proto=245)),
        ("ROUTE4_ADD", dict(kind="route", deleted=False, prefix="10.10.10.0/24", table=7300,
                            proto=245, nhid=0x5D5D0004, replace=False)),
        ("ROUTE6_ADD", dict(kind="route", family=socket.AF_INET6, prefix="2001:db8:10::/48",
                            table=7300, proto=245, nhid=0x5D5D0006)),
        ("ROUTE4_REPLACED", dict(kind="route", deleted=False, prefix="10.10.20.0/24",
                                 table=7300, proto=4, nhid=0, replace=True)),
        ("ROUTE4_DEL", dict(kind="route", deleted=True, prefix="10.10.10.0/24", table=7300,
                            proto=245, nhid=0x5D5D0004)),
        ("MAIN_ROUTE_DEL", dict(kind="route", deleted=True, prefix="198.51.100.0/24",
                                table=254, proto=3)),
        ("RULE4_ADD", dict(kind="rule", deleted=False, family=socket.AF_INET, priority=7300,
                           table=7300, proto=245)),
        ("RULE6_DEL", dict(kind="rule", deleted=True, family=socket.AF_INET6, priority=7300,
                           table=7300, proto=245)),
        ("ADDR4_ADD", dict(kind="addr", deleted=False, ifindex=V0, ifname="v0",
                           prefix="192.0.2.5/24")),
        ("ADDR6_ADD", dict(kind="addr", deleted=False, ifindex=V0, prefix="2001:db8::5/64")),
        ("LINK_DOWN", dict(kind="link", ifindex=V0, ifname="v0", flags=0x1002, change=1,
                           operstate="down")),
        ("LINK_UP", dict(kind="link", ifindex=V0, flags=0x11003, change=1,
                         operstate="lowerlayerdown")),
        ("LINK_UP_RUNNING", dict(kind="link", ifindex=V0, flags=0x11043, operstate="up")),
        ("NFT_NEWTABLE", dict(kind="nft-table", deleted=False, family=1, nft_table="sdnsup")),
        ("NFT_DEL_TABLE", dict(kind="nft-table", deleted=True, family=1, nft_table="sdnsup")),
        ("NFT_DEL_CHAIN", dict(kind="nft-chain", deleted=True, nft_table="sdnsup",
                               name="output")),
        ("NFT_DEL_RULE", dict(kind="nft-rule", deleted=True, nft_table="sdnsup", name="output")),
        ("NFT_DEL_SET", dict(kind="nft-set", deleted=True, nft_table="sdnsup", name="dst4")),
        ("NFT_NEWGEN", dict(kind="nft-gen")),
    ],
)  # fmt: skip
def test_parse_captured_message(name, fields):
    event = only(name)
    assert {k: getattr(event, k) for k in fields} == fields
    assert event.detail


def test_notifications_carry_the_writers_port_id():
    # nlmsg_pid is the port id of the socket that made the change (the ip/nft process,
    # autobound to its pid), 0 for the kernel's own changes.
    assert only("ROUTE4_DEL").port > 0
    (gen,) = parse("NFT_FLUSH_RULESET_GEN")
    assert {e.port for e in parse("NFT_FLUSH_RULESET")} == {gen.port}  # one nft process
    assert gen.detail.endswith(f"committed by nft[{gen.port}]")
    assert only("LINK_DOWN").port == 0


def test_one_nft_datagram_holds_a_whole_transaction_in_order():
    events = parse("NFT_FLUSH_RULESET")  # nft flush ruleset: contents first, the table last
    assert [(e.kind, e.name) for e in events] == [
        ("nft-rule", "output"),
        ("nft-set", "dst4"),
        ("nft-chain", "output"),
        ("nft-table", ""),
    ]
    assert all(e.deleted and e.nft_table == "sdnsup" and e.family == 1 for e in events)
    assert [e.kind for e in parse("NFT_FLUSH_RULESET_GEN")] == ["nft-gen"]
    assert len(parse("NFT_FLUSH_SET")) == 5  # one DELSETELEM per interval end
    assert [e.deleted for e in parse("NFT_NEWSETELEM")] == [False] * 3


def test_link_up_burst_and_link_down_burst_as_captured():
    assert [e.kind for e in parse("NH4_ADD") + parse("LINK_DOWN")] == ["nexthop", "link"]
    peer = only("PEER_NO_CARRIER")
    assert (peer.ifindex, peer.ifname, peer.operstate) == (V1, "v1", "lowerlayerdown")


def test_parse_skips_unknown_and_malformed_messages():
    done = bytes.fromhex("14000000030002000100000000000000") + b"\0\0\0\0"  # NLMSG_DONE
    assert parse_rtnl(done) == []
    route = raw("ROUTE4_DEL")
    assert parse_rtnl(route[:20]) == []  # length field says 68: cut off, skipped
    assert parse_rtnl(route + done) == parse_rtnl(route)  # several messages per datagram
    buf = bytearray(4096)
    buf[: len(route)] = route
    assert parse_rtnl(bytes(buf), len(route)) == parse_rtnl(route)
    assert parse_nfnl(raw("ROUTE4_DEL")) == []  # not nftables


# --- relevance -----------------------------------------------------------------------------

OURS = dict(table=7300, proto=245)


@pytest.mark.parametrize(
    ("event", "cause"),
    [
        # links and addresses of watched interfaces
        (Event("link", ifindex=V0, ifname="v0", flags=0x1002), "link v0 down"),
        (Event("link", ifindex=V0, ifname="v0", flags=0x11043), "link v0 up"),
        (Event("link", ifindex=V0, ifname="v0", flags=0x1003), "link v0 up without carrier"),
        (Event("link", ifindex=V0, deleted=True), "link #3 removed"),
        (Event("link", ifindex=V1, ifname="v1", flags=0x1002), None),  # not an AP interface
        (Event("addr", ifindex=V0, ifname="v0", prefix="192.0.2.5/24"),
         "address 192.0.2.5/24 added on v0"),
        (Event("addr", ifindex=V0, prefix="2001:db8::5/64", deleted=True),
         "address 2001:db8::5/64 deleted from interface #3"),
        (Event("addr", ifindex=V1, prefix="192.0.2.9/24"), None),
        # routes
        (Event("route", deleted=True, prefix="10.10.10.0/24", **OURS),
         "route 10.10.10.0/24 deleted from table 7300"),
        (Event("route", prefix="10.10.10.0/24", **OURS), None),  # our own add (echo)
        (Event("route", prefix="10.10.10.0/24", replace=True, **OURS), None),  # our replace
        (Event("route", prefix="10.10.20.0/24", table=7300, proto=4, replace=True),
         "route 10.10.20.0/24 in table 7300 replaced by protocol 4"),
        (Event("route", prefix="10.10.30.0/24", table=7300, proto=4), None),  # foreign add
        (Event("route", deleted=True, prefix="10.10.30.0/24", table=7300, proto=4), None),
        (Event("route", deleted=True, prefix="10.10.10.0/24", table=254, proto=245), None),
        (Event("route", deleted=True, prefix="198.51.100.0/24", table=254, proto=3), None),
        # rules
        (Event("rule", deleted=True, priority=7300, **OURS), "policy rule 7300 deleted"),
        (Event("rule", priority=7300, **OURS), None),  # echo
        (Event("rule", deleted=True, priority=7300, table=7300, proto=0), None),  # not ours
        (Event("rule", deleted=True, priority=100, **OURS), None),
        # nexthops
        (Event("nexthop", deleted=True, nhid=0x5D5D0004, proto=245), "nexthop 0x5d5d0004 deleted"),
        (Event("nexthop", deleted=True, nhid=0x5D5D0006, proto=4), "nexthop 0x5d5d0006 deleted"),
        (Event("nexthop", nhid=0x5D5D0006, proto=4, replace=True),
         "nexthop 0x5d5d0006 replaced by protocol 4"),
        (Event("nexthop", nhid=0x5D5D0004, proto=245), None),  # echo
        (Event("nexthop", deleted=True, nhid=7, proto=245), None),  # not our id
        # nftables
        (Event("nft-table", deleted=True, family=1, nft_table="sdnsup"),
         "nftables table inet sdnsup deleted"),
        (Event("nft-chain", deleted=True, family=1, nft_table="sdnsup", name="output"),
         "nftables chain inet sdnsup output deleted"),
        (Event("nft-rule", deleted=True, family=1, nft_table="sdnsup", name="output"),
         "nftables rule deleted from chain inet sdnsup output"),
        (Event("nft-set", deleted=True, family=1, nft_table="sdnsup", name="dst4"),
         "nftables set inet sdnsup dst4 deleted"),
        (Event("nft-setelem", deleted=True, family=1, nft_table="sdnsup", name="dst4"),
         "nftables element deleted from set inet sdnsup dst4"),
        (Event("nft-setelem", family=1, nft_table="sdnsup", name="dst4"), None),  # additions
        (Event("nft-table", family=1, nft_table="sdnsup"), None),
        (Event("nft-table", deleted=True, family=2, nft_table="sdnsup"), None),  # ip, not inet
        (Event("nft-table", deleted=True, family=1, nft_table="other"), None),
        (Event("nft-gen"), None),
        # lost events
        (Event("overflow"), OVERFLOW_CAUSE),
        (Event("something-new"), None),
    ],
)  # fmt: skip
def test_relevant(event, cause):
    assert relevant(event, WATCH) == cause


def test_relevant_on_captured_messages():
    causes = {
        name: [c for c in (relevant(e, WATCH) for e in parse(name)) if c]
        for name in [*_HEX, *_ZLIB]
    }
    assert {name: c for name, c in causes.items() if c} == {
        "ROUTE4_REPLACED": ["route 10.10.20.0/24 in table 7300 replaced by protocol 4"],
        "ROUTE4_DEL": ["route 10.10.10.0/24 deleted from table 7300"],
        "ROUTE6_REPLACED": ["route 2001:db8:10::/48 in table 7300 replaced by protocol 4"],
        "RULE4_DEL": ["policy rule 7300 deleted"],
        "RULE6_DEL": ["policy rule 7300 deleted"],
        "NH6_REPLACED": ["nexthop 0x5d5d0006 replaced by protocol 4"],
        "NH4_DEL": ["nexthop 0x5d5d0004 deleted"],
        "NH6_DEL": ["nexthop 0x5d5d0006 deleted"],
        "ADDR4_ADD": ["address 192.0.2.5/24 added on v0"],
        "ADDR4_DEL": ["address 192.0.2.5/24 deleted from v0"],
        "ADDR6_ADD": ["address 2001:db8::5/64 added on interface #3"],
        "NFT_DEL_ELEMENT": ["nftables element deleted from set inet sdnsup dst4"] * 2,
        "NFT_FLUSH_SET": ["nftables element deleted from set inet sdnsup dst4"] * 5,
        "NFT_DEL_RULE": ["nftables rule deleted from chain inet sdnsup output"],
        "NFT_DEL_CHAIN": ["nftables chain inet sdnsup output deleted"],
        "NFT_DEL_SET": ["nftables set inet sdnsup dst4 deleted"],
        "NFT_DEL_TABLE": ["nftables table inet sdnsup deleted"],
        "NFT_FLUSH_RULESET": [
            "nftables rule deleted from chain inet sdnsup output",
            "nftables set inet sdnsup dst4 deleted",
            "nftables chain inet sdnsup output deleted",
            "nftables table inet sdnsup deleted",
        ],
        "LINK_DOWN": ["link v0 down"],
        "LINK_UP": ["link v0 up"],
        "LINK_UP_RUNNING": ["link v0 up"],
    }


def test_watch_of_every_interface_and_from_settings():
    every = Watch()
    assert relevant(Event("link", ifindex=99, ifname="x", flags=0x11043), every) == "link x up"
    nothing = Watch(ifindexes=frozenset())
    assert relevant(Event("link", ifindex=99, ifname="x", flags=0x11043), nothing) is None
    custom = Watch.for_settings(Settings(table=100, priority=200, nft_table="t"), [5])
    assert (custom.table, custom.priority, custom.nft_table, custom.ifindexes) == (
        100, 200, "t", frozenset({5}),
    )  # fmt: skip
    assert relevant(Event("route", deleted=True, prefix="p", table=100, proto=245), custom)
    assert relevant(Event("rule", deleted=True, priority=200, proto=245), custom)
    assert relevant(Event("nft-set", deleted=True, family=1, nft_table="t", name="s"), custom)


def test_watch_covers_the_ap_slots_tables_rules_and_nexthops():
    s = Settings()  # 7 slots: tables 7301-7307, draining rules at 7298 and 7299
    watch = Watch.for_settings(s, [5])
    route = {"deleted": True, "prefix": "0.0.0.0/0", "proto": 245}
    assert relevant(Event("route", table=7301, **route), watch) == (
        "route 0.0.0.0/0 deleted from table 7301"
    )
    assert relevant(Event("route", table=7307, **route), watch)
    assert relevant(Event("route", table=7308, **route), watch)  # the path probes'
    assert relevant(Event("route", table=7309, **route), watch) is None
    for priority in (7298, 7299):
        assert relevant(Event("rule", deleted=True, priority=priority, proto=245), watch)
    assert relevant(Event("rule", deleted=True, priority=7297, proto=245), watch) is None
    slot3 = 0x5D5D0304
    assert relevant(Event("nexthop", deleted=True, nhid=slot3, proto=245), watch) == (
        "nexthop 0x5d5d0304 deleted"
    )
    assert relevant(Event("nexthop", deleted=True, nhid=0x5D5D0904, proto=245), watch) is None


# --- the kernel-side filter ----------------------------------------------------------------


def run_bpf(program, packet):
    """A classic-BPF interpreter for the few instructions rtnl_filter and nfnl_filter use."""
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        if code == netmon.BPF_LD_W_ABS:
            if k + 4 > len(packet):
                return 0
            acc = int.from_bytes(packet[k : k + 4], "big")
        elif code == netmon.BPF_LD_H_ABS:
            if k + 2 > len(packet):
                return 0  # the kernel drops a packet on an out-of-bounds load
            acc = int.from_bytes(packet[k : k + 2], "big")
        elif code == netmon.BPF_LD_B_ABS:
            if k + 1 > len(packet):
                return 0
            acc = packet[k]
        elif code == netmon.BPF_JEQ_K:
            pc += jt if acc == k else jf
        elif code == netmon.BPF_JSET_K:
            pc += jt if acc & k else jf
        elif code == netmon.BPF_RET_K:
            return k
        else:
            raise AssertionError(f"unexpected BPF instruction {code:#x}")
        pc += 1


@pytest.mark.parametrize(
    "program", [rtnl_filter(245), netmon.nfnl_filter(()), netmon.nfnl_filter(range(1, 100))]
)
def test_filter_is_a_valid_forward_only_program(program):
    assert program[-1][0] == netmon.BPF_RET_K
    for i, (code, jt, jf, _k) in enumerate(program):
        if code in (netmon.BPF_JEQ_K, netmon.BPF_JSET_K):
            assert i + 1 + jt < len(program) and i + 1 + jf < len(program)
            assert 0 <= jt < 256 and 0 <= jf < 256
        else:
            assert jt == jf == 0


def test_nftables_echoes_of_our_own_sockets_are_dropped_in_the_kernel_and_others_kept():
    """A 100k-CIDR apply's set-element echoes (13 MiB) must not reach the event loop, while
    every other process's nftables changes do."""
    import struct

    packets = [raw(name) for name in [*_HEX, *_ZLIB] if name.startswith("NFT")]
    assert packets
    for packet in packets:
        port = struct.unpack_from("=I", packet, 12)[0]
        assert port, "a captured nftables change carries its writer's port"
        assert run_bpf(netmon.nfnl_filter({7, port, 99}), packet) == 0  # ours: dropped
        assert run_bpf(netmon.nfnl_filter({7, port + 1}), packet)  # another's: kept
        assert run_bpf(netmon.nfnl_filter(()), packet)  # no port known yet: kept


def test_filter_keeps_everything_relevant_and_drops_echoes_and_foreign_routes():
    program = rtnl_filter(245)
    every_interface = Watch()
    kept, dropped = set(), set()
    for name in [*_HEX, *_ZLIB]:
        if name.startswith("NFT"):
            continue
        packet = raw(name)
        verdict = run_bpf(program, packet)
        (kept if verdict else dropped).add(name)
        if any(relevant(e, every_interface) for e in parse_rtnl(packet)):
            assert verdict, f"{name} is relevant but the filter drops it"
    assert dropped == {
        "NH4_ADD", "NH6_ADD", "ROUTE4_ADD", "ROUTE6_ADD",  # our echoes
        "MAIN_ROUTE_ADD", "MAIN_ROUTE_DEL", "KERNEL_ROUTE_ADD", "ROUTE6_FOREIGN_DEL",
    }  # fmt: skip
    assert "RULE4_ADD" in kept  # rules carry their protocol in an attribute: relevant() drops it


# --- the monitor, with a fake source on virtual time ----------------------------------------


class FakeSource:
    """Events pushed by the test: ``push(event)``; an exception pushed is raised by pump."""

    def __init__(self):
        self.send, self.recv = trio.open_memory_channel(math.inf)
        self.closed = False

    def push(self, event):
        self.send.send_nowait(event)

    async def pump(self, offer):
        async for event in self.recv:
            if isinstance(event, BaseException):
                raise event
            offer(event)

    def close(self):
        self.closed = True

    def mute(self, ports):
        self.muted_ports = ports

    def pause(self):
        self.paused = True

    def resume(self):
        self.paused = False


class FakePorts:
    """An injected port reader: returns ``ports`` (changeable) and counts its calls."""

    def __init__(self, *ports):
        self.ports = frozenset(ports)
        self.calls = 0
        self.fail = None

    def __call__(self):
        self.calls += 1
        if self.fail:
            raise self.fail
        return self.ports


ROUTE_DEL = Event("route", deleted=True, prefix="10.10.10.0/24", table=7300, proto=245)
LINK_UP = Event("link", ifindex=V0, ifname="v0", flags=0x11043)


def run_monitor(scenario, watch=WATCH, ports=None):
    """Run the monitor and ``scenario(monitor, source)`` on a MockClock; (time, cause) list.

    ``ports`` is the port reader (default: no socket of ours).
    """
    source = FakeSource()
    monitor = Monitor(
        watch, sources=lambda w: [source], own_ports=FakePorts() if ports is None else ports
    )
    triggers = []

    async def main():
        with trio.fail_after(3600):  # virtual seconds: a hang fails instead of blocking
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    monitor.run, lambda c: triggers.append((trio.current_time(), c))
                )
                await scenario(monitor, source)
                await trio.sleep(10)  # let the last burst fire
                nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert source.closed
    return triggers, monitor


def test_a_burst_of_50_events_is_one_trigger_after_the_settle_delay():
    async def scenario(monitor, source):
        scenario.start = trio.current_time()
        for _ in range(50):
            source.push(ROUTE_DEL)

    triggers, monitor = run_monitor(scenario)
    assert [c for _, c in triggers] == [
        "route 10.10.10.0/24 deleted from table 7300 (+49 more events)"
    ]
    assert triggers[0][0] - scenario.start == pytest.approx(COALESCE)
    assert (monitor.events, monitor.triggers, monitor.muted) == (50, 1, 0)


def test_two_bursts_a_second_apart_are_two_triggers():
    async def scenario(monitor, source):
        for _ in range(3):
            source.push(LINK_UP)
        await trio.sleep(1)
        source.push(ROUTE_DEL)

    triggers, _ = run_monitor(scenario)
    assert [c for _, c in triggers] == [
        "link v0 up (+2 more events)",
        "route 10.10.10.0/24 deleted from table 7300",
    ]
    assert triggers[1][0] - triggers[0][0] == pytest.approx(1.0)


def test_events_spread_over_the_settle_delay_join_one_burst():
    async def scenario(monitor, source):
        for _ in range(4):
            source.push(LINK_UP)
            await trio.sleep(COALESCE / 5)

    triggers, _ = run_monitor(scenario)
    assert [c for _, c in triggers] == ["link v0 up (+3 more events)"]


def test_a_burst_ends_coalesce_after_its_last_event():
    async def scenario(monitor, source):
        scenario.start = trio.current_time()
        for _ in range(10):
            source.push(LINK_UP)
            await trio.sleep(COALESCE / 2)

    triggers, _ = run_monitor(scenario)
    assert [c for _, c in triggers] == ["link v0 up (+9 more events)"]
    assert triggers[0][0] - scenario.start == pytest.approx(9 * COALESCE / 2 + COALESCE)


def test_a_storm_is_reported_every_settle_max():
    async def scenario(monitor, source):
        for _ in range(round(2 * SETTLE_MAX / 0.005)):  # an event every 5 ms for 2 SETTLE_MAX
            source.push(ROUTE_DEL)
            await trio.sleep(0.005)

    triggers, _ = run_monitor(scenario)
    assert len(triggers) == 2
    assert triggers[1][0] - triggers[0][0] == pytest.approx(SETTLE_MAX, abs=0.01)
    assert all(c.startswith("route 10.10.10.0/24 deleted") for _, c in triggers)


def test_irrelevant_events_trigger_nothing():
    async def scenario(monitor, source):
        for name in ("ROUTE4_ADD", "RULE4_ADD", "NH4_ADD", "MAIN_ROUTE_ADD", "NFT_NEWTABLE",
                     "NFT_NEWGEN", "NFT_OTHER_TABLE_DEL", "PEER_NO_CARRIER"):  # fmt: skip
            for event in parse(name):
                source.push(event)

    triggers, monitor = run_monitor(scenario)
    assert triggers == []
    assert monitor.events == 9


def test_a_deleted_table_outranks_the_deletions_reported_before_it():
    async def scenario(monitor, source):
        for event in parse("NFT_FLUSH_RULESET") + parse("NFT_FLUSH_RULESET_GEN"):
            source.push(event)

    triggers, _ = run_monitor(scenario)
    assert [c for _, c in triggers] == ["nftables table inet sdnsup deleted (+3 more events)"]


def test_watch_can_change_while_running():
    async def scenario(monitor, source):
        source.push(Event("link", ifindex=7, ifname="eth7", flags=0x1002))
        await trio.sleep(1)
        monitor.watch = Watch(ifindexes=frozenset({7}))
        source.push(Event("link", ifindex=7, ifname="eth7", flags=0x1002))

    triggers, _ = run_monitor(scenario)
    assert [c for _, c in triggers] == ["link eth7 down"]


OURS_PORT, OTHER_PORT, NEW_PORT = 3566177366, 2601, 4000000000


def test_an_event_from_one_of_our_sockets_is_muted():
    ports = FakePorts(OURS_PORT, 77)
    table_del = parse("NFT_DEL_TABLE")[0]

    async def scenario(monitor, source):
        for event in (ROUTE_DEL, table_del):
            source.push(dataclasses.replace(event, port=OURS_PORT))
        await trio.sleep(1)

    triggers, monitor = run_monitor(scenario, ports=ports)
    assert triggers == []
    assert (monitor.events, monitor.muted) == (2, 2)
    assert ports.calls == 1  # read once when run started, never again: the port is known


@pytest.mark.parametrize("port", [OTHER_PORT, 0])
def test_the_same_event_from_another_socket_or_the_kernel_triggers(port):
    ports = FakePorts(OURS_PORT)

    async def scenario(monitor, source):
        source.push(dataclasses.replace(ROUTE_DEL, port=port))
        await trio.sleep(1)
        source.push(dataclasses.replace(ROUTE_DEL, port=port))

    triggers, monitor = run_monitor(scenario, ports=ports)
    assert [c for _, c in triggers] == ["route 10.10.10.0/24 deleted from table 7300"] * 2
    assert monitor.muted == 0
    # An unknown port is looked up once, then remembered as foreign; port 0 never is.
    assert ports.calls == (2 if port else 1)


def test_an_unknown_port_refreshes_the_cache_once_before_deciding():
    ports = FakePorts(OURS_PORT)

    async def scenario(monitor, source):
        assert ports.calls == 1  # read when run started
        ports.ports = frozenset({OURS_PORT, NEW_PORT})  # a socket of ours opened since
        source.push(dataclasses.replace(ROUTE_DEL, port=NEW_PORT))
        await trio.sleep(1)
        assert (ports.calls, monitor.muted) == (2, 1)
        # Known now: no more reads, for it or for the ports known before.
        for port in (NEW_PORT, OURS_PORT, NEW_PORT):
            source.push(dataclasses.replace(ROUTE_DEL, port=port))
        await trio.sleep(1)
        assert (ports.calls, monitor.muted) == (2, 4)
        # Irrelevant events and port 0 never cause a read.
        source.push(dataclasses.replace(ROUTE_DEL, proto=4, port=OTHER_PORT))
        source.push(dataclasses.replace(ROUTE_DEL, port=0))
        await trio.sleep(1)
        assert ports.calls == 2

    triggers, _ = run_monitor(scenario, ports=ports)
    assert [c for _, c in triggers] == ["route 10.10.10.0/24 deleted from table 7300"]


def test_a_storm_from_one_foreign_process_reads_the_ports_once():
    ports = FakePorts(OURS_PORT)

    async def scenario(monitor, source):
        for _ in range(1000):
            source.push(dataclasses.replace(ROUTE_DEL, port=OTHER_PORT))

    triggers, _ = run_monitor(scenario, ports=ports)
    assert [c for _, c in triggers] == [
        "route 10.10.10.0/24 deleted from table 7300 (+999 more events)"
    ]
    assert ports.calls == 2


def test_the_foreign_ports_memory_is_bounded(monkeypatch):
    monkeypatch.setattr(netmon, "_FOREIGN_MAX", 3)
    ports = FakePorts(OURS_PORT)

    async def scenario(monitor, source):
        for port in (1, 2, 3, 1, 4, 1):  # 4 overflows the memory: 1 is looked up again
            source.push(dataclasses.replace(ROUTE_DEL, port=port))

    run_monitor(scenario, ports=ports)
    assert ports.calls == 1 + 5


def test_link_address_and_overflow_events_are_never_muted():
    ports = FakePorts(OURS_PORT)

    async def scenario(monitor, source):
        source.push(dataclasses.replace(LINK_UP, port=OURS_PORT))
        await trio.sleep(1)
        source.push(Event("addr", ifindex=V0, ifname="v0", prefix="192.0.2.9/24", port=OURS_PORT))
        await trio.sleep(1)
        source.push(Event("overflow", "rtnetlink: ENOBUFS", port=OURS_PORT))
        await trio.sleep(1)
        source.push(Event("overflow", "nftables: ENOBUFS"))

    triggers, monitor = run_monitor(scenario, ports=ports)
    assert [c for _, c in triggers] == [
        "link v0 up",
        "address 192.0.2.9/24 added on v0",
        OVERFLOW_CAUSE,
        OVERFLOW_CAUSE,
    ]
    assert monitor.muted == 0
    assert ports.calls == 1


def test_unreadable_ports_mute_nothing(caplog):
    ports = FakePorts(OURS_PORT)
    ports.fail = PermissionError(errno.EACCES, "Permission denied")

    async def scenario(monitor, source):
        source.push(dataclasses.replace(ROUTE_DEL, port=OURS_PORT))
        await trio.sleep(1)
        ports.fail = None  # readable again: the port was not taken for a foreign one
        source.push(dataclasses.replace(ROUTE_DEL, port=OURS_PORT))

    triggers, monitor = run_monitor(scenario, ports=ports)
    assert [c for _, c in triggers] == ["route 10.10.10.0/24 deleted from table 7300"]
    assert (monitor.muted, ports.calls) == (1, 3)
    assert "echoes are not muted" in caplog.text


# --- our own netlink ports from /proc ---------------------------------------------------------

NETLINK_TABLE = """\
sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode
00000000e8185ce6 0   0          00000000 0        0        0     2        0        447652
00000000033eac62 12  9166       00000000 0        0        0     2        0        447297
00000000a18a1199 0   9166       00000651 0        0        0     2        0        447298
0000000079cace16 12  3737776672 00000040 0        0        0     2        0        447299
00000000f2062e14 0   2601       00000000 0        0        0     2        0        500000
00000000f2062e15 0   0          00000000 0        0        0     2        0        447300
"""


def test_own_netlink_ports_matches_our_socket_inodes_to_the_netlink_table(tmp_path):
    fds = tmp_path / "fd"
    fds.mkdir()
    links = {"0": "/dev/null", "3": "socket:[447297]", "4": "socket:[447298]",
             "5": "socket:[447299]", "6": "socket:[447300]", "7": "socket:[999]",
             "8": "pipe:[447652]", "9": "anon_inode:[eventpoll]"}  # fmt: skip
    for fd, target in links.items():
        os.symlink(target, fds / fd)
    table = tmp_path / "netlink"
    table.write_text(NETLINK_TABLE)
    # 447300 is unbound (port 0), 999 is not a netlink socket (or of another namespace),
    # 2601 and the first row are somebody else's.
    assert own_netlink_ports(str(fds), str(table)) == {9166, 3737776672}


def test_own_netlink_ports_of_this_process():
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        port, _groups = sock.getsockname()
        assert port in own_netlink_ports()
    assert port not in own_netlink_ports()


def test_own_netlink_ports_raises_when_proc_is_missing(tmp_path):
    with pytest.raises(OSError):
        own_netlink_ports(str(tmp_path / "nope"), str(tmp_path / "nope"))


def test_a_source_failure_ends_run_with_the_kernel_error_and_closes_sources():
    source = FakeSource()
    source.push(RoutesError("reading rtnetlink events failed: boom"))
    monitor = Monitor(WATCH, sources=lambda w: [source])
    # Raised as itself, not wrapped in the ExceptionGroup of the monitor's inner nursery.
    with pytest.raises(RoutesError, match="boom"):
        trio.run(monitor.run, lambda c: None)
    assert source.closed


def test_an_open_failure_raises_before_started():
    def sources(watch):
        raise NftError("cannot subscribe to nftables events")

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(Monitor(sources=sources).run, lambda c: None)

    with pytest.raises(ExceptionGroup) as info:  # wrapped by the test's own nursery
        trio.run(main)
    assert info.group_contains(NftError, depth=1)


def test_cancellation_propagates_and_closes_sources():
    source = FakeSource()

    async def main():
        with trio.move_on_after(5) as scope:
            await Monitor(sources=lambda w: [source]).run(lambda c: None)
        assert scope.cancelled_caught

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert source.closed


# --- the socket reader, on a socketpair ------------------------------------------------------


class Flaky:
    """A datagram socket whose first receives fail with the given errors."""

    def __init__(self, sock, errors):
        self.sock, self.errors = sock, list(errors)

    def fileno(self):
        return self.sock.fileno()

    def recv_into(self, *args):
        if self.errors:
            raise self.errors.pop(0)
        return self.sock.recv_into(*args)

    def close(self):
        self.sock.close()


def pump_until(source, count):
    """Run ``source.pump`` until it has offered ``count`` events; the events."""
    got = []
    enough = trio.Event()

    def offer(event):
        got.append(event)
        if len(got) >= count:
            enough.set()

    async def main():
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(source.pump, offer)
                await enough.wait()
                nursery.cancel_scope.cancel()

    trio.run(main)
    return got


def test_pump_parses_datagrams_and_reports_overflow():
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.setblocking(False)
    with writer:
        source = NetlinkSource(
            Flaky(reader, [OSError(errno.ENOBUFS, "No buffer space")]), parse_rtnl, "rtnetlink",
            RoutesError,
        )  # fmt: skip
        writer.send(raw("ROUTE4_DEL"))
        writer.send(raw("LINK_DOWN"))
        got = pump_until(source, 3)
        source.close()
    assert [e.kind for e in got] == ["overflow", "route", "link"]
    assert relevant(got[0], WATCH) == OVERFLOW_CAUSE
    assert got[1] == only("ROUTE4_DEL")  # with its port


def test_pump_reports_a_truncated_datagram_as_lost_events(monkeypatch):
    monkeypatch.setattr(netmon, "_RECV_BYTES", 64)
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.setblocking(False)
    with reader, writer:
        writer.send(raw("LINK_DOWN"))
        got = pump_until(NetlinkSource(reader, parse_rtnl, "rtnetlink", RoutesError), 1)
    assert got[0].kind == "overflow"


def test_pump_maps_other_socket_errors():
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.setblocking(False)
    with writer:
        writer.send(b"x")
        source = NetlinkSource(Flaky(reader, [OSError(errno.EBADF, "Bad fd")]), parse_nfnl,
                               "nftables", NftError)  # fmt: skip
        try:
            with pytest.raises(ExceptionGroup) as info:  # wrapped by pump_until's nursery
                pump_until(source, 1)
        finally:
            source.close()
    assert info.group_contains(NftError, match="reading nftables events failed", depth=1)


def test_open_maps_socket_errors():
    with pytest.raises(NftError, match="cannot subscribe to test events"):
        NetlinkSource.open(31, (), parse_nfnl, "test", NftError)  # no such netlink protocol
    with pytest.raises(RoutesError, match="cannot subscribe to test events"):
        NetlinkSource.open(socket.NETLINK_ROUTE, (100000,), parse_rtnl, "test", RoutesError)
