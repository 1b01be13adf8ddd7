import contextlib
import functools
import ipaddress
import signal

import trio
import trio.testing

from sdnsup.applier import Applier
from sdnsup.aps import parse_static_aps
from sdnsup.cidrs import parse_cidrs
from sdnsup.daemon import Mailbox, applier_task, serve
from sdnsup.desired import RunConfig, desired_for
from sdnsup.errors import RoutesError
from sdnsup.routes import RTPROT_SDNSUP
from tests.fakes import FakeNft, FakeRoutes, FakeSysctl, link

CONFIG = RunConfig(
    cidrs=parse_cidrs(["10.10.10.0/24,fd10::/64"]),
    aps=parse_static_aps("10.77.0.11+fd77::11,10.77.0.12"),
)


def make():
    routes = FakeRoutes({"10.77.0.11": link(2, "eth0"), "fd77::11": link(2, "eth0")})
    return Applier(routes, FakeNft(), FakeSysctl()), routes


class Signals:
    """Signals for serve() through a channel (``signals=``), not sent to pytest's process."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[int](8)

    def __call__(self) -> contextlib.AbstractContextManager[trio.MemoryReceiveChannel[int]]:
        return contextlib.nullcontext(self._receive)

    async def send(self, signum: int) -> None:
        await self._send.send(signum)


class RecordingNotifier:
    """Records what a systemd Type=notify unit would receive; tests wait on it."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.watchdog_interval = None
        self._changed = trio.Event()

    def _send(self, message: str) -> None:
        self.sent.append(message)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate) -> None:
        """Until ``predicate(sent)`` holds (bounded: the daemon's applies run in a thread)."""
        with trio.fail_after(10):
            while not predicate(self.sent):
                await self._changed.wait()

    def ready(self, status: str) -> None:
        self._send(f"READY=1 STATUS={status}")

    def status(self, text: str) -> None:
        self._send(f"STATUS={text}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        pass


def applied(sent: list[str]) -> bool:
    """Whether a state was applied (READY comes with the first without a status socket)."""
    return any(m.startswith("READY=1") for m in sent)


def test_desired_state_exempts_every_ap():
    d = desired_for(CONFIG, CONFIG.aps[0])
    assert d.ap4 == ipaddress.ip_address("10.77.0.11")
    assert d.exempt4 == {
        ipaddress.ip_network("10.77.0.11/32"),
        ipaddress.ip_network("10.77.0.12/32"),
    }


def test_sigterm_tears_down_and_returns():
    applier, routes = make()

    notifier = RecordingNotifier()

    async def main():
        signals = Signals()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(serve, CONFIG, applier, notifier=notifier, signals=signals)
            )
            await notifier.wait_for(applied)
            assert routes.rules(RTPROT_SDNSUP)
            await signals.send(signal.SIGTERM)

    trio.run(main)
    assert routes.dump() == ""


def test_sighup_reloads_the_cidrs_without_a_gap_and_keeps_the_old_on_a_bad_config(caplog):
    from sdnsup.errors import ConfigError

    applier, routes = make()
    wider = RunConfig(cidrs=parse_cidrs(["10.10.10.0/24,10.10.20.0/24,fd10::/64"]), aps=CONFIG.aps)
    answers: list[object] = [wider, ConfigError("cidrs.txt:3: 'banana' is not a CIDR")]

    def reload():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def dsts():
        return {str(r.dst) for r in routes.routes(RTPROT_SDNSUP)}

    notifier = RecordingNotifier()

    async def main():
        signals = Signals()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(
                    serve, CONFIG, applier, reload=reload, notifier=notifier, signals=signals
                )
            )
            await notifier.wait_for(applied)
            rules = routes.rules(RTPROT_SDNSUP)
            routes.calls.clear()
            await signals.send(signal.SIGHUP)
            await notifier.wait_for(lambda sent: len(sent) == 2)  # the reload's apply
            assert "10.10.20.0/24" in dsts()
            # a diff: one route added, nothing removed, the policy rules never touched
            assert routes.calls == ["add_routes 1"] and routes.rules(RTPROT_SDNSUP) == rules
            await signals.send(signal.SIGHUP)  # now the file is broken: kept as it was
            with trio.fail_after(5):  # the reload reads the files in a worker thread
                while "reload failed" not in caplog.text:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()  # whatever it caused has run
            assert "10.10.20.0/24" in dsts() and routes.calls == ["add_routes 1"]
            assert len(notifier.sent) == 2
            await signals.send(signal.SIGTERM)

    with caplog.at_level("INFO", logger="sdnsup"):
        trio.run(main)
    assert "reloaded: IPv4 CIDRs 1 -> 2 (+1 -0)" in caplog.text
    assert "reload failed, the running configuration is kept: cidrs.txt:3:" in caplog.text
    assert routes.dump() == ""


