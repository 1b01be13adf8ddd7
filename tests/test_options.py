"""sdnsup.options: the option table, the argparse options and help text built from it (no root).

How each option's value is read from every source, and its errors, are tested through
sdnsup.config.resolve in test_config.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from sdnsup import options
from sdnsup.aps import ProbeSpec
from sdnsup.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdnsup run",
        epilog="examples:\n  sdnsup -r 10.10.10.0/24 --ap 10.77.0.11\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    options.add_run_arguments(parser)
    return parser


def test_help_teaches_defaults_and_reasons():
    text = build_parser().format_help()
    flat = " ".join(text.split())  # argparse wraps lines anywhere
    for expected in [
        "-r CIDRS, --routes CIDRS",
        "--allow-default, --no-allow-default",
        "default 0x2000: bit 13, used by none of kube-proxy",
        "default 0x3082: bits 1, 7 and 12 beside the mark, 7 slots",
        "default on; connections forwarded for containers",
        "default 7300: not Tailscale's 52",
        "before the main table's 32766",
        "default 0.2: with the default timeout and misses a dead AP is detected 0.6-0.8 s",
        "default 3: one lost datagram",
        "+-20% jitter (default 30",
        "default 120: netlink events",
        "default: retry forever",
        "default udp:7300",
        "default fallback",
        "default /etc/sdnsup/sdnsup.toml, read only if it exists",
        "default /tmp/sdnsup, the seed's convention",
        "default text",
        "default off: the endpoint is unauthenticated",
        "a higher source overrides a lower one's choice",
        "SDNSUP_KEEPALIVE_INTERVAL=0.3",
        "unknown keys and wrong types are errors",
        "SDNSUP_CC_TOKEN only",
        "examples: sdnsup -r",  # the caller's epilog is kept
    ]:
        assert expected.lower() in flat.lower(), expected


def test_parser_defaults_are_none_so_not_given_is_visible():
    args = build_parser().parse_args([])
    assert all(getattr(args, opt.key) is None for opt in options.OPTIONS)


def test_choices_match_the_modules_that_use_them():
    from sdnsup import logs

    assert options.LOG_LEVELS == logs.LOG_LEVELS and options.LOG_FORMATS == logs.LOG_FORMATS
    assert options.BY_KEY["log_dir"].default == logs.DEFAULT_LOG_DIR == Path("/tmp/sdnsup")


def test_parse_probe_kept_public_with_cli_messages():
    assert options.parse_probe("http:7301/health") == ProbeSpec("http", 7301, "/health")
    assert options.parse_probe("tcp") == ProbeSpec("tcp", 7301, "/health")
    with pytest.raises(ConfigError, match=r"^--probe 'nope': kind must be one of"):
        options.parse_probe("nope")
