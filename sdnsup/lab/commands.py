"""Run the lab's ``ip``/``nft``/``sysctl`` commands, one at a time or several at once.

The lab is a test harness, so it shells out to the standard tools. Building a topology is a
handful of *phases*; the commands inside one phase touch different namespaces and run in
parallel (:func:`run_parallel`), which keeps a lab build well under a second.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0


class LabError(RuntimeError):
    """The lab could not be built or torn down, or a lab service misbehaved."""


class WaitTimeout(LabError):
    """:func:`wait_for` gave up."""


def wait_for(what: str, timeout: float, predicate: Callable[[], T], step: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy (bounded in time) and return it.

    Raises:
        WaitTimeout: after ``timeout`` seconds, naming ``what`` was awaited.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (temp file in the same dir, then rename), so
    a lab server re-reading its control file never sees half of it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class CommandError(LabError):
    """A lab command exited non-zero. The message carries its stderr (and batch input)."""

    def __init__(
        self,
        argv: Sequence[str],
        returncode: int,
        stdout: str = "",
        stderr: str = "",
        stdin: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.stdin = stdin
        msg = f"`{shlex.join(self.argv)}` exited with {returncode}"
        if stderr.strip():
            msg += f": {stderr.strip()}"
        if stdin:
            msg += "\n--- input ---\n" + stdin.rstrip()
        super().__init__(msg)


@dataclass(frozen=True, slots=True)
class Job:
    """One command of a parallel phase; ``stdin`` is fed to it (e.g. an ``ip -batch -`` script)."""

    argv: tuple[str, ...]
    stdin: str | None = None

    @classmethod
    def of(cls, *argv: str, stdin: str | None = None) -> Job:
        return cls(tuple(argv), stdin)


def run(
    argv: Sequence[str],
    *,
    stdin: str | None = None,
    check: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion with text output captured (``env``: the whole environment).

    Raises :class:`CommandError` when ``check`` and the exit status is non-zero, and
    :class:`subprocess.TimeoutExpired` (after killing it) when it outlives ``timeout``.
    """
    proc = subprocess.run(
        list(argv),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        env=env,
    )
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stdout, proc.stderr, stdin)
    return proc


def run_parallel(jobs: Sequence[Job], *, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Start every job at once and wait for all of them.

    All jobs are waited for even when one fails, so nothing is left running; then the first
    failure is raised as :class:`CommandError`. Jobs still running at ``timeout`` are killed.
    """
    started: list[tuple[Job, subprocess.Popen[str]]] = []
    try:
        for job in jobs:
            proc = subprocess.Popen(
                list(job.argv),
                stdin=subprocess.PIPE if job.stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            started.append((job, proc))
            if job.stdin is not None and proc.stdin is not None:
                # Batch scripts are a few KiB at most: far below a pipe's buffer, never blocks.
                proc.stdin.write(job.stdin)
                proc.stdin.close()
                proc.stdin = None  # so that communicate() below does not flush it again
        deadline = time.monotonic() + timeout
        failures: list[CommandError] = []
        for job, proc in started:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                out, err = proc.communicate(timeout=remaining)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                err = f"timed out after {timeout:.0f}s\n{err}"
                failures.append(CommandError(job.argv, -9, out, err, job.stdin))
                continue
            if proc.returncode != 0:
                failures.append(CommandError(job.argv, proc.returncode, out, err, job.stdin))
        if failures:
            raise failures[0]
    finally:
        for _, proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
