"""The lab topology: client A, underlay router R, remote host B, access points, container C.

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
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sdnsup.lab import apagent as _apagent
from sdnsup.lab import cc as _cc
from sdnsup.lab import teardown as _teardown
from sdnsup.lab.commands import DEFAULT_TIMEOUT, Job, LabError, run, run_parallel
from sdnsup.lab.services import (
    DEFAULT_GRACE,
    Session,
    Ticker,
    TrackedProcess,
    in_namespace,
    lab_script,
    python_env,
    python_module,
    stop_processes,
)

IPv4Address = ipaddress.IPv4Address
IPv6Address = ipaddress.IPv6Address
APLink = Literal["shared", "private"]

MAX_APS = 50
MAX_CLIENTS = 150
DEFAULT_PORT = 8080
# sdnsup's host id in the lab: among near-equal APs of equal weight it prefers ap1, then
# ap2, ... ap6 (its rendezvous keys happen to fall in that order), like a CC's order of
# preference, and the same on every machine (a machine-id would differ). Tests of the
# weighted choice itself give their own ids.
LAB_HOST_ID = "sdnsup-lab-68"

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


class Lab:
    """A network-namespace topology for integration tests and the demo.

    Build it with :meth:`create` (a context manager) or :meth:`up` (then call :meth:`down`, or
    use the lab itself as a context manager). Teardown kills every process started in the
    lab, removes all of its namespaces and is idempotent; an ``atexit`` hook and SIGTERM
    handling make sure it also happens when a test run is interrupted.
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

        self.tmpdir: Path | None = None
        self.build_seconds: float | None = None
        self._procs: list[TrackedProcess] = []
        self._sessions: list[Session] = []
        self._tickers: list[Ticker] = []
        self._state: Literal["planned", "up", "down"] = "planned"

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
    ) -> Lab:
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
    ) -> Iterator[Lab]:
        """``with Lab.create(...) as lab:`` builds a lab and always tears it down."""
        lab = cls.up(n_aps, ap_link, container, prefix, rp_filter_strict, keep_logs, clients)
        try:
            yield lab
        finally:
            lab.down()

    def __enter__(self) -> Lab:
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
            for session in self._sessions:
                with contextlib.suppress(Exception):
                    session.close(timeout=0.5)
            stop_processes([t.proc for t in self._procs], grace=DEFAULT_GRACE)
            _teardown.cleanup(self.prefix)
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM) or failed half-way: the namespaces must still go.
            _teardown.cleanup(self.prefix)
            raise
        finally:
            _teardown.unregister(self)
        for tracked in self._procs:
            if tracked.proc.stdout is not None:
                tracked.proc.stdout.close()
            if tracked.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    tracked.proc.stdin.close()
        if self.tmpdir is not None and not self.keep_logs:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        self._state = "down"

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

    # --- running things -------------------------------------------------------------------

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

    def exec(
        self,
        ns: str,
        *argv: str,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside namespace ``ns`` (name or role) to completion, output captured.

        Raises :class:`~sdnsup.lab.commands.CommandError` (with stderr) on a non-zero exit
        when ``check``, and :class:`subprocess.TimeoutExpired` after ``timeout`` seconds.
        """
        argv_ns = in_namespace(self._resolve(ns), [str(a) for a in argv])
        return run(argv_ns, stdin=input, check=check, timeout=timeout, env=python_env())

    def popen(
        self,
        ns: str,
        *argv: str,
        env: Mapping[str, str] | None = None,
        label: str | None = None,
        **kwargs: object,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in namespace ``ns``, tracked: it is stopped at teardown.

        stdout and stderr go to a log file in the lab's temp dir unless given in ``kwargs``
        (read it with :meth:`logs`); stdin is /dev/null unless given. ``env`` holds variables
        added to this process's environment. Other ``kwargs`` go to :class:`subprocess.Popen`.
        """
        ns = self._resolve(ns)
        assert self.tmpdir is not None
        label = label or f"{ns.removeprefix(self.prefix)}-{Path(str(argv[0])).name}"
        log_path: Path | None = None
        log_file = None
        if "stdout" not in kwargs or "stderr" not in kwargs:
            log_path = self.tmpdir / f"{len(self._procs):02d}-{label}.log"
            log_file = open(log_path, "wb")  # the child gets its own copy; ours is closed below
            kwargs.setdefault("stdout", log_file)
            kwargs.setdefault(
                "stderr", log_file if kwargs["stdout"] is not log_file else subprocess.STDOUT
            )
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("start_new_session", True)
        try:
            proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
                in_namespace(ns, [str(a) for a in argv]), env=python_env(env), **kwargs
            )
        finally:
            if log_file is not None:
                log_file.close()
        self._procs.append(TrackedProcess(proc, label, log_path))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = DEFAULT_GRACE) -> int:
        """SIGTERM ``proc`` (its process group), SIGKILL after ``grace`` s; its exit status."""
        stop_processes([proc], grace=grace)
        return proc.returncode

    def logs(self, proc: subprocess.Popen[bytes]) -> str:
        """Everything a process started by :meth:`popen` wrote to its log file so far."""
        for tracked in self._procs:
            if tracked.proc is proc:
                if tracked.log_path is None:
                    return ""
                try:
                    return tracked.log_path.read_text(errors="replace")
                except FileNotFoundError:
                    return ""
        raise ValueError("not a process of this lab")

    def all_logs(self) -> str:
        """The logs of every process of this lab, each under a header (for failure reports)."""
        parts = []
        for tracked in self._procs:
            status = tracked.proc.poll()
            state = "running" if status is None else f"exit {status}"
            args = " ".join(str(a) for a in tracked.proc.args[4:])  # type: ignore[index]
            parts.append(f"===== {tracked.label} ({state}): {args}\n{self.logs(tracked.proc)}")
        return "\n".join(parts)

    @property
    def state_dir(self) -> Path:
        """Where the sdnsup processes of this lab keep their saved AP lists (delete it to
        make the next start a first boot)."""
        assert self.tmpdir is not None
        return self.tmpdir / "sdnsup-state"

    def run_sdnsup(
        self,
        ns: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        wrapper: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        """Start ``python -m sdnsup.cli ARGS`` in ``ns``, output to a log file (:meth:`logs`).

        ``wrapper`` runs it under another command (``setpriv`` with fewer capabilities).

        sdnsup's own file log and its saved AP list go to the lab's temp dir (not the host's
        /tmp/sdnsup and /var/lib/sdnsup, which several labs would share), no host config
        file is read, and the host id is :data:`LAB_HOST_ID` (not this machine's), unless
        ``env`` says otherwise.
        """
        argv = [*wrapper, *python_module("sdnsup.cli", *(str(a) for a in args))]
        assert self.tmpdir is not None
        base = {
            "SDNSUP_LOG_DIR": str(self.tmpdir / "sdnsup-logs"),
            "SDNSUP_STATE_DIR": str(self.state_dir),
            "SDNSUP_HOST_ID": LAB_HOST_ID,
            "SDNSUP_CONFIG": "none",
        }
        label = f"{ns.removeprefix(self.prefix)}-sdnsup"
        return self.popen(ns, *argv, env={**base, **(env or {})}, label=label)

    def serve_whoami(
        self, ns: str, port: int = DEFAULT_PORT, timeout: float = 5.0
    ) -> subprocess.Popen[bytes]:
        """Start a :mod:`~sdnsup.lab.whoami` server in ``ns`` and wait until it listens."""
        assert self.tmpdir is not None
        ready = self.tmpdir / f"whoami-{len(self._procs)}.ready"
        argv = lab_script("whoami", "--port", str(port), "--ready-file", str(ready))
        label = f"{self._resolve(ns).removeprefix(self.prefix)}-whoami-{port}"
        proc = self.popen(ns, *argv, label=label)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop(proc, grace=0.5)
                raise LabError(f"whoami in {ns} port {port} did not start:\n{self.logs(proc)}")
            time.sleep(0.01)
        return proc

    def whoami(
        self,
        ns: str,
        addr: object,
        port: int = DEFAULT_PORT,
        timeout: float = 3.0,
        source: object | None = None,
    ) -> str | None:
        """Connect from ``ns`` to a whoami server; the address it saw, None on failure.

        ``source`` binds the client to a local address first.
        """
        args = [str(addr), str(port), "--timeout", str(timeout)]
        if source is not None:
            args += ["--source", str(source)]
        argv = lab_script("probe", *args)
        try:
            proc = self.exec(ns, *argv, check=False, timeout=timeout + 10)
        except subprocess.TimeoutExpired:
            return None
        out = proc.stdout.strip()
        return out if proc.returncode == 0 and out else None

    def open_session(
        self, ns: str, addr: object, port: int = DEFAULT_PORT, timeout: float = 3.0
    ) -> Session:
        """Open one persistent TCP connection from ``ns`` to a whoami server.

        Raises :class:`~sdnsup.lab.commands.LabError` when it cannot be established within
        ``timeout``. The session is closed at teardown if not before.
        """
        argv = lab_script("probe", str(addr), str(port), "--session", "--timeout", str(timeout))
        label = f"{self._resolve(ns).removeprefix(self.prefix)}-session"
        proc = self.popen(
            ns, *argv, label=label, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        session = Session(proc, f"{ns}->[{addr}]:{port}")
        self._sessions.append(session)
        if session.wait_greeting(timeout + 5) is None:
            session.close(timeout=0.5)
            raise LabError(f"session {session.description} failed:\n{self.logs(proc)}")
        return session

    def open_ticker(
        self,
        ns: str,
        addr: object,
        port: int = DEFAULT_PORT,
        *,
        idle: bool = False,
        interval: float = 0.1,
        timeout: float = 3.0,
        wait: bool = True,
    ) -> Ticker:
        """Open a long-lived connection from ``ns`` to a whoami server that exchanges a line
        every ``interval`` (or, ``idle``, blocks in ``recv()`` and reconnects once it fails).

        Raises :class:`~sdnsup.lab.commands.LabError` when it does not open within
        ``timeout`` (with ``wait`` False it returns at once: the caller checks
        :meth:`Ticker.wait_open`, e.g. to open several at a time). It is stopped at teardown
        if not before.
        """
        argv = lab_script(
            "ticker", str(addr), str(port), "--interval", str(interval),
            "--timeout", str(timeout), *(["--idle"] if idle else []),
        )  # fmt: skip
        label = f"{self._resolve(ns).removeprefix(self.prefix)}-ticker"
        proc = self.popen(ns, *argv, label=label, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        ticker = Ticker(proc, f"{ns}->[{addr}]:{port}")
        self._tickers.append(ticker)
        if wait and ticker.wait_open(timeout + 5) is None:
            ticker.stop(timeout=0.5)
            raise LabError(f"ticker {ticker.description} failed:\n{self.logs(proc)}")
        return ticker

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

    # --- probe agents and the control center (sdnsup.lab.apagent, sdnsup.lab.cc) -----------

    # Set by start_cc (class defaults, so that labs built before it runs need no new state).
    _cc_proc: subprocess.Popen[bytes] | None = None
    _cc_url: str | None = None

    def _lab_file(self, name: str) -> Path:
        if self._state != "up" or self.tmpdir is None:
            raise LabError(f"lab {self.prefix} is not up")
        return self.tmpdir / name

    def _agent_control(self, index: int) -> Path:
        return self._lab_file(f"apagent-ap{self.ap(index).index}.json")

    def _wait_ready(
        self, proc: subprocess.Popen[bytes], ready: Path, deadline: float, what: str
    ) -> None:
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop(proc, grace=0.5)
                raise LabError(f"{what} did not start:\n{self.logs(proc)}")
            time.sleep(0.01)

    def start_ap_agents(
        self, delays: Mapping[int, float] | None = None, timeout: float = 5.0
    ) -> list[subprocess.Popen[bytes]]:
        """Start a probe agent (:mod:`~sdnsup.lab.apagent`) in every AP namespace.

        Each answers udp echo on 7300 and tcp/``GET /health`` on 7301 after its delay
        (``delays``: AP index -> seconds, default 0). Returns once every agent answered a
        udp echo and an http probe from A, on IPv4 and IPv6. Call it once per lab.

        Raises:
            LabError: an agent did not start or did not answer within ``timeout`` seconds.
            IndexError: ``delays`` names an AP this lab does not have.
        """
        delays = dict(delays or {})
        for index in delays:
            self.ap(index)
        deadline = time.monotonic() + timeout
        started = []
        for ap in self.aps:
            control = self._agent_control(ap.index)
            _apagent.write_control(control, delays.get(ap.index, 0.0))
            ready = self._lab_file(f"apagent-ap{ap.index}.ready")
            ready.unlink(missing_ok=True)
            argv = lab_script(
                "apagent", "serve", "--control", str(control), "--ready-file", str(ready)
            )
            proc = self.popen(ap.ns, *argv, label=f"ap{ap.index}-apagent")
            started.append((proc, ready))
        for index, (proc, ready) in enumerate(started, 1):
            self._wait_ready(proc, ready, deadline, f"the agent in AP {index}")
        addrs = [str(a) for ap in self.aps for a in (ap.addr, ap.addr6)]
        remaining = max(0.5, deadline - time.monotonic())
        argv = lab_script("apagent", "check", *addrs, "--timeout", str(remaining))
        result = self.exec(self.ns_a, *argv, check=False, timeout=remaining + 10)
        if result.returncode != 0:
            raise LabError(f"AP agents do not answer from A: {result.stderr.strip()}")
        return [proc for proc, _ in started]

    def _agent_settings(self, index: int) -> dict[str, Any]:
        control = self._agent_control(index)
        try:
            settings: dict[str, Any] = json.loads(control.read_text())
        except FileNotFoundError:
            raise LabError(f"no agent runs in AP {index}: call start_ap_agents()") from None
        return settings

    def set_ap_delay(self, index: int, seconds: float) -> None:
        """Make AP ``index``'s agent answer probes after ``seconds`` (from its next probe)."""
        settings = self._agent_settings(index)
        _apagent.write_control(self._agent_control(index), seconds, bool(settings.get("drop")))

    def set_ap_drop(self, index: int, drop: bool, firewall: bool = True) -> None:
        """Make AP ``index`` stop (or resume) answering probes, its sockets left open.

        Its agent reads and ignores udp and http probes. With ``firewall`` (the default), an
        nftables table ``inet labdrop`` in the AP's namespace also drops tcp connects to the
        agent's port and ICMP echo requests to the AP, so every probe kind sees it dead;
        forwarded traffic through the AP is not affected.
        """
        settings = self._agent_settings(index)
        delay = float(settings.get("delay", 0.0))
        _apagent.write_control(self._agent_control(index), delay, drop)
        if firewall:
            ruleset = "table inet labdrop {}\ndelete table inet labdrop\n"
            if drop:
                ruleset += (
                    "table inet labdrop {\n"
                    "  chain input {\n"
                    "    type filter hook input priority filter; policy accept;\n"
                    f"    tcp dport {_apagent.TCP_PORT} drop\n"
                    "    icmp type echo-request drop\n"
                    "    icmpv6 type echo-request drop\n"
                    "  }\n"
                    "}\n"
                )
            run(in_namespace(self._resolve(self.ap(index).ns), ["nft", "-f", "-"]), stdin=ruleset)

    def cc_answer(
        self,
        aps: Sequence[int] | None = None,
        ttl: float = 60,
        probe: Mapping[str, Any] | None = None,
        weights: Mapping[int, int] | None = None,
    ) -> dict[str, Any]:
        """A CC answer listing this lab's APs ``aps`` (indexes, default all) as ``ap1``...

        Each entry has ``addr``/``addr6`` (the AP's uplink addresses), ``probe`` (default
        udp to the lab agent's port 7300) and its weight from ``weights`` (default 1).
        """
        spec = dict(probe) if probe is not None else {"kind": "udp", "port": _apagent.UDP_PORT}
        indexes = list(aps) if aps is not None else [ap.index for ap in self.aps]
        entries = []
        for index in indexes:
            ap = self.ap(index)
            entries.append(
                {
                    "id": f"ap{ap.index}",
                    "addr": str(ap.addr),
                    "addr6": str(ap.addr6),
                    "probe": dict(spec),
                    "weight": (weights or {}).get(index, 1),
                }
            )
        return {"aps": entries, "ttl": ttl}

    def set_cc(
        self,
        mode: str = "ok",
        answer: Mapping[str, Any] | None = None,
        aps: Sequence[int] | None = None,
        ttl: float = 60,
        slow_seconds: float = _cc.DEFAULT_SLOW_SECONDS,
        probe: Mapping[str, Any] | None = None,
        weights: Mapping[int, int] | None = None,
    ) -> None:
        """Set what the lab CC answers from its next request (see :mod:`sdnsup.lab.cc`).

        ``mode``: ``ok``, ``500``, ``garbage``, ``slow`` (after ``slow_seconds``) or
        ``oversize``. ``answer`` defaults to :meth:`cc_answer` ``(aps, ttl, probe, weights)``. The
        control file is replaced atomically; this may be called before :meth:`start_cc`.
        """
        if answer is None:
            answer = self.cc_answer(aps, ttl, probe, weights)
        _cc.write_control(self._lab_file("cc.json"), mode, answer, slow_seconds)

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

    def start_cc(
        self,
        ns: str | None = None,
        port: int = 8000,
        token: str | None = None,
        host: str | None = None,
        timeout: float = 5.0,
    ) -> str:
        """Start the lab CC (:mod:`~sdnsup.lab.cc`) and return its URL as seen from A.

        By default it runs in R on its br-lan address (``http://172.31.1.1:8000``): A
        reaches it on its LAN, never through an AP. ``host`` overrides the address it
        binds and the URL names. With ``token``, requests need ``Authorization: Bearer``
        that token. It serves what :meth:`set_cc` wrote (``ok`` with every AP if nothing).

        Raises:
            LabError: a CC already runs, or it did not start within ``timeout``.
        """
        if self._cc_proc is not None and self._cc_proc.poll() is None:
            raise LabError("the lab CC already runs: stop_cc() first")
        ns = self._resolve(ns or self.ns_r)
        host = host or self._address_in(ns)
        control = self._lab_file("cc.json")
        if not control.exists():
            self.set_cc()
        argv = ["--host", host, "--port", str(port), "--control", str(control)]
        if token is not None:
            token_file = self._lab_file("cc-token")
            token_file.touch(mode=0o600)
            token_file.write_text(token)
            argv += ["--token-file", str(token_file)]
        ready = self._lab_file("cc.ready")
        ready.unlink(missing_ok=True)
        label = f"{ns.removeprefix(self.prefix)}-cc-{port}"
        proc = self.popen(ns, *lab_script("cc", *argv, "--ready-file", str(ready)), label=label)
        self._wait_ready(proc, ready, time.monotonic() + timeout, f"the CC in {ns}")
        self._cc_proc = proc
        self._cc_url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        return self._cc_url

    @property
    def cc_process(self) -> subprocess.Popen[bytes] | None:
        """The running lab CC's process (for :meth:`logs`), None when it is not running."""
        return self._cc_proc

    def cc_requests(self) -> list[tuple[float, str, int]]:
        """The running lab CC's ``GET /v1/aps`` requests so far: (wall-clock time, client
        address, status), oldest first (from its log)."""
        if self._cc_proc is None:
            return []
        out = []
        for line in self.logs(self._cc_proc).splitlines():
            parts = line.split()
            if len(parts) == 7 and parts[0] == "cc:" and parts[3] == "/v1/aps":
                out.append((float(parts[6]), parts[1], int(parts[4])))
        return out

    def stop_cc(self) -> None:
        """Stop the lab CC: connections to its URL are refused from now on. Idempotent."""
        if self._cc_proc is not None:
            self.stop(self._cc_proc, grace=2.0)
            self._cc_proc = None

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
        return f"<Lab {self.prefix} {self._state} aps={len(self.aps)} {self.ap_link}>"


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


__all__ = ["AccessPoint", "Lab", "running_as_root", "unavailable_reason"]
