"""Removing lab namespaces: by prefix, at interpreter exit, on SIGTERM, and after a crash.

Every lab namespace is named ``<prefix><role>``; :func:`cleanup` kills every process inside the
namespaces starting with a prefix, then deletes them (their interfaces go with them). Nothing
here touches the root network namespace.

Three safety nets keep namespaces from leaking:

* :class:`~sdnsup.lab.topology.Topology` (so every :class:`~sdnsup.lab.processes.Lab`) is a
  context manager, and registers itself here so that an ``atexit`` hook tears down any lab
  still up when the interpreter exits;
* SIGTERM and SIGHUP, when nobody else handles them, raise :class:`KeyboardInterrupt` so that
  ``finally`` blocks and fixtures run (the default action would kill the process outright);
* a marker file per live prefix (``/run/sdnsup-lab/<prefix>``: the owner's pid and start
  time, and the lab's temp dir) lets :func:`cleanup_stale` remove the namespaces of a process
  that was SIGKILLed. It only touches prefixes that have a marker and whose owner is gone.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import Protocol

from sdnsup.lab.commands import LabError, run

NETNS_DIR = Path("/var/run/netns")
MARKER_DIR = Path("/run/sdnsup-lab")

# A prefix is at least three characters so that a typo cannot match every namespace.
_PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{2,40}")

# How long to wait for SIGKILLed processes to leave their namespaces.
_KILL_WAIT = 3.0


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is a safe namespace prefix, else raise :class:`ValueError`."""
    if not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(
            f"unsafe lab prefix {prefix!r}: need 3-41 characters of [A-Za-z0-9_.-], "
            "starting with a letter or digit"
        )
    return prefix


def list_namespaces(prefix: str) -> list[str]:
    """Names of the named network namespaces (``ip netns list``) that start with ``prefix``."""
    validate_prefix(prefix)
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def namespace_pids(names: Iterable[str]) -> dict[str, list[int]]:
    """Processes inside each named namespace, like ``ip netns pids NAME`` but one /proc scan."""
    wanted: dict[tuple[int, int], str] = {}
    for name in names:
        try:
            st = os.stat(NETNS_DIR / name)
        except OSError:
            continue
        wanted[(st.st_dev, st.st_ino)] = name
    found: dict[str, list[int]] = {name: [] for name in wanted.values()}
    if not wanted:
        return found
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:  # gone, a zombie, or a kernel thread
            continue
        owner = wanted.get((st.st_dev, st.st_ino))
        if owner is not None:
            found[owner].append(int(entry.name))
    return found


def kill_namespace_processes(names: Iterable[str]) -> None:
    """SIGKILL every process inside the namespaces and wait (bounded) until they are gone."""
    names = list(names)
    deadline = time.monotonic() + _KILL_WAIT
    while True:
        pids = [pid for pids in namespace_pids(names).values() for pid in pids]
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


def delete_namespaces(names: Iterable[str]) -> None:
    """``ip netns del`` each name, in one ``ip -batch`` (``-force``: go on after an error)."""
    names = list(names)
    if names:
        script = "".join(f"netns del {name}\n" for name in names)
        run(["ip", "-force", "-batch", "-"], stdin=script, check=False)
    left = [n for n in names if (NETNS_DIR / n).exists()]
    if left:
        raise LabError(f"could not delete network namespaces: {', '.join(left)}")


def cleanup(prefix: str) -> list[str]:
    """Remove every namespace whose name starts with ``prefix``; return the names removed.

    Processes inside them are killed first. Idempotent: nothing to do is not an error.
    """
    names = list_namespaces(prefix)
    kill_namespace_processes(names)
    delete_namespaces(names)
    remove_marker(prefix)
    return names


# --- markers for cleanup after a crash -----------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks (field 22 of /proc/PID/stat), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return stat.rsplit(")", 1)[1].split()[19]


def write_marker(prefix: str, tmpdir: Path | None = None) -> None:
    """Record that this process owns the namespaces starting with ``prefix`` (and ``tmpdir``)."""
    validate_prefix(prefix)
    MARKER_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    pid = os.getpid()
    (MARKER_DIR / prefix).write_text(f"{pid} {_start_time(pid)} {tmpdir or ''}\n")


def remove_marker(prefix: str) -> None:
    """Forget the marker of ``prefix`` (no error when there is none)."""
    with contextlib.suppress(FileNotFoundError):
        (MARKER_DIR / validate_prefix(prefix)).unlink()


def _remove_tmpdir(prefix: str, path: str) -> None:
    """Remove a dead lab's temp dir: only a ``<tmp>/<prefix>...`` directory, nothing else."""
    tmpdir = Path(path)
    if tmpdir.parent == Path(tempfile.gettempdir()) and tmpdir.name.startswith(prefix):
        shutil.rmtree(tmpdir, ignore_errors=True)


def cleanup_stale() -> list[str]:
    """Remove the namespaces of labs whose owning process died without tearing them down.

    Only prefixes with a marker whose owner (pid + start time) no longer runs are touched, so
    labs of concurrent test runs are safe. Their temp dirs (logs) go too. Returns the
    namespaces removed.
    """
    removed: list[str] = []
    try:
        markers = list(MARKER_DIR.iterdir())
    except FileNotFoundError:
        return removed
    for marker in markers:
        try:
            pid_text, started, *rest = marker.read_text().split()
            validate_prefix(marker.name)
        except (OSError, ValueError):
            continue
        if pid_text.isdigit() and _start_time(int(pid_text)) == started:
            continue  # the owner is alive
        removed += cleanup(marker.name)
        if rest:
            _remove_tmpdir(marker.name, rest[0])
    return removed


# --- teardown at exit and on signals -------------------------------------------------------


class _Downable(Protocol):
    def down(self) -> None: ...


_live: dict[int, _Downable] = {}
_live_lock = threading.Lock()
_atexit_installed = False


def register(lab: _Downable) -> None:
    """Tear ``lab`` down at interpreter exit unless it was torn down before."""
    global _atexit_installed
    with _live_lock:
        _live[id(lab)] = lab
        if not _atexit_installed:
            atexit.register(_down_all)
            _atexit_installed = True
    _install_signal_handlers()


def unregister(lab: _Downable) -> None:
    """Forget ``lab`` (called by its ``down()``)."""
    with _live_lock:
        _live.pop(id(lab), None)


def _down_all() -> None:
    with _live_lock:
        labs = list(_live.values())
    for lab in labs:
        with contextlib.suppress(Exception):
            lab.down()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")


def _install_signal_handlers() -> None:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt, so cleanup code runs.

    Only from the main thread, and only where the signal still has its default action: a
    handler installed by the application (or by pytest, trio...) is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _interrupt)
