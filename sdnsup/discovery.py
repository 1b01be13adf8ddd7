"""Discovery: ask the control center (CC) for the list of APs, validate it, retry with backoff.

The protocol (design §4)::

    GET <cc>/v1/aps                      Authorization: Bearer <token>   (when a token is set)
    200 {"aps": [{"id": "ap-sh-1", "addr": "10.77.0.11", "addr6": "fd00::11",
                  "probe": {"kind": "udp", "port": 7300, "path": "/health"}, "weight": 1}],
         "ttl": 60}

Everything the CC sends is untrusted input. :func:`parse_answer` turns it into a
:class:`Directory` or raises :class:`~sdnsup.errors.BadAnswerError` naming the field and what is
wrong with it (``aps[2].addr: '127.0.0.1' is loopback``); a bad answer is retried like an
unreachable CC, never half-used. The rules:

- the answer is a JSON object (NaN/Infinity and absurd nesting are refused); unknown fields,
  at any level, are ignored so the CC can grow the protocol; ``null`` means "absent";
- ``aps``: a non-empty list of at most :data:`MAX_APS` objects;
- ``id``: a printable string of 1..:data:`MAX_ID_LEN` characters without surrounding spaces,
  unique in the list (it names the AP in logs and status);
- ``addr`` (IPv4) and/or ``addr6`` (IPv6), at least one; each a unicast address an AP can have:
  not loopback, multicast, unspecified, link-local, broadcast, reserved, ``0.0.0.0/8``,
  site-local, IPv4-mapped or scoped (``%eth0``); ``addr`` must be IPv4 and ``addr6`` IPv6; no
  address may belong to two APs (the prober and the exempt set key on addresses);
- ``probe``: optional, default ``{"kind": "udp", "port": 7300, "path": "/health"}``; ``kind`` one
  of :data:`~sdnsup.aps.PROBE_KINDS`; ``port`` 1..65535, defaulting per kind
  (:data:`~sdnsup.aps.DEFAULT_PROBE_PORT`) and ignored for ``icmp``; ``path`` starts with ``/``,
  at most :data:`MAX_PATH_LEN` visible ASCII characters (it goes into an HTTP request line);
- ``weight``: optional integer 1..:data:`MAX_WEIGHT`, default 1;
- ``track``: optional, at the top level (every AP) and per AP (that AP only): a list of at
  most :data:`MAX_TRACK` hosts inside the CIDRs to probe through the active AP, each a string
  ``ADDR`` (ICMP echo), ``icmp@ADDR``, ``tcp:PORT@ADDR`` or ``udp:PORT@ADDR`` (the
  ``--track`` syntax; :mod:`sdnsup.paths`);
- ``ttl``: optional number of seconds, default :data:`DEFAULT_TTL`, clamped to
  [:data:`MIN_TTL`, :data:`MAX_TTL`].

:class:`CCClient` makes one attempt per :meth:`~CCClient.fetch`: TLS verified against the system
trust store (or only the CA file it was given), no redirects followed, no proxy or netrc taken
from the environment, the whole exchange bounded in time and the body in size. Every httpx,
TLS and OS error is mapped to :class:`~sdnsup.errors.DiscoveryError` with an operator message
(``CC https://cc:8443 refused the connection``). The token never appears in a message, a log line
or a repr.

:func:`discover` retries :meth:`~CCClient.fetch` through tenacity. Backoff: after the n-th failed
attempt it sleeps ``uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (n - 1)))`` ("full jitter").
gRPC's connection backoff (1 s base, x1.6, 120 s cap, +-20% jitter) is the well-tried reference,
but its +-20% jitter keeps a fleet in step: when thousands of hosts restart together (power
event, CC outage) their k-th retries still land inside a window only 40% as wide as the delay,
so the CC sees synchronised waves. Full jitter spreads the k-th retries over the whole
[0, ceiling] window (AWS Architecture Blog, "Exponential Backoff and Jitter", 2015: least total
work and fastest completion of the schemes compared). Since its mean delay is half the ceiling,
doubling (x2 rather than x1.6) keeps the mean growth close to gRPC's; the 60 s cap (half of
gRPC's 120 s) bounds how long a host without an AP stays dark once the CC is back (at most 60 s,
30 s on average) while a fleet of N hosts at the cap asks about N/30 times a second on
average, spread evenly rather than in waves, for a small JSON document. Retries are unlimited
by default (the seed's default); ``retries=N`` gives up after N + 1 attempts with the last
error.

Errors (see :mod:`sdnsup.errors`)::

    DiscoveryError       the CC could not be asked: connection, DNS, TLS, timeout, HTTP status
    └── BadAnswerError   the CC answered, but not with a valid AP list (also: too large)
    ConfigError          CCClient was built with a bad URL, token or CA file
"""

