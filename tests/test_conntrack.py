"""The conntrack and sock_diag codec: byte fixtures captured from Linux 6.18, no root."""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import replace

from sdnsup.conntrack import Entry, _tuple, destroy_request, parse_entry

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
