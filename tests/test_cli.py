import pytest

from sdnsup import cli
from sdnsup.aps import parse_static_aps
from sdnsup.errors import ConfigError, LockError, PrivilegeError
from sdnsup.preflight import InstanceLock, check_privileges


def run(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-r", "10.0.0.1/24", "--ap", "10.77.0.11"], "host bits set"),
        (["-r", "0.0.0.0/0", "--ap", "10.77.0.11"], "--allow-default"),
        (["-r", "fd00::/64", "--ap", "10.77.0.11"], "no AP has an IPv6 address"),
        (["-r", "10.0.0.0/24", "--ap", "127.0.0.1"], "not a unicast address"),
        (["-r", "10.0.0.0/24", "--ap", "10.0.0.1+10.0.0.2"], "two IPv4 addresses"),
        (["run", "-r", "10.0.0.0/24", "--ap", "nope"], "is not an IP address"),
        (
            ["-r", "10.0.0.0/24", "--ap", "10.7.0.1", "--mark", "0x2", "--mask", "0x1"],
            "inside --mask",
        ),
        (["-r", "10.0.0.0/24", "--ap", "10.7.0.1", "--table", "254"], "reserved"),
    ],
)
def test_bad_input_exits_64_before_touching_anything(argv, message, capsys, monkeypatch):
    def touched():  # pragma: no cover - must not be reached
        raise AssertionError("privileges checked / kernel touched before validation")

    monkeypatch.setattr("sdnsup.preflight.check_privileges", touched)
    code, err = run(argv, capsys)
    assert code == 64
    assert message in err


def test_default_subcommand_is_run():
    assert cli._with_default_command(["-r", "x"]) == ["run", "-r", "x"]
    assert cli._with_default_command(["run", "-r", "x"]) == ["run", "-r", "x"]


def test_help_teaches_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    out = capsys.readouterr().out
    assert "0x2000/0x3082" in out and "kube-proxy" in out and "7300" in out
    assert "--drain-interval" in out and "AP slots" in out


