"""What RtnlRoutes reads, without root: the dump and lookup requests it sends and how it
parses the kernel's answers (routes, nexthops, policy rules, other owners' objects, a route
lookup, a link name), over :class:`tests.replay.ReplayNetlink`. The write requests are in
tests/test_netlink.py.

The answers are written out by hand from include/uapi/linux/{netlink,rtnetlink,nexthop,
fib_rules,if_link}.h, little-endian host, one field per comment; each is what Linux 6.18
answered in a scratch namespace after the ``ip`` command quoted above it (sequence numbers
and port ids zeroed; the two link answers trimmed to a few of their attributes).
"""

from __future__ import annotations

import errno
import socket
from ipaddress import ip_address, ip_network

import pytest

from sdnsup import rtnl
from sdnsup.cidrs import KnownNetworks
from sdnsup.errors import RoutesError
from sdnsup.routes import Foreign, Link, Nexthop, Route, Rule
from tests.replay import ReplayNetlink

H = bytes.fromhex
AF_INET, AF_INET6 = socket.AF_INET, socket.AF_INET6
PROTO = 0xF5  # ours: 245


def backend(nl: ReplayNetlink) -> rtnl.RtnlRoutes:
    return rtnl.RtnlRoutes(nl)  # type: ignore[arg-type]


# --- routes (RTM_NEWROUTE answers to an RTM_GETROUTE dump) ---------------------------------

