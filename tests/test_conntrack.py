"""The conntrack and sock_diag codec, no root: byte fixtures captured from Linux 6.18, and
what Conntrack sends and reads over :class:`tests.replay.ReplayNetlink`: the mark-filtered
dumps, the mark updates, the socket destroys (each request byte for byte, written out by
hand from nfnetlink_conntrack.h and inet_diag.h, then sent to a 6.18 kernel in a scratch
namespace, which did what it asks), and the kernel's dump answers, one field per comment."""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from dataclasses import replace

import pytest

from sdnsup.conntrack import Conntrack, Entry, _tuple, destroy_request, parse_entry
from sdnsup.errors import ConntrackError
from tests.replay import ReplayNetlink

A = ipaddress.ip_address

# Two answers to a mark-filtered dump (IPCTNL_MSG_CT_GET, CTA_MARK 0x2002/0x3082), captured
# in a namespace whose nft output chain set ct mark 0x12002: bodies after the nlmsghdr.
UDP4 = bytes.fromhex(
    "020000003400018014000180080001000a090002080002000a0900021c00028005000100110000000600020014"
    "e9000006000300232900003400028014000180080001000a090002080002000a0900021c000280050001001100"
    "000006000200232900000600030014e900000800030000000008080008000001200208000c00d1531c4a08000b"
    "0000000001080007000000001d"
)
TCP6 = bytes.fromhex(
    "0a0000004c0001802c00018014000300fd09000000000000000000000000000214000400fd0900000000000000"
    "000000000000021c0002800500010006000000060002009c41000006000300232800004c0002802c0001801400"
    "0300fd09000000000000000000000000000214000400fd0900000000000000000000000000021c000280050001"
    "00060000000600020023280000060003009c410000080003000000000e080008000001200208000c0087faae5e"
    "08000b0000000001080007000006977f300004802c0001800500010003000000050002000a0000000500030"
    "00a00000006000400230000000600050023000000"
)


def test_dump_answers_parse_into_the_original_tuple_state_and_mark():
    udp = parse_entry(UDP4, 0, len(UDP4))
    assert udp == Entry(
        socket.AF_INET, socket.IPPROTO_UDP, A("10.9.0.2"), A("10.9.0.2"), 5353, 9001, 0x12002,
        replied=False,  # to a closed port: no answer, only an ICMP error
    )  # fmt: skip
    assert udp.live and str(udp) == "udp 10.9.0.2:5353 -> 10.9.0.2:9001"
    tcp = parse_entry(TCP6, 0, len(TCP6))
    assert tcp == Entry(
        socket.AF_INET6, socket.IPPROTO_TCP, A("fd09::2"), A("fd09::2"), 40001, 9000, 0x12002, 3
    )
    assert tcp.live  # ESTABLISHED


def test_ended_tcp_connections_are_not_live():
    base = Entry(socket.AF_INET, socket.IPPROTO_TCP, A("10.0.0.1"), A("10.0.0.2"), 1, 2, 0)
    for state, live in ((3, True), (4, True), (7, False), (8, False)):  # TIME_WAIT, CLOSE
        assert replace(base, tcp_state=state).live is live


def test_an_update_names_the_entry_by_its_original_tuple():
    e = Entry(socket.AF_INET6, socket.IPPROTO_TCP, A("fd09::2"), A("fd09::3"), 40001, 9000, 0)
    raw = _tuple(e)
    # CTA_TUPLE_ORIG (nested) { CTA_TUPLE_IP { src, dst }, CTA_TUPLE_PROTO { 6, ports } }
    assert struct.unpack_from("=HH", raw) == (len(raw), 0x8001)
    assert A("fd09::2").packed in raw and A("fd09::3").packed in raw
    assert struct.pack(">H", 40001) in raw and struct.pack(">H", 9000) in raw


