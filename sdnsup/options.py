"""The ``run`` options: one declarative table, and the argparse options built from it.

One table, :data:`OPTIONS`, names each option once: its type, its default, a help text that
says the default *and why*, and its validator. Everything else derives from it: the argparse
options (:func:`add_run_arguments`), the environment variable (``SDNSUP_`` + the name
upper-cased with dashes as underscores), the TOML key (the name with underscores) and the
resolved, typed value in :class:`sdnsup.config.RunOptions`. An option added to the table is
therefore settable from all three sources at once, and cannot drift between them.

A value is read the same way whichever source it came from: its :class:`Kind` turns text
(command line, environment) or a TOML value into a Python value, then the option's check
validates and normalises it. Both raise :class:`InvalidValue` saying what is wrong but not
where: :mod:`sdnsup.config`, which merges the sources in their order of precedence and reads
the file, knows where and says so.

The CC token is deliberately not an option: it comes from ``--cc-token-file`` or
``SDNSUP_CC_TOKEN`` only (see ``cli.read_token``), never from argv or a config file that is
usually world-readable.

Importing it imports neither trio nor the daemon, so that the commands that only parse
options (``plan``, ``check``, ``--help``) start fast: the defaults come from modules as light
as this one, mostly :mod:`sdnsup.defaults`.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import math
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sdnsup import defaults
from sdnsup.aps import PROBE_KINDS, ProbeSpec, Target, parse_static_aps, parse_targets
from sdnsup.cidrs import MAX_CIDRS, MAX_FILE_BYTES
from sdnsup.errors import ConfigError
from sdnsup.logs import DEFAULT_LOG_DIR  # /tmp/sdnsup: the seed's convention
from sdnsup.state import DEFAULT_MARK, DEFAULT_MASK, DEFAULT_PRIORITY, DEFAULT_TABLE, NoApPolicy

ENV_PREFIX = "SDNSUP_"
# A secret input, not an option: the token itself, read by cli.read_token.
TOKEN_ENV = "SDNSUP_CC_TOKEN"

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
# The same as sdnsup.logs' (a test keeps them equal), typed as Literals for RunOptions.
LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
NO_AP_POLICIES: tuple[NoApPolicy, ...] = ("fallback", "blackhole")
NEXTHOP_COMPAT_POLICIES: tuple[defaults.NexthopCompat, ...] = ("auto", "keep")
# Values that switch off an optional feature set by a lower-precedence source.
_OFF_WORDS = ("none", "off")
_TRUE_WORDS = ("true", "yes", "1")
_FALSE_WORDS = ("false", "no", "0")


class InvalidValue(Exception):
    """A value is wrong. The message says why, not where: the caller knows the source."""


class _WrongType(InvalidValue):
    """A TOML value has the wrong type (TOML is typed, so this is caught before parsing)."""

    def __init__(self, expected: str, value: object) -> None:
        super().__init__(f"expected {expected}, got {_toml_type(value)}")


# bool before int and datetime before date: Python's bool is an int, datetime is a date.
_TOML_TYPE_NAMES: tuple[tuple[type, str], ...] = (
    (bool, "boolean"),
    (int, "integer"),
    (float, "float"),
    (str, "string"),
    (dict, "table"),
    (datetime.datetime, "datetime"),
    (datetime.date, "date"),
    (datetime.time, "time"),
)


def _toml_type(value: object) -> str:
    """The TOML name of ``value``'s type, as the user wrote it in the file."""
    if isinstance(value, list):
        inner = sorted({_toml_type(v) for v in value})
        return f"array of {' and '.join(inner)}" if inner else "empty array"
    for typ, name in _TOML_TYPE_NAMES:
        if isinstance(value, typ):
            return name
    return type(value).__name__


# --- kinds: how text (command line, environment) or a TOML value becomes a Python value -------


@dataclass(frozen=True, slots=True)
class Kind:
    """The raw type of an option: parses text and type-checks TOML values.

    The option's own ``check`` then validates and normalises the result, so the same rule
    applies whichever source the value came from.
    """

    from_text: Callable[[str], object]
    from_toml: Callable[[object], object]


