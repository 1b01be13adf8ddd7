"""``scripts/bench faults``: the integration fault matrix, summarised as one table.

Runs pytest on the fault tests (``integration/test_faults_network.py`` and, when it exists,
``integration/test_faults_process.py``) with ``$SDNSUP_FAULT_REPORT`` naming a temp file. Each
test injects one fault while a stream of short TCP connections runs A -> B and B -> A
(:class:`sdnsup.lab.traffic.ConnectionStream`), waits for full service and appends its figures
to that file (:func:`integration.faultlib.record`). This prints, per fault: connections
attempted, failed each way, and the time from the fault to the first connection of the healthy
streak (through the AP sdnsup should use, where the test names one), then writes
``bench-results/faults.json``.

``--runs N`` repeats the whole matrix: counts are added up, recovery times become median
(min-max). Arguments after ``--`` go to pytest (``-- -k flush``). Exit status 1 when a test
failed (a fault did not end with full service) or nothing was recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import ROOT, Stat, print_table, stat, write_json

FAULT_FILES = ("integration/test_faults_network.py", "integration/test_faults_process.py")
FAULT_REPORT_ENV = "SDNSUP_FAULT_REPORT"  # integration.faultlib.FAULT_REPORT_ENV
DIRECTIONS = ("a->b", "b->a")


@dataclass
class Row:
    """One fault's figures over every run."""

    test: str
    attempted: int = 0
    failed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0))
    recoveries: list[float] = field(default_factory=list)
    not_recovered: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, rec: dict[str, Any]) -> None:
        self.attempted += int(rec["attempted"])
        for direction in DIRECTIONS:
            self.failed[direction] += int(rec["by_direction"].get(direction, (0, 0))[1])
        if rec.get("recovery") is None:
            self.not_recovered += 1
        else:
            self.recoveries.append(float(rec["recovery"]))
        if rec.get("note"):
            self.notes.append(str(rec["note"]))

    def recovery(self) -> Stat | None:
        return stat(self.recoveries) if self.recoveries else None


def run_matrix(files: list[str], report: Path, pytest_args: list[str]) -> tuple[int, float]:
    """Run pytest on ``files`` with the report file set; its exit status and wall time."""
    env = dict(os.environ, **{FAULT_REPORT_ENV: str(report)})
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, *pytest_args]
    print(f"$ {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    started = time.monotonic()
    # pytest's own output goes to stderr, so stdout holds only the tables.
    code = subprocess.run(argv, cwd=ROOT, env=env, stdout=sys.stderr, check=False).returncode
    return code, time.monotonic() - started


def read_records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a killed test
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench faults", description=__doc__)
    parser.add_argument("--runs", type=int, default=1, help="repeat the matrix N times")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    files = [f for f in FAULT_FILES if (ROOT / f).exists()]
    for missing in sorted(set(FAULT_FILES) - set(files)):
        print(f"(skipping {missing}: not there)", file=sys.stderr)
    rows: dict[str, Row] = {}
    codes: list[int] = []
    seconds: list[float] = []
    with tempfile.TemporaryDirectory(prefix="sdnsup-faults-") as tmp:
        for run in range(args.runs):
            report = Path(tmp) / f"run{run}.jsonl"
            code, wall = run_matrix(files, report, args.pytest_args)
            codes.append(code)
            seconds.append(wall)
            for rec in read_records(report) if report.exists() else []:
                rows.setdefault(rec["fault"], Row(test=str(rec.get("test") or ""))).add(rec)

    table = []
    for fault, row in rows.items():
        rec_stat = row.recovery()
        if rec_stat is None:
            recovery = "-"
        elif rec_stat.max == 0.0:
            recovery = "0 (no connection affected)"
        else:
            recovery = rec_stat.fmt("ms")
        if row.not_recovered:
            recovery += f" ({row.not_recovered} not recovered)"
        table.append(
            [fault, str(row.attempted), str(row.failed["a->b"]), str(row.failed["b->a"]), recovery]
        )
    head = ["fault", "connections attempted", "failed a->b", "failed b->a", "time to recover"]
    runs = f"{args.runs} run{'s' if args.runs > 1 else ''}"
    print_table(f"fault matrix ({runs}, pytest {', '.join(map(str, codes))})", head, table)
    for fault, row in rows.items():
        for note in dict.fromkeys(row.notes):
            print(f"  {fault}: {note}")
    write_json(
        "faults",
        {
            "runs": args.runs,
            "pytest_exit": codes,
            "pytest_seconds": stat(seconds),
            "files": files,
            "faults": {
                fault: {
                    "test": row.test,
                    "attempted": row.attempted,
                    "failed": row.failed,
                    "recovery_seconds": row.recovery(),
                    "not_recovered": row.not_recovered,
                    "notes": list(dict.fromkeys(row.notes)),
                }
                for fault, row in rows.items()
            },
        },
    )
    if any(codes) or not rows:
        print("FAILED: a fault test failed or none recorded figures (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
