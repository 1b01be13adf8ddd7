"""Path health: is the AP still forwarding, or does it only answer its probes?

A gray failure of an overlay edge: the AP's tunnel or uplink into the overlay is dead, its
probe agent and access link are fine. Its probes keep answering, so keepalives never see
it; every connection through it fails. Two kinds of evidence, then one confirmation:

* **Passive** (on by default, nothing to configure): connection attempts that sdnsup steered
  through the active AP and that never saw a reply. The pin keeper asks conntrack for the
  entries pinned to the active AP's slot that lack IPS_SEEN_REPLY (:mod:`sdnsup.conntrack`:
  the kernel filters, so only those few come back); :class:`PassiveDetector` turns the
  successive answers into failed destinations. When attempts to
  :data:`SUSPECT_DESTINATIONS` distinct destinations failed within
  :data:`SUSPECT_WINDOW`, the AP is *suspect*. One server that stops answering is never
  enough: a dead destination is not a dead path.
* **Tracked targets** (``--track``, the CC's ``track`` lists): hosts inside the CIDRs probed
  every :data:`TRACK_INTERVAL` through the active AP and through another live AP at once.
* **Confirmation**: a suspect AP is checked by probing the destinations that failed (their
  TCP port, or an ICMP echo) through the active AP and, at the same moment, through another
  live AP (the next of the ranking) and by the normal route (no AP: where the no-AP
  fallback would send the traffic). Only "nothing answers through the active AP while
  something answers another way" confirms it (and if the other AP got nothing either while
  the normal route did, that AP is broken too: every AP's overlay side may be down);
  "nothing answers anywhere" means the destinations are down, not the AP, and clears the
  suspicion (those destinations are then excused for :data:`EXCUSE` so that they do not
  raise it again at once).

Probing *through* an AP that is not the active one needs the kernel's help: the probe's
socket carries the probe mark (:attr:`sdnsup.state.Settings.probe_mark`) and a policy rule
sends it to a table holding host routes to the probe targets via that AP (see
:func:`sdnsup.applier.render`). A probe by the normal route carries the bypass mark, which
sdnsup's chains leave alone and no rule of sdnsup's matches. A probe through the active AP is
a plain connection: the CIDR routes take it there.

What this never does: fail over on evidence from one destination, or when nothing answers
any way (the targets are down then).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import trio

from sdnsup.aps import Target
from sdnsup.conntrack import Entry
from sdnsup.defaults import SUSPECT_DESTINATIONS, SUSPECT_WINDOW
from sdnsup.errors import SdnsupError
from sdnsup.probe import probe_address

log = logging.getLogger("sdnsup")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# An attempt is unanswered once it waited this long: TCP retransmits an unanswered SYN after
# 1 s (its initial RTO, RFC 6298), and a path that works answers within one RTT, milliseconds
# to a hundred or two across an overlay.
UNANSWERED_AFTER = 1.0
# Destinations that failed through every AP (down, not the path) are ignored this long, so
# that they do not raise the same suspicion at every poll.
EXCUSE = 60.0
# The pin keeper asks conntrack for unanswered attempts this often while passive checking is
# on: with UNANSWERED_AFTER, an AP whose forwarding died is suspect 1-1.5 s after the first
# failed attempts, confirmed ~0.5 s later.
POLL = 0.5
# Confirmation and track probes: each has this deadline (overlay targets are tens of ms away).
CONFIRM_TIMEOUT = 0.5
# Destinations probed to confirm a suspicion (the most recent failures).
CONFIRM_TARGETS = 3


# --- passive evidence --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Failure:
    """A destination whose connection attempts through the AP got no reply."""

    target: Target  # what to probe to confirm: its TCP port, else an ICMP echo
    attempts: int  # unanswered attempts seen
    last: float  # when last seen failing


@dataclass
class PassiveDetector:
    """Failed destinations from successive lists of unanswered attempts; pure (the caller
    passes the time).

    Feed it :meth:`observe` with what conntrack holds *now*: the entries pinned to the
    active AP that never saw a reply. An entry is an unanswered attempt once it was seen for
    ``unanswered_after`` (an entry that got a reply leaves the list; one that ended without
    any stays until its conntrack timeout, which is fine: still a failure, counted once).
    """

    destinations: int = SUSPECT_DESTINATIONS
    window: float = SUSPECT_WINDOW
    unanswered_after: float = UNANSWERED_AFTER
    _first_seen: dict[tuple[int, str, str, int, int], float] = field(default_factory=dict)
    _counted: set[tuple[int, str, str, int, int]] = field(default_factory=set)
    _failed: dict[IPAddress, Failure] = field(default_factory=dict)
    _excused: dict[IPAddress, float] = field(default_factory=dict)

    def reset(self) -> None:
        """Forget everything (the active AP changed: its evidence belongs to the old one)."""
        self._first_seen.clear()
        self._counted.clear()
        self._failed.clear()

    def observe(self, unanswered: Iterable[Entry], now: float) -> list[Failure] | None:
        """Take one poll's unanswered entries; the failed destinations, most recent first,
        when they are enough for a suspicion, else None."""
        present = set()
        for e in unanswered:
            key = (e.proto, str(e.src), str(e.dst), e.sport, e.dport)
            present.add(key)
            seen = self._first_seen.setdefault(key, now)
            if now - seen < self.unanswered_after or key in self._counted:
                continue
            self._counted.add(key)
            if self._excused.get(e.dst, -1.0) > now:
                continue
            target = Target(e.dst, "tcp", e.dport) if e.proto == socket.IPPROTO_TCP else None
            old = self._failed.get(e.dst)
            self._failed[e.dst] = Failure(
                target or (old.target if old else Target(e.dst)),
                (old.attempts if old else 0) + 1,
                now,
            )
        for key in list(self._first_seen):
            if key not in present:
                del self._first_seen[key]
                self._counted.discard(key)
        for dst, failure in list(self._failed.items()):
            if now - failure.last > self.window:
                del self._failed[dst]
        for dst, until in list(self._excused.items()):
            if until <= now:
                del self._excused[dst]
        if len(self._failed) < self.destinations:
            return None
        return sorted(self._failed.values(), key=lambda f: -f.last)

    def excuse(self, addrs: Iterable[IPAddress], now: float) -> None:
        """These destinations failed through every AP: ignore them for :data:`EXCUSE`."""
        for addr in addrs:
            self._excused[addr] = now + EXCUSE
            self._failed.pop(addr, None)

    def clear(self) -> None:
        """Start counting anew (after a verdict), keeping the excuses."""
        self._failed.clear()


# --- probing through an AP ----------------------------------------------------------------------

ProbeTarget = Callable[[Target, int | None, float], Awaitable[str | None]]
"""``await probe(target, mark, timeout)``: None when the target answered, else why not."""


async def probe_target(target: Target, mark: int | None, timeout: float) -> str | None:
    """Probe ``target`` once; with ``mark``, its packets carry that packet mark (SO_MARK).

    A TCP reset or an ICMP port unreachable from the target counts as an answer: the path
    to it works, whatever listens there.

    Returns:
        None when the target answered, else a short reason ("timeout", "network
        unreachable"...).
    """
    with trio.move_on_after(timeout):
        try:
            await probe_address(target.kind, target.addr, target.port, mark=mark)
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ECONNRESET):
                return None  # the host itself answered
            return (exc.strerror or type(exc).__name__).lower()
        except SdnsupError as exc:  # no ICMP socket
            return str(exc)
        return None
    return "timeout"


@dataclass(frozen=True, slots=True)
class Comparison:
    """The same targets probed through the active AP, through another live AP (if any) and
    by the normal route (no AP: what the no-AP fallback would use)."""

    active: dict[Target, str | None]  # target -> None (answered) or why not
    other: dict[Target, str | None] | None
    normal: dict[Target, str | None]

    @staticmethod
    def _none(results: dict[Target, str | None] | None) -> bool:
        return results is None or all(results.values())

    @property
    def broken(self) -> bool:
        """Nothing answered through the active AP; something did another way."""
        return self._none(self.active) and not (self._none(self.other) and self._none(self.normal))

    @property
    def other_broken(self) -> bool:
        """The AP compared with got nothing either, but the normal route did: both paths
        are broken (every AP's overlay side may be down)."""
        return self.broken and self.other is not None and self._none(self.other)

    @property
    def targets_down(self) -> bool:
        """Nothing answered any way: the targets are down, not the path."""
        return self._none(self.active) and self._none(self.other) and self._none(self.normal)

    def evidence(self) -> str:
        def side(results: dict[Target, str | None]) -> str:
            ok = sum(1 for r in results.values() if r is None)
            why = sorted({r for r in results.values() if r is not None})
            return f"{ok}/{len(results)} answered" + (f" ({', '.join(why)})" if why else "")

        parts = [f"through it {side(self.active)}"]
        if self.other is not None:
            parts.append(f"through the other AP {side(self.other)}")
        parts.append(f"by the normal route {side(self.normal)}")
        return ", ".join(parts)


async def compare(
    targets: Sequence[Target],
    probe: ProbeTarget,
    other_mark: int | None,
    normal_mark: int,
    timeout: float = CONFIRM_TIMEOUT,
) -> Comparison:
    """Probe ``targets`` through the active AP (plain sockets) and, at the same moment,
    through the AP the probe mark leads to (``other_mark``; None: no other AP) and by the
    normal route (``normal_mark``)."""
    active: dict[Target, str | None] = {}
    other: dict[Target, str | None] = {}
    normal: dict[Target, str | None] = {}

    async def one(target: Target, mark: int | None, out: dict[Target, str | None]) -> None:
        out[target] = await probe(target, mark, timeout)

    async with trio.open_nursery() as nursery:
        for target in targets:
            nursery.start_soon(one, target, None, active)
            if other_mark is not None:
                nursery.start_soon(one, target, other_mark, other)
            nursery.start_soon(one, target, normal_mark, normal)
    return Comparison(active, other if other_mark is not None else None, normal)


def describe_failures(failures: Sequence[Failure]) -> str:
    shown = ", ".join(f"{f.target.addr} ({f.attempts})" for f in failures[:5])
    more = f" and {len(failures) - 5} more" if len(failures) > 5 else ""
    total = sum(f.attempts for f in failures)
    return f"{total} unanswered connection attempts to {len(failures)} destinations: {shown}{more}"
