"""Shared checks for integration tests that run the real sdnsup process in a lab."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sdnsup.lab import Lab
from sdnsup.lab import wait_for as lab_wait_for
from sdnsup.lab.measure import owns
from sdnsup.routes import RTPROT_SDNSUP

T = TypeVar("T")

# Generous limits: tests check behaviour, benchmarks measure speed.
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


def wait_for(predicate: Callable[[], T], timeout: float, what: str, step: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy (bounded in time)."""
    return lab_wait_for(what, timeout, predicate, step)


def start_sdnsup(
    lab: Lab, *args: str, ns: str | None = None, wrapper: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """Start sdnsup in A (or ``ns``) and wait until its first apply is logged."""
    proc = lab.run_sdnsup(ns or lab.ns_a, *args, wrapper=wrapper)

    def applied() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"sdnsup exited {proc.returncode}:\n{lab.logs(proc)}")
        return "applied:" in lab.logs(proc)

    wait_for(applied, START_TIMEOUT, "sdnsup to apply its state")
    return proc


def stop_sdnsup(lab: Lab, proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, and the exit code (sdnsup must exit on its own within STOP_TIMEOUT)."""
    proc.terminate()
    try:
        return proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"sdnsup ignored SIGTERM:\n{lab.logs(proc)}") from None


def _json(lab: Lab, ns: str, *argv: str) -> Any:
    out = lab.exec(ns, *argv).stdout.strip()
    return json.loads(out) if out else []


def owned(lab: Lab, ns: str | None = None) -> dict[str, Any]:
    """Everything in the kernel of ``ns`` (default A) that carries sdnsup's marks."""
    ns = ns or lab.ns_a
    proto = str(RTPROT_SDNSUP)
    rules = [
        r
        for fam in ("-4", "-6")
        for r in _json(lab, ns, "ip", "-j", fam, "rule", "show")
        if owns(r)
    ]
    routes = [
        r
        for fam in ("-4", "-6")
        for r in _json(lab, ns, "ip", "-j", fam, "route", "show", "table", "all", "proto", proto)
    ]
    nexthops = [n for n in _json(lab, ns, "ip", "-j", "nexthop", "show") if owns(n)]
    tables = [
        o["table"]["name"]
        for o in _json(lab, ns, "nft", "-j", "list", "tables")["nftables"]
        if "table" in o and o["table"]["name"] == "sdnsup"
    ]
    return {"rules": rules, "routes": routes, "nexthops": nexthops, "tables": tables}


def sysctl(lab: Lab, ns: str, key: str) -> int:
    return int(lab.exec(ns, "sysctl", "-n", key).stdout.strip())
