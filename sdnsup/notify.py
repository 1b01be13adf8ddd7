"""systemd ``Type=notify`` support: readiness, status, stopping and the watchdog.

The protocol (``sd_notify(3)``) is a few ``KEY=VALUE`` lines in one datagram sent over an
``AF_UNIX``/``SOCK_DGRAM`` socket whose address systemd passes in ``NOTIFY_SOCKET``: a path,
or ``@name`` for a name in the abstract namespace. Speaking it directly costs a dozen lines
and spares a dependency on libsystemd (whose Python bindings build in a venv only with
libsystemd's headers and a C compiler at hand).

Without ``NOTIFY_SOCKET`` (under supervisord, in a shell, in the tests) every method is a
no-op, so the daemon calls them unconditionally.

The watchdog: with ``WatchdogSec=`` systemd passes ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``,
the pid it watches) and restarts the service when no ``WATCHDOG=1`` arrives within that
time. :func:`watchdog_loop` sends it from the trio event loop, so a loop that stops running
(a blocking call, a busy loop, a deadlock) stops the pings and gets the process restarted.

Sending never raises: a notification that cannot be delivered is logged once at warning
level and dropped. Readiness and status are conveniences; they must never take down the
daemon that steers traffic.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Mapping

import trio

log = logging.getLogger("sdnsup")

# systemd reads one notification datagram into a buffer of PIPE_BUF (4096) bytes and drops
# longer ones whole; a status line is cut well below that, so READY=1 always gets through.
MAX_STATUS_BYTES = 1024


def _one_line(text: str) -> str:
    """``text`` made safe as one ``STATUS=`` value.

    A newline would start a new assignment: a status built from untrusted text (an AP id
    from the CC, an error message) could otherwise inject ``READY=1`` or ``MAINPID=``.
    """
    flat = " ".join(text.splitlines())
    data = flat.encode("utf-8", "replace")
    if len(data) <= MAX_STATUS_BYTES:
        return flat
    return data[:MAX_STATUS_BYTES].decode("utf-8", "ignore")


class Notifier:
    """Sends ``sd_notify`` messages to systemd, or does nothing without ``NOTIFY_SOCKET``.

    Build it with :meth:`from_env`. Every method is synchronous and non-blocking (the socket
    is non-blocking: a full queue at systemd's end drops the message instead of stalling the
    event loop), so it can be called from sync callbacks and from trio tasks alike.

    Args:
        address: the socket address (a path, or a bytes name starting with NUL for the
            abstract namespace); None disables every message.
        watchdog_usec: the watchdog timeout in microseconds when this process is the one
            systemd watches; None when there is no watchdog.
    """

    def __init__(self, address: str | bytes | None, *, watchdog_usec: int | None = None) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec if address is not None else None
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """Build a notifier from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        Args:
            environ: the environment to read (the process's by default).

        Returns:
            A notifier; a no-op one when ``NOTIFY_SOCKET`` is unset, empty or of a kind not
            supported (e.g. ``vsock:``, which only matters inside VMs). Problems are logged,
            never raised: a unit file mistake must not stop the daemon.
        """
        raw = environ.get("NOTIFY_SOCKET", "")
        address: str | bytes | None
        if not raw:
            address = None
        elif raw.startswith("@"):
            # Abstract namespace: '@' stands for the leading NUL byte (sd_notify(3)).
            address = b"\0" + raw[1:].encode()
        elif raw.startswith("/"):
            address = raw
        else:
            log.warning("NOTIFY_SOCKET=%r is not a path or @name; not notifying systemd", raw)
            address = None
        return cls(address, watchdog_usec=_watchdog_usec(environ))

    @property
    def enabled(self) -> bool:
        """Whether messages go anywhere (``NOTIFY_SOCKET`` was set)."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between two ``WATCHDOG=1`` pings, or None when there is no watchdog.

        Half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) recommends: one ping may then
        be late by up to a whole interval (a slow apply, a loaded host, timer slack) without
        systemd declaring the service hung, while a loop that is really stuck is caught
        within ``WatchdogSec``.
        """
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def ready(self, status: str) -> None:
        """Tell systemd that start-up is complete (``READY=1``) along with a status line.

        Args:
            status: a human-readable line for ``systemctl status``; newlines are flattened.
        """
        self._send(f"READY=1\nSTATUS={_one_line(status)}")

    def status(self, text: str) -> None:
        """Update the free-form status shown by ``systemctl status``.

        Args:
            text: one human-readable line; newlines are flattened.
        """
        self._send(f"STATUS={_one_line(text)}")

    def stopping(self) -> None:
        """Tell systemd that the service is shutting down (``STOPPING=1``).

        Send it before a teardown that may take a moment, so ``systemctl status`` shows
        "deactivating" instead of a running service that no longer steers anything.
        """
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        """Ping the watchdog (``WATCHDOG=1``); a no-op when this process is not watched."""
        if self._watchdog_usec is not None:
            self._send("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket (a later message opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, message: str) -> None:
        """Send one datagram; log the first failure at warning, later ones at debug."""
        if self._address is None:
            return
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
                self._sock = sock
            # sendto per message, not connect once: the address stays valid across a
            # 'systemctl daemon-reexec' and a datagram socket needs no connection.
            self._sock.sendto(message.encode("utf-8"), self._address)
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                reason = "systemd's queue is full"
            else:
                reason = exc.strerror or str(exc)
            first = not self._warned
            self._warned = True
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "cannot notify systemd (%s) at %s: %s%s",
                message.split("\n", 1)[0],
                self._display(),
                reason,
                "; further failures are logged at debug level" if first else "",
            )

    def _display(self) -> str:
        if isinstance(self._address, bytes):
            return "@" + self._address[1:].decode(errors="replace")
        return str(self._address)


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    """``WATCHDOG_USEC`` if it is valid and meant for this process, else None.

    ``WATCHDOG_PID``, when set, names the process systemd watches: a child that inherited
    the variables (sdnsup started from a wrapper script) must not ping on its parent's
    behalf, or a hung parent would never be caught.
    """
    raw = environ.get("WATCHDOG_USEC")
    if not raw:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                log.debug("WATCHDOG_PID=%s is not our pid %d; no watchdog", pid, os.getpid())
                return None
        except ValueError:
            log.warning("WATCHDOG_PID=%r is not a pid; no watchdog", pid)
            return None
    try:
        usec = int(raw)
    except ValueError:
        usec = 0
    if usec <= 0:
        log.warning("WATCHDOG_USEC=%r is not a positive number; no watchdog", raw)
        return None
    return usec


async def watchdog_loop(
    notifier: Notifier, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Ping the systemd watchdog every :attr:`Notifier.watchdog_interval` until cancelled.

    The pings come from a task of the trio event loop on purpose: if the loop gets stuck
    (a blocking call on the loop thread, a task that never yields, a deadlock), the pings
    stop, and after ``WatchdogSec`` systemd kills the process (``SIGABRT``: a core dump to
    see where it hung) and ``Restart=on-failure`` starts a fresh one, which adopts or removes
    the kernel state left behind. A ping from a separate thread would keep a hung daemon
    looking alive. The loop does not vouch for work done in worker threads (the applier's
    netlink calls): those are bounded by their own timeouts.

    Args:
        notifier: where to send the pings.
        task_status: ``started()`` is called at once, so ``nursery.start`` works too.

    Returns:
        Immediately when no watchdog is configured (then never ping: systemd is not
        watching this process); otherwise runs until cancelled.
    """
    interval = notifier.watchdog_interval
    task_status.started()
    if interval is None:
        return
    log.debug("systemd watchdog: pinging every %.1f s", interval)
    while True:
        notifier.watchdog()
        await trio.sleep(interval)
