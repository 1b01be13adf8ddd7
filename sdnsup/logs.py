"""Logging for operators: stderr plus a size-rotated file that is safe to keep in /tmp.

:func:`setup_logging` installs two handlers on the root logger, so that sdnsup's own loggers
(``sdnsup``, ``sdnsup.netmon``...) and the warnings of the libraries it uses all reach them:

* **stderr**, for supervisord (which stores the child's output without timestamps) and journald
  (which adds its own). It uses the same format as the file: one format to read and to parse,
  and a line copied from either place means the same thing.
* **a file** ``sdnsup.log`` in the log directory (``/tmp/sdnsup/`` by default, the seed's
  convention; ``log_dir=None`` disables it), rotated by size: ``sdnsup.log`` is renamed to
  ``sdnsup.log.1`` (``.1`` to ``.2``...) once the next record would take it past
  ``max_bytes``, keeping ``backups`` old files (``backups=0``: the file starts over).

Levels: the ``sdnsup`` loggers log at the chosen level; every other library at WARNING or
above (``--log-level debug`` does not turn on pyroute2's or trio's debug chatter), and ``httpx``
is pinned at WARNING (it logs every request at INFO).

Formats (the same on stderr and in the file; timestamps are UTC with milliseconds):

``text``::

    2026-11-25T21:12:19.123+0000 sdnsup INFO AP chosen: ap2 (172.31.1.12) (5.8 ms)
    2026-11-25T21:12:19.125+0000 sdnsup.netmon WARNING ...

  ``<timestamp> <logger> <LEVEL> <message>``. Every record starts at column 0 with its
  timestamp; a traceback follows on continuation lines indented by two spaces, and control
  characters in a message are escaped (``\\n``, ``\\x1b``), so an untrusted string in a message
  (a CC's error text, say) can neither forge a record nor send escapes to a terminal.

``json`` (for log shippers), one object per line (control characters are JSON-escaped)::

    {"ts": "2026-11-25T21:12:19.123Z", "level": "INFO", "logger": "sdnsup", "msg": "..."}

  ``ts`` ISO 8601 UTC with milliseconds; ``level`` DEBUG, INFO, WARNING, ERROR or CRITICAL;
  ``logger`` the logger's name; ``msg`` the message with its arguments filled in; ``exc``
  (only when the record carries an exception) the formatted traceback; ``stack`` (only when
  logged with ``stack_info=True``) the stack. Consumers must ignore keys they do not know.

Why the file handling is careful: sdnsup runs as root and ``/tmp`` is writable by every user.
A user who plants ``/tmp/sdnsup`` as a symlink to ``/etc`` (or ``/tmp/sdnsup/sdnsup.log`` as a
symlink to ``/etc/shadow``) before sdnsup starts would otherwise make root create or append to
files of the attacker's choosing; a directory the user created would let them read the logs or
swap files under sdnsup. So (:func:`open_log_dir`, :class:`DirFdRotatingFileHandler`):

* the parents of the log directory are walked from ``/`` one component at a time with
  ``O_NOFOLLOW``; each must be owned by root or by us, and one writable by other users
  (or a group other than root's or ours) must be sticky like ``/tmp``, where others cannot
  rename or remove what we own. A symlink among the parents (``/var/run -> /run``) is
  followed only when root or we own it;
* the directory itself is created ``0700`` and opened with ``O_NOFOLLOW | O_DIRECTORY`` (a
  symlink planted there is refused, never followed), then checked with ``fstat`` on that very
  descriptor: a directory, owned by our effective uid, not writable by group or others. It is
  never chmod-ed or chown-ed: one that is not ours, or was open to others, is refused with a
  message saying what to do, because its contents cannot be trusted;
* log files are opened and rotated only relative to that directory descriptor (``openat``,
  ``renameat``), so no path through ``/tmp`` is resolved again after the checks; each is
  opened with ``O_NOFOLLOW`` and must be a regular file owned by us with a single link (a
  hard link to another file is refused). Files are ``0600``: a group-readable ``0640`` file
  inside a ``0700`` directory would be unreadable by the group anyway, and nothing else
  needs to read them (operators use root, or the stderr copy kept by supervisord/journald).
  A file of ours found with wider permissions (an older version's) is narrowed to ``0600``.

One sdnsup process per log directory: two processes rotating the same file would rename it
under each other. Setup errors are :class:`LogSetupError` (a :class:`ConfigError`, exit code
64) raised before any handler is installed, so the caller can report them and exit before
touching the kernel.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import posixpath
import pwd
import stat
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Literal, TextIO

from sdnsup.errors import ConfigError

__all__ = [
    "DEFAULT_LOG_DIR",
    "LOG_FILE",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "DirFdRotatingFileHandler",
    "JsonFormatter",
    "LogSetupError",
    "TextFormatter",
    "open_log_dir",
    "setup_logging",
    "teardown_logging",
]

DEFAULT_LOG_DIR = Path("/tmp/sdnsup")
LOG_FILE = "sdnsup.log"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
# Directories: no symlink followed at the last component, never inherited by child processes.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Files: O_NOFOLLOW refuses a planted symlink; O_NONBLOCK keeps a planted FIFO from blocking
# the open forever (it fails with ENXIO, or the fstat check refuses it), O_NOCTTY keeps a
# terminal from becoming our controlling tty. O_NONBLOCK has no effect on a regular file.
_FILE_FLAGS = (
    os.O_WRONLY
    | os.O_APPEND
    | os.O_CREAT
    | os.O_NOFOLLOW
    | os.O_CLOEXEC
    | os.O_NONBLOCK
    | os.O_NOCTTY
)
_MAX_SYMLINKS = 40  # like the kernel's limit per path walk
_ADVICE = "remove it, or choose another directory with --log-dir"


class LogSetupError(ConfigError):
    """The log directory or file is unsafe or unusable; nothing was logged there.

    A :class:`ConfigError` (exit code 64): the operator fixes it by removing what is in the
    way or choosing another ``--log-dir``; the message says which.
    """


# --- formats ----------------------------------------------------------------------------------


def _escape_table() -> dict[int, str]:
    table = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
    table.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\t"})
    # Line breaks to str.splitlines() and some viewers.
    table.update({0x2028: "\\u2028", 0x2029: "\\u2029"})
    return table


_ESCAPES = _escape_table()


def _timestamp(record: logging.LogRecord, utc_suffix: str) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}{utc_suffix}"


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    """The record's traceback (cached on the record as logging does), or ""."""
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    return record.exc_text or ""


