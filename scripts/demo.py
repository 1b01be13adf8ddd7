"""``scripts/demo``: sdnsup's main job in a lab of network namespaces, narrated.

Builds the lab (a CC listing three APs whose probe agents answer after 80, 5 and 40 ms, a
client A with a container behind it, an underlay router, a remote host B inside the steered
CIDR), starts the real ``sdnsup`` in A and shows with real packets: the AP ranking, a
connection to B leaving through the fastest AP, an inbound connection answered normally, the
fastest AP killed and the failover with its measured dark window, a link flap healed, and the
clean teardown. Nothing in the host's own network namespace changes. Non-interactive; exits 0
when everything behaved as described.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

from sdnsup.lab import Lab, wait_for
from sdnsup.lab.measure import dark_window

CIDRS = "10.10.10.0/24,fd10:10:10::/64"
DELAYS = {1: 0.080, 2: 0.005, 3: 0.040}  # AP index -> how long its agent takes to answer
failures = 0


def say(text: str = "") -> None:
    print(text, flush=True)


def verdict(ok: bool, text: str) -> None:
    global failures
    failures += not ok
    say(f"  [{'ok ' if ok else 'FAIL'}] {text}")


def check(what: str, seen: str | None, expected: str, meaning: str) -> None:
    verdict(seen == expected, f"{what}: B sees {seen or 'nothing (no answer)'} -> {meaning}")


class Log:
    """sdnsup's log, shown a new part at a time."""

    def __init__(self, lab: Lab, proc: subprocess.Popen[bytes]) -> None:
        self.lab, self.proc, self.shown = lab, proc, 0

    def wait(self, pattern: str, timeout: float = 20) -> None:
        wait_for(f"sdnsup to log {pattern!r}", timeout,
                 lambda: re.search(pattern, self.lab.logs(self.proc)))  # fmt: skip

    def show(self) -> None:
        lines = self.lab.logs(self.proc).splitlines()
        for line in lines[self.shown :]:
            say(f"  sdnsup| {line.split(' ', 3)[-1]}")
        self.shown = len(lines)


def main() -> int:
    say("== Building the lab: network namespaces, removed at the end")
    with Lab.create(n_aps=3, container=True) as lab:
        say(lab.describe())
        lab.start_ap_agents(DELAYS)
        url = lab.start_cc()
        lab.set_cc()
        say(f"  CC at {url} lists ap1, ap2, ap3; their agents answer probes after "
            + ", ".join(f"ap{i} {d * 1000:.0f} ms" for i, d in DELAYS.items()))  # fmt: skip
        lab.serve_whoami(lab.ns_b)
        lab.serve_whoami(lab.ns_a)
        a, b = str(lab.a_addr), str(lab.b_addr)
        via = {i: str(lab.ap(i).overlay_addr) for i in DELAYS}

        say("")
        say("== Before sdnsup: everything takes the normal route through the router")
        check("A -> B", lab.whoami(lab.ns_a, b), a, "A's own address")
        session = lab.open_session(lab.ns_a, b)
        say("  (a long-lived connection A -> B is opened now and kept)")

        say("")
        say(f"== Starting: sdnsup -r {CIDRS} --cc {url}")
        proc = lab.run_sdnsup(lab.ns_a, "-r", CIDRS, "--cc", url)
        log = Log(lab, proc)
        log.wait("probe ranking")
        log.show()
        say("  The fastest AP (ap2) was taken at its first answer, before the 80 ms AP had")
        say("  answered; the full ranking came after and confirmed it.")

        say("")
        say("== Traffic")
        check("A -> B (new connection)", lab.whoami(lab.ns_a, b), via[2],
              "it left through ap2, which masqueraded it")  # fmt: skip
        check("A -> B over IPv6", lab.whoami(lab.ns_a, lab.b_addr6),
              str(lab.ap(2).overlay_addr6), "IPv6 goes through ap2 too")  # fmt: skip
        check("container C -> B", lab.whoami(lab.ns_c, b), via[2],
              "forwarded traffic is steered as well")  # fmt: skip
        reply = session.ask("hello")
        check("the connection opened before sdnsup", reply.split()[1] if reply else None, a,
              "still answered on its old path")  # fmt: skip
        seen = lab.whoami(lab.ns_b, a, source=b)
        verdict(seen == b, f"B -> A (B is inside the CIDR): A sees {seen}, and B gets its reply "
                "-> replies to inbound connections take the normal route")  # fmt: skip

        say("")
        say("== Killing the fastest AP (ap2's link is cut) while A pings B every 10 ms")
        dark, replies = dark_window(lab, lambda: lab.ap_link_down(2))
        log.wait("failover")
        log.show()
        verdict(dark < 1.5, f"longest gap between ping replies (dark window): {dark * 1000:.0f} ms"
                f" ({replies} replies)")  # fmt: skip
        check("A -> B after the failover", lab.whoami(lab.ns_a, b), via[3],
              "now through ap3, the next of the ranking")  # fmt: skip
        seen = lab.whoami(lab.ns_b, a, source=b)
        verdict(seen == b, "B -> A still answered through the normal route")

        say("")
        say("== Flapping A's interface (down 0.3 s, up): the kernel drops the routes through it")
        lab.exec(lab.ns_a, "ip", "link", "set", lab.a_ifname, "down")
        time.sleep(0.3)
        lab.exec(lab.ns_a, "ip", "link", "set", lab.a_ifname, "up")
        # the kernel dropped the default route too; a network manager would restore it
        lab.exec(lab.ns_a, "ip", "route", "replace", "default", "via", str(lab.router_addr))
        log.wait("healed after link .* up")
        log.show()
        wait_for("traffic through ap3 again", 10, lambda: lab.whoami(lab.ns_a, b) == via[3])
        verdict(True, "A -> B goes through ap3 again, without a restart")

        say("")
        say("== Stopping sdnsup (SIGTERM): it removes everything it added")
        proc.terminate()
        code = proc.wait(10)
        log.show()
        rules = lab.exec(lab.ns_a, "ip", "rule").stdout
        tables = lab.exec(lab.ns_a, "nft", "list", "tables").stdout
        clean = code == 0 and "7300" not in rules and "sdnsup" not in tables
        verdict(clean, f"exit code {code}; no sdnsup rule or table left")
        check("A -> B after stop", lab.whoami(lab.ns_a, b), a, "normal route again")
        say("")
        say("== Removing the lab")
    say("done" if not failures else f"{failures} check(s) FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
