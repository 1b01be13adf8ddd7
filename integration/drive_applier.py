"""Run inside a lab namespace: apply one desired state with the real backends, print JSON.

Usage: python drive_applier.py CIDRS|@FILE AP4|- [AP6|-] [--twice] [--teardown]
Prints {"writes": {...}, "again": N, "matches_kernel": bool}: the writes of the apply, the
writes of applying the same state again, and whether what the applier believes equals a fresh
read of the kernel.
"""

from __future__ import annotations

import ipaddress
import json
import sys

from sdnsup.applier import Applier
from sdnsup.nft import LibNftables
from sdnsup.rtnl import RtnlRoutes
from sdnsup.state import DesiredState
from sdnsup.sysctl import ProcSysctl


def main() -> None:
    spec = sys.argv[1]
    if spec.startswith("@"):  # one CIDR per line: lists too long for one argument
        spec = ",".join(open(spec[1:]).read().split())
    cidrs = [ipaddress.ip_network(c) for c in spec.split(",") if c]
    ap4 = None if sys.argv[2] == "-" else ipaddress.IPv4Address(sys.argv[2])
    ap6 = None if len(sys.argv) < 4 or sys.argv[3] == "-" else ipaddress.IPv6Address(sys.argv[3])
    applier = Applier(RtnlRoutes.from_system(), LibNftables(), ProcSysctl())
    if "--teardown" in sys.argv:
        result = applier.teardown()
        print(json.dumps({"writes": dict(result.writes)}))
        return
    desired = DesiredState(
        cidrs4=frozenset(c for c in cidrs if c.version == 4),  # type: ignore[misc]
        cidrs6=frozenset(c for c in cidrs if c.version == 6),  # type: ignore[misc]
        ap4=ap4,
        ap6=ap6,
    )
    result = applier.apply(desired)
    again = applier.apply(desired)
    print(
        json.dumps(
            {
                "writes": dict(result.writes),
                "again": again.total_writes,
                "matches_kernel": applier.applied == applier.read_kernel(),
            }
        )
    )


if __name__ == "__main__":
    main()
