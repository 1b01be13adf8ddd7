"""What ``sdnsup run`` was asked to do, and the desired kernel state it implies for an AP.

Pure values and one pure function, without trio: ``plan`` and ``check`` build the same state
as the daemon without importing it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from sdnsup import defaults
from sdnsup.aps import AccessPoint
from sdnsup.cidrs import CidrSet
from sdnsup.state import DesiredState, NoApPolicy, Settings, Slot

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Everything ``sdnsup run`` was asked to do."""

    cidrs: CidrSet
    aps: tuple[AccessPoint, ...] = ()  # static APs; empty when the CC is asked
    settings: Settings = field(default_factory=Settings)
    no_ap: NoApPolicy = "fallback"
    # CC addresses: never steered, so control traffic cannot loop into the overlay
    exempt: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
    verify_interval: float = defaults.VERIFY_INTERVAL


def desired_for(
    config: RunConfig,
    ap: AccessPoint | None,
    known: Sequence[AccessPoint] = (),
    slots: tuple[Slot, ...] = (),
    probes: tuple[AccessPoint | None, frozenset[IPAddress]] = (None, frozenset()),
) -> DesiredState:
    """The state that steers new connections to the configured CIDRs through ``ap`` (None:
    no AP), and those pinned to ``slots`` through their slot's AP; ``probes``: the AP path
    probes are routed through and their targets (:mod:`sdnsup.paths`).

    Every known AP and the CC are exempt from steering.
    """
    known = tuple(known) or config.aps
    addrs = [a for ap_ in known for a in (ap_.addr4, ap_.addr6) if a is not None]
    addrs += config.exempt
    return DesiredState(
        cidrs4=config.cidrs.v4,
        cidrs6=config.cidrs.v6,
        ap4=ap.addr4 if ap else None,
        ap6=ap.addr6 if ap else None,
        exempt4=frozenset(ipaddress.IPv4Network(a) for a in addrs if a.version == 4),
        exempt6=frozenset(ipaddress.IPv6Network(a) for a in addrs if a.version == 6),
        no_ap=config.no_ap,
        settings=config.settings,
        slots=slots,
        probe_via4=probes[0].addr4 if probes[0] else None,
        probe_via6=probes[0].addr6 if probes[0] else None,
        probe_targets=probes[1],
    )
