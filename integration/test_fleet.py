"""A fleet of real sdnsup processes against one lab CC: weights, a restart that spares the CC,
and the flows a host's probes leave on stateful devices."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

from integration.helpers import start_sdnsup, stop_sdnsup, wait_for
from sdnsup.aps import AccessPoint
from sdnsup.choice import rendezvous_key
from sdnsup.lab import Lab

CIDRS = "10.10.10.0/24"
CLIENTS = 36
TTL = 10  # the CC's shortest: a restart's requests spread over 12 s, not 72
DELAYS = {1: 0.002, 2: 0.0025, 3: 0.003}  # near-equal: the weights decide
WEIGHTS = {1: 1, 2: 1, 3: 2}
START_TIMEOUT = 90.0  # 36 Python processes starting at once on 2 CPUs


def host_id(i: int) -> str:
    return f"fleet-host-{i}"


def expected_top(i: int) -> str:
    """The AP host ``i`` should pick: its highest weighted rendezvous key."""
    aps = [AccessPoint(f"ap{n}", weight=w) for n, w in WEIGHTS.items()]
    return max(aps, key=lambda ap: rendezvous_key(host_id(i), ap)).id


# What these tests are about (the AP choice, CC requests) does not need 5 keepalive probes a
# second and 2 conntrack polls a second from each of 36 daemons: on 2 CPUs, that load alone
# delayed probe answers by 20 ms now and then, and a host took a "faster" AP that was not.
QUIET = ("--keepalive-interval", "1", "--no-passive-check")


def start_all(lab: Lab, url: str) -> list[subprocess.Popen[bytes]]:
    procs = [
        lab.run_sdnsup(
            lab.client(i), "-r", CIDRS, "--cc", url, *QUIET, env={"SDNSUP_HOST_ID": host_id(i)}
        )
        for i in range(1, CLIENTS + 1)
    ]

    def all_applied() -> bool:
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"sdnsup exited {proc.returncode}:\n{lab.logs(proc)}")
        return all("applied:" in lab.logs(proc) for proc in procs)

    wait_for(all_applied, START_TIMEOUT, f"{CLIENTS} sdnsup processes to steer")
    return procs


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        assert proc.wait(20) == 0


def active_ap(lab: Lab, i: int) -> str | None:
    out = lab.exec(
        lab.client(i), sys.executable, "-m", "sdnsup.cli", "status", "--json", check=False
    ).stdout
    snap = json.loads(out)
    return snap["active_ap"]["id"] if snap.get("connected") else None


def test_weights_spread_the_fleet_and_a_restart_with_saved_lists_spares_the_cc(make_lab):
    lab: Lab = make_lab(n_aps=3, clients=CLIENTS)
    lab.start_ap_agents(DELAYS)
    lab.set_cc(ttl=TTL, weights=WEIGHTS)
    url = lab.start_cc()
    procs = start_all(lab, url)

    # Each host ends up on the AP its id ranks first (weighted), whatever the RTT noise. A
    # host whose first answers came late (36 processes starting on 2 CPUs) may take its
    # second one first and return to the top at its next probe round (30 s +-20%).
    expected = Counter(expected_top(i) for i in range(1, CLIENTS + 1))
    assert expected["ap3"] > max(expected["ap1"], expected["ap2"]) and len(expected) == 3
    chosen: Counter[str | None] = Counter()

    def converged() -> bool:
        nonlocal chosen
        chosen = Counter(active_ap(lab, i) for i in range(1, CLIENTS + 1))
        return chosen == expected

    wait_for(converged, 2 * 36 + 10, "every host on its weighted first AP", step=2.0)

    # restart the whole fleet at once: every host steers from its saved list first
    stop_all(procs)
    asked_before = len(lab.cc_requests())
    restarted = time.time()
    procs = start_all(lab, url)
    for proc in procs:
        assert "AP list from disk" in lab.logs(proc), lab.logs(proc)

    def every_host_asked() -> bool:
        peers = {peer for _, peer, _ in lab.cc_requests()[asked_before:]}
        return len(peers) == CLIENTS

    wait_for(every_host_asked, 1.2 * TTL + START_TIMEOUT, "every host to ask the CC")
    requests = lab.cc_requests()[asked_before:]
    # nobody asked before steering: the first request of each host follows its first apply,
    # which the restart did from the saved list
    first = {}
    for at, peer, _ in requests:
        first.setdefault(peer, at)
    assert min(first.values()) > restarted
    per_second = Counter(int(at - restarted) for at, _, _ in requests)
    assert max(per_second.values()) <= CLIENTS // 3, sorted(per_second.items())
    # spread over the ttl like running timers, not in the seconds the processes started in
    assert max(first.values()) - min(first.values()) > TTL / 3, sorted(first.values())
    stop_all(procs)


def test_keepalive_probes_keep_one_flow_per_ap(make_lab):
    lab: Lab = make_lab(n_aps=2)
    lab.start_ap_agents({1: 0.005, 2: 0.030})
    url = lab.start_cc()
    lab.set_cc()
    proc = start_sdnsup(lab, "-r", CIDRS, "--cc", url)
    time.sleep(5)  # 25 keepalive probes of the active AP and a probe round of both
    # (the first packet conntrack sees may be the answer: either direction names port 7300)
    out = lab.exec(lab.ns_a, "conntrack", "-L", "-p", "udp").stdout
    flows = [line for line in out.splitlines() if "port=7300 " in line]
    # one flow per AP (and one more if a probe was lost and its socket replaced)
    assert 1 <= len(flows) <= 4, out
    assert stop_sdnsup(lab, proc) == 0
