"""Parse and validate the user's CIDR list (``-r 10.10.10.0/24,fd00::/64`` or ``-r @FILE``).

Every problem is collected and reported at once, with where it came from, so that an operator
fixing a 100k-line file does not need one run per mistake. Nothing is applied when any CIDR is
wrong.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sdnsup.errors import ConfigError

IPv4Network = ipaddress.IPv4Network
IPv6Network = ipaddress.IPv6Network

# Reporting thousands of lines helps nobody; the first few show the pattern.
MAX_REPORTED_PROBLEMS = 20


@dataclass(frozen=True, slots=True)
class CidrSet:
    """The validated destinations, one frozenset per family."""

    v4: frozenset[IPv4Network]
    v6: frozenset[IPv6Network]

    def __len__(self) -> int:
        return len(self.v4) + len(self.v6)


def _entries(spec: str) -> Iterable[tuple[str, str]]:
    """Yield ``(where, text)`` for each CIDR in ``spec`` (a comma list or ``@FILE``)."""
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("@"):
            path = Path(part[1:])
            try:
                # utf-8-sig: a byte order mark (Windows editors) is not part of line 1
                text = path.read_text(encoding="utf-8-sig")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read CIDR file {path}: {exc}") from exc
            # read_text() already turned \r\n and \r into \n; splitlines() would also break
            # at form feeds, NEL or U+2028 inside a comment and shift every line number.
            for lineno, line in enumerate(text.split("\n"), start=1):
                line = line.split("#", 1)[0].strip()
                if line:
                    yield f"{path}:{lineno}", line
        else:
            yield "-r", part


def parse_cidrs(specs: Iterable[str], *, allow_default: bool = False) -> CidrSet:
    """Parse one or more ``-r`` values into a :class:`CidrSet`.

    Args:
        specs: each a comma-separated list of CIDRs, where an item ``@FILE`` names a file with
            one CIDR per line (``#`` starts a comment).
        allow_default: accept ``0.0.0.0/0`` / ``::/0``. Off by default because steering the
            whole Internet through an AP, this host's own management traffic included, is
            rarely what an operator meant.

    Raises:
        ConfigError: listing every malformed CIDR, CIDR with host bits set, default route,
            duplicate and overlap (up to :data:`MAX_REPORTED_PROBLEMS`).
    """
    problems: list[str] = []
    seen: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, str] = {}
    for where, text in (e for spec in specs for e in _entries(spec)):
        if "%" in text:
            # ipaddress accepts an IPv6 zone index (fd00::%eth0/64) and keeps it in the
            # network; routes and set elements have none, so it never equals a read-back.
            problems.append(f"{where}: {text!r} has a zone index (%...); a CIDR has none")
            continue
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            if "has host bits set" in str(exc):
                fixed = ipaddress.ip_network(text, strict=False)
                problems.append(f"{where}: {text} has host bits set (did you mean {fixed}?)")
            else:
                problems.append(f"{where}: {text!r} is not a CIDR like 10.10.10.0/24")
            continue
        mapped = net.network_address.ipv4_mapped if isinstance(net, IPv6Network) else None
        if mapped is not None and net.prefixlen >= 96:
            # No packet carries a v4-mapped destination: such a CIDR would never match.
            as_v4 = IPv4Network((mapped, net.prefixlen - 96))
            problems.append(f"{where}: {net} is IPv4-mapped IPv6 (did you mean {as_v4}?)")
            continue
        if net.prefixlen == 0 and not allow_default:
            problems.append(
                f"{where}: {net} would steer all traffic through the AP; "
                "pass --allow-default if that is really meant"
            )
            continue
        if net in seen:
            problems.append(f"{where}: {net} duplicates {seen[net]}")
            continue
        seen[net] = where
    problems.extend(_overlaps(seen))
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        more = len(problems) - len(shown)
        tail = f"\n  ... and {more} more" if more else ""
        raise ConfigError("invalid CIDRs:\n  " + "\n  ".join(shown) + tail)
    if not seen:
        raise ConfigError("no CIDRs given: pass -r 10.10.10.0/24[,...] or -r @FILE")
    v4 = frozenset(n for n in seen if isinstance(n, IPv4Network))
    v6 = frozenset(n for n in seen if isinstance(n, IPv6Network))
    return CidrSet(v4=v4, v6=v6)


def _overlaps(
    seen: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, str],
) -> list[str]:
    """Report every CIDR contained in an earlier-sorted one (O(n log n))."""
    problems: list[str] = []
    for version in (4, 6):
        nets = sorted(n for n in seen if n.version == version)
        cover: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
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
