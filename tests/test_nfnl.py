"""nfnl without root: the bytes of the transactions, dumps and requests SetElements sends
(over :class:`tests.replay.ReplayNetlink`), how it explains the kernel's answers, and the
interval-element codec against what the kernel dumps. integration/test_nfnl.py runs the same
against the real kernel."""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterable
from ipaddress import IPv4Network
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdnsup import nfnl
from sdnsup.cidrs import NO_KNOWN_NETWORKS, KnownNetworks
from sdnsup.errors import NftError
from sdnsup.netlink import (
    HDR_LEN,
    NLM_F_DUMP_INTR,
    NLMSG_DONE,
    Ack,
    AnswerLost,
    message,
    messages,
)
from sdnsup.nfnl import NFNL_SUBSYS_NFTABLES
from tests.replay import ReplayNetlink
from tests.strategies import Net, disjoint, net_lists, prop_settings

NLM_F_MULTI = 0x2


def elements(nl: ReplayNetlink | None = None) -> nfnl.SetElements:
    return nfnl.SetElements(nl or ReplayNetlink())  # type: ignore[arg-type]


def _parts(batch: bytes) -> list[bytes]:
    """The messages of a batch, headers included."""
    return [batch[start - HDR_LEN : end] for *_h, start, end in messages(batch, len(batch))]


# What nft 1.0.6 sends for `nft add element inet sdnsup dst4 { 10.0.0.0/24 }`, written out by
# hand from the uapi headers (little-endian host), with our NLM_F_ACK on the request.
ADD_ONE_CIDR = bytes.fromhex(
    # NFNL_MSG_BATCH_BEGIN, seq 1; nfgenmsg AF_UNSPEC, res_id NFNL_SUBSYS_NFTABLES (be16)
    "14000000 1000 0100 01000000 00000000" "00 00 000a"
    # NFT_MSG_NEWSETELEM (subsys 10 << 8 | 12), REQUEST|ACK|CREATE, seq 2; nfgenmsg inet
    "58000000 0c0a 0504 02000000 00000000" "01 00 0000"
    "0b000100 73646e73757000 00"  # NFTA_SET_ELEM_LIST_TABLE "sdnsup"
    "09000200 6473743400 000000"  # NFTA_SET_ELEM_LIST_SET "dst4"
    "2c000380"  # NFTA_SET_ELEM_LIST_ELEMENTS, nested
    "10000180 0c000180 08000100 0a000000"  # start: LIST_ELEM { KEY { VALUE 10.0.0.0 } }
    "18000180 0c000180 08000100 0a000100"  # end: LIST_ELEM { KEY { VALUE 10.0.1.0 } ...
    "08000300 00000001"  # ... FLAGS NFT_SET_ELEM_INTERVAL_END (be32) }
    # NFNL_MSG_BATCH_END, seq 3
    "14000000 1100 0100 03000000 00000000" "00 00 000a"
)  # fmt: skip


def test_adding_a_cidr_sends_nfts_own_batch():
    nl = ReplayNetlink()
    elements(nl).add("sdnsup", "dst4", 4, [IPv4Network("10.0.0.0/24")])
    assert nl.transactions == [ADD_ONE_CIDR]


def test_deleting_goes_first_and_sends_the_same_elements_without_create():
    nl = ReplayNetlink()
    change = nfnl.Change(4, add=[IPv4Network("10.0.2.0/24")], delete=[IPv4Network("10.0.0.0/24")])
    elements(nl).update("sdnsup", {"dst4": change})
    (batch,) = nl.transactions
    _begin, delete, add, _end = _parts(batch)
    body = ADD_ONE_CIDR[40:108]  # table, set and the elements of 10.0.0.0/24
    assert delete[4:8] == bytes.fromhex("0e0a0500")  # NFT_MSG_DELSETELEM, REQUEST|ACK
    assert delete[20:] == body  # the very elements the add sent
    assert add[4:8] == bytes.fromhex("0c0a0504")  # then NFT_MSG_NEWSETELEM, ...|CREATE
    keys = bytes.fromhex("0a000000"), bytes.fromhex("0a000100")  # 10.0.0.0, 10.0.1.0
    moved = bytes.fromhex("0a000200"), bytes.fromhex("0a000300")  # 10.0.2.0, 10.0.3.0
    assert add[20:] == body.replace(keys[1], moved[1]).replace(keys[0], moved[0])


def test_nothing_is_sent_for_no_change():
    nl = ReplayNetlink()
    elements(nl).update("sdnsup", {"dst4": nfnl.Change(4)})
    assert nl.transactions == []