# ip route add 10.10.10.0/24 nhid 0x5D5D0004 table 7300 proto 245
# (nexthop_compat_mode 1: the nexthop's gateway and device follow RTA_NH_ID)
ROUTE4_NHID = H(
    "44000000 1800 2200 00000000 00000000"  # nlmsghdr: 68, RTM_NEWROUTE, MULTI|DUMP_FILTERED
    "02 18 00 00 fc f5 00 01 00000000"  # rtmsg: INET /24, table COMPAT, proto 245, unicast
    "0800 0f00 841c0000"  # RTA_TABLE 7300
    "0800 0100 0a0a0a00"  # RTA_DST 10.10.10.0
    "0800 1e00 04005d5d"  # RTA_NH_ID 0x5D5D0004
    "0800 0500 ac1f010b"  # RTA_GATEWAY 172.31.1.11
    "0800 0400 03000000"  # RTA_OIF 3
)
# ip route add 10.10.10.0/24 via 172.31.1.1 dev dummy0 table 7301 proto static
ROUTE4_STATIC = H(
    "3c000000 1800 2200 00000000 00000000"  # nlmsghdr: 60, RTM_NEWROUTE, MULTI|DUMP_FILTERED
    "02 18 00 00 fc 04 00 01 00000000"  # rtmsg: INET /24, table COMPAT, proto static, unicast
    "0800 0f00 851c0000"  # RTA_TABLE 7301
    "0800 0100 0a0a0a00"  # RTA_DST 10.10.10.0
    "0800 0500 ac1f0101"  # RTA_GATEWAY 172.31.1.1
    "0800 0400 03000000"  # RTA_OIF 3
)
# ip route add 10.10.11.0/24 via 172.31.1.1 dev dummy0 table 100 proto static
ROUTE4_STATIC_100 = H(
    "3c000000 1800 2200 00000000 00000000"  # nlmsghdr: 60, RTM_NEWROUTE, MULTI|DUMP_FILTERED
    "02 18 00 00 64 04 00 01 00000000"  # rtmsg: INET /24, table 100, proto static, unicast
    "0800 0f00 64000000"  # RTA_TABLE 100
    "0800 0100 0a0a0b00"  # RTA_DST 10.10.11.0
    "0800 0500 ac1f0101"  # RTA_GATEWAY 172.31.1.1
    "0800 0400 03000000"  # RTA_OIF 3
)
# ip addr add 172.31.1.2/24 dev dummy0: the connected route in the main table
ROUTE4_CONNECTED = H(
    "3c000000 1800 2200 00000000 00000000"  # nlmsghdr: 60, RTM_NEWROUTE, MULTI|DUMP_FILTERED
    "02 18 00 00 fe 02 fd 01 00000000"  # rtmsg: INET /24, main, proto kernel, scope link
    "0800 0f00 fe000000"  # RTA_TABLE 254
    "0800 0100 ac1f0100"  # RTA_DST 172.31.1.0
    "0800 0700 ac1f0102"  # RTA_PREFSRC 172.31.1.2
    "0800 0400 03000000"  # RTA_OIF 3
)
# ip -6 route add fd10::/64 via fd00::1 dev dummy0 table 100 proto 245
ROUTE6_GATEWAY = H(
    "88000000 1800 2200 00000000 00000000"  # nlmsghdr: 136, RTM_NEWROUTE, MULTI|DUMP_FILTERED
    "0a 40 00 00 64 f5 00 01 00000000"  # rtmsg: INET6 /64, table 100, proto 245, unicast
    "0800 0f00 64000000"  # RTA_TABLE 100
    "1400 0100 fd100000000000000000000000000000"  # RTA_DST fd10::
    "0800 0600 00040000"  # RTA_PRIORITY 1024
    "1400 0500 fd000000000000000000000000000001"  # RTA_GATEWAY fd00::1
    "0800 0400 03000000"  # RTA_OIF 3
    "2400 0c00"  # RTA_CACHEINFO, struct rta_cacheinfo:
    "00000000 00000000 00000000 00000000"  # clntref 0, lastuse, expires, error
    "00000000 00000000 00000000 00000000"  # used, id, ts, tsage
    "0500 1400 00 000000"  # RTA_PREF medium
)
# ip -6 route add fd11::/64 nhid 0x5D5D0006 table 7300 proto 245 (a blackhole nexthop)
ROUTE6_NHID = H(
    "7c000000 1800 2200 00000000 00000000"  # nlmsghdr: 124, RTM_NEWROUTE, MULTI|DUMP_FILTERED
    "0a 40 00 00 fc f5 00 06 00000000"  # rtmsg: INET6 /64, table COMPAT, proto 245, blackhole
    "0800 0f00 841c0000"  # RTA_TABLE 7300
    "1400 0100 fd110000000000000000000000000000"  # RTA_DST fd11::
    "0800 0600 00040000"  # RTA_PRIORITY 1024
    "0800 1e00 06005d5d"  # RTA_NH_ID 0x5D5D0006
    "0800 0400 01000000"  # RTA_OIF 1 (lo)
    "2400 0c00"  # RTA_CACHEINFO, struct rta_cacheinfo:
    "00000000 00000000 00000000 00000000"  # clntref 0, lastuse, expires, error
    "00000000 00000000 00000000 00000000"  # used, id, ts, tsage
    "0500 1400 00 000000"  # RTA_PREF medium
)
# ip -6 route add default via fd00::1 dev dummy0 table 7301 proto static: no RTA_DST
ROUTE6_STATIC_DEFAULT = H(
    "74000000 1800 2200 00000000 00000000"  # nlmsghdr: 116, RTM_NEWROUTE, MULTI|DUMP_FILTERED
    "0a 00 00 00 fc 04 00 01 00000000"  # rtmsg: INET6 /0, table COMPAT, proto static, unicast
    "0800 0f00 851c0000"  # RTA_TABLE 7301
    "0800 0600 00040000"  # RTA_PRIORITY 1024
    "1400 0500 fd000000000000000000000000000001"  # RTA_GATEWAY fd00::1
    "0800 0400 03000000"  # RTA_OIF 3
    "2400 0c00"  # RTA_CACHEINFO, struct rta_cacheinfo:
    "00000000 00000000 00000000 00000000"  # clntref 0, lastuse, expires, error
    "00000000 00000000 00000000 00000000"  # used, id, ts, tsage
    "0500 1400 00 000000"  # RTA_PREF medium
)
DONE = H("14000000 0300 0200 00000000 00000000 00000000")  # NLMSG_DONE, MULTI; error 0

# A dump without the kernel's protocol filter (a kernel before 4.20; foreign_objects asks
# for every protocol): everything in the tables comes back.
ROUTES4 = ROUTE4_STATIC_100 + ROUTE4_NHID + ROUTE4_STATIC + ROUTE4_CONNECTED + DONE
ROUTES6 = ROUTE6_GATEWAY + ROUTE6_NHID + ROUTE6_STATIC_DEFAULT + DONE

# RTM_GETROUTE dump requests: struct rtmsg, the protocol as a filter, nothing else.
GETROUTE4_OURS = H("02 00 00 00 00 f5 00 00 00000000")  # INET, table UNSPEC, proto 245
GETROUTE6_OURS = H("0a 00 00 00 00 f5 00 00 00000000")  # INET6, table UNSPEC, proto 245
GETROUTE4_ALL = H("02 00 00 00 00 00 00 00 00000000")  # INET, any table, any protocol
GETROUTE6_ALL = H("0a 00 00 00 00 00 00 00 00000000")  # INET6, any table, any protocol


