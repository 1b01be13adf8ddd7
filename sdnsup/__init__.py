"""sdnsup: steer chosen CIDRs through the fastest SDN access point, and keep it working."""

from sdnsup.applier import Applier, ApplyResult, KernelState, diff, render
from sdnsup.errors import (
    ConfigError,
    KernelError,
    LockError,
    NftError,
    PrivilegeError,
    RoutesError,
    SdnsupError,
)
from sdnsup.state import EMPTY, DesiredState, Settings

__version__ = "0.1.0"

__all__ = [
    "EMPTY",
    "Applier",
    "ApplyResult",
    "ConfigError",
    "DesiredState",
    "KernelError",
    "KernelState",
    "LockError",
    "NftError",
    "PrivilegeError",
    "RoutesError",
    "SdnsupError",
    "Settings",
    "__version__",
    "diff",
    "render",
]
