"""sdnsup.probe against the lab's probe agents, and the lab's CC (sdnsup.lab.cc).

A three-AP lab whose agents answer after 5, 40 and 80 ms. The probes run in A's namespace,
in a child process (:data:`PROBE_SCRIPT`), exactly as the daemon would run them; the CC is
fetched from A with a plain ``http.client``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from sdnsup.lab import Lab

netns = pytest.mark.netns
MakeLab = Callable[..., Lab]

DELAYS = {1: 0.005, 2: 0.040, 3: 0.080}
PORTS = {"udp": 7300, "http": 7301, "tcp": 7301, "icmp": 0}

# Reads a list of rounds from stdin: {"kind", "family", "aps": [[id, addr4, addr6]...],
# "timeout"}; runs probe_all for each and prints one JSON object per round.
PROBE_SCRIPT = r"""
import ipaddress, json, socket, sys
import trio
from sdnsup.aps import AccessPoint, ProbeSpec
from sdnsup.probe import open_icmp_socket, probe_all

async def one(job):
    aps = []
    for ap_id, addr4, addr6 in job["aps"]:
        spec = ProbeSpec(job["kind"], job["port"], "/health")
        if job["family"] == 4:
            aps.append(AccessPoint(ap_id, addr4=ipaddress.IPv4Address(addr4), probe=spec))
        else:
            aps.append(AccessPoint(ap_id, addr6=ipaddress.IPv6Address(addr6), probe=spec))
    first = []
    t0 = trio.current_time()

    def on_answer(result):
        first.append([result.ap.id, trio.current_time() - t0, result.rtt])

    ranking = await probe_all(aps, timeout=job["timeout"], count=3, on_answer=on_answer)
    out = {
        "kind": job["kind"], "family": job["family"], "first": first,
        "elapsed": trio.current_time() - t0,
        "ranking": [[r.ap.id, r.rtt, r.sent, r.received] for r in ranking],
    }
    if job["kind"] == "icmp":
        family = socket.AF_INET if job["family"] == 4 else socket.AF_INET6
        sock, raw = open_icmp_socket(family)
        sock.close()
        out["icmp_socket"] = "raw" if raw else "dgram"
    return out

async def main():
    jobs = json.load(sys.stdin)
    print(json.dumps([await one(job) for job in jobs]))

trio.run(main)
"""

# Reads a list of requests from stdin: {"url", "timeout", "token"}; prints one result each:
# {"status", "length", "json" (parsed body or null), "error"}.
FETCH_SCRIPT = r"""
import http.client, json, sys, time, urllib.parse