def test_destroy_request_is_an_inet_diag_req_v2_for_that_socket():
    e = Entry(socket.AF_INET, socket.IPPROTO_TCP, A("172.31.1.2"), A("10.10.10.1"), 40001, 8080, 0)
    req = destroy_request(e)
    assert len(req) == 56  # struct inet_diag_req_v2
    family, proto, _ext, _pad, states = struct.unpack_from("=BBBBI", req)
    assert (family, proto, states) == (socket.AF_INET, socket.IPPROTO_TCP, 0xFFFFFFFF)
    sport, dport = struct.unpack_from(">HH", req, 8)
    assert (sport, dport) == (40001, 8080)
    assert req[12:16] == A("172.31.1.2").packed and req[28:32] == A("10.10.10.1").packed
    assert req[-8:] == b"\xff" * 8  # INET_DIAG_NOCOOKIE: look the socket up by its tuple


# --- Conntrack over a replayed netlink ----------------------------------------------------

H = bytes.fromhex
IPCTNL_MSG_CT_GET = 0x0101  # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET

# The dump request bodies (nfgenmsg, then the kernel-side filter).
PINNED_2002 = H(
    "00 00 0000"  # nfgenmsg: AF_UNSPEC (both families), version 0, res_id 0
    "0800 0800 00002002"  # CTA_MARK 0x2002 (be32)
    "0800 1500 00003082"  # CTA_MARK_MASK 0x3082
)
UNANSWERED_2082 = H(
    "00 00 0000"  # nfgenmsg: AF_UNSPEC, version 0, res_id 0
    "0800 0800 00002082"  # CTA_MARK 0x2082
    "0800 1500 00003082"  # CTA_MARK_MASK 0x3082
    "0800 0300 00000000"  # CTA_STATUS 0...
    "0800 1a00 00000002"  # ... under CTA_STATUS_MASK IPS_SEEN_REPLY: never answered
)

