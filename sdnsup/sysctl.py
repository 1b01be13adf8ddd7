"""The few sysctls sdnsup changes, each only where it must, always restored.

``src_valid_mark`` on the AP's interface, set only when strict ``rp_filter`` needs it. With
strict reverse-path filtering (``rp_filter=1``) the kernel checks a reply's source against the
route *it* would use, and it ignores the packet mark unless ``src_valid_mark=1``. Replies from
the AP carry sdnsup's mark (restored from the ct mark in prerouting), so when the AP's
interface is not the one the main table uses for the remote host, strict rp_filter drops them.
sdnsup sets ``src_valid_mark=1`` on that one interface (never on ``all``: that would change
rp_filter's meaning for every interface of the host).

``net.ipv4.nexthop_compat_mode=0`` (it covers IPv6 too) while sdnsup steers, unless other
software in the namespace uses nexthop objects. In compat mode (the default, 1) replacing a
nexthop makes the kernel walk every route using it and send one RTM_NEWROUTE per route:
with 100k CIDRs an AP switch costs 100-140 ms of kernel time instead of about 1 ms. Mode 0
changes only how routes *that use nexthop objects* are dumped and notified (by nexthop id,
without the expanded gateway), so when sdnsup's routes are the only such routes nobody else
sees a difference.

Originals are kept in a small file under ``/run/sdnsup`` so a process restarted after
``kill -9`` still restores what its predecessor changed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
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


NEXTHOP_COMPAT_MODE = "net/ipv4/nexthop_compat_mode"


def valid_mark_key(ifname: str) -> str:
    return f"net/ipv4/conf/{ifname}/src_valid_mark"


def _key(ifname: str, name: str) -> str:
    return f"net/ipv4/conf/{ifname}/{name}"


def strict_rp_filter(backend: SysctlBackend, ifname: str) -> bool:
    """True if reverse-path filtering on ``ifname`` is strict.

    The kernel uses max(conf/all, conf/IFNAME): 1 is strict, 2 loose (loose mode only asks
    whether the source is reachable at all, so it never needs src_valid_mark).
    """
    values = [backend.read(_key("all", "rp_filter")), backend.read(_key(ifname, "rp_filter"))]
    return max(v or 0 for v in values) == 1


class SysctlGuard:
    """Owns the sysctls sdnsup changed: sets what is wanted, restores the rest."""

    def __init__(self, backend: SysctlBackend, record: Path | None) -> None:
        self._backend = backend
        self._record = record
        self._saved: dict[str, int] = self._load()

    @property
    def changed(self) -> dict[str, int]:
        """Sysctl keys sdnsup changed, with their original values."""
        return dict(self._saved)

    def _load(self) -> dict[str, int]:
        if self._record is None:
            return {}
        try:
            data = json.loads(self._record.read_text())
            # Records of older versions held interface names (src_valid_mark only).
            return {
                (str(k) if "/" in str(k) else valid_mark_key(str(k))): int(v)
                for k, v in data.items()
            }
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

    def ensure(self, wanted: Mapping[str, int]) -> int:
        """Make exactly ``wanted`` hold among the keys sdnsup manages; return the writes.

        Keys in ``wanted`` get their value (the original is remembered the first time);
        keys sdnsup changed earlier that are no longer wanted get their original back.
        A key the kernel does not have (an interface that went away) is skipped.
        """
        writes = 0
        dirty = False
        for key, value in sorted(wanted.items()):
            current = self._backend.read(key)
            if current is None or current == value:
                continue
            self._saved.setdefault(key, current)
            dirty = True
            self._backend.write(key, value)
            log.info("set %s=%d (was %d)%s", _dotted(key), value, current, _why(key))
            writes += 1
        for key in sorted(set(self._saved) - set(wanted)):
            original = self._saved.pop(key)
            dirty = True
            if self._backend.read(key) not in (None, original):
                self._backend.write(key, original)
                log.info("restored %s=%d", _dotted(key), original)
                writes += 1
        if dirty:
            self._store()
        return writes


def _dotted(key: str) -> str:
    return key.replace("/", ".")


def _why(key: str) -> str:
    if key == NEXTHOP_COMPAT_MODE:
        return (
            ": an AP switch re-points sdnsup's routes without a kernel notification per route;"
            " no other software in this namespace uses nexthop objects"
        )
    if key.endswith("/src_valid_mark"):
        return ": strict rp_filter there would drop the AP's marked replies"
    return ""
