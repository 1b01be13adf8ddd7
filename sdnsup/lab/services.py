"""What every lab process is built on: environment, argv, tracking, stopping, sessions.

:class:`~sdnsup.lab.processes.Lab` starts its processes with these helpers.

Everything is started as ``ip netns exec NS argv...`` (``ip`` execs, so the Popen's pid is the
program itself) in a new session, so a Ctrl-C on the terminal does not reach it before the lab
decides to stop it: SIGTERM to its process group, SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The directory that holds the ``sdnsup`` package, put on PYTHONPATH of every lab process so
# that ``python -m sdnsup...`` works from a source checkout that is not pip-installed.
SOURCE_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_GRACE = 5.0


def python_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment, with ``sdnsup`` importable and unbuffered output."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    parts = [str(SOURCE_ROOT), *(p for p in path.split(os.pathsep) if p)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def python_module(module: str, *args: str) -> list[str]:
    """argv running ``module`` with this very interpreter (the one of the virtualenv)."""
    return [sys.executable, "-m", module, *args]


def lab_script(name: str, *args: str) -> list[str]:
    """argv running the stdlib-only lab module ``sdnsup/lab/<name>.py`` by path.

    Same as ``python -m sdnsup.lab.<name>``, but without importing the ``sdnsup`` package
    (whose ``__init__`` loads the whole daemon): a probe starts in ~50 ms instead of several
    hundred, and the lab keeps working while the daemon's modules are being edited. ``-P``
    keeps ``sdnsup/lab/`` itself off ``sys.path``.
    """
    return [sys.executable, "-P", str(Path(__file__).with_name(f"{name}.py")), *args]


def in_namespace(ns: str, argv: Sequence[str]) -> list[str]:
    """argv running ``argv`` inside the named network namespace ``ns``."""
    return ["ip", "netns", "exec", ns, *argv]


@dataclass(eq=False)
class TrackedProcess:
    """A process the lab started, and where its output goes."""

    proc: subprocess.Popen[bytes]
    label: str
    log_path: Path | None


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Send ``sig`` to the process group led by ``proc``, or to ``proc`` alone if it leads none."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)


def stop_processes(procs: Sequence[subprocess.Popen[bytes]], grace: float = DEFAULT_GRACE) -> None:
    """SIGTERM all of ``procs`` at once, wait up to ``grace`` seconds, then SIGKILL the rest."""
    for proc in procs:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


class Session:
    """One persistent TCP connection from a lab namespace to a :mod:`~sdnsup.lab.whoami` server.

    Backed by ``python -m sdnsup.lab.probe --session``. :meth:`ask` sends a line over the same
    connection, which proves that a connection opened before a routing change still works
    after it. ``greeting`` is the address the server saw when the connection was opened.
    """

    def __init__(self, proc: subprocess.Popen[bytes], description: str) -> None:
        if proc.stdin is None or proc.stdout is None:
            raise ValueError("a Session needs a process with stdin and stdout pipes")
        self._proc = proc
        self._stdin = proc.stdin
        self._stdout_fd = proc.stdout.fileno()
        self._buffer = b""
        self._counter = 0
        self.description = description
        self.greeting: str | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        """The client process (``python -m sdnsup.lab.probe --session``)."""
        return self._proc

    def _readline(self, deadline: float) -> str | None:
        """The next line the client printed, None on timeout or when it exited."""
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([self._stdout_fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(self._stdout_fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode("utf-8", "replace")

    def wait_greeting(self, timeout: float) -> str | None:
        """Wait for the connection's greeting (the address the server saw) and store it."""
        if self.greeting is None:
            self.greeting = self._readline(time.monotonic() + timeout)
        return self.greeting

    def ask(self, text: str, timeout: float = 3.0) -> str | None:
        """Send ``text`` on the connection; the server's reply ``"peer <addr> <text>"`` or None.

        None means no reply within ``timeout`` or the connection is gone. A reply arriving late
        is recognised by its text and skipped by later calls, so use a distinct ``text`` for
        each question when some may time out.
        """
        if "\n" in text or "\r" in text:
            raise ValueError("a session question is a single line")
        if self._proc.poll() is not None:
            return None
        try:
            self._stdin.write(f"{text}\n".encode())
            self._stdin.flush()
        except (BrokenPipeError, ValueError):  # the client exited / we closed it
            return None
        deadline = time.monotonic() + timeout
        while True:
            line = self._readline(deadline)
            if line is None:
                return None
            if line.startswith("peer ") and line.split(" ", 2)[2:] == [text]:
                return line

    def peer(self, timeout: float = 3.0) -> str | None:
        """The address the server sees on this connection now (None if it does not answer)."""
        self._counter += 1
        reply = self.ask(f"check-{self._counter}-{time.monotonic_ns()}", timeout)
        return reply.split(" ", 2)[1] if reply else None

    @property
    def alive(self) -> bool:
        """Whether the client process (and so the connection, as far as it knows) is still up."""
        return self._proc.poll() is None

    def close(self, timeout: float = 2.0) -> None:
        """Close the connection: EOF on the client's stdin, then kill it if it lingers."""
        with contextlib.suppress(OSError, ValueError):
            self._stdin.close()
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_processes([self._proc], grace=0.5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Session {self.description} greeting={self.greeting!r} alive={self.alive}>"


@dataclass
class TickerReport:
    """What a :class:`Ticker`'s connection went through (see :mod:`sdnsup.lab.ticker`)."""

    opened: bool
    sent: int  # lines sent (0 for an idle connection)
    answered: int
    late: int  # lines unanswered within the ticker's timeout
    errors: list[dict[str, Any]]  # each: t, err (ECONNRESET, ECONNABORTED, EOF...), text
    peers: Counter[str] = field(default_factory=Counter)  # address the server saw -> lines
    reopened_at: float | None = None  # idle: monotonic time the reconnect succeeded
    reopened_peer: str | None = None

    @property
    def lost(self) -> int:
        """Lines that never got their answer (sent, not answered)."""
        return self.sent - self.answered

    def __str__(self) -> str:
        errs = ", ".join(e["err"] for e in self.errors) or "none"
        return (
            f"sent {self.sent}, answered {self.answered}, late {self.late}, errors {errs}, "
            f"peers {dict(self.peers)}"
        )


class Ticker:
    """A long-lived connection from a lab namespace that counts its lost lines and resets.

    Backed by ``sdnsup/lab/ticker.py``; its JSON events are read by a thread as they come.
    :meth:`stop` ends it (closing its stdin) and returns the final :class:`TickerReport`.
    """

    def __init__(self, proc: subprocess.Popen[bytes], description: str) -> None:
        if proc.stdout is None or proc.stdin is None:
            raise ValueError("a Ticker needs a process with stdin and stdout pipes")
        self.proc = proc
        self.description = description
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):  # the pipe closed under us: done
            for raw in self.proc.stdout:
                with contextlib.suppress(ValueError):
                    event = json.loads(raw)
                    with self._lock:
                        self.events.append(event)

    def wait_open(self, timeout: float = 5.0) -> str | None:
        """The address the server saw when the connection opened; None if it did not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for e in self.events:
                    if e["ev"] == "open":
                        return str(e["peer"])
                    if e["ev"] == "error":
                        return None
            time.sleep(0.01)
        return None

    def wait_for(self, ev: str, timeout: float) -> dict[str, Any] | None:
        """The first event of kind ``ev``, waiting up to ``timeout`` seconds for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = next((e for e in self.events if e["ev"] == ev), None)
            if found is not None:
                return found
            time.sleep(0.01)
        return None

    def report(self) -> TickerReport:
        """What happened so far (the final counts once :meth:`stop` returned)."""
        with self._lock:
            events = list(self.events)
        ticks = [e for e in events if e["ev"] == "tick"]
        end = next((e for e in events if e["ev"] == "end"), None)
        sent = int(end["sent"]) if end else max((e["seq"] for e in ticks), default=0)
        reopen = next((e for e in events if e["ev"] == "reopen"), None)
        return TickerReport(
            opened=any(e["ev"] == "open" for e in events),
            sent=sent,
            answered=len(ticks),
            late=sum(1 for e in events if e["ev"] == "late"),
            errors=[e for e in events if e["ev"] == "error"],
            peers=Counter(str(e["peer"]) for e in ticks),
            reopened_at=reopen["t"] if reopen else None,
            reopened_peer=reopen["peer"] if reopen else None,
        )

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """Ask the ticker to end (EOF on its stdin) without waiting: :meth:`stop` waits."""
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()

    def stop(self, timeout: float = 5.0) -> TickerReport:
        """End the connection (EOF on the ticker's stdin) and return its final report."""
        self.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_processes([self.proc], grace=0.5)
        self._reader.join(timeout)
        return self.report()

    def __repr__(self) -> str:
        return f"<Ticker {self.description} {self.report()}>"
