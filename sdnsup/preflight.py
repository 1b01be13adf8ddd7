"""Checks before touching anything: privileges, and one instance per network namespace."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
from pathlib import Path

from sdnsup.errors import LockError, PrivilegeError

CAP_NET_ADMIN = 12
# The initial network namespace's inode (PROC_NET_INIT_INO in include/linux/proc_ns.h).
INIT_NETNS_INO = 0xEFFFFFF9
NETNS_DIR = Path("/run/netns")


def check_privileges(status: Path = Path("/proc/self/status")) -> None:
    """Raise :class:`PrivilegeError` unless the process has CAP_NET_ADMIN.

    Checking the effective capability set (not the uid) gives the right answer for root,
    for a non-root user granted the capability, and for root inside a restricted container.
    """
    try:
        for line in status.read_text().splitlines():
            if line.startswith("CapEff:"):
                caps = int(line.split()[1], 16)
                break
        else:
            caps = 0
    except OSError:
        caps = 0
    if not caps & (1 << CAP_NET_ADMIN):
        raise PrivilegeError(
            "sdnsup needs CAP_NET_ADMIN to change routes and nftables: run it as root "
            "(sudo sdnsup ...) or grant the capability; nothing was changed"
        )


def netns_id() -> int:
    """The inode of this process's network namespace: names per-namespace files."""
    return os.stat("/proc/self/ns/net").st_ino


class InstanceLock:
    """One sdnsup per network namespace.

    The lock is an abstract Unix socket name. Abstract names belong to the network namespace
    (so two lab namespaces do not collide, and a container has its own), and the kernel frees
    them when the process dies, even by SIGKILL: there is no stale lock file to clean.
    """

    NAME = b"\0sdnsup.instance"

    def __init__(self) -> None:
        self._sock: socket.socket | None = None

    def acquire(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.NAME)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise LockError(
                    "another sdnsup is already running in this network namespace; "
                    "stop it first (supervisorctl stop sdnsup, or systemctl stop sdnsup)"
                ) from exc
            raise LockError(f"cannot take the instance lock: {exc}") from exc
        sock.set_inheritable(False)
        self._sock = sock

    def release(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# The per-namespace files in the run directory: "<kind>-<netns inode>.<ext>".
_RUN_FILE = re.compile(r"(?:control|sysctl)-(\d+)\.(?:sock|json)")


def live_netns(proc: Path = Path("/proc"), named: Path = Path("/run/netns")) -> set[int]:
    """Inodes of the network namespaces that exist: those of a process, or bind-mounted
    (``ip netns add``). A namespace with neither is gone, and its inode free for reuse."""
    alive: set[int] = set()
    for where in (*proc.glob("[0-9]*/ns/net"), *named.glob("*")):
        try:
            alive.add(os.stat(where).st_ino)
        except OSError:
            continue  # the process ended, or not a namespace: nothing to keep alive
    return alive


def sweep_run_dir(run_dir: Path, alive: set[int]) -> list[str]:
    """Remove the status sockets and sysctl records of namespaces that no longer exist (the
    sysctls they record died with their namespace); the names removed.

    A namespace with a process in it is alive, so a running sdnsup's files always stay.
    """
    removed: list[str] = []
    try:
        names = sorted(os.listdir(run_dir))
    except OSError:
        return removed
    for name in names:
        m = _RUN_FILE.fullmatch(name)
        if m is None or int(m.group(1)) in alive:
            continue
        try:
            os.unlink(run_dir / name)
        except OSError:
            continue
        removed.append(name)
    return removed


def netns_suffix(self_ns: Path = Path("/proc/self/ns/net"), netns_dir: Path = NETNS_DIR) -> str:
    """What names this network namespace's files (the saved AP list, the log file): ``""``
    in the host's namespace (and in a container's own), ``-NAME`` in a named one
    (``ip netns``), ``-INODE`` in any other."""
    ino = os.stat(self_ns).st_ino
    try:
        init = os.stat("/proc/1/ns/net").st_ino
    except OSError:  # /proc/1 of another user (hidepid): fall back to the kernel constant
        init = INIT_NETNS_INO
    if ino in (init, INIT_NETNS_INO):
        return ""
    with contextlib.suppress(OSError):
        for entry in sorted(netns_dir.iterdir()):
            with contextlib.suppress(OSError):
                if entry.stat().st_ino == ino:
                    return f"-{entry.name}"
    return f"-{ino}"
