"""Fixtures and policies for the integration tests (network-namespace labs).

* Tests marked ``netns`` (and every use of the lab fixtures) are *skipped*, with the reason,
  when this machine cannot build a lab: not root, no ``ip``/``nft``, or ``ip netns`` failing.
* With ``CI=true`` in the environment, any skipped test under ``integration/`` fails the run:
  on CI a skipped integration test means the lab silently did not run.
* ``make_lab(**kw)`` builds labs that are always torn down; when the test failed, the logs of
  every process the lab ran are printed in the teardown section of the report. (Each build
  also removes the namespaces of labs whose test process was SIGKILLed.)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sdnsup.lab import Lab, unavailable_reason

INTEGRATION_DIR = Path(__file__).resolve().parent

# Node ids of the integration tests (or modules) skipped in this session.
_skipped: list[str] = []
_rootpath: Path | None = None


@functools.cache
def _lab_unavailable() -> str | None:
    """Why labs cannot run here (computed once per session), None if they can."""
    return unavailable_reason()


def _in_integration(nodeid: str) -> bool:
    """Whether a node id (relative to the rootdir) names something under integration/."""
    if not nodeid or _rootpath is None:
        return False
    return (_rootpath / nodeid.split("::", 1)[0]).resolve().is_relative_to(INTEGRATION_DIR)


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


# --- skipping where labs cannot run -----------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    # Historic hook: also called when this conftest is only loaded during collection.
    global _rootpath
    _rootpath = config.rootpath
    _skipped.clear()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("netns") is not None:
        reason = _lab_unavailable()
        if reason:
            pytest.skip(reason)


# --- on CI, a skipped integration test fails the run -------------------------------------------


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and _in_integration(report.nodeid):
        _skipped.append(report.nodeid)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped and _in_integration(report.nodeid):
        _skipped.append(report.nodeid)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _ci() and _skipped and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if _ci() and _skipped:
        terminalreporter.section("integration tests skipped on CI", sep="=", red=True)
        terminalreporter.line(
            f"CI=true and {len(_skipped)} integration test(s) were skipped; on CI every "
            "integration test must run, so this run FAILS:"
        )
        for nodeid in _skipped:
            terminalreporter.line(f"  SKIPPED {nodeid}")


# --- lab fixtures -----------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Remember each phase's report on the item, so fixtures know whether the test failed."""
    report = yield
    setattr(item, f"_lab_report_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(getattr(request.node, f"_lab_report_{when}", None), "failed", False)
        for when in ("setup", "call")
    )


@pytest.fixture
def make_lab(request: pytest.FixtureRequest) -> Iterator[Callable[..., Lab]]:
    """Factory: ``make_lab(n_aps=2, ap_link="shared", container=False, ...)`` -> a live Lab.

    Every lab it built is torn down after the test, whatever happened; if the test failed,
    the logs of the lab's processes (sdnsup, whoami...) are printed first.
    """
    reason = _lab_unavailable()
    if reason:
        pytest.skip(reason)
    labs: list[Lab] = []

    def factory(**kwargs: Any) -> Lab:
        lab = Lab.up(**kwargs)
        labs.append(lab)
        return lab

    try:
        yield factory
    finally:
        for lab in labs:
            if _failed(request) and lab.is_up:
                print(f"\n----- logs of lab {lab.prefix} -----\n{lab.all_logs()}")
            lab.down()


@pytest.fixture
def lab(make_lab: Callable[..., Lab]) -> Lab:
    """A default lab: two APs sharing A's LAN, no container."""
    return make_lab()
