"""Resolving the ``run`` options: the command line, the environment and a TOML file.

The options themselves (their types, defaults, help texts and validators) are the table in
:mod:`sdnsup.options`, which also names each one in every source; this module merges the
sources over the defaults and returns the result, typed and validated, as :class:`RunOptions`
(:func:`resolve`).

Precedence, highest first: command line, environment, file, built-in default. The more
specific and the more recent wins: a flag typed for this run beats the service unit's
environment, which beats the host-wide file. The file is ``--config FILE`` (or
``SDNSUP_CONFIG``); without one, :data:`sdnsup.defaults.DEFAULT_CONFIG_PATH` is read if it
exists, so a host without a file keeps running on flags alone, exactly as before there was a
file. A file named explicitly must exist: a typo in its path must not silently drop the whole
config.

Example ``/etc/sdnsup/sdnsup.toml`` (every key optional; the command line still wins)::

    routes = ["10.10.10.0/24", "@cidrs.txt"]   # or "10.10.10.0/24,fd10::/64"
    cc = "https://cc.example.net"               # or: ap = ["10.77.0.11+fd77::11", "10.77.0.12"]
    cc_token_file = "cc.token"                  # relative paths: relative to this file
    keepalive_interval = 0.2
    mark = 0x2000                               # TOML hex integers work
    mask = 0x2082
    no_ap = "blackhole"
    log_format = "json"
    metrics = "127.0.0.1:9730"

Every problem names where the bad value came from and which option it is, e.g.
``--keepalive-interval: must be a positive number of seconds, got -1``,
``environment SDNSUP_MARK: 'xyz' is not a number`` or
``/etc/sdnsup/sdnsup.toml: unknown key 'keepalive_intervall' (did you mean
keepalive_interval?)``. An unknown key is an error rather than ignored: a misspelt
``keepalive_intervall = 5`` that silently kept the default is the worst kind of config bug.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sdnsup import defaults
from sdnsup.aps import AccessPoint, ProbeSpec, Target, parse_static_aps
from sdnsup.cidrs import CidrSet, parse_cidrs
from sdnsup.errors import ConfigError
from sdnsup.options import (
    BY_KEY,
    ENV_PREFIX,
    OPTIONS,
    TOKEN_ENV,
    InvalidValue,
    LogFormat,
    LogLevel,
    Option,
)
from sdnsup.state import NoApPolicy, Settings

# Resolved before the others and never from the file: it names the file.
_CONFIG = BY_KEY["config"]


# --- the result --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Every ``run`` option, typed and validated, and where each value came from.

    One field per entry of :data:`OPTIONS` (same name as the TOML key), then values derived
    from several options and already validated together, so ``cmd_run`` needs no more checks:
    ``cidrs`` (``routes`` parsed, ``@FILE``\\ s read, with ``allow_default``), ``aps`` (the
    static APs with ``probe``; empty with a CC) and ``settings`` (mark, mask, table, priority).
    """

    config: Path | None  # the file actually read, None if none
    routes: tuple[str, ...]  # as given: comma lists and @FILEs
    allow_default: bool
    strict_cidrs: bool
    max_cidrs: int
    cc: str | None
    ap: str | None  # as given, validated
    cc_token_file: Path | None
    cc_ca: Path | None
    state_dir: Path | None  # None: no saved list
    retries: int | None  # None: retry forever
    probe: ProbeSpec
    keepalive_interval: float
    keepalive_timeout: float
    keepalive_misses: int
    reprobe_interval: float
    drain_interval: float
    abort_sockets: bool
    track: tuple[Target, ...]
    track_interval: float
    passive_check: bool
    suspect_destinations: int
    suspect_window: float
    host_id: str | None  # None: /etc/machine-id
    no_ap: NoApPolicy
    mark: int
    mask: int
    table: int
    priority: int
    nexthop_compat: defaults.NexthopCompat
    verify_interval: float
    log_level: LogLevel
    log_dir: Path | None  # None: no file log
    log_format: LogFormat
    metrics: tuple[str, int] | None  # (host, port), host "" for every address; None: off
    cidrs: CidrSet
    aps: tuple[AccessPoint, ...]
    settings: Settings
    # option key -> "cli", "env SDNSUP_MARK", "/etc/sdnsup/sdnsup.toml" or "default"
    sources: Mapping[str, str] = field(default_factory=dict, hash=False)
    # Not errors, but worth a log line once logging is set up (e.g. an env variable typo).
    warnings: tuple[str, ...] = ()

    def describe(self) -> str:
        """``key=value (source)`` for every option not at its default: one startup log line
        that shows which environment variable or file changed what."""
        parts = [f"config={self.config}"] if self.config is not None else []
        for opt in OPTIONS:
            source = self.sources.get(opt.key, "default")
            if source != "default" and opt is not _CONFIG:
                parts.append(f"{opt.key}={_show(opt, getattr(self, opt.key))} ({source})")
        return ", ".join(parts) or "all defaults"