def test_routes_reads_ours_in_both_families_by_nexthop_id_or_without_one():
    nl = ReplayNetlink(dumps=[ROUTES4, ROUTES6])
    assert backend(nl).routes(PROTO) == {
        Route(ip_network("10.10.10.0/24"), 7300, 0x5D5D0004),
        Route(ip_network("fd10::/64"), 100, 0),  # a gateway and a device, no nexthop object
        Route(ip_network("fd11::/64"), 7300, 0x5D5D0006),
    }
    assert nl.sent == [(rtnl.RTM_GETROUTE, GETROUTE4_OURS), (rtnl.RTM_GETROUTE, GETROUTE6_OURS)]


def test_routes_hands_out_the_known_network_objects():
    known = [ip_network("10.10.10.0/24"), ip_network("fd11::/64")]
    nl = ReplayNetlink(dumps=[ROUTES4, ROUTES6])
    found = {r.dst: r.dst for r in backend(nl).routes(PROTO, KnownNetworks(known))}
    assert all(found[n] is n for n in known)


def test_a_dump_flagged_interrupted_is_read_again_and_three_in_a_row_fail():
    # the same answer with NLM_F_DUMP_INTR (0x10) in its flags
    interrupted = ROUTE4_NHID[:6] + H("3200") + ROUTE4_NHID[8:] + DONE
    nl = ReplayNetlink(dumps=[interrupted, ROUTES4, ROUTES6])
    assert len(backend(nl).routes(PROTO)) == 3
    assert [body for _, body in nl.sent] == [GETROUTE4_OURS, GETROUTE4_OURS, GETROUTE6_OURS]

    nl = ReplayNetlink(dumps=[interrupted] * 3)
    with pytest.raises(RoutesError, match="the kernel interrupted 3 dumps in a row"):
        backend(nl).routes(PROTO)


def test_a_refused_dump_is_a_routes_error():
    nl = ReplayNetlink(dumps=[OSError(errno.EINVAL, "Invalid argument")])
    with pytest.raises(RoutesError, match=r"cannot read routes from the kernel: .*Invalid"):
        backend(nl).routes(PROTO)


# --- nexthops (RTM_NEWNEXTHOP answers to an RTM_GETNEXTHOP dump) ---------------------------

# ip nexthop add id 9 via 172.31.1.1 dev dummy0 proto static
NH_STATIC = H(
    "30000000 6800 0200 00000000 00000000"  # nlmsghdr: 48, RTM_NEWNEXTHOP, MULTI
    "02 fd 04 00 00000000"  # nhmsg: INET, scope link, proto static, flags 0
    "0800 0100 09000000"  # NHA_ID 9
    "0800 0500 03000000"  # NHA_OIF 3
    "0800 0600 ac1f0101"  # NHA_GATEWAY 172.31.1.1
)
# ip nexthop add id 0x5D5D0004 via 172.31.1.11 dev dummy0 proto 245
NH_GATEWAY = H(
    "30000000 6800 0200 00000000 00000000"  # nlmsghdr: 48, RTM_NEWNEXTHOP, MULTI
    "02 fd f5 00 00000000"  # nhmsg: INET, scope link, proto 245
    "0800 0100 04005d5d"  # NHA_ID 0x5D5D0004
    "0800 0500 03000000"  # NHA_OIF 3
    "0800 0600 ac1f010b"  # NHA_GATEWAY 172.31.1.11
)
# ip -6 nexthop add id 0x5D5D0006 blackhole proto 245
NH_BLACKHOLE = H(
    "24000000 6800 0200 00000000 00000000"  # nlmsghdr: 36, RTM_NEWNEXTHOP, MULTI
    "0a 00 f5 00 00000000"  # nhmsg: INET6, scope universe, proto 245
    "0800 0100 06005d5d"  # NHA_ID 0x5D5D0006
    "0400 0400"  # NHA_BLACKHOLE (a flag)
)
# ip nexthop add id 0x5D5D0007 group 0x5D5D0004 proto 245
NH_GROUP = H(
    "3c000000 6800 0200 00000000 00000000"  # nlmsghdr: 60, RTM_NEWNEXTHOP, MULTI
    "00 00 f5 00 00000000"  # nhmsg: UNSPEC, proto 245
    "0800 0100 07005d5d"  # NHA_ID 0x5D5D0007
    "0600 0300 0000 0000"  # NHA_GROUP_TYPE mpath (u16)
    "0c00 0200 04005d5d 00 00 0000"  # NHA_GROUP: struct nexthop_grp {id, weight-1, ...}
    "0800 0e00 00000080"  # NHA_OP_FLAGS NHA_OP_FLAGS_RESP_GRP_RESVD_0
)
# ip nexthop add id 0x5D5D0008 via 172.31.1.5 fdb proto 245
NH_FDB = H(
    "2c000000 6800 0200 00000000 00000000"  # nlmsghdr: 44, RTM_NEWNEXTHOP, MULTI
    "02 fd f5 00 00000000"  # nhmsg: INET, scope link, proto 245
    "0800 0100 08005d5d"  # NHA_ID 0x5D5D0008
    "0400 0b00"  # NHA_FDB (a flag)
    "0800 0600 ac1f0105"  # NHA_GATEWAY 172.31.1.5
)
NEXTHOPS = NH_STATIC + NH_GATEWAY + NH_BLACKHOLE + NH_GROUP + NH_FDB + DONE
GETNEXTHOP = H("00 00 00 00 00000000")  # struct nhmsg all 0: strict checking wants that