# The answers, after `conntrack -I` made the entries and the REPIN_* updates below ran.
# conntrack -I -w 7 -p tcp -s 10.9.0.2 -d 10.9.0.3 --sport 40002 --dport 443
#   --state ESTABLISHED -u SEEN_REPLY
ZONED_TCP4 = H(
    "f8000000 0001 2200 00000000 00000000"  # nlmsghdr: 248, CT_NEW, MULTI|DUMP_FILTERED
    "02 00 0000"  # nfgenmsg: AF_INET
    "3400 0180"  # CTA_TUPLE_ORIG
    "1400 0180"  # CTA_TUPLE_IP
    "0800 0100 0a090002"  # CTA_IP_V4_SRC 10.9.0.2
    "0800 0200 0a090003"  # CTA_IP_V4_DST 10.9.0.3
    "1c00 0280"  # CTA_TUPLE_PROTO
    "0500 0100 06 000000"  # CTA_PROTO_NUM TCP
    "0600 0200 9c42 0000"  # CTA_PROTO_SRC_PORT 40002 (be16)
    "0600 0300 01bb 0000"  # CTA_PROTO_DST_PORT 443
    "3400 0280"  # CTA_TUPLE_REPLY
    "1400 0180 0800 0100 0a090003 0800 0200 0a090002"  # CTA_TUPLE_IP 10.9.0.3 -> 10.9.0.2
    "1c00 0280 0500 0100 06000000 0600 0200 01bb0000 0600 0300 9c420000"  # TCP 443 -> 40002
    "0600 1200 0007 0000"  # CTA_ZONE 7 (be16)
    "0800 0300 0000000a"  # CTA_STATUS SEEN_REPLY|CONFIRMED
    "0800 0800 00002002"  # CTA_MARK 0x2002
    "0800 0c00 c48e5bf9"  # CTA_ID
    "0800 0b00 00000001"  # CTA_USE 1
    "0800 0700 00000040"  # CTA_TIMEOUT 64 s
    "3000 0480"  # CTA_PROTOINFO
    "2c00 0180"  # CTA_PROTOINFO_TCP
    "0500 0100 03 000000"  # CTA_PROTOINFO_TCP_STATE ESTABLISHED
    "0500 0200 00 000000"  # CTA_PROTOINFO_TCP_WSCALE_ORIGINAL 0
    "0500 0300 00 000000"  # CTA_PROTOINFO_TCP_WSCALE_REPLY 0
    "0600 0400 0a00 0000"  # CTA_PROTOINFO_TCP_FLAGS_ORIGINAL {flags, mask}
    "0600 0500 0a00 0000"  # CTA_PROTOINFO_TCP_FLAGS_REPLY
    "1c00 1880"  # CTA_SYNPROXY
    "0800 0100 00000000 0800 0200 00000000 0800 0300 00000000"  # ISN, ITS, TSOFF: 0
)
# conntrack -I -p tcp -s fd09::2 -d fd09::3 --sport 40001 --dport 9000 --state ESTABLISHED
UNREPLIED_TCP6 = H(
    "20010000 0001 2200 00000000 00000000"  # nlmsghdr: 288, CT_NEW, MULTI|DUMP_FILTERED
    "0a 00 0000"  # nfgenmsg: AF_INET6
    "4c00 0180"  # CTA_TUPLE_ORIG
    "2c00 0180"  # CTA_TUPLE_IP
    "1400 0300 fd090000000000000000000000000002"  # CTA_IP_V6_SRC fd09::2
    "1400 0400 fd090000000000000000000000000003"  # CTA_IP_V6_DST fd09::3
    "1c00 0280"  # CTA_TUPLE_PROTO
    "0500 0100 06 000000"  # CTA_PROTO_NUM TCP
    "0600 0200 9c41 0000"  # CTA_PROTO_SRC_PORT 40001
    "0600 0300 2328 0000"  # CTA_PROTO_DST_PORT 9000
    "4c00 0280"  # CTA_TUPLE_REPLY
    "2c00 0180"  # CTA_TUPLE_IP fd09::3 -> fd09::2
    "1400 0300 fd090000000000000000000000000003 1400 0400 fd090000000000000000000000000002"
    "1c00 0280 0500 0100 06000000 0600 0200 23280000 0600 0300 9c410000"  # TCP 9000 -> 40001
    "0800 0300 00000008"  # CTA_STATUS CONFIRMED: no reply seen
    "0800 0800 00002003"  # CTA_MARK 0x2003
    "0800 0c00 80fbbf64"  # CTA_ID
    "0800 0b00 00000001"  # CTA_USE 1
    "0800 0700 0000005b"  # CTA_TIMEOUT 91 s
    "3000 0480 2c00 0180"  # CTA_PROTOINFO { CTA_PROTOINFO_TCP {
    "0500 0100 03 000000"  # STATE ESTABLISHED
    "0500 0200 00 000000 0500 0300 00 000000"  # WSCALE_ORIGINAL 0, WSCALE_REPLY 0
    "0600 0400 0a00 0000 0600 0500 0a00 0000"  # FLAGS_ORIGINAL, FLAGS_REPLY } }
    "1c00 1880 0800 0100 00000000 0800 0200 00000000 0800 0300 00000000"  # CTA_SYNPROXY
)
# conntrack -I -p icmp -s 10.9.0.2 -d 10.9.0.3 --icmp-type 8 --icmp-code 0 --icmp-id 7
#   -m 0x12002
ICMP4 = H(
    "d0000000 0001 2200 00000000 00000000"  # nlmsghdr: 208, CT_NEW, MULTI|DUMP_FILTERED
    "02 00 0000"  # nfgenmsg: AF_INET
    "3c00 0180"  # CTA_TUPLE_ORIG
    "1400 0180 0800 0100 0a090002 0800 0200 0a090003"  # CTA_TUPLE_IP 10.9.0.2 -> 10.9.0.3
    "2400 0280"  # CTA_TUPLE_PROTO, no ports:
    "0500 0100 01 000000"  # CTA_PROTO_NUM ICMP
    "0600 0400 0007 0000"  # CTA_PROTO_ICMP_ID 7
    "0500 0500 08 000000"  # CTA_PROTO_ICMP_TYPE echo request
    "0500 0600 00 000000"  # CTA_PROTO_ICMP_CODE 0
    "3c00 0280"  # CTA_TUPLE_REPLY
    "1400 0180 0800 0100 0a090003 0800 0200 0a090002"  # CTA_TUPLE_IP 10.9.0.3 -> 10.9.0.2
    "2400 0280 0500 0100 01000000 0600 0400 00070000"  # CTA_TUPLE_PROTO ICMP, id 7,
    "0500 0500 00000000 0500 0600 00000000"  # type echo reply, code 0
    "0800 0300 00000008"  # CTA_STATUS CONFIRMED
    "0800 0800 00012002"  # CTA_MARK 0x12002
    "0800 0c00 085d49f4"  # CTA_ID
    "0800 0b00 00000001"  # CTA_USE 1
    "0800 0700 0000003d"  # CTA_TIMEOUT 61 s
    "1c00 1880 0800 0100 00000000 0800 0200 00000000 0800 0300 00000000"  # CTA_SYNPROXY
)
# conntrack -I -p tcp -s 10.9.0.2 -d 10.9.0.3 --sport 40003 --dport 443 --state SYN_SENT
#   -m 0x12082
SYN_SENT_TCP4 = H(
    "f0000000 0001 2200 00000000 00000000"  # nlmsghdr: 240, CT_NEW, MULTI|DUMP_FILTERED
    "02 00 0000"  # nfgenmsg: AF_INET
    "3400 0180"  # CTA_TUPLE_ORIG
    "1400 0180 0800 0100 0a090002 0800 0200 0a090003"  # CTA_TUPLE_IP 10.9.0.2 -> 10.9.0.3
    "1c00 0280"  # CTA_TUPLE_PROTO
    "0500 0100 06 000000"  # CTA_PROTO_NUM TCP
    "0600 0200 9c43 0000"  # CTA_PROTO_SRC_PORT 40003
    "0600 0300 01bb 0000"  # CTA_PROTO_DST_PORT 443
    "3400 0280"  # CTA_TUPLE_REPLY
    "1400 0180 0800 0100 0a090003 0800 0200 0a090002"  # CTA_TUPLE_IP 10.9.0.3 -> 10.9.0.2
    "1c00 0280 0500 0100 06000000 0600 0200 01bb0000 0600 0300 9c430000"  # TCP 443 -> 40003
    "0800 0300 00000008"  # CTA_STATUS CONFIRMED: no reply seen
    "0800 0800 00012082"  # CTA_MARK 0x12082
    "0800 0c00 51ddf83e"  # CTA_ID
    "0800 0b00 00000001"  # CTA_USE 1
    "0800 0700 0000003d"  # CTA_TIMEOUT 61 s
    "3000 0480 2c00 0180"  # CTA_PROTOINFO { CTA_PROTOINFO_TCP {
    "0500 0100 01 000000"  # STATE SYN_SENT
    "0500 0200 00 000000 0500 0300 00 000000"  # WSCALE_ORIGINAL 0, WSCALE_REPLY 0
    "0600 0400 0a00 0000 0600 0500 0a00 0000"  # FLAGS_ORIGINAL, FLAGS_REPLY } }
    "1c00 1880 0800 0100 00000000 0800 0200 00000000 0800 0300 00000000"  # CTA_SYNPROXY
)
CT_DONE = H("14000000 0300 0200 00000000 00000000 00000000")  # NLMSG_DONE, MULTI; error 0

