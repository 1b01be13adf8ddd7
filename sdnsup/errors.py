"""sdnsup's exception hierarchy.

Library errors (pyroute2, libnftables, httpx, OSError) are mapped into these at the module
boundary, ``raise X(...) from exc``, so callers handle one tree::

    SdnsupError
    ├── ConfigError          bad user input (CIDRs, flags, files); exit code 64 (EX_USAGE)
    ├── PrivilegeError       not root / no CAP_NET_ADMIN; nothing was touched
    ├── LockError            another sdnsup owns this network namespace
    ├── DiscoveryError       the CC could not be asked, or its answer was unusable
    │   └── BadAnswerError   the CC answered, but not with a valid AP list
    └── KernelError          a netlink or nftables operation failed
        ├── RoutesError      routes, nexthops, policy rules, sysctls
        ├── NftError         the nftables table
        └── ConntrackError   conntrack entries, socket destroy (sock_diag)

Every message is meant for an operator: it says what failed and what to do about it.
"""

from __future__ import annotations

EX_USAGE = 64
EX_NOPERM = 77
EX_TEMPFAIL = 75
EX_SOFTWARE = 70


class SdnsupError(Exception):
    """Base class of every error sdnsup raises on purpose."""

    exit_code: int = EX_SOFTWARE


class ConfigError(SdnsupError):
    """The user's input is invalid; nothing was applied."""

    exit_code = EX_USAGE


class PrivilegeError(SdnsupError):
    """sdnsup lacks CAP_NET_ADMIN; nothing was touched."""

    exit_code = EX_NOPERM


class LockError(SdnsupError):
    """Another sdnsup instance already runs in this network namespace."""

    exit_code = EX_TEMPFAIL


class DiscoveryError(SdnsupError):
    """Asking the CC for the AP list failed (connection, TLS, timeout, HTTP status).

    ``overloaded``: the CC said so itself (HTTP 429 or 503), ``retry_after``: the seconds its
    ``Retry-After`` header asked for (None: it did not); both mean "back off".
    """

    exit_code = EX_TEMPFAIL

    def __init__(
        self, message: str, *, overloaded: bool = False, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.overloaded = overloaded
        self.retry_after = retry_after


class BadAnswerError(DiscoveryError):
    """The CC answered with something that is not a valid AP list (untrusted input)."""


class KernelError(SdnsupError):
    """The kernel refused or failed an operation."""


class RoutesError(KernelError):
    """A route, nexthop, policy rule or sysctl operation failed."""


class NftError(KernelError):
    """An nftables transaction failed."""


class ConntrackError(KernelError):
    """Reading or changing conntrack entries, or destroying sockets, failed."""