def test_nexthops_reads_our_gateway_and_blackhole_objects_only():
    nl = ReplayNetlink(dumps=[NEXTHOPS])
    assert backend(nl).nexthops(PROTO) == {
        Nexthop(0x5D5D0004, AF_INET, ip_address("172.31.1.11"), 3),
        Nexthop(0x5D5D0006, AF_INET6, None, 0),
    }  # not the group, not the FDB nexthop (sdnsup never makes them), not proto static's
    assert nl.sent == [(rtnl.RTM_GETNEXTHOP, GETNEXTHOP)]


def test_foreign_nexthops_are_the_ids_of_every_other_protocol():
    nl = ReplayNetlink(dumps=[NH_GATEWAY + NH_STATIC + NH_GROUP + DONE])
    assert backend(nl).foreign_nexthops(PROTO) == {9}
    assert nl.sent == [(rtnl.RTM_GETNEXTHOP, GETNEXTHOP)]


# --- policy rules (RTM_NEWRULE answers to an RTM_GETRULE dump) -----------------------------

# The kernel's own "0: from all lookup local"
RULE4_LOCAL = H(
    "34000000 2000 0200 00000000 00000000"  # nlmsghdr: 52, RTM_NEWRULE, MULTI
    "02 00 00 00 ff 00 00 01 00000000"  # fib_rule_hdr: INET, table local, FR_ACT_TO_TBL
    "0800 0f00 ff000000"  # FRA_TABLE 255
    "0800 0e00 ffffffff"  # FRA_SUPPRESS_PREFIXLEN -1
    "0500 1500 02 000000"  # FRA_PROTOCOL kernel (no FRA_PRIORITY: priority 0)
)
# ip rule add fwmark 0x1/0x1 lookup 7300 pref 7000 proto static
RULE4_STATIC = H(
    "4c000000 2000 0200 00000000 00000000"  # nlmsghdr: 76, RTM_NEWRULE, MULTI
    "02 00 00 00 fc 00 00 01 00000000"  # fib_rule_hdr: INET, table COMPAT, FR_ACT_TO_TBL
    "0800 0f00 841c0000"  # FRA_TABLE 7300
    "0800 0e00 ffffffff"  # FRA_SUPPRESS_PREFIXLEN -1
    "0500 1500 04 000000"  # FRA_PROTOCOL static
    "0800 0600 581b0000"  # FRA_PRIORITY 7000
    "0800 0a00 01000000"  # FRA_FWMARK 0x1
    "0800 1000 01000000"  # FRA_FWMASK 0x1
)
# ip rule add fwmark 0x2002/0x3082 iif eth1 lookup 7301 pref 7298 proto 245
RULE4_OURS = H(
    "58000000 2000 0200 00000000 00000000"  # nlmsghdr: 88, RTM_NEWRULE, MULTI
    "02 00 00 00 fc 00 00 01 08000000"  # INET, table COMPAT, TO_TBL; FIB_RULE_IIF_DETACHED
    "0800 0f00 851c0000"  # FRA_TABLE 7301
    "0800 0e00 ffffffff"  # FRA_SUPPRESS_PREFIXLEN -1
    "0500 1500 f5 000000"  # FRA_PROTOCOL 245
    "0900 0300 6574683100 000000"  # FRA_IIFNAME "eth1"
    "0800 0600 821c0000"  # FRA_PRIORITY 7298
    "0800 0a00 02200000"  # FRA_FWMARK 0x2002
    "0800 1000 82300000"  # FRA_FWMASK 0x3082
)
# ip -6 rule add fwmark 0x2000/0x2000 lookup 100 pref 100 proto 245
RULE6_OURS = H(
    "4c000000 2000 0200 00000000 00000000"  # nlmsghdr: 76, RTM_NEWRULE, MULTI
    "0a 00 00 00 64 00 00 01 00000000"  # fib_rule_hdr: INET6, table 100, FR_ACT_TO_TBL
    "0800 0f00 64000000"  # FRA_TABLE 100
    "0800 0e00 ffffffff"  # FRA_SUPPRESS_PREFIXLEN -1
    "0500 1500 f5 000000"  # FRA_PROTOCOL 245
    "0800 0600 64000000"  # FRA_PRIORITY 100
    "0800 0a00 00200000"  # FRA_FWMARK 0x2000
    "0800 1000 00200000"  # FRA_FWMASK 0x2000
)
# ip -6 rule add pref 7298 lookup main proto static
RULE6_STATIC = H(
    "3c000000 2000 0200 00000000 00000000"  # nlmsghdr: 60, RTM_NEWRULE, MULTI
    "0a 00 00 00 fe 00 00 01 00000000"  # fib_rule_hdr: INET6, table main, FR_ACT_TO_TBL
    "0800 0f00 fe000000"  # FRA_TABLE 254
    "0800 0e00 ffffffff"  # FRA_SUPPRESS_PREFIXLEN -1
    "0500 1500 04 000000"  # FRA_PROTOCOL static
    "0800 0600 821c0000"  # FRA_PRIORITY 7298
)
RULES4 = RULE4_LOCAL + RULE4_STATIC + RULE4_OURS + DONE
RULES6 = RULE6_OURS + RULE6_STATIC + DONE
GETRULE4 = H("02 00 00 00 00 00 00 00 00000000")  # struct fib_rule_hdr: INET, the rest 0
GETRULE6 = H("0a 00 00 00 00 00 00 00 00000000")  # INET6


