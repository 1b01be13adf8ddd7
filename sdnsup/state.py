"""The desired state: one frozen value that says everything sdnsup wants in the kernel.

Equality is structural, so the applier can tell in O(1) that nothing changed. The empty state
(:data:`EMPTY`) means "own nothing": tearing down is applying it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from sdnsup.errors import ConfigError

IPv4Network = ipaddress.IPv4Network
IPv6Network = ipaddress.IPv6Network
IPv4Address = ipaddress.IPv4Address
IPv6Address = ipaddress.IPv6Address

NoApPolicy = Literal["fallback", "blackhole"]

# Defaults, chosen to stay clear of the marks, tables and priorities other networking software
# installs on the same hosts (README "Coexisting with other mark users"; each figure read from
# the tool's source):
#   kube-proxy 0x4000 (and the legacy drop bit 0x8000); Calico 0xffff0000; Tailscale 0xff0000;
#   Cilium 0x0f00 and identities in 0xffff0000 (its optional modes also use 0x00ff for the
#   ClusterMesh id, 0x1000 for WireGuard, 0xf000 for the IPsec key, 0x80 on AWS ENI); Istio
#   1337/1338 (0x539/0x53a, inside pod namespaces); wg-quick 51820 (0xca6c) as a whole value.
# Bits 7, 12 and 13 are used by none of them in their default modes, bit 1 only by Istio's
# in-pod 1338. sdnsup takes bit 13, the one only optional modes touch (Cilium IPsec, a
# kube-router DSR hash), as the "steered" flag, and bits 1, 7 and 12 to hold the AP slot a
# connection is pinned to.
DEFAULT_MARK = 0x2000
DEFAULT_MASK = 0x3082
#   tables: Tailscale 52, wg-quick 51820, the seed 100, main 254, local 255. Slot n's table is
#   TABLE + n (7301..7307 by default).
DEFAULT_TABLE = 7300
#   priority: below main (32766) so marked traffic is steered, after Tailscale (5210-5270)
#   so an existing Tailscale setup keeps precedence for its own routes. A draining slot's two
#   rules sit just before it (PRIORITY - 2 and - 1).
DEFAULT_PRIORITY = 7300
NFT_TABLE = "sdnsup"
# Kernel nexthop object ids are global to the network namespace; FRR allocates from the low
# range, so sdnsup takes ids high up: one per family for the active AP (the CIDR routes use
# it), and one per family and AP slot (slot n: the same id with n in its second byte), which
# is also how a restarted sdnsup learns which AP each slot stands for. The ids are BASE | 4
# (IPv4) and BASE | 6 (IPv6); BASE is 0x5D5D0000 unless another tool holds one of its ids:
# a start then takes the first of NHID_BASES whose ids are all free (and a restart the one its
# predecessor's nexthops carry).
NHID_BASE = 0x5D5D0000
NHID_BASES = tuple(NHID_BASE + (k << 16) for k in range(16))
NHID_V4 = NHID_BASE | 4
NHID_V6 = NHID_BASE | 6
# The nexthop ids of path probes (sdnsup.paths) through another AP than the active one: the
# slot byte 0xff, beyond any slot.
PROBE_SLOT = 0xFF
# Slots: at most this many, whatever the mask allows. Each is a routing table and a nexthop
# per family, and an AP needs one only while connections are pinned to it: a handful of APs
# take turns at most, and a slot is freed when its last connection ends.
MAX_SLOTS = 15
# Fewer than two slots could not keep an old AP's connections while a new AP takes new ones.
MIN_SLOTS = 2
# Policy rule priorities sdnsup uses below --priority.
PRIORITY_SPAN = 2


def deposit(value: int, mask: int) -> int:
    """Spread the low bits of ``value`` over the set bits of ``mask``, lowest first (pdep).

    The slot field need not be contiguous: ``fwmark VALUE/MASK`` and nftables' ``&``/``==``
    match any mask, and the free bits of a host's mark are rarely adjacent.
    """
    out, bit = 0, 1
    while mask:
        low = mask & -mask
        if value & bit:
            out |= low
        mask &= mask - 1
        bit <<= 1
    return out


def extract(mark: int, mask: int) -> int:
    """The inverse of :func:`deposit`: the number held in ``mask``'s bits of ``mark``."""
    out, bit = 0, 1
    while mask:
        low = mask & -mask
        if mark & low:
            out |= bit
        mask &= mask - 1
        bit <<= 1
    return out


