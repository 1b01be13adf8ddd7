"""Optional Prometheus metrics (``--metrics ADDR:PORT``; off by default).

:func:`render` turns the supervisor's :class:`~sdnsup.supervisor.Status` into the Prometheus
text exposition format 0.0.4; :func:`serve_metrics` answers ``GET /metrics`` with it from a
minimal HTTP/1.0 server on trio sockets. No client library: the format is a few lines of
text, and the daemon's dependencies stay what the kernel side needs.

Series (``ap`` is the AP id the CC or ``--ap`` gives)::

    sdnsup_up 1
    sdnsup_state{state="connected"} 1          one per phase: discovering, connected,
                                               failing_over, no_ap; 1 for the current one
    sdnsup_ap_rtt_seconds{ap="ap1"} 0.0055     last RTT measured (probe round or keepalive)
    sdnsup_ap_alive{ap="ap1"} 1                answered its last probe round (active AP:
                                               its keepalive); 0 otherwise
    sdnsup_ap_probe_loss_ratio{ap="ap1"} 0     share of the last round's probes lost
    sdnsup_active_ap_info{ap="ap1"} 1          only while an AP is in use
    sdnsup_failovers_total 2                   counters since the process started
    sdnsup_heals_total 5
    sdnsup_reloads_total{result="ok"} 1        SIGHUP reloads applied / refused ("failed")
    sdnsup_kernel_routed 1                     the kernel routes the CIDRs through the AP
    sdnsup_apply_failures_total 0              applies that failed (and were retried)
    sdnsup_cidrs{family="ipv4"} 12             CIDRs steered, per family
    sdnsup_cidr_entries{kind="read"} 14        CIDR entries given; kind duplicate, merged:
                                               how many of them the merge folded away
    sdnsup_cc_up 1                             last CC answer was good (only with --cc)
    sdnsup_cc_last_refresh_timestamp_seconds   last good CC answer (only once there is one)
    sdnsup_ap_list_source{source="saved"} 1    where the AP list in use came from: cc, saved
                                               (from disk, the CC not asked yet) or static
    sdnsup_ap_list_received_timestamp_seconds  when the CC sent the list in use
    sdnsup_saved_list_error 0                  1: the saved list cannot be read or written
    sdnsup_start_time_seconds                  when the daemon started (unix time)

The endpoint is unauthenticated; it reveals AP ids and timings (no addresses, no token).
Bind it to a loopback or management address (``--metrics 127.0.0.1:9730``).
"""

from __future__ import annotations

import errno
import logging
import math
import socket
from collections.abc import Callable, Mapping
from typing import Any

import trio

from sdnsup.errors import ConfigError
from sdnsup.supervisor import Phase, Status

log = logging.getLogger("sdnsup")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRICS_PATH = "/metrics"
# A scrape request is one line and a few headers (Prometheus sends ~300 bytes); a head
# larger than this is not a scraper, and reading it would only cost memory.
MAX_REQUEST_BYTES = 8192
# Time for a client to send its request, then to take our answer: a connection that
# dawdles (slowloris) is closed instead of holding a socket and a task.
READ_TIMEOUT = 5.0
SEND_TIMEOUT = 5.0
# Connections served at once, plus one accepted and waiting for a slot; the rest wait in the
# kernel's listen backlog (then SYNs are dropped), costing the daemon no file descriptor. A
# flood of connections therefore cannot exhaust the descriptors that probes and netlink need,
# and since a new connection closes the oldest one that has not sent its request yet when
# all slots are taken, it cannot keep a scrape out either. Prometheus needs one per scrape.
MAX_CONNECTIONS = 16
LISTEN_BACKLOG = 16
# accept() errors that mean "out of resources for now": wait and retry, as trio's
# serve_listeners does, instead of ending the server.
ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
ACCEPT_RETRY_DELAY = 0.1


# --- rendering -------------------------------------------------------------------------------


def _escape_label(value: str) -> str:
    """A label value as the 0.0.4 format wants it: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    """HELP text: only backslash and newline are escaped (quotes are literal there)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _value(number: float) -> str:
    """A sample value: integers without '.0', floats in their shortest exact form, and
    the format's spelling of infinities and NaN."""
    if isinstance(number, int):
        return str(number)
    if math.isfinite(number) and number.is_integer() and abs(number) < 2**53:
        return str(int(number))
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    return repr(number)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{_escape_label(val)}"' for key, val in labels.items())
    return "{" + inner + "}"