def test_rules_reads_ours_with_the_table_iif_and_mark_of_each_family():
    nl = ReplayNetlink(dumps=[RULES4, RULES6])
    assert backend(nl).rules(PROTO) == {
        Rule(AF_INET, 7298, 0x2002, 0x3082, 7301, "eth1"),
        Rule(AF_INET6, 100, 0x2000, 0x2000, 100),
    }
    assert nl.sent == [(rtnl.RTM_GETRULE, GETRULE4), (rtnl.RTM_GETRULE, GETRULE6)]


# --- other owners' objects where sdnsup writes ---------------------------------------------


def test_foreign_objects_names_other_protocols_rules_routes_and_nexthops_in_our_way():
    nl = ReplayNetlink(dumps=[RULES4, ROUTES4, RULES6, ROUTES6, NEXTHOPS])
    found = backend(nl).foreign_objects(
        PROTO,
        tables={100, 7300, 7301},
        priorities={7000, 7298},
        nhids={9, 0x5D5D0004},
        routes={7301: [ip_network("10.10.10.0/24"), ip_network("::/0")], 100: []},
    )
    assert found == [
        Foreign("IPv4 policy rule priority 7000 lookup 7300 (proto 4)"),
        # not 10.10.11.0/24 in table 100: another destination, it stays
        Foreign(
            "route 10.10.10.0/24 in table 7301 (proto 4)",
            route=(7301, ip_network("10.10.10.0/24")),
        ),
        Foreign("IPv6 policy rule priority 7298 lookup 254 (proto 4)"),
        Foreign("route ::/0 in table 7301 (proto 4)", route=(7301, ip_network("::/0"))),
        Foreign("nexthop id 9 (0x9, proto 4)", nhid=9),
    ]
    assert nl.sent == [
        (rtnl.RTM_GETRULE, GETRULE4),
        (rtnl.RTM_GETROUTE, GETROUTE4_ALL),
        (rtnl.RTM_GETRULE, GETRULE6),
        (rtnl.RTM_GETROUTE, GETROUTE6_ALL),
        (rtnl.RTM_GETNEXTHOP, GETNEXTHOP),
    ]


