"""The defaults and limits of sdnsup's run options, each with its reason.

They live here, away from the modules that use them, so that the commands that only parse
options (``plan``, ``check``, ``--help``) import neither trio nor the engine: this module
imports nothing of sdnsup's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

# --- keepalive (sdnsup.keepalive) -----------------------------------------------------------
KEEPALIVE_INTERVAL = 0.2
KEEPALIVE_TIMEOUT = 0.2
KEEPALIVE_MISSES = 3
# An AP that only carries pinned connections (draining) is probed every second, with the
# active AP's deadline and misses: its death is found 2-3.2 s after it fails (3 misses), while
# its connections would take minutes of TCP retransmissions to notice, and it costs the AP a
# fifth of the active AP's probes.
DRAIN_INTERVAL = 1.0

# The most aggressive settings supported (the config validators enforce them).
# A probe's answer waits for Python to be scheduled: CFS hands out slices within a period of
# 6 ms x (1 + log2(CPUs)) (12-24 ms on 2-8 CPUs), stretched when more tasks are runnable, and
# a GC pause or a slow log write adds milliseconds more. A deadline of 50 ms is two such
# periods above an AP a few milliseconds away; a shorter one would declare a busy *host* a
# dead AP (a false failover).
MIN_TIMEOUT = 0.05
# Missed probes run back to back, so below the deadline a shorter interval only trims the
# wait for the first missed probe, while the probe rate is load on the AP: at 20 probes/s
# per host, an AP serving 5,000 hosts answers 100,000 probes/s.
MIN_INTERVAL = 0.05
# With a single miss, one lost datagram (a full queue, an ARP refresh) is a failover.
MIN_MISSES = 2

# --- passive detection and tracked targets (sdnsup.paths) -----------------------------------
# Distinct destinations whose attempts failed: one is a dead server, two may be one dead
# subnet behind one router; three unrelated destinations failing through the AP that still
# answers its probes is the AP. A wrong suspicion costs one confirmation (a few probes).
SUSPECT_DESTINATIONS = 3
# ...within this long: failures that belong to one incident, not a slow trickle of dead
# servers over an afternoon.
SUSPECT_WINDOW = 10.0
# Tracked targets: a round every 0.3 s, each probe with that deadline, and 2 failed rounds in
# a row (nothing answered through the active AP while something did through the other):
# a dead path is found 0.6-0.9 s after it fails, and a single lost probe is never a verdict.
TRACK_INTERVAL = 0.3
TRACK_MISSES = 2

# --- probing (sdnsup.supervisor) ------------------------------------------------------------
# A full probe round every 30 s (±20% so a fleet does not probe in step) finds a faster AP
# within a minute (while no AP is usable, every 2 s: sdnsup.supervisor).
REPROBE_INTERVAL = 30.0

# --- the daemon -----------------------------------------------------------------------------
# Netlink events cover what the kernel reports; this slow pass catches anything it does not
# (and events lost to a full socket buffer). Reading 100k CIDRs back costs ~3 s, hence slow.
VERIFY_INTERVAL = 120.0
# The last good CC answer (sdnsup.savedlist), one file per network namespace.
DEFAULT_STATE_DIR = Path("/var/lib/sdnsup")

# --- the kernel (sdnsup.applier) ------------------------------------------------------------
# "auto": turn net.ipv4.nexthop_compat_mode off while steering when no other software in the
# namespace has nexthop objects (see sdnsup.sysctl); "keep": never touch it.
NexthopCompat = Literal["auto", "keep"]

# --- the config file (sdnsup.config) --------------------------------------------------------
# Read only if it exists, so a host without one runs on flags alone. sdnsup.config looks it
# up at call time, so tests can point it at a temporary directory.
DEFAULT_CONFIG_PATH = Path("/etc/sdnsup/sdnsup.toml")
