"""Add, delete and list the elements of nftables interval sets over raw nfnetlink.

Why not libnftables: nft 1.0.6 fills its cache with the whole table, set elements included,
before every command, so adding one element to a 100k-CIDR set costs 0.6-2.5 s. sdnsup
creates its table and sets with libnftables (JSON) once and sends element deltas itself: one
nfnetlink batch, i.e. one atomic nftables transaction, per change.

Wire format, mirrored from what nft 1.0.6 sends on Linux 6.18 (``nft --debug=mnl`` and strace
of ``nft add/delete element``) for a named ``flags interval`` set, so that nft, libnftables and
the kernel see exactly what nft itself would have written:

* every CIDR is two elements: a *start* element whose key is the network address, then an
  *end* element whose key is the last address + 1, flagged ``NFTA_SET_ELEM_FLAGS =
  NFT_SET_ELEM_INTERVAL_END``. Keys are ``NFTA_DATA_VALUE`` in network byte order, 4 or 16
  bytes. Deleting sends the very same elements in ``NFT_MSG_DELSETELEM``;
* a CIDR reaching the top of the address space (``255.255.255.255/32``, ``ffff::/16``) has no
  end element, since last + 1 does not fit the key. nft instead marks its start element with
  the libnftnl userdata TLV ``NFTNL_UDATA_SET_ELEM_FLAGS = NFTNL_SET_ELEM_F_INTERVAL_OPEN``,
  which only nft reads back; we send the same bytes;
* adjacent CIDRs (``10.0.0.0/24``, ``10.0.1.0/24``) stay two intervals: the first one's end
  element and the second one's start element share the key ``10.0.1.0`` but are distinct
  kernel elements, told apart by the interval-end flag, so deleting one CIDR removes exactly
  its own two elements and leaves its neighbour whole (the set has no ``auto-merge``; nft
  does the same);
* the kernel's rbtree backend checks each element against the tree as it arrives, and ties an
  end element to the start element sent just before it (its "start cookie"): that is how it
  refuses a /23 whose start and end keys both exist, but as the outer ends of two adjacent
  /24s. Its open-interval check also looks at whether a start element is the last one of its
  message. So elements go in ascending order, start before end, a CIDR's two elements never
  straddle two messages, and an open interval (it sorts last) ends its message.

Where the bytes differ from nft's, the kernel does not care: each message asks for an ack
(``NLM_F_ACK``, nft only hears of errors); an end element carries its key before its flags,
and each element's nest has type ``NFTA_LIST_ELEM`` (libnftnl numbers them 1, 2, 3, ...), which
is the order and type the kernel itself uses when it dumps elements. And two things nft sends
that this module does not:

* when it adds to an *empty* set, nft also adds an end element with key ``0.0.0.0`` (the
  "first segment"), marking the gap below the first interval, which the kernel treats as
  uncovered anyway, and which nft's listing hides. Knowing whether a set is empty would cost
  the very dump this module exists to avoid; :meth:`SetElements.list` ignores one left by nft;
* ``NFTA_SET_ELEM_LIST_SET_ID``, which only matters for a set created in the same transaction.

Costs that stay in the kernel (Linux 6.18; measured by ``scripts/bench_nfnl.py`` on a 2-vCPU
VM with 100k CIDRs, i.e. 200k elements; the timings match upstream ``nft_set_rbtree.c``):

* every transaction that changes an interval set rebuilds that set's lookup array from the
  whole tree on commit (``nft_rbtree_commit``), so changing one CIDR of a 100k-CIDR set costs
  10-30 ms, against 0.05 ms for a small set (libnftables: 1-2.5 s). Only smaller sets (e.g.
  sharding the CIDRs over several sets) would make it cheaper;
* a dump restarts its walk of the tree for every reply of at most 32 kB (``nft_rbtree_walk``
  with ``skip``), so listing is quadratic in the set size: reading 100k CIDRs back takes ~2 s,
  ~1.2 s of it in the kernel (libnftables: ~2.4 s).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from sdnsup.cidrs import NO_KNOWN_NETWORKS, KnownNetworks
from sdnsup.errors import NftError
from sdnsup.netlink import (
    NETLINK_NETFILTER,
    NLA,
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_REQUEST,
    NLMSGHDR,
    AnswerLost,
    Netlink,
    attr,
    message,
    spans,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Version = Literal[4, 6]

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_NEWSETELEM = 12
NFT_MSG_GETSETELEM = 13
NFT_MSG_DELSETELEM = 14
NFT_MSG_NEWGEN = 15
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
NFPROTO_INET = 1


NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_FLAGS = 3
NFTA_SET_ELEM_USERDATA = 6
NFTA_DATA_VALUE = 1
NFT_SET_ELEM_INTERVAL_END = 1

# NFTA_SET_ELEM_LIST_ELEMENTS is one attribute and nla_len a u16, so a message's elements
# must fit in 65535 bytes. The largest element is 40 bytes (an IPv6 start element carrying the
# open-interval userdata): 1000 elements stay under 40 kB. A batch holds any number of messages.
MAX_ELEMENTS_PER_MESSAGE = 1000

_BE32 = struct.Struct(">I")

_BITS = {4: 32, 6: 128}
_ADDRESS: dict[int, type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]] = {
    4: ipaddress.IPv4Address,
    6: ipaddress.IPv6Address,
}

# What an errno means for one element, for operators.
_HINTS = {
    (NFT_MSG_NEWSETELEM, errno.EEXIST): "it overlaps an element already in the set",
    (NFT_MSG_NEWSETELEM, errno.ENOTEMPTY): "it overlaps an element already in the set",
    (NFT_MSG_NEWSETELEM, errno.ENFILE): "the set is full",
    (NFT_MSG_DELSETELEM, errno.ENOENT): "it is not in the set",
    (NFT_MSG_NEWSETELEM, errno.EINVAL): "is the set of this address family?",
    (NFT_MSG_DELSETELEM, errno.EINVAL): "is the set of this address family?",
}


def _nfgenmsg(family: int, res_id: int = 0) -> bytes:
    """struct nfgenmsg: family, version NFNETLINK_V0, res_id in network byte order."""
    return struct.pack("=BB", family, 0) + struct.pack(">H", res_id)


def _name(name: str) -> bytes:
    return name.encode() + b"\0"


class _KeyLengthError(Exception):
    """A dumped key is not an address of the family asked for."""


class _Codec:
    """Element encodings and the dump fast path for one key length (4 or 16 bytes)."""

    def __init__(self, version: int) -> None:
        klen = _BITS[version] // 8
        self.version = version
        self.klen = klen
        self.top = (1 << _BITS[version]) - 1
        self._flags = attr(NFTA_SET_ELEM_FLAGS, _BE32.pack(NFT_SET_ELEM_INTERVAL_END))
        # libnftnl userdata TLV (u8 type, u8 len, value): NFTNL_UDATA_SET_ELEM_FLAGS (1), a
        # host-endian u32 holding NFTNL_SET_ELEM_F_INTERVAL_OPEN (1).
        udata = attr(NFTA_SET_ELEM_USERDATA, struct.pack("=BBI", 1, 4, 1))

        # NFTA_LIST_ELEM { NFTA_SET_ELEM_KEY { NFTA_DATA_VALUE key } [, FLAGS | USERDATA] }:
        # everything but the key is constant, so an element is prefix + key (+ suffix).
        def head(tail: bytes) -> bytes:
            return struct.pack(
                "=HHHHHH",
                12 + klen + len(tail),
                NLA_F_NESTED | NFTA_LIST_ELEM,
                8 + klen,
                NLA_F_NESTED | NFTA_SET_ELEM_KEY,
                4 + klen,
                NFTA_DATA_VALUE,
            )

        self._start = head(b"")
        self._end = head(self._flags)
        self._open = head(udata)
        self._udata = udata

        # The kernel dumps each element as exactly these bytes (nf_tables_fill_setelem, no
        # NLA_F_NESTED): a start element is a key; an end element is a key and the flags.
        # One regex pass over a reply is ~5x faster than walking the attributes in Python;
        # anything else (userdata, other flags, a future layout) falls back to the walk.
        start_hdr = struct.pack("=HHHHHH", 12 + klen, 1, 8 + klen, 1, 4 + klen, 1)
        end_hdr = struct.pack("=HHHHHH", 20 + klen, 1, 8 + klen, 1, 4 + klen, 1)
        self._dump_re = re.compile(
            re.escape(start_hdr)
            + b"(.{%d})|" % klen
            + re.escape(end_hdr)
            + b"(.{%d})" % klen
            + re.escape(self._flags),
            re.DOTALL,
        )
        self._start_size = 12 + klen
        self._end_size = 20 + klen

    def cidr_elements(self, first: int, prefixlen: int) -> list[bytes]:
        """A CIDR's start element and, unless it reaches the top, its end element."""
        after = first + (1 << (_BITS[self.version] - prefixlen))
        if after > self.top:
            return [self._open + first.to_bytes(self.klen, "big") + self._udata]
        return [
            self._start + first.to_bytes(self.klen, "big"),
            self._end + after.to_bytes(self.klen, "big") + self._flags,
        ]

    def parse_elements(
        self, buf: bytes | bytearray | memoryview, start: int, end: int, out: list[int]
    ) -> None:
        """Append each dumped element in ``buf[start:end]`` to ``out`` as ``key << 1 | is_start``.

        That packing sorts an end element before a start element with the same key.
        """
        found = self._dump_re.findall(buf, start, end)
        n_start = sum(1 for s, _ in found if s)
        # Matches never overlap, so if their lengths add up to the whole span they tile it.
        if n_start * self._start_size + (len(found) - n_start) * self._end_size == end - start:
            from_bytes = int.from_bytes
            out.extend(
                from_bytes(s, "big") << 1 | 1 if s else from_bytes(e, "big") << 1 for s, e in found
            )
            return
        for _list_elem, elem_start, elem_end in spans(buf, start, end):
            key = -1
            is_end = False
            for atype, a, b in spans(buf, elem_start, elem_end):
                if atype == NFTA_SET_ELEM_KEY:
                    for vtype, va, vb in spans(buf, a, b):
                        if vtype == NFTA_DATA_VALUE:
                            if vb - va != self.klen:
                                raise _KeyLengthError(vb - va)
                            key = int.from_bytes(buf[va:vb], "big")
                elif atype == NFTA_SET_ELEM_FLAGS and b - a >= 4:
                    is_end = bool(_BE32.unpack_from(buf, a)[0] & NFT_SET_ELEM_INTERVAL_END)
            if key >= 0:
                out.append(key << 1 | (not is_end))


