"""The netlink codec against bytes written out by hand (no socket, no root): attributes, the
message header, error acks with their extended-ack text and offset, and the rtnetlink
requests sdnsup sends for routes, nexthops and policy rules."""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

import pytest

from sdnsup import rtnl
from sdnsup.netlink import (
    HDR_LEN,
    NETLINK_NETFILTER,
    NLA_F_NESTED,
    NLM_F_ACK_TLVS,
    NLM_F_CAPPED,
    NLM_F_CREATE,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    AnswerLost,
    Netlink,
    attr,
    attr_u32,
    attrs,
    message,
    oserror,
    parse_ack,
    u32,
)
from sdnsup.routes import Nexthop, Route, Rule

AF_INET, AF_INET6 = socket.AF_INET, socket.AF_INET6


def le16(v: int) -> bytes:
    return struct.pack("=H", v)


def le32(v: int) -> bytes:
    return struct.pack("=I", v)


def test_an_attribute_is_length_type_payload_padded_to_4_bytes() -> None:
    assert attr(3, b"eth0\0") == le16(9) + le16(3) + b"eth0\0" + b"\0\0\0"
    assert attr(4, b"") == le16(4) + le16(4)
    assert attr_u32(15, 7300) == le16(8) + le16(15) + le32(7300)


def test_attributes_parse_by_type_with_the_nested_bit_masked_and_stop_at_garbage() -> None:
    data = b"HDR!" + attr(1, b"\x0a\x00\x00\x00") + attr(2 | NLA_F_NESTED, b"xyz") + attr_u32(15, 9)
    found = attrs(data, 4, len(data))
    assert found == {1: b"\x0a\x00\x00\x00", 2: b"xyz", 15: le32(9)}
    assert u32(found.get(15)) == 9 and u32(None, 252) == 252
    # a length below 4 is malformed: parsing stops there instead of looping
    assert attrs(le16(2) + le16(1) + attr_u32(5, 1), 0, 12) == {}


def test_a_message_is_the_header_then_the_body_with_port_id_0() -> None:
    msg = message(24, NLM_F_REQUEST | NLM_F_CREATE, 7, b"BODY")
    head = le32(HDR_LEN + 4) + le16(24) + le16(NLM_F_REQUEST | NLM_F_CREATE) + le32(7) + le32(0)
    assert msg == head + b"BODY"


def _nlmsgerr(code: int, request: bytes, tlvs: bytes) -> bytes:
    return struct.pack("=i", -code) + request + tlvs


def test_an_error_ack_gives_the_errno_the_kernels_text_and_the_offset_at_fault() -> None:
    request = message(104, NLM_F_REQUEST, 9, b"\0" * 8)  # the capped copy: the header only
    tlvs = attr(1, b"Nexthop id does not exist\0") + attr_u32(2, 28)
    body = _nlmsgerr(errno.EINVAL, request[:HDR_LEN], tlvs)
    ack = parse_ack(NLM_F_CAPPED | NLM_F_ACK_TLVS, body, 0, len(body))
    assert ack == (errno.EINVAL, "Nexthop id does not exist", 28)
    error = oserror(ack.code, ack.text)
    assert error.errno == errno.EINVAL
    assert str(error.strerror) == "Invalid argument: Nexthop id does not exist"


def test_an_uncapped_ack_skips_the_whole_request_before_its_attributes() -> None:
    request = message(24, NLM_F_REQUEST, 3, b"\x01" * 10)  # 26 bytes, padded to 28
    body = _nlmsgerr(errno.EEXIST, request + b"\0\0", attr(1, b"exists\0"))
    assert parse_ack(NLM_F_ACK_TLVS, body, 0, len(body)) == (errno.EEXIST, "exists", None)
    # a plain ack (success, no attributes)
    ok = _nlmsgerr(0, request[:HDR_LEN], b"")
    assert parse_ack(NLM_F_CAPPED, ok, 0, len(ok)) == (0, None, None)


