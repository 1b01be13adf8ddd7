"""``scripts/demo``: sdnsup's main job in a lab of network namespaces, narrated.

Builds the lab (client A with a container behind it, an underlay router, two APs, a remote
host B inside the steered CIDR), starts the real ``sdnsup`` in A and shows, with real
packets, the paths the README describes; then stops sdnsup and removes the lab. Nothing in
the host's own network namespace changes. Non-interactive; exits 0 when everything behaved.
"""

from __future__ import annotations

import sys
import time

from sdnsup.lab import Lab

CIDRS = "10.10.10.0/24,fd10:10:10::/64"
failures = 0


def say(text: str = "") -> None:
    print(text, flush=True)


def check(what: str, seen: str | None, expected: str, meaning: str) -> None:
    global failures
    ok = seen == expected
    failures += not ok
    mark = "ok " if ok else "FAIL"
    say(f"  [{mark}] {what}: B sees {seen or 'nothing (connection failed)'} -> {meaning}")


def main() -> int:
    say("== Building the lab (network namespaces, removed at the end)")
    with Lab.create(n_aps=2, container=True) as lab:
        say(lab.describe())
        ap = lab.ap(1)
        lab.serve_whoami(lab.ns_b)
        lab.serve_whoami(lab.ns_a)
        say("")
        say("== Before sdnsup: everything takes the normal route through the router")
        check("A -> B", lab.whoami(lab.ns_a, lab.b_addr), str(lab.a_addr), "A's own address")
        session = lab.open_session(lab.ns_a, lab.b_addr)
        say("  (a long-lived connection A -> B is opened now and kept)")

        say("")
        say(f"== Starting: sdnsup -r {CIDRS} --ap {ap.addr}+{ap.addr6}")
        proc = lab.run_sdnsup(
            lab.ns_a, "-r", CIDRS, "--ap", f"{ap.addr}+{ap.addr6}", "--probe", "icmp"
        )
        deadline = time.monotonic() + 15
        while "applied:" not in lab.logs(proc):
            if proc.poll() is not None or time.monotonic() > deadline:
                say(lab.logs(proc))
                return 1
            time.sleep(0.05)
        for line in lab.logs(proc).splitlines():
            say(f"  sdnsup| {line}")
        say("  kernel state in A:")
        for argv in (["ip", "rule"], ["ip", "nexthop"], ["ip", "route", "show", "table", "7300"]):
            out = lab.exec(lab.ns_a, *argv).stdout.strip()
            say(f"    $ {' '.join(argv)}")
            for line in out.splitlines():
                say(f"      {line}")

        say("")
        say("== With sdnsup")
        check("A -> B (new connection)", lab.whoami(lab.ns_a, lab.b_addr),
              str(ap.overlay_addr), "it left through AP1, which masqueraded it")  # fmt: skip
        check("A -> B over IPv6", lab.whoami(lab.ns_a, lab.b_addr6),
              str(ap.overlay_addr6), "IPv6 goes through AP1 too")  # fmt: skip
        check("container C -> B", lab.whoami(lab.ns_c, lab.b_addr),
              str(ap.overlay_addr), "forwarded traffic is steered as well")  # fmt: skip
        reply = session.ask("hello")
        check("the connection opened before sdnsup", reply.split()[1] if reply else None,
              str(lab.a_addr), "still answered on its old path")  # fmt: skip
        seen_by_a = lab.whoami(lab.ns_b, lab.a_addr, source=lab.b_addr)
        global failures
        ok = seen_by_a == str(lab.b_addr)
        failures += not ok
        say(f"  [{'ok ' if ok else 'FAIL'}] B -> A (B is inside the CIDR): A sees {seen_by_a} and "
            "B gets its reply -> replies to inbound connections take the normal route")  # fmt: skip

        say("")
        say("== Stopping sdnsup (SIGTERM): it removes everything it added")
        proc.terminate()
        code = proc.wait(10)
        for line in lab.logs(proc).splitlines()[-3:]:
            say(f"  sdnsup| {line}")
        rules = lab.exec(lab.ns_a, "ip", "rule").stdout
        tables = lab.exec(lab.ns_a, "nft", "list", "tables").stdout
        clean = code == 0 and "7300" not in rules and "sdnsup" not in tables
        failures += not clean
        say(f"  [{'ok ' if clean else 'FAIL'}] exit code {code}; no sdnsup rule or table left")
        check("A -> B after stop", lab.whoami(lab.ns_a, lab.b_addr), str(lab.a_addr),
              "normal route again")  # fmt: skip
        say("")
        say("== Removing the lab")
    say("done" if not failures else f"{failures} check(s) FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