# --- a route lookup (RTM_GETROUTE request) and the link's name (RTM_GETLINK) ---------------

# ip route get 172.31.1.11: on the link of 172.31.1.2/24, no gateway
GOT_ONLINK = H(
    "68000000 1800 0000 00000000 00000000"  # nlmsghdr: 104, RTM_NEWROUTE
    "02 20 00 00 fe 00 00 01 00020000"  # rtmsg: INET /32, main, unicast; RTM_F_CLONED
    "0800 0f00 fe000000"  # RTA_TABLE 254
    "0800 0100 ac1f010b"  # RTA_DST 172.31.1.11
    "0800 0400 03000000"  # RTA_OIF 3
    "0800 0700 ac1f0102"  # RTA_PREFSRC 172.31.1.2
    "0800 1900 00000000"  # RTA_UID 0
    "2400 0c00"  # RTA_CACHEINFO, struct rta_cacheinfo:
    "02000000 00000000 00000000 00000000"  # clntref 2, lastuse, expires, error
    "00000000 00000000 00000000 00000000"  # used, id, ts, tsage
)
# ip route add default via 172.31.1.1 dev dummy0; ip route get 8.8.8.8
GOT_GATEWAY = H(
    "70000000 1800 0000 00000000 00000000"  # nlmsghdr: 112, RTM_NEWROUTE
    "02 20 00 00 fe 00 00 01 00020000"  # rtmsg: INET /32, main, unicast; RTM_F_CLONED
    "0800 0f00 fe000000"  # RTA_TABLE 254
    "0800 0100 08080808"  # RTA_DST 8.8.8.8
    "0800 0400 03000000"  # RTA_OIF 3
    "0800 0700 ac1f0102"  # RTA_PREFSRC 172.31.1.2
    "0800 0500 ac1f0101"  # RTA_GATEWAY 172.31.1.1
    "0800 1900 00000000"  # RTA_UID 0
    "2400 0c00"  # RTA_CACHEINFO, struct rta_cacheinfo:
    "02000000 00000000 00000000 00000000"  # clntref 2, lastuse, expires, error
    "00000000 00000000 00000000 00000000"  # used, id, ts, tsage
)
# ip route add 203.0.113.0/24 via inet6 fd00::1 dev dummy0; ip route get 203.0.113.9
GOT_VIA = H(
    "80000000 1800 0000 00000000 00000000"  # nlmsghdr: 128, RTM_NEWROUTE
    "02 20 00 00 fe 00 00 01 00020000"  # rtmsg: INET /32, main, unicast; RTM_F_CLONED
    "0800 0f00 fe000000"  # RTA_TABLE 254
    "0800 0100 cb007109"  # RTA_DST 203.0.113.9
    "0800 0400 03000000"  # RTA_OIF 3
    "0800 0700 ac1f0102"  # RTA_PREFSRC 172.31.1.2
    "1600 1200 0a00 fd000000000000000000000000000001 0000"  # RTA_VIA {INET6, fd00::1}
    "0800 1900 00000000"  # RTA_UID 0
    "2400 0c00"  # RTA_CACHEINFO, struct rta_cacheinfo:
    "02000000 00000000 00000000 00000000"  # clntref 2, lastuse, expires, error
    "00000000 00000000 00000000 00000000"  # used, id, ts, tsage
)
# ip -6 route get fd00::1: on the link of fd00::2/64
GOT_V6 = H(
    "9c000000 1800 0000 00000000 00000000"  # nlmsghdr: 156, RTM_NEWROUTE
    "0a 80 80 00 fe 02 00 01 00000000"  # rtmsg: INET6 /128 from /128, main, kernel, unicast
    "0800 0f00 fe000000"  # RTA_TABLE 254
    "1400 0100 fd000000000000000000000000000001"  # RTA_DST fd00::1
    "1400 0200 00000000000000000000000000000000"  # RTA_SRC ::
    "1400 0700 fd000000000000000000000000000002"  # RTA_PREFSRC fd00::2
    "0800 0600 00010000"  # RTA_PRIORITY 256
    "0800 0400 03000000"  # RTA_OIF 3
    "2400 0c00"  # RTA_CACHEINFO, struct rta_cacheinfo:
    "02000000 00000000 00000000 00000000"  # clntref 2, lastuse, expires, error
    "00000000 00000000 00000000 00000000"  # used, id, ts, tsage
    "0500 1400 00 000000"  # RTA_PREF medium
)
# ip route get 172.31.1.2: this host's own address
GOT_LOCAL = H(
    "68000000 1800 0000 00000000 00000000"  # nlmsghdr: 104, RTM_NEWROUTE
    "02 20 00 00 fe 00 00 02 00020080"  # rtmsg: INET /32, main, local; CLONED|RTCF_LOCAL
    "0800 0f00 fe000000"  # RTA_TABLE 254
    "0800 0100 ac1f0102"  # RTA_DST 172.31.1.2
    "0800 0400 01000000"  # RTA_OIF 1 (lo)
    "0800 0700 ac1f0102"  # RTA_PREFSRC 172.31.1.2
    "0800 1900 00000000"  # RTA_UID 0
    "2400 0c00"  # RTA_CACHEINFO, struct rta_cacheinfo:
    "01000000 00000000 00000000 00000000"  # clntref 1, lastuse, expires, error
    "00000000 00000000 00000000 00000000"  # used, id, ts, tsage
)
# ip link show dummy0 (a veth here), trimmed to six attributes, in the kernel's order
LINK_DUMMY0 = H(
    "5c000000 1000 0000 00000000 00000000"  # nlmsghdr: 92, RTM_NEWLINK
    "00 00 0100 03000000 43100100 00000000"  # ifinfomsg: ETHER, index 3, UP|...|LOWER_UP
    "0b00 0300 64756d6d793000 00"  # IFLA_IFNAME "dummy0"
    "0800 0d00 e8030000"  # IFLA_TXQLEN 1000
    "0800 0400 dc050000"  # IFLA_MTU 1500
    "0a00 0100 020a72eb2e9a 0000"  # IFLA_ADDRESS 02:0a:72:eb:2e:9a
    "0800 0500 02000000"  # IFLA_LINK 2 (the peer)
    "0c00 0600 6e6f717565756500"  # IFLA_QDISC "noqueue"
)
# ip link show lo, trimmed likewise
LINK_LO = H(
    "50000000 1000 0000 00000000 00000000"  # nlmsghdr: 80, RTM_NEWLINK
    "00 00 0403 01000000 49000100 00000000"  # ifinfomsg: LOOPBACK, index 1, UP|LOOPBACK|...
    "0700 0300 6c6f00 00"  # IFLA_IFNAME "lo"
    "0800 0d00 e8030000"  # IFLA_TXQLEN 1000
    "0800 0400 00000100"  # IFLA_MTU 65536
    "0a00 0100 000000000000 0000"  # IFLA_ADDRESS 00:00:00:00:00:00
    "0c00 0600 6e6f717565756500"  # IFLA_QDISC "noqueue"
)
GETLINK3 = H("00 00 0000 03000000 00000000 00000000")  # ifinfomsg: UNSPEC, index 3
GETLINK1 = H("00 00 0000 01000000 00000000 00000000")  # ifinfomsg: UNSPEC, index 1