def test_a_route_through_a_nexthop_object_is_one_packed_request() -> None:
    route = Route(ipaddress.ip_network("10.10.10.0/24"), 7300, 0x5D5D0004)
    msg = rtnl._route_message(
        rtnl.RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE, 5, route, 0xF5, 0, 1
    )
    body = rtnl.RTMSG.pack(AF_INET, 24, 0, 0, rtnl.RT_TABLE_COMPAT, 0xF5, 0, 1, 0)
    body += attr_u32(rtnl.RTA_TABLE, 7300) + attr(rtnl.RTA_DST, bytes([10, 10, 10, 0]))
    body += attr_u32(rtnl.RTA_NH_ID, 0x5D5D0004)
    assert msg == message(rtnl.RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE, 5, body)


def test_a_route_without_a_nexthop_object_and_a_table_below_256() -> None:
    route = Route(ipaddress.ip_network("fd10::/64"), 100, 0)
    msg = rtnl._route_message(rtnl.RTM_DELROUTE, NLM_F_REQUEST, 6, route, 0xF5, 0, 1)
    body = rtnl.RTMSG.pack(AF_INET6, 64, 0, 0, 100, 0xF5, 0, 1, 0)
    body += attr_u32(rtnl.RTA_TABLE, 100)
    body += attr(rtnl.RTA_DST, ipaddress.IPv6Address("fd10::").packed)
    assert msg == message(rtnl.RTM_DELROUTE, NLM_F_REQUEST, 6, body)


def test_nexthops_via_a_gateway_as_a_blackhole_and_deleted() -> None:
    gw = Nexthop(0x5D5D0004, AF_INET, ipaddress.ip_address("172.31.1.11"), 2)
    msg = rtnl._nexthop_message(rtnl.RTM_NEWNEXTHOP, NLM_F_REQUEST, 1, gw, 0xF5)
    body = rtnl.NHMSG.pack(AF_INET, 0, 0xF5, 0, 0) + attr_u32(rtnl.NHA_ID, 0x5D5D0004)
    body += attr_u32(rtnl.NHA_OIF, 2) + attr(rtnl.NHA_GATEWAY, bytes([172, 31, 1, 11]))
    assert msg == message(rtnl.RTM_NEWNEXTHOP, NLM_F_REQUEST, 1, body)

    hole = Nexthop(0x5D5D0006, AF_INET6, None, 0)
    msg = rtnl._nexthop_message(rtnl.RTM_NEWNEXTHOP, NLM_F_REQUEST, 2, hole, 0xF5)
    body = rtnl.NHMSG.pack(AF_INET6, 0, 0xF5, 0, 0) + attr_u32(rtnl.NHA_ID, 0x5D5D0006)
    body += attr(rtnl.NHA_BLACKHOLE, b"")
    assert msg == message(rtnl.RTM_NEWNEXTHOP, NLM_F_REQUEST, 2, body)

    msg = rtnl._nexthop_message(rtnl.RTM_DELNEXTHOP, NLM_F_REQUEST, 3, gw, 0xF5)
    body = rtnl.NHMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr_u32(rtnl.NHA_ID, 0x5D5D0004)
    assert msg == message(rtnl.RTM_DELNEXTHOP, NLM_F_REQUEST, 3, body)