def test_failed_apply_is_retried_with_backoff_from_a_fresh_read():
    applier, routes = make()
    calls = []
    real_apply = applier.apply
    done = trio.Event()

    def flaky(desired):
        calls.append(trio.from_thread.run_sync(trio.current_time))
        if len(calls) < 3:
            raise RoutesError("netlink socket failed")
        result = real_apply(desired)
        trio.from_thread.run_sync(done.set)
        return result

    applier.apply = flaky  # type: ignore[method-assign]

    async def main():
        mailbox = Mailbox()
        async with trio.open_nursery() as nursery:
            await nursery.start(applier_task, applier, mailbox)
            mailbox.post(desired_for(CONFIG, CONFIG.aps[0]))
            # Wait on an event, not a polling sleep: a sleeping poller would let the
            # autojump clock move while the applier's thread runs, skewing the timestamps.
            await done.wait()
            nursery.cancel_scope.cancel()

    # applier_task runs the applier in a thread; MockClock autojump still skips the sleeps
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(calls) == 3
    assert calls[1] - calls[0] >= 0.5 and calls[2] - calls[1] >= 1.0
    assert len(routes.rules(RTPROT_SDNSUP)) == 2  # one per family


def test_a_failing_netlink_monitor_is_restarted_and_a_heal_is_asked():
    from sdnsup.daemon import monitor_task

    class FlakyMonitor:
        def __init__(self):
            self.runs = 0

        async def run(self, trigger, *, task_status=trio.TASK_STATUS_IGNORED):
            self.runs += 1
            task_status.started()
            if self.runs == 1:
                await trio.sleep(5)
                raise RoutesError("netlink socket failed: ENOBUFS")
            await trio.sleep_forever()

    monitor = FlakyMonitor()
    mailbox = Mailbox()
    taken = []

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(monitor_task, monitor, mailbox)
            taken.append(await mailbox.take())
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert monitor.runs == 2
    assert taken == [(None, ["netlink monitor restarted, events may have been missed"])]


def test_a_restarted_applier_task_reapplies_the_newest_state():
    applier, routes = make()
    mailbox = Mailbox()
    mailbox.post(desired_for(CONFIG, CONFIG.aps[0]))
    mailbox.post(desired_for(CONFIG, None))  # newest: no AP
    desired, _ = trio.run(mailbox.take)  # consumed by a task that then crashed

    async def main():
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(
                    applier_task, applier, mailbox, on_applied=lambda d, r: done.set()
                )
            )
            with trio.fail_after(5):
                await done.wait()
            nursery.cancel_scope.cancel()

    # The real clock: the apply runs in a worker thread, which MockClock's autojump does not
    # wait for (it would fire the deadline while the thread works).
    trio.run(main)
    assert desired is not None
    assert routes.rules(RTPROT_SDNSUP) == set()  # the no-AP state, not the older one
    assert len(routes.nexthops(RTPROT_SDNSUP)) == 2


def test_verification_is_stretched_so_that_large_rereads_stay_cheap():
    from sdnsup.daemon import VERIFY_CPU_SHARE, verify_loop

    mailbox = Mailbox()
    asked: list[float] = []

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(verify_loop, mailbox, 120.0)
            for reread in (0.05, 3.0):
                mailbox.last_reread = reread
                await mailbox.take()
                asked.append(trio.current_time())
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    # a cheap re-read keeps the configured pace; a 3 s one (100k CIDRs) waits 600 s
    assert asked == [120.0, 120.0 + 3.0 / VERIFY_CPU_SHARE]


