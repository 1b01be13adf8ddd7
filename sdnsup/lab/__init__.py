"""A network-namespace lab for sdnsup's integration tests and demo.

``with Lab.create(n_aps=2, ap_link="shared", container=False) as lab:`` builds client A,
underlay router R, remote host B and access points in their own namespaces (see
:mod:`sdnsup.lab.topology`), runs processes in them (:mod:`sdnsup.lab.processes`: sdnsup
itself, whoami servers, AP probe agents, the CC) and removes everything afterwards
(:mod:`sdnsup.lab.teardown`). It never touches the root network namespace.

Run ``python -m sdnsup.lab --help`` for the demo command line.
"""

from __future__ import annotations

from sdnsup.lab.commands import CommandError, LabError, WaitTimeout, wait_for
from sdnsup.lab.processes import Lab
from sdnsup.lab.services import Session
from sdnsup.lab.teardown import cleanup, cleanup_stale, list_namespaces
from sdnsup.lab.topology import AccessPoint, running_as_root, unavailable_reason

__all__ = [
    "AccessPoint",
    "CommandError",
    "Lab",
    "LabError",
    "Session",
    "WaitTimeout",
    "cleanup",
    "cleanup_stale",
    "list_namespaces",
    "running_as_root",
    "unavailable_reason",
    "wait_for",
]