def fetch(req):
    url = urllib.parse.urlsplit(req["url"])
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=req["timeout"])
    headers = {"Authorization": "Bearer " + req["token"]} if req.get("token") else {}
    t0 = time.monotonic()
    try:
        conn.request("GET", url.path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
    except OSError as exc:
        return {"error": type(exc).__name__, "seconds": time.monotonic() - t0}
    finally:
        conn.close()
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    return {"status": resp.status, "length": len(body), "seconds": time.monotonic() - t0,
            "json": parsed if len(body) < 65536 else None, "valid_json": parsed is not None,
            "length_header": resp.getheader("Content-Length")}

print(json.dumps([fetch(req) for req in json.load(sys.stdin)]))
"""


def probe_rounds(lab: Lab, *rounds: tuple[str, int], timeout: float = 0.5) -> list[Any]:
    """Run probe_all in A for each (kind, family); the rounds' results."""
    aps = [[f"ap{ap.index}", str(ap.addr), str(ap.addr6)] for ap in lab.aps]
    jobs = [
        {"kind": kind, "port": PORTS[kind], "family": family, "aps": aps, "timeout": timeout}
        for kind, family in rounds
    ]
    proc = lab.exec(lab.ns_a, sys.executable, "-c", PROBE_SCRIPT, input=json.dumps(jobs))
    results: list[Any] = json.loads(proc.stdout)
    return results


def order(result: dict[str, Any]) -> list[str]:
    return [ap_id for ap_id, *_ in result["ranking"]]


def rtts(result: dict[str, Any]) -> dict[str, float | None]:
    return {ap_id: rtt for ap_id, rtt, _sent, _received in result["ranking"]}


def fetch(lab: Lab, *requests: dict[str, Any]) -> list[dict[str, Any]]:
    """GET each request's URL from A with http.client; one result dict per request."""
    timeout = max(r["timeout"] for r in requests) * len(requests) + 20
    proc = lab.exec(
        lab.ns_a, sys.executable, "-c", FETCH_SCRIPT, input=json.dumps(requests), timeout=timeout
    )
    results: list[dict[str, Any]] = json.loads(proc.stdout)
    return results


def report(results: list[Any]) -> None:
    """Print measured RTTs (shown with ``pytest -s``): the probes' overhead over the delay."""
    for r in results:
        line = ", ".join(
            f"{ap_id} {rtt * 1000:.2f} ms" if rtt is not None else f"{ap_id} dead"
            for ap_id, rtt, _s, _r in r["ranking"]
        )
        first = r["first"][0] if r["first"] else None
        extra = f" [{r['icmp_socket']} socket]" if "icmp_socket" in r else ""
        when = f"first {first[0]} at {first[1] * 1000:.2f} ms" if first else "no answer"
        print(f"{r['kind']}/v{r['family']}{extra}: {line}; {when}, round {r['elapsed']:.3f} s")


@pytest.fixture
def lab3(make_lab: MakeLab) -> Lab:
    lab = make_lab(n_aps=3)
    lab.start_ap_agents(DELAYS)
    return lab


# --- probe kinds -----------------------------------------------------------------------------


@netns
def test_udp_and_http_rank_by_delay_and_decide_on_the_first_answer(lab3: Lab) -> None:
    results = probe_rounds(lab3, ("udp", 4), ("http", 4), ("udp", 6), ("http", 6))
    report(results)
    for r in results:
        assert order(r) == ["ap1", "ap2", "ap3"], r
        for ap_id, rtt, sent, received in r["ranking"]:
            delay = DELAYS[int(ap_id[2:])]
            assert (sent, received) == (3, 3), r
            assert delay <= rtt < delay + 0.030, r
        # the early decision: AP1 answered first, long before AP3's 80 ms answer
        first_id, first_at, _ = r["first"][0]
        assert first_id == "ap1", r
        assert first_at < 0.050, r
        # the round ended with the slowest answer, not with the 0.5 s deadline
        assert r["elapsed"] < 0.4, r


@netns
def test_tcp_and_icmp_are_answered_by_the_kernel(lab3: Lab) -> None:
    # A fresh namespace has ping_group_range "1 0": root gets no ping socket, so raw ones.
    raw = probe_rounds(lab3, ("tcp", 4), ("icmp", 4), ("tcp", 6), ("icmp", 6))
    lab3.exec(lab3.ns_a, "sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 0")
    dgram = probe_rounds(lab3, ("icmp", 4), ("icmp", 6))
    report(raw + dgram)
    for r in raw + dgram:
        assert all(rtt is not None and rtt < 0.020 for rtt in rtts(r).values()), r
        assert all(received == 3 for *_, received in r["ranking"]), r
    assert {r["icmp_socket"] for r in raw if r["kind"] == "icmp"} == {"raw"}
    assert {r["icmp_socket"] for r in dgram} == {"dgram"}


@netns
def test_drop_makes_an_ap_dead_for_every_kind_and_comes_back(lab3: Lab) -> None:
    lab3.set_ap_drop(2, True)
    kinds = [("udp", 4), ("http", 4), ("tcp", 4), ("icmp", 4), ("udp", 6), ("icmp", 6)]
    started = time.monotonic()
    results = probe_rounds(lab3, *kinds, timeout=0.3)
    report(results)
    for r in results:
        # tcp and icmp RTTs are sub-millisecond and in no particular order: AP2 is last
        assert order(r)[2] == "ap2" and r["ranking"][2][1:] == [None, 3, 0], r
        assert [received for *_, received in r["ranking"][:2]] == [3, 3], r
        if r["kind"] in ("udp", "http"):
            assert order(r) == ["ap1", "ap3", "ap2"], r
    assert time.monotonic() - started < 15

    lab3.set_ap_drop(2, False)
    results = probe_rounds(lab3, *kinds, timeout=0.3)
    for r in results:
        assert all(received == 3 for *_, received in r["ranking"]), r


@netns
def test_set_ap_delay_changes_the_order_at_run_time(lab3: Lab) -> None:
    lab3.set_ap_delay(3, 0.001)
    lab3.set_ap_delay(1, 0.060)
    results = probe_rounds(lab3, ("udp", 4), ("http", 6))
    report(results)
    for r in results:
        assert order(r) == ["ap3", "ap2", "ap1"], r
        assert r["first"][0][0] == "ap3", r
    # the drop flag survives a delay change, and the delay survives a drop change
    lab3.set_ap_drop(3, True, firewall=False)
    lab3.set_ap_delay(3, 0.002)
    assert order(probe_rounds(lab3, ("udp", 4))[0])[-1] == "ap3"
    lab3.set_ap_drop(3, False, firewall=False)
    assert order(probe_rounds(lab3, ("udp", 4))[0]) == ["ap3", "ap2", "ap1"]


# --- the lab CC ------------------------------------------------------------------------------


@netns
def test_lab_cc_modes(make_lab: MakeLab) -> None:
    lab = make_lab(n_aps=3)
    url = lab.start_cc()
    assert url == "http://172.31.1.1:8000"
    aps_url = f"{url}/v1/aps"

    def get(timeout: float = 3.0, path: str = "/v1/aps", **kw: Any) -> dict[str, Any]:
        return fetch(lab, {"url": f"{url}{path}", "timeout": timeout, **kw})[0]

    ok = get()
    assert ok["status"] == 200
    assert ok["json"] == lab.cc_answer()
    assert ok["json"]["ttl"] == 60
    assert [a["id"] for a in ok["json"]["aps"]] == ["ap1", "ap2", "ap3"]
    assert ok["json"]["aps"][0] == {
        "id": "ap1",
        "addr": "172.31.1.11",
        "addr6": "fd31:1::11",
        "probe": {"kind": "udp", "port": 7300},
        "weight": 1,
    }

    lab.set_cc(aps=[2], ttl=5, probe={"kind": "http", "port": 7301, "path": "/health"})
    only2 = get()["json"]
    assert [a["id"] for a in only2["aps"]] == ["ap2"] and only2["ttl"] == 5
    assert only2["aps"][0]["probe"]["kind"] == "http"

    lab.set_cc(answer={"aps": [], "ttl": 1})
    assert get()["json"] == {"aps": [], "ttl": 1}

    lab.set_cc("500")
    assert get()["status"] == 500

    lab.set_cc("garbage")
    garbage = get()
    assert garbage["status"] == 200 and not garbage["valid_json"]

    lab.set_cc("oversize")
    big = get(timeout=10)
    assert big["status"] == 200 and big["length"] >= 2 * 1024 * 1024
    assert big["length_header"] is None  # close-delimited: a client must bound its reads
    assert big["valid_json"]

    lab.set_cc("slow", slow_seconds=1.0)
    assert get(timeout=0.3)["error"] == "TimeoutError"
    slow = get(timeout=5)
    assert slow["status"] == 200 and slow["seconds"] >= 1.0

    lab.set_cc("ok")
    assert get(path="/v2/other")["status"] == 404

    assert lab.cc_process is not None
    logs = lab.logs(lab.cc_process)
    assert "GET /v1/aps 200" in logs and "GET /v1/aps 500" in logs and "/v2/other 404" in logs

    lab.stop_cc()
    refused = get()
    assert refused["error"] == "ConnectionRefusedError"
    lab.stop_cc()  # idempotent
    assert aps_url.endswith("/v1/aps")


@netns
def test_lab_cc_bearer_token_and_restart(make_lab: MakeLab) -> None:
    lab = make_lab(n_aps=1)
    lab.set_cc(ttl=7)
    url = lab.start_cc(token="s3cret")
    req = {"url": f"{url}/v1/aps", "timeout": 3.0}
    without, wrong, right = fetch(lab, req, {**req, "token": "nope"}, {**req, "token": "s3cret"})
    assert without["status"] == 401 and wrong["status"] == 401
    assert right["status"] == 200 and right["json"]["ttl"] == 7

    lab.stop_cc()
    assert fetch(lab, req)[0]["error"] == "ConnectionRefusedError"
    # restarted elsewhere: in B, on its own address (reached through R, not an AP)
    url_b = lab.start_cc(ns=lab.ns_b, port=8001)
    assert url_b == f"http://{lab.b_addr}:8001"
    assert fetch(lab, {"url": f"{url_b}/v1/aps", "timeout": 3.0})[0]["status"] == 200