ZONED = Entry(
    socket.AF_INET, socket.IPPROTO_TCP, A("10.9.0.2"), A("10.9.0.3"), 40002, 443, 0x2002,
    tcp_state=3, zone=7,
)  # fmt: skip
UNREPLIED = Entry(
    socket.AF_INET6, socket.IPPROTO_TCP, A("fd09::2"), A("fd09::3"), 40001, 9000, 0x2003,
    tcp_state=3, replied=False,
)  # fmt: skip


def conntrack(ct: ReplayNetlink, diag: ReplayNetlink | None = None) -> Conntrack:
    return Conntrack(ct, diag or ReplayNetlink())  # type: ignore[arg-type]


def test_pinned_asks_the_kernel_for_one_marks_entries_and_reads_those_with_ports():
    nl = ReplayNetlink(dumps=[ZONED_TCP4 + UNREPLIED_TCP6 + ICMP4 + CT_DONE])
    assert conntrack(nl).pinned(0x2002, 0x3082) == [ZONED, UNREPLIED]  # not the ICMP entry
    assert nl.sent == [(IPCTNL_MSG_CT_GET, PINNED_2002)]


def test_an_entry_of_another_mark_the_kernel_let_through_is_dropped():
    nl = ReplayNetlink(dumps=[SYN_SENT_TCP4 + ZONED_TCP4 + CT_DONE])
    assert conntrack(nl).pinned(0x2002, 0x3082) == [ZONED]  # 0x12082 & 0x3082 != 0x2002