def test_a_restart_that_adopts_everything_still_tells_systemd_what_is_steered(tmp_path):
    """After kill -9 and a restart the first apply writes nothing (the kernel already holds
    it all): systemctl's status line must still move on from "waiting for ...", as it did not."""
    routes = FakeRoutes({"10.77.0.11": link(2, "eth0"), "fd77::11": link(2, "eth0")})
    nft = FakeNft()
    killed = Applier(routes, nft, FakeSysctl())
    killed.apply(desired_for(CONFIG, CONFIG.aps[0]))  # what the killed process left
    restarted = Applier(routes, nft, FakeSysctl())
    notifier = RecordingNotifier()

    async def main():
        signals = Signals()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(
                    serve,
                    CONFIG,
                    restarted,
                    notifier=notifier,
                    control_path=tmp_path / "status.sock",
                    signals=signals,
                )
            )
            await notifier.wait_for(lambda sent: any(m.startswith("STATUS=") for m in sent))
            await signals.send(signal.SIGTERM)

    trio.run(main)
    assert notifier.sent[0].startswith("READY=1 STATUS=serving; waiting")
    assert notifier.sent[1].startswith("STATUS=1 IPv4 CIDRs -> AP 10.77.0.11 on eth0")
    assert "[no changes" in notifier.sent[1]


def test_new_cidrs_are_written_unwatched_and_a_change_by_another_process_meanwhile_heals():
    """Writing new CIDRs (first apply, reload) leaves the nftables event group: each listener
    costs the kernel one notification per element. An AP switch stays watched. If another
    process committed to nftables meanwhile (the generation moved more than our commits), a
    heal re-reads the kernel."""
    import contextlib

    routes = FakeRoutes({"10.77.0.11": link(2, "eth0"), "10.77.0.12": link(2, "eth0")})
    nft = FakeNft()
    applier = Applier(routes, nft, FakeSysctl())
    unwatched_applies: list[str] = []
    real_apply = applier.apply

    def apply(desired):
        if watching["off"]:
            unwatched_applies.append(str(desired.ap4))
            if desired.ap4 == ipaddress.ip_address("10.77.0.12"):
                nft.others += 1  # someone commits while sdnsup is not listening
        return real_apply(desired)

    applier.apply = apply  # type: ignore[method-assign]
    watching = {"off": False}

    @contextlib.contextmanager
    def unwatched():
        watching["off"] = True
        try:
            yield
        finally:
            watching["off"] = False

    wider = RunConfig(cidrs=parse_cidrs(["10.10.10.0/24,10.10.20.0/24"]), aps=CONFIG.aps)
    heals: list[str] = []

    async def main():
        mailbox = Mailbox()
        real_heal = mailbox.heal
        mailbox.heal = lambda cause: (heals.append(cause), real_heal(cause))  # type: ignore[method-assign]
        applied_states: list[object] = []
        changed = trio.Event()

        def on_applied(desired, result):
            nonlocal changed
            applied_states.append(desired)
            changed.set()
            changed = trio.Event()

        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(
                    applier_task, applier, mailbox, unwatched=unwatched, on_applied=on_applied
                )
            )

            async def post(state):
                mailbox.post(state)
                with trio.fail_after(5):
                    while state not in applied_states:
                        await changed.wait()

            await post(desired_for(CONFIG, CONFIG.aps[0]))  # first apply: new CIDRs
            await post(desired_for(CONFIG, CONFIG.aps[1]))  # an AP switch: watched
            assert heals == []
            await post(desired_for(wider, CONFIG.aps[1]))  # a reload, and a foreign commit
            nursery.cancel_scope.cancel()

    trio.run(main)  # the real clock: the applies run in a worker thread
    assert unwatched_applies == ["10.77.0.11", "10.77.0.12"]
    assert heals == ["nftables changed by another process while sdnsup wrote its CIDRs"]