def _show(opt: Option, value: object) -> str:
    if opt.key in ("mark", "mask") and isinstance(value, int):
        return f"{value:#x}"
    if isinstance(value, ProbeSpec):
        path = value.path if value.kind == "http" else ""
        return f"{value.kind}:{value.port}{path}" if value.kind != "icmp" else "icmp"
    if isinstance(value, tuple) and opt.key == "metrics":
        host, port = value
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


# --- resolving ---------------------------------------------------------------------------------


def _rank(source: str) -> int:
    """Precedence of a source: 0 the command line, 1 the environment, 2 the file."""
    return 0 if source == "cli" else 1 if source.startswith("env ") else 2


def _where(source: str) -> str:
    """A source for a sentence: "the command line", "environment SDNSUP_CC", a file path."""
    if source == "cli":
        return "the command line"
    if source.startswith("env "):
        return "environment " + source.removeprefix("env ")
    return source


def _label(opt: Option, source: str) -> str:
    """The prefix of an error about ``opt`` from ``source``."""
    if source == "cli":
        return opt.flag
    if source.startswith("env "):
        return f"environment {opt.env}"
    if source == "default":
        return f"{opt.flag} (default)"
    return f"{source}: key '{opt.key}'"


def _from_cli(opt: Option, value: object) -> object:
    if isinstance(value, str):
        return opt.kind.from_text(value)
    if isinstance(value, list):  # action="append"
        return tuple(value)
    return value  # BooleanOptionalAction gives a bool; a caller's Namespace may be typed


