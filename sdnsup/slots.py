"""AP slots: which AP each slot of the connection mark stands for, and what it is doing.

A connection is pinned, at its first packet, to the slot of the AP that packet was routed
to (see :mod:`sdnsup.nft`); its later packets follow the slot, not whichever AP is active.
An AP keeps its slot for as long as connections are pinned to it:

* ``active``: new connections take this AP (one slot at most);
* ``draining``: alive but no longer chosen (a faster AP won, the CC stopped listing it);
  its pinned connections keep using it, new ones do not. Freed once none is left;
* ``dead``: its AP died; its slot's routes are gone, so its connections follow the active
  AP at once, and the slot is freed once they have been re-pinned (:mod:`sdnsup.pins`).

:class:`SlotTable` is the pure bookkeeping the supervisor does with them: no I/O, no clock
of its own (callers pass wall-clock times for status).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from sdnsup.aps import AccessPoint, ProbeSpec
from sdnsup.state import Slot

Role = Literal["active", "draining", "dead"]


@dataclass(slots=True)
class SlotEntry:
    """One slot in use."""

    number: int
    ap: AccessPoint
    role: Role
    since: float  # wall clock: when it took this role
    pinned: int | None = None  # live connections pinned to it at the last count
    # set when it became draining: how many connections it carried then (for the log)
    drained_from: int | None = None


@dataclass
class SlotTable:
    """The slots of one daemon: numbers 1..``capacity``.

    A number is free when no entry holds it; an entry is removed only once no connection is
    pinned to it any more (:meth:`vacated`), so a number is never reused while a
    connection still carries it.
    """

    capacity: int
    entries: dict[int, SlotEntry] = field(default_factory=dict)

    def find(self, ap: AccessPoint) -> SlotEntry | None:
        """The live (active or draining) slot of ``ap``: by id, or by address (the CC may
        rename an AP, and a restarted daemon knows recovered slots only by address)."""
        for entry in self.entries.values():
            if entry.role != "dead" and (entry.ap.id == ap.id or _same_addresses(entry.ap, ap)):
                return entry
        return None

    @property
    def active(self) -> SlotEntry | None:
        return next((e for e in self.entries.values() if e.role == "active"), None)

    def draining(self) -> list[SlotEntry]:
        return [e for e in self.entries.values() if e.role == "draining"]

    def activate(self, ap: AccessPoint, now: float) -> SlotEntry | None:
        """Make ``ap``'s slot the active one, taking a free number if it has none.

        The previous active slot (another AP's) becomes draining: the caller has already
        retired it if its AP died. Returns None when every number is taken: ``ap`` is
        then active without a slot (new connections are pinned once a number frees up).
        """
        entry = self.find(ap)
        for other in self.entries.values():
            if other.role == "active" and other is not entry:
                other.role, other.since, other.drained_from = "draining", now, other.pinned
        if entry is None:
            number = self.free_number()
            if number is None:
                return None
            entry = self.entries[number] = SlotEntry(number, ap, "active", now)
        elif entry.role != "active":
            entry.role, entry.since, entry.drained_from = "active", now, None
        entry.ap = ap  # the newest description (probe spec, addresses) of that AP
        return entry

    def deactivate(self, now: float) -> None:
        """No AP is active any more (none usable): the active slot drains."""
        for entry in self.entries.values():
            if entry.role == "active":
                entry.role, entry.since, entry.drained_from = "draining", now, entry.pinned

    def retire(self, number: int, now: float) -> SlotEntry | None:
        """The slot's AP died: its connections must follow the active AP."""
        entry = self.entries.get(number)
        if entry is not None:
            entry.role, entry.since = "dead", now
        return entry

    def vacated(self, number: int) -> SlotEntry | None:
        """No connection is pinned to the slot any more: free it, unless it became active
        again meanwhile (fail-back to its AP), which keeps it."""
        entry = self.entries.get(number)
        if entry is None or entry.role == "active":
            return None
        return self.entries.pop(number)

    def free_number(self) -> int | None:
        return next((n for n in range(1, self.capacity + 1) if n not in self.entries), None)

    def state(self) -> tuple[Slot, ...]:
        """The slots the kernel must hold (dead ones have no routes any more)."""
        return tuple(
            Slot(e.number, e.ap.addr4, e.ap.addr6, draining=e.role == "draining")
            for e in sorted(self.entries.values(), key=lambda e: e.number)
            if e.role != "dead"
        )

    def recover(
        self, slots: Iterable[Slot], known: Sequence[AccessPoint], probe: ProbeSpec, now: float
    ) -> list[SlotEntry]:
        """Take the slots an earlier process left in the kernel, all as draining: their
        connections keep their AP; choosing an active AP (:meth:`activate`) reuses its slot.

        Each slot's AP is found among ``known`` by address; an AP no longer known is kept
        under its address as id, probed with ``probe``.
        """
        found = []
        for slot in slots:
            if not 1 <= slot.number <= self.capacity or slot.number in self.entries:
                continue
            ap = AccessPoint(
                id="+".join(str(a) for a in (slot.addr4, slot.addr6) if a is not None),
                addr4=slot.addr4,
                addr6=slot.addr6,
                probe=probe,
            )
            ap = next((k for k in known if _same_addresses(k, ap)), ap)
            entry = SlotEntry(slot.number, ap, "draining", now)
            self.entries[slot.number] = entry
            found.append(entry)
        return found

    def update_directory(self, aps: Sequence[AccessPoint]) -> None:
        """Follow the directory's newest description of each slot's AP (by address)."""
        for entry in self.entries.values():
            match = next((a for a in aps if _same_addresses(a, entry.ap)), None)
            if match is not None:
                entry.ap = match


def _same_addresses(a: AccessPoint, b: AccessPoint) -> bool:
    """Same next hop: an address of one family in common and none in conflict."""
    pairs = [(a.addr4, b.addr4), (a.addr6, b.addr6)]
    shared = [(x, y) for x, y in pairs if x is not None and y is not None]
    return bool(shared) and all(x == y for x, y in shared)