class _Family:
    """One metric family: its HELP and TYPE lines, then its samples."""

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.lines = [f"# HELP {name} {_escape_help(help_text)}", f"# TYPE {name} {kind}"]
        self.name = name

    def add(self, number: float, **labels: str) -> None:
        self.lines.append(f"{self.name}{_labels(labels)} {_value(number)}")


def _phase_label(phase: Phase) -> str:
    # The enum's name, not its value: "failing over" and "no AP" read well in logs, but
    # label values in PromQL are easier without spaces and capitals.
    return phase.name.lower()


def _known_aps(status: Status) -> list[str]:
    """AP ids to report: the current list, plus the active AP if it just left the list.

    ``last_rtt`` keeps APs the CC has since dropped; reporting those would show a stale
    RTT for an AP that no longer exists.
    """
    ids = [ap.id for ap in status.aps]
    if status.active is not None and status.active.id not in ids:
        ids.append(status.active.id)
    # APs that left the list but still carry pinned connections (draining)
    ids += [e.ap.id for e in status.slots.entries.values() if e.ap.id not in ids]
    return ids


def render(
    status: Status, *, cidrs4: int, cidrs6: int, cidrs_read: Mapping[str, int] | None = None
) -> str:
    """The Prometheus text (format 0.0.4) for one scrape.

    Args:
        status: the supervisor's status (read, never changed).
        cidrs4: the number of IPv4 CIDRs steered.
        cidrs6: the number of IPv6 CIDRs steered.
        cidrs_read: how the CIDR list was read (read, duplicates, merged), None if unknown.

    Returns:
        The exposition text, ending with a newline.
    """
    families: list[_Family] = []

    def family(name: str, kind: str, help_text: str) -> _Family:
        fam = _Family(name, kind, help_text)
        families.append(fam)
        return fam

    family("sdnsup_up", "gauge", "1 while sdnsup runs and answers scrapes.").add(1)

    state = family("sdnsup_state", "gauge", "Supervisor phase: 1 for the current one, else 0.")
    for phase in Phase:
        state.add(1 if phase is status.phase else 0, state=_phase_label(phase))

    ids = _known_aps(status)
    results: dict[str, Any] = {r.ap.id: r for r in status.ranking}
    active_id = status.active.id if status.active is not None else None

    rtt = family(
        "sdnsup_ap_rtt_seconds",
        "gauge",
        "Last round-trip time measured to the AP (probe round or keepalive), in seconds.",
    )
    for ap_id in ids:
        if ap_id in status.last_rtt:
            rtt.add(status.last_rtt[ap_id], ap=ap_id)

    alive = family(
        "sdnsup_ap_alive",
        "gauge",
        "1 if the AP answered its last probe round (the active AP: its keepalive), else 0.",
    )
    for ap_id in ids:
        if ap_id == active_id and status.phase is Phase.CONNECTED:
            # The keepalive checks the active AP every 0.2 s: fresher than the last round,
            # which may predate a failover back to it.
            up = True
        else:
            r = results.get(ap_id)
            up = r is not None and r.rtt is not None and r.received > 0
        alive.add(1 if up else 0, ap=ap_id)

    loss = family(
        "sdnsup_ap_probe_loss_ratio",
        "gauge",
        "Share of the probes of the AP's last probe round that got no answer (0 to 1).",
    )
    for ap_id in ids:
        r = results.get(ap_id)
        if r is not None and r.sent > 0:
            loss.add((r.sent - r.received) / r.sent, ap=ap_id)

    info = family("sdnsup_active_ap_info", "gauge", "The AP traffic is steered through now.")
    if active_id is not None:
        info.add(1, ap=active_id)

    roles = {e.ap.id: e for e in status.slots.entries.values() if e.role != "dead"}
    role = family(
        "sdnsup_ap_role",
        "gauge",
        "1 for the AP's role: active (new connections take it), draining (keeps its pinned "
        "connections, takes no new ones) or idle.",
    )
    for ap_id in ids:
        current = (
            roles[ap_id].role if ap_id in roles else "active" if ap_id == active_id else "idle"
        )
        for name in ("active", "draining", "idle"):
            role.add(1 if name == current else 0, ap=ap_id, role=name)
    pinned = family(
        "sdnsup_ap_pinned_connections",
        "gauge",
        "Live connections pinned to the AP at the last count (draining: every 2 s).",
    )
    for ap_id in ids:
        entry = roles.get(ap_id)
        if entry is not None and entry.pinned is not None:
            pinned.add(entry.pinned, ap=ap_id)
    family("sdnsup_slots_used", "gauge", "AP slots held by APs with pinned connections.").add(
        len(status.slots.entries)
    )
    family("sdnsup_slots_capacity", "gauge", "AP slots the connection mark can hold.").add(
        status.slots.capacity
    )
    path = family(
        "sdnsup_ap_path_state",
        "gauge",
        "1 for the AP's path state: ok (forwards), suspect (being confirmed), broken (answers "
        "its probes but forwards nothing); absent while never checked.",
    )
    for ap_id in ids:
        health = status.paths.get(ap_id)
        if health is not None:
            for name in ("ok", "suspect", "broken"):
                path.add(1 if health.state == name else 0, ap=ap_id, state=name)
    family(
        "sdnsup_path_suspicions_total",
        "counter",
        "Passive suspicions of the active AP (unanswered connections), confirmed or cleared.",
    ).add(status.suspicions)
    family(
        "sdnsup_path_failures_total",
        "counter",
        "APs found answering their probes but forwarding nothing (each a failover).",
    ).add(status.path_failures)
    tracked = family(
        "sdnsup_track_target_up",
        "gauge",
        "1 if the tracked target answered its last probe, through the active AP "
        '(via="active") or the other way (via="other").',
    )
    for target, (through_active, through_other) in status.track.items():
        tracked.add(1 if through_active is None else 0, target=target, via="active")
        tracked.add(1 if through_other is None else 0, target=target, via="other")
    family(
        "sdnsup_sockets_aborted_total",
        "counter",
        "Local sockets of connections pinned to an AP that died, aborted (--abort-sockets).",
    ).add(status.sockets_aborted)

    family(
        "sdnsup_failovers_total", "counter", "Failovers after the active AP stopped answering."
    ).add(status.failovers)
    family(
        "sdnsup_heals_total",
        "counter",
        "Re-applies of the kernel state after someone or something changed it.",
    ).add(status.heals)

    family(
        "sdnsup_kernel_routed",
        "gauge",
        "1 if the last apply routes the CIDRs through the active AP (what status calls "
        "connected), else 0.",
    ).add(1 if status.kernel_routed else 0)
    family(
        "sdnsup_apply_failures_total",
        "counter",
        "Applies to the kernel that failed (each is retried with backoff).",
    ).add(status.apply_failures)

    reloads = family(
        "sdnsup_reloads_total",
        "counter",
        "Reloads on SIGHUP: applied (ok), or refused for a bad configuration (failed).",
    )
    reloads.add(status.reloads, result="ok")
    reloads.add(status.reload_failures, result="failed")

    cidrs = family("sdnsup_cidrs", "gauge", "Number of CIDRs steered through the AP, per family.")
    cidrs.add(cidrs4, family="ipv4")
    cidrs.add(cidrs6, family="ipv6")
    if cidrs_read is not None:
        entries = family(
            "sdnsup_cidr_entries",
            "gauge",
            "CIDR entries given (read), equal to an earlier one (duplicate), or folded into a "
            "wider or adjacent prefix (merged).",
        )
        entries.add(cidrs_read.get("read", 0), kind="read")
        entries.add(cidrs_read.get("duplicates", 0), kind="duplicate")
        entries.add(cidrs_read.get("merged", 0), kind="merged")

    if status.cc_url is not None:
        cc_up = family("sdnsup_cc_up", "gauge", "1 if the last CC request succeeded, else 0.")
        # Until a first good answer (a first boot still retrying, or a start from the saved
        # list before its first refresh), the CC counts as down.
        cc_up.add(1 if status.cc_last_refresh is not None and not status.cc_error else 0)
    refresh = family(
        "sdnsup_cc_last_refresh_timestamp_seconds",
        "gauge",
        "Unix time of the last valid AP list received from the CC.",
    )
    if status.cc_last_refresh is not None:
        refresh.add(status.cc_last_refresh)

    source = family(
        "sdnsup_ap_list_source",
        "gauge",
        "Where the AP list in use came from: cc, saved (from disk, not confirmed by the CC "
        "yet) or static.",
    )
    if status.aps_source:
        source.add(1, source=status.aps_source)
    received = family(
        "sdnsup_ap_list_received_timestamp_seconds",
        "gauge",
        "Unix time the CC sent the AP list in use (a saved list's is older than the last refresh).",
    )
    if status.aps_fetched_at is not None:
        received.add(status.aps_fetched_at)
    if status.cc_url is not None:
        family(
            "sdnsup_saved_list_error",
            "gauge",
            "1 if the saved AP list could not be read or written (a restart asks the CC first).",
        ).add(1 if status.saved_error else 0)

    started = family("sdnsup_start_time_seconds", "gauge", "Unix time the daemon started at.")
    started.add(status.started_at)

    return "".join(line + "\n" for fam in families for line in fam.lines)