_CODECS = {4: _Codec(4), 6: _Codec(6)}


def _pair(keys: list[int], version: int) -> list[tuple[int, int]]:
    """Turn dumped elements (``key << 1 | is_start``) into inclusive ``(first, last)`` ranges.

    The rbtree dumps in descending order; sorted ascending, an end element comes before a
    start element with the same key: ``10.0.1.0`` closes ``10.0.0.0/24`` before it opens
    ``10.0.1.0/24``. An end element with nothing open (nft's ``0.0.0.0`` first segment) is
    skipped; a start left open at the end runs to the top of the address space.
    """
    keys.sort()
    ranges: list[tuple[int, int]] = []
    start = -1
    for packed in keys:
        key = packed >> 1
        if packed & 1:
            # Two starts in a row: the kernel covers everything from the first start up to
            # the next end element (anonymous sets pack adjacent ranges that way).
            if start >= 0 and key > start:
                ranges.append((start, key - 1))
            start = key
        elif start >= 0:
            if key > start:
                ranges.append((start, key - 1))
            start = -1
    if start >= 0:
        ranges.append((start, (1 << _BITS[version]) - 1))
    return ranges


def _to_cidrs(
    version: int, ranges: list[tuple[int, int]], known: KnownNetworks = NO_KNOWN_NETWORKS
) -> set[IPNetwork]:
    """Turn inclusive integer ranges into CIDRs; a range that is not one CIDR gives several."""
    bits = _BITS[version]
    network = known.ipv4 if version == 4 else known.ipv6
    address = _ADDRESS[version]
    out: set[IPNetwork] = set()
    for first, last in ranges:
        size = last - first + 1
        # Fast path: what this module and nft write is one aligned CIDR per range.
        if size & (size - 1) == 0 and first & (size - 1) == 0:
            out.add(network(first, bits + 1 - size.bit_length()))
        else:
            out.update(ipaddress.summarize_address_range(address(first), address(last)))
    return out


