"""The keepalive racer on trio's MockClock: when a dead AP is declared dead, and that a lost
probe now and then never is a death."""

from __future__ import annotations

import ipaddress

import pytest
import trio
import trio.testing

from sdnsup.aps import AccessPoint
from sdnsup.errors import SdnsupError
from sdnsup.keepalive import Death, watch

AP = AccessPoint("ap1", addr4=ipaddress.IPv4Address("10.77.0.11"))
RTT = 0.002


class FakeAp:
    """Answers after RTT until ``dies_at``; drops the probes whose numbers are in ``lost``."""

    def __init__(self, dies_at: float = float("inf"), lost: frozenset[int] = frozenset()):
        self.dies_at = dies_at
        self.lost = lost
        self.sent = 0
        self.last_answer = 0.0

    async def probe(self, ap: AccessPoint, *, timeout: float) -> float:
        self.sent += 1
        if trio.current_time() >= self.dies_at or self.sent in self.lost:
            await trio.sleep(timeout)
            raise SdnsupError(f"{ap.id}: no answer within {timeout * 1000:.0f} ms")
        await trio.sleep(RTT)
        self.last_answer = trio.current_time()
        return RTT


def run_watch(fake: FakeAp, until: float, **kw: float) -> tuple[Death | None, float]:
    """``watch`` for at most ``until`` virtual seconds: its verdict (None: none) and when."""
    out: list[tuple[Death | None, float]] = []

    async def main() -> None:
        with trio.move_on_after(until):
            death = await watch(AP, fake.probe, **kw)  # type: ignore[arg-type]
            out.append((death, trio.current_time()))
            return
        out.append((None, trio.current_time()))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return out[0]


def test_with_the_defaults_a_dead_ap_is_declared_dead_within_a_second_of_failing() -> None:
    fake = FakeAp(dies_at=5.0)
    death, at = run_watch(fake, 60)
    assert death is not None and death.ap == AP and death.misses == 3
    assert "no answer within 200 ms" in death.last_error
    # 0.6-0.8 s after the failure (where in the probe cycle it fell), 0.8 s after the last
    # answer, as the module documents
    assert 0.6 <= at - 5.0 <= 0.8 + 1e-6
    assert death.detection == pytest.approx(at - fake.last_answer, abs=1e-6)
    assert death.detection <= 0.8 + 1e-6


def test_the_most_aggressive_settings_decide_within_150_ms() -> None:
    fake = FakeAp(dies_at=5.0)
    death, at = run_watch(fake, 60, interval=0.05, probe_timeout=0.05, misses=2)
    assert death is not None and death.misses == 2
    assert at - 5.0 <= 0.15 + 1e-6


def test_a_lost_probe_now_and_then_is_never_a_death() -> None:
    # every third probe lost for a minute (300 probes): misses never reach 3 in a row
    fake = FakeAp(lost=frozenset(range(3, 400, 3)))
    death, _ = run_watch(fake, 60)
    assert death is None and fake.sent >= 250


def test_two_misses_then_an_answer_start_the_count_again() -> None:
    lost = frozenset(n for n in range(1, 400) if n % 3)  # miss, miss, answer, ...
    death, _ = run_watch(FakeAp(lost=lost), 60)
    assert death is None
    death, _ = run_watch(FakeAp(lost=lost), 60, misses=2)
    assert death is not None and death.misses == 2


def test_every_good_rtt_is_reported() -> None:
    rtts: list[float] = []
    fake = FakeAp(dies_at=1.0)
    death, _ = run_watch(fake, 10, on_rtt=rtts.append)  # type: ignore[arg-type]
    assert death is not None
    assert rtts == [RTT] * 5  # t = 0, 0.2, 0.4, 0.6, 0.8: five answers before it died