def test_without_cap_net_admin_clear_error(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tsdnsup\nCapEff:\t0000000000000000\n")
    with pytest.raises(PrivilegeError, match="CAP_NET_ADMIN"):
        check_privileges(status)
    status.write_text("CapEff:\t0000000000001000\n")
    check_privileges(status)


def test_second_instance_is_refused():
    with InstanceLock(), pytest.raises(LockError, match="already running"):
        InstanceLock().acquire()
    with InstanceLock():  # released: can be taken again
        pass


def test_static_aps():
    aps = parse_static_aps("10.77.0.11+fd77::11,10.77.0.12,fd77::13")
    assert [(str(a.addr4), str(a.addr6)) for a in aps] == [
        ("10.77.0.11", "fd77::11"),
        ("10.77.0.12", "None"),
        ("None", "fd77::13"),
    ]
    with pytest.raises(ConfigError, match="twice"):
        parse_static_aps("10.0.0.1,10.0.0.1")


def test_plan_needs_no_root_and_prints_loadable_nft_and_ip_commands(capsys, monkeypatch):
    def touched():  # pragma: no cover - must not be reached
        raise AssertionError("plan must not need privileges")

    monkeypatch.setattr("sdnsup.preflight.check_privileges", touched)
    code = cli.main(["plan", "--config", "none", "-r", "10.10.10.0/24,fd10::/64"])
    out = capsys.readouterr().out
    assert code == 0
    assert "table inet sdnsup {" in out and "type route hook output" in out
    assert "elements = { 10.10.10.0/24 }" in out
    # no AP: routes on a blackhole nexthop and no rule (fallback)
    assert "blackhole" in out and "rule add" not in out


def test_plan_rejects_bad_cidrs_like_run(capsys):
    assert cli.main(["plan", "--config", "none", "-r", "10.10.10.1/24"]) == 64
    assert "host bits" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["run", "--no-such-flag"], ["status", "--bogus"], ["plan", "--no-such-flag"]],
)
def test_usage_errors_exit_64_as_documented(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 64
    assert "error:" in capsys.readouterr().err


def test_check_validates_like_run_and_changes_nothing(tmp_path, capsys, monkeypatch):
    from sdnsup import check as check_mod

    monkeypatch.setattr(check_mod, "can_read_kernel", lambda: False)
    listing = tmp_path / "cidrs.txt"
    listing.write_text("10.0.0.0/24\n10.0.0.0/24\n10.0.1.0/24\n")
    argv = ["check", "--config", "none", "-r", f"@{listing}", "--ap", "10.77.0.11"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "CIDRs: 3 CIDRs read: 1 duplicates, 1 merged" in out
    assert "kernel: mark 0x2000/0x3082, tables 7300-7308, priorities 7298-7300: not checked" in out
    assert out.rstrip().endswith("sdnsup check: OK, run would start with this configuration")
    listing.write_text("10.0.0.0/24\n10.0.0.300/24\n")
    assert cli.main(argv) == 64
    assert f"{listing}:2: '10.0.0.300/24' is not a CIDR" in capsys.readouterr().err
    token = tmp_path / "missing.token"
    argv = ["check", "--config", "none", "-r", "10.0.0.0/24", "--cc", "https://cc.example.net"]
    assert cli.main([*argv, "--cc-token-file", str(token)]) == 64
    assert "cannot read --cc-token-file" in capsys.readouterr().err


def test_status_and_help_import_neither_trio_nor_the_run_configuration(tmp_path):
    """``sdnsup status`` is a health check run every few seconds: it must not pay for the
    daemon's modules (trio, httpx, the option table and the runtime modules behind it)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from sdnsup import cli\n"
        "for argv in (['status', '--json'], ['--help']):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = ('trio', 'httpx', 'sdnsup.options', 'sdnsup.config', 'sdnsup.supervisor', "
        "'sdnsup.daemon')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip().splitlines()[-1] == "[]", out


def test_run_files_of_gone_namespaces_are_swept_and_live_ones_kept(tmp_path):
    from sdnsup.preflight import live_netns, sweep_run_dir

    run = tmp_path / "run"
    run.mkdir()
    for name in ("control-11.sock", "sysctl-11.json", "control-22.sock", "sysctl-33.json",
                 "notes.txt", "sysctl-x.json"):  # fmt: skip
        (run / name).write_text("")
    assert sweep_run_dir(run, alive={22}) == ["control-11.sock", "sysctl-11.json", "sysctl-33.json"]
    assert sorted(p.name for p in run.iterdir()) == [
        "control-22.sock",
        "notes.txt",
        "sysctl-x.json",
    ]
    assert sweep_run_dir(tmp_path / "missing", alive=set()) == []
    # this process's own namespace is always among the live ones
    import os

    assert os.stat("/proc/self/ns/net").st_ino in live_netns()


def test_plan_reads_the_config_file_like_run(tmp_path, capsys, monkeypatch):
    """plan shows what run would install with the same sources: the file's CIDRs and mark,
    the environment's table (the AP's route is whatever this host has: not asserted)."""
    path = tmp_path / "sdnsup.toml"
    path.write_text(
        'routes = ["10.20.0.0/16"]\nap = ["10.77.0.11"]\nmark = 0x4000\nmask = 0x4182\n'
    )
    monkeypatch.setenv("SDNSUP_TABLE", "7400")
    assert cli.main(["plan", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "elements = { 10.20.0.0/16 }" in out
    assert "ip route replace 10.20.0.0/16 nhid 1566375940 table 7400 proto 245" in out
    assert "0x00004000" in out or "0x4000" in out  # the file's mark in the nft ruleset


def test_plan_and_check_import_neither_trio_nor_httpx_nor_the_daemon(tmp_path):
    """``plan`` and ``check`` read the run options (the option table and its defaults), not
    the engine: the defaults live in a module that imports nothing heavy."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from sdnsup import cli\n"
        "args = ['--config', 'none', '-r', '10.10.10.0/24', '--ap', '10.77.0.11']\n"
        "for argv in (['plan', *args], ['check', *args]):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = ('trio', 'httpx', 'tenacity', 'sdnsup.supervisor', 'sdnsup.daemon')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    from pathlib import Path

    import sdnsup

    # the sdnsup under test, whichever checkout this is
    root = str(Path(sdnsup.__file__).resolve().parents[1])
    env = {"PATH": "/usr/bin:/bin", "SDNSUP_CONFIG": "none", "PYTHONPATH": root}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out