def _str_from_toml(value: object) -> str:
    if isinstance(value, str):
        return value
    raise _WrongType("a string", value)


def _strs_from_toml(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _WrongType("a string or an array of strings", value)


def _float_from_text(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidValue(f"{text!r} is not a number") from None


def _float_from_toml(value: object) -> float:
    # TOML writes 1 and 1.0 differently; "keepalive_interval = 1" must not be a type error.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise _WrongType("a number", value)


def _int_from_text(text: str) -> int:
    try:
        return int(text, 0)  # base 0: 0x1000 and 4096 alike, as marks are usually hex
    except ValueError:
        raise InvalidValue(f"{text!r} is not a number (e.g. 4096 or 0x1000)") from None


def _int_from_toml(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _WrongType("an integer", value)


def _bool_from_text(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise InvalidValue(f"{text!r} is not a boolean (use true/false, yes/no or 1/0)")


def _bool_from_toml(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise _WrongType("a boolean (true or false)", value)


STRING = Kind(from_text=str, from_toml=_str_from_toml)
# Repeatable on the command line; a string or an array of strings in the file.
STRINGS = Kind(from_text=lambda text: (text,), from_toml=_strs_from_toml)
FLOAT = Kind(from_text=_float_from_text, from_toml=_float_from_toml)
INTEGER = Kind(from_text=_int_from_text, from_toml=_int_from_toml)
BOOLEAN = Kind(from_text=_bool_from_text, from_toml=_bool_from_toml)


# --- checks: validate and normalise one option's value (raise InvalidValue) --------------------


def _positive_seconds(value: float) -> float:
    # NaN compares false with everything, so "<= 0" alone would let it through.
    if not math.isfinite(value) or value <= 0:
        raise InvalidValue(f"must be a positive number of seconds, got {value:g}")
    return value


def _keepalive_seconds(minimum: float) -> Callable[[float], float]:
    """A keepalive timer: positive, and not below ``minimum`` (see :mod:`sdnsup.keepalive`:
    shorter timers measure the host's scheduler, not the AP, and cause false failovers)."""

    def check(value: float) -> float:
        value = _positive_seconds(value)
        if value < minimum:
            raise InvalidValue(
                f"must be at least {minimum:g} s (shorter timers fail over on scheduling "
                f"noise, not on a dead AP), got {value:g}"
            )
        return value

    return check


def _keepalive_misses(value: int) -> int:
    if value < defaults.MIN_MISSES:
        raise InvalidValue(
            f"must be {defaults.MIN_MISSES} or more, got {value} (with fewer, a single lost "
            "probe is a failover)"
        )
    return value


def _at_least(minimum: int) -> Callable[[int], int]:
    def check(value: int) -> int:
        if value < minimum:
            raise InvalidValue(f"must be {minimum} or more, got {value}")
        return value

    return check


def _u32(value: int) -> int:
    # Marks are 32-bit in the kernel; that mark lies inside mask is Settings' job.
    if not 0 <= value <= 0xFFFFFFFF:
        raise InvalidValue(f"must be a 32-bit value (0 to 0xffffffff), got {value:#x}")
    return value


def _choice(*choices: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        word = value.strip().lower()
        if word not in choices:
            raise InvalidValue(f"must be one of {', '.join(choices)}, got {value!r}")
        return word

    return check


def _path(value: str) -> Path:
    if not value:
        raise InvalidValue("empty path")
    return Path(value)


def _log_dir(value: str) -> Path | None:
    if value.strip().lower() in _OFF_WORDS:
        return None
    return _path(value)


def _host_id(value: str) -> str:
    text = value.strip()
    if not text or len(text) > 128 or not text.isprintable():
        raise InvalidValue(f"{value!r} is not a host id (1-128 printable characters)")
    return text


def _url(value: str) -> str:
    """A light check with the source named; ``discovery.CCClient`` checks the URL fully."""
    url = value.strip()
    try:
        parts = urllib.parse.urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        ok = False
    if not ok:
        raise InvalidValue(f"{value!r} is not a URL like https://cc.example.net")
    return url


def _aps(specs: tuple[str, ...]) -> str:
    """Validate a static AP list now, so a bad one is reported with its source."""
    spec = ",".join(specs)
    try:
        parse_static_aps(spec)
    except ConfigError as exc:
        # parse_static_aps speaks of "--ap ..."; the caller prefixes the real source.
        raise InvalidValue(str(exc).removeprefix("--ap ")) from exc
    return spec


def _routes(specs: tuple[str, ...]) -> tuple[str, ...]:
    # The CIDRs themselves (and @FILEs) are parsed once, for the winning source, in resolve:
    # a 100k-line file is read once, not once per source.
    return specs


def _track(specs: tuple[str, ...] | None) -> tuple[Target, ...]:
    return parse_targets(specs or ())


def _probe(spec: str) -> ProbeSpec:
    """``udp:7300``, ``tcp:22``, ``icmp``, ``http:7301/health`` -> :class:`ProbeSpec`."""
    kind, _, rest = spec.partition(":")
    if kind not in PROBE_KINDS:
        raise InvalidValue(f"{spec!r}: kind must be one of {', '.join(PROBE_KINDS)}")
    port_text, _, path = rest.partition("/")
    default = ProbeSpec()
    try:
        port = int(port_text) if port_text else (7301 if kind in ("tcp", "http") else default.port)
    except ValueError:
        raise InvalidValue(f"{spec!r}: {port_text!r} is not a port") from None
    if not 0 < port < 65536:
        raise InvalidValue(f"{spec!r}: port must be 1-65535")
    return ProbeSpec(kind=kind, port=port, path="/" + path if path else default.path)


def parse_probe(spec: str) -> ProbeSpec:
    """Parse a ``--probe`` value (once in ``cli``; same syntax and messages).

    Raises:
        ConfigError: unknown kind, a port that is not a number or outside 1-65535.
    """
    try:
        return _probe(spec)
    except InvalidValue as exc:
        raise ConfigError(f"--probe {exc}") from None


def parse_listen(text: str) -> tuple[str, int]:
    """Parse ``--metrics``: ``127.0.0.1:9730``, ``[::1]:9730``, or ``:9730`` for all addresses.

    Args:
        text: the option's value.

    Returns:
        ``(host, port)``; ``host`` is an IP address, or ``""`` for all addresses (IPv6 and
        IPv4 where the host has IPv6, else IPv4).

    Raises:
        ConfigError: no port, a port outside 1-65535, a host that is not an IP address, or
            an IPv6 address without brackets.
    """
    usage = "use ADDR:PORT, [IPV6]:PORT or :PORT, e.g. 127.0.0.1:9730"
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        raise ConfigError(f"{text!r} has no port; {usage}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{text!r}: {host!r} is not an IPv6 address; {usage}") from None
    elif host:
        if ":" in host:
            raise ConfigError(f"{text!r}: put an IPv6 address in brackets; {usage}")
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            # A name would be resolved once at start and could name several addresses:
            # an explicit address says exactly where an unauthenticated endpoint listens.
            raise ConfigError(f"{text!r}: {host!r} is not an IP address; {usage}") from None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{text!r}: the port must be 1-65535; {usage}")
    return host, int(port_text)


def _listen(value: str) -> tuple[str, int] | None:
    """:func:`parse_listen`, plus ``off`` -> None."""
    if value.strip().lower() in _OFF_WORDS:
        return None
    try:
        return parse_listen(value)
    except ConfigError as exc:
        raise InvalidValue(f"{exc}; 'off' disables") from None


def _config_path(value: str) -> Path | None:
    if value.strip().lower() in _OFF_WORDS:
        return None
    return _path(value)


# --- the table ---------------------------------------------------------------------------------


def _same(value: Any) -> Any:
    return value


# Anchoring: what a relative path in the file means. The daemon's working directory is
# whatever supervisord or systemd gave it, so "relative to the file" is the only reading an
# operator can predict (and it lets /etc/sdnsup/sdnsup.toml say cc_token_file = "cc.token").
def _anchor_path(value: object, base: Path) -> object:
    assert isinstance(value, str)
    if not value or value.strip().lower() in _OFF_WORDS or Path(value).is_absolute():
        return value
    return str(base / value)


def _anchor_routes(value: object, base: Path) -> object:
    assert isinstance(value, tuple)
    specs: list[str] = []
    for spec in value:
        items = []
        for item in spec.split(","):
            name = item.strip()
            if name.startswith("@") and not Path(name[1:]).is_absolute():
                item = "@" + str(base / name[1:])
            items.append(item)
        specs.append(",".join(items))
    return tuple(specs)


@dataclass(frozen=True, slots=True)
class Option:
    """One ``run`` option; see the module docstring for how its name maps to every source."""

    name: str  # as on the command line, without the dashes: "keepalive-interval"
    kind: Kind
    default: object  # already typed; None means "unset" (required ones are checked later)
    help: str  # states the default and why; argparse %-formats it, so write %% for %
    group: str
    check: Callable[[Any], object] = _same
    metavar: str | None = None
    short: str | None = None
    anchor: Callable[[object, Path], object] | None = None  # relative paths in the file

    @property
    def key(self) -> str:
        """TOML key, argparse dest and :class:`~sdnsup.config.RunOptions` field:
        ``keepalive_interval``."""
        return self.name.replace("-", "_")

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()


_G_WHAT = "what to steer"
_G_WHERE = (
    "where the APs come from (one of --cc and --ap; a higher source overrides a lower one's "
    "choice: --ap on the command line wins over cc in the file)"
)
_G_KEEP = "choosing and keeping the AP"
_G_KERNEL = "kernel state (defaults chosen to coexist with other mark users)"
_G_OPS = "configuration, logging and metrics"
_GROUPS = (_G_WHAT, _G_WHERE, _G_KEEP, _G_KERNEL, _G_OPS)  # the order --help shows them in

OPTIONS: tuple[Option, ...] = (
    Option(
        "config",
        STRING,
        default=None,
        check=_config_path,
        metavar="FILE",
        group=_G_OPS,
        help=f"TOML file with any of these options, keys spelt with underscores (default "
        f"{defaults.DEFAULT_CONFIG_PATH}, read only if it exists, so a host without one runs "
        "on flags alone; a file named here must exist; 'none' reads no file)",
    ),
    Option(
        "routes",
        STRINGS,
        default=None,
        check=_routes,
        short="-r",
        metavar="CIDRS",
        anchor=_anchor_routes,
        group=_G_WHAT,
        help="comma-separated CIDRs to steer (IPv4 and IPv6), or @FILE with one CIDR per line "
        "('#' comments); repeatable. Required, from any source: there is no sensible default "
        "set of destinations",
    ),
    Option(
        "allow-default",
        BOOLEAN,
        default=False,
        group=_G_WHAT,
        help="accept 0.0.0.0/0 and ::/0 (default off: it would steer everything through the AP, "
        "this host's own management traffic included)",
    ),
    Option(
        "strict-cidrs",
        BOOLEAN,
        default=False,
        group=_G_WHAT,
        help="refuse duplicate and nested CIDRs instead of merging them (default off: a "
        "published list often holds both, and its union is what is meant; the merge is logged "
        "with its counts)",
    ),
    Option(
        "max-cidrs",
        INTEGER,
        default=MAX_CIDRS,
        check=_at_least(1),
        metavar="N",
        group=_G_WHAT,
        help=f"the most CIDR entries read from -r and its files together (default {MAX_CIDRS}: "
        "ten times a large list; a wrong or endless file stops here with an error); a CIDR "
        f"file must also be a regular file of at most {MAX_FILE_BYTES // (1024 * 1024)} MiB",
    ),
    Option(
        "cc",
        STRING,
        default=None,
        check=_url,
        metavar="URL",
        group=_G_WHERE,
        help="control center base URL (https://...); the AP list comes from URL/v1/aps, retried "
        "with backoff (1 s doubling to 60 s, full jitter) so a restarting fleet does not "
        "hammer the CC",
    ),
    Option(
        "ap",
        STRINGS,
        default=None,
        check=_aps,
        metavar="APS",
        group=_G_WHERE,
        help="static AP list instead of a CC: ADDR, or ADDR4+ADDR6 for a dual-stack AP, "
        "comma-separated, in order of preference; repeatable. IPv6 CIDRs need an AP with an "
        "IPv6 address",
    ),
    Option(
        "cc-token-file",
        STRING,
        default=None,
        check=_path,
        metavar="FILE",
        anchor=_anchor_path,
        group=_G_WHERE,
        help=f"file holding the CC bearer token (or set {TOKEN_ENV}); never pass the token itself "
        "on the command line, where every user can read it (default: no token)",
    ),
    Option(
        "cc-ca",
        STRING,
        default=None,
        check=_path,
        metavar="FILE",
        anchor=_anchor_path,
        group=_G_WHERE,
        help="CA certificate (PEM) to trust for the CC instead of the system store (default: the "
        "system store, what update-ca-certificates manages)",
    ),
    Option(
        "retries",
        INTEGER,
        default=None,
        check=_at_least(0),
        metavar="N",
        group=_G_WHERE,
        help="give up (exit 75) after N failed attempts to reach the CC at start (default: retry "
        "forever, as the seed does: a CC outage must not leave hosts down for good)",
    ),
    Option(
        "state-dir",
        STRING,
        default=defaults.DEFAULT_STATE_DIR,
        check=_log_dir,
        metavar="DIR",
        anchor=_anchor_path,
        group=_G_WHERE,
        help=f"directory for the saved AP list, the CC's last good answer (default "
        f"{defaults.DEFAULT_STATE_DIR}, root-only; one file per network namespace): a restart "
        "steers at once from it and asks the CC later, spread over a ttl, so a fleet that restarts "
        "together does not flood the CC; 'none' keeps no list and asks the CC first at every "
        "start",
    ),
    Option(
        "probe",
        STRING,
        default=ProbeSpec(),
        check=_probe,
        metavar="KIND[:PORT]",
        group=_G_WHERE,
        help="how to probe static APs: udp (echo with a nonce), tcp (connect time), icmp (ping, "
        "for APs that run no probe agent) or http (http:PORT/PATH) (default udp:7300, the AP "
        "agent's echo port; tcp and http default to 7301); APs from a CC say it themselves",
    ),
    Option(
        "keepalive-interval",
        FLOAT,
        default=defaults.KEEPALIVE_INTERVAL,
        check=_keepalive_seconds(defaults.MIN_INTERVAL),
        metavar="S",
        group=_G_KEEP,
        help=f"seconds between keepalive probes of the active AP (default "
        f"{defaults.KEEPALIVE_INTERVAL:g}: with the default timeout and misses a dead AP is "
        "detected 0.6-0.8 s after it fails, inside a 1 s dark window; at least "
        f"{defaults.MIN_INTERVAL:g}: faster probing gains little and loads the AP). The most "
        "aggressive "
        f"settings, {defaults.MIN_INTERVAL:g}/{defaults.MIN_TIMEOUT:g}/"
        f"{defaults.MIN_MISSES}, detect a dead AP "
        f"{defaults.MIN_MISSES * defaults.MIN_TIMEOUT:g}-"
        f"{defaults.MIN_MISSES * defaults.MIN_TIMEOUT + defaults.MIN_INTERVAL:g} s after it "
        "fails",
    ),
    Option(
        "keepalive-timeout",
        FLOAT,
        default=defaults.KEEPALIVE_TIMEOUT,
        check=_keepalive_seconds(defaults.MIN_TIMEOUT),
        metavar="S",
        group=_G_KEEP,
        help=f"deadline of one keepalive probe in seconds (default "
        f"{defaults.KEEPALIVE_TIMEOUT:g}: an AP on a directly connected network answers in "
        f"milliseconds, so a later answer is as bad as none; at least {defaults.MIN_TIMEOUT:g}:"
        " a busy host can take tens of ms to read an answer, and must not fail over for it)",
    ),
    Option(
        "keepalive-misses",
        INTEGER,
        default=defaults.KEEPALIVE_MISSES,
        check=_keepalive_misses,
        metavar="K",
        group=_G_KEEP,
        help=f"missed keepalive probes in a row that make the AP dead (default "
        f"{defaults.KEEPALIVE_MISSES}: one lost datagram or a busy AP never causes a "
        f"failover; also BFD's usual detect multiplier; at least {defaults.MIN_MISSES}, so "
        "that one lost probe never does)",
    ),
    Option(
        "reprobe-interval",
        FLOAT,
        default=defaults.REPROBE_INTERVAL,
        check=_positive_seconds,
        metavar="S",
        group=_G_KEEP,
        help=f"seconds between probe rounds of all APs, +-20%% jitter (default "
        f"{defaults.REPROBE_INTERVAL:g}: finds a faster AP within a minute without loading the "
        "APs; a switch needs an AP >10 ms and >33%% faster, so RTT jitter never flaps)",
    ),
    Option(
        "drain-interval",
        FLOAT,
        default=defaults.DRAIN_INTERVAL,
        check=_keepalive_seconds(defaults.MIN_INTERVAL),
        metavar="S",
        group=_G_KEEP,
        help="seconds between keepalive probes of an AP that still carries pinned connections "
        f"but takes no new ones (default {defaults.DRAIN_INTERVAL:g}, each probe with the "
        "same deadline and misses as the active AP's: a dead draining AP is found 2-3 s "
        "after it fails, far sooner than the minutes its connections' retransmissions would "
        "take, at a fifth of the active AP's probe rate)",
    ),
    Option(
        "abort-sockets",
        BOOLEAN,
        default=True,
        group=_G_KEEP,
        help="when an AP with pinned connections dies, abort this host's sockets of those "
        "connections (what ss -K does), so that an application blocked on an idle connection "
        "gets ECONNABORTED at once instead of after minutes of retransmissions (default on; "
        "connections forwarded for containers move to the new AP, whose far side resets them)",
    ),
    Option(
        "track",
        STRINGS,
        default=(),
        check=_track,
        metavar="TARGETS",
        group=_G_KEEP,
        help="hosts inside the CIDRs to probe through the active AP and through another live "
        "AP at once, to find an AP that answers its probes but forwards nothing: ADDR (ICMP "
        "echo), icmp@ADDR, tcp:PORT@ADDR or udp:PORT@ADDR, comma-separated; repeatable "
        f"(default none; the CC may name some too). A round every --track-interval; when "
        f"{defaults.TRACK_MISSES} rounds in a row get no answer through the active AP but one "
        "through the other, the active AP is treated as dead. No answer through any AP "
        "changes nothing: the targets are down, not the APs",
    ),
    Option(
        "track-interval",
        FLOAT,
        default=defaults.TRACK_INTERVAL,
        check=_keepalive_seconds(defaults.MIN_INTERVAL),
        metavar="S",
        group=_G_KEEP,
        help=f"seconds between rounds of tracked-target probes, also each probe's deadline "
        f"(default {defaults.TRACK_INTERVAL:g}: a dead path is found "
        f"{defaults.TRACK_MISSES * defaults.TRACK_INTERVAL:g}-"
        f"{(defaults.TRACK_MISSES + 1) * defaults.TRACK_INTERVAL:g} s after it fails; raise it for "
        "targets more than ~100 ms away)",
    ),
    Option(
        "passive-check",
        BOOLEAN,
        default=True,
        group=_G_KEEP,
        help="watch the connections steered through the active AP (conntrack): when attempts "
        "to --suspect-destinations distinct destinations got no reply within "
        "--suspect-window, confirm by probing them through the active AP and another live "
        "AP at once, and treat the active AP as dead if only the other one gets answers "
        "(default on: it needs no configuration, and one dead server never moves anything)",
    ),
    Option(
        "suspect-destinations",
        INTEGER,
        default=defaults.SUSPECT_DESTINATIONS,
        check=_at_least(2),
        metavar="N",
        group=_G_KEEP,
        help=f"distinct destinations whose connection attempts through the active AP went "
        f"unanswered before it is suspect (default {defaults.SUSPECT_DESTINATIONS}: one is a "
        "dead server, two may be one dead subnet; at least 2)",
    ),
    Option(
        "suspect-window",
        FLOAT,
        default=defaults.SUSPECT_WINDOW,
        check=_positive_seconds,
        metavar="S",
        group=_G_KEEP,
        help=f"seconds within which those failures must fall (default "
        f"{defaults.SUSPECT_WINDOW:g}: failures that belong to one incident)",
    ),
    Option(
        "host-id",
        STRING,
        default=None,
        check=_host_id,
        metavar="ID",
        group=_G_KEEP,
        help="this host's id for the weighted choice among near-equal APs (default: "
        "/etc/machine-id). Among the APs that are not >10 ms and >33%% slower than the best, "
        "each host takes the one its id ranks first in proportion to the CC's weights, so a "
        "fleet spreads by weight and a host keeps its AP; set it where many clients share one "
        "machine-id (cloned images, tests)",
    ),
    Option(
        "no-ap",
        STRING,
        default="fallback",
        check=_choice(*NO_AP_POLICIES),
        metavar="fallback|blackhole",
        group=_G_KEEP,
        help="when no AP is usable: 'fallback' sends the traffic the normal route, 'blackhole' "
        "drops it (fail closed) (default fallback: the host keeps working as without sdnsup)",
    ),
    Option(
        "mark",
        INTEGER,
        default=DEFAULT_MARK,
        check=_u32,
        metavar="N",
        group=_G_KERNEL,
        help=f"conntrack and packet mark bit(s) every steered connection carries (default "
        f"{DEFAULT_MARK:#x}: bit 13, used by none of kube-proxy 0x4000, Calico 0xffff0000, "
        "Tailscale 0xff0000, Cilium 0x0f00 + identities 0xffff0000, wg-quick 0xca6c or Istio "
        "0x539/0x53a in their default modes; only Cilium's IPsec key bits and a kube-router "
        "DSR hash can reach it)",
    ),
    Option(
        "mask",
        INTEGER,
        default=DEFAULT_MASK,
        check=_u32,
        metavar="N",
        group=_G_KERNEL,
        help=f"mark bits sdnsup owns; it never changes any other bit. The bits beside --mark hold "
        "the AP slot a connection is pinned to: N bits give 2^N-1 slots (at most 15), at least "
        f"2 bits (default {DEFAULT_MASK:#x}: bits 1, 7 and 12 beside the mark, 7 slots; bits "
        "7 and 12 are free of all the tools above in their default modes, bit 1 is only "
        "Istio's inside pod namespaces)",
    ),
    Option(
        "table",
        INTEGER,
        default=DEFAULT_TABLE,
        metavar="N",
        group=_G_KERNEL,
        help=f"routing table for the CIDRs (default {DEFAULT_TABLE}: not Tailscale's 52, "
        "wg-quick's 51820, the seed's 100, nor main/local)",
    ),
    Option(
        "priority",
        INTEGER,
        default=DEFAULT_PRIORITY,
        metavar="N",
        group=_G_KERNEL,
        help=f"policy rule priority (default {DEFAULT_PRIORITY}: before the main table's 32766, "
        "after Tailscale's rules at 5210-5270)",
    ),
    Option(
        "nexthop-compat",
        STRING,
        default="auto",
        check=_choice(*NEXTHOP_COMPAT_POLICIES),
        metavar="auto|keep",
        group=_G_KERNEL,
        help="'auto' sets net.ipv4.nexthop_compat_mode=0 while steering, unless other software "
        "uses nexthop objects (then the kernel would change how their routes are dumped), and "
        "restores it at exit; with 100k CIDRs it makes an AP switch ~1 ms instead of ~130 ms. "
        "'keep' never touches it (default auto)",
    ),
    Option(
        "verify-interval",
        FLOAT,
        default=defaults.VERIFY_INTERVAL,
        check=_positive_seconds,
        metavar="S",
        group=_G_KERNEL,
        help="seconds between full re-reads of the kernel state (default "
        f"{defaults.VERIFY_INTERVAL:g}: netlink events trigger heals at once; this slow pass "
        "only catches what no event reported, and re-reading 100k CIDRs takes seconds; "
        "stretched so that it never uses "
        "more than 0.5%% of a CPU)",
    ),
    Option(
        "log-level",
        STRING,
        default="info",
        check=_choice(*LOG_LEVELS),
        metavar="LEVEL",
        group=_G_OPS,
        help="log verbosity: debug, info, warning or error (default info: one line per state "
        "change, with its numbers)",
    ),
    Option(
        "log-dir",
        STRING,
        default=DEFAULT_LOG_DIR,
        check=_log_dir,
        metavar="DIR",
        anchor=_anchor_path,
        group=_G_OPS,
        help=f"directory for a log file besides stderr (default {DEFAULT_LOG_DIR}, the seed's "
        "convention, where existing log collection looks; 'none' logs to stderr only)",
    ),
    Option(
        "log-format",
        STRING,
        default="text",
        check=_choice(*LOG_FORMATS),
        metavar="text|json",
        group=_G_OPS,
        help="log line format: text or json, one object per line for log shippers (default text: "
        "what an operator reads in supervisord's log)",
    ),
    Option(
        "metrics",
        STRING,
        default=None,
        check=_listen,
        metavar="ADDR:PORT",
        group=_G_OPS,
        help="serve Prometheus metrics on ADDR:PORT, e.g. 127.0.0.1:9730, [::1]:9730, or :9730 "
        "for every address (default off: the endpoint is unauthenticated, so opening a port "
        "must be a choice; 'off' disables one set elsewhere)",
    ),
)
BY_KEY: dict[str, Option] = {opt.key: opt for opt in OPTIONS}


# --- the command line --------------------------------------------------------------------------

CONFIG_EPILOG = f"""\
where options come from (highest first):
  1. the command line
  2. the environment: {ENV_PREFIX}<OPTION>, dashes as underscores, e.g.
     {ENV_PREFIX}KEEPALIVE_INTERVAL=0.3  {ENV_PREFIX}ROUTES=10.0.0.0/8,@/etc/sdnsup/more.txt
     {ENV_PREFIX}ALLOW_DEFAULT=yes (true/false, yes/no, 1/0)
  3. the TOML file (--config; default {defaults.DEFAULT_CONFIG_PATH} if it exists), keys spelt
     with underscores: keepalive_interval = 0.3, mask = 0x2082,
     routes = ["10.10.10.0/24", "@cidrs.txt"]. Unknown keys and wrong types are errors;
     relative paths are relative to the file's directory.
  4. the defaults above.
  The CC token is not an option: --cc-token-file FILE or {TOKEN_ENV} only.
"""


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every option of :data:`OPTIONS` to the ``run`` subparser, and the sources epilog.

    Every default is ``None`` so that :func:`sdnsup.config.resolve` can tell "not given" from
    "given the default value"; the real defaults live in the table and in the help texts.
    Values stay strings here: ``resolve`` parses them with the same code as environment
    values, so both report errors the same way. ``--cc``/``--ap`` exclusivity and the required
    options are checked in ``resolve`` too, since they may come from any source.
    """
    groups = {title: parser.add_argument_group(title) for title in _GROUPS}
    for opt in OPTIONS:
        group = groups[opt.group]
        flags = [opt.short, opt.flag] if opt.short else [opt.flag]
        if opt.kind is BOOLEAN:
            # --no-allow-default too, so the command line can undo a file's "true".
            group.add_argument(
                *flags,
                dest=opt.key,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=opt.help,
            )
        elif opt.kind is STRINGS:
            group.add_argument(
                *flags,
                dest=opt.key,
                action="append",
                default=None,
                metavar=opt.metavar,
                help=opt.help,
            )
        else:
            group.add_argument(
                *flags, dest=opt.key, default=None, metavar=opt.metavar, help=opt.help
            )
    parser.epilog = (
        f"{parser.epilog.rstrip()}\n\n{CONFIG_EPILOG}" if parser.epilog else CONFIG_EPILOG
    )
