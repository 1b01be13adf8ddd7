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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from sdnsup.errors import ConfigError

IPv4Network = ipaddress.IPv4Network
IPv6Network = ipaddress.IPv6Network
Network = IPv4Network | IPv6Network
N = TypeVar("N", IPv4Network, IPv6Network)

# Reporting thousands of lines helps nobody; the first few show the pattern.
MAX_REPORTED_PROBLEMS = 20
# The default limit on entries read: ten times the largest list we benchmark (100k), and
# about 1 GB of memory while parsing; an endless or wrong file stops here, not in MemoryError.
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
    """The validated destinations, one frozenset per family, and how they were read."""

    v4: frozenset[IPv4Network]
    v6: frozenset[IPv6Network]
    report: CidrReport = field(default_factory=CidrReport, compare=False)

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


def _entries(spec: str) -> Iterator[tuple[str, str, bool]]:
    """Yield ``(where, text, quotable)`` for each CIDR in ``spec`` (a comma list or @FILE);
    ``quotable``: the text was typed on the command line, not read from a file."""
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("@"):
            path = Path(part[1:])
            text = read_cidr_file(path)
            # Lines end at \n, \r\n or \r (as universal newlines); splitlines() would also
            # break at form feeds, NEL or U+2028 inside a comment and shift every line number.
            lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
            for lineno, line in enumerate(lines, start=1):
                line = line.split("#", 1)[0].strip()
                if line:
                    yield f"{path}:{lineno}", line, False
        else:
            yield "-r", part, True


def plain_ipv4(text: str) -> IPv4Network | None:
    """``text`` as a network if it is a plain, valid IPv4 CIDR without host bits
    (``10.0.0.0/8``); None for anything else, which :func:`ipaddress.ip_network` then parses
    and, if wrong, explains.

    Nearly every entry of a real list is such a CIDR: this reads it about twice as fast as
    :func:`ipaddress.ip_network` (``inet_pton`` is as strict: four decimal octets, no leading
    zeros), which is a fifth of the time of a 100k-line file.
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
    return IPv4Network((value, prefixlen))


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


def parse_cidrs(
    specs: Iterable[str],
    *,
    allow_default: bool = False,
    strict: bool = False,
    max_cidrs: int = MAX_CIDRS,
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

    Raises:
        ConfigError: listing every malformed CIDR, CIDR with host bits set, default route
            (and with ``strict``, duplicate and overlap), up to :data:`MAX_REPORTED_PROBLEMS`;
            or naming the limit an input exceeds.
    """
    problems: list[str] = []
    seen: dict[Network, str] = {}
    read = duplicates = 0
    for where, text, typed in (e for spec in specs for e in _entries(spec)):
        read += 1
        if read > max_cidrs:
            raise ConfigError(
                f"{where}: more than {max_cidrs} CIDRs given (the limit, --max-cidrs); raise "
                "it if the list is really that long"
            )
        net: Network | None = plain_ipv4(text)
        if net is None:
            net = _parse(where, text, typed, problems)
        if net is None:
            continue
        if net.prefixlen == 0 and not allow_default:
            problems.append(
                f"{where}: {net} would steer all traffic through the AP; "
                "pass --allow-default if that is really meant"
            )
            continue
        if net in seen:
            duplicates += 1
            if strict:
                problems.append(f"{where}: {net} duplicates {seen[net]}")
            continue
        seen[net] = where
    if strict:
        problems.extend(_overlaps(seen))
    if problems:
        head = problems[:MAX_REPORTED_PROBLEMS]
        more = len(problems) - len(head)
        tail = f"\n  ... and {more} more" if more else ""
        raise ConfigError("invalid CIDRs:\n  " + "\n  ".join(head) + tail)
    if not seen:
        raise ConfigError("no CIDRs given: pass -r 10.10.10.0/24[,...] or -r @FILE")
    v4 = frozenset(n for n in seen if isinstance(n, IPv4Network))
    v6 = frozenset(n for n in seen if isinstance(n, IPv6Network))
    if not strict:
        v4 = frozenset(union(v4, IPv4Network, 32))
        v6 = frozenset(union(v6, IPv6Network, 128))
    steered = len(v4) + len(v6)
    report = CidrReport(read, duplicates, len(seen) - steered, steered)
    return CidrSet(v4=v4, v6=v6, report=report)


def union(nets: Iterable[N], cls: type[N], bits: int) -> list[N]:
    """The fewest CIDRs covering exactly the addresses of ``nets`` (one family, ``bits``
    long): what :func:`ipaddress.collapse_addresses` returns, about ten times faster (it
    compares network objects; this sorts integers), which matters at 1M CIDRs.
    A network that merges with nothing is returned as the same object."""
    spans = sorted(
        ((int(n.network_address), (1 << (bits - n.prefixlen)) - 1, n) for n in nets),
        key=lambda span: (span[0], -span[1]),
    )
    out: list[N] = []
    lo = hi = -2
    alone: N | None = None  # the one network of the current range, if it is only one
    for start, size, net in spans:
        end = start + size
        if start <= hi + 1:  # inside, overlapping or adjacent: the range grows
            alone = None
            hi = max(hi, end)
            continue
        if hi >= 0:
            out.extend(_blocks(lo, hi, cls, bits) if alone is None else (alone,))
        lo, hi, alone = start, end, net
    if hi >= 0:
        out.extend(_blocks(lo, hi, cls, bits) if alone is None else (alone,))
    return out


def _blocks(lo: int, hi: int, cls: type[N], bits: int) -> list[N]:
    """The range ``lo``..``hi`` as the fewest aligned CIDR blocks, lowest first."""
    blocks: list[N] = []
    while lo <= hi:
        # The largest block aligned at lo that does not pass hi.
        size = lo & -lo if lo else 1 << bits
        while size > hi - lo + 1:
            size >>= 1
        blocks.append(cls((lo, bits - size.bit_length() + 1)))
        lo += size
    return blocks


def _overlaps(seen: dict[Network, str]) -> list[str]:
    """Report every CIDR contained in an earlier-sorted one (O(n log n))."""
    problems: list[str] = []
    for version in (4, 6):
        nets = sorted(n for n in seen if n.version == version)
        cover: Network | None = None
        for net in nets:
            # Sorted by (address, prefixlen): a net overlaps an earlier one only if it lies
            # inside the widest earlier net that reaches this far.
            if cover is not None and net.subnet_of(cover):  # type: ignore[arg-type]
                problems.append(
                    f"{seen[net]}: {net} overlaps {cover} ({seen[cover]}); keep only one"
                )
                continue
            cover = net
    return problems