from __future__ import annotations

import datetime
import email.utils
import errno
import ipaddress
import json
import logging
import math
import random
import socket
import ssl
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, cast

import httpx
import tenacity
import trio
from tenacity.asyncio import AsyncRetrying

from sdnsup import backoff
from sdnsup.aps import (
    DEFAULT_PROBE_PORT,
    PROBE_KINDS,
    AccessPoint,
    ProbeKind,
    ProbeSpec,
    Target,
    parse_target,
)
from sdnsup.errors import BadAnswerError, ConfigError, DiscoveryError

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "DEFAULT_TTL",
    "MAX_ANSWER_BYTES",
    "MAX_APS",
    "MAX_TTL",
    "MIN_TTL",
    "OVERLOADED",
    "RETRY_AFTER_MAX",
    "RETRY_JITTER",
    "CCClient",
    "Directory",
    "Fetcher",
    "OnRetry",
    "backoff_ceiling",
    "discover",
    "parse_answer",
    "parse_retry_after",
]

log = logging.getLogger(__name__)

# --- limits on the answer ---------------------------------------------------------------------
# Every AP is probed concurrently each round (3 probes each) and lands in the nft exempt set;
# 256 is far more than a regional overlay has and keeps one round under ~800 datagrams.
MAX_APS = 256
# An id is shown in every log line and in `sdnsup status`.
MAX_ID_LEN = 64
# An http probe path goes into a request line; real health paths are a few dozen characters.
MAX_PATH_LEN = 256
MAX_WEIGHT = 1000
# Tracked targets per list (top level, per AP): each is probed twice every 0.3 s.
MAX_TRACK = 16
# A CC that answers ttl=0 would have the whole fleet refresh in a tight loop: at least 10 s.
MIN_TTL = 10.0
# A typo such as ttl=6000000 must not pin a stale list for months: at most a day.
MAX_TTL = 86400.0
DEFAULT_TTL = 60.0
# 256 APs take ~60 KiB of JSON; 1 MiB leaves room for fields a newer CC adds and bounds memory.
MAX_ANSWER_BYTES = 1 << 20
# How much of an untrusted value (or body) a message shows, repr-escaped.
SHOW_CHARS = 100
# An error answer's body is read (for its first SHOW_CHARS) only when it declares this or less.
ERROR_BODY_BYTES = 4096

# --- timing -----------------------------------------------------------------------------------
# Linux resends a lost SYN after 1 s: 3 s covers one lost SYN and its retry.
CONNECT_TIMEOUT = 3.0
# The CC answers from memory; 5 s is generous even for a loaded CC on a slow path.
READ_TIMEOUT = 5.0
# Full-jitter backoff between attempts (see the module docstring for why).
BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
# Statuses by which a CC says "too many requests, back off" (RFC 6585 §4, RFC 9110 §15.6.4).
OVERLOADED = frozenset({429, 503})
# A Retry-After longer than this is cut to it: a CC that answers "come back tomorrow" (or a
# typo) must not leave a host without an AP dark for a day.
RETRY_AFTER_MAX = 600.0
# Hosts that all got the same Retry-After come back spread over this fraction of it.
RETRY_JITTER = 0.2

_PROBE_KINDS: dict[str, ProbeKind] = {kind: kind for kind in PROBE_KINDS}
_DEFAULT_PROBE = ProbeSpec()
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Directory:
    """A validated CC answer: the APs in the CC's order, and how long the list is good for."""

    aps: tuple[AccessPoint, ...]
    ttl: float  # seconds, already clamped to [MIN_TTL, MAX_TTL]
    track: tuple[Target, ...] = ()  # probed through whichever AP is active
    # the answer as received (what the saved list keeps: sdnsup.savedlist)
    raw: bytes = field(default=b"", repr=False, compare=False)