def test_unanswered_adds_the_status_filter_and_reads_the_unreplied_entry():
    nl = ReplayNetlink(dumps=[SYN_SENT_TCP4 + CT_DONE])
    assert conntrack(nl).unanswered(0x2082, 0x3082) == [
        Entry(
            socket.AF_INET, socket.IPPROTO_TCP, A("10.9.0.2"), A("10.9.0.3"), 40003, 443,
            0x12082, tcp_state=1, replied=False,
        )
    ]  # fmt: skip
    assert nl.sent == [(IPCTNL_MSG_CT_GET, UNANSWERED_2082)]


def test_a_failed_dump_is_a_conntrack_error():
    nl = ReplayNetlink(dumps=[OSError(errno.EPERM, "Operation not permitted")])
    with pytest.raises(ConntrackError, match="cannot read conntrack entries"):
        conntrack(nl).pinned(0x2002, 0x3082)


# Sent as they are (plus NLM_F_ACK) to the kernel holding the entries above with marks 0x2
# and 0x1: it acked both and the marks became 0x2002 and 0x2003.
REPIN_ZONED = H(
    "60000000 0001 0100 01000000 00000000"  # nlmsghdr: 96, CT_NEW, REQUEST (no CREATE), seq 1
    "02 00 0000"  # nfgenmsg: AF_INET
    "3400 0180"  # CTA_TUPLE_ORIG
    "1400 0180"  # CTA_TUPLE_IP
    "0800 0100 0a090002"  # CTA_IP_V4_SRC 10.9.0.2
    "0800 0200 0a090003"  # CTA_IP_V4_DST 10.9.0.3
    "1c00 0280"  # CTA_TUPLE_PROTO
    "0500 0100 06 000000"  # CTA_PROTO_NUM TCP
    "0600 0200 9c42 0000"  # CTA_PROTO_SRC_PORT 40002
    "0600 0300 01bb 0000"  # CTA_PROTO_DST_PORT 443
    "0800 0800 00002002"  # CTA_MARK 0x2002: mark = mark & ~MASK ^ 0x2002
    "0800 1500 00003082"  # CTA_MARK_MASK 0x3082
    "0600 1200 0007 0000"  # CTA_ZONE 7: the entry is looked up in its zone
)
REPIN_V6 = H(
    "70000000 0001 0100 02000000 00000000"  # nlmsghdr: 112, CT_NEW, REQUEST, seq 2
    "0a 00 0000"  # nfgenmsg: AF_INET6
    "4c00 0180"  # CTA_TUPLE_ORIG
    "2c00 0180"  # CTA_TUPLE_IP
    "1400 0300 fd090000000000000000000000000002"  # CTA_IP_V6_SRC fd09::2
    "1400 0400 fd090000000000000000000000000003"  # CTA_IP_V6_DST fd09::3
    "1c00 0280"  # CTA_TUPLE_PROTO
    "0500 0100 06 000000"  # CTA_PROTO_NUM TCP
    "0600 0200 9c41 0000"  # CTA_PROTO_SRC_PORT 40001
    "0600 0300 2328 0000"  # CTA_PROTO_DST_PORT 9000
    "0800 0800 00002002"  # CTA_MARK 0x2002
    "0800 1500 00003082"  # CTA_MARK_MASK 0x3082 (zone 0: no CTA_ZONE)
)


