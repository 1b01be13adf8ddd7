"""``src_valid_mark`` on the AP's interface, set only when strict ``rp_filter`` needs it.

With strict reverse-path filtering (``rp_filter=1``) the kernel checks a reply's source against
the route *it* would use, and it ignores the packet mark unless ``src_valid_mark=1``. Replies
from the AP carry sdnsup's mark (restored from the ct mark in prerouting), so when the AP's
interface is not the one the main table uses for the remote host, strict rp_filter drops them.
sdnsup sets ``src_valid_mark=1`` on that one interface (never on ``all``: that would change
rp_filter's meaning for every interface of the host) and restores the old value on teardown.

Originals are kept in a small file under ``/run/sdnsup`` so a process restarted after
``kill -9`` still restores what its predecessor changed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from sdnsup.errors import RoutesError

log = logging.getLogger(__name__)


class SysctlBackend(Protocol):
    def read(self, key: str) -> int | None:
        """The value of ``key`` (``net/ipv4/conf/eth0/rp_filter``), None if it does not exist."""
        ...

    def write(self, key: str, value: int) -> None: ...


class ProcSysctl:
    """:class:`SysctlBackend` on ``/proc/sys``, which shows the caller's network namespace."""

    def __init__(self, root: Path = Path("/proc/sys")) -> None:
        self._root = root

    def read(self, key: str) -> int | None:
        try:
            return int((self._root / key).read_text().split()[0])
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise RoutesError(f"cannot read sysctl {key}: {exc}") from exc

    def write(self, key: str, value: int) -> None:
        try:
            (self._root / key).write_text(f"{value}\n")
        except OSError as exc:
            raise RoutesError(f"cannot write sysctl {key}={value}: {exc}") from exc


def _key(ifname: str, name: str) -> str:
    return f"net/ipv4/conf/{ifname}/{name}"


def strict_rp_filter(backend: SysctlBackend, ifname: str) -> bool:
    """True if reverse-path filtering on ``ifname`` is strict.

    The kernel uses max(conf/all, conf/IFNAME): 1 is strict, 2 loose (loose mode only asks
    whether the source is reachable at all, so it never needs src_valid_mark).
    """
    values = [backend.read(_key("all", "rp_filter")), backend.read(_key(ifname, "rp_filter"))]
    return max(v or 0 for v in values) == 1


class ValidMarkGuard:
    """Owns ``src_valid_mark`` on the interfaces sdnsup needs it on, and restores the rest."""

    def __init__(self, backend: SysctlBackend, record: Path | None) -> None:
        self._backend = backend
        self._record = record
        self._saved: dict[str, int] = self._load()

    @property
    def changed(self) -> dict[str, int]:
        """Interfaces sdnsup changed, with their original values."""
        return dict(self._saved)

    def _load(self) -> dict[str, int]:
        if self._record is None:
            return {}
        try:
            data = json.loads(self._record.read_text())
            return {str(k): int(v) for k, v in data.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("ignoring unreadable sysctl record %s: %s", self._record, exc)
            return {}

    def _store(self) -> None:
        if self._record is None:
            return
        if not self._saved:
            self._record.unlink(missing_ok=True)
            return
        self._record.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self._record.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self._saved, f)
        tmp.replace(self._record)

    def ensure(self, ifnames: Iterable[str]) -> int:
        """Make ``src_valid_mark=1`` hold exactly where needed; return the number of writes.

        Interfaces in ``ifnames`` get 1 (original remembered); interfaces sdnsup changed
        earlier that are no longer in ``ifnames`` get their original value back.
        """
        wanted = set(ifnames)
        writes = 0
        for ifname in sorted(wanted):
            current = self._backend.read(_key(ifname, "src_valid_mark"))
            if current is None or current == 1:
                continue
            self._saved.setdefault(ifname, current)
            self._backend.write(_key(ifname, "src_valid_mark"), 1)
            log.info("set src_valid_mark=1 on %s (strict rp_filter, was %d)", ifname, current)
            writes += 1
        for ifname in sorted(set(self._saved) - wanted):
            original = self._saved.pop(ifname)
            if self._backend.read(_key(ifname, "src_valid_mark")) not in (None, original):
                self._backend.write(_key(ifname, "src_valid_mark"), original)
                log.info("restored src_valid_mark=%d on %s", original, ifname)
                writes += 1
        self._store()
        return writes
