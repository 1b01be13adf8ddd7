"""Path health: the passive detector on recorded conntrack polls, targets, comparisons."""

from __future__ import annotations

import ipaddress
import socket

import pytest
import trio
import trio.testing

from sdnsup.aps import Target, parse_target, parse_targets
from sdnsup.conntrack import Entry
from sdnsup.discovery import parse_answer
from sdnsup.errors import BadAnswerError, ConfigError
from sdnsup.paths import PassiveDetector, compare

A = ipaddress.ip_address


def attempt(dst: str, sport: int, proto: int = socket.IPPROTO_TCP, dport: int = 443) -> Entry:
    return Entry(socket.AF_INET, proto, A("172.31.1.2"), A(dst), sport, dport, 0x2002,
                 1 if proto == socket.IPPROTO_TCP else None, replied=False)  # fmt: skip


def replay(detector: PassiveDetector, polls: list[tuple[float, list[Entry]]]) -> list[float]:
    """Feed recorded polls (time, unanswered entries); the times a suspicion was raised."""
    return [t for t, entries in polls if detector.observe(entries, t)]


def test_an_attempt_counts_once_it_waited_a_second_and_three_destinations_raise_it():
    a, b, c = attempt("10.0.0.1", 1), attempt("10.0.0.2", 2), attempt("10.0.0.3", 3)
    polls = [(0.0, [a]), (0.5, [a, b]), (1.0, [a, b, c]), (1.5, [a, b, c]), (2.0, [a, b, c])]
    assert replay(PassiveDetector(), polls) == [2.0]  # c first seen at 1.0, unanswered at 2.0


def test_answered_attempts_leave_the_list_and_never_count():
    a, b, c = attempt("10.0.0.1", 1), attempt("10.0.0.2", 2), attempt("10.0.0.3", 3)
    # each is answered (leaves the unanswered list) within half a second
    polls = [(0.0, [a]), (0.5, [b]), (1.0, [c]), (1.5, []), (2.0, [a, b, c]), (2.5, [])]
    assert replay(PassiveDetector(), polls) == []


def test_many_attempts_to_one_destination_are_one_dead_destination():
    polls = [(t * 0.5, [attempt("10.0.0.9", p) for p in range(int(t) + 1)]) for t in range(60)]
    assert replay(PassiveDetector(), polls) == []


def test_failures_must_fall_within_the_window():
    d = PassiveDetector(window=10.0)
    for i, t in enumerate((0.0, 8.0, 16.0)):  # one new dead destination every 8 s
        e = attempt(f"10.0.0.{i}", i)
        assert d.observe([e], t) is None
        assert d.observe([], t + 1.5) is None  # gone (timed out) before the next
    # within 10 s: suspicion; the evidence names the TCP port to probe
    d2 = PassiveDetector(window=10.0)
    es = [attempt(f"10.0.1.{i}", i, dport=22) for i in range(3)]
    d2.observe(es, 0.0)
    failures = d2.observe(es, 1.0)
    assert failures and {f.target for f in failures} == {
        Target(A(f"10.0.1.{i}"), "tcp", 22) for i in range(3)
    }


def test_udp_failures_are_confirmed_with_an_icmp_echo_and_excused_ones_ignored():
    d = PassiveDetector()
    es = [attempt(f"10.0.0.{i}", i, socket.IPPROTO_UDP, 53) for i in range(3)]
    d.observe(es, 0.0)
    failures = d.observe(es, 1.0)
    assert failures and all(f.target.kind == "icmp" for f in failures)
    d.excuse([A("10.0.0.0"), A("10.0.0.1"), A("10.0.0.2")], 1.0)
    fresh = [attempt(f"10.0.0.{i}", 10 + i, socket.IPPROTO_UDP, 53) for i in range(3)]
    d.observe(fresh, 2.0)
    assert d.observe(fresh, 3.5) is None  # excused for a minute
    late = [attempt(f"10.0.0.{i}", 20 + i, socket.IPPROTO_UDP, 53) for i in range(3)]
    d.observe(late, 62.0)
    assert d.observe(late, 63.5)


@pytest.mark.parametrize(
    ("spec", "target"),
    [
        ("10.10.10.5", Target(A("10.10.10.5"))),
        ("icmp@fd10::5", Target(A("fd10::5"))),
        ("tcp:22@10.10.10.5", Target(A("10.10.10.5"), "tcp", 22)),
        ("udp:7300@[fd10::6]", Target(A("fd10::6"), "udp", 7300)),
    ],
)
def test_track_syntax(spec, target):
    assert parse_target(spec) == target
    assert parse_target(str(target)) == target  # what status and logs show reads back


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("tcp@10.0.0.1", "needs a port"),
        ("icmp:7@10.0.0.1", "takes no port"),
        ("sctp:1@10.0.0.1", "must be icmp, tcp or udp"),
        ("tcp:22@host.example", "is not an IP address"),
        ("224.0.0.1", "not a unicast host address"),
    ],
)
def test_track_syntax_errors_say_what_to_write(spec, error):
    with pytest.raises(ConfigError, match=error):
        parse_target(spec)


def test_track_lists_in_the_cc_answer_global_and_per_ap():
    body = (
        b'{"aps": [{"id": "ap1", "addr": "10.77.0.11", "track": ["tcp:5432@10.10.10.7"]}],'
        b' "track": ["10.10.10.5", "10.10.10.5", "udp:53@10.10.10.8"]}'
    )
    directory = parse_answer(body)
    assert directory.track == parse_targets(["10.10.10.5,udp:53@10.10.10.8"])
    assert directory.aps[0].track == (Target(A("10.10.10.7"), "tcp", 5432),)
    with pytest.raises(BadAnswerError, match=r"aps\[0\]\.track\[0\]: expected a string"):
        parse_answer(b'{"aps": [{"id": "a", "addr": "10.77.0.11", "track": [5]}]}')
    with pytest.raises(BadAnswerError, match=r"track\[0\].*needs a port"):
        parse_answer(b'{"aps": [{"id": "a", "addr": "10.77.0.11"}], "track": ["tcp@10.0.0.1"]}')


def test_compare_probes_both_paths_at_once():
    seen = []

    async def probe(target, mark, timeout):
        seen.append((trio.current_time(), mark))
        await trio.sleep(timeout if mark is None else 0.01)
        return "timeout" if mark is None else None

    async def main():
        return await compare([Target(A("10.0.0.1")), Target(A("10.0.0.2"))], probe, 0x2, 0.5)

    result = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert result.broken and not result.targets_down
    assert {t for t, _ in seen} == {0.0}  # all four probes at the same moment
    assert "through it 0/2 answered (timeout), through the other AP 2/2 answered" in (
        result.evidence()
    )