def test_a_policy_rule_encodes_and_reads_back_the_same() -> None:
    rule = Rule(AF_INET, 7298, 0x2002, 0x3082, 7301, "eth1")
    msg = rtnl._rule_message(rtnl.RTM_NEWRULE, NLM_F_REQUEST, 4, rule, 0xF5)
    body = rtnl.FIB_RULE_HDR.pack(AF_INET, 0, 0, 0, 0, 0, 0, rtnl.FR_ACT_TO_TBL, 0)
    body += attr_u32(rtnl.FRA_PRIORITY, 7298) + attr_u32(rtnl.FRA_FWMARK, 0x2002)
    body += attr_u32(rtnl.FRA_FWMASK, 0x3082) + attr_u32(rtnl.FRA_TABLE, 7301)
    body += attr(rtnl.FRA_IIFNAME, b"eth1\0") + attr(rtnl.FRA_PROTOCOL, bytes([0xF5]))
    assert msg == message(rtnl.RTM_NEWRULE, NLM_F_REQUEST, 4, body)
    # what a dump returns for it parses back to the same rule and protocol
    assert rtnl._parse_rule(msg, HDR_LEN, len(msg)) == (0xF5, rule)
    # a table below 256 also goes in the header; no protocol: the delete matches any
    low = Rule(AF_INET6, 100, 0x2000, 0x2000, 200)
    msg = rtnl._rule_message(rtnl.RTM_DELRULE, NLM_F_REQUEST, 5, low, None)
    assert msg[HDR_LEN + 4] == 200
    assert rtnl._parse_rule(msg, HDR_LEN, len(msg)) == (0, low)


# --- the nfnetlink transaction on a scripted socket -----------------------------------------


class ScriptedSocket:
    """Stands in for the netlink socket: ``send`` may fail; each ``recv_into`` gives the next
    datagram or raises the next error; a drained queue is EAGAIN."""

    def __init__(self, datagrams=(), send_error=None):
        self.queue = list(datagrams)
        self.send_error = send_error
        self.sent: list[bytes] = []
        self.blocking: list[object] = []  # setblocking/settimeout calls, in order

    def send(self, data):
        if self.send_error is not None:
            raise self.send_error
        self.sent.append(data)
        return len(data)

    def recv_into(self, buf, size=0, flags=0):
        if not self.queue:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        item = self.queue.pop(0)
        if isinstance(item, BaseException):
            raise item
        buf[: len(item)] = item
        return len(item)

    def setblocking(self, flag):
        self.blocking.append(flag)

    def settimeout(self, value):
        self.blocking.append(value)

    def setsockopt(self, *args):
        pass

    def close(self):
        pass


def scripted(sock: ScriptedSocket) -> Netlink:
    nl = Netlink(NETLINK_NETFILTER)  # a real socket (no privilege needed), replaced
    nl.sock.close()
    nl.sock = sock  # type: ignore[assignment]
    return nl


def ack(seq: int, code: int) -> bytes:
    """An NLMSG_ERROR answer, capped: errno (negative), then the request's header."""
    body = struct.pack("=i", -code) + struct.pack("=IHHII", 20, 0x0A0C, 0x5, seq, 0)
    return struct.pack("=IHHII", 16 + len(body), 2, 0x100, seq, 0) + body


def test_a_transaction_reads_every_queued_answer_without_blocking_then_restores_the_timeout():
    sock = ScriptedSocket([ack(2, 0) + ack(3, errno.EEXIST), ack(4, 0)])
    nl = scripted(sock)
    answers = nl.transaction(b"batch", 3)
    assert sock.sent == [b"batch"]
    assert [(seq, a.code) for seq, a in answers] == [(2, 0), (3, errno.EEXIST), (4, 0)]
    assert sock.blocking == [False, 30.0]  # non-blocking while reading, the timeout back
    assert not nl.dirty  # complete: the next exchange need not drain


def test_an_unsent_batch_is_a_plain_oserror_and_a_lost_answer_is_answerlost():
    sock = ScriptedSocket(send_error=OSError(errno.EMSGSIZE, "Message too long"))
    nl = scripted(sock)
    with pytest.raises(OSError) as info:
        nl.transaction(b"batch", 1)
    assert not isinstance(info.value, AnswerLost) and info.value.errno == errno.EMSGSIZE
    assert nl.dirty  # whatever may be queued is drained before the next exchange

    sock = ScriptedSocket([ack(2, 0), OSError(errno.ENOBUFS, "No buffer space available")])
    nl = scripted(sock)
    with pytest.raises(AnswerLost) as lost:
        nl.transaction(b"batch", 2)
    assert lost.value.errno == errno.ENOBUFS
    assert nl.dirty and sock.blocking[-1] == 30.0
