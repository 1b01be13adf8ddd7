"""sdnsup.config: options from the command line, the environment and a TOML file (no root).

The table itself (help text, parser defaults) is tested in test_options.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import pytest

from sdnsup import config, defaults, options
from sdnsup.aps import ProbeSpec
from sdnsup.errors import ConfigError
from sdnsup.logs import DEFAULT_LOG_DIR
from tests.test_options import build_parser

# What every resolve needs; each test provides it from whichever source it is not testing.
BASE_FILE = {"routes": '["10.10.10.0/24"]', "ap": '"10.77.0.11"'}


@pytest.fixture(autouse=True)
def no_host_config(tmp_path, monkeypatch):
    """Never read the real /etc/sdnsup/sdnsup.toml of the machine running the tests."""
    monkeypatch.setattr(defaults, "DEFAULT_CONFIG_PATH", tmp_path / "absent" / "sdnsup.toml")


def resolve(argv=(), env=None) -> config.RunOptions:
    return config.resolve(build_parser().parse_args(list(argv)), env or {})


def write_toml(path: Path, entries: dict[str, str]) -> Path:
    path.write_text("".join(f"{key} = {value}\n" for key, value in entries.items()))
    return path


def error(argv=(), env=None) -> str:
    with pytest.raises(ConfigError) as info:
        resolve(argv, env)
    assert info.value.exit_code == 64
    return str(info.value)


# --- precedence ------------------------------------------------------------------------------


# (key, TOML value, env value, CLI argv, then the expected value from file, env and CLI)
PRECEDENCE = [
    ("keepalive_interval", "0.5", "0.4", ["--keepalive-interval", "0.3"], 0.5, 0.4, 0.3),
    ("mask", "0x3082", "0x2086", ["--mask", "0x20f0"], 0x3082, 0x2086, 0x20F0),
    ("table", "0x100", "300", ["--table", "0x12c0"], 256, 300, 4800),
    ("allow_default", "true", "no", ["--allow-default"], True, False, True),
    ("allow_default", "false", "1", ["--no-allow-default"], False, True, False),
    (
        "routes",
        '["10.1.0.0/16", "10.4.0.0/16"]',
        "10.2.0.0/16,10.5.0.0/16",
        ["-r", "10.3.0.0/16", "-r", "10.6.0.0/16"],
        ("10.1.0.0/16", "10.4.0.0/16"),
        ("10.2.0.0/16,10.5.0.0/16",),
        ("10.3.0.0/16", "10.6.0.0/16"),
    ),
    (
        "cc_token_file",
        '"/file/token"',
        "/env/token",
        ["--cc-token-file", "/cli/token"],
        Path("/file/token"),
        Path("/env/token"),
        Path("/cli/token"),
    ),
    ("log_level", '"debug"', "WARNING", ["--log-level", "error"], "debug", "warning", "error"),
    (
        "no_ap",
        '"blackhole"',
        "fallback",
        ["--no-ap", "blackhole"],
        "blackhole",
        "fallback",
        "blackhole",
    ),
    (
        "log_dir",
        '"/var/log/sdnsup"',
        "none",
        ["--log-dir", "/srv/log"],
        Path("/var/log/sdnsup"),
        None,
        Path("/srv/log"),
    ),
    (
        "metrics",
        '"127.0.0.1:9730"',
        "[::1]:9731",
        ["--metrics", ":9732"],
        ("127.0.0.1", 9730),
        ("::1", 9731),
        ("", 9732),
    ),
    (
        "probe",
        '"icmp"',
        "tcp:22",
        ["--probe", "http:8080/ok"],
        ProbeSpec("icmp", 7300, "/health"),
        ProbeSpec("tcp", 22, "/health"),
        ProbeSpec("http", 8080, "/ok"),
    ),
]


@pytest.mark.parametrize(
    ("key", "in_file", "in_env", "argv", "from_file", "from_env", "from_cli"),
    PRECEDENCE,
    ids=[f"{case[0]}-{case[1]}" for case in PRECEDENCE],
)
def test_cli_beats_env_beats_file_beats_default(
    tmp_path, key, in_file, in_env, argv, from_file, from_env, from_cli
):
    opt = next(o for o in options.OPTIONS if o.key == key)
    required = {k: v for k, v in BASE_FILE.items() if k != key}

    only_required = write_toml(tmp_path / "defaults.toml", required)
    if key == "routes":  # required: no default
        assert error(["--config", str(only_required)]).startswith("no CIDRs given")
    else:
        got = resolve(["--config", str(only_required)])
        assert (getattr(got, key), got.sources[key]) == (opt.default, "default")

    path = write_toml(tmp_path / "sdnsup.toml", {**required, key: in_file})
    env = {opt.env: in_env}
    got = resolve(["--config", str(path)])
    assert (getattr(got, key), got.sources[key]) == (from_file, str(path))
    got = resolve(["--config", str(path)], env)
    assert (getattr(got, key), got.sources[key]) == (from_env, f"env {opt.env}")
    got = resolve(["--config", str(path), *argv], env)
    assert (getattr(got, key), got.sources[key]) == (from_cli, "cli")


def test_values_are_typed(tmp_path):
    path = write_toml(
        tmp_path / "sdnsup.toml",
        {**BASE_FILE, "keepalive_interval": "1", "mark": "0x1000", "cc_ca": '"/etc/ca.pem"'},
    )
    got = resolve(["--config", str(path)], {"SDNSUP_RETRIES": "5"})
    # TOML writes 1 and 1.0 differently; an integer for a number of seconds is still a float.
    assert type(got.keepalive_interval) is float and got.keepalive_interval == 1.0
    assert type(got.mark) is int and type(got.retries) is int and got.retries == 5
    assert got.cc_ca == Path("/etc/ca.pem") and got.cc_token_file is None
    assert got.log_dir == DEFAULT_LOG_DIR and got.metrics is None
    assert got.cidrs.v4 == frozenset({ipaddress.ip_network("10.10.10.0/24")})
    assert [str(ap.addr4) for ap in got.aps] == ["10.77.0.11"]
    assert got.aps[0].probe == ProbeSpec()
    assert got.settings.mark == 0x1000
    hash(got)  # frozen and hashable, sources excluded


def test_run_options_has_one_field_per_option():
    fields = {f.name for f in dataclasses.fields(config.RunOptions)}
    derived = {"cidrs", "aps", "settings", "sources", "warnings"}
    assert fields - derived == {opt.key for opt in options.OPTIONS}


def test_cli_repeats_accumulate_and_replace_lower_sources(tmp_path):
    path = write_toml(tmp_path / "sdnsup.toml", {"routes": '"10.9.0.0/16"'})
    got = resolve(
        [
            *("--config", str(path), "-r", "10.1.0.0/16", "-r", "10.2.0.0/16,10.5.0.0/16"),
            *("--ap", "10.77.0.11", "--ap", "10.77.0.12+fd77::12"),
        ],
    )
    assert len(got.cidrs) == 3  # the file's 10.9.0.0/16 is replaced, not merged
    assert [ap.id for ap in got.aps] == ["10.77.0.11", "10.77.0.12+fd77::12"]


def test_empty_environment_variable_is_unset():
    got = resolve(["-r", "10.0.0.0/8", "--ap", "10.77.0.11"], {"SDNSUP_CC": "", "SDNSUP_MARK": ""})
    assert got.cc is None and got.sources["mark"] == "default"


def test_command_line_can_switch_off_what_a_file_switches_on(tmp_path):
    path = write_toml(
        tmp_path / "sdnsup.toml",
        {**BASE_FILE, "metrics": '":9730"', "log_dir": '"/var/log/sdnsup"'},
    )
    got = resolve(["--config", str(path), "--metrics", "off", "--log-dir", "none"])
    assert got.metrics is None and got.log_dir is None


# --- the config file -------------------------------------------------------------------------


def test_default_config_path_is_read_only_if_it_exists(tmp_path, monkeypatch):
    default = tmp_path / "etc" / "sdnsup.toml"
    monkeypatch.setattr(defaults, "DEFAULT_CONFIG_PATH", default)
    cli = ["-r", "10.0.0.0/8", "--ap", "10.77.0.11"]

    got = resolve(cli)
    assert got.config is None and got.sources["config"] == "default"

    default.parent.mkdir()
    write_toml(default, {"keepalive_interval": "0.7"})
    got = resolve(cli)
    assert got.config == default and got.sources["config"] == "default"
    assert (got.keepalive_interval, got.sources["keepalive_interval"]) == (0.7, str(default))

    got = resolve([*cli, "--config", "none"])  # an existing default can be skipped
    assert got.config is None and got.keepalive_interval == 0.2


def test_explicit_config_must_exist(tmp_path):
    missing = tmp_path / "nope.toml"
    assert error(["--config", str(missing)]) == f"--config: {missing}: no such file"
    assert error(env={"SDNSUP_CONFIG": str(missing)}) == (
        f"environment SDNSUP_CONFIG: {missing}: no such file"
    )


def test_config_from_environment(tmp_path):
    path = write_toml(tmp_path / "sdnsup.toml", {**BASE_FILE, "no_ap": '"blackhole"'})
    got = resolve(env={"SDNSUP_CONFIG": str(path)})
    assert got.config == path and got.sources["config"] == "env SDNSUP_CONFIG"
    assert got.no_ap == "blackhole"


def test_relative_paths_in_the_file_are_relative_to_the_file(tmp_path, monkeypatch):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "cidrs.txt").write_text("10.20.0.0/16  # lab\n10.23.0.0/16\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    path = write_toml(
        etc / "sdnsup.toml",
        {
            "routes": f'["10.1.0.0/16,@cidrs.txt", "@{empty}"]',
            "ap": '["10.77.0.11"]',
            "cc_token_file": '"cc.token"',
        },
    )
    monkeypatch.chdir(tmp_path)  # not the file's directory
    got = resolve(["--config", str(path)])
    assert len(got.cidrs) == 3
    assert got.routes == (f"10.1.0.0/16,@{etc}/cidrs.txt", f"@{empty}")
    assert got.cc_token_file == etc / "cc.token"


def test_world_writable_config_is_a_warning(tmp_path):
    path = write_toml(tmp_path / "sdnsup.toml", BASE_FILE)
    path.chmod(0o666)
    got = resolve(["--config", str(path)])
    assert got.warnings == (f"{path} is writable by every user; chmod o-w it",)


# --- errors name the source and the key ------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            {"keepalive_intervall": "0.2"},
            "unknown key 'keepalive_intervall' (did you mean keepalive_interval?)",
        ),
        (
            {"keepalive-interval": "0.2"},
            "unknown key 'keepalive-interval' (did you mean keepalive_interval?)",
        ),
        ({"frobnicate": "1"}, "unknown key 'frobnicate'"),
        ({"cc_token": '"s3cret"'}, "unknown key 'cc_token': the token never goes in the config"),
        ({"config": '"/etc/other.toml"'}, "key 'config': a config file cannot name another"),
        ({"mark": '"0x1000"'}, "key 'mark': expected an integer, got string"),
        ({"mark": "4096.0"}, "key 'mark': expected an integer, got float"),
        (
            {"keepalive_interval": '"0.2"'},
            "key 'keepalive_interval': expected a number, got string",
        ),
        (
            {"keepalive_interval": "true"},
            "key 'keepalive_interval': expected a number, got boolean",
        ),
        (
            {"allow_default": '"yes"'},
            "key 'allow_default': expected a boolean (true or false), got string",
        ),
        (
            {"routes": "[1, 2]"},
            "key 'routes': expected a string or an array of strings, got array of integer",
        ),
        ({"cc_ca": "{ path = 'x' }"}, "key 'cc_ca': expected a string, got table"),
        (
            {"log_level": '"verbose"'},
            "key 'log_level': must be one of debug, info, warning, error, got 'verbose'",
        ),
        ({"log_format": '"xml"'}, "key 'log_format': must be one of text, json, got 'xml'"),
        ({"keepalive_misses": "0"}, "key 'keepalive_misses': must be 2 or more, got 0"),
        (
            {"verify_interval": "-0.5"},
            "key 'verify_interval': must be a positive number of seconds, got -0.5",
        ),
        ({"ap": '"nope"'}, "key 'ap': 'nope': 'nope' is not an IP address"),
        ({"probe": '"udp:0"'}, "key 'probe': 'udp:0': port must be 1-65535"),
        ({"metrics": "9730"}, "key 'metrics': expected a string, got integer"),
        ({"log_dir": '""'}, "key 'log_dir': empty path"),
    ],
)
def test_file_errors_name_file_and_key(tmp_path, entries, message):
    path = write_toml(tmp_path / "sdnsup.toml", {**BASE_FILE, **entries})
    assert error(["--config", str(path)]).startswith(f"{path}: {message}")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SDNSUP_MARK": "xyz"}, "environment SDNSUP_MARK: 'xyz' is not a number"),
        (
            {"SDNSUP_KEEPALIVE_INTERVAL": "fast"},
            "environment SDNSUP_KEEPALIVE_INTERVAL: 'fast' is not a number",
        ),
        (
            {"SDNSUP_ALLOW_DEFAULT": "maybe"},
            "environment SDNSUP_ALLOW_DEFAULT: 'maybe' is not a boolean "
            "(use true/false, yes/no or 1/0)",
        ),
        (
            {"SDNSUP_VERIFY_INTERVAL": "nan"},
            "environment SDNSUP_VERIFY_INTERVAL: must be a positive number of seconds, got nan",
        ),
        (
            {"SDNSUP_REPROBE_INTERVAL": "inf"},
            "environment SDNSUP_REPROBE_INTERVAL: must be a positive number of seconds, got inf",
        ),
        ({"SDNSUP_RETRIES": "-1"}, "environment SDNSUP_RETRIES: must be 0 or more, got -1"),
        (
            {"SDNSUP_MASK": "0x100000000"},
            "environment SDNSUP_MASK: must be a 32-bit value (0 to 0xffffffff), got 0x100000000",
        ),
        (
            {"SDNSUP_NO_AP": "drop"},
            "environment SDNSUP_NO_AP: must be one of fallback, blackhole, got 'drop'",
        ),
        (
            {"SDNSUP_PROBE": "ping"},
            "environment SDNSUP_PROBE: 'ping': kind must be one of udp, tcp, icmp, http",
        ),
        ({"SDNSUP_PROBE": "tcp:ssh"}, "environment SDNSUP_PROBE: 'tcp:ssh': 'ssh' is not a port"),
        ({"SDNSUP_CC_CA": ""}, None),  # empty: unset, no error
    ],
)
def test_environment_errors_name_the_variable(env, message):
    argv = ["-r", "10.0.0.0/8", "--ap", "10.77.0.11"]
    if message is None:
        resolve(argv, env)
    else:
        assert error(argv, env).startswith(message)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--keepalive-interval", "-1"],
            "--keepalive-interval: must be a positive number of seconds, got -1",
        ),
        (
            ["--keepalive-timeout", "0"],
            "--keepalive-timeout: must be a positive number of seconds, got 0",
        ),
        (["--keepalive-misses", "0"], "--keepalive-misses: must be 2 or more, got 0"),
        # below the most aggressive supported settings: timers that fail over on scheduling
        # noise, or a single lost probe
        (["--keepalive-interval", "0.01"], "--keepalive-interval: must be at least 0.05 s"),
        (["--keepalive-timeout", "0.049"], "--keepalive-timeout: must be at least 0.05 s"),
        (["--keepalive-misses", "1"], "--keepalive-misses: must be 2 or more, got 1"),
        (["--retries", "-2"], "--retries: must be 0 or more, got -2"),
        (["--mark=-0x1"], "--mark: must be a 32-bit value (0 to 0xffffffff), got -0x1"),
        (["--table", "seven"], "--table: 'seven' is not a number (e.g. 4096 or 0x1000)"),
        (
            ["--log-level", "verbose"],
            "--log-level: must be one of debug, info, warning, error, got 'verbose'",
        ),
        (["--probe", "bogus"], "--probe: 'bogus': kind must be one of udp, tcp, icmp, http"),
        (["--probe", "udp:65536"], "--probe: 'udp:65536': port must be 1-65535"),
        (["--metrics", "9730"], "--metrics: '9730' has no port"),
        (["--metrics", "::1:9730"], "--metrics: '::1:9730': put an IPv6 address in brackets"),
        (
            ["--metrics", "[10.0.0.1]:9730"],
            "--metrics: '[10.0.0.1]:9730': '10.0.0.1' is not an IPv6 address",
        ),
        (
            ["--metrics", "localhost:9730"],
            "--metrics: 'localhost:9730': 'localhost' is not an IP address",
        ),
        (["--metrics", "127.0.0.1:0"], "--metrics: '127.0.0.1:0': the port must be 1-65535"),
        (["--metrics", ":65536"], "--metrics: ':65536': the port must be 1-65535"),
        (["--metrics", "127.0.0.1:"], "--metrics: '127.0.0.1:': the port must be 1-65535"),
        (["--log-dir", ""], "--log-dir: empty path"),
        (["--config", ""], "--config: empty path"),
    ],
)
def test_command_line_errors_name_the_flag(argv, message):
    assert error(["-r", "10.0.0.0/8", "--ap", "10.77.0.11", *argv]).startswith(message)


def test_the_most_aggressive_keepalive_settings_are_accepted():
    argv = ["--keepalive-interval", "0.05", "--keepalive-timeout", "0.05"]
    opts = resolve(["-r", "10.0.0.0/8", "--ap", "10.77.0.11", *argv, "--keepalive-misses", "2"])
    assert (opts.keepalive_interval, opts.keepalive_timeout, opts.keepalive_misses) == (
        0.05,
        0.05,
        2,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9730", ("127.0.0.1", 9730)),
        ("[::1]:9730", ("::1", 9730)),
        (":9730", ("", 9730)),
        ("[::]:9730", ("::", 9730)),
        (" off ", None),
        ("none", None),
    ],
)
def test_metrics_listen_syntax(text, expected):
    got = resolve(["-r", "10.0.0.0/8", "--ap", "10.77.0.11", "--metrics", text])
    assert got.metrics == expected


def test_cc_url_error_names_the_source():
    assert error(["-r", "10.0.0.0/8"], {"SDNSUP_CC": "cc.example.net"}) == (
        "environment SDNSUP_CC: 'cc.example.net' is not a URL like https://cc.example.net"
    )


def test_a_value_a_higher_source_overrides_is_still_checked(tmp_path):
    path = write_toml(tmp_path / "sdnsup.toml", {**BASE_FILE, "mark": '"0x1000"'})
    message = error(["--config", str(path), "--mark", "0x1000"])
    assert message == f"{path}: key 'mark': expected an integer, got string"


def test_all_problems_are_reported_at_once(tmp_path):
    path = write_toml(tmp_path / "sdnsup.toml", {**BASE_FILE, "keepalive_intervall": "1"})
    message = error(["--config", str(path), "--keepalive-misses", "0"], {"SDNSUP_MARK": "x"})
    assert message.startswith("3 problems:\n  ")
    assert f"{path}: unknown key 'keepalive_intervall'" in message
    assert "--keepalive-misses: must be 2 or more, got 0" in message
    assert "environment SDNSUP_MARK: 'x' is not a number" in message


def test_broken_files(tmp_path):
    path = tmp_path / "sdnsup.toml"
    path.write_text('mark = 0x1000\ncc = "unterminated\n')
    assert error(["--config", str(path)]).startswith(f"{path}: not valid TOML: ")
    path.write_bytes(b'cc = "\xff"\n')
    assert error(["--config", str(path)]) == f"{path}: not UTF-8 text (byte 6)"
    assert error(["--config", str(tmp_path)]).startswith(f"cannot read config file {tmp_path}: ")


# --- checks across options -------------------------------------------------------------------


def test_cc_or_ap_from_a_higher_source_overrides_the_lower_ones_choice(tmp_path):
    """Where the APs come from is one choice: the documented precedence applies to it."""
    path = write_toml(tmp_path / "sdnsup.toml", {"routes": '"10.0.0.0/8"', "cc": '"https://cc"'})
    got = resolve(["--config", str(path), "--ap", "10.77.0.11"])
    assert got.cc is None and [ap.id for ap in got.aps] == ["10.77.0.11"]
    assert got.sources["ap"] == "cli" and got.sources["cc"] == "default"
    got = resolve(["-r", "10.0.0.0/8", "--cc", "https://cc"], {"SDNSUP_AP": "10.77.0.11"})
    assert got.cc == "https://cc" and got.ap is None
    got = resolve(["--config", str(path)], {"SDNSUP_AP": "10.77.0.11"})
    assert got.cc is None and got.sources["ap"] == "env SDNSUP_AP"


def test_cc_and_ap_from_the_same_source_exclude_each_other(tmp_path):
    message = error(["-r", "10.0.0.0/8", "--cc", "https://cc", "--ap", "10.77.0.11"])
    assert "--cc (from the command line) and --ap (from the command line) exclude" in message
    path = write_toml(
        tmp_path / "sdnsup.toml",
        {"routes": '"10.0.0.0/8"', "cc": '"https://cc"', "ap": '["10.77.0.11"]'},
    )
    assert f"--cc (from {path}) and --ap (from {path}) exclude each other" in error(
        ["--config", str(path)]
    )


def test_neither_cc_nor_ap(tmp_path):
    assert error(["-r", "10.0.0.0/8"]) == (
        "no AP source: give --cc URL or --ap ADDR on the command line, SDNSUP_CC or SDNSUP_AP "
        f"in the environment, or cc or ap in {defaults.DEFAULT_CONFIG_PATH}"
    )


def test_a_bad_cc_is_not_also_reported_as_missing():
    assert error(["-r", "10.0.0.0/8", "--cc", "nope"]) == (
        "--cc: 'nope' is not a URL like https://cc.example.net"
    )


def test_routes_are_required_and_parsed_with_their_source(tmp_path):
    assert error(["--ap", "10.77.0.11"]).startswith("no CIDRs given: pass -r 10.10.10.0/24")
    assert error(["-r", "10.0.0.1/24", "--ap", "10.77.0.11"]).startswith(
        "invalid CIDRs:\n  -r: 10.0.0.1/24 has host bits set"  # as before config existed
    )
    message = error(["--ap", "10.77.0.11"], {"SDNSUP_ROUTES": "10.0.0.1/24"})
    assert message.startswith("environment SDNSUP_ROUTES: invalid CIDRs:")
    assert "has host bits set (did you mean 10.0.0.0/24?)" in message
    path = write_toml(tmp_path / "sdnsup.toml", {"routes": '"0.0.0.0/0"', "ap": '"10.7.0.1"'})
    message = error(["--config", str(path)])
    assert message.startswith(f"{path}: key 'routes': invalid CIDRs:")
    assert "--allow-default" in message
    got = resolve(["--config", str(path)], {"SDNSUP_ALLOW_DEFAULT": "yes"})
    assert got.cidrs.v4 == frozenset({ipaddress.ip_network("0.0.0.0/0")})


def test_ap_families_must_cover_the_cidrs():
    message = error(["-r", "fd00::/64"], {"SDNSUP_AP": "10.77.0.11"})
    assert message.startswith("1 IPv6 CIDRs given but no AP has an IPv6 address")
    assert "(CIDRs from the command line, APs from environment SDNSUP_AP)" in message
    assert error(["-r", "10.0.0.0/8", "--ap", "fd77::11"]) == (
        "1 IPv4 CIDRs given but no AP has an IPv4 address"
    )


def test_mark_outside_mask_stays_settings_job_and_names_sources(tmp_path):
    path = write_toml(tmp_path / "sdnsup.toml", {**BASE_FILE, "mask": "0x1"})
    message = error(["--config", str(path), "--mark", "0x2"])
    assert message == (
        f"--mark 0x2 must be non-zero and lie inside --mask 0x1 "
        f"(mark from the command line, mask from {path})"
    )
    # All flags: the message's own --mark/--mask/--table say enough.
    assert error(["-r", "10.0.0.0/8", "--ap", "10.7.0.1", "--table", "254"]) == (
        "--table 254 is reserved or invalid: sdnsup uses tables 254-262 (one per AP slot, one "
        "for path probes); use 1-244 or 256-4294967287"
    )


# --- diagnostics -----------------------------------------------------------------------------


def test_sources_record_every_option(tmp_path):
    path = write_toml(tmp_path / "sdnsup.toml", {**BASE_FILE, "mark": "0x1000"})
    got = resolve(["--config", str(path), "--keepalive-misses", "5"], {"SDNSUP_LOG_FORMAT": "json"})
    assert set(got.sources) == {opt.key for opt in options.OPTIONS}
    assert {k: v for k, v in got.sources.items() if v != "default"} == {
        "config": "cli",
        "routes": str(path),
        "ap": str(path),
        "mark": str(path),
        "keepalive_misses": "cli",
        "log_format": "env SDNSUP_LOG_FORMAT",
    }
    with pytest.raises(TypeError):
        got.sources["mark"] = "cli"  # type: ignore[index]
    assert got.describe() == (
        f"config={path}, routes=10.10.10.0/24 ({path}), ap=10.77.0.11 ({path}), "
        "keepalive_misses=5 (cli), mark=0x1000 "
        f"({path}), log_format=json (env SDNSUP_LOG_FORMAT)"
    )


def test_environment_typos_are_warnings_not_errors():
    got = resolve(
        ["-r", "10.0.0.0/8", "--ap", "10.77.0.11"],
        {
            "SDNSUP_KEEPALIVE_INTERVALL": "1",
            "SDNSUP_CC_TOKEN": "secret",  # the token: known, not an option
            "SDNSUP_BENCH_INNER": "1",  # someone else's variable
        },
    )
    assert got.warnings == (
        "environment SDNSUP_KEEPALIVE_INTERVALL is not an sdnsup option "
        "(did you mean SDNSUP_KEEPALIVE_INTERVAL?); ignored",
    )


@pytest.mark.parametrize(
    ("listen", "warned"),
    [("127.0.0.1:9730", False), ("[::1]:9730", False), (":9730", True), ("0.0.0.0:9730", True)],
)
def test_metrics_off_loopback_warn_that_the_endpoint_is_unauthenticated(listen, warned):
    got = resolve(["-r", "10.0.0.0/8", "--ap", "10.77.0.11", "--metrics", listen])
    assert any("without authentication" in w for w in got.warnings) is warned
