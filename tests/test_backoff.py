"""sdnsup.backoff: the one doubling-with-a-cap policy, local (exact) and for the CC (its
ceiling, under full jitter); the daemon's restart policy built on it (on MockClock)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from sdnsup.backoff import Backoff, ceiling
from sdnsup.daemon import CRASH_WINDOW, RESTART_FIRST, RESTART_MAX, Restarts, supervised


def test_restart_and_retry_delays_double_up_to_their_cap_and_start_over_after_a_success():
    backoff = Backoff(0.5, 3.0)
    assert [backoff.take() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff.current == 3.0
    backoff.reset()
    assert backoff.take() == 0.5


def test_days_of_failures_stay_at_the_cap():
    assert ceiling(1.0, 60.0, 10_000) == 60.0  # no float overflow
    backoff = Backoff(1.0, 60.0)
    for _ in range(2000):
        backoff.take()
    assert backoff.current == 60.0


def test_a_task_that_keeps_crashing_is_given_up_after_five_crashes_in_five_minutes():
    restarts = Restarts()
    delays = [restarts.after(began=t, now=t + 1) for t in (0, 10, 20, 30)]
    assert delays == [1, 2, 4, 8]
    assert restarts.after(began=40, now=41) is None  # the fifth within CRASH_WINDOW


def test_crashes_spread_over_hours_never_exhaust_the_budget_and_restart_after_a_second():
    restarts = Restarts()
    for hour in range(1, 48):
        began = hour * 3600.0
        assert restarts.after(began=began, now=began + CRASH_WINDOW + 1) == RESTART_FIRST


def test_without_a_limit_restarts_go_on_forever_at_the_cap():
    restarts = Restarts(limit=None)
    delays = [restarts.after(began=t, now=t + 0.1) for t in range(100)]
    assert None not in delays and delays[-1] == RESTART_MAX


def test_supervised_restarts_a_crashing_task_then_ends_the_daemon_with_its_error(caplog):
    starts: list[float] = []

    async def crashing() -> None:
        starts.append(trio.current_time())
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError, match="bug"):
        trio.run(supervised, "probe", crashing, clock=trio.testing.MockClock(autojump_threshold=0))
    assert starts == [0, 1, 3, 7, 15]  # restarted after 1, 2, 4, 8 s; the fifth crash ends it
    assert "task probe crashed 5 times in 300 s, exiting" in caplog.text
