"""Measurements in a lab, with real packets and iproute2's JSON (used by the integration
tests, the benchmarks and the demo)."""

from __future__ import annotations

import itertools
import re
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from sdnsup.routes import RTPROT_SDNSUP

if TYPE_CHECKING:
    from sdnsup.lab.processes import Lab


def dark_window(
    lab: Lab, during: Callable[[], object], *, count: int = 300, interval: float = 0.01
) -> tuple[float, int]:
    """Ping B from A ``count`` times every ``interval`` s, run ``during()`` after 1 s, and
    return the longest time without a reply (the dark window) and the number of replies.

    Bounded: ``count * interval`` seconds of pings plus a margin. ICMP echo keeps working
    across an AP switch (each AP masquerades it afresh), unlike an established TCP stream.
    """
    proc = lab.popen(
        lab.ns_a,
        "ping", "-n", "-D", "-i", str(interval), "-c", str(count), "-W", "1", str(lab.b_addr),
        label="a-ping", stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1.0)
    during()
    out = str(proc.communicate(timeout=count * interval + 15)[0])
    stamps = [float(m.group(1)) for m in re.finditer(r"^\[(\d+\.\d+)\].*bytes from", out, re.M)]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return max(gaps, default=float("inf")), len(stamps)


# How ``ip -j`` prints sdnsup's route protocol: a number, or hex where iproute2 has no name.
_PROTOCOL = (str(RTPROT_SDNSUP), hex(RTPROT_SDNSUP))


def owns(obj: Mapping[str, Any]) -> bool:
    """Whether a route, rule or nexthop of ``ip -j`` output carries sdnsup's protocol."""
    return str(obj.get("protocol")) in _PROTOCOL