def _find_config(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[Path | None, str]:
    """The config file to read and the source that named it.

    Raises:
        ConfigError: a file named on the command line or in the environment does not exist.
    """
    given = (
        ("cli", getattr(args, "config", None)),
        (f"env {_CONFIG.env}", environ.get(_CONFIG.env)),
    )
    for source, raw in given:
        # An empty environment variable is unset (as for every option); an empty
        # --config "" is a mistake, which the option's check reports.
        if raw is None or (raw == "" and source != "cli"):
            continue
        try:
            path = _CONFIG.check(str(raw))
        except InvalidValue as exc:
            raise ConfigError(f"{_label(_CONFIG, source)}: {exc}") from None
        assert path is None or isinstance(path, Path)
        if path is not None and not path.exists():
            raise ConfigError(f"{_label(_CONFIG, source)}: {path}: no such file")
        return path, source
    # Looked up at call time (not bound as a default argument) so tests can monkeypatch it.
    default = defaults.DEFAULT_CONFIG_PATH
    return (default if default.exists() else None), "default"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def _unknown_key(path: Path, key: str) -> str:
    if key == "config":
        return f"{path}: key 'config': a config file cannot name another; use --config"
    if key in ("cc_token", "token"):
        return (
            f"{path}: unknown key {key!r}: the token never goes in the config file; put it "
            f"in a root-only file named by cc_token_file, or in {TOKEN_ENV}"
        )
    names = [k for k in BY_KEY if k != "config"]
    close = difflib.get_close_matches(key.replace("-", "_"), names, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{path}: unknown key {key!r}{hint}"


def _env_warnings(environ: Mapping[str, str]) -> list[str]:
    """Near-misses of our variable names. Not errors: the environment is shared with other
    programs (and our own test harnesses use other SDNSUP_* names)."""
    known = [opt.env for opt in OPTIONS] + [TOKEN_ENV]
    found = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
            if close:
                found.append(
                    f"environment {name} is not an sdnsup option (did you mean {close[0]}?); "
                    "ignored"
                )
    return found


def resolve(
    args: argparse.Namespace,
    environ: Mapping[str, str] = os.environ,
    *,
    need_ap_source: bool = True,
    previous: CidrSet | None = None,
) -> RunOptions:
    """Merge the command line (``args`` from :func:`sdnsup.options.add_run_arguments`), the
    environment and the config file over the defaults, validate everything, and return it typed.

    Every value given by any source is validated, even one a higher source overrides: a bad
    line in the file is reported now, not on the day the overriding flag is dropped. An empty
    environment variable counts as unset (``SDNSUP_CC=`` in a unit file means "no CC here").
    Per-option problems are all reported at once; checks across options follow.
    ``need_ap_source=False`` (``plan``) accepts neither ``--cc`` nor ``--ap``. ``previous``:
    the running CIDRs, on a reload (see :func:`sdnsup.cidrs.parse_cidrs`).

    Raises:
        ConfigError: naming the source (``--flag``, ``environment SDNSUP_X`` or
            ``FILE: key 'x'``) and what is wrong.
    """
    config_path, config_source = _find_config(args, environ)
    file_values = _read_toml(config_path) if config_path is not None else {}
    problems = [
        _unknown_key(config_path, key)
        for key in file_values
        if config_path is not None and (key not in BY_KEY or key == "config")
    ]
    values: dict[str, Any] = {"config": config_path}
    sources: dict[str, str] = {"config": config_source}
    given: dict[str, str] = {}  # key -> highest source that sets it, valid or not
    for opt in OPTIONS:
        if opt is _CONFIG:
            continue
        # Every source that sets this option, highest precedence first: (source, raw value).
        inputs: list[tuple[str, object]] = []
        if (cli_value := getattr(args, opt.key, None)) is not None:
            inputs.append(("cli", cli_value))
        if env_value := environ.get(opt.env):
            inputs.append((f"env {opt.env}", env_value))
        if config_path is not None and opt.key in file_values:
            inputs.append((str(config_path), file_values[opt.key]))
        values[opt.key], sources[opt.key] = opt.default, "default"
        if inputs:
            given[opt.key] = inputs[0][0]
        for rank, (source, raw) in enumerate(inputs):
            try:
                value = opt.check(_convert(opt, source, raw, config_path))
            except InvalidValue as exc:
                problems.append(f"{_label(opt, source)}: {exc}")
                continue
            if rank == 0:
                values[opt.key], sources[opt.key] = value, source
    # Checked on what was given, valid or not, so a bad --cc is not also "no AP source".
    # --cc and --ap are one choice, "where the APs come from": a higher source overrides a
    # lower one's choice as for any option (--ap on the command line over cc in the file).
    if "cc" in given and "ap" in given and _rank(given["cc"]) != _rank(given["ap"]):
        lower = "ap" if _rank(given["cc"]) < _rank(given["ap"]) else "cc"
        del given[lower]
        values[lower], sources[lower] = None, "default"
    if "cc" in given and "ap" in given:
        problems.append(
            f"--cc (from {_where(given['cc'])}) and --ap (from {_where(given['ap'])}) "
            "exclude each other: use a control center or a static AP list, not both"
        )
    elif "cc" not in given and "ap" not in given and need_ap_source:
        file_hint = config_path or defaults.DEFAULT_CONFIG_PATH
        problems.append(
            "no AP source: give --cc URL or --ap ADDR on the command line, "
            f"{BY_KEY['cc'].env} or {BY_KEY['ap'].env} in the environment, "
            f"or cc or ap in {file_hint}"
        )
    if problems:
        raise ConfigError(
            problems[0]
            if len(problems) == 1
            else f"{len(problems)} problems:\n  " + "\n  ".join(problems)
        )
    values["cidrs"] = _cidrs(values, sources, config_path, previous)
    values["aps"] = _static_aps(values, sources)
    values["settings"] = _settings(values, sources)
    warnings = _env_warnings(environ)
    listen = values.get("metrics")
    if listen is not None and not _loopback(listen[0]):
        host = f"[{listen[0]}]" if ":" in listen[0] else listen[0] or "every address"
        warnings.append(
            f"--metrics serves on {host} port {listen[1]} without authentication: anyone who "
            "reaches it reads the APs, CIDR counts and CC state; bind 127.0.0.1 or a "
            "management address and firewall the port"
        )
    if config_path is not None and config_path.stat().st_mode & 0o002:
        # The file steers a root daemon's routing: anyone who can write it can redirect traffic.
        warnings.append(f"{config_path} is writable by every user; chmod o-w it")
    return RunOptions(**values, sources=MappingProxyType(sources), warnings=tuple(warnings))


def _loopback(host: str) -> bool:
    """Whether a listen address reaches only this host ("" and 0.0.0.0 reach everyone)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _convert(opt: Option, source: str, raw: object, path: Path | None) -> object:
    """``raw`` from ``source`` as the option's kind, before its check."""
    if source == "cli":
        return _from_cli(opt, raw)
    if source.startswith("env "):
        assert isinstance(raw, str)
        return opt.kind.from_text(raw)
    assert path is not None
    value = opt.kind.from_toml(raw)
    return opt.anchor(value, path.parent) if opt.anchor is not None else value


def _cidrs(
    values: Mapping[str, Any],
    sources: Mapping[str, str],
    path: Path | None,
    previous: CidrSet | None = None,
) -> CidrSet:
    routes = values["routes"]
    if routes is None:
        raise ConfigError(
            "no CIDRs given: pass -r 10.10.10.0/24[,...] or -r @FILE, set "
            f"{BY_KEY['routes'].env}, or routes = [...] in {path or defaults.DEFAULT_CONFIG_PATH}"
        )
    try:
        return parse_cidrs(
            routes,
            allow_default=values["allow_default"],
            strict=values["strict_cidrs"],
            max_cidrs=values["max_cidrs"],
            previous=previous,
        )
    except ConfigError as exc:
        if sources["routes"] == "cli":
            raise  # parse_cidrs already says "-r: ..." or "FILE:LINE: ..."
        raise ConfigError(f"{_label(BY_KEY['routes'], sources['routes'])}: {exc}") from exc


def _static_aps(values: Mapping[str, Any], sources: Mapping[str, str]) -> tuple[AccessPoint, ...]:
    if values["ap"] is None:
        return ()
    probe: ProbeSpec = values["probe"]
    aps = tuple(
        AccessPoint(a.id, a.addr4, a.addr6, probe=probe) for a in parse_static_aps(values["ap"])
    )
    cidrs: CidrSet = values["cidrs"]
    where = (
        f" (CIDRs from {_where(sources['routes'])}, APs from {_where(sources['ap'])})"
        if _elsewhere(sources, "routes", "ap")
        else ""
    )
    if cidrs.v6 and not any(ap.addr6 for ap in aps):
        raise ConfigError(
            f"{len(cidrs.v6)} IPv6 CIDRs given but no AP has an IPv6 address{where}; "
            "write a dual-stack AP as --ap 10.77.0.11+fd77::11"
        )
    if cidrs.v4 and not any(ap.addr4 for ap in aps):
        raise ConfigError(f"{len(cidrs.v4)} IPv4 CIDRs given but no AP has an IPv4 address{where}")
    return aps


def _settings(values: Mapping[str, Any], sources: Mapping[str, str]) -> Settings:
    keys = ("mark", "mask", "table", "priority")
    try:
        return Settings(**{k: values[k] for k in keys})
    except ConfigError as exc:
        # Settings checks across options but does not know where each came from.
        if not _elsewhere(sources, *keys):
            raise
        given = [f"{k} from {_where(sources[k])}" for k in keys if sources[k] != "default"]
        raise ConfigError(f"{exc} ({', '.join(given)})") from exc


def _elsewhere(sources: Mapping[str, str], *keys: str) -> bool:
    """Whether any of ``keys`` came from the environment or a file: then an error across
    options says where each came from; when all are flags, the flags in it say enough."""
    return any(sources[k] not in ("cli", "default") for k in keys)