@dataclass(frozen=True, slots=True)
class _Message:
    """One NEWSETELEM/DELSETELEM message of a batch, kept to explain the kernel's answer."""

    msg_type: int
    set_name: str
    version: int
    cidrs: tuple[IPNetwork, ...]  # in the order their elements were encoded
    elements_at: int  # offset of the first element from the start of the message

    def culprit(self, offset: int) -> IPNetwork | None:
        """The CIDR whose element the kernel's extack offset points at, if any."""
        codec = _CODECS[self.version]
        at = self.elements_at
        for net in self.cidrs:
            for elem in codec.cidr_elements(int(net.network_address), net.prefixlen):
                if at == offset:
                    return net
                at += len(elem)
        return None


# For signatures inside SetElements, where the name ``list`` is the method.
_Keys = list[int]
_Messages = list[_Message]
_Bodies = list[bytes]


@dataclass(frozen=True, slots=True)
class Change:
    """Element deltas for one set: deleted first, then added, in one transaction."""

    version: Version
    add: Sequence[IPNetwork] = ()
    delete: Sequence[IPNetwork] = ()


class SetElements:
    """Element deltas and dumps for the ``inet`` interval sets of one network namespace.

    The socket belongs to the network namespace current when the object is created; switching
    namespaces afterwards does not move it. Not thread-safe: one batch or dump at a time.

    Adding a CIDR that is already in the set succeeds and changes nothing: messages carry
    ``NLM_F_CREATE`` without ``NLM_F_EXCL``, exactly like ``nft add element`` (``nft create
    element`` sets ``NLM_F_EXCL`` and would fail with EEXIST). Deleting a CIDR that is not in
    the set fails with ENOENT, like ``nft delete element``, and rolls back the whole batch.
    Callers send diffs.
    """

    def __init__(self, nl: Netlink | None = None) -> None:
        """Open a NETLINK_NETFILTER socket in the current network namespace (or use ``nl``).

        Raises:
            NftError: the socket cannot be opened or configured.
        """
        if nl is None:
            try:
                nl = Netlink(NETLINK_NETFILTER)
            except OSError as exc:
                raise NftError(
                    f"cannot open a netfilter netlink socket: {exc.strerror or exc}"
                ) from exc
        self._nl = nl

    def close(self) -> None:
        """Close the socket. Idempotent."""
        self._nl.close()

    def __enter__(self) -> SetElements:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- public API ---------------------------------------------------------------------------

    def add(
        self,
        table: str,
        set_name: str,
        family_of_elements: Version,
        cidrs: Sequence[IPNetwork],
    ) -> None:
        """Add CIDRs to an ``inet`` interval set, all or nothing, in one transaction.

        Args:
            table: name of the ``inet`` table, e.g. ``"sdnsup"``.
            set_name: name of the set, e.g. ``"dst4"``.
            family_of_elements: 4 for an ``ipv4_addr`` set, 6 for ``ipv6_addr``.
            cidrs: networks of that family, not overlapping each other. Duplicates are sent
                once; CIDRs already in the set are accepted and left alone. Nothing is sent
                for an empty sequence.

        Raises:
            ValueError: ``family_of_elements`` is not 4 or 6, or a CIDR is of the other one.
            NftError: the kernel refused the transaction and nothing was changed (a CIDR
                overlaps one in the set or another one added; no such table or set), or its
                answer was lost (then the set may have changed: read it back).
        """
        self.update(table, {set_name: Change(family_of_elements, add=cidrs)})

    def delete(
        self,
        table: str,
        set_name: str,
        family_of_elements: Version,
        cidrs: Sequence[IPNetwork],
    ) -> None:
        """Delete CIDRs from an ``inet`` interval set, all or nothing, in one transaction.

        Args:
            table: name of the ``inet`` table.
            set_name: name of the set.
            family_of_elements: 4 for an ``ipv4_addr`` set, 6 for ``ipv6_addr``.
            cidrs: networks exactly as they were added. Nothing is sent for an empty sequence.

        Raises:
            ValueError: ``family_of_elements`` is not 4 or 6, or a CIDR is of the other one.
            NftError: the kernel refused the transaction and nothing was changed (a CIDR is
                not in the set, e.g. ``10.0.0.0/23`` when the set holds its two /24 halves;
                no such table or set), or its answer was lost.
        """
        self.update(table, {set_name: Change(family_of_elements, delete=cidrs)})

    def update(self, table: str, changes: Mapping[str, Change]) -> None:
        """Apply deltas to several sets of one ``inet`` table in one atomic transaction.

        All deletions go first, so a CIDR can be replaced by an overlapping one.

        Args:
            table: name of the ``inet`` table.
            changes: set name -> its :class:`Change`.

        Raises:
            ValueError: a version is not 4 or 6, or a CIDR is of the other family.
            NftError: as :meth:`add` and :meth:`delete`; nothing was changed, unless the
                message says the answer was lost.
        """
        messages: _Messages = []
        bodies: _Bodies = []
        prefix_len = NLMSGHDR.size + 4  # nlmsghdr + nfgenmsg
        for msg_type in (NFT_MSG_DELSETELEM, NFT_MSG_NEWSETELEM):
            for set_name, change in sorted(changes.items()):
                cidrs = change.delete if msg_type == NFT_MSG_DELSETELEM else change.add
                names = attr(NFTA_SET_ELEM_LIST_TABLE, _name(table)) + attr(
                    NFTA_SET_ELEM_LIST_SET, _name(set_name)
                )
                elements_at = prefix_len + len(names) + 4
                for chunk, elements in _encode(change.version, cidrs):
                    messages.append(
                        _Message(msg_type, set_name, change.version, chunk, elements_at)
                    )
                    bodies.append(
                        names
                        + NLA.pack(4 + len(elements), NLA_F_NESTED | NFTA_SET_ELEM_LIST_ELEMENTS)
                        + elements
                    )
        if messages:
            self._transact(table, messages, bodies)

    def list(
        self,
        table: str,
        set_name: str,
        version: Version,
        known: KnownNetworks = NO_KNOWN_NETWORKS,
    ) -> set[IPNetwork]:
        """Read an ``inet`` interval set back as CIDRs (``known``'s objects where it has them).

        A covered range that is not a single CIDR (written by someone else, or merged by
        ``auto-merge``) comes back as the fewest CIDRs covering exactly that range.

        Args:
            table: name of the ``inet`` table.
            set_name: name of the set.
            version: 4 for an ``ipv4_addr`` set, 6 for ``ipv6_addr``.

        Returns:
            The CIDRs in the set.

        Raises:
            ValueError: ``version`` is not 4 or 6.
            NftError: the set cannot be read, e.g. it does not exist, or it kept changing
                while being dumped.
        """
        if version not in _CODECS:
            raise ValueError(f"version must be 4 or 6, not {version!r}")
        where = f"inet {table} {set_name}"
        # A dump spans many replies; if the ruleset changes in between, the kernel flags the
        # replies NLM_F_DUMP_INTR and the result may be torn: dump again.
        for _attempt in range(3):
            keys = self._dump(table, set_name, version, where)
            if keys is not None:
                return _to_cidrs(version, _pair(keys, version), known)
        raise NftError(f"cannot read {where}: it kept changing while being dumped; retry")

    def generation(self) -> int:
        """The ruleset's generation id: every committed nftables transaction, anyone's, adds
        one (NFT_MSG_GETGEN).

        Raises:
            NftError: the request failed.
        """
        try:
            _kind, data, start, end = self._nl.request(
                (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN, _nfgenmsg(socket.AF_UNSPEC)
            )
        except OSError as exc:
            raise NftError(f"cannot read the nftables generation: {exc.strerror or exc}") from exc
        for atype, a, b in spans(data, start + 4, end):  # after the nfgenmsg
            if atype == NFTA_GEN_ID and b - a >= 4:
                return int(_BE32.unpack_from(data, a)[0])
        raise NftError("cannot read the nftables generation: its answer did not carry it")

    # -- transactions -------------------------------------------------------------------------

    def _transact(self, table: str, messages: _Messages, bodies: _Bodies) -> None:
        """Send the messages as one batch and turn the kernel's answer into an error, if any."""
        gen = _nfgenmsg(NFPROTO_INET)
        batch_gen = _nfgenmsg(socket.AF_UNSPEC, NFNL_SUBSYS_NFTABLES)
        nl = self._nl
        begin_seq = nl.next_seq()
        parts = [message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, begin_seq, batch_gen)]
        by_seq: dict[int, _Message] = {}
        for msg, body in zip(messages, bodies, strict=True):
            seq = nl.next_seq()
            by_seq[seq] = msg
            # NLM_F_CREATE without NLM_F_EXCL is what `nft add element` sends: re-adding an
            # existing element is not an error. NLM_F_ACK: one answer per message.
            flags = NLM_F_REQUEST | NLM_F_ACK
            if msg.msg_type == NFT_MSG_NEWSETELEM:
                flags |= NLM_F_CREATE
            msg_type = (NFNL_SUBSYS_NFTABLES << 8) | msg.msg_type
            parts.append(message(msg_type, flags, seq, gen + body))
        end_seq = nl.next_seq()
        parts.append(message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, end_seq, batch_gen))
        batch = b"".join(parts)
        summary = _summary(table, messages)

        try:
            answers = nl.transaction(batch, len(messages))
        except AnswerLost as exc:
            raise NftError(
                f"lost the kernel's answer to {summary}: {exc.strerror or exc}; "
                "the sets may or may not have changed, read them back"
            ) from exc
        except OSError as exc:
            raise NftError(
                f"cannot send the nftables transaction {summary}: {exc.strerror or exc}; "
                "nothing was changed"
            ) from exc

        # This batch's answers only (BATCH_BEGIN's too: a batch refused as a whole, EPERM).
        mine = {begin_seq, end_seq, *by_seq}
        answers = [(seq, ack) for seq, ack in answers if seq in mine]
        errors = [(seq, ack) for seq, ack in answers if ack.code]
        if errors:
            seq, ack = errors[0]
            raise NftError(
                _explain(table, by_seq.get(seq), ack.code, ack.offset, len(errors), summary)
            )
        missing = set(by_seq) - {seq for seq, _ack in answers}
        if missing:
            raise NftError(
                f"the kernel answered {len(by_seq) - len(missing)} of {len(by_seq)} messages "
                f"{summary}; the sets may or may not have changed, read them back"
            )

    # -- dump ---------------------------------------------------------------------------------

    def _dump(self, table: str, set_name: str, version: int, where: str) -> _Keys | None:
        """Dump a set's elements.

        Returns:
            Each element as ``key << 1 | is_start``, or None when the ruleset changed during
            the dump (NLM_F_DUMP_INTR) so that the caller retries.
        """
        body = (
            _nfgenmsg(NFPROTO_INET)
            + attr(NFTA_SET_ELEM_LIST_TABLE, _name(table))
            + attr(NFTA_SET_ELEM_LIST_SET, _name(set_name))
        )
        parse_elements = _CODECS[version].parse_elements
        keys: _Keys = []

        def parse(_kind: int, data: bytes, start: int, end: int) -> None:
            # nfgenmsg (4), then TABLE, SET, ELEMENTS
            for atype, a, b in spans(data, start + 4, end):
                if atype == NFTA_SET_ELEM_LIST_ELEMENTS:
                    parse_elements(data, a, b, keys)

        try:
            _, interrupted = self._nl.dump(
                (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM, body, parse
            )
        except _KeyLengthError as exc:
            raise NftError(
                f"cannot read {where} as IPv{version} networks: its keys are {exc.args[0]} "
                "bytes long"
            ) from None
        except OSError as exc:
            hint = " (no such table or set)" if exc.errno == errno.ENOENT else ""
            raise NftError(f"cannot read {where}: {exc.strerror or exc}{hint}") from exc
        return None if interrupted else keys


def _encode(
    version: int, cidrs: Sequence[IPNetwork]
) -> Iterator[tuple[tuple[IPNetwork, ...], bytes]]:
    """Encode CIDRs as interval-set elements, nft's way, split into messages.

    Yields:
        ``(cidrs, elements)`` per message: its CIDRs, ascending, and their encoded elements
        (at most :data:`MAX_ELEMENTS_PER_MESSAGE`, a CIDR's two never split).
    """
    codec = _CODECS.get(version)
    if codec is None:
        raise ValueError(f"family_of_elements must be 4 or 6, not {version!r}")
    # Deduplicate and sort by one int per CIDR (address << 8 | prefixlen): several times
    # cheaper than hashing and comparing IPvXNetwork objects, which matters at 100k CIDRs.
    unique: dict[int, IPNetwork] = {}
    for net in cidrs:
        if net.version != version:
            raise ValueError(f"{net} is not an IPv{version} network")
        unique[int(net.network_address) << 8 | net.prefixlen] = net
    chunk: list[IPNetwork] = []
    elements: list[bytes] = []
    cidr_elements = codec.cidr_elements
    for packed in sorted(unique):
        encoded = cidr_elements(packed >> 8, packed & 0xFF)
        if len(elements) + len(encoded) > MAX_ELEMENTS_PER_MESSAGE:
            yield tuple(chunk), b"".join(elements)
            chunk, elements = [], []
        chunk.append(unique[packed])
        elements += encoded
    if chunk:
        yield tuple(chunk), b"".join(elements)


def _summary(table: str, messages: _Messages) -> str:
    """E.g. ``adding 3 CIDRs to inet sdnsup dst4 and deleting 1 CIDR from inet sdnsup dst6``."""
    counts: dict[tuple[int, str], int] = {}
    for msg in messages:
        key = (msg.msg_type, msg.set_name)
        counts[key] = counts.get(key, 0) + len(msg.cidrs)
    parts = []
    for (msg_type, set_name), count in counts.items():
        verb, prep = ("adding", "to") if msg_type == NFT_MSG_NEWSETELEM else ("deleting", "from")
        noun = "CIDR" if count == 1 else "CIDRs"
        parts.append(f"{verb} {count} {noun} {prep} inet {table} {set_name}")
    return " and ".join(parts)


def _explain(
    table: str, msg: _Message | None, err: int, offset: int | None, count: int, summary: str
) -> str:
    """An operator's message for the first error of a refused batch."""
    reason = os.strerror(err)
    tail = "; nothing was changed"
    if count > 1:
        tail = f" ({count - 1} more errors); nothing was changed"
    if err == errno.EPERM:
        return f"nftables refused {summary}: {reason} (needs CAP_NET_ADMIN){tail}"
    if msg is None:
        return f"nftables refused {summary}: {reason}{tail}"
    adding = msg.msg_type == NFT_MSG_NEWSETELEM
    verb, prep = ("adding", "to") if adding else ("deleting", "from")
    where = f"inet {table} {msg.set_name}"
    culprit = msg.culprit(offset) if offset is not None else None
    if culprit is not None:
        hint = _HINTS.get((msg.msg_type, err))
        reason += f" ({hint})" if hint else ""
        return f"nftables refused {verb} {culprit} {prep} {where}: {reason}{tail}"
    if err == errno.ENOENT and offset is not None and offset < msg.elements_at:
        # extack points at NFTA_SET_ELEM_LIST_TABLE or _SET: the lookup failed
        reason += f" (no table inet {table} or no set {msg.set_name} in it)"
    return f"nftables refused {summary}: {reason}{tail}"
