"""sdnsup.backoff: the one doubling-with-a-cap policy, local (exact) and for the CC (its
ceiling, under full jitter)."""

from __future__ import annotations

from sdnsup import discovery
from sdnsup.backoff import Backoff, ceiling
from sdnsup.daemon import RESTART_FIRST, RESTART_MAX


def test_restart_and_retry_delays_double_up_to_their_cap_and_start_over_after_a_success():
    backoff = Backoff(0.5, 3.0)
    assert [backoff.take() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff.current == 3.0
    backoff.reset()
    assert backoff.take() == 0.5


def test_a_crashing_task_is_restarted_after_1_2_4_8_16_then_every_30_seconds():
    restarts = Backoff(RESTART_FIRST, RESTART_MAX)
    assert [restarts.take() for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]


def test_the_cc_retries_are_drawn_under_the_same_curve_capped_at_a_minute():
    assert [discovery.backoff_ceiling(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert discovery.backoff_ceiling(5) == ceiling(1.0, 60.0, 5)


def test_days_of_failures_stay_at_the_cap():
    assert ceiling(1.0, 60.0, 10_000) == 60.0  # no float overflow
    backoff = Backoff(1.0, 60.0)
    for _ in range(2000):
        backoff.take()
    assert backoff.current == 60.0
