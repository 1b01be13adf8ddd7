"""The saved AP list: the last good CC answer, kept on disk so a restart needs no CC first.

A fleet that restarts together (a power event, a deploy) would otherwise send the CC one
request per host in the same second, and every host would stay dark until its answer came.
With the list saved, a host steers at once from it and asks the CC later, spread over a ttl
(:mod:`sdnsup.refresh`).

The file is ``STATE_DIR/aps.json`` for the host's own network namespace and
``STATE_DIR/aps-NAME.json`` for a named one (``ip netns``; an unnamed namespace other than
the host's uses its inode, the best it has), so several instances on one host never share
one. It holds the CC's URL, when the answer came (wall clock) and the answer itself::

    {"version": 1, "cc": "https://cc.example.net", "fetched_at": 1764645000.0,
     "answer": {"aps": [...], "ttl": 60}}

Trust: the answer steers this host's traffic, so the directory is created 0700 and the file
written 0600, atomically (a temporary file, fsync, rename: a power loss leaves the old list
or the new one, never half of one). On load the file must belong to this user and be
writable by nobody else, name the same CC URL, and its answer passes the same validation
as a fresh one (:func:`sdnsup.discovery.parse_answer`). Anything else is refused with a
warning and the CC is asked at once, as on a first boot. A list of any age is used (during a
CC outage an old list beats none); ``status`` shows how old it is.

Errors::

    SdnsupError
    └── SavedListError   the file could not be written (or read: then the CC is asked)
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sdnsup.defaults import DEFAULT_STATE_DIR
from sdnsup.discovery import Directory, parse_answer
from sdnsup.errors import BadAnswerError, SdnsupError
from sdnsup.preflight import netns_suffix

__all__ = ["DEFAULT_STATE_DIR", "FORMAT_VERSION", "SavedList", "SavedListError", "path_for"]

FORMAT_VERSION = 1
# The saved answer was at most MAX_ANSWER_BYTES as received; its JSON re-encoding plus the
# envelope stays well inside this.
MAX_FILE_BYTES = 4 << 20
# init_net's inode since Linux 6.x (PROC_NET_INIT_INO); older kernels number it at boot, and
# /proc/1/ns/net tells (when it can be read: not under hidepid or in some sandboxes).


class SavedListError(SdnsupError):
    """The saved AP list could not be read or written."""


def path_for(state_dir: Path) -> Path:
    """The saved list's file for this process's network namespace."""
    return state_dir / f"aps{netns_suffix()}.json"


@dataclass(frozen=True, slots=True)
class SavedList:
    """A CC answer read back from disk: the directory, the CC that sent it, and when."""

    directory: Directory
    cc: str
    fetched_at: float  # wall clock

    @classmethod
    def load(cls, path: Path, cc: str) -> SavedList | None:
        """The list saved at ``path`` for CC ``cc``; None when there is none.

        Raises:
            SavedListError: the file exists but cannot be used (unsafe permissions, another
                CC, not a valid list); the message says which and what to do.
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SavedListError(f"saved AP list {path}: {exc.strerror}") from exc
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(file.fileno())
            if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise SavedListError(
                    f"saved AP list {path}: not trusted (owner uid {info.st_uid}, mode "
                    f"{stat.S_IMODE(info.st_mode):04o}; it must belong to uid {os.geteuid()} "
                    "and be writable by nobody else); delete it"
                )
            data = file.read(MAX_FILE_BYTES + 1)
        where = f"saved AP list {path}"
        if len(data) > MAX_FILE_BYTES:
            raise SavedListError(f"{where}: larger than {MAX_FILE_BYTES} bytes; delete it")
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SavedListError(f"{where}: not JSON ({exc}); delete it") from exc
        if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
            raise SavedListError(f"{where}: not a version {FORMAT_VERSION} saved list")
        if doc.get("cc") != cc:
            raise SavedListError(
                f"{where}: it came from CC {doc.get('cc')!r}, not {cc}; it is replaced by the "
                "first answer of this one"
            )
        fetched_at = doc.get("fetched_at")
        if not isinstance(fetched_at, int | float) or isinstance(fetched_at, bool):
            raise SavedListError(f"{where}: fetched_at is not a time")
        try:
            directory = parse_answer(json.dumps(doc.get("answer")).encode())
        except BadAnswerError as exc:
            raise SavedListError(f"{where}: not a valid AP list: {exc}") from exc
        return cls(directory, cc, float(fetched_at))

    def save(self, path: Path) -> None:
        """Write the list to ``path`` (directory 0700, file 0600, atomically).

        Raises:
            SavedListError: the directory or file could not be written.
        """
        doc = {
            "version": FORMAT_VERSION,
            "cc": self.cc,
            "fetched_at": self.fetched_at,
            "answer": json.loads(self.directory.raw),
        }
        data = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as file:  # mkstemp makes it 0600
                    file.write(data)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise SavedListError(
                f"cannot save the AP list to {path}: {exc.strerror or exc} (a restart will ask "
                "the CC before steering)"
            ) from exc
