"""Which AP a host takes: the fastest band of APs, then the CC's weights, stable per host.

Taking the fastest AP is right for one host and wrong for a fleet: with APs at 5.0, 5.3 and
6.1 ms (+-1 ms jitter) every host lands on whichever happened to answer first, and the CC's
``weight`` means nothing. So the choice has two steps:

1. **The band.** The live, usable APs that the anti-flap rule (:func:`sdnsup.probe.
   should_switch`) would not leave for the best one: an AP more than 10 ms *and* more than
   33% slower than the best is out. Within the band, RTT differences are noise for the
   traffic, so speed stops deciding.
2. **Rendezvous.** Each (host, AP) pair gets a key ``-weight / ln(u)``, ``u`` in (0, 1) a hash
   of the host id and the AP id (weighted rendezvous hashing, Resch 2013; also what Ceph's
   straw2 does). The AP with the highest key in the band wins. Over a fleet, AP *i* wins for
   a share ``weight_i / sum(weights)`` of the hosts (the keys are exponential variables with
   rates 1/weight). For one host the order never changes, so: it takes its top AP, fails over
   to its next one, and returns to the top once that is back. When an AP dies, its hosts
   spread over the survivors in proportion to their weights (their next-highest keys), not
   onto one AP; when it returns, its hosts come back, and nobody else moves.

Flapping at the band's edge: an AP whose RTT hovers near the anti-flap threshold would fall
in and out of the band on jitter. A host stays on its active AP as long as that AP is in the
band, but leaves it for a higher-keyed AP only when that one is *comfortably* in the band
(within half of both thresholds, and losing no more probes than the best): the gap between
the two is the hysteresis.

The host id is ``/etc/machine-id`` (stable for the life of an installation, unique per host,
and not secret-bearing as the hash only mixes it), ``--host-id`` overriding it (tests run
many clients on one machine; cloned images with one machine-id need it too).
"""

from __future__ import annotations

import hashlib
import math
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from sdnsup.aps import AccessPoint
from sdnsup.probe import MIN_GAIN_ABS, MIN_GAIN_REL

__all__ = [
    "ENTRY_SCALE",
    "MACHINE_ID",
    "Choice",
    "ResultLike",
    "band",
    "choose",
    "default_host_id",
    "eligible",
    "rendezvous_key",
    "window",
]

MACHINE_ID = Path("/etc/machine-id")
# A higher-keyed AP is switched to only within this fraction of the anti-flap thresholds.
ENTRY_SCALE = 0.5


class ResultLike(Protocol):
    """What the choice reads of a probe result (:class:`sdnsup.probe.ProbeResult`)."""

    @property
    def ap(self) -> AccessPoint: ...
    @property
    def rtt(self) -> float | None: ...
    @property
    def sent(self) -> int: ...
    @property
    def received(self) -> int: ...


# The callers' own result type comes back out: the daemon's ProbeResult, the fleet
# benchmark's simulated one.
R = TypeVar("R", bound=ResultLike)
ShouldSwitch = Callable[[Any, Any], bool]


def default_host_id(machine_id: Path = MACHINE_ID) -> str:
    """``/etc/machine-id``, or the host name where there is none (a minimal container)."""
    try:
        text = machine_id.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    return text or socket.gethostname()


def rendezvous_key(host: str, ap: AccessPoint) -> float:
    """The AP's weighted rendezvous key for ``host``: higher wins.

    ``u`` comes from BLAKE2b of both ids, 53 bits mapped to the open interval (0, 1), so
    ``ln(u)`` is finite and negative and the key positive.
    """
    digest = hashlib.blake2b(f"{host}\0{ap.id}".encode(), digest_size=8).digest()
    u = ((int.from_bytes(digest, "big") >> 11) + 0.5) / float(1 << 53)
    return -ap.weight / math.log(u)


def _loss(r: ResultLike) -> float:
    return 1.0 if r.sent <= 0 else 1.0 - min(r.received, r.sent) / r.sent


def _live(r: ResultLike) -> bool:
    return r.rtt is not None and r.received > 0


def _comfortably_near(r: ResultLike, best: ResultLike) -> bool:
    """Within ENTRY_SCALE of the anti-flap thresholds of ``best``, losing no more probes."""
    assert r.rtt is not None and best.rtt is not None
    if _loss(r) > _loss(best):
        return False
    gap = r.rtt - best.rtt
    return gap <= ENTRY_SCALE * MIN_GAIN_ABS or gap <= ENTRY_SCALE * MIN_GAIN_REL * r.rtt


def band(eligible: Sequence[R], should_switch: ShouldSwitch) -> list[R]:
    """The results of ``eligible`` (live and usable, best first) that the anti-flap rule
    would not leave for the first one; the first one is always in."""
    if not eligible:
        return []
    best = eligible[0]
    return [r for r in eligible if r is best or not should_switch(r, best)]


def eligible(
    ranking: Sequence[R], listed: Sequence[AccessPoint], usable: Callable[[str], bool]
) -> list[R]:
    """The results of ``ranking`` (best first) a host may choose: live, listed by the
    directory, and ``usable`` (not held down after a death: :class:`sdnsup.probe.
    Hysteresis`)."""
    return [r for r in ranking if _live(r) and r.ap in listed and usable(r.ap.id)]


def window(first_rtt: float) -> float:
    """How long after the first answer of a round every AP of its band has answered: an AP
    with RTT ``r`` is in the band if ``r - f <= MIN_GAIN_ABS`` or ``r <= f / (1 -
    MIN_GAIN_REL)``, and its answer comes ``r - f`` after the first one."""
    return max(MIN_GAIN_ABS, first_rtt * (1.0 / (1.0 - MIN_GAIN_REL) - 1.0))


@dataclass(frozen=True, slots=True)
class Choice(Generic[R]):
    """The AP to take and why: ``"chosen"`` (none was active), ``"unlisted"`` (the active
    one left the CC's list), ``"faster"`` (the active one fell out of the band),
    ``"preferred"`` (a higher-keyed AP is comfortably in the band: a return to the top)."""

    result: R
    reason: str


def choose(
    eligible: Sequence[R],
    *,
    host: str,
    active: AccessPoint | None,
    listed: bool,
    should_switch: ShouldSwitch,
) -> Choice[R] | None:
    """The AP this host should use now, or None to stay where it is.

    Args:
        eligible: live, usable APs of the last ranking, best first (dead and held-down
            APs already left out, and the AP to leave when failing over).
        host: the host id.
        active: the active AP (None: none).
        listed: whether the active AP is still in the directory.
        should_switch: the anti-flap rule (:func:`sdnsup.probe.should_switch`).

    With no eligible AP it returns None: whether that means "no AP" is the caller's call.
    """
    members = band(eligible, should_switch)
    if not members:
        return None

    def key(r: ResultLike) -> float:
        return rendezvous_key(host, r.ap)

    top = max(members, key=key)
    if active is None:
        return Choice(top, "chosen")
    if not listed:
        return Choice(top, "unlisted")
    current = next((r for r in members if r.ap == active), None)
    if current is None:
        # out of the band (or dead in this round): the band's own top, by key
        return Choice(top, "faster")
    entry = [r for r in members if _live(r) and _comfortably_near(r, members[0])]
    preferred = max(entry, key=key, default=None)
    if preferred is not None and preferred.ap != active and key(preferred) > key(current):
        return Choice(preferred, "preferred")
    return None