def test_a_refused_element_is_named_from_the_extended_ack_offset():
    # The second CIDR's start element: after nlmsghdr + nfgenmsg (20), TABLE and SET (24),
    # the ELEMENTS header (4) and the first CIDR's two elements (16 + 24).
    nl = ReplayNetlink(acks=lambda seqs: [(seqs[0], Ack(errno.EEXIST, None, 20 + 24 + 4 + 40))])
    with pytest.raises(NftError) as info:
        elements(nl).add(
            "sdnsup", "dst4", 4, [IPv4Network("10.0.0.0/24"), IPv4Network("10.0.2.0/24")]
        )
    assert str(info.value) == (
        "nftables refused adding 10.0.2.0/24 to inet sdnsup dst4: File exists "
        "(it overlaps an element already in the set); nothing was changed"
    )


def test_a_missing_table_is_named_when_the_ack_points_before_the_elements():
    nl = ReplayNetlink(acks=lambda seqs: [(seqs[0], Ack(errno.ENOENT, None, 20))])  # at TABLE
    with pytest.raises(NftError, match=r"\(no table inet sdnsup or no set dst4 in it\)"):
        elements(nl).add("sdnsup", "dst4", 4, [IPv4Network("10.0.0.0/24")])


@pytest.mark.parametrize(
    ("acks", "expected"),
    [
        (OSError(errno.EMSGSIZE, "Message too long"),
         "cannot send the nftables transaction adding 1 CIDR to inet sdnsup dst4: "
         "Message too long; nothing was changed"),
        (AnswerLost(errno.ENOBUFS, "No buffer space available"),
         "lost the kernel's answer to adding 1 CIDR to inet sdnsup dst4: No buffer space "
         "available; the sets may or may not have changed, read them back"),
        (lambda seqs: [],
         "the kernel answered 0 of 1 messages adding 1 CIDR to inet sdnsup dst4; the sets "
         "may or may not have changed, read them back"),
    ],
)  # fmt: skip
def test_an_unsent_batch_and_a_lost_answer_are_told_apart(acks, expected):
    with pytest.raises(NftError) as info:
        elements(ReplayNetlink(acks=acks)).add("sdnsup", "dst4", 4, [IPv4Network("10.0.0.0/24")])
    assert str(info.value) == expected


GETGEN = (NFNL_SUBSYS_NFTABLES << 8) | nfnl.NFT_MSG_GETGEN
NEWGEN = (NFNL_SUBSYS_NFTABLES << 8) | nfnl.NFT_MSG_NEWGEN


def test_generation_is_read_from_the_newgen_answer():
    # nfgenmsg, NFTA_GEN_ID (be32) 7, NFTA_GEN_PROC_PID 1234
    answer = bytes.fromhex("00000000" "08000100 00000007" "08000200 d2040000")  # fmt: skip
    nl = ReplayNetlink(answers=[message(NEWGEN, 0, 1, answer), message(NEWGEN, 0, 2, bytes(4))])
    assert elements(nl).generation() == 7
    assert nl.sent == [(GETGEN, bytes(4))]  # nfgenmsg AF_UNSPEC
    with pytest.raises(NftError, match="its answer did not carry it"):
        elements(nl).generation()


GETSETELEM = (NFNL_SUBSYS_NFTABLES << 8) | nfnl.NFT_MSG_GETSETELEM
NEWSETELEM = (NFNL_SUBSYS_NFTABLES << 8) | nfnl.NFT_MSG_NEWSETELEM


def _list_reply(cidrs: Iterable[Net], version: int, interrupted: bool = False) -> bytes:
    """A dump of set ``dst4``: one NEWSETELEM message, then NLMSG_DONE."""
    flags = NLM_F_MULTI | (NLM_F_DUMP_INTR if interrupted else 0)
    names = _nla(1, b"sdnsup\0") + _nla(2, b"dst4\0")
    body = bytes(4) + names + _nla(0x8003, kernel_dump(version, cidrs))
    return message(NEWSETELEM, flags, 1, body) + message(NLMSG_DONE, flags, 1, bytes(4))


def test_list_dumps_the_set_and_retries_a_dump_the_kernel_flagged_interrupted():
    want = {IPv4Network("10.0.0.0/24"), IPv4Network("10.0.1.0/24"), IPv4Network("0.0.0.0/32")}
    torn = {IPv4Network("10.0.0.0/24")}
    nl = ReplayNetlink(dumps=[_list_reply(torn, 4, interrupted=True), _list_reply(want, 4)])
    assert elements(nl).list("sdnsup", "dst4", 4) == want
    body = bytes.fromhex(
        "01000000"  # nfgenmsg: inet
        "0b000100 73646e73757000 00"  # NFTA_SET_ELEM_LIST_TABLE "sdnsup"
        "09000200 6473743400 000000"  # NFTA_SET_ELEM_LIST_SET "dst4"
    )  # fmt: skip
    assert nl.sent == [(GETSETELEM, body)] * 2

    nl = ReplayNetlink(dumps=[_list_reply((), 4, interrupted=True)] * 3)
    with pytest.raises(NftError, match="kept changing while being dumped; retry"):
        elements(nl).list("sdnsup", "dst4", 4)


