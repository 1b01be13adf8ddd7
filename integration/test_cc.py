"""The CC as sdnsup sees it: down at start, bad answers, tokens, bounded retries."""

from __future__ import annotations

import json

import pytest

from integration.helpers import owned, start_sdnsup, stop_sdnsup, wait_for
from sdnsup.lab import Lab

pytestmark = pytest.mark.netns

NOTHING = {"rules": [], "routes": [], "nexthops": [], "tables": []}


def test_cc_down_at_start_then_up_converges(make_lab):
    lab: Lab = make_lab(n_aps=1)
    lab.start_ap_agents({1: 0.005})
    lab.serve_whoami(lab.ns_b)
    lab.set_cc()
    proc = lab.run_sdnsup(lab.ns_a, "-r", "10.10.10.0/24", "--cc", "http://172.31.1.1:8000")
    wait_for(lambda: "refused" in lab.logs(proc), 10, "a refused attempt to be logged")
    assert owned(lab) == NOTHING  # nothing applied while no AP list is known
    lab.start_cc()
    wait_for(lambda: "applied:" in lab.logs(proc), 30, "convergence once the CC is up")
    assert lab.whoami(lab.ns_a, lab.b_addr) == str(lab.ap(1).overlay_addr)
    assert stop_sdnsup(lab, proc) == 0


BAD = [
    ("500", {}, "500"),
    ("garbage", {}, "not JSON"),
    ("oversize", {}, "larger than"),
    ("ok", {"answer": {"aps": [{"id": "x", "addr": "127.0.0.1"}]}}, "loopback"),
    ("ok", {"answer": {"aps": [{"id": "x", "addr": "fd77::1"}]}}, "aps[0].addr"),
    ("slow", {"slow_seconds": 20}, "within"),
]


def test_each_bad_answer_is_logged_and_retried_without_applying_anything(make_lab):
    lab: Lab = make_lab(n_aps=1)
    lab.start_ap_agents({1: 0.005})
    lab.serve_whoami(lab.ns_b)
    url = lab.start_cc()
    lab.set_cc(mode="500")
    proc = lab.run_sdnsup(lab.ns_a, "-r", "10.10.10.0/24", "--cc", url)
    seen = 0
    for mode, extra, reason in BAD:
        lab.set_cc(mode=mode, **extra)

        def logged(reason: str = reason, after: int = seen) -> bool:
            lines = [ln for ln in lab.logs(proc).splitlines() if "CC attempt" in ln]
            return any(reason in ln for ln in lines[after:])

        wait_for(logged, 60, f"a failed attempt mentioning {reason!r}")
        seen = len([ln for ln in lab.logs(proc).splitlines() if "CC attempt" in ln])
        assert proc.poll() is None, lab.logs(proc)
        assert owned(lab) == NOTHING
    lab.set_cc()
    wait_for(lambda: "applied:" in lab.logs(proc), 90, "convergence on a good answer")
    assert lab.whoami(lab.ns_a, lab.b_addr) == str(lab.ap(1).overlay_addr)
    assert stop_sdnsup(lab, proc) == 0


def test_retries_exhausted_against_a_dead_cc_exits_nonzero(make_lab):
    lab: Lab = make_lab(n_aps=1)
    proc = lab.run_sdnsup(
        lab.ns_a, "-r", "10.10.10.0/24", "--cc", "http://172.31.1.1:8000", "--retries", "2"
    )
    assert proc.wait(30) == 75
    logs = lab.logs(proc)
    assert "gave up after 3 attempts" in logs
    assert owned(lab) == NOTHING


def test_token_is_sent_and_never_logged(make_lab, tmp_path):
    lab: Lab = make_lab(n_aps=1)
    lab.start_ap_agents({1: 0.005})
    url = lab.start_cc(token="s3cret-token-value")
    lab.set_cc()
    token_file = tmp_path / "cc.token"
    token_file.write_text("s3cret-token-value\n")
    token_file.chmod(0o600)
    proc = start_sdnsup(lab, "-r", "10.10.10.0/24", "--cc", url, "--cc-token-file", str(token_file))
    assert stop_sdnsup(lab, proc) == 0
    assert "s3cret" not in lab.logs(proc)
    # without the token the CC answers 401, which is reported as such
    # (and no saved list: the first run saved the CC's answer, which a restart would use)
    argv = ("-r", "10.10.10.0/24", "--cc", url, "--retries", "0", "--state-dir", "none")
    bad = lab.run_sdnsup(lab.ns_a, *argv)
    assert bad.wait(20) == 75
    assert "401" in lab.logs(bad)


def test_token_warnings_are_log_lines_like_any_other(make_lab, tmp_path):
    """The clear-text and file-mode warnings come after logging is set up: in the JSON
    stream, not printed raw before it (which broke a shipper parsing stderr)."""
    lab: Lab = make_lab(n_aps=1)
    lab.start_ap_agents({1: 0.005})
    url = lab.start_cc(token="s3cret-token-value")
    lab.set_cc()
    token_file = tmp_path / "cc.token"
    token_file.write_text("s3cret-token-value\n")
    token_file.chmod(0o644)
    proc = start_sdnsup(
        lab, "-r", "10.10.10.0/24", "--cc", url, "--cc-token-file", str(token_file),
        "--log-format", "json",
    )  # fmt: skip
    assert stop_sdnsup(lab, proc) == 0
    lines = [json.loads(line) for line in lab.logs(proc).splitlines() if line.strip()]
    messages = " | ".join(line["msg"] for line in lines)
    assert "is readable by every user; chmod 600 it" in messages
    assert "the CC token is sent in clear text" in messages
    assert "s3cret" not in lab.logs(proc)
