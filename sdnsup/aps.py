"""Access points: what sdnsup knows about one, and the static ``--ap`` syntax.

``--ap 10.77.0.11`` names one IPv4 AP; ``--ap 10.77.0.11+fd77::11`` one dual-stack AP (its
IPv4 and IPv6 addresses joined by ``+``); ``--ap 10.77.0.11,10.77.0.12`` several APs, in
order of preference. An IPv6-only AP is written with its IPv6 address alone.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from sdnsup.errors import ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ProbeKind = Literal["udp", "tcp", "icmp", "http"]
TargetKind = Literal["icmp", "tcp", "udp"]
PROBE_KINDS: tuple[ProbeKind, ...] = ("udp", "tcp", "icmp", "http")
# The lab's AP agent and the CC protocol's example use these; a CC may name others per AP.
DEFAULT_PROBE_PORT = {"udp": 7300, "tcp": 7301, "http": 7301, "icmp": 0}


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    """How to probe an AP: ``udp`` echo with a nonce, ``tcp`` connect time, ``icmp`` echo,
    ``http`` GET of ``path``. ``port`` is unused for icmp."""

    kind: ProbeKind = "udp"
    port: int = 7300
    path: str = "/health"


# --- tracked targets: hosts inside the CIDRs probed through an AP (sdnsup.paths) ----------------


@dataclass(frozen=True, slots=True)
class Target:
    """A host inside the CIDRs to probe: ``icmp`` echo, ``tcp`` connect to ``port``, or
    ``udp`` echo (the AP agent's protocol: the probe must come back) to ``port``."""

    addr: IPAddress
    kind: TargetKind = "icmp"
    port: int = 0

    def __str__(self) -> str:
        host = f"[{self.addr}]" if self.addr.version == 6 else str(self.addr)
        return f"{self.kind}:{self.port}@{host}" if self.port else f"{self.kind}@{host}"


def parse_target(spec: str, what: str = "--track") -> Target:
    """``ADDR`` (ICMP echo), ``icmp@ADDR``, ``tcp:PORT@ADDR`` or ``udp:PORT@ADDR``.

    Raises:
        ConfigError: malformed, not a unicast address, a port where none belongs or missing.
    """
    kind_text, sep, host = spec.strip().rpartition("@")
    if not sep:
        kind_text, host = "icmp", spec.strip()
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ConfigError(
            f"{what} {spec!r}: {host!r} is not an IP address (use ADDR, icmp@ADDR, "
            "tcp:PORT@ADDR or udp:PORT@ADDR)"
        ) from None
    if addr.is_multicast or addr.is_unspecified or addr.is_loopback:
        raise ConfigError(f"{what} {spec!r}: {addr} is not a unicast host address")
    kind, _, port_text = kind_text.partition(":")
    if kind not in ("icmp", "tcp", "udp"):
        raise ConfigError(f"{what} {spec!r}: probe kind must be icmp, tcp or udp, not {kind!r}")
    if kind == "icmp":
        if port_text:
            raise ConfigError(f"{what} {spec!r}: an icmp probe takes no port")
        return Target(addr)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{what} {spec!r}: {kind} needs a port 1-65535, e.g. {kind}:22@ADDR")
    return Target(addr, kind, int(port_text))  # type: ignore[arg-type]


def parse_targets(specs: Iterable[str], what: str = "--track") -> tuple[Target, ...]:
    """Comma-separated targets (each :func:`parse_target`); duplicates dropped."""
    out: list[Target] = []
    for spec in specs:
        for item in spec.split(","):
            if item.strip():
                target = parse_target(item, what)
                if target not in out:
                    out.append(target)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class AccessPoint:
    """One AP. At least one of ``addr4``/``addr6`` is set. ``track``: hosts inside the
    CIDRs to probe through it while it is active (the CC's per-AP ``track`` list)."""

    id: str
    addr4: ipaddress.IPv4Address | None = None
    addr6: ipaddress.IPv6Address | None = None
    probe: ProbeSpec = field(default_factory=ProbeSpec)
    weight: int = 1
    track: tuple[Target, ...] = ()

    @property
    def addr(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """The address probes go to: IPv4 if the AP has one, else IPv6."""
        addr = self.addr4 or self.addr6
        assert addr is not None
        return addr

    def __str__(self) -> str:
        addrs = "+".join(str(a) for a in (self.addr4, self.addr6) if a is not None)
        return addrs if addrs == self.id else f"{self.id} ({addrs})"


def check_unicast(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, what: str) -> None:
    """Refuse addresses no AP can have (loopback, multicast, unspecified, link-local v4...)."""
    if addr.is_loopback or addr.is_multicast or addr.is_unspecified or addr.is_reserved:
        raise ConfigError(f"{what} {addr} is not a unicast address an AP can have")
    if isinstance(addr, ipaddress.IPv4Address) and addr == ipaddress.IPv4Address("255.255.255.255"):
        raise ConfigError(f"{what} {addr} is the broadcast address")


def parse_static_aps(spec: str) -> tuple[AccessPoint, ...]:
    """Parse ``--ap``; see the module docstring for the syntax.

    Raises:
        ConfigError: malformed address, two addresses of one family in one AP, duplicates.
    """
    aps: list[AccessPoint] = []
    for item in (p.strip() for p in spec.split(",")):
        if not item:
            continue
        addr4 = addr6 = None
        for text in item.split("+"):
            try:
                addr = ipaddress.ip_address(text.strip())
            except ValueError:
                raise ConfigError(
                    f"--ap {item!r}: {text!r} is not an IP address "
                    "(use ADDR, or ADDR4+ADDR6 for a dual-stack AP)"
                ) from None
            check_unicast(addr, "--ap")
            if isinstance(addr, ipaddress.IPv4Address):
                if addr4 is not None:
                    raise ConfigError(f"--ap {item!r}: two IPv4 addresses for one AP")
                addr4 = addr
            else:
                if addr6 is not None:
                    raise ConfigError(f"--ap {item!r}: two IPv6 addresses for one AP")
                addr6 = addr
        aps.append(AccessPoint(id=item, addr4=addr4, addr6=addr6))
    if not aps:
        raise ConfigError("--ap needs at least one address")
    if len({ap.id for ap in aps}) != len(aps):
        raise ConfigError(f"--ap {spec!r} lists an AP twice")
    return tuple(aps)
