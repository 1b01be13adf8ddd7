"""When sdnsup asks the CC (sdnsup.refresh): one host's schedule, and a fleet's spread."""

from __future__ import annotations

import random
import statistics

import pytest

from sdnsup.discovery import BACKOFF_CAP
from sdnsup.refresh import Outcome, RefreshSchedule

TTL = 60.0
OK, FAILED = Outcome(True), Outcome(False)


def schedule(seed: int = 1) -> RefreshSchedule:
    return RefreshSchedule(TTL, random.Random(seed))


def fleet(n: int = 4000) -> list[RefreshSchedule]:
    return [schedule(i) for i in range(n)]


def test_start_with_a_saved_list_spreads_like_a_running_timer():
    delays = []
    for s in fleet():
        s.start(1000.0, saved=True)
        delays.append(s.due - 1000.0)
    assert 0 <= min(delays) and max(delays) <= 1.2 * TTL
    # residual life of U(0.8, 1.2) x ttl periods: mean E[T^2] / (2 E[T]) = 0.5067 ttl
    assert statistics.mean(delays) == pytest.approx(0.5067 * TTL, rel=0.03)
    # no second of the first ttl gets more than ~1.25x the steady rate N/ttl
    per_second = [sum(1 for d in delays if t <= d < t + 1) for t in range(int(TTL))]
    assert max(per_second) < 1.4 * len(delays) / TTL


def test_the_first_refresh_after_asking_at_start_is_spread_over_a_ttl():
    delays = []
    for s in fleet():
        s.start(0.0, saved=False)
        delays.append(s.due)
    assert 0.5 * TTL <= min(delays) and max(delays) <= 1.5 * TTL


def test_periodic_refresh_is_the_jittered_ttl():
    s = schedule()
    s.start(0.0, saved=False)
    now = s.due
    assert s.fire(now) == "periodic"
    s.done(now, OK, has_ap=True)
    assert 0.8 * TTL <= s.due - now <= 1.2 * TTL


def test_a_failure_with_a_working_ap_waits_the_normal_period():
    for i in range(200):
        s = schedule(i)
        s.start(0.0, saved=False)
        now = s.due
        s.fire(now)
        s.done(now, FAILED, has_ap=True)
        assert 0.8 * TTL <= s.due - now <= 1.2 * TTL


def test_without_an_ap_failures_back_off_fast_with_full_jitter():
    s = schedule()
    s.start(0.0, saved=False)
    now = s.due
    ceilings = []
    for _ in range(10):
        s.fire(now)
        s.done(now, FAILED, has_ap=False)
        ceilings.append(s.due - now)
        now = s.due
    assert ceilings[0] <= 1.0 and ceilings[1] <= 2.0 and ceilings[2] <= 4.0
    assert max(ceilings) <= BACKOFF_CAP


def test_the_cc_saying_back_off_is_obeyed_even_without_an_ap():
    for i in range(100):
        s = schedule(i)
        s.start(0.0, saved=False)
        now = s.due
        s.fire(now)
        s.done(now, Outcome(False, overloaded=True), has_ap=False)
        assert s.due - now >= 0.8 * TTL  # not the 1 s first step of the backoff
        fired = s.due
        s.fire(fired)
        s.done(fired, Outcome(False, overloaded=True, retry_after=300.0), has_ap=False)
        assert 300.0 <= s.due - fired <= 360.0


def test_retry_after_is_never_undercut_and_spread_a_little():
    waits = []
    for i in range(500):
        s = schedule(i)
        s.start(0.0, saved=False)
        now = s.due
        s.fire(now)
        s.done(now, Outcome(False, overloaded=True, retry_after=120.0), has_ap=True)
        waits.append(s.due - now)
    assert min(waits) >= 120.0 and max(waits) <= 144.0
    assert max(waits) - min(waits) > 15.0  # not all at the same instant


def test_an_ap_death_asks_for_at_most_one_extra_refresh_and_keeps_the_period():
    s = schedule()
    s.start(0.0, saved=False)
    s.fire(s.due)
    s.done(s.due, OK, has_ap=True)
    periodic = s.due
    now = periodic - 0.9 * TTL  # the periodic one is far: an extra one is due
    s.ap_died(now)
    extra = s.extra_due
    assert extra is not None and now <= extra <= now + TTL / 2
    s.ap_died(now + 1)  # a second death before it: still one
    assert s.extra_due == extra and s.due == extra
    assert s.fire(extra) == "extra"
    s.done(extra, OK, has_ap=True)
    assert s.due == periodic  # the periodic schedule did not move


def test_no_extra_refresh_when_the_periodic_one_comes_within_half_a_ttl():
    s = schedule()
    s.start(0.0, saved=False)
    periodic = s.due
    s.ap_died(periodic - 0.4 * TTL)
    assert s.extra_due is None and s.due == periodic


def test_extra_refreshes_after_a_death_stay_under_twice_the_steady_rate():
    # half the fleet's AP dies: their extra requests plus everyone's periodic ones
    n, died_at = 6000, 10_000.0
    requests: list[float] = []
    for i in range(n):
        s = schedule(i)
        s.start(died_at - 3 * TTL, saved=True)
        while True:
            if i % 2 == 0 and s.due > died_at and s.extra_due is None and not hasattr(s, "hit"):
                s.hit = True  # type: ignore[attr-defined]
                s.ap_died(died_at)
            if s.due > died_at + 2 * TTL:
                break
            now = s.due
            s.fire(now)
            if now >= died_at:
                requests.append(now)
            s.done(now, OK, has_ap=True)
    per_second = [0] * int(2 * TTL)
    for t in requests:
        per_second[int(t - died_at)] += 1
    steady = n / TTL
    assert max(per_second) < 2.0 * steady
    assert max(per_second) > 1.2 * steady  # the extra requests did happen


def test_losing_every_ap_asks_soon_once():
    s = schedule()
    s.start(0.0, saved=False)
    s.fire(s.due)
    s.done(s.due, OK, has_ap=True)
    now = s.due - 0.9 * TTL
    s.no_ap(now)
    assert now <= s.due <= now + 1.0