@pytest.mark.parametrize(
    ("addr", "request_body", "answer", "link", "getlink", "want"),
    [
        ("172.31.1.11",
         "02 20 00 00 00 00 00 00 00000000  0800 0100 ac1f010b",  # rtmsg INET /32; RTA_DST
         GOT_ONLINK, LINK_DUMMY0, GETLINK3,
         Link(3, "dummy0", None, ip_address("172.31.1.2"))),
        ("8.8.8.8",
         "02 20 00 00 00 00 00 00 00000000  0800 0100 08080808",
         GOT_GATEWAY, LINK_DUMMY0, GETLINK3,
         Link(3, "dummy0", ip_address("172.31.1.1"), ip_address("172.31.1.2"))),
        ("203.0.113.9",
         "02 20 00 00 00 00 00 00 00000000  0800 0100 cb007109",
         GOT_VIA, LINK_DUMMY0, GETLINK3,
         Link(3, "dummy0", ip_address("fd00::1"), ip_address("172.31.1.2"))),
        ("fd00::1",
         "0a 80 00 00 00 00 00 00 00000000  1400 0100 fd000000000000000000000000000001",
         GOT_V6, LINK_DUMMY0, GETLINK3,
         Link(3, "dummy0", None, ip_address("fd00::2"))),
        ("172.31.1.2",
         "02 20 00 00 00 00 00 00 00000000  0800 0100 ac1f0102",
         GOT_LOCAL, LINK_LO, GETLINK1,
         Link(1, "lo", None, ip_address("172.31.1.2"), local=True)),
    ],
)  # fmt: skip
def test_resolve_asks_the_route_then_the_name_of_its_device(
    addr, request_body, answer, link, getlink, want
):
    nl = ReplayNetlink(answers=[answer, link])
    assert backend(nl).resolve(ip_address(addr)) == want
    assert nl.sent == [(rtnl.RTM_GETROUTE, H(request_body)), (rtnl.RTM_GETLINK, getlink)]


