"""Routes, nexthops and policy rules: the values sdnsup keeps in the kernel and the seam to it.

sdnsup owns, per address family: one kernel nexthop object naming the active AP, one route per
user CIDR in its table pointing at that nexthop (``nhid``), and one ``fwmark`` policy rule;
and per AP slot in use (see :class:`sdnsup.state.Slot`) a nexthop naming the slot's AP, a
default route through it in the slot's table, and, while the slot drains, two policy rules.
Everything it writes carries sdnsup's own protocol number (:data:`RTPROT_SDNSUP`) so that a
restarted process finds leftovers of an earlier run, and never touches anything else.

:class:`RoutesBackend` is the narrow seam: plain values in, plain values out. The real one
(:mod:`sdnsup.rtnl`) batches netlink messages; tests use a fake that records state.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from sdnsup.cidrs import NO_KNOWN_NETWORKS, KnownNetworks

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Route protocol number stamped on every route, nexthop and rule sdnsup writes. The kernel
# ignores it; iproute2 names 0-4 and a few well-known daemons (bird 12, babel 42, bgp 186-192),
# 0xF5 is unassigned in /etc/iproute2/rt_protos and in FRR/bird.
RTPROT_SDNSUP = 0xF5


@dataclass(frozen=True, slots=True, order=True)
class Nexthop:
    """A kernel nexthop object.

    ``gateway`` with ``ifindex``: via the gateway on that interface (the kernel requires the
    interface). ``gateway is None`` with ``ifindex == 0``: a blackhole (fail closed).
    ``gateway is None`` with an ``ifindex``: a device-only nexthop (sdnsup never writes one).
    """

    id: int
    family: int  # socket.AF_INET or socket.AF_INET6
    gateway: IPAddress | None
    ifindex: int  # 0 for a blackhole


@dataclass(frozen=True, slots=True, order=True)
class Route:
    """``dst`` in ``table`` via nexthop object ``nhid``."""

    dst: IPNetwork
    table: int
    nhid: int

    @property
    def family(self) -> int:
        return socket.AF_INET if self.dst.version == 4 else socket.AF_INET6


@dataclass(frozen=True, slots=True, order=True)
class Rule:
    """``fwmark MARK/MASK [iif IIFNAME] lookup TABLE priority PRIORITY`` for one family.

    ``iifname`` empty matches any input interface. Locally sent packets and the kernel's
    reverse-path checks are looked up as coming from ``lo``.
    """

    family: int
    priority: int
    fwmark: int
    fwmask: int
    table: int
    iifname: str = ""


@dataclass(frozen=True, slots=True)
class Link:
    """Where the kernel would send traffic for an address (``ip route get``)."""

    ifindex: int
    ifname: str
    gateway: IPAddress | None  # None when the address is on-link
    prefsrc: IPAddress | None
    local: bool = False  # the address is this host's own (a route of type local)


@dataclass(frozen=True, slots=True)
class Foreign:
    """Another tool's object at a key sdnsup writes, described for the operator.

    ``route`` (its table and destination) or ``nhid`` says which write it would take; a
    policy rule has neither (rules never replace one another, they only compete).
    """

    description: str
    route: tuple[int, IPNetwork] | None = None
    nhid: int | None = None

    def __str__(self) -> str:
        return self.description


@dataclass(frozen=True, slots=True)
class Failure:
    """One object a batch could not write, with the kernel's errno."""

    item: Route | Nexthop | Rule
    error: OSError


class RoutesBackend(Protocol):
    """The kernel's routing state, reduced to what sdnsup owns.

    Reads return only objects tagged with ``proto``. Batch writes never raise for a single
    object the kernel refused: they return one :class:`Failure` per refused object and carry on
    with the rest. They raise :class:`sdnsup.errors.RoutesError` only when the netlink socket
    itself fails.
    """

    def routes(self, proto: int, known: KnownNetworks = NO_KNOWN_NETWORKS) -> set[Route]:
        """Every route tagged ``proto`` in any table, both families; destinations are
        ``known``'s network objects where it has them."""
        ...

    def nexthops(self, proto: int) -> set[Nexthop]:
        """Every nexthop object tagged ``proto``."""
        ...

    def foreign_nexthops(self, proto: int) -> set[int]:
        """The ids of the nexthop objects (groups included) *not* tagged ``proto``."""
        ...

    def rules(self, proto: int) -> set[Rule]:
        """Every policy rule tagged ``proto``, both families."""
        ...

    def foreign_objects(
        self,
        proto: int,
        *,
        tables: Collection[int],
        priorities: Collection[int],
        nhids: Collection[int],
        routes: Mapping[int, Collection[IPNetwork]],
    ) -> list[Foreign]:
        """Objects *not* tagged ``proto`` where sdnsup writes: rules at ``priorities`` or
        looking up ``tables``, routes to one of ``routes[table]`` in a table, nexthops with
        ``nhids``."""
        ...

    def resolve(self, addr: IPAddress) -> Link | None:
        """Route lookup for ``addr`` in the main table, without any mark; None if unreachable."""
        ...

    def add_routes(self, routes: Sequence[Route], proto: int) -> list[Failure]:
        """Add (create-or-replace) ``routes`` in as few netlink round trips as possible."""
        ...

    def delete_routes(self, routes: Sequence[Route], *, proto: int | None = None) -> list[Failure]:
        """Delete ``routes``; a route that is already gone is not a failure.

        With ``proto``, only a route carrying that protocol matches: an identical route of
        another owner is never removed in sdnsup's place.
        """
        ...

    def replace_nexthop(self, nexthop: Nexthop, proto: int) -> list[Failure]:
        """Create or atomically replace the nexthop object with ``nexthop.id``."""
        ...

    def delete_nexthops(self, ids: Iterable[int]) -> list[Failure]:
        """Delete nexthop objects (the kernel also drops the routes using them)."""
        ...

    def add_rules(self, rules: Sequence[Rule], proto: int) -> list[Failure]: ...

    def delete_rules(self, rules: Sequence[Rule], *, proto: int | None = None) -> list[Failure]:
        """Delete ``rules``; with ``proto``, only rules carrying that protocol match."""
        ...
