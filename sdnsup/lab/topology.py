"""The lab topology: client A, underlay router R, remote host B, access points, container C.

What exists in the kernel: namespaces, links, addresses, sysctls and nftables rulesets, and
the faults injected into them. The processes run in a topology (sdnsup, probe agents, the CC,
whoami servers and their clients) are added by :class:`~sdnsup.lab.processes.Lab`.

::

    ns    iface   IPv4               IPv6                 attached to
    a     eth0    172.31.1.2/24      fd31:1::2/64         br-lan; default routes via R
    a     eth1    10.77.0.2/24       fd77::2/64           br-ap (ap_link="private" only)
    a     ctr0    10.88.0.1/24       fd88::1/64           veth to c (container=True only)
    r     br-lan  172.31.1.1/24      fd31:1::1/64         bridge
    r     br-ov   10.10.10.254/24    fd10:10:10::fe/64    bridge: the overlay, B's LAN
    r     br-ap   -                  -                    bridge (ap_link="private" only)
    b     eth0    10.10.10.1/24      fd10:10:10::1/64     br-ov; default routes via R
    apI   up0     172.31.1.(10+I)    fd31:1::(10+I)       br-lan (ap_link="shared")
                  10.77.0.(10+I)     fd77::(10+I)         br-ap  (ap_link="private")
    apI   ov0     10.10.10.(10+I)    fd10:10:10::(10+I)   br-ov; masquerade out of ov0
    c     eth0    10.88.0.2/24       fd88::2/64           veth to a; default routes via A
    hI    eth0    172.31.1.(100+I)   fd31:1::(100+I)      br-lan; default routes via R
                                                          (clients=N: more hosts like A)

* Every namespace is ``<prefix><role>``: ``a``, ``r``, ``b``, ``ap1``..``apN``, ``c`` and
  ``h1``..``hN`` (extra client hosts, for fleet tests: each runs its own sdnsup).
  ``r`` also holds the bridges (``br-lan``, ``br-ov``, ``br-ap``); R forwards, no NAT.
* An AP forwards and masquerades what leaves through ``ov0``; it has no default route, so it
  can only return traffic addressed to its own uplink subnet (the point of ``private`` mode).
* A forwards too (for C) and masquerades C's traffic like Docker does (``inet labdocker``).
* IPv6 DAD is off everywhere (``accept_dad=0`` before interfaces exist, ``nodad`` on each
  address), and ``keep_addr_on_down=1`` keeps IPv6 addresses across ``ap_link_down/up``.

The build runs in a few phases; the commands of one phase run in parallel, one ``ip -batch``
per namespace, so a three-AP lab comes up in about a tenth of a second.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Self

from sdnsup.lab import teardown as _teardown
from sdnsup.lab.commands import Job, LabError, run, run_parallel
from sdnsup.lab.services import in_namespace

IPv4Address = ipaddress.IPv4Address
IPv6Address = ipaddress.IPv6Address
APLink = Literal["shared", "private"]

MAX_APS = 50
MAX_CLIENTS = 150

# --- the addressing plan -------------------------------------------------------------------

LAN_NET = ipaddress.IPv4Network("172.31.1.0/24")
LAN_NET6 = ipaddress.IPv6Network("fd31:1::/64")
OVERLAY_NET = ipaddress.IPv4Network("10.10.10.0/24")
OVERLAY_NET6 = ipaddress.IPv6Network("fd10:10:10::/64")
PRIVATE_NET = ipaddress.IPv4Network("10.77.0.0/24")
PRIVATE_NET6 = ipaddress.IPv6Network("fd77::/64")
CONTAINER_NET = ipaddress.IPv4Network("10.88.0.0/24")
CONTAINER_NET6 = ipaddress.IPv6Network("fd88::/64")

ROUTER_ADDR, ROUTER_ADDR6 = IPv4Address("172.31.1.1"), IPv6Address("fd31:1::1")
ROUTER_OV_ADDR, ROUTER_OV_ADDR6 = IPv4Address("10.10.10.254"), IPv6Address("fd10:10:10::fe")
A_ADDR, A_ADDR6 = IPv4Address("172.31.1.2"), IPv6Address("fd31:1::2")
A_PRIVATE_ADDR, A_PRIVATE_ADDR6 = IPv4Address("10.77.0.2"), IPv6Address("fd77::2")
A_CTR_ADDR, A_CTR_ADDR6 = IPv4Address("10.88.0.1"), IPv6Address("fd88::1")
B_ADDR, B_ADDR6 = IPv4Address("10.10.10.1"), IPv6Address("fd10:10:10::1")
C_ADDR, C_ADDR6 = IPv4Address("10.88.0.2"), IPv6Address("fd88::2")

# Interface names. In R, the bridge-side end of each veth is named after its peer.
A_IF, A_PRIVATE_IF, A_CTR_IF = "eth0", "eth1", "ctr0"
AP_UPLINK_IF, AP_OVERLAY_IF = "up0", "ov0"


def _host(net: ipaddress.IPv4Network | ipaddress.IPv6Network, n: int) -> str:
    """Host ``n`` of ``net``: ``.n`` in IPv4, ``::n`` written the same way in IPv6."""
    base = str(net.network_address)
    return f"{base.rstrip(':')}::{n}" if net.version == 6 else f"{base[:-1]}{n}"


def _ap_host(net: ipaddress.IPv4Network | ipaddress.IPv6Network, i: int) -> str:
    """AP ``i``'s host part: ``.(10+i)`` in IPv4, ``::(10+i)`` written the same way in IPv6."""
    return _host(net, 10 + i)