class TextFormatter(logging.Formatter):
    """``2026-11-25T21:12:19.123+0000 sdnsup[4242] INFO message``, UTC (the pid in brackets,
    as syslog writes it: several sdnsup, one per network namespace, may share a log folder);
    see the module docstring."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().translate(_ESCAPES)
        who = f"{record.name}[{record.process}]"
        line = f"{_timestamp(record, '+0000')} {who} {record.levelname} {message}"
        extra = [_exception_text(self, record)]
        if record.stack_info:
            extra.append(self.formatStack(record.stack_info))
        for text in filter(None, extra):
            # Indented, and without control characters other than the line breaks, so no
            # continuation line can pass for a record of its own.
            for part in text.splitlines():
                line += "\n  " + part.translate(_ESCAPES)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``msg`` [, ``exc``, ``stack``]."""

    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "ts": _timestamp(record, "Z"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        exc = _exception_text(self, record)
        if exc:
            obj["exc"] = exc
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        return json.dumps(obj, ensure_ascii=False)


# --- the directory ----------------------------------------------------------------------------


def _who(uid: int) -> str:
    if uid == 0:
        return "root"
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _describe_entry(dir_fd: int, name: str) -> str:
    """What ``name`` in ``dir_fd`` is, for an error message ("a symbolic link to /etc")."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    what = _kind(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        try:
            what += f" to {os.readlink(name, dir_fd=dir_fd)}"
        except OSError:
            pass
        what += f" owned by {_who(st.st_uid)}"
    return what


def _check_parent(fd: int, where: str, log_dir: Path) -> None:
    """Refuse a parent directory someone other than root or us could rearrange."""
    st = os.fstat(fd)
    euid, egid = os.geteuid(), os.getegid()
    if st.st_uid not in (0, euid):
        raise LogSetupError(
            f"log directory {log_dir}: its parent {where} is owned by {_who(st.st_uid)}, who "
            f"could replace {log_dir} with a link elsewhere; choose a --log-dir whose parents "
            "are owned by root"
        )
    others_write = st.st_mode & stat.S_IWOTH or (
        st.st_mode & stat.S_IWGRP and st.st_gid not in (0, egid)
    )
    # Sticky (like /tmp): other users may create entries but cannot rename or remove ours.
    if others_write and not st.st_mode & stat.S_ISVTX:
        raise LogSetupError(
            f"log directory {log_dir}: its parent {where} (mode {stat.S_IMODE(st.st_mode):04o}) "
            f"is writable by other users and not sticky, so they could replace {log_dir}; "
            "choose another --log-dir"
        )


def _check_parent_link(st: os.stat_result, links: int, where: str, log_dir: Path) -> None:
    """Refuse to follow a symlink among the parents that someone else owns, or a loop."""
    if links > _MAX_SYMLINKS:
        raise LogSetupError(f"log directory {log_dir}: too many symbolic links in its path")
    if st.st_uid not in (0, os.geteuid()):
        # The attack this walk exists for: another user's link among the parents (in a
        # sticky directory like /tmp, anyone may create one pointing anywhere).
        raise LogSetupError(
            f"log directory {log_dir}: its parent {where} is a symbolic link owned by "
            f"{_who(st.st_uid)}; {_ADVICE}"
        )


def _open_parent(log_dir: Path) -> int:
    """An O_DIRECTORY fd of ``log_dir``'s parent, reached and checked one component at a time.

    Each component is opened relative to the previous one with ``O_NOFOLLOW`` and checked
    with :func:`_check_parent`; a symlink is followed (by reading it and walking its target
    the same way) only when root or we own it. Raises :class:`LogSetupError`; on success
    the caller owns the returned fd.
    """
    todo = list(reversed(log_dir.parts[1:-1]))  # a stack: next component last
    fd = os.open("/", _DIR_FLAGS)
    where = current = "/"
    links = 0
    try:
        _check_parent(fd, where, log_dir)
        while todo:
            name = todo.pop()
            current = posixpath.join(where, name)
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                _check_parent_link(st, links, current, log_dir)
                target = PurePosixPath(os.readlink(name, dir_fd=fd))
                todo.extend(reversed(target.parts[1:] if target.is_absolute() else target.parts))
                if target.is_absolute():
                    os.close(fd)
                    fd = -1
                    fd = os.open("/", _DIR_FLAGS)
                    where = "/"
                    _check_parent(fd, where, log_dir)
                continue
            where = posixpath.dirname(where) if name == ".." else posixpath.join(where, name)
            # O_NOFOLLOW: had the entry been swapped for a symlink since the stat, this fails.
            next_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
            _check_parent(fd, where, log_dir)
        return fd
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        raise LogSetupError(
            f"log directory {log_dir}: cannot open its parent {current}: {exc.strerror}; "
            "create the parent or choose another --log-dir"
        ) from exc
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise


def _absolute(path: Path) -> Path:
    # Not os.path.abspath: it drops ".." lexically, which is not what the kernel does.
    return path if path.is_absolute() else Path.cwd() / path


def open_log_dir(path: Path) -> int:
    """Create ``path`` (mode 0700) if missing and return an ``O_DIRECTORY`` fd to it.

    The parents are checked first (see the module docstring); the directory is then created
    with ``mkdir`` and opened with ``O_NOFOLLOW``, both relative to its parent's fd, and the
    opened descriptor is checked with ``fstat``: a directory owned by the effective uid and
    not writable by group or others. Nothing is chmod-ed or chown-ed.

    Raises :class:`LogSetupError` (with the path, what is wrong and what to do) when a check
    fails or a system call does; no fd is left open then. On success the caller owns the fd
    and closes it (``O_CLOEXEC``: child processes never inherit it).
    """
    path = _absolute(path)
    if ".." in path.parts or path.name in ("", "."):
        raise LogSetupError(f"log directory {path}: give a plain path without '..'")
    parent = _open_parent(path)
    try:
        try:
            # 0700: logs are for root only; umask can only narrow it.
            os.mkdir(path.name, 0o700, dir_fd=parent)
        except FileExistsError:
            pass  # checked below, whoever made it
        except OSError as exc:
            raise LogSetupError(
                f"cannot create log directory {path}: {exc.strerror}; "
                "choose another directory with --log-dir"
            ) from exc
        try:
            # O_NOFOLLOW: a symlink planted at the path (-> /etc) is refused, not followed.
            fd = os.open(path.name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                what = _describe_entry(parent, path.name)
                why = (
                    " (not followed: someone may be trying to redirect sdnsup's logs)"
                    if what.startswith("a symbolic link")
                    else ""
                )
                raise LogSetupError(
                    f"log directory {path} is {what}, not a directory{why}; {_ADVICE}"
                ) from exc
            raise LogSetupError(
                f"cannot open log directory {path}: {exc.strerror}; {_ADVICE}"
            ) from exc
    finally:
        os.close(parent)
    try:
        _check_log_dir(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_log_dir(fd: int, path: Path) -> None:
    st = os.fstat(fd)
    euid = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):  # O_DIRECTORY guarantees it; kept for clarity
        raise LogSetupError(f"log directory {path} is not a directory; {_ADVICE}")
    if st.st_uid != euid:
        raise LogSetupError(
            f"log directory {path} is owned by {_who(st.st_uid)}, not {_who(euid)}: someone "
            f"else created it and could read or swap sdnsup's log files; {_ADVICE}"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        # Ours, but others could have planted files in it: its contents cannot be trusted,
        # so we do not just chmod it.
        raise LogSetupError(
            f"log directory {path} has mode {mode:04o}: writable by other users, who could "
            f"have planted files in it; check its contents and chmod 700 it, or {_ADVICE}"
        )


# --- the file ---------------------------------------------------------------------------------


def _check_log_file(st: os.stat_result, path: Path) -> None:
    """Refuse an opened log file that is not a regular file of ours with one link."""
    euid = os.geteuid()
    if not stat.S_ISREG(st.st_mode):
        raise LogSetupError(
            f"log file {path} is {_kind(st.st_mode)}, not a regular file; {_ADVICE}"
        )
    if st.st_uid != euid:
        raise LogSetupError(
            f"log file {path} is owned by {_who(st.st_uid)}, not {_who(euid)}: someone else "
            f"created it; {_ADVICE}"
        )
    if st.st_nlink != 1:
        # A hard link to another file of ours (/etc/shadow, for root) would make us append
        # logs to it.
        raise LogSetupError(
            f"log file {path} has {st.st_nlink} hard links: it may be another file linked "
            f"here; {_ADVICE}"
        )


class DirFdRotatingFileHandler(logging.Handler):
    """Append records to ``filename`` in an open directory, rotating by size.

    Every file operation is relative to ``dir_fd`` (``openat``/``renameat``/``unlinkat``), so
    no path is resolved through a world-writable directory after :func:`open_log_dir`
    checked it. The handler takes ownership of ``dir_fd`` once constructed and closes it in
    :meth:`close`; if the constructor raises, the caller still owns it.

    The file is opened in the constructor: a refused or unopenable file raises
    :class:`LogSetupError` there, before the handler is installed. Later write or rotation
    failures (disk full...) are reported on stderr once, until a write succeeds again; the
    file is reopened on the next record after a failed rotation. Records are written with
    one ``write`` each on an ``O_APPEND`` fd (no buffering: nothing is lost on a crash).
    Thread-safe: :meth:`logging.Handler.handle` holds the handler lock around :meth:`emit`.
    """

    def __init__(
        self,
        dir_fd: int,
        *,
        dir_path: Path,
        filename: str = LOG_FILE,
        max_bytes: int = 10 << 20,
        backups: int = 5,
    ) -> None:
        super().__init__()
        self.dir_path = dir_path
        self.filename = filename
        self.max_bytes = max_bytes
        self.backups = backups
        self._dir_fd = dir_fd
        self._fd = -1
        self._closed = False
        self._failing: str | None = None
        try:
            self._fd = self._open_file()
        except BaseException:
            # The caller still owns dir_fd: make sure a later close() (logging.shutdown
            # closes every handler ever made) cannot close it, or a reused fd number, again.
            self._dir_fd = -1
            self._closed = True
            raise

    @property
    def path(self) -> Path:
        """The log file's path, for messages (never used to open it)."""
        return self.dir_path / self.filename

    def _open_file(self) -> int:
        """Open (create, 0600) the log file relative to the directory fd and check it."""
        try:
            fd = os.open(self.filename, _FILE_FLAGS, 0o600, dir_fd=self._dir_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                what = _describe_entry(self._dir_fd, self.filename)
                raise LogSetupError(
                    f"log file {self.path} is {what}, not a regular file; {_ADVICE}"
                ) from exc
            raise LogSetupError(f"cannot open log file {self.path}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            _check_log_file(st, self.path)
            if stat.S_IMODE(st.st_mode) & 0o077:
                # Ours, in our private directory: safe to narrow (an older version's file).
                os.fchmod(fd, 0o600)
        except OSError as exc:
            os.close(fd)
            raise LogSetupError(f"cannot check log file {self.path}: {exc.strerror}") from exc
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _rollover(self) -> None:
        """``name.(N-1)`` -> ``name.N`` ... ``name`` -> ``name.1``, then a fresh ``name``."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        d = self._dir_fd
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                try:
                    os.rename(
                        f"{self.filename}.{i}",
                        f"{self.filename}.{i + 1}",
                        src_dir_fd=d,
                        dst_dir_fd=d,
                    )
                except FileNotFoundError:
                    pass
            os.rename(self.filename, f"{self.filename}.1", src_dir_fd=d, dst_dir_fd=d)
        else:
            os.unlink(self.filename, dir_fd=d)
        self._fd = self._open_file()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)  # a bad log call: logging's usual report
            return
        if self._closed:
            return  # after close() (interpreter shutdown): nowhere safe to write
        try:
            if self._fd < 0:
                self._fd = self._open_file()  # an earlier rotation failed half-way
            if self.max_bytes > 0:
                size = os.fstat(self._fd).st_size
                if size > 0 and size + len(data) > self.max_bytes:
                    self._rollover()
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            self._failing = None
        except (OSError, LogSetupError) as exc:
            self._report(exc)

    def _report(self, exc: OSError | LogSetupError) -> None:
        """One line on stderr per distinct failure, not a traceback per record."""
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if reason == self._failing:
            return
        self._failing = reason
        try:
            sys.stderr.write(
                f"sdnsup: cannot write log file {self.path}: {reason} "
                "(repeats are not reported until a write succeeds)\n"
            )
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass

    def close(self) -> None:
        """Close the file and the directory fd; later records are dropped."""
        self.acquire()
        try:
            self._closed = True
            for fd in (self._fd, self._dir_fd):
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self._fd = self._dir_fd = -1
        finally:
            self.release()
        super().close()


# --- setup ------------------------------------------------------------------------------------

_installed: list[logging.Handler] = []


def teardown_logging() -> None:
    """Remove and close the handlers :func:`setup_logging` installed (idempotent)."""
    root = logging.getLogger()
    while _installed:
        handler = _installed.pop()
        root.removeHandler(handler)
        handler.close()


def setup_logging(
    *,
    level: str = "info",
    log_dir: Path | None = DEFAULT_LOG_DIR,
    fmt: Literal["text", "json"] = "text",
    max_bytes: int = 10 << 20,
    backups: int = 5,
    stream: TextIO | None = None,
    filename: str = LOG_FILE,
) -> None:
    """Log to ``stream`` (default: the current ``sys.stderr``) and ``log_dir``/sdnsup.log.

    ``level`` is one of :data:`LOG_LEVELS` (or "critical") for the ``sdnsup`` loggers;
    ``log_dir=None`` logs to the stream only; ``max_bytes`` 0 never rotates; ``backups`` 0
    starts the file over when full. Calling it again replaces what an earlier call
    installed (other handlers on the root logger, pytest's say, are left alone).

    Raises :class:`ConfigError` for a bad argument and :class:`LogSetupError` when the log
    directory or file is unsafe or unusable; in both cases the logging configuration is
    unchanged and no fd is left open. On success the handlers own the directory and file
    fds until :func:`teardown_logging` or interpreter exit (``logging.shutdown``).
    """
    numeric = _LEVELS.get(level.lower())
    if numeric is None:
        raise ConfigError(f"log level {level!r}: choose one of {', '.join(LOG_LEVELS)}")
    if fmt not in LOG_FORMATS:
        raise ConfigError(f"log format {fmt!r}: choose one of {', '.join(LOG_FORMATS)}")
    if max_bytes < 0 or backups < 0:
        raise ConfigError("log rotation: max_bytes and backups must be 0 or more")
    formatter: logging.Formatter = TextFormatter() if fmt == "text" else JsonFormatter()

    handlers: list[logging.Handler] = [logging.StreamHandler(stream or sys.stderr)]
    file_handler: DirFdRotatingFileHandler | None = None
    if log_dir is not None:
        dir_fd = open_log_dir(log_dir)
        try:
            file_handler = DirFdRotatingFileHandler(
                dir_fd,
                dir_path=_absolute(log_dir),
                filename=filename,
                max_bytes=max_bytes,
                backups=backups,
            )
        except BaseException:
            os.close(dir_fd)
            raise
        handlers.append(file_handler)

    teardown_logging()
    root = logging.getLogger()
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
        _installed.append(handler)
    # Libraries speak up only for warnings; sdnsup's own loggers at the chosen level.
    root.setLevel(max(logging.WARNING, numeric))
    logging.getLogger("sdnsup").setLevel(numeric)
    # httpx logs every request at INFO: one line per CC refresh is chatter, not a state change.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if file_handler is not None:
        rotation = (
            f"rotated at {max_bytes / (1 << 20):.1f} MiB, {backups} backups"
            if max_bytes
            else "not rotated"
        )
        logging.getLogger("sdnsup").info("logging to %s (%s)", file_handler.path, rotation)
