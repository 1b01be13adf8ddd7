"""What every ``scripts/bench_*.py`` shares: figures over repeated runs, tables, JSON results.

A benchmark prints one table per scenario to stdout and writes the same figures as JSON to
``bench-results/<name>.json`` (override the folder with ``SDNSUP_BENCH_RESULTS``), so a run on
a fresh clone can be compared with an older one by a script rather than by eye. Benchmarks
print figures next to their targets; they never fail on timing (exit 1 means a measurement
could not be taken at all).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(os.environ.get("SDNSUP_BENCH_RESULTS", ROOT / "bench-results"))


@dataclass(frozen=True)
class Stat:
    """Median, min and max of one figure over ``n`` runs, in the figure's own unit."""

    median: float
    min: float
    max: float
    n: int
    values: tuple[float, ...]

    def fmt(self, unit: str = "ms", digits: int = 1) -> str:
        """``"12.3 ms (10.1-15.2, n=5)"``; seconds are shown in ms when ``unit`` is "ms"."""
        scale = 1000.0 if unit == "ms" else 1.0
        m, lo, hi = (f"{v * scale:.{digits}f}" for v in (self.median, self.min, self.max))
        if self.n == 1:
            return f"{m} {unit}"
        return f"{m} {unit} ({lo}-{hi}, n={self.n})"


def positive_int(text: str) -> int:
    """argparse ``type`` for ``--runs`` and other counts: an integer of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def no_lab_exit() -> int | None:
    """77 (with the reason on stderr) when no lab can be built here, else None."""
    from sdnsup.lab import unavailable_reason

    reason = unavailable_reason()
    if reason is None:
        return None
    print(f"cannot build a lab here: {reason}", file=sys.stderr)
    return 77


def stat(values: Iterable[float]) -> Stat:
    """The :class:`Stat` of ``values`` (at least one)."""
    vals = tuple(values)
    if not vals:
        raise ValueError("stat() of no values")
    return Stat(statistics.median(vals), min(vals), max(vals), len(vals), vals)


def ratio(a: Stat, b: Stat) -> Stat:
    """Per-run ratio a/b of two figures measured in the same runs (paired, same length)."""
    return stat(x / y for x, y in zip(a.values, b.values, strict=True))


def print_table(title: str, head: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A titled, column-aligned table on stdout."""
    print(f"\n== {title}")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _plain(obj: Any) -> Any:
    if isinstance(obj, Stat):
        return asdict(obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def write_json(name: str, figures: dict[str, Any]) -> Path:
    """Write ``figures`` (Stats become dicts) to ``RESULTS_DIR/<name>.json`` with the machine
    facts that make figures comparable (kernel, CPUs, Python), and return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    doc = {
        "benchmark": name,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "figures": _plain(figures),
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    print(f"\n(figures written to {path})")
    return path
