"""The daemon's status socket, and the client side of ``sdnsup status``.

The daemon listens on a Unix stream socket, one per network namespace
(:func:`default_socket_path`: ``/run/sdnsup/control-<netns inode>.sock``), because several
sdnsup instances in different namespaces (the test lab, containers) share one ``/run``;
``sdnsup status`` run in the same namespace finds its own daemon. The socket is ``0600`` in
a ``0700`` directory owned by root: only root can ask.

Protocol: the client sends one line, ``status\\n``; the daemon answers with one line of JSON
(keys sorted) and closes the connection. Anything else is answered with
``{"error": "..."}``. One request per connection, at most :data:`MAX_REQUEST` bytes, the
whole exchange within :data:`REQUEST_TIMEOUT` seconds.

Status schema, version :data:`SCHEMA_VERSION` (``1``). A field may be added without a new
version; a version changes only when a field changes meaning or disappears. Times are UTC
ISO 8601 strings with milliseconds (``"2025-11-25T21:05:03.120Z"``), RTTs are milliseconds
as floats rounded to 0.1, durations (``*_s``) are seconds as floats rounded to 0.1 and
never negative (a wall clock stepped backwards reads 0.0), ``null`` means unknown / never::

    {
      "schema": 1,                     int, this layout
      "pid": 1234,                     int, the daemon's process id
      "time": "...Z",                  str, when this snapshot was taken
      "started_at": "...Z",            str, when the daemon started
      "uptime_s": 312.5,               float
      "state": "connected",            str: "discovering" | "connected" | "failing over"
                                            | "no AP" | "not routed" (an AP is chosen but
                                            the kernel does not route through it)
      "connected": true,               bool: an AP is active and the kernel, read back
                                            by the last apply, routes the CIDRs through it
      "kernel": {"routed": true,       bool, as above
                 "problems": [],       [str]: what the last apply could not do (an AP
                                            unreachable, not on-link, this host's own)
                 "apply_error": null,  str | null: the last apply failed (it is retried)
                 "apply_failures": 0}, int, failed applies since the start
      "host_id": "4c4c...",            str, the id the weighted choice of APs uses
      "no_ap_policy": "fallback",      str | null: "fallback" | "blackhole" (what traffic
                                            does while no AP is usable), null if not given
      "active_ap": {                   object | null (no active AP)
        "id": "ap2",                   str
        "addr": "172.31.1.12",         str | null, IPv4 address
        "addr6": "fd31:1::12",         str | null, IPv6 address
        "since": "...Z",               str | null, when it became active
        "since_ago_s": 192.0,          float | null
        "rtt_ms": 2.6                  float | null, last RTT measured (keepalive)
      },
      "aps": [                         every known AP: the directory's order (the CC's order
        {                                   of preference), then APs the directory no longer
                                            lists that still carry connections (the active
                                            AP, draining ones)
          "id": "ap1", "addr": "...", "addr6": null,
          "weight": 1,                 int, the CC's weight (1 for --ap)
          "probe": {"kind": "udp",     str: "udp" | "tcp" | "icmp" | "http"
                    "port": 7300,      int | null (null for icmp)
                    "path": null},     str | null (http only)
          "rtt_ms": 41.2,              float | null, last RTT measured (keepalive for the
                                            active AP, else the last probe round it
                                            answered); null if it never answered
          "probed": true,              bool, the last probe round included it
          "rank": 2,                   int | null, 1 = best of the last probe round
          "loss": 0.0,                 float | null, 0.0-1.0 in the last probe round (3
                                            decimals)
          "alive": true,               bool | null, answered in the last probe round
                                            (rounds run every 30 s and right after a
                                            failover); null if not probed yet
          "active": false,             bool
          "role": "draining",          str: "active" (takes new connections) | "draining"
                                            (alive, keeps its pinned connections, takes no
                                            new ones) | "dead" (died; its connections are
                                            being moved to the active AP) | "idle"
          "slot": 1,                   int | null, its AP slot (the connection mark's value)
          "pinned": 12,                int | null, live connections pinned to it at the
                                            last count (every 2 s while draining, 10 s
                                            while active); null: not counted yet or no slot
          "path": {"state": "ok",      object | null (nothing checked yet): does it forward?
                   "evidence": "...",       "ok" | "suspect" (being confirmed) | "broken"
                   "at": "...Z"}            (it answered probes but forwarded nothing:
                                            treated as dead), with the evidence and when
        }, ...
      ],
      "paths": {"suspicions": 1,       int: passive suspicions confirmed or cleared
                "failures": 1,         int: APs found forwarding nothing (failovers too)
                "track": [{"target": "tcp:22@10.10.10.5",   every tracked target's last
                           "active": null,                  result through the active AP
                           "other": "timeout"}]},           and the other way (null:
                                                            answered)
      "slots": {"used": 2, "capacity": 7,     int: AP slots held / the mark's capacity
                "sockets_aborted": 3,          int: local sockets of dead APs' connections
                "error": null},                str | null: the pin keeper's last error
      "reload": {"count": 1, "failures": 0,       int: SIGHUP reloads applied / refused
                 "last_at": "...Z", "error": null},   str | null: the last one, and why it
                                                      was refused (null once one works)
      "cidrs": {"ipv4": 2, "ipv6": 1,                      int, CIDRs steered per family
                "read": 3, "duplicates": 0, "merged": 0},   int: entries given, equal to an
                                                            earlier one, folded into a
                                                            wider or adjacent prefix
      "failovers": {"count": 1, "last_cause": "AP ap1 (...) dead: ...",
                    "last_at": "...Z", "last_ago_s": 303.4},   int, str|null, str|null,
                                                               float|null
      "heals": {"count": 0, "last_cause": null, "last_at": null, "last_ago_s": null},
      "cc": {"url": "https://cc.example.net",              str | null (null: static --ap)
             "last_refresh": "...Z",                       str | null, last good answer
             "last_refresh_ago_s": 12.0,                   float | null
             "next_request_in_s": 41.3,                    float | null, when sdnsup asks
                                                               the CC next
             "error": null},                               str | null, the last refresh's
                                                               error, null once one succeeds
      "ap_list": {"source": "saved",   str: "cc" | "saved" (read from disk at start, not
                                            confirmed by the CC yet) | "static" (--ap) | ""
                  "received": "...Z",  str | null, when the CC sent the list in use
                  "age_s": 8000.0,     float | null
                  "saved_error": null} str | null, the saved list could not be read or
                                            written (a restart then asks the CC first)
    }

``sdnsup status`` exit codes (:func:`exit_code`, LSB ``status`` convention): 0 connected,
1 running but not connected (discovering, failing over, no AP), 3 not running (no daemon
listens in this network namespace), 4 status unknown (:class:`QueryError`: the daemon did
not answer in time, permission denied, or its answer was not a status).

Errors::

    SdnsupError
    └── ControlError         the status socket cannot be set up safely (daemon side)
        └── QueryError       ``sdnsup status`` got no usable answer (exit code 4)

Resources: :func:`serve_control` owns its listening socket and the socket file; both are
released when it returns or is cancelled. :func:`query` opens and closes one client socket.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from sdnsup.aps import AccessPoint
from sdnsup.errors import SdnsupError

if TYPE_CHECKING:
    # Imported where used: ``sdnsup status`` (query, render) needs neither trio nor the
    # supervisor, and answers in a fraction of the time without them.
    import trio

    from sdnsup.supervisor import Status

log = logging.getLogger("sdnsup")

SCHEMA_VERSION = 1
# The same directory as sdnsup.daemon.RUN_DIR; not imported from there so that the
# ``status`` client does not load the daemon's kernel modules.
RUN_DIR = Path("/run/sdnsup")
# "status\n" is 7 bytes; anything much longer is not a request of ours.
MAX_REQUEST = 256
# What is read and discarded after an oversized request so that its answer is not lost.
MAX_DRAIN = 64 * 1024
# A client that has not sent its line (or read the answer) by then is dropped, so a stuck
# client cannot pin a handler task and its file descriptor forever.
REQUEST_TIMEOUT = 2.0
# A status of 256 APs (the CC's maximum) is ~80 KiB; anything past this is not a status.
MAX_REPLY = 4 * 1024 * 1024
# ``sdnsup status`` exit codes (LSB init script "status" action).
EXIT_CONNECTED = 0
EXIT_NOT_CONNECTED = 1
EXIT_NOT_RUNNING = 3
EXIT_UNKNOWN = 4


class ControlError(SdnsupError):
    """The status socket cannot be set up safely; the message says what to fix."""


class QueryError(ControlError):
    """``sdnsup status`` got no usable answer from the daemon (status unknown)."""

    exit_code = EXIT_UNKNOWN


# --- the snapshot ----------------------------------------------------------------------------


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ago(now: float, t: float | None) -> float | None:
    # A wall clock stepped backwards would give a negative age: say 0 rather than nonsense.
    return None if t is None else round(max(0.0, now - t), 1)


def _until(now: float, t: float | None) -> float | None:
    return None if t is None else round(max(0.0, t - now), 1)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 1)


def _probe(ap: AccessPoint) -> dict[str, Any]:
    spec = ap.probe
    return {
        "kind": spec.kind,
        "port": None if spec.kind == "icmp" else spec.port,
        "path": spec.path if spec.kind == "http" else None,
    }


def _addrs(ap: AccessPoint) -> dict[str, Any]:
    return {
        "id": ap.id,
        "addr": None if ap.addr4 is None else str(ap.addr4),
        "addr6": None if ap.addr6 is None else str(ap.addr6),
    }


def _path(status: Status, ap_id: str) -> dict[str, Any] | None:
    health = status.paths.get(ap_id)
    if health is None:
        return None
    return {"state": health.state, "evidence": health.evidence, "at": _iso(health.at)}


def snapshot(
    status: Status,
    *,
    cidrs4: int,
    cidrs6: int,
    pid: int,
    now: float | None = None,
    no_ap: str | None = None,
    cidrs_read: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """What the daemon knows, as a JSON-able dict; the schema is in the module docstring.

    Pure: reads ``status`` (the supervisor's, mutated only by tasks of the same trio
    thread, so it is consistent between checkpoints) and builds new objects.

    Args:
        status: the supervisor's :class:`~sdnsup.supervisor.Status`.
        cidrs4 / cidrs6: the number of IPv4 / IPv6 CIDRs steered.
        pid: the daemon's process id.
        now: wall-clock time of the snapshot (``time.time()`` when None; tests pass one).
        no_ap: the ``--no-ap`` policy (``"fallback"`` / ``"blackhole"``), None if unknown.
        cidrs_read: how the CIDRs were read (:meth:`sdnsup.cidrs.CidrReport.as_dict`: read,
            duplicates, merged, steered), None if unknown.

    Returns:
        A new dict of str, int, float, bool, None, lists and dicts only.
    """
    from sdnsup.supervisor import Phase

    now = time.time() if now is None else now
    active = status.active
    chosen = status.phase is Phase.CONNECTED and active is not None
    routed = status.kernel_routed
    results = {r.ap.id: (i, r) for i, r in enumerate(status.ranking, start=1)}
    known = list(status.aps)
    if active is not None and active not in known:
        # The CC stopped listing the active AP; the supervisor moves off it at its next
        # decision. Until then it still carries the traffic, so show it.
        known.append(active)
    slots = {}
    for entry in status.slots.entries.values():
        match = next((k for k in known if k.id == entry.ap.id), None)
        if match is None:
            known.append(entry.ap)  # e.g. drained by the CC: still carries connections
            match = entry.ap
        if entry.role != "dead" or match not in slots:
            slots[match] = entry
    aps = []
    for ap in known:
        rank, result = results.get(ap.id, (None, None))
        loss = alive = None
        if result is not None:
            sent, received = int(result.sent), int(result.received)
            loss = round(1.0 - min(received, sent) / sent, 3) if sent > 0 else 1.0
            alive = result.rtt is not None and received > 0
        aps.append(
            {
                **_addrs(ap),
                "weight": ap.weight,
                "probe": _probe(ap),
                "rtt_ms": _ms(status.last_rtt.get(ap.id)),
                "probed": result is not None,
                "rank": rank,
                "loss": loss,
                "alive": alive,
                "active": ap == active,
                "role": slots[ap].role if ap in slots else "active" if ap == active else "idle",
                "slot": slots[ap].number if ap in slots else None,
                "pinned": slots[ap].pinned if ap in slots else None,
                "path": _path(status, ap.id),
            }
        )
    active_ap = None
    if active is not None:
        active_ap = {
            **_addrs(active),
            "since": _iso(status.active_since),
            "since_ago_s": _ago(now, status.active_since),
            "rtt_ms": _ms(status.last_rtt.get(active.id)),
        }
    return {
        "schema": SCHEMA_VERSION,
        "pid": pid,
        "time": _iso(now),
        "started_at": _iso(status.started_at),
        "uptime_s": _ago(now, status.started_at),
        # "connected" is the kernel's word, not the supervisor's intent: the last apply
        # succeeded and routes every family's CIDRs through the active AP.
        "state": "not routed" if chosen and not routed else status.phase.value,
        "connected": chosen and routed,
        "kernel": {
            "routed": routed,
            "problems": list(status.kernel_problems),
            "apply_error": status.apply_error,
            "apply_failures": status.apply_failures,
        },
        "host_id": status.host_id,
        "no_ap_policy": no_ap,
        "active_ap": active_ap,
        "aps": aps,
        "cidrs": {
            "ipv4": cidrs4,
            "ipv6": cidrs6,
            **{k: v for k, v in (cidrs_read or {}).items() if k != "steered"},
        },
        "reload": {
            "count": status.reloads,
            "failures": status.reload_failures,
            "last_at": _iso(status.reloaded_at),
            "error": status.reload_error,
        },
        "paths": {
            "suspicions": status.suspicions,
            "failures": status.path_failures,
            "track": [
                {"target": target, "active": active_result, "other": other_result}
                for target, (active_result, other_result) in status.track.items()
            ],
        },
        "slots": {
            "used": len(status.slots.entries),
            "capacity": status.slots.capacity,
            "sockets_aborted": status.sockets_aborted,
            "error": status.pins_error,
        },
        "failovers": {
            "count": status.failovers,
            "last_cause": status.last_failover,
            "last_at": _iso(status.last_failover_at),
            "last_ago_s": _ago(now, status.last_failover_at),
        },
        "heals": {
            "count": status.heals,
            "last_cause": status.last_heal,
            "last_at": _iso(status.last_heal_at),
            "last_ago_s": _ago(now, status.last_heal_at),
        },
        "cc": {
            "url": status.cc_url,
            "last_refresh": _iso(status.cc_last_refresh),
            "last_refresh_ago_s": _ago(now, status.cc_last_refresh),
            "next_request_in_s": _until(now, status.cc_next_refresh),
            "error": status.cc_error,
        },
        "ap_list": {
            "source": status.aps_source,
            "received": _iso(status.aps_fetched_at),
            "age_s": _ago(now, status.aps_fetched_at),
            "saved_error": status.saved_error,
        },
    }


# --- the server ------------------------------------------------------------------------------


def default_socket_path(netns: int | None = None) -> Path:
    """``/run/sdnsup/control-<netns inode>.sock``: one socket per network namespace.

    Args:
        netns: the namespace's inode (:func:`sdnsup.preflight.netns_id`, read when None).
    """
    if netns is None:
        from sdnsup.preflight import netns_id

        netns = netns_id()
    return RUN_DIR / f"control-{netns}.sock"


def _prepare_dir(run_dir: Path) -> None:
    """Create ``run_dir`` (0700), or check that an existing one is safe to bind in.

    /run is writable by root only, so once the directory is checked nobody but root can
    swap it between the check and the bind.

    Raises:
        ControlError: it is a symlink or not a directory, not owned by us, writable by group
            or others, or cannot be created.
    """
    try:
        run_dir.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ControlError(f"cannot create the run directory {run_dir}: {exc}") from exc
    try:
        st = run_dir.lstat()
    except OSError as exc:
        raise ControlError(f"cannot inspect the run directory {run_dir}: {exc}") from exc
    fix = f"remove it (rm -r {run_dir}) and sdnsup creates it again, owned by root, mode 0700"
    if stat.S_ISLNK(st.st_mode):
        raise ControlError(
            f"{run_dir} is a symlink, refusing to put the status socket there; {fix}"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise ControlError(f"{run_dir} is not a directory; {fix}")
    if st.st_uid != os.geteuid():
        raise ControlError(
            f"{run_dir} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()}); {fix}"
        )
    if st.st_mode & 0o022:
        raise ControlError(
            f"{run_dir} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}), "
            f"anyone could replace the status socket; chmod 0700 {run_dir}, or {fix}"
        )


def _remove_stale(path: Path) -> None:
    """Remove a socket file left by an earlier run (killed with SIGKILL); nothing else.

    The caller holds the instance lock, so no live sdnsup of this namespace listens on it.

    Raises:
        ControlError: something other than a socket (a symlink, a file) is at ``path``.
    """
    try:
        st = path.lstat()  # lstat: never follow a symlink planted at the socket's name
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ControlError(f"cannot inspect {path}: {exc}") from exc
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a socket"
        raise ControlError(
            f"{path} is {kind}, refusing to replace it with the status socket; "
            "remove it if nothing needs it"
        )
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ControlError(f"cannot remove the stale status socket {path}: {exc}") from exc


def _ident(path: Path) -> tuple[int, int]:
    """(device, inode) of the file at ``path``: tells our socket file from a later one.

    A local lstat on tmpfs: it does not block, so it runs in the trio thread.
    """
    st = path.lstat()
    return st.st_dev, st.st_ino


def _unlink_ours(path: Path, ident: tuple[int, int] | None) -> None:
    """Remove the socket file if it is still the one we bound (same device and inode)."""
    if ident is None:
        return
    with contextlib.suppress(OSError):
        st = path.lstat()
        if (st.st_dev, st.st_ino) == ident:
            path.unlink()


def _reply(request: bytes | None, get_snapshot: Callable[[], dict[str, Any]]) -> bytes:
    """The answer to one request, as one encoded JSON line."""
    answer: dict[str, Any]
    text = None if request is None else request.strip().decode("utf-8", errors="replace")
    if text is None:
        answer = {"error": f"request longer than {MAX_REQUEST} bytes"}
    elif text != "status":
        answer = {"error": f"unknown request {text[:64]!r}; the only request is 'status'"}
    else:
        try:
            return (json.dumps(get_snapshot(), sort_keys=True) + "\n").encode()
        except Exception as exc:  # a bug in a snapshot must not take the socket down
            log.error("status snapshot failed: %r", exc, exc_info=exc)
            answer = {"error": f"internal error building the status: {exc!r}"}
    return (json.dumps(answer, sort_keys=True) + "\n").encode()


async def _read_request(stream: trio.SocketStream) -> bytes | None:
    """One line (without its newline), or what came before EOF; None if too long."""

    data = b""
    while b"\n" not in data:
        if len(data) > MAX_REQUEST:
            return None
        chunk = await stream.receive_some(MAX_REQUEST + 1)
        if not chunk:
            return data  # a client that wrote without a newline and shut down: be lenient
        data += chunk
    line = data.split(b"\n", 1)[0]
    return None if len(line) > MAX_REQUEST else line


async def _drain(stream: trio.SocketStream) -> None:
    """Read and discard until EOF, at most :data:`MAX_DRAIN` bytes (then let it reset)."""

    left = MAX_DRAIN
    while left > 0 and (chunk := await stream.receive_some(65536)):
        left -= len(chunk)


async def _handle(
    stream: trio.SocketStream, get_snapshot: Callable[[], dict[str, Any]], timeout: float
) -> None:
    """Serve one connection: one request, one JSON line. Never raises but Cancelled."""
    import trio

    with trio.move_on_after(timeout) as scope:
        try:
            request = await _read_request(stream)
            await stream.send_all(_reply(request, get_snapshot))
            if request is None:
                # Closing a Unix socket with unread bytes makes the kernel reset the
                # connection, and the client would read ECONNRESET instead of our answer.
                await stream.send_eof()
                await _drain(stream)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("status client went away: %r", exc)
    if scope.cancelled_caught:
        log.debug("status client dropped: no request within %.1f s", timeout)
    # serve_listeners closes the stream after this returns.


async def serve_control(
    path: Path,
    get_snapshot: Callable[[], dict[str, Any]],
    *,
    timeout: float = REQUEST_TIMEOUT,
    task_status: trio.TaskStatus[None] | None = None,
) -> None:
    """Answer ``status`` requests on a Unix socket at ``path`` until cancelled.

    Start it with ``await nursery.start(serve_control, path, get_snapshot)``: it is
    listening when ``start`` returns. Each connection is served in its own task: one request
    line, one JSON line, close; a client that does not finish within ``timeout`` seconds is
    dropped without delaying the others.

    Args:
        path: the socket file; its parent directory is created with mode 0700 if missing.
            The caller must hold the instance lock (:class:`sdnsup.preflight.InstanceLock`):
            a socket file already at ``path`` is then stale and is replaced.
        get_snapshot: called (in the trio thread) for each ``status`` request; returns the
            dict to send (normally :func:`snapshot`). If it raises, the client gets
            ``{"error": ...}`` and the server carries on.
        timeout: seconds a client has for its whole exchange.

    Raises:
        ControlError: the directory is unsafe (a symlink, not ours, group/other-writable),
            something else than a socket is at ``path``, or the socket cannot be bound.
            Raised before ``task_status.started()``; nothing was left behind.

    Resources: the listening socket is closed and the socket file removed (only if it is
    still the file this call created) when this returns, raises or is cancelled.
    """
    import trio

    _prepare_dir(path.parent)
    _remove_stale(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ident: tuple[int, int] | None = None
    try:
        # The socket file's mode comes from the umask at bind(): 0777 & ~0177 = 0600, so the
        # file is never reachable by others, not even between bind() and a chmod(). The
        # umask is per process: a file another thread creates meanwhile is at worst created
        # more restrictive, never less.
        old_umask = os.umask(0o177)
        try:
            await sock.bind(str(path))
        except OSError as exc:
            raise ControlError(f"cannot bind the status socket {path}: {exc}") from exc
        finally:
            os.umask(old_umask)
        ident = _ident(path)
        sock.listen(16)
        listener = trio.SocketListener(sock)

        async def handler(stream: trio.SocketStream) -> None:
            await _handle(stream, get_snapshot, timeout)

        log.debug("status socket listening on %s", path)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handler, [listener])
            if task_status is not None:  # trio's default lives in trio, imported lazily here
                task_status.started()
    finally:
        sock.close()  # idempotent; serve_listeners has usually closed it already
        _unlink_ours(path, ident)


# --- the client ------------------------------------------------------------------------------


def query(path: Path, timeout: float = 2.0) -> dict[str, Any] | None:
    """Ask the daemon listening at ``path`` for its status (blocking).

    Args:
        path: the daemon's socket (:func:`default_socket_path`).
        timeout: seconds for the whole exchange.

    Returns:
        The status dict (schema in the module docstring), or None when no daemon listens:
        no socket file (ENOENT) or nobody behind it (ECONNREFUSED: a stale file).

    Raises:
        QueryError: permission denied (not root), no answer within ``timeout``, an answer
            that is not a status of schema :data:`SCHEMA_VERSION`, or an error answer.

    Resources: the client socket is closed before returning or raising.
    """
    deadline = time.monotonic() + timeout

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    data = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.settimeout(remaining())
            try:
                sock.connect(str(path))
            except (FileNotFoundError, ConnectionRefusedError):
                return None
            sock.sendall(b"status\n")
            while len(data) <= MAX_REPLY:
                sock.settimeout(remaining())
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise QueryError(
                f"the daemon at {path} did not answer within {timeout:.1f} s; "
                "it may be hung (check its log, or restart it)"
            ) from None
        except PermissionError as exc:
            raise QueryError(f"cannot reach {path}: {exc.strerror}; run it as root") from exc
        except OSError as exc:
            raise QueryError(f"cannot query the daemon at {path}: {exc}") from exc
    return _parse(path, data)


def _parse(path: Path, data: bytes) -> dict[str, Any]:
    if len(data) > MAX_REPLY:
        raise QueryError(f"the answer from {path} is larger than {MAX_REPLY} bytes")
    try:
        snap = json.loads(data)
    except ValueError as exc:
        raise QueryError(f"the answer from {path} is not JSON: {exc}") from exc
    if not isinstance(snap, dict):
        raise QueryError(f"the answer from {path} is not a JSON object")
    if "error" in snap:
        raise QueryError(f"the daemon at {path} answered with an error: {snap['error']}")
    if snap.get("schema") != SCHEMA_VERSION:
        raise QueryError(
            f"the daemon at {path} speaks status schema {snap.get('schema')!r}, this sdnsup "
            f"understands {SCHEMA_VERSION}; use the sdnsup that runs the daemon"
        )
    return snap


def exit_code(snap: Mapping[str, Any] | None) -> int:
    """The exit code of ``sdnsup status`` (LSB ``status`` action).

    Returns:
        0 connected; 1 running but not connected (discovering, failing over, no AP);
        3 not running (``snap`` is None: no daemon in this network namespace);
        4 status unknown (``snap`` is not a status: an ``error`` answer).
    """
    if snap is None:
        return EXIT_NOT_RUNNING
    if "error" in snap or not isinstance(snap.get("connected"), bool):
        return EXIT_UNKNOWN
    return EXIT_CONNECTED if snap["connected"] else EXIT_NOT_CONNECTED


# --- the human view --------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    """``45s``, ``3m12s``, ``1h02m``, ``2d03h``: two units are enough for a human."""
    if seconds is None:
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _label(ap: Mapping[str, Any]) -> str:
    """``ap2 (172.31.1.12+fd31:1::12)``, or just the addresses when they are the id
    (static ``--ap``), like :meth:`AccessPoint.__str__`."""
    addrs = "+".join(a for a in (ap.get("addr"), ap.get("addr6")) if a)
    return addrs if addrs == ap["id"] else f"{ap['id']} ({addrs})"


def _state_line(snap: Mapping[str, Any]) -> str:
    active = snap.get("active_ap")
    state = snap.get("state")
    if snap.get("connected") and active:
        line = f"connected via {_label(active)} for {_duration(active.get('since_ago_s'))}"
        if active.get("rtt_ms") is not None:
            line += f", last RTT {active['rtt_ms']:.1f} ms"
        return line
    if state == "not routed" and active:
        kernel = snap.get("kernel") or {}
        why = kernel.get("apply_error") or "; ".join(kernel.get("problems") or []) or "unknown"
        return f"{_label(active)} chosen, but the kernel does not route the CIDRs through it: {why}"
    if state == "discovering":
        return "discovering: no AP chosen yet"
    if state == "failing over":
        via = f" from {_label(active)}" if active else ""
        return f"failing over{via}"
    path = {
        "fallback": "traffic to the CIDRs takes the normal route",
        "blackhole": "traffic to the CIDRs is dropped (--no-ap blackhole)",
    }.get(snap.get("no_ap_policy") or "", "traffic takes the no-AP path")
    return f"no AP answers: {path}; still probing"


def _table(rows: Iterable[list[str]]) -> list[str]:
    rows = list(rows)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _ap_rows(aps: Iterable[Mapping[str, Any]]) -> list[list[str]]:
    rows = [
        [" ", "AP", "ADDRESS", "WEIGHT", "PROBE", "LAST RTT", "LOSS", "STATE", "PATH", "ROLE",
         "PINNED"]
    ]  # fmt: skip
    for ap in aps:
        probe = ap.get("probe") or {}
        kind = str(probe.get("kind", "?"))
        if probe.get("port") is not None:
            kind += f":{probe['port']}"
        if probe.get("path") is not None:
            kind += str(probe["path"])
        rtt = "-" if ap.get("rtt_ms") is None else f"{ap['rtt_ms']:.1f} ms"
        loss = "-" if ap.get("loss") is None else f"{ap['loss'] * 100:.0f}%"
        alive = ap.get("alive")
        state = "not probed" if alive is None else "alive" if alive else "dead"
        addrs = "+".join(a for a in (ap.get("addr"), ap.get("addr6")) if a)
        role = str(ap.get("role") or ("active" if ap.get("active") else "idle"))
        if ap.get("slot") is not None:
            role += f" (slot {ap['slot']})"
        pinned = "-" if ap.get("pinned") is None else str(ap["pinned"])
        path = (ap.get("path") or {}).get("state") or "-"
        rows.append(
            ["*" if ap.get("active") else " ", ap["id"], addrs, str(ap.get("weight", 1)), kind,
             rtt, loss, state, path, role, pinned]
        )  # fmt: skip
    return rows


def _events(name: str, ev: Mapping[str, Any]) -> str:
    count = ev.get("count", 0)
    if not count or not ev.get("last_cause"):
        return f"{name}{count}"
    return f"{name}{count}, last {_duration(ev.get('last_ago_s'))} ago: {ev['last_cause']}"


def render(snap: Mapping[str, Any]) -> str:
    """The human view of a status (:func:`snapshot`'s dict): plain text, aligned columns.

    Returns:
        Lines joined by ``\\n``, ending with one: a state line, the AP table (``*`` marks the
        active AP), CIDR counts, failovers, heals and the CC.
    """
    lines = [f"sdnsup (pid {snap.get('pid')}): {_state_line(snap)}"]
    cidrs = snap.get("cidrs") or {}
    merged = ""
    if cidrs.get("duplicates") or cidrs.get("merged"):
        merged = (
            f" ({cidrs.get('read')} read: {cidrs.get('duplicates')} duplicates, "
            f"{cidrs.get('merged')} merged into wider or adjacent prefixes)"
        )
    lines.append(
        f"up {_duration(snap.get('uptime_s'))}, steering {cidrs.get('ipv4', 0)} IPv4 + "
        f"{cidrs.get('ipv6', 0)} IPv6 CIDRs{merged}"
    )
    lines.append("")
    aps = snap.get("aps") or []
    if aps:
        lines += _table(_ap_rows(aps))
        lines.append(
            "(* = active AP: new connections take it; a draining AP keeps the connections "
            "pinned to it; loss and state from the last probe round)"
        )
    else:
        lines.append("no AP known yet")
    lines.append("")
    lines.append(_events("failovers: ", snap.get("failovers") or {}))
    lines.append(_events("heals:     ", snap.get("heals") or {}))
    reload = snap.get("reload") or {}
    if reload.get("count") or reload.get("failures"):
        line = f"reloads:   {reload.get('count', 0)}, {reload.get('failures', 0)} refused"
        if reload.get("error"):
            line += f"; the last was refused, the running configuration kept: {reload['error']}"
        lines.append(line)
    checks = snap.get("paths") or {}
    if checks:
        line = (
            f"path checks: {checks.get('suspicions', 0)} suspicions, "
            f"{checks.get('failures', 0)} APs found forwarding nothing"
        )
        track = checks.get("track") or []
        if track:
            results = ", ".join(
                f"{t['target']} {'ok' if t.get('active') is None else t['active']}" for t in track
            )
            line += f"; tracked through the active AP: {results}"
        lines.append(line)
    slots = snap.get("slots") or {}
    if slots:
        lines.append(
            f"AP slots:  {slots.get('used', 0)} of {slots.get('capacity', 0)} in use, "
            f"{slots.get('sockets_aborted', 0)} sockets of dead APs aborted"
            + (f"; error: {slots['error']}" if slots.get("error") else "")
        )
    cc = snap.get("cc") or {}
    if cc.get("url"):
        refreshed = (
            f"last refresh {_duration(cc.get('last_refresh_ago_s'))} ago"
            if cc.get("last_refresh")
            else "no answer yet"
        )
        if cc.get("next_request_in_s") is not None:
            refreshed += f", next request in {_duration(cc['next_request_in_s'])}"
        lines.append(f"CC:        {cc['url']}, {refreshed}")
        lines.append(f"CC error:  {cc.get('error') or 'none'}")
        listed = snap.get("ap_list") or {}
        if listed.get("source") == "saved":
            lines.append(
                f"AP list:   from disk, received from the CC {_duration(listed.get('age_s'))} "
                "ago; the CC has not confirmed it yet"
            )
        if listed.get("saved_error"):
            lines.append(f"AP list:   {listed['saved_error']}")
    else:
        lines.append("CC:        none (static --ap list)")
    return "\n".join(lines) + "\n"


def status_command(
    path: Path | None = None,
    *,
    as_json: bool = False,
    out: TextIO | None = None,
    timeout: float = 2.0,
    leftovers: Callable[[], str] | None = None,
) -> int:
    """``sdnsup status``: query, print, and return the exit code.

    Args:
        path: the daemon's socket (:func:`default_socket_path` of this namespace when None).
        as_json: print the status as one JSON line (keys sorted) instead of the human view;
            with no daemon, ``{"state": "not running", "connected": false, ...}``.
        out: where to print (stdout when None).
        leftovers: with no daemon, says what sdnsup left in the kernel (shown in both views).

    Returns:
        :func:`exit_code` of the answer: 0 connected, 1 not connected, 3 not running.

    Raises:
        QueryError: status unknown (its ``exit_code`` is 4).
    """
    out = sys.stdout if out is None else out
    path = default_socket_path() if path is None else path
    snap = query(path, timeout)
    if snap is None:
        left = leftovers() if leftovers is not None else None
        if as_json:
            # A JSON consumer reads the same keys as from a daemon, never a bare null.
            gone = {
                "schema": SCHEMA_VERSION,
                "state": "not running",
                "connected": False,
                "socket": str(path),
                "leftovers": left,
            }
            print(json.dumps(gone, sort_keys=True), file=out)
        else:
            print(
                f"sdnsup is not running in this network namespace (no daemon at {path})",
                file=out,
            )
            if left is not None:
                print(left, file=out)
    elif as_json:
        print(json.dumps(snap, sort_keys=True), file=out)
    else:
        print(render(snap), file=out, end="")
    return exit_code(snap)