def slot_nhid(version: int, slot: int, base: int = NHID_BASE) -> int:
    """Nexthop id of AP slot ``slot`` (0: the active AP's, the one the CIDR routes use)."""
    return base | slot << 8 | (4 if version == 4 else 6)


def slot_of_nhid(nhid: int) -> tuple[int, int] | None:
    """``(version, slot)`` of an id sdnsup's nexthops take (any of NHID_BASES), else None."""
    if nhid & ~0xFFFF not in NHID_BASES or nhid & 0xFF not in (4, 6):
        return None
    return (4 if nhid & 0xFF == 4 else 6), (nhid >> 8) & 0xFF


def nhid_base(nhid: int) -> int:
    """The base (one of NHID_BASES) of one of sdnsup's nexthop ids."""
    return nhid & ~0xFFFF


@dataclass(frozen=True, slots=True)
class Settings:
    """Where sdnsup keeps its state in the kernel; fixed for the life of a process.

    The conntrack and packet marks: every connection sdnsup steers carries ``mark`` (the
    flag); the other bits of ``mask`` (the slot field) hold the number of the AP slot it is
    pinned to, 0 while its first packet is being routed. Slot n routes through table
    ``table + n``.
    """

    mark: int = DEFAULT_MARK
    mask: int = DEFAULT_MASK
    table: int = DEFAULT_TABLE
    priority: int = DEFAULT_PRIORITY
    nft_table: str = NFT_TABLE
    # the base of sdnsup's nexthop ids (see NHID_BASES): chosen at start, never an option
    nhid_base: int = NHID_BASE

    def __post_init__(self) -> None:
        if not 0 < self.mask <= 0xFFFFFFFF:
            raise ConfigError(f"--mask {self.mask:#x} must be a non-zero 32-bit value")
        if not 0 < self.mark <= 0xFFFFFFFF or self.mark & ~self.mask:
            raise ConfigError(
                f"--mark {self.mark:#x} must be non-zero and lie inside --mask {self.mask:#x}"
            )
        field_bits = (self.mask & ~self.mark).bit_count()
        if (1 << field_bits) - 1 < MIN_SLOTS:
            raise ConfigError(
                f"--mask {self.mask:#x} leaves {field_bits} bit(s) beside --mark {self.mark:#x} "
                f"for AP slots; pinning connections to their AP needs at least 2 (3 slots), "
                f"e.g. --mark {DEFAULT_MARK:#x} --mask {DEFAULT_MASK:#x}, or the mark bit plus "
                "2-4 bits no other tool on this host uses"
            )
        if field_bits > MAX_SLOTS.bit_length():
            # Every steered connection's mark is rewritten under the whole mask: bits no slot
            # number needs would be cleared in other tools' marks for nothing.
            raise ConfigError(
                f"--mask {self.mask:#x} has {field_bits} bits beside --mark {self.mark:#x}; "
                f"sdnsup uses at most {MAX_SLOTS.bit_length()} ({MAX_SLOTS} slots) and would "
                "clear the others in every steered connection's mark, taking them from other "
                f"tools: give the mark bit plus 2-{MAX_SLOTS.bit_length()} free bits, e.g. "
                f"--mark {DEFAULT_MARK:#x} --mask {DEFAULT_MASK:#x}"
            )
        # 253-255 are the kernel's default/main/local tables; 0 means "unspecified".
        tables = range(self.table, self.probe_table + 1)
        if not 0 < self.table or tables[-1] >= 2**32 or {253, 254, 255} & set(tables):
            raise ConfigError(
                f"--table {self.table} is reserved or invalid: sdnsup uses tables {tables[0]}-"
                f"{tables[-1]} (one per AP slot, one for path probes); use "
                f"1-{252 - len(tables) + 1} or 256-{2**32 - len(tables)}"
            )
        # 0 is the local table's rule and 32766/32767 main/default: sdnsup must sit between.
        if not PRIORITY_SPAN < self.priority < 32766:
            raise ConfigError(
                f"--priority {self.priority} must be between {PRIORITY_SPAN + 1} and 32765 "
                f"(a draining AP's rules use the {PRIORITY_SPAN} priorities below it)"
            )

    @property
    def slot_field(self) -> int:
        """The bits of the mask that hold the slot number."""
        return self.mask & ~self.mark

    @property
    def slots(self) -> int:
        """How many AP slots the mark field holds (numbers 1..slots)."""
        return min(MAX_SLOTS, (1 << self.slot_field.bit_count()) - 1)

    def slot_mark(self, slot: int) -> int:
        """The mark of a connection pinned to ``slot`` (0: steered, not yet pinned)."""
        return self.mark | deposit(slot, self.slot_field)

    def slot_table(self, slot: int) -> int:
        return self.table + slot

    def nhid(self, version: int, slot: int = 0) -> int:
        """The id of slot ``slot``'s nexthop (0: the active AP's) for IP ``version``."""
        return slot_nhid(version, slot, self.nhid_base)

    def nhids(self) -> frozenset[int]:
        """Every nexthop id sdnsup may write with these settings."""
        slots = (*range(self.slots + 1), PROBE_SLOT)
        return frozenset(self.nhid(v, n) for v in (4, 6) for n in slots)

    @property
    def probe_mark(self) -> int:
        """The mark of sdnsup's own path probes through an AP that is not the active one:
        slot bits without the steered flag, a value no steered connection carries."""
        return deposit(1, self.slot_field)

    @property
    def bypass_mark(self) -> int:
        """The mark of sdnsup's path probes that take the normal route (no AP at all)."""
        return deposit(2, self.slot_field)

    @property
    def probe_table(self) -> int:
        """The table routing path probes: host routes to their targets via the AP probed."""
        return self.table + self.slots + 1


