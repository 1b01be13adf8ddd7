"""sdnsup.logs: formats, rotation, and a log directory that is safe to keep in /tmp.

Everything works in ``tmp_path``; the real /tmp/sdnsup and /etc are never touched. The tests
that need another uid (chown to 65534) run only as root and are skipped, with the reason,
otherwise.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sdnsup import logs
from sdnsup.errors import EX_USAGE, ConfigError
from sdnsup.logs import LogSetupError, open_log_dir, setup_logging, teardown_logging

log = logging.getLogger("sdnsup")
OTHER_UID = 65534  # nobody

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to make files owned by another uid (chown)"
)

TEXT_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})\+0000 (\S+)\[(\d+)\] "
    r"(DEBUG|INFO|WARNING|ERROR) (.*)$"
)
ME = f"[{os.getpid()}]"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Leave the logging configuration as the test found it, with our handlers closed."""
    root = logging.getLogger()
    names = ("sdnsup", "httpx")
    saved = root.level, list(root.handlers), {n: logging.getLogger(n).level for n in names}
    yield
    teardown_logging()
    root.setLevel(saved[0])
    assert root.handlers == saved[1]
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


def file_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its content, to prove nothing was written there."""
    return {
        str(p.relative_to(directory)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(directory.rglob("*"))
    }


def fail(message: str) -> None:
    raise ValueError(message)


# --- formats ----------------------------------------------------------------------------------


def test_text_format_on_stream_and_file(tmp_path: Path) -> None:
    stream = io.StringIO()
    setup_logging(level="info", log_dir=tmp_path / "logs", stream=stream)
    before = datetime.now(UTC)
    log.info("AP chosen: %s (%.1f ms)", "ap2", 5.8)
    logging.getLogger("sdnsup.netmon").warning("healed")
    log.debug("not at info")

    lines = file_lines(tmp_path / "logs" / "sdnsup.log")
    assert lines[0].endswith(
        f"sdnsup{ME} INFO logging to {tmp_path / 'logs' / 'sdnsup.log'} "
        "(rotated at 10.0 MiB, 5 backups)"
    )
    records = [TEXT_LINE.match(line) for line in lines[1:]]
    assert all(records), lines
    assert all(m[3] == str(os.getpid()) for m in records if m)
    assert [(m[2], m[4], m[5]) for m in records if m] == [
        ("sdnsup", "INFO", "AP chosen: ap2 (5.8 ms)"),
        ("sdnsup.netmon", "WARNING", "healed"),
    ]
    first = records[0]
    assert first is not None
    ts = datetime.strptime(first[1], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC)
    assert abs(ts - before) < timedelta(seconds=5)  # UTC, whatever the machine's zone
    # The same format on the stream, for supervisord/journald.
    assert stream.getvalue().splitlines() == lines


def test_text_format_escapes_messages_and_indents_tracebacks(tmp_path: Path) -> None:
    setup_logging(log_dir=tmp_path / "logs", stream=io.StringIO())
    forged = "bad answer\n2026-01-01T00:00:00.000+0000 sdnsup INFO AP chosen: evil\x1b[2J"
    log.warning("CC said: %s", forged)
    try:
        fail("line one\nline two")
    except ValueError:
        log.exception("probe crashed")

    lines = file_lines(tmp_path / "logs" / "sdnsup.log")[1:]
    # Every line starting at column 0 is a real record: the forged one stays inside its line.
    records = [line for line in lines if not line.startswith("  ")]
    assert [TEXT_LINE.match(line) is not None for line in records] == [True, True]
    assert records[0].endswith(
        r"CC said: bad answer\n2026-01-01T00:00:00.000+0000 sdnsup INFO AP chosen: evil\x1b[2J"
    )
    assert records[1].endswith(f"sdnsup{ME} ERROR probe crashed")
    traceback = lines[2:]
    assert traceback[0] == "  Traceback (most recent call last):"
    assert traceback[-2:] == ["  ValueError: line one", "  line two"]


def test_json_format(tmp_path: Path) -> None:
    stream = io.StringIO()
    setup_logging(level="debug", log_dir=tmp_path / "logs", fmt="json", stream=stream)
    log.debug("debug %d", 1)
    logging.getLogger("sdnsup.probe").info("tab\there\nnewline \x1b")
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.error("boom", exc_info=True)

    lines = file_lines(tmp_path / "logs" / "sdnsup.log")
    assert stream.getvalue().splitlines() == lines
    objs = [json.loads(line) for line in lines]
    assert objs[0]["msg"].startswith("logging to ")
    for obj in objs:
        assert {"ts", "level", "logger", "pid", "msg"} <= obj.keys()
        assert obj["pid"] == os.getpid()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", obj["ts"])
        assert datetime.fromisoformat(obj["ts"]).utcoffset() == timedelta(0)
    assert [(o["level"], o["logger"], o["msg"]) for o in objs[1:]] == [
        ("DEBUG", "sdnsup", "debug 1"),
        ("INFO", "sdnsup.probe", "tab\there\nnewline \x1b"),
        ("ERROR", "sdnsup", "boom"),
    ]
    assert "exc" not in objs[1] and "exc" not in objs[2]
    assert objs[3]["exc"].startswith("Traceback (most recent call last):")
    assert objs[3]["exc"].rstrip().endswith("ZeroDivisionError: division by zero")


def test_levels_sdnsup_at_chosen_level_libraries_at_warning(tmp_path: Path) -> None:
    stream = io.StringIO()
    setup_logging(level="debug", log_dir=None, stream=stream)
    log.debug("ours at debug")
    logging.getLogger("httpx").info("HTTP Request: GET https://cc/v1/aps")
    logging.getLogger("pyroute2").debug("chatter")
    logging.getLogger("trio").warning("library warning")
    out = stream.getvalue()
    assert "ours at debug" in out and "library warning" in out
    assert "HTTP Request" not in out and "chatter" not in out
    assert logging.getLogger("httpx").level == logging.WARNING

    stream = io.StringIO()
    setup_logging(level="warning", log_dir=None, stream=stream)
    log.info("hidden")
    log.warning("shown")
    assert [line.split(" ", 3)[3] for line in stream.getvalue().splitlines()] == ["shown"]


def test_bad_arguments_are_config_errors(tmp_path: Path) -> None:
    root_handlers = list(logging.getLogger().handlers)
    with pytest.raises(ConfigError, match="log level 'loud'"):
        setup_logging(level="loud", log_dir=None)
    with pytest.raises(ConfigError, match="log format 'xml'"):
        setup_logging(fmt="xml", log_dir=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="0 or more"):
        setup_logging(backups=-1, log_dir=None)
    assert logging.getLogger().handlers == root_handlers
    assert issubclass(LogSetupError, ConfigError) and LogSetupError("x").exit_code == EX_USAGE


def test_no_log_dir_writes_only_to_the_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    stream = io.StringIO()
    setup_logging(log_dir=None, stream=stream)
    log.info("only here")
    assert f"sdnsup{ME} INFO only here" in stream.getvalue()
    assert "logging to" not in stream.getvalue()
    assert list(tmp_path.iterdir()) == []
    ours = [h for h in logging.getLogger().handlers if h in logs._installed]
    assert [type(h) for h in ours] == [logging.StreamHandler]


def test_stream_defaults_to_the_current_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(log_dir=None)
    log.warning("to stderr")
    assert f"sdnsup{ME} WARNING to stderr" in capsys.readouterr().err


def test_setup_again_replaces_handlers_and_closes_fds(tmp_path: Path) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    for _ in range(3):
        setup_logging(log_dir=tmp_path / "logs", stream=io.StringIO())
    log.info("once")
    assert file_lines(tmp_path / "logs" / "sdnsup.log")[-1].endswith("INFO once")
    assert sum("INFO once" in line for line in file_lines(tmp_path / "logs" / "sdnsup.log")) == 1
    assert open_fds() - before == 2  # one directory, one file
    teardown_logging()
    assert open_fds() == before


# --- rotation ---------------------------------------------------------------------------------


def test_rotation_keeps_backups_files(tmp_path: Path) -> None:
    d = tmp_path / "logs"
    setup_logging(log_dir=d, max_bytes=300, backups=2, stream=io.StringIO())
    for i in range(100):
        log.info("record %03d", i)

    assert sorted(p.name for p in d.iterdir()) == ["sdnsup.log", "sdnsup.log.1", "sdnsup.log.2"]
    for p in d.iterdir():
        assert 0 < p.stat().st_size <= 300
        assert mode(p) == 0o600
    numbers = {
        name: [int(line[-3:]) for line in file_lines(d / name)]
        for name in ("sdnsup.log.2", "sdnsup.log.1", "sdnsup.log")
    }
    # Oldest to newest, contiguous, ending with the last record.
    joined = numbers["sdnsup.log.2"] + numbers["sdnsup.log.1"] + numbers["sdnsup.log"]
    assert joined == list(range(joined[0], 100))


def test_rotation_without_backups_starts_over(tmp_path: Path) -> None:
    d = tmp_path / "logs"
    setup_logging(log_dir=d, max_bytes=200, backups=0, stream=io.StringIO())
    for i in range(50):
        log.info("record %03d", i)
    assert [p.name for p in d.iterdir()] == ["sdnsup.log"]
    assert file_lines(d / "sdnsup.log")[-1].endswith("record 049")
    assert (d / "sdnsup.log").stat().st_size <= 200


def test_rotation_happens_in_the_opened_directory_not_at_the_path(tmp_path: Path) -> None:
    """Once open, the path is never resolved again: a symlink swapped in later is ignored."""
    d, moved, target = tmp_path / "logs", tmp_path / "moved", tmp_path / "target"
    target.mkdir()
    setup_logging(log_dir=d, max_bytes=200, backups=1, stream=io.StringIO())
    d.rename(moved)
    d.symlink_to(target)
    for i in range(20):
        log.info("record %03d", i)
    assert list(target.iterdir()) == []
    assert sorted(p.name for p in moved.iterdir()) == ["sdnsup.log", "sdnsup.log.1"]


def test_concurrent_threads_lose_no_records(tmp_path: Path) -> None:
    d = tmp_path / "logs"
    setup_logging(log_dir=d, max_bytes=4096, backups=50, stream=io.StringIO())

    def worker(n: int) -> None:
        for i in range(200):
            log.info("thread %d record %03d", n, i)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = [line for p in d.iterdir() for line in file_lines(p) if " record " in line]
    assert len(lines) == 800 and all(TEXT_LINE.match(line) for line in lines)


def test_write_failures_are_reported_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging(log_dir=tmp_path / "logs", stream=io.StringIO())

    def full(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("sdnsup.logs.os.write", full)
    for _ in range(3):
        log.info("lost")
    err = capsys.readouterr().err
    assert err.count("No space left on device") == 1
    assert f"cannot write log file {tmp_path / 'logs' / 'sdnsup.log'}" in err
    monkeypatch.undo()
    log.info("back")
    assert file_lines(tmp_path / "logs" / "sdnsup.log")[-1].endswith("INFO back")


# --- the directory and the file: modes and planted things -------------------------------------


def test_modes_are_0700_and_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        setup_logging(log_dir=tmp_path / "logs", stream=io.StringIO())
        log.info("x")
    finally:
        os.umask(old)
    assert mode(tmp_path / "logs") == 0o700
    assert mode(tmp_path / "logs" / "sdnsup.log") == 0o600


def test_existing_private_dir_is_reused_and_our_wide_file_narrowed(tmp_path: Path) -> None:
    d = tmp_path / "logs"
    d.mkdir(mode=0o750)
    (d / "sdnsup.log").write_text("old line\n")
    (d / "sdnsup.log").chmod(0o644)
    setup_logging(log_dir=d, stream=io.StringIO())
    log.info("new line")
    assert mode(d) == 0o750  # read bits for a group are the operator's choice; not changed
    assert mode(d / "sdnsup.log") == 0o600
    lines = file_lines(d / "sdnsup.log")
    assert lines[0] == "old line" and lines[-1].endswith("INFO new line")


def test_symlink_at_log_dir_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    (tmp_path / "sdnsup").symlink_to(other)
    root_handlers = list(logging.getLogger().handlers)
    with pytest.raises(LogSetupError) as err:
        setup_logging(log_dir=tmp_path / "sdnsup", stream=io.StringIO())
    msg = str(err.value)
    assert f"log directory {tmp_path / 'sdnsup'} is a symbolic link to {other}" in msg
    assert "not followed" in msg and "--log-dir" in msg
    assert list(other.iterdir()) == []
    assert logging.getLogger().handlers == root_handlers


def test_dangling_symlink_at_log_dir_is_refused_and_not_created(tmp_path: Path) -> None:
    (tmp_path / "sdnsup").symlink_to(tmp_path / "made-by-root")
    with pytest.raises(LogSetupError, match="symbolic link"):
        open_log_dir(tmp_path / "sdnsup")
    assert not (tmp_path / "made-by-root").exists()


def test_symlink_at_log_file_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "logs"
    d.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (d / "sdnsup.log").symlink_to(victim)
    (d / "other.log").symlink_to(tmp_path / "would-be-created")
    with pytest.raises(LogSetupError, match=r"sdnsup\.log is a symbolic link to .*victim"):
        setup_logging(log_dir=d, stream=io.StringIO())
    assert victim.read_text() == "precious\n"
    fd = open_log_dir(d)
    try:
        with pytest.raises(LogSetupError, match="symbolic link"):
            logs.DirFdRotatingFileHandler(fd, dir_path=d, filename="other.log")
    finally:
        os.close(fd)
    assert not (tmp_path / "would-be-created").exists()


def test_hard_link_at_log_file_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "logs"
    d.mkdir(mode=0o700)
    precious = tmp_path / "precious"
    precious.write_text("secret\n")
    os.link(precious, d / "sdnsup.log")
    with pytest.raises(LogSetupError, match="2 hard links"):
        setup_logging(log_dir=d, stream=io.StringIO())
    assert precious.read_text() == "secret\n"


@pytest.mark.timeout(10)
def test_fifo_at_log_file_is_refused_without_blocking(tmp_path: Path) -> None:
    d = tmp_path / "logs"
    d.mkdir(mode=0o700)
    os.mkfifo(d / "sdnsup.log", 0o600)
    with pytest.raises(LogSetupError, match="is a FIFO, not a regular file"):
        setup_logging(log_dir=d, stream=io.StringIO())


def test_directory_at_log_file_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "logs"
    (d / "sdnsup.log").mkdir(parents=True)
    d.chmod(0o700)
    with pytest.raises(LogSetupError, match="is a directory, not a regular file"):
        setup_logging(log_dir=d, stream=io.StringIO())


@pytest.mark.parametrize("bad_mode", [0o777, 0o770, 0o1777])
def test_log_dir_writable_by_others_is_refused(tmp_path: Path, bad_mode: int) -> None:
    d = tmp_path / "logs"
    d.mkdir()
    d.chmod(bad_mode)
    with pytest.raises(LogSetupError) as err:
        setup_logging(log_dir=d, stream=io.StringIO())
    msg = str(err.value)
    assert f"log directory {d} has mode {bad_mode:04o}" in msg and "chmod 700" in msg
    assert mode(d) == bad_mode  # refused, not "fixed"
    assert list(d.iterdir()) == []


def test_file_at_log_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "logs").write_text("")
    with pytest.raises(LogSetupError, match="is a regular file, not a directory"):
        open_log_dir(tmp_path / "logs")


def test_missing_parent_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LogSetupError, match=r"cannot open its parent .*missing: No such file"):
        open_log_dir(tmp_path / "missing" / "logs")


def test_dotdot_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LogSetupError, match=r"without '\.\.'"):
        open_log_dir(tmp_path / "a" / ".." / "logs")


def test_parent_writable_by_others_must_be_sticky(tmp_path: Path) -> None:
    public = tmp_path / "public"
    public.mkdir()
    public.chmod(0o777)
    with pytest.raises(LogSetupError) as err:
        open_log_dir(public / "sdnsup")
    assert f"its parent {public} (mode 0777) is writable by other users and not sticky" in str(
        err.value
    )
    assert list(public.iterdir()) == []
    public.chmod(0o1777)  # like /tmp: others cannot rename or remove what we own
    os.close(open_log_dir(public / "sdnsup"))
    assert mode(public / "sdnsup") == 0o700


def test_our_own_symlink_among_the_parents_is_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "abs").symlink_to(real)
    (tmp_path / "rel").symlink_to("real")
    (tmp_path / "loop").symlink_to("loop")
    for via in ("abs", "rel"):
        fd = open_log_dir(tmp_path / via / f"logs-{via}")
        os.close(fd)
    assert sorted(p.name for p in real.iterdir()) == ["logs-abs", "logs-rel"]
    with pytest.raises(LogSetupError, match="too many symbolic links"):
        open_log_dir(tmp_path / "loop" / "logs")
    monkeypatch.chdir(real)  # a relative --log-dir is relative to the working directory
    os.close(open_log_dir(Path("logs-cwd")))
    assert (real / "logs-cwd").is_dir()


def test_open_log_dir_returns_a_directory_fd(tmp_path: Path) -> None:
    fd = open_log_dir(tmp_path / "logs")
    try:
        assert stat.S_ISDIR(os.fstat(fd).st_mode)
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)


# --- another user's planted things (root only) ------------------------------------------------


@needs_root
def test_dir_created_by_another_user_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "sdnsup"
    d.mkdir(mode=0o700)
    os.chown(d, OTHER_UID, OTHER_UID)
    with pytest.raises(LogSetupError) as err:
        setup_logging(log_dir=d, stream=io.StringIO())
    assert str(err.value).startswith(
        f"log directory {d} is owned by uid {OTHER_UID} (nobody), not root: someone else created it"
    )
    assert "remove it, or choose another directory with --log-dir" in str(err.value)
    assert list(d.iterdir()) == []
    assert d.stat().st_uid == OTHER_UID and mode(d) == 0o700  # never chown-ed or chmod-ed


@needs_root
def test_file_planted_by_another_user_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "sdnsup"
    d.mkdir(mode=0o700)
    planted = d / "sdnsup.log"
    planted.write_text("theirs\n")
    os.chown(planted, OTHER_UID, OTHER_UID)
    planted.chmod(0o666)
    with pytest.raises(LogSetupError, match=rf"log file {planted} is owned by uid {OTHER_UID}"):
        setup_logging(log_dir=d, stream=io.StringIO())
    assert planted.read_text() == "theirs\n"
    assert planted.stat().st_uid == OTHER_UID and mode(planted) == 0o666


@needs_root
def test_classic_tmp_symlink_attack_fails(tmp_path: Path) -> None:
    """Another user plants ``<tmp>/sdnsup -> <etc>`` in a sticky world-writable directory.

    Root-owned ``etc`` would pass every ownership check if the link were followed; sdnsup
    must refuse it and leave ``etc`` untouched.
    """
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    etc = tmp_path / "etc"
    etc.mkdir(mode=0o755)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    before = snapshot(etc)
    link = tmp / "sdnsup"
    link.symlink_to(etc)
    os.lchown(link, OTHER_UID, OTHER_UID)

    with pytest.raises(LogSetupError, match=r"is a symbolic link to .*not followed"):
        setup_logging(log_dir=link, stream=io.StringIO())
    assert snapshot(etc) == before
    assert mode(etc) == 0o755 and etc.stat().st_uid == 0


@needs_root
def test_another_users_symlink_among_the_parents_is_refused(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    etc = tmp_path / "etc"
    etc.mkdir(mode=0o755)
    before = snapshot(etc)
    link = tmp / "logs"
    link.symlink_to(etc)
    os.lchown(link, OTHER_UID, OTHER_UID)
    with pytest.raises(LogSetupError) as err:
        setup_logging(log_dir=link / "sdnsup", stream=io.StringIO())
    assert f"its parent {link} is a symbolic link owned by uid {OTHER_UID} (nobody)" in str(
        err.value
    )
    assert snapshot(etc) == before  # no etc/sdnsup created


@needs_root
def test_parent_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    os.chown(home, OTHER_UID, OTHER_UID)
    with pytest.raises(LogSetupError, match=rf"its parent {home} is owned by uid {OTHER_UID}"):
        open_log_dir(home / "sdnsup")
    assert list(home.iterdir()) == []


def test_a_bad_log_call_is_reported_by_logging_not_as_a_write_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "logs"
    handler = logs.DirFdRotatingFileHandler(open_log_dir(d), dir_path=d)
    handler.setFormatter(logs.TextFormatter())
    errors: list[logging.LogRecord] = []
    handler.handleError = errors.append  # type: ignore[method-assign,assignment]
    bad = logging.LogRecord("sdnsup", logging.INFO, __file__, 1, "%d APs", ("three",), None)
    good = logging.LogRecord("sdnsup", logging.INFO, __file__, 2, "after", (), None)
    try:
        handler.handle(bad)
        handler.handle(good)
    finally:
        handler.close()
    assert errors == [bad]
    assert "cannot write log file" not in capsys.readouterr().err
    assert file_lines(d / "sdnsup.log") == [text_line(good)]


def text_line(record: logging.LogRecord) -> str:
    return logs.TextFormatter().format(record)