@pytest.mark.parametrize(
    ("addr", "ack"),
    [
        # ip route add unreachable 192.0.2.0/24
        ("192.0.2.1", "24000000 0200 0001 00000000 00000000"  # NLMSG_ERROR, NLM_F_CAPPED
                      "8fffffff"  # error -EHOSTUNREACH
                      "24000000 1a00 0100 00000000 00000000"),  # our RTM_GETROUTE's header
        # ip route add blackhole 198.51.100.0/24
        ("198.51.100.1", "24000000 0200 0001 00000000 00000000 eaffffff"  # -EINVAL
                         "24000000 1a00 0100 00000000 00000000"),
        # ip route add prohibit 192.0.2.128/25
        ("192.0.2.129", "24000000 0200 0001 00000000 00000000 f3ffffff"  # -EACCES
                        "24000000 1a00 0100 00000000 00000000"),
        # ip route add throw 192.0.2.64/26 (in main: nothing after it)
        ("192.0.2.65", "24000000 0200 0001 00000000 00000000 9bffffff"  # -ENETUNREACH
                       "24000000 1a00 0100 00000000 00000000"),
        # ip -6 route add blackhole 2001:db8::/32
        ("2001:db8::1", "24000000 0200 0001 00000000 00000000 eaffffff"  # -EINVAL
                        "30000000 1a00 0100 00000000 00000000"),  # (a 48-byte request)
        # no route at all
        ("fd99::1", "24000000 0200 0001 00000000 00000000 9bffffff"  # -ENETUNREACH
                    "30000000 1a00 0100 00000000 00000000"),
    ],
)  # fmt: skip
def test_resolve_is_none_when_the_kernel_answers_it_has_no_usable_route(addr, ack):
    nl = ReplayNetlink(answers=[H(ack)])
    assert backend(nl).resolve(ip_address(addr)) is None
    assert [kind for kind, _ in nl.sent] == [rtnl.RTM_GETROUTE]  # no link to name


@pytest.mark.parametrize(
    "rtype", [rtnl.RTN_BLACKHOLE, rtnl.RTN_UNREACHABLE, rtnl.RTN_PROHIBIT, rtnl.RTN_THROW]
)
def test_resolve_is_none_for_an_answer_typed_as_no_usable_route(rtype):
    # Linux 6.18 answers these with an error ack (above); were a route message of such a
    # type to come back instead (GOT_ONLINK with another rtm_type), it is not a link either.
    answer = GOT_ONLINK[: 16 + 7] + bytes([rtype]) + GOT_ONLINK[16 + 8 :]
    nl = ReplayNetlink(answers=[answer])
    assert backend(nl).resolve(ip_address("172.31.1.11")) is None


def test_resolve_fails_on_a_socket_error_and_on_a_link_the_kernel_does_not_know():
    nl = ReplayNetlink(answers=[OSError(errno.EBADF, "Bad file descriptor")])
    with pytest.raises(RoutesError, match=r"route lookup for 172.31.1.11 failed: .*Bad file"):
        backend(nl).resolve(ip_address("172.31.1.11"))
    # ip link show index 3 after the link went away: -ENODEV
    gone = H(
        "24000000 0200 0001 00000000 00000000"  # nlmsghdr: 36, NLMSG_ERROR, NLM_F_CAPPED
        "edffffff"  # error -ENODEV
        "20000000 1200 0100 00000000 00000000"  # our RTM_GETLINK's header (32 bytes)
    )
    nl = ReplayNetlink(answers=[GOT_ONLINK, gone])
    with pytest.raises(RoutesError, match=r"cannot read the name of interface 3: .*No such device"):
        backend(nl).resolve(ip_address("172.31.1.11"))


def test_the_socket_given_is_the_one_closed():
    nl = ReplayNetlink()
    with backend(nl):
        pass
    assert nl.closed
