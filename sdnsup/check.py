"""``sdnsup check``: validate everything ``run`` would use, start nothing (like ``nginx -t``).

It reads the same sources as ``run`` (flags, ``SDNSUP_*``, the config file) through the same
:func:`sdnsup.config.resolve`, reads the CIDR files and the CC token file, and, with
CAP_NET_ADMIN, looks in the kernel for other tools' objects where ``run`` would write:
policy rules at its priorities or looking up its tables, the routes it would write, nexthops
with its ids (:meth:`sdnsup.applier.Applier.foreign_objects`). sdnsup never overwrites or
deletes those, so ``run`` would refuse to start; ``check`` says so first.
"""

from __future__ import annotations

from collections.abc import Callable

from sdnsup.config import RunOptions
from sdnsup.errors import PrivilegeError
from sdnsup.state import PRIORITY_SPAN

__all__ = ["check"]


def check(
    opts: RunOptions,
    *,
    read_token: Callable[[RunOptions], object],
    kernel_conflicts: Callable[[RunOptions], list[str]] | None,
) -> list[str]:
    """What ``run`` would do with ``opts``, one line each, for the operator.

    Args:
        opts: the resolved options (already validated by :func:`~sdnsup.config.resolve`).
        read_token: reads the CC token as ``run`` does (raises ConfigError when it cannot).
        kernel_conflicts: other tools' objects in sdnsup's kernel space, described; None
            when the kernel cannot be read (no CAP_NET_ADMIN): said, not an error.

    Raises:
        ConfigError: the token file cannot be read, or other tools' objects sit where
            ``run`` would write (every one named; :func:`sdnsup.applier.foreign_error`).
    """
    s = opts.settings
    lines = [
        f"configuration: {opts.config or 'no file'}; {opts.describe() or 'all defaults'}",
        f"CIDRs: {opts.cidrs.report} ({len(opts.cidrs.v4)} IPv4 + {len(opts.cidrs.v6)} IPv6)",
    ]
    if opts.cc is not None:
        read_token(opts)
        token = f", token from {opts.cc_token_file}" if opts.cc_token_file else ""
        lines.append(f"APs: from the CC {opts.cc}{token}")
    else:
        lines.append("APs: " + ", ".join(ap.id for ap in opts.aps))
    space = (
        f"mark {s.mark:#x}/{s.mask:#x}, tables {s.table}-{s.probe_table}, "
        f"priorities {s.priority - PRIORITY_SPAN}-{s.priority}"
    )
    if kernel_conflicts is None:
        lines.append(f"kernel: {space}: not checked (needs CAP_NET_ADMIN: run as root)")
    else:
        from sdnsup.applier import foreign_error

        conflicts = kernel_conflicts(opts)
        if conflicts:
            raise foreign_error(s, conflicts)
        lines.append(f"kernel: {space}: no other tool's objects there")
    lines.extend(f"warning: {w}" for w in opts.warnings)
    return lines


def can_read_kernel() -> bool:
    """Whether this process may read the kernel objects check looks at (CAP_NET_ADMIN)."""
    from sdnsup.preflight import check_privileges

    try:
        check_privileges()
    except PrivilegeError:
        return False
    return True
