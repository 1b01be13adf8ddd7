"""Hypothesis strategies for networks, shared by the property tests of CIDR parsing, the
rendered state and the nftables element codec."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from hypothesis import settings
from hypothesis import strategies as st

IPv4Network = ipaddress.IPv4Network
IPv6Network = ipaddress.IPv6Network
Net = IPv4Network | IPv6Network


def prop_settings(max_examples: int) -> settings:
    """The shared profile (see the root conftest.py) with this file's example count."""
    return settings(max_examples=max_examples)


# --- networks, biased towards the interesting ones ---------------------------------------------

# Near the bottom and the top of each space (a set element reaching the top has no end key),
# and in two busy private ranges; small offsets from a shared base make nested, duplicate and
# adjacent networks frequent, which is what the overlap checks and the interval encoding are
# about.
V4_BASES = (0x00000000, 0x0A000000, 0xC0A80000, 0xFFFF0000)
V6_BASES = (
    0,
    int(IPv6Network("fd00::/8").network_address),
    int(IPv6Network("2001:db8::/32").network_address),
    int(IPv6Network("::ffff:0:0/96").network_address),  # IPv4-mapped
    int(IPv6Network("64:ff9b::/96").network_address),  # NAT64
    (1 << 128) - (1 << 64),
)
_OFFSET = (1 << 16) - 1


def _near(bases: Sequence[int], bits: int) -> st.SearchStrategy[int]:
    top = (1 << bits) - 1
    return st.one_of(
        st.integers(0, top),
        st.sampled_from(bases).flatmap(lambda b: st.integers(b, min(b + _OFFSET, top))),
    )


v4_nets: st.SearchStrategy[IPv4Network] = st.builds(
    lambda a, p: IPv4Network((a, p), strict=False), _near(V4_BASES, 32), st.integers(0, 32)
)
v6_nets: st.SearchStrategy[IPv6Network] = st.builds(
    lambda a, p: IPv6Network((a, p), strict=False), _near(V6_BASES, 128), st.integers(0, 128)
).filter(
    # IPv4-mapped CIDRs are refused on purpose (no packet carries such a destination):
    # tests/test_cidrs.py covers them
    lambda n: n.prefixlen < 96 or n.network_address.ipv4_mapped is None
)
nets: st.SearchStrategy[Net] = st.one_of(v4_nets, v6_nets)


def _halves(net: Net) -> list[Net]:
    """The two halves of ``net``: adjacent networks sharing a boundary (an interval set stores
    the first one's end and the second one's start under the same key)."""
    return [net] if net.prefixlen == net.max_prefixlen else list(net.subnets())


# Lists where adjacent and nested networks are common.
net_lists = st.lists(st.one_of(nets.map(lambda n: [n]), nets.map(_halves)), max_size=10).map(
    lambda groups: [n for g in groups for n in g]
)


def disjoint(candidates: Iterable[Net]) -> list[Net]:
    """The candidates, in order, minus any that overlaps one kept before (what the CLI lets
    through: no duplicates, no CIDR inside another)."""
    kept: list[Net] = []
    for n in candidates:
        if not any(n.version == k.version and n.overlaps(k) for k in kept):  # type: ignore[arg-type]
            kept.append(n)
    return kept