# --- the listen address ----------------------------------------------------------------------


# --- the HTTP server -------------------------------------------------------------------------


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.0 {status}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "\r\n"
    )
    return head.encode("ascii") + body


class _BadRequest(Exception):
    """The client did not send a request we can parse (answered 400)."""


async def _read_head(stream: trio.SocketStream) -> bytes:
    """Read up to the blank line that ends the request head (no body is expected).

    Returns ``b""`` when the client closed the connection without sending anything.

    Reading the whole head matters even though only the request line is used: closing a
    socket with unread data makes the kernel send a reset, which may destroy the response
    before the client has read it.

    Raises:
        _BadRequest: the head is larger than :data:`MAX_REQUEST_BYTES`, or the client
            closed the connection before ending it.
    """
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) >= MAX_REQUEST_BYTES:
            raise _BadRequest(f"request head larger than {MAX_REQUEST_BYTES} bytes")
        chunk = await stream.receive_some(MAX_REQUEST_BYTES - len(data))
        if not chunk:
            if not data:
                return b""  # connected and closed (a port check): nothing to answer
            raise _BadRequest("connection closed before the end of the request head")
        data += chunk
    return data


def _answer(head: bytes, get_text: Callable[[], str]) -> tuple[bytes, str]:
    """The response to a request head, and the request line for the log."""
    line = head.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        return _response("400 Bad Request", b"bad request\n"), line
    method, target, _ = parts
    path = target.split("?", 1)[0]  # a scraper may add parameters; none are used
    if method not in ("GET", "HEAD") or path != METRICS_PATH:
        return _response("404 Not Found", b"not found; try GET /metrics\n"), line
    try:
        body = get_text().encode("utf-8")
    except Exception:
        # A bug in rendering must not take the server (or the daemon) down with it.
        log.exception("metrics: rendering failed")
        return _response("500 Internal Server Error", b"internal error\n"), line
    response = _response("200 OK", body, CONTENT_TYPE)
    if method == "HEAD":
        response = response[: len(response) - len(body)]
    return response, line


