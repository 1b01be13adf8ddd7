"""Parse and validate the user's CIDR list (``-r 10.10.10.0/24,fd00::/64`` or ``-r @FILE``).

Published lists (a cloud provider's ranges, a country list, a blocklist) routinely hold the
same prefix twice and prefixes inside others; what the user means is their union. So by
default duplicates, nested and adjacent prefixes are merged (collapsed per family) and
counted in a :class:`CidrReport`; ``strict`` turns duplicates and nesting back into errors.

Every real problem (a malformed entry, host bits, ``0.0.0.0/0``) is collected and reported at
once, with where it came from, so that an operator fixing a 100k-line file does not need one
run per mistake. Nothing is applied when any CIDR is wrong.

Input is bounded: a CIDR file must be a regular file of at most :data:`MAX_FILE_BYTES`, at
most ``max_cidrs`` entries are read in all, and an error quotes a file's entry only when it
is short and made of characters a CIDR can hold (a symlink to a secret must not print it).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sdnsup.errors import ConfigError

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network
IPv6Network = ipaddress.IPv6Network
Network = IPv4Network | IPv6Network

# Reporting thousands of lines helps nobody; the first few show the pattern.
MAX_REPORTED_PROBLEMS = 20
# The default limit on entries read: ten times the largest list we benchmark (100k), and
# about 400 MB of memory while parsing; an endless or wrong file stops here, not in MemoryError.
MAX_CIDRS = 1_000_000
# 1M IPv6 CIDRs with a comment each fit in well under this.
MAX_FILE_BYTES = 128 * 1024 * 1024
# What an error may quote from a file: CIDR characters only, no longer than the longest CIDR
# spelling (IPv6 with a zone, ~60), and with a '.', ':' or '/' in it. A hex secret (a token
# file named by mistake) has none of those, so it is described, never shown.
_QUOTABLE = re.compile(r"(?=.*[./:])[0-9A-Fa-f.:/%]{1,64}")


@dataclass(frozen=True, slots=True)
class CidrReport:
    """What parsing found: entries read, and what merging did to them."""

    read: int = 0  # entries read (comments and blank lines are not entries)
    duplicates: int = 0  # entries equal to an earlier one
    merged: int = 0  # other entries folded into a wider prefix (nested or adjacent)
    steered: int = 0  # prefixes left, both families

    def __str__(self) -> str:
        if not self.duplicates and not self.merged:
            return f"{self.read} CIDRs read, all steered as given"
        return (
            f"{self.read} CIDRs read: {self.duplicates} duplicates, {self.merged} merged into "
            f"wider or adjacent prefixes; {self.steered} prefixes steered"
        )

    def as_dict(self) -> dict[str, int]:
        return {
            "read": self.read,
            "duplicates": self.duplicates,
            "merged": self.merged,
            "steered": self.steered,
        }


@dataclass(frozen=True, slots=True)
class CidrSet:
    """The validated destinations, one frozenset per family, and how they were read.

    ``keys4``/``keys6``: the same CIDRs as sorted integer keys (see :func:`plain_ipv4`), a
    few bytes each, kept so that a reload can tell what changed without comparing network
    objects (see ``previous`` in :func:`parse_cidrs`).
    """

    v4: frozenset[IPv4Network]
    v6: frozenset[IPv6Network]
    report: CidrReport = field(default_factory=CidrReport, compare=False)
    keys4: array[int] = field(default_factory=lambda: array("Q"), compare=False, repr=False)
    keys6: tuple[int, ...] = field(default=(), compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.v4) + len(self.v6)


def shown_entry(text: str) -> str:
    """A file's entry as an error may show it: only what could be (a typo of) a CIDR."""
    if _QUOTABLE.fullmatch(text):
        return repr(text)
    return f"an entry of {len(text)} characters (not shown: it holds characters no CIDR has)"