def _ap_nat_ruleset() -> str:
    rules = []
    for family in ("ip", "ip6"):
        rules.append(
            f"table {family} lab {{\n"
            "  chain post {\n"
            "    type nat hook postrouting priority srcnat;\n"
            f'    oifname "{AP_OVERLAY_IF}" masquerade\n'
            "  }\n"
            "}\n"
        )
    return "".join(rules)


def _docker_ruleset() -> str:
    return (
        "table inet labdocker {\n"
        "  chain post {\n"
        "    type nat hook postrouting priority srcnat;\n"
        f'    ip saddr {CONTAINER_NET} oifname != "{A_CTR_IF}" masquerade\n'
        f'    ip6 saddr {CONTAINER_NET6} oifname != "{A_CTR_IF}" masquerade\n'
        "  }\n"
        "}\n"
    )


@dataclass(frozen=True, slots=True)
class AccessPoint:
    """One access point: its namespace, its uplink ("AP address") and overlay addresses."""

    index: int  # 1-based
    ns: str
    addr: IPv4Address  # uplink, the address sdnsup is given
    addr6: IPv6Address
    overlay_addr: IPv4Address  # on br-ov: what B sees when traffic goes through this AP
    overlay_addr6: IPv6Address
    ifname_in_a: str  # A's interface on the AP's uplink subnet (eth0 shared, eth1 private)
    uplink_ifname: str = AP_UPLINK_IF  # inside the AP namespace
    overlay_ifname: str = AP_OVERLAY_IF


def _new_prefix() -> str:
    """A fresh ``sdnt-<6 hex>-`` prefix that no existing namespace starts with."""
    for _ in range(100):
        prefix = f"sdnt-{secrets.token_hex(3)}-"
        if not _teardown.list_namespaces(prefix):
            return prefix
    raise LabError("could not find an unused namespace prefix")


