"""sdnsup: steer chosen CIDRs through the fastest SDN access point, and keep it working."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Re-exported lazily (PEP 562): ``sdnsup status`` imports this package and must not pay for
# the applier, libnftables and netlink it never uses.
_EXPORTS = {
    "Applier": "sdnsup.applier",
    "ApplyResult": "sdnsup.applier",
    "KernelState": "sdnsup.applier",
    "diff": "sdnsup.applier",
    "render": "sdnsup.applier",
    "ConfigError": "sdnsup.errors",
    "KernelError": "sdnsup.errors",
    "LockError": "sdnsup.errors",
    "NftError": "sdnsup.errors",
    "PrivilegeError": "sdnsup.errors",
    "RoutesError": "sdnsup.errors",
    "SdnsupError": "sdnsup.errors",
    "EMPTY": "sdnsup.state",
    "DesiredState": "sdnsup.state",
    "Settings": "sdnsup.state",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sdnsup' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