async def _serve_one(
    stream: trio.SocketStream,
    get_text: Callable[[], str],
    read: Callable[[], object] = lambda: None,
) -> None:
    """Serve one request on ``stream``, then close it (HTTP/1.0: one response each);
    ``read()`` is called once the request is in (the connection is no longer idle)."""
    try:
        with trio.move_on_after(READ_TIMEOUT) as read_scope:
            try:
                head = await _read_head(stream)
                read()
            except _BadRequest as exc:
                log.debug("metrics: %s", exc)
                response = _response("400 Bad Request", b"bad request\n")
            else:
                if not head:
                    return
                response, line = _answer(head, get_text)
                log.debug("metrics: %r -> %s", line, response.split(b"\r\n", 1)[0].decode())
        if read_scope.cancelled_caught:
            log.debug("metrics: no complete request within %.0f s; closing", READ_TIMEOUT)
            return
        with trio.move_on_after(SEND_TIMEOUT):
            await stream.send_all(response)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        # The client went away (reset, closed early): nothing to answer.
        log.debug("metrics: connection lost: %r", exc)
    finally:
        # Cancellation (the daemon stopping) passes through: aclose is forceful then.
        await stream.aclose()


async def _open_listener(host: str, port: int) -> trio.socket.SocketType:
    """A listening socket on ``host`` (``""``: every address, IPv6 and IPv4) and ``port``.

    Raises:
        ConfigError: the address cannot be bound (in use, not on this host...).
    """
    if host:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        addrs = [(family, host)]
    else:
        # One dual-stack IPv6 socket serves both families; a host booted with IPv6
        # disabled has no AF_INET6, so fall back to IPv4 alone.
        addrs = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]
    for family, addr in addrs:
        try:
            sock = trio.socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            if exc.errno == errno.EAFNOSUPPORT and family == socket.AF_INET6 and not host:
                continue
            raise ConfigError(f"--metrics: cannot open a socket: {exc}") from exc
        try:
            # A restart must not wait for the old connections' TIME_WAIT to expire.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and not host:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            await sock.bind((addr, port))
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            shown = f"[{addr}]" if ":" in addr else addr
            raise ConfigError(
                f"--metrics: cannot listen on {shown}:{port}: {exc.strerror or exc}"
            ) from exc
        return sock
    raise ConfigError("--metrics: no address family available to listen on")