class Topology:
    """The namespaces of a lab, wired up: for integration tests and the demo.

    Build it with :meth:`create` (a context manager) or :meth:`up` (then call :meth:`down`, or
    use the topology itself as a context manager). Teardown kills every process in the lab's
    namespaces, removes all of them and is idempotent; an ``atexit`` hook and SIGTERM
    handling make sure it also happens when a test run is interrupted. Tests use its
    subclass :class:`~sdnsup.lab.processes.Lab`, which also runs processes in it.
    """

    def __init__(
        self,
        n_aps: int = 2,
        ap_link: APLink = "shared",
        container: bool = False,
        prefix: str | None = None,
        rp_filter_strict: bool = False,
        keep_logs: bool = False,
        clients: int = 0,
    ) -> None:
        """Plan a lab; nothing is created before :meth:`up` (use :meth:`up`/:meth:`create`)."""
        if not 1 <= n_aps <= MAX_APS:
            raise ValueError(f"n_aps must be between 1 and {MAX_APS}, not {n_aps}")
        if not 0 <= clients <= MAX_CLIENTS:
            raise ValueError(f"clients must be between 0 and {MAX_CLIENTS}, not {clients}")
        if ap_link not in ("shared", "private"):
            raise ValueError(f"ap_link must be 'shared' or 'private', not {ap_link!r}")
        self.prefix = _teardown.validate_prefix(prefix) if prefix is not None else _new_prefix()
        self.ap_link: APLink = ap_link
        self.container = container
        self.rp_filter_strict = rp_filter_strict
        self.keep_logs = keep_logs

        self.ns_a = f"{self.prefix}a"
        self.ns_r = f"{self.prefix}r"
        self.ns_b = f"{self.prefix}b"
        self.ns_c: str | None = f"{self.prefix}c" if container else None
        # extra client hosts h1..hN on the LAN, like A (fleet tests)
        self.clients = [f"{self.prefix}h{i}" for i in range(1, clients + 1)]

        private = ap_link == "private"
        up_net, up_net6 = (PRIVATE_NET, PRIVATE_NET6) if private else (LAN_NET, LAN_NET6)
        self.aps: list[AccessPoint] = [
            AccessPoint(
                index=i,
                ns=f"{self.prefix}ap{i}",
                addr=IPv4Address(_ap_host(up_net, i)),
                addr6=IPv6Address(_ap_host(up_net6, i)),
                overlay_addr=IPv4Address(_ap_host(OVERLAY_NET, i)),
                overlay_addr6=IPv6Address(_ap_host(OVERLAY_NET6, i)),
                ifname_in_a=A_PRIVATE_IF if private else A_IF,
            )
            for i in range(1, n_aps + 1)
        ]

        self.a_ifname = A_IF
        self.a_addr, self.a_addr6 = A_ADDR, A_ADDR6
        self.a_private_ifname: str | None = A_PRIVATE_IF if private else None
        self.a_private_addr = A_PRIVATE_ADDR if private else None
        self.a_private_addr6 = A_PRIVATE_ADDR6 if private else None
        self.router_addr, self.router_addr6 = ROUTER_ADDR, ROUTER_ADDR6
        self.b_addr, self.b_addr6 = B_ADDR, B_ADDR6
        self.c_addr = C_ADDR if container else None
        self.c_addr6 = C_ADDR6 if container else None
        self.overlay_net, self.overlay_net6 = OVERLAY_NET, OVERLAY_NET6

        # The lab's temp dir, made by the build: what runs in the lab keeps its logs and files
        # there. It is named after the prefix and recorded in the prefix's marker, so that the
        # cleanup after a crash removes it with the namespaces.
        self.tmpdir: Path | None = None
        self.build_seconds: float | None = None
        self._state: Literal["planned", "up", "down"] = "planned"
        self._plan_processes()

    def _plan_processes(self) -> None:
        """What the subclass that runs processes keeps track of (nothing here)."""

    # --- lifecycle ------------------------------------------------------------------------

    @classmethod
    def up(
        cls,
        n_aps: int = 2,
        ap_link: APLink = "shared",
        container: bool = False,
        prefix: str | None = None,
        rp_filter_strict: bool = False,
        keep_logs: bool = False,
        clients: int = 0,
    ) -> Self:
        """Build a lab and return it; the caller must :meth:`down` it (or use ``with``)."""
        lab = cls(n_aps, ap_link, container, prefix, rp_filter_strict, keep_logs, clients)
        lab._build()
        return lab

    @classmethod
    @contextlib.contextmanager
    def create(
        cls,
        n_aps: int = 2,
        ap_link: APLink = "shared",
        container: bool = False,
        prefix: str | None = None,
        rp_filter_strict: bool = False,
        keep_logs: bool = False,
        clients: int = 0,
    ) -> Iterator[Self]:
        """``with Lab.create(...) as lab:`` builds a lab and always tears it down."""
        lab = cls.up(n_aps, ap_link, container, prefix, rp_filter_strict, keep_logs, clients)
        try:
            yield lab
        finally:
            lab.down()

    def __enter__(self) -> Self:
        if self._state == "planned":
            self._build()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of this lab, in creation order."""
        names = [self.ns_r, self.ns_a, self.ns_b, *(ap.ns for ap in self.aps)]
        return names + ([self.ns_c] if self.ns_c else []) + self.clients

    @property
    def is_up(self) -> bool:
        return self._state == "up"

    def client(self, index: int) -> str:
        """The namespace of extra client host ``index`` (1-based)."""
        if not 1 <= index <= len(self.clients):
            raise IndexError(f"no client {index}: this lab has clients 1..{len(self.clients)}")
        return self.clients[index - 1]

    @staticmethod
    def client_addr(index: int) -> IPv4Address:
        """Extra client host ``index``'s LAN address (172.31.1.(100+index))."""
        return IPv4Address(_host(LAN_NET, 100 + index))

    def ap(self, index: int) -> AccessPoint:
        """The access point with 1-based ``index``."""
        if not 1 <= index <= len(self.aps):
            raise IndexError(f"no AP {index}: this lab has APs 1..{len(self.aps)}")
        return self.aps[index - 1]

    def down(self) -> None:
        """Stop every process, remove every namespace and the temp dir. Idempotent."""
        if self._state == "down":
            return
        if self._state == "planned":  # never built: the prefix's namespaces are not ours
            self._state = "down"
            return
        try:
            self._stop_processes()
            _teardown.cleanup(self.prefix)
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM) or failed half-way: the namespaces must still go.
            _teardown.cleanup(self.prefix)
            raise
        finally:
            _teardown.unregister(self)
        if self.tmpdir is not None and not self.keep_logs:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        self._state = "down"

    def _stop_processes(self) -> None:
        """Stop what the lab started, before its namespaces go: nothing here (the
        :class:`~sdnsup.lab.processes.Lab` subclass stops its processes gracefully; the
        namespaces' cleanup SIGKILLs whatever still runs in them)."""

    # --- building -------------------------------------------------------------------------

    def _build(self) -> None:
        """Create the namespaces and wire them up; on any failure remove what was made."""
        if self._state != "planned":
            raise LabError(f"lab {self.prefix} was already built")
        if _teardown.list_namespaces(self.prefix):
            raise LabError(f"namespaces starting with {self.prefix!r} already exist")
        started = time.monotonic()
        _teardown.cleanup_stale()
        self.tmpdir = Path(tempfile.mkdtemp(prefix=self.prefix))
        _teardown.write_marker(self.prefix, self.tmpdir)
        _teardown.register(self)
        self._state = "up"  # from here on down() has something to undo
        try:
            script = "".join(f"netns add {ns}\n" for ns in self.namespaces)
            run(["ip", "-batch", "-"], stdin=script)
            run_parallel(self._sysctl_and_nft_jobs())
            run_parallel(self._link_jobs())
            run_parallel(self._address_jobs())
            if self.rp_filter_strict:
                ifaces = ["lo", A_IF, self.a_private_ifname, A_CTR_IF if self.container else None]
                keys = [f"net.ipv4.conf.{i}.rp_filter=1" for i in ifaces if i]
                run(in_namespace(self.ns_a, ["sysctl", "-q", "-w", *keys]))
        except BaseException:
            self.down()
            raise
        self.build_seconds = time.monotonic() - started

    def _sysctl_and_nft_jobs(self) -> list[Job]:
        """Phase 1, before any interface exists: sysctls (DAD off, forwarding) and nftables."""
        jobs = []
        for ns in self.namespaces:
            forwarding = 0 if ns in (self.ns_b, self.ns_c) else 1
            rp_filter = 1 if (ns == self.ns_a and self.rp_filter_strict) else 0
            keys = [
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.all.keep_addr_on_down=1",
                "net.ipv6.conf.default.keep_addr_on_down=1",
                # IPv4 devconf is inherited from the root namespace: pin what matters.
                f"net.ipv4.conf.all.rp_filter={rp_filter}",
                f"net.ipv4.conf.default.rp_filter={rp_filter}",
                f"net.ipv4.ip_forward={forwarding}",
                f"net.ipv6.conf.all.forwarding={forwarding}",
            ]
            ruleset = ""
            if ns in (ap.ns for ap in self.aps):
                ruleset = _ap_nat_ruleset()
            elif ns == self.ns_a and self.container:
                ruleset = _docker_ruleset()
            if ruleset:
                shell = 'sysctl -q -w "$@" && exec nft -f -'
                argv = in_namespace(ns, ["sh", "-c", shell, "sh", *keys])
                jobs.append(Job.of(*argv, stdin=ruleset))
            else:
                jobs.append(Job.of(*in_namespace(ns, ["sysctl", "-q", "-w", *keys])))
        return jobs

    def _link_jobs(self) -> list[Job]:
        """Phase 2: bridges in R, veth pairs with their far ends created in place, all up."""
        lines = ["link set lo up"]
        bridges = ["br-lan", "br-ov"] + (["br-ap"] if self.ap_link == "private" else [])
        lines += [f"link add {br} type bridge mcast_snooping 0" for br in bridges]
        ports: list[tuple[str, str, str, str]] = [  # (port in R, bridge, peer name, peer ns)
            ("a0", "br-lan", A_IF, self.ns_a),
            ("b0", "br-ov", "eth0", self.ns_b),
        ]
        if self.ap_link == "private":
            ports.append(("a1", "br-ap", A_PRIVATE_IF, self.ns_a))
        uplink_bridge = "br-ap" if self.ap_link == "private" else "br-lan"
        for ap in self.aps:
            ports.append((f"ap{ap.index}u", uplink_bridge, AP_UPLINK_IF, ap.ns))
            ports.append((f"ap{ap.index}o", "br-ov", AP_OVERLAY_IF, ap.ns))
        for i, ns in enumerate(self.clients, start=1):
            ports.append((f"h{i}", "br-lan", A_IF, ns))
        for port, _, peer, peer_ns in ports:
            lines.append(f"link add {port} type veth peer name {peer} netns {peer_ns}")
        lines += [f"link set {port} master {br} up" for port, br, _, _ in ports]
        lines += [
            f"address add {ROUTER_ADDR}/{LAN_NET.prefixlen} dev br-lan",
            f"address add {ROUTER_ADDR6}/{LAN_NET6.prefixlen} dev br-lan nodad",
            f"address add {ROUTER_OV_ADDR}/{OVERLAY_NET.prefixlen} dev br-ov",
            f"address add {ROUTER_OV_ADDR6}/{OVERLAY_NET6.prefixlen} dev br-ov nodad",
        ]
        lines += [f"link set {br} up" for br in bridges]
        jobs = [self._batch(self.ns_r, lines)]
        if self.ns_c:
            # A's end goes up now, so that C's default route finds a carrier in phase 3.
            jobs.append(
                self._batch(
                    self.ns_a,
                    [
                        f"link add {A_CTR_IF} type veth peer name eth0 netns {self.ns_c}",
                        f"link set {A_CTR_IF} up",
                    ],
                )
            )
        return jobs

    def _address_jobs(self) -> list[Job]:
        """Phase 3: addresses, links up and default routes in every namespace but R."""

        def iface(name: str, v4: str, v6: str) -> list[str]:
            return [
                f"address add {v4} dev {name}",
                f"address add {v6} dev {name} nodad",
                f"link set {name} up",
            ]

        def defaults(dev: str, gw: IPv4Address, gw6: IPv6Address) -> list[str]:
            return [f"route add default via {gw} dev {dev}", f"route add ::/0 via {gw6} dev {dev}"]

        lan, lan6 = LAN_NET.prefixlen, LAN_NET6.prefixlen
        ov, ov6 = OVERLAY_NET.prefixlen, OVERLAY_NET6.prefixlen
        a = ["link set lo up", *iface(A_IF, f"{A_ADDR}/{lan}", f"{A_ADDR6}/{lan6}")]
        if self.a_private_ifname:
            a += iface(
                A_PRIVATE_IF,
                f"{A_PRIVATE_ADDR}/{PRIVATE_NET.prefixlen}",
                f"{A_PRIVATE_ADDR6}/{PRIVATE_NET6.prefixlen}",
            )
        if self.ns_c:
            a += [
                f"address add {A_CTR_ADDR}/{CONTAINER_NET.prefixlen} dev {A_CTR_IF}",
                f"address add {A_CTR_ADDR6}/{CONTAINER_NET6.prefixlen} dev {A_CTR_IF} nodad",
            ]
        a += defaults(A_IF, ROUTER_ADDR, ROUTER_ADDR6)
        jobs = [self._batch(self.ns_a, a)]

        b = ["link set lo up", *iface("eth0", f"{B_ADDR}/{ov}", f"{B_ADDR6}/{ov6}")]
        b += defaults("eth0", ROUTER_OV_ADDR, ROUTER_OV_ADDR6)
        jobs.append(self._batch(self.ns_b, b))

        for ap in self.aps:
            up_net = PRIVATE_NET if self.ap_link == "private" else LAN_NET
            up_net6 = PRIVATE_NET6 if self.ap_link == "private" else LAN_NET6
            lines = ["link set lo up"]
            lines += iface(
                AP_UPLINK_IF, f"{ap.addr}/{up_net.prefixlen}", f"{ap.addr6}/{up_net6.prefixlen}"
            )
            lines += iface(AP_OVERLAY_IF, f"{ap.overlay_addr}/{ov}", f"{ap.overlay_addr6}/{ov6}")
            jobs.append(self._batch(ap.ns, lines))

        for i, ns in enumerate(self.clients, start=1):
            h = [
                "link set lo up",
                *iface(A_IF, f"{self.client_addr(i)}/{lan}", f"{_host(LAN_NET6, 100 + i)}/{lan6}"),
            ]
            h += defaults(A_IF, ROUTER_ADDR, ROUTER_ADDR6)
            jobs.append(self._batch(ns, h))

        if self.ns_c:
            c = ["link set lo up"]
            c += iface(
                "eth0",
                f"{C_ADDR}/{CONTAINER_NET.prefixlen}",
                f"{C_ADDR6}/{CONTAINER_NET6.prefixlen}",
            )
            c += defaults("eth0", A_CTR_ADDR, A_CTR_ADDR6)
            jobs.append(self._batch(self.ns_c, c))
        return jobs

    @staticmethod
    def _batch(ns: str, lines: list[str]) -> Job:
        return Job.of("ip", "-n", ns, "-batch", "-", stdin="".join(f"{ln}\n" for ln in lines))

    # --- naming ---------------------------------------------------------------------------

    def _resolve(self, ns: str) -> str:
        """A namespace of this lab, given by full name or by role (``"a"``, ``"ap1"``...)."""
        if self._state != "up":
            raise LabError(f"lab {self.prefix} is not up")
        names = self.namespaces
        if ns in names:
            return ns
        if f"{self.prefix}{ns}" in names:
            return f"{self.prefix}{ns}"
        raise ValueError(f"{ns!r} is not a namespace of lab {self.prefix} ({', '.join(names)})")

    def _address_in(self, ns: str) -> str:
        """The address of namespace ``ns`` that A reaches it at."""
        if ns == self.ns_r:
            return str(self.router_addr)
        if ns == self.ns_a:
            return "127.0.0.1"
        if ns == self.ns_b:
            return str(self.b_addr)
        if ns == self.ns_c:
            return str(self.c_addr)
        return str(next(ap.addr for ap in self.aps if ap.ns == ns))

    # --- faults ---------------------------------------------------------------------------

    def ap_link_down(self, index: int) -> None:
        """Cut AP ``index``'s uplink (inside the AP namespace): A can no longer reach it."""
        ap = self.ap(index)
        run(["ip", "-n", self._resolve(ap.ns), "link", "set", ap.uplink_ifname, "down"])

    def ap_link_up(self, index: int) -> None:
        """Restore AP ``index``'s uplink (its addresses were kept)."""
        ap = self.ap(index)
        run(["ip", "-n", self._resolve(ap.ns), "link", "set", ap.uplink_ifname, "up"])

    def ap_overlay_down(self, index: int) -> None:
        """Cut AP ``index``'s overlay side (inside the AP namespace): a gray failure. It still
        answers its probes from A, but forwards nothing (it answers forwarded packets with
        ICMP net unreachable: it has no route into the overlay any more)."""
        ap = self.ap(index)
        run(["ip", "-n", self._resolve(ap.ns), "link", "set", ap.overlay_ifname, "down"])

    def ap_overlay_up(self, index: int) -> None:
        """Restore AP ``index``'s overlay side (its addresses were kept)."""
        ap = self.ap(index)
        run(["ip", "-n", self._resolve(ap.ns), "link", "set", ap.overlay_ifname, "up"])

    def drop_ap_probes(self, index: int, drop: bool, tcp_port: int) -> None:
        """Make AP ``index``'s firewall drop (or stop dropping) probes: an nftables table
        ``inet labdrop`` in its namespace drops tcp connects to ``tcp_port`` and ICMP echo
        requests to the AP. Forwarded traffic through the AP is not affected."""
        ruleset = "table inet labdrop {}\ndelete table inet labdrop\n"
        if drop:
            ruleset += (
                "table inet labdrop {\n"
                "  chain input {\n"
                "    type filter hook input priority filter; policy accept;\n"
                f"    tcp dport {tcp_port} drop\n"
                "    icmp type echo-request drop\n"
                "    icmpv6 type echo-request drop\n"
                "  }\n"
                "}\n"
            )
        run(in_namespace(self._resolve(self.ap(index).ns), ["nft", "-f", "-"]), stdin=ruleset)

    # --- presentation ---------------------------------------------------------------------

    def describe(self) -> str:
        """A human-readable summary of namespaces and addresses (used by the demo)."""
        lines = [
            f"lab {self.prefix} (ap_link={self.ap_link}, container={self.container}, "
            f"rp_filter_strict={self.rp_filter_strict})",
            f"  A  {self.ns_a}: {A_IF} {self.a_addr} {self.a_addr6}"
            + (
                f", {A_PRIVATE_IF} {self.a_private_addr} {self.a_private_addr6}"
                if self.a_private_ifname
                else ""
            ),
            f"  R  {self.ns_r}: br-lan {ROUTER_ADDR} {ROUTER_ADDR6}, "
            f"br-ov {ROUTER_OV_ADDR} {ROUTER_OV_ADDR6}",
            f"  B  {self.ns_b}: {self.b_addr} {self.b_addr6}",
        ]
        for ap in self.aps:
            lines.append(
                f"  AP{ap.index} {ap.ns}: uplink {ap.addr} {ap.addr6} (via A's {ap.ifname_in_a}),"
                f" overlay {ap.overlay_addr} {ap.overlay_addr6}"
            )
        if self.ns_c:
            lines.append(f"  C  {self.ns_c}: {self.c_addr} {self.c_addr6} (behind A's ctr0)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        kind = type(self).__name__
        return f"<{kind} {self.prefix} {self._state} aps={len(self.aps)} {self.ap_link}>"


def running_as_root() -> bool:
    """Whether this process may create network namespaces at all."""
    return os.geteuid() == 0


def unavailable_reason() -> str | None:
    """Why a lab cannot be built here (not root, no ``ip``, no netns), None when it can."""
    if not running_as_root():
        return "network-namespace lab needs root (CAP_SYS_ADMIN/CAP_NET_ADMIN)"
    for tool in ("ip", "nft", "sysctl"):
        if shutil.which(tool) is None:
            return f"network-namespace lab needs `{tool}` on PATH"
    probe = f"sdnt-probe{secrets.token_hex(3)}"
    try:
        run(["ip", "netns", "add", probe], timeout=10)
    except (LabError, OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns add` does not work here: {exc}"
    finally:
        with contextlib.suppress(LabError, OSError, subprocess.SubprocessError):
            _teardown.delete_namespaces(_teardown.list_namespaces(probe))
    return None


__all__ = ["APLink", "AccessPoint", "Topology", "running_as_root", "unavailable_reason"]