def test_repin_sends_one_update_per_entry_naming_it_by_tuple_and_zone():
    before = [replace(ZONED, mark=0x2), replace(UNREPLIED, mark=0x1)]
    nl = ReplayNetlink()
    assert conntrack(nl).repin(before, 0x2002, 0x3082) == 2
    assert nl.batches == [[REPIN_ZONED, REPIN_V6]]
    # the first refused (EPERM: not ENOENT, which would mean the entry ended meanwhile)
    nl = ReplayNetlink(refuse={1: errno.EPERM})
    assert conntrack(nl).repin([ZONED, UNREPLIED], 0x2002, 0x3082) == 1
    # an entry that ended meanwhile (ENOENT) is no error, and not counted as changed
    nl = ReplayNetlink(refuse={2: errno.ENOENT})
    assert conntrack(nl).repin([ZONED, UNREPLIED], 0x2002, 0x3082) == 1


# Sent as they are (plus NLM_F_ACK) to a 6.18 kernel while those connections were open: it
# acked both and each client's recv() failed with ECONNABORTED.
DESTROY_TCP4 = H(
    "48000000 1500 0100 01000000 00000000"  # nlmsghdr: 72, SOCK_DESTROY, REQUEST, seq 1
    "02 06 00 00 ffffffff"  # inet_diag_req_v2: AF_INET, TCP, no ext, pad; every state
    "9c42 01bb"  # inet_diag_sockid: sport 40002, dport 443 (be16)
    "0a090002 000000000000000000000000"  # src 10.9.0.2
    "0a090003 000000000000000000000000"  # dst 10.9.0.3
    "00000000"  # any interface
    "ffffffff ffffffff"  # INET_DIAG_NOCOOKIE: by the tuple
)
DESTROY_TCP6 = H(
    "48000000 1500 0100 02000000 00000000"  # nlmsghdr: 72, SOCK_DESTROY, REQUEST, seq 2
    "0a 06 00 00 ffffffff"  # inet_diag_req_v2: AF_INET6, TCP, no ext, pad; every state
    "9c41 2328"  # sport 40001, dport 9000
    "fd090000000000000000000000000002"  # src fd09::2
    "fd090000000000000000000000000003"  # dst fd09::3
    "00000000"  # any interface
    "ffffffff ffffffff"  # INET_DIAG_NOCOOKIE
)


def test_abort_sockets_destroys_the_live_tcp_ones_and_counts_them():
    udp = replace(ZONED, proto=socket.IPPROTO_UDP, tcp_state=None)
    ended = replace(ZONED, tcp_state=7)  # TIME_WAIT
    diag = ReplayNetlink()
    assert conntrack(ReplayNetlink(), diag).abort_sockets([ZONED, udp, ended, UNREPLIED]) == 2
    assert diag.batches == [[DESTROY_TCP4, DESTROY_TCP6]]
    # no such socket here (a forwarded connection): not counted, not an error
    diag = ReplayNetlink(refuse={1: errno.ENOENT})
    assert conntrack(ReplayNetlink(), diag).abort_sockets([ZONED, UNREPLIED]) == 1


def test_a_kernel_that_cannot_destroy_sockets_is_a_conntrack_error():
    diag = ReplayNetlink(refuse={1: errno.EOPNOTSUPP, 2: errno.EOPNOTSUPP})
    with pytest.raises(ConntrackError, match="the kernel refused to destroy sockets"):
        conntrack(ReplayNetlink(), diag).abort_sockets([ZONED, UNREPLIED])