async def serve_metrics(
    host: str,
    port: int,
    get_text: Callable[[], str],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` with ``get_text()`` until cancelled.

    A minimal HTTP/1.0 server: ``GET`` (or ``HEAD``) ``/metrics`` answers 200 with
    ``text/plain; version=0.0.4``; any other path or method 404; a request that cannot be
    parsed or is larger than :data:`MAX_REQUEST_BYTES` 400. Each connection gets one
    response and is closed; one that does not send its request within
    :data:`READ_TIMEOUT` is closed without an answer. ``get_text`` runs on the event loop,
    so it sees a consistent :class:`~sdnsup.supervisor.Status`; it must be quick.

    Args:
        host: an IP address to listen on, or ``""`` for all
            (see :func:`sdnsup.options.parse_listen`).
        port: the TCP port; 0 picks a free one (reported through ``task_status``).
        get_text: returns the exposition text (usually a closure over :func:`render`).
        task_status: ``started(port)`` with the bound port once the socket listens.

    Raises:
        ConfigError: the address cannot be bound; raised before ``started``, so
            ``await nursery.start(serve_metrics, ...)`` reports it at start-up.
    """
    sock = await _open_listener(host, port)
    bound_port: int = sock.getsockname()[1]
    # A semaphore, not a CapacityLimiter: the accept loop takes a slot, the connection's
    # task gives it back.
    slots = trio.Semaphore(MAX_CONNECTIONS)
    # Connections still waiting for their request, oldest first: when every slot is taken,
    # a new connection closes the oldest of them, so idle connections (a flood, a slowloris)
    # cannot keep a scrape out for READ_TIMEOUT.
    idle: dict[trio.CancelScope, None] = {}

    async def handle(stream: trio.SocketStream) -> None:
        scope = trio.CancelScope()
        idle[scope] = None
        try:
            with scope:
                await _serve_one(stream, get_text, lambda: idle.pop(scope, None))
        except Exception:
            # One connection's bug must not end the server, nor (through the nursery) the
            # daemon that steers traffic. trio.Cancelled is no Exception: it passes.
            log.exception("metrics: serving a connection failed")
        finally:
            idle.pop(scope, None)
            slots.release()

    async with trio.SocketListener(sock) as listener, trio.open_nursery() as nursery:
        log.info("metrics: serving http://%s:%d%s", _show_host(host), bound_port, METRICS_PATH)
        task_status.started(bound_port)
        starved = False
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_RETRY_ERRNOS:
                    raise
                if not starved:  # once per episode, not ten lines a second
                    log.warning("metrics: cannot accept connections (%s); retrying", exc)
                starved = True
                await trio.sleep(ACCEPT_RETRY_DELAY)
                continue
            starved = False
            if not slots.value and idle:
                oldest = next(iter(idle))
                del idle[oldest]
                oldest.cancel()  # its task closes it and gives the slot back
            # At most MAX_CONNECTIONS in service plus this one waiting for a slot.
            await slots.acquire()
            nursery.start_soon(handle, stream)


def _show_host(host: str) -> str:
    if not host:
        return "*"
    return f"[{host}]" if ":" in host else host
