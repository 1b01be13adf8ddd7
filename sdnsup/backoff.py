"""The one backoff policy: a delay that starts at ``first`` and doubles after every failure,
up to ``cap``.

Where many hosts meet on the same retries (a fleet asking its CC after an outage), the delay
is drawn uniformly from [0, :func:`ceiling`] ("full jitter", see :mod:`sdnsup.discovery` and
:mod:`sdnsup.refresh`), so that the k-th retries of a fleet restarted together spread over the
whole window instead of arriving in waves. Local restarts and retries (a crashed task, a
failed apply) meet nobody: :class:`Backoff` waits the ceiling itself, which keeps their
timing predictable in logs and tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def ceiling(first: float, cap: float, failures: int) -> float:
    """The delay after ``failures`` failed attempts (>= 1): ``first * 2 ** (failures - 1)``,
    at most ``cap``."""
    exponent = min(max(failures - 1, 0), 32)  # 2**32 s is past any cap: no float overflow
    return min(cap, first * 2.0**exponent)


@dataclass(slots=True)
class Backoff:
    """The delay before the next restart or retry of a local task: ``first``, then doubling
    up to ``cap``, back to ``first`` after :meth:`reset` (a success)."""

    first: float
    cap: float
    _failures: int = field(init=False, default=0)

    @property
    def current(self) -> float:
        """The delay :meth:`take` would give now."""
        return ceiling(self.first, self.cap, self._failures + 1)

    def take(self) -> float:
        """The delay to wait now; the next one is twice as long (at most ``cap``)."""
        self._failures += 1
        return ceiling(self.first, self.cap, self._failures)

    def reset(self) -> None:
        self._failures = 0