def read_cidr_file(path: Path, *, max_bytes: int = MAX_FILE_BYTES) -> str:
    """The text of a CIDR file: a regular file of at most ``max_bytes``.

    Opened non-blocking, so a FIFO is refused instead of waiting for a writer forever; a
    device (``/dev/zero``), a directory or a socket is refused before anything is read.

    Raises:
        ConfigError: not readable, not a regular file, too large, not UTF-8.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot read CIDR file {path}: {exc.strerror}") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ConfigError(
            f"CIDR file {path} is not a regular file; write the CIDRs to a file and pass -r @FILE"
        )
    with os.fdopen(fd, "rb") as f:
        # st_size may lie for a file that grows while read: read one byte more than allowed.
        data = f.read(max_bytes + 1) if st.st_size <= max_bytes else b""
        if st.st_size > max_bytes or len(data) > max_bytes:
            raise ConfigError(
                f"CIDR file {path} is larger than {max_bytes // (1024 * 1024)} MiB; "
                "is it really a CIDR list?"
            )
    try:
        # utf-8-sig: a byte order mark (Windows editors) is not part of line 1
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"CIDR file {path} is not UTF-8 text (byte {exc.start} is not): is it really "
            "a CIDR list?"
        ) from exc


# While parsing, a CIDR is one int, its key: the address shifted left by 8 bits, or'd with the
# prefix length. Keys hash and compare in C, and sort by (address, prefix length): the order
# merging and the overlap check need. Network objects are made once, for what is steered.
_LEN_BITS = 8
_LEN_MASK = (1 << _LEN_BITS) - 1
_BITS = {4: 32, 6: 128}


def _ipv4_network_maker() -> Callable[[int, int], IPv4Network]:
    """A function making ``IPv4Network((address, prefixlen))`` twice as fast, for /0-/30.

    The constructor re-splits and re-checks what the parser has already checked, and that is
    a third of parsing 100k CIDRs. This sets the three attributes the constructor sets
    (``network_address``, ``netmask``, ``_prefixlen``; it adds ``hosts`` at /31 and /32, left
    to the constructor). Those are private to :mod:`ipaddress`, so the result is compared
    with the constructor's at import, and the constructor is used if they ever differ.
    """
    make_netmask = IPv4Network._make_netmask  # type: ignore[attr-defined]
    new = object.__new__

    def fast(address: int, prefixlen: int) -> IPv4Network:
        if prefixlen > 30:
            return IPv4Network((address, prefixlen))
        net = new(IPv4Network)
        addr = new(IPv4Address)
        addr._ip = address  # type: ignore[attr-defined]
        net.network_address = addr
        net.netmask, net._prefixlen = make_netmask(prefixlen)  # type: ignore[attr-defined]
        return net

    def slow(address: int, prefixlen: int) -> IPv4Network:
        return IPv4Network((address, prefixlen))

    samples = ((0x0A000000, 8), (0xC0A80100, 24), (0, 1), (0x0B0000A0, 28), (0x0B0000A0, 30))
    for address, prefixlen in samples:
        try:
            made, real = fast(address, prefixlen), slow(address, prefixlen)
            same = vars(made) == vars(real) and hash(made) == hash(real) and str(made) == str(real)
        except Exception:  # any change inside ipaddress: use the constructor
            same = False
        if not same:
            return slow
    return fast


_ipv4_network = _ipv4_network_maker()


def _key(net: Network) -> int:
    return int(net.network_address) << _LEN_BITS | net.prefixlen


def _network(version: int, key: int) -> Network:
    if version == 4:
        return _ipv4_network(key >> _LEN_BITS, key & _LEN_MASK)
    return IPv6Network((key >> _LEN_BITS, key & _LEN_MASK))


class KnownNetworks:
    """Network objects to hand out again when the kernel's routes and set elements are read
    back, instead of making new ones.

    A read-back of 100k CIDRs compared with the desired state called ``IPv4Network.__eq__``
    400k times (the routes and the set elements, both ways): about 0.5 s of a restart. With
    the desired state's own objects, the comparison finds them by identity, in C. The index
    is built at the first lookup: reading an empty kernel (a first start) costs nothing.
    """

    __slots__ = ("_collections", "_v4", "_v6")

    def __init__(self, *collections: Iterable[Network]) -> None:
        self._collections: tuple[Iterable[Network], ...] | None = collections
        self._v4: dict[int, IPv4Network] = {}
        self._v6: dict[int, IPv6Network] = {}

    def _index(self) -> None:
        for nets in self._collections or ():
            for net in nets:
                if isinstance(net, IPv4Network):
                    self._v4[_key(net)] = net
                else:
                    self._v6[_key(net)] = net
        self._collections = None

    def ipv4(self, address: int, prefixlen: int) -> IPv4Network:
        if self._collections is not None:
            self._index()
        net = self._v4.get(address << _LEN_BITS | prefixlen)
        return _ipv4_network(address, prefixlen) if net is None else net

    def ipv6(self, address: int, prefixlen: int) -> IPv6Network:
        if self._collections is not None:
            self._index()
        net = self._v6.get(address << _LEN_BITS | prefixlen)
        return IPv6Network((address, prefixlen)) if net is None else net


NO_KNOWN_NETWORKS = KnownNetworks()


def plain_ipv4(text: str) -> int | None:
    """The key of ``text`` if it is a plain, valid IPv4 CIDR without host bits
    (``10.0.0.0/8``); None for anything else, which :func:`ipaddress.ip_network` then parses
    and, if wrong, explains.

    Nearly every entry of a real list is such a CIDR: this reads it several times as fast as
    :func:`ipaddress.ip_network` (``inet_pton`` is as strict: four decimal octets, no leading
    zeros), and makes no object but an int.
    """
    addr, slash, length = text.partition("/")
    if not slash or not (0 < len(length) <= 2 and length.isascii() and length.isdigit()):
        return None
    prefixlen = int(length)
    if prefixlen > 32:
        return None
    try:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET, addr), "big")
    except (OSError, ValueError):
        return None
    if value & ((1 << (32 - prefixlen)) - 1):
        return None  # host bits set: the slow path says so, with the CIDR meant
    return value << _LEN_BITS | prefixlen


def _parse(where: str, text: str, typed: bool, problems: list[str]) -> Network | None:
    """Any entry :func:`plain_ipv4` did not take: the network, or None with the reason
    appended to ``problems``."""
    shown = repr(text) if typed else shown_entry(text)
    if "%" in text:
        # ipaddress accepts an IPv6 zone index (fd00::%eth0/64) and keeps it in the
        # network; routes and set elements have none, so it never equals a read-back.
        problems.append(f"{where}: {shown} has a zone index (%...); a CIDR has none")
        return None
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            fixed = ipaddress.ip_network(text, strict=False)
            problems.append(f"{where}: {text} has host bits set (did you mean {fixed}?)")
        else:
            problems.append(f"{where}: {shown} is not a CIDR like 10.10.10.0/24")
        return None
    mapped = net.network_address.ipv4_mapped if isinstance(net, IPv6Network) else None
    if mapped is not None and net.prefixlen >= 96:
        # No packet carries a v4-mapped destination: such a CIDR would never match.
        as_v4 = IPv4Network((mapped, net.prefixlen - 96))
        problems.append(f"{where}: {net} is IPv4-mapped IPv6 (did you mean {as_v4}?)")
        return None
    return net


class _Reader:
    """Reads entries into keys per family, remembering where each was first given.

    A place is an int too: the line number, plus the index of its source (``-r`` or a file)
    above bit 32; only an error message turns it into ``FILE:LINE`` text.
    """

    def __init__(self, *, allow_default: bool, strict: bool, max_cidrs: int) -> None:
        self.allow_default = allow_default
        self.strict = strict
        self.max_cidrs = max_cidrs
        self.problems: list[str] = []
        self.sources: list[str] = []
        self.seen: dict[int, dict[int, int]] = {4: {}, 6: {}}  # version -> key -> place
        self.read = 0
        self.duplicates = 0

    def where(self, place: int) -> str:
        source, line = self.sources[place >> 32], place & 0xFFFFFFFF
        return f"{source}:{line}" if line else source

    def spec(self, spec: str) -> None:
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if part.startswith("@"):
                path = Path(part[1:])
                self.lines(str(path), read_cidr_file(path))
            else:
                self.sources.append("-r")
                self.entry(part, (len(self.sources) - 1) << 32, True, plain_ipv4(part))

    def lines(self, name: str, text: str) -> None:
        self.sources.append(name)
        base = (len(self.sources) - 1) << 32
        v4, read, most = self.seen[4], self.read, self.max_cidrs
        # Lines end at \n, \r\n or \r (as universal newlines); splitlines() would also
        # break at form feeds, NEL or U+2028 inside a comment and shift every line number.
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        for lineno, line in enumerate(lines, start=1):
            if "#" in line:
                line = line.split("#", 1)[0]
            line = line.strip()
            if not line:
                continue
            key = plain_ipv4(line)
            # The common case inline: a new, plain IPv4 CIDR that is not the default route.
            if key is not None and key & _LEN_MASK and key not in v4 and read < most:
                read += 1
                v4[key] = base | lineno
            else:
                self.read = read
                self.entry(line, base | lineno, False, key)
                read = self.read
        self.read = read

    def entry(self, text: str, place: int, typed: bool, key: int | None) -> None:
        """One entry; ``key``: what :func:`plain_ipv4` made of it (the caller has read it)."""
        self.read += 1
        if self.read > self.max_cidrs:
            raise ConfigError(
                f"{self.where(place)}: more than {self.max_cidrs} CIDRs given (the limit, "
                "--max-cidrs); raise it if the list is really that long"
            )
        version = 4
        if key is None:
            net = _parse(self.where(place), text, typed, self.problems)
            if net is None:
                return
            version, key = net.version, _key(net)
        if not key & _LEN_MASK and not self.allow_default:
            self.problems.append(
                f"{self.where(place)}: {_network(version, key)} would steer all traffic "
                "through the AP; pass --allow-default if that is really meant"
            )
            return
        seen = self.seen[version]
        if key in seen:
            self.duplicates += 1
            if self.strict:
                self.problems.append(
                    f"{self.where(place)}: {_network(version, key)} duplicates "
                    f"{self.where(seen[key])}"
                )
            return
        seen[key] = place

    def overlaps(self) -> None:
        """Report every CIDR contained in an earlier-sorted one (O(n log n))."""
        for version, seen in self.seen.items():
            bits = _BITS[version]
            cover, cover_end = -1, -1
            # Sorted by (address, prefix length): a CIDR overlaps an earlier one only if it
            # starts inside the widest earlier one that reaches this far.
            for key in sorted(seen):
                start = key >> _LEN_BITS
                if start <= cover_end:
                    self.problems.append(
                        f"{self.where(seen[key])}: {_network(version, key)} overlaps "
                        f"{_network(version, cover)} ({self.where(seen[cover])}); keep only one"
                    )
                    continue
                cover, cover_end = key, start + (1 << (bits - (key & _LEN_MASK))) - 1


def parse_cidrs(
    specs: Iterable[str],
    *,
    allow_default: bool = False,
    strict: bool = False,
    max_cidrs: int = MAX_CIDRS,
    previous: CidrSet | None = None,
) -> CidrSet:
    """Parse one or more ``-r`` values into a :class:`CidrSet`.

    Args:
        specs: each a comma-separated list of CIDRs, where an item ``@FILE`` names a file with
            one CIDR per line (``#`` starts a comment).
        allow_default: accept ``0.0.0.0/0`` / ``::/0``. Off by default because steering the
            whole Internet through an AP, this host's own management traffic included, is
            rarely what an operator meant.
        strict: duplicates and nested prefixes are errors instead of being merged.
        max_cidrs: the most entries read, in all specs together.
        previous: the running set (a reload): the result holds its network objects wherever
            the CIDR is unchanged, and is that very set if nothing changed. Everything
            downstream (the diff, the reload's log line) then compares 100k CIDRs by
            identity, in C, instead of calling ``IPv4Network.__eq__`` on each.

    Raises:
        ConfigError: listing every malformed CIDR, CIDR with host bits set, default route
            (and with ``strict``, duplicate and overlap), up to :data:`MAX_REPORTED_PROBLEMS`;
            or naming the limit an input exceeds.
    """
    reader = _Reader(allow_default=allow_default, strict=strict, max_cidrs=max_cidrs)
    for spec in specs:
        reader.spec(spec)
    if strict:
        reader.overlaps()
    problems = reader.problems
    if problems:
        head = problems[:MAX_REPORTED_PROBLEMS]
        more = len(problems) - len(head)
        tail = f"\n  ... and {more} more" if more else ""
        raise ConfigError("invalid CIDRs:\n  " + "\n  ".join(head) + tail)
    given = len(reader.seen[4]) + len(reader.seen[6])
    if not given:
        raise ConfigError("no CIDRs given: pass -r 10.10.10.0/24[,...] or -r @FILE")
    keys = {
        v: sorted(seen) if strict else _union_keys(seen, _BITS[v])
        for v, seen in reader.seen.items()
    }
    keys4, keys6 = array("Q", keys[4]), tuple(keys[6])
    v4: frozenset[IPv4Network]
    v6: frozenset[IPv6Network]
    if previous is not None and (len(previous.keys4), len(previous.keys6)) == (
        len(previous.v4),
        len(previous.v6),
    ):
        v4 = _reuse(previous.v4, previous.keys4, keys4, 4)  # type: ignore[assignment]
        v6 = _reuse(previous.v6, previous.keys6, keys6, 6)  # type: ignore[assignment]
    else:  # a set made elsewhere (no keys: tests, plan) is not reused
        v4 = frozenset(_ipv4_network(k >> _LEN_BITS, k & _LEN_MASK) for k in keys4)
        v6 = frozenset(IPv6Network((k >> _LEN_BITS, k & _LEN_MASK)) for k in keys6)
    steered = len(v4) + len(v6)
    report = CidrReport(reader.read, reader.duplicates, given - steered, steered)
    return CidrSet(v4=v4, v6=v6, report=report, keys4=keys4, keys6=keys6)


def _reuse(
    old: frozenset[Network], old_keys: Sequence[int], keys: Sequence[int], version: int
) -> frozenset[Network]:
    """The networks of ``keys``: ``old`` itself if they are ``old_keys``, else ``old`` with
    the difference applied (set operations on ints and on a few new networks)."""
    if old_keys == keys:
        return old
    before, after = set(old_keys), set(keys)
    gone = {_network(version, k) for k in before - after}
    added = {_network(version, k) for k in after - before}
    return (old - gone) | added


def _union_keys(keys: Iterable[int], bits: int) -> list[int]:
    """The keys of the fewest CIDRs covering exactly the addresses of ``keys``."""
    out: list[int] = []
    lo = hi = -2
    alone = -1  # the key of the current range if it is one CIDR alone
    for key in sorted(keys):
        start = key >> _LEN_BITS
        end = start + (1 << (bits - (key & _LEN_MASK))) - 1
        if start <= hi + 1:  # inside, overlapping or adjacent: the range grows
            alone = -1
            if end > hi:
                hi = end
            continue
        if hi >= 0:
            out.extend(_block_keys(lo, hi, bits) if alone < 0 else (alone,))
        lo, hi, alone = start, end, key
    if hi >= 0:
        out.extend(_block_keys(lo, hi, bits) if alone < 0 else (alone,))
    return out


def _block_keys(lo: int, hi: int, bits: int) -> list[int]:
    """The range ``lo``..``hi`` as the keys of the fewest aligned CIDR blocks, lowest first."""
    blocks: list[int] = []
    while lo <= hi:
        # The largest block aligned at lo that does not pass hi.
        size = lo & -lo if lo else 1 << bits
        while size > hi - lo + 1:
            size >>= 1
        blocks.append(lo << _LEN_BITS | (bits - size.bit_length() + 1))
        lo += size
    return blocks