def test_list_names_a_missing_set_and_a_set_of_the_other_family():
    nl = ReplayNetlink(dumps=[OSError(errno.ENOENT, "No such file or directory")])
    with pytest.raises(
        NftError, match=r"cannot read inet sdnsup dst4: .* \(no such table or set\)"
    ):
        elements(nl).list("sdnsup", "dst4", 4)
    nl = ReplayNetlink(dumps=[_list_reply([IPv4Network("10.0.0.0/24")], 4)])
    with pytest.raises(NftError, match="as IPv6 networks: its keys are 4 bytes long"):
        elements(nl).list("sdnsup", "dst4", 6)


def test_a_stale_answer_of_an_aborted_exchange_is_not_taken_for_this_batchs():
    def acks(seqs):
        return [(999, Ack(errno.EEXIST, None, None)), *((seq, Ack(0, None, None)) for seq in seqs)]

    elements(ReplayNetlink(acks=acks)).add("sdnsup", "dst4", 4, [IPv4Network("10.0.0.0/24")])


def test_a_batch_refused_as_a_whole_says_what_it_needs():
    nl = ReplayNetlink(acks=lambda seqs: [(seqs[0] - 1, Ack(errno.EPERM, None, None))])  # BEGIN's
    with pytest.raises(NftError) as info:
        elements(nl).add("sdnsup", "dst4", 4, [IPv4Network("10.0.0.0/24")])
    assert str(info.value) == (
        "nftables refused adding 1 CIDR to inet sdnsup dst4: Operation not permitted "
        "(needs CAP_NET_ADMIN); nothing was changed"
    )


# --- the interval-set elements, against what the kernel dumps ------------------------------


def _nla(atype: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, atype) + payload + b"\0" * (-size & 3)


def kernel_dump(version: int, cidrs: Iterable[Net]) -> bytes:
    """The elements as the kernel dumps them (nf_tables_fill_setelem, descending keys): per
    CIDR a start element (key = first address) and an end element flagged INTERVAL_END (key =
    last address + 1), or, reaching the top of the space, a start with nft's userdata."""
    klen = 4 if version == 4 else 16
    elems: list[tuple[int, int, bytes]] = []
    for n in cidrs:
        first, after = int(n.network_address), int(n.broadcast_address) + 1
        key = _nla(1, _nla(1, first.to_bytes(klen, "big")))
        if after >> (8 * klen):
            udata = _nla(6, struct.pack("=BBI", 1, 4, 1))
            elems.append((first, 1, _nla(1, key + udata)))
        else:
            elems.append((first, 1, _nla(1, key)))
            end = _nla(1, _nla(1, after.to_bytes(klen, "big"))) + _nla(3, struct.pack(">I", 1))
            elems.append((after, 0, _nla(1, end)))
    return b"".join(e for *_, e in sorted(elems, reverse=True))


def _keys(version: int, buf: bytes) -> list[int]:
    keys: list[int] = []
    nfnl._CODECS[version].parse_elements(buf, 0, len(buf), keys)
    return keys


def read_back(version: int, buf: bytes, known: KnownNetworks = NO_KNOWN_NETWORKS) -> set[Net]:
    """The CIDRs that elements encoded in ``buf`` stand for, as SetElements.list reads them."""
    return nfnl._to_cidrs(version, nfnl._pair(_keys(version, buf), version), known)


@prop_settings(100)
@given(net_lists.map(disjoint), st.integers(2, 6))
def test_interval_elements_read_back_as_the_same_cidrs(cidrs: list[Net], per_message: int) -> None:
    """Adjacent CIDRs share a boundary key, a CIDR at the top of the space has no end key:
    whatever the mix, what nfnl sends, and what the kernel dumps, decode to the same CIDRs."""
    for version in (4, 6):
        want = {n for n in cidrs if n.version == version}
        assert read_back(version, kernel_dump(version, want)) == want
        # read with the desired state's objects at hand, the very same objects come back
        again = read_back(version, kernel_dump(version, want), KnownNetworks(want))
        by_value = {n: n for n in want}
        assert again == want and all(n is by_value[n] for n in again)
        with mock.patch.object(nfnl, "MAX_ELEMENTS_PER_MESSAGE", per_message):
            messages = list(nfnl._encode(version, [*want, *want]))  # duplicates are sent once
        sent: list[Net] = []
        for chunk, data in messages:
            assert read_back(version, data) == set(chunk)  # a CIDR never straddles messages
            assert len(_keys(version, data)) <= per_message
            sent += chunk
        assert sorted(sent) == sorted(want)  # once each, in ascending order
        assert sent == sorted(sent)