# --- parse_answer -----------------------------------------------------------------------------


def _show(value: object) -> str:
    """An untrusted value for a message: repr-escaped, at most about SHOW_CHARS characters."""
    if isinstance(value, str | bytes) and len(value) > SHOW_CHARS:
        return f"{value[:SHOW_CHARS]!r}... ({len(value)} in all)"
    text = repr(value)
    return text if len(text) <= SHOW_CHARS else f"{text[:SHOW_CHARS]}..."


def _kind(value: object) -> str:
    """The JSON type of a decoded value, for "expected X, got Y" messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__  # pragma: no cover - json.loads makes nothing else


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_in(value: object, low: int, high: int, where: str) -> int:
    if not _is_int(value):
        raise BadAnswerError(f"{where}: expected an integer, got {_kind(value)}")
    assert isinstance(value, int)
    if not low <= value <= high:
        raise BadAnswerError(f"{where}: {_show(value)} is outside {low}..{high}")
    return value


def _unicast_problem(addr: IPAddress) -> str | None:
    """Why no AP can have ``addr`` (None: it can). Extends :func:`sdnsup.aps.check_unicast`."""
    if addr.is_loopback:
        return "loopback"
    if addr.is_multicast:
        return "multicast"
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_link_local:
        return "link-local"
    if isinstance(addr, ipaddress.IPv4Address):
        if addr == _BROADCAST:
            return "the broadcast address"
        if addr in _THIS_NETWORK:
            return "in 0.0.0.0/8 ('this network')"
    elif addr.is_site_local:
        return "site-local (deprecated, fec0::/10)"
    if addr.is_reserved:
        return "reserved"
    return None


def _address(
    item: Mapping[str, Any],
    key: str,
    version: int,
    where: str,
    seen: dict[IPAddress, str],
) -> IPAddress | None:
    """Parse ``item[key]`` as a unicast address of IP ``version``; None when absent."""
    value = item.get(key)
    if value is None:
        return None
    at = f"{where}.{key}"
    if not isinstance(value, str):
        raise BadAnswerError(f"{at}: expected an IP address string, got {_kind(value)}")
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise BadAnswerError(f"{at}: {_show(value)} is not an IP address") from None
    if addr.version != version:
        right = "addr6" if addr.version == 6 else "addr"
        raise BadAnswerError(
            f"{at}: {_show(value)} is IPv{addr.version}; IPv{addr.version} addresses go in {right}"
        )
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id is not None:
            raise BadAnswerError(f"{at}: {_show(value)} has a zone index; an AP needs none")
        if addr.ipv4_mapped is not None:
            raise BadAnswerError(
                f"{at}: {_show(value)} is an IPv4-mapped address; put {addr.ipv4_mapped} in addr"
            )
    problem = _unicast_problem(addr)
    if problem is not None:
        raise BadAnswerError(f"{at}: {_show(value)} is {problem}")
    if addr in seen:
        raise BadAnswerError(f"{at}: {_show(value)} is also {seen[addr]}")
    seen[addr] = at
    return addr


def _id(item: Mapping[str, Any], where: str, seen: dict[str, str]) -> str:
    at = f"{where}.id"
    value = item.get("id")
    if value is None:
        raise BadAnswerError(f"{at}: missing")
    if not isinstance(value, str):
        raise BadAnswerError(f"{at}: expected a string, got {_kind(value)}")
    if not value:
        raise BadAnswerError(f"{at}: empty")
    if len(value) > MAX_ID_LEN:
        raise BadAnswerError(f"{at}: {_show(value)} is longer than {MAX_ID_LEN} characters")
    if not value.isprintable() or value.strip() != value:
        raise BadAnswerError(
            f"{at}: {_show(value)} has non-printable characters or surrounding spaces"
        )
    if value in seen:
        raise BadAnswerError(f"{at}: {_show(value)} is also the id of {seen[value]}")
    seen[value] = where
    return value


def _probe(item: Mapping[str, Any], where: str) -> ProbeSpec:
    at = f"{where}.probe"
    raw = item.get("probe")
    if raw is None:
        return _DEFAULT_PROBE
    if not isinstance(raw, dict):
        raise BadAnswerError(f"{at}: expected an object, got {_kind(raw)}")
    raw_kind = raw.get("kind")
    kind: ProbeKind | None = "udp"
    if raw_kind is not None:
        kind = _PROBE_KINDS.get(raw_kind) if isinstance(raw_kind, str) else None
    if kind is None:
        raise BadAnswerError(f"{at}.kind: {_show(raw_kind)} is not one of {', '.join(PROBE_KINDS)}")
    port = DEFAULT_PROBE_PORT[kind]
    if kind != "icmp" and raw.get("port") is not None:  # icmp has no port: ignored
        port = _int_in(raw["port"], 1, 65535, f"{at}.port")
    path = raw.get("path")
    if path is None:
        path = _DEFAULT_PROBE.path
    elif not isinstance(path, str):
        raise BadAnswerError(f"{at}.path: expected a string, got {_kind(path)}")
    elif not path.startswith("/"):
        raise BadAnswerError(f"{at}.path: {_show(path)} does not start with '/'")
    elif len(path) > MAX_PATH_LEN:
        raise BadAnswerError(f"{at}.path: {_show(path)} is longer than {MAX_PATH_LEN} characters")
    elif not all("!" <= c <= "~" for c in path):
        raise BadAnswerError(
            f"{at}.path: {_show(path)} has characters other than visible ASCII "
            "(percent-encode them)"
        )
    return ProbeSpec(kind=kind, port=port, path=path)


def _ap(
    item: object,
    where: str,
    ids: dict[str, str],
    addrs: dict[IPAddress, str],
) -> AccessPoint:
    if not isinstance(item, dict):
        raise BadAnswerError(f"{where}: expected an object, got {_kind(item)}")
    ap_id = _id(item, where, ids)
    addr4 = _address(item, "addr", 4, where, addrs)
    addr6 = _address(item, "addr6", 6, where, addrs)
    assert addr4 is None or isinstance(addr4, ipaddress.IPv4Address)
    assert addr6 is None or isinstance(addr6, ipaddress.IPv6Address)
    if addr4 is None and addr6 is None:
        raise BadAnswerError(f"{where}: has neither addr (IPv4) nor addr6 (IPv6)")
    probe = _probe(item, where)
    weight = item.get("weight")
    weight = 1 if weight is None else _int_in(weight, 1, MAX_WEIGHT, f"{where}.weight")
    track = _track(item.get("track"), f"{where}.track")
    return AccessPoint(id=ap_id, addr4=addr4, addr6=addr6, probe=probe, weight=weight, track=track)


def _track(value: object, where: str) -> tuple[Target, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise BadAnswerError(f"{where}: expected a list, got {_kind(value)}")
    if len(value) > MAX_TRACK:
        raise BadAnswerError(f"{where}: {len(value)} targets, more than {MAX_TRACK}")
    out: list[Target] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise BadAnswerError(f"{where}[{i}]: expected a string, got {_kind(item)}")
        try:
            target = parse_target(item, f"{where}[{i}]")
        except ConfigError as exc:
            raise BadAnswerError(str(exc)) from None
        if isinstance(target.addr, ipaddress.IPv6Address) and target.addr.scope_id:
            raise BadAnswerError(f"{where}[{i}]: {_show(item)} has a zone index")
        if target not in out:
            out.append(target)
    return tuple(out)


def _ttl(value: object) -> float:
    if value is None:
        return DEFAULT_TTL
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadAnswerError(f"ttl: expected a number of seconds, got {_kind(value)}")
    if math.isnan(value):  # pragma: no cover - json.loads is told to refuse NaN
        raise BadAnswerError("ttl: not a number")
    # Clamped, not refused: a CC that asks too often or too rarely still gets a usable list.
    return float(min(max(value, MIN_TTL), MAX_TTL))


def parse_answer(body: bytes) -> Directory:
    """Validate a CC answer (untrusted input) and build the :class:`Directory`.

    Pure: no I/O, no logging. See the module docstring for the rules.

    Args:
        body: the answer body as received (UTF-8/16/32 JSON); its size is the caller's to bound.

    Returns:
        The APs, in the CC's order, and the clamped ttl.

    Raises:
        BadAnswerError: the first problem found, naming the field (``aps[1].addr6: ...``).
    """
    try:
        doc = json.loads(body, parse_constant=_no_constant)
    except RecursionError as exc:
        raise BadAnswerError(f"answer is JSON nested too deeply: {_show(body)}") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int too long, NaN
        raise BadAnswerError(f"answer is not JSON ({exc}): {_show(body)}") from exc
    if not isinstance(doc, dict):
        raise BadAnswerError(f"answer is not a JSON object but {_kind(doc)}: {_show(body)}")
    raw_aps = doc.get("aps")
    if raw_aps is None:
        raise BadAnswerError("aps: missing")
    if not isinstance(raw_aps, list):
        raise BadAnswerError(f"aps: expected a list, got {_kind(raw_aps)}")
    if not raw_aps:
        raise BadAnswerError("aps: empty, the CC lists no AP")
    if len(raw_aps) > MAX_APS:
        raise BadAnswerError(f"aps: {len(raw_aps)} APs, more than the {MAX_APS} sdnsup accepts")
    ids: dict[str, str] = {}
    addrs: dict[IPAddress, str] = {}
    aps = tuple(_ap(item, f"aps[{i}]", ids, addrs) for i, item in enumerate(raw_aps))
    track = _track(doc.get("track"), "track")
    return Directory(aps=aps, ttl=_ttl(doc.get("ttl")), track=track, raw=bytes(body))


# --- CCClient ---------------------------------------------------------------------------------


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its causes and contexts, and the members of exception groups among them."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        todo.extend(c for c in (e.__cause__, e.__context__) if c is not None)


def _content_length(response: httpx.Response) -> int | None:
    """The declared body length; None when absent or not a plain decimal."""
    length = response.headers.get("Content-Length", "").strip()
    if not (length.isascii() and length.isdigit()):
        return None
    # a 30-digit length is absurd already; int() of a huge string would be refused
    return int(length) if len(length) <= 30 else 1 << 100


class CCClient:
    """Asks the CC for its AP list, one attempt per :meth:`fetch`. An async context manager.

    Args:
        url: the CC's base URL, ``https://cc.example:8443`` (``/v1/aps`` is appended; a path
            prefix such as ``https://gw/sdn/`` is kept). ``http`` works but is unauthenticated.
        token: sent as ``Authorization: Bearer <token>``; surrounding whitespace (a file's
            trailing newline) is stripped. Never shown in a message, log line or repr.
        ca_file: trust only this CA (PEM) for the CC's certificate, instead of the system store.
        transport: an httpx transport to use instead of the network (tests: ``MockTransport``).
        connect_timeout / read_timeout: seconds for TCP+TLS setup / between received bytes;
            their sum bounds the whole exchange, so a CC that trickles bytes cannot stall it.
        max_bytes: a larger answer is refused without being read to its end.

    Raises:
        ConfigError: the URL is not ``http(s)://host...`` or carries credentials, the token has
            characters an HTTP header cannot carry, or the CA file is unusable.

    The httpx client is built on first use and released by :meth:`aclose` (idempotent).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        ca_file: Path | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        max_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        try:
            base = httpx.URL(url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise ConfigError(f"CC URL {_show(url)} is not a URL: {exc}") from exc
        if base.userinfo:
            # Shown without the userinfo: it may hold a password.
            raise ConfigError(
                f"CC URL {base.scheme}://...@{base.netloc.decode()}: credentials do not go in the "
                "URL; give sdnsup a token"
            )
        if base.scheme not in ("http", "https") or not base.host:
            raise ConfigError(f"CC URL {_show(url)}: expected https://HOST[:PORT][/PREFIX]")
        if base.query or base.fragment:
            raise ConfigError(f"CC URL {_show(url)}: a query or fragment is not allowed")
        prefix = base.path.rstrip("/")
        self._display = f"{base.scheme}://{base.netloc.decode()}{prefix}"
        self._aps_url = base.copy_with(path=f"{prefix}/v1/aps")
        self._headers = {"Accept": "application/json", "Accept-Encoding": "identity"}
        self._has_token = token is not None
        if token is not None:
            token = token.strip()
            if not token:
                raise ConfigError("the CC token is empty")
            if not all("!" <= c <= "~" for c in token):
                raise ConfigError(
                    "the CC token has characters an HTTP header cannot carry "
                    "(only visible ASCII is allowed; the token itself is not shown)"
                )
            self._headers["Authorization"] = f"Bearer {token}"
            if base.scheme == "http":
                log.warning("the CC token is sent in clear text to %s", self._display)
        self._verify: ssl.SSLContext | None = None
        if transport is None and base.scheme == "https":
            self._verify = self._ssl_context(ca_file)
        self._ca_file = ca_file
        self._transport = transport
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._deadline = connect_timeout + read_timeout
        self._max_bytes = max_bytes
        self._client: httpx.AsyncClient | None = None
        self._closed = False

    @staticmethod
    def _ssl_context(ca_file: Path | None) -> ssl.SSLContext:
        if ca_file is None:
            # The system store (what update-ca-certificates manages), not certifi's bundle.
            return ssl.create_default_context()
        try:
            return ssl.create_default_context(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:  # missing, unreadable, not PEM
            raise ConfigError(f"CC CA file {ca_file}: {_why(exc)}") from exc

    @property
    def url(self) -> str:
        """The CC's base URL as shown in messages (no credentials, no trailing slash)."""
        return self._display

    @property
    def host(self) -> str:
        """The CC's host name or address (the daemon exempts its addresses from steering)."""
        return self._aps_url.host

    def __repr__(self) -> str:
        token = "<set>" if self._has_token else None
        return f"CCClient(url={self._display!r}, token={token}, ca_file={self._ca_file!r})"

    def _http(self) -> httpx.AsyncClient:
        if self._closed:
            raise RuntimeError("CCClient is closed")
        if self._client is None:
            timeout = httpx.Timeout(
                connect=self._connect_timeout,
                read=self._read_timeout,
                write=self._read_timeout,
                pool=self._connect_timeout,
            )
            extra: dict[str, Any] = {}
            if self._transport is not None:
                extra["transport"] = self._transport
            elif self._verify is not None:
                extra["verify"] = self._verify
            else:
                # Plain http: no TLS is ever spoken (redirects are not followed), so skip
                # the default context httpx would build from certifi's bundle (25-45 ms).
                extra["verify"] = False
            self._client = httpx.AsyncClient(
                headers=self._headers,
                timeout=timeout,
                follow_redirects=False,
                # Proxies and netrc from the environment would route the CC's traffic to a
                # host that the steering exemption does not cover, and add credentials.
                trust_env=False,
                **extra,
            )
        return self._client

    async def aclose(self) -> None:
        """Release the connection pool. Idempotent; the client cannot be used afterwards."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def __aenter__(self) -> Self:
        self._http()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def fetch(self) -> Directory:
        """Ask the CC once for its AP list.

        Returns:
            The validated :class:`Directory`.

        Raises:
            DiscoveryError: no connection (refused, DNS, unreachable, TLS), no complete answer
                within ``connect_timeout + read_timeout``, or an HTTP status other than 200.
            BadAnswerError: the answer is larger than ``max_bytes`` or not a valid AP list.
            RuntimeError: the client was closed.

        Cancellation propagates; the connection is then closed, never reused half-read.
        """
        client = self._http()
        body: bytes | None = None
        with trio.move_on_after(self._deadline):
            body = await self._get(client)
        if body is None:
            raise DiscoveryError(
                f"CC {self._display} did not answer within {self._deadline:g} s "
                "(connect and read timeouts together)"
            )
        try:
            return parse_answer(body)
        except BadAnswerError as exc:
            raise BadAnswerError(f"CC {self._display} sent a bad AP list: {exc}") from exc

    async def _get(self, client: httpx.AsyncClient) -> bytes:
        at = self._display
        try:
            async with client.stream("GET", self._aps_url) as response:
                if response.status_code == 200:
                    return await self._read_body(response)
                message = await self._status_message(response)
                overloaded = response.status_code in OVERLOADED
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
        except httpx.ConnectTimeout as exc:
            raise DiscoveryError(
                f"CC {at} did not accept a connection within {self._connect_timeout:g} s"
            ) from exc
        except (httpx.ReadTimeout, httpx.WriteTimeout) as exc:
            raise DiscoveryError(f"CC {at} did not answer within {self._read_timeout:g} s") from exc
        except httpx.TimeoutException as exc:
            raise DiscoveryError(f"CC {at}: timed out ({type(exc).__name__})") from exc
        except httpx.ConnectError as exc:
            raise DiscoveryError(self._connect_message(exc)) from exc
        except httpx.DecodingError as exc:
            raise BadAnswerError(f"CC {at}: answer cannot be decoded: {_why(exc)}") from exc
        except httpx.RemoteProtocolError as exc:
            raise DiscoveryError(f"CC {at} broke the HTTP protocol: {_why(exc)}") from exc
        except httpx.HTTPError as exc:  # ReadError, WriteError, other transport errors
            raise DiscoveryError(
                f"CC {at}: the exchange failed: {type(exc).__name__}: {_why(exc)}"
            ) from exc
        except OSError as exc:  # a transport that lets one through
            raise DiscoveryError(f"CC {at}: {_why(exc)}") from exc
        if retry_after is not None:
            message += f"; it asks to retry after {retry_after:g} s"
        raise DiscoveryError(message, overloaded=overloaded, retry_after=retry_after)

    async def _read_body(self, response: httpx.Response) -> bytes:
        """The body, refused as soon as it is known to exceed ``max_bytes``."""
        too_large = f"CC {self._display}: answer larger than {_size(self._max_bytes)}"
        length = _content_length(response)
        if length is not None and length > self._max_bytes:
            raise BadAnswerError(f"{too_large} (Content-Length {length}); not read")
        chunks: list[bytes] = []
        size = 0
        # Leaving early drops httpx's inner async generators unexhausted; trio then closes them
        # itself with a ResourceWarning (encode/httpx#3686, ignored by default). Only a body
        # without Content-Length that overflows gets here; aclosing closes the outer one now.
        async with aclosing(cast(AsyncGenerator[bytes, None], response.aiter_bytes())) as body:
            async for chunk in body:
                size += len(chunk)
                if size > self._max_bytes:
                    raise BadAnswerError(f"{too_large}; reading stopped there")
                chunks.append(chunk)
        return b"".join(chunks)

    def _connect_message(self, exc: httpx.ConnectError) -> str:
        at = self._display
        for cause in _causes(exc):
            if isinstance(cause, ssl.SSLCertVerificationError):
                reason = cause.verify_message or _why(cause)
                return (
                    f"CC {at}: its TLS certificate is not trusted: {reason} (give sdnsup the "
                    "CA file that signed it, or fix the CC's certificate)"
                )
            if isinstance(cause, ssl.SSLError):
                reason = getattr(cause, "reason", None) or _why(cause)
                return f"CC {at}: TLS handshake failed: {reason}"
            if isinstance(cause, ConnectionRefusedError):
                return f"CC {at} refused the connection (is the CC running on that port?)"
            if isinstance(cause, socket.gaierror):
                return f"CC {at}: cannot resolve {self.host!r}: {cause.strerror or _why(cause)}"
            if isinstance(cause, OSError) and cause.errno in (
                errno.ENETUNREACH,
                errno.EHOSTUNREACH,
            ):
                return f"CC {at} is unreachable: {cause.strerror}"
        return f"CC {at}: cannot connect: {_why(exc)}"

    async def _status_message(self, response: httpx.Response) -> str:
        status = f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
        message = f"CC {self._display} answered {status}"
        if response.status_code in (401, 403):
            message += (
                ": the CC refused the token"
                if self._has_token
                else ": the CC wants a token and none was given"
            )
        elif response.is_redirect:
            location = response.headers.get("Location", "")
            message += f": redirects are not followed (to {_show(location)}); use the final URL"
        snippet = b""
        length = _content_length(response)
        if length is not None and length <= ERROR_BODY_BYTES:
            # Read whole (see _read_body for why not part of a larger one); framed by h11.
            try:
                snippet = await response.aread()
            except httpx.HTTPError:
                pass  # the status is what matters
        if snippet:
            # Text, escaped and quoted (not a Python bytes literal): what an operator reads.
            text = snippet[:SHOW_CHARS].decode("utf-8", errors="replace").strip()
            message += f"; body {_show(text)}"
        return message


# --- discover ---------------------------------------------------------------------------------


class Fetcher(Protocol):
    """What :func:`discover` needs: one attempt at fetching the directory."""

    async def fetch(self) -> Directory: ...


# on_retry(attempt, error, delay): attempt is the 1-based number of the attempt that failed,
# delay the seconds until the next one.
OnRetry = Callable[[int, DiscoveryError, float], None]


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delay-seconds or an HTTP-date, RFC 9110
    §10.2.3), at most :data:`RETRY_AFTER_MAX`; None when absent or unreadable. ``now``:
    the wall clock for an HTTP-date (default: now)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), RETRY_AFTER_MAX)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a zone-less one is read as such
        when = when.replace(tzinfo=datetime.UTC)
    at = time.time() if now is None else now
    return min(max(0.0, when.timestamp() - at), RETRY_AFTER_MAX)


def backoff_ceiling(failures: int) -> float:
    """The upper bound of the full-jitter delay after ``failures`` failed attempts (>= 1)."""
    return backoff.ceiling(BACKOFF_BASE, BACKOFF_CAP, failures)


def _log_retry(attempt: int, error: DiscoveryError, delay: float) -> None:
    log.warning("CC attempt %d failed: %s; next attempt in %.1f s", attempt, error, delay)


async def discover(
    client: Fetcher,
    *,
    retries: int | None = None,
    on_retry: OnRetry | None = None,
) -> Directory:
    """Fetch the directory, retrying :class:`~sdnsup.errors.DiscoveryError` with backoff.

    A bad answer (:class:`~sdnsup.errors.BadAnswerError`) is retried too: the CC may be
    mid-deploy. Any other exception propagates at once, and so does cancellation, whether it
    hits an attempt or the sleep between attempts.

    Args:
        client: a :class:`CCClient` (or anything with ``async fetch() -> Directory``).
        retries: None (default) retries forever; N gives up after N retries (N + 1 attempts).
        on_retry: called as ``on_retry(attempt, error, delay)`` before each sleep, for one
            log line per failed attempt; by default a warning goes to the ``sdnsup`` logger.

    Returns:
        The first valid directory.

    Raises:
        DiscoveryError: (or BadAnswerError) the last error, with ``gave up after N attempts``
            in front, when ``retries`` is exhausted.
    """
    if retries is not None and retries < 0:
        raise ValueError(f"retries must be None or >= 0, not {retries}")
    report = on_retry or _log_retry

    def wait(state: tenacity.RetryCallState) -> float:
        delay = random.uniform(0.0, backoff_ceiling(state.attempt_number))
        error = state.outcome.exception() if state.outcome is not None else None
        if isinstance(error, DiscoveryError) and error.retry_after is not None:
            # never before the CC asked, and not all at the same instant either
            delay = max(delay, error.retry_after * random.uniform(1.0, 1.0 + RETRY_JITTER))
        return delay

    def before_sleep(state: tenacity.RetryCallState) -> None:
        assert state.outcome is not None
        error = state.outcome.exception()
        assert isinstance(error, DiscoveryError)
        report(state.attempt_number, error, state.upcoming_sleep)

    stop: tenacity.stop.stop_base = (
        tenacity.stop_never if retries is None else tenacity.stop_after_attempt(retries + 1)
    )
    retrying = AsyncRetrying(
        sleep=trio.sleep,
        stop=stop,
        wait=wait,
        # Only our own "the CC could not be asked" errors: a bug (or trio.Cancelled, a
        # BaseException) is not retried but re-raised by tenacity as it was.
        retry=tenacity.retry_if_exception_type(DiscoveryError),
        before_sleep=before_sleep,
    )
    try:
        directory: Directory = await retrying(client.fetch)
    except tenacity.RetryError as exc:
        last = exc.last_attempt.exception()
        if not isinstance(last, DiscoveryError):  # pragma: no cover - only those are retried
            raise
        attempts = exc.last_attempt.attempt_number
        plural = "s" if attempts != 1 else ""
        raise type(last)(f"gave up after {attempts} attempt{plural}: {last}") from last
    return directory
