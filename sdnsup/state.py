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
# installs on the same hosts (see README "Coexisting with other mark users"):
#   marks: kube-proxy 0x4000/0x8000, Cilium 0x0f00, Istio 0x539, wg-quick 0xca6c (51820),
#          Tailscale 0xff0000, Calico 0xffff0000. Bit 12 (0x1000) is used by none of them.
DEFAULT_MARK = 0x1000
DEFAULT_MASK = 0x1000
#   tables: Tailscale 52, wg-quick 51820, the seed 100, main 254, local 255.
DEFAULT_TABLE = 7300
#   priority: below main (32766) so marked traffic is steered, after Tailscale (5210-5270)
#   so an existing Tailscale setup keeps precedence for its own routes.
DEFAULT_PRIORITY = 7300
NFT_TABLE = "sdnsup"
# Kernel nexthop object ids are global to the network namespace; FRR allocates from the low
# range, so sdnsup takes two fixed ids high up (one per family).
NHID_V4 = 0x5D5D0004
NHID_V6 = 0x5D5D0006


@dataclass(frozen=True, slots=True)
class Settings:
    """Where sdnsup keeps its state in the kernel; fixed for the life of a process."""

    mark: int = DEFAULT_MARK
    mask: int = DEFAULT_MASK
    table: int = DEFAULT_TABLE
    priority: int = DEFAULT_PRIORITY
    nft_table: str = NFT_TABLE

    def __post_init__(self) -> None:
        if not 0 < self.mask <= 0xFFFFFFFF:
            raise ConfigError(f"--mask {self.mask:#x} must be a non-zero 32-bit value")
        if not 0 < self.mark <= 0xFFFFFFFF or self.mark & ~self.mask:
            raise ConfigError(
                f"--mark {self.mark:#x} must be non-zero and lie inside --mask {self.mask:#x}"
            )
        # 253-255 are the kernel's default/main/local tables; 0 means "unspecified".
        if not 0 < self.table < 2**32 or self.table in (253, 254, 255):
            raise ConfigError(
                f"--table {self.table} is reserved or invalid; use 1-252 or 256-4294967295"
            )
        # 0 is the local table's rule and 32766/32767 main/default: sdnsup must sit between.
        if not 0 < self.priority < 32766:
            raise ConfigError(f"--priority {self.priority} must be between 1 and 32765")


@dataclass(frozen=True, slots=True)
class DesiredState:
    """Everything sdnsup wants in the kernel.

    ``ap4``/``ap6`` None means no usable AP for that family; ``no_ap`` says what then happens
    to traffic for that family's CIDRs: ``fallback`` removes the policy rule so it takes the
    normal route, ``blackhole`` keeps the rule with a blackhole nexthop (fail closed).
    ``exempt4``/``exempt6`` (CC and AP addresses) are never steered, so sdnsup's own control
    traffic cannot loop into the overlay.
    """

    cidrs4: frozenset[IPv4Network] = frozenset()
    cidrs6: frozenset[IPv6Network] = frozenset()
    ap4: IPv4Address | None = None
    ap6: IPv6Address | None = None
    exempt4: frozenset[IPv4Network] = frozenset()
    exempt6: frozenset[IPv6Network] = frozenset()
    no_ap: NoApPolicy = "fallback"
    settings: Settings = field(default_factory=Settings)

    @property
    def empty(self) -> bool:
        return not self.cidrs4 and not self.cidrs6


EMPTY = DesiredState()