@dataclass(frozen=True, slots=True, order=True)
class Slot:
    """An AP slot in use: connections pinned to it leave through ``addr4``/``addr6``.

    ``draining``: the AP is alive but no longer takes new connections; policy rules send the
    packets of its pinned connections to its own table. The active AP's slot needs no rule:
    its connections take the CIDR routes, whose nexthop is the active AP.
    """

    number: int
    addr4: IPv4Address | None = None
    addr6: IPv6Address | None = None
    draining: bool = False


@dataclass(frozen=True, slots=True)
class DesiredState:
    """Everything sdnsup wants in the kernel.

    ``ap4``/``ap6`` None means no usable AP for that family; ``no_ap`` says what then happens
    to traffic for that family's CIDRs: ``fallback`` removes the policy rule so it takes the
    normal route, ``blackhole`` keeps the rule with a blackhole nexthop (fail closed).
    ``exempt4``/``exempt6`` (CC and AP addresses) are never steered, so sdnsup's own control
    traffic cannot loop into the overlay. ``slots``: see :class:`Slot`; a connection is pinned
    to the slot whose address its first packet was routed to.
    """

    cidrs4: frozenset[IPv4Network] = frozenset()
    cidrs6: frozenset[IPv6Network] = frozenset()
    ap4: IPv4Address | None = None
    ap6: IPv6Address | None = None
    exempt4: frozenset[IPv4Network] = frozenset()
    exempt6: frozenset[IPv6Network] = frozenset()
    no_ap: NoApPolicy = "fallback"
    settings: Settings = field(default_factory=Settings)
    # AP slots in use, by number; the active AP's slot (if it has one) among them.
    slots: tuple[Slot, ...] = ()
    # Path probes (sdnsup.paths): packets carrying the probe mark to one of these targets
    # leave through probe_via4/6 (another AP than the active one), to compare the two paths.
    probe_via4: IPv4Address | None = None
    probe_via6: IPv6Address | None = None
    probe_targets: frozenset[IPv4Address | IPv6Address] = frozenset()

    @property
    def empty(self) -> bool:
        return not self.cidrs4 and not self.cidrs6


EMPTY = DesiredState()
