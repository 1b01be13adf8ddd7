"""The processes a lab runs in its namespaces, and their logs.

:class:`Lab` is a :class:`~sdnsup.lab.topology.Topology` that also runs things in it:

* any command, to completion (:meth:`Lab.exec`) or tracked in the background
  (:meth:`Lab.popen`), its output in a log file in the lab's temp dir (:meth:`Lab.logs`);
* sdnsup itself (:meth:`Lab.run_sdnsup`), with its logs and saved AP list in that temp dir;
* :mod:`~sdnsup.lab.whoami` servers and their clients: one-shot probes, persistent sessions
  and tickers (:mod:`~sdnsup.lab.probe`, :mod:`~sdnsup.lab.ticker`);
* a probe agent in each AP (:mod:`~sdnsup.lab.apagent`), whose delay and drop are set
  while it runs, and the control center (:mod:`~sdnsup.lab.cc`), whose answer is too.

Every process started here is stopped (SIGTERM, then SIGKILL) when the lab goes down, before
its namespaces are removed. Tests build a lab with ``Lab.create(...)`` or ``Lab.up(...)``.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sdnsup.lab import apagent as _apagent
from sdnsup.lab import cc as _cc
from sdnsup.lab.commands import DEFAULT_TIMEOUT, LabError, run
from sdnsup.lab.services import (
    DEFAULT_GRACE,
    Session,
    Ticker,
    TrackedProcess,
    in_namespace,
    lab_script,
    python_env,
    python_module,
    stop_processes,
)
from sdnsup.lab.topology import Topology

DEFAULT_PORT = 8080
# sdnsup's host id in the lab: among near-equal APs of equal weight it prefers ap1, then
# ap2, ... ap6 (its rendezvous keys happen to fall in that order), like a CC's order of
# preference, and the same on every machine (a machine-id would differ). Tests of the
# weighted choice itself give their own ids.
LAB_HOST_ID = "sdnsup-lab-68"


class Lab(Topology):
    """A lab topology and the processes run in it (see the module docstring).

    Build it with :meth:`create` (a context manager) or :meth:`up` (then call :meth:`down`, or
    use the lab itself as a context manager). Teardown stops every process started in the
    lab, removes all of its namespaces and is idempotent; an ``atexit`` hook and SIGTERM
    handling make sure it also happens when a test run is interrupted.
    """

    def _plan_processes(self) -> None:
        self._procs: list[TrackedProcess] = []
        self._sessions: list[Session] = []
        self._tickers: list[Ticker] = []
        self._cc_proc: subprocess.Popen[bytes] | None = None  # set by start_cc
        self._cc_url: str | None = None

    def _stop_processes(self) -> None:
        """Close the sessions, stop every process (all at once) and close our pipe ends."""
        for session in self._sessions:
            with contextlib.suppress(Exception):
                session.close(timeout=0.5)
        stop_processes([t.proc for t in self._procs], grace=DEFAULT_GRACE)
        for tracked in self._procs:
            if tracked.proc.stdout is not None:
                tracked.proc.stdout.close()
            if tracked.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    tracked.proc.stdin.close()

    # --- running things -------------------------------------------------------------------

    def exec(
        self,
        ns: str,
        *argv: str,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside namespace ``ns`` (name or role) to completion, output captured.

        Raises :class:`~sdnsup.lab.commands.CommandError` (with stderr) on a non-zero exit
        when ``check``, and :class:`subprocess.TimeoutExpired` after ``timeout`` seconds.
        """
        argv_ns = in_namespace(self._resolve(ns), [str(a) for a in argv])
        return run(argv_ns, stdin=input, check=check, timeout=timeout, env=python_env())

    def popen(
        self,
        ns: str,
        *argv: str,
        env: Mapping[str, str] | None = None,
        label: str | None = None,
        **kwargs: object,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in namespace ``ns``, tracked: it is stopped at teardown.

        stdout and stderr go to a log file in the lab's temp dir unless given in ``kwargs``
        (read it with :meth:`logs`); stdin is /dev/null unless given. ``env`` holds variables
        added to this process's environment. Other ``kwargs`` go to :class:`subprocess.Popen`.
        """
        ns = self._resolve(ns)
        assert self.tmpdir is not None
        label = label or f"{ns.removeprefix(self.prefix)}-{Path(str(argv[0])).name}"
        log_path: Path | None = None
        log_file = None
        if "stdout" not in kwargs or "stderr" not in kwargs:
            log_path = self.tmpdir / f"{len(self._procs):02d}-{label}.log"
            log_file = open(log_path, "wb")  # the child gets its own copy; ours is closed below
            kwargs.setdefault("stdout", log_file)
            kwargs.setdefault(
                "stderr", log_file if kwargs["stdout"] is not log_file else subprocess.STDOUT
            )
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("start_new_session", True)
        try:
            proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
                in_namespace(ns, [str(a) for a in argv]), env=python_env(env), **kwargs
            )
        finally:
            if log_file is not None:
                log_file.close()
        self._procs.append(TrackedProcess(proc, label, log_path))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = DEFAULT_GRACE) -> int:
        """SIGTERM ``proc`` (its process group), SIGKILL after ``grace`` s; its exit status."""
        stop_processes([proc], grace=grace)
        return proc.returncode

    def logs(self, proc: subprocess.Popen[bytes]) -> str:
        """Everything a process started by :meth:`popen` wrote to its log file so far."""
        for tracked in self._procs:
            if tracked.proc is proc:
                if tracked.log_path is None:
                    return ""
                try:
                    return tracked.log_path.read_text(errors="replace")
                except FileNotFoundError:
                    return ""
        raise ValueError("not a process of this lab")

    def all_logs(self) -> str:
        """The logs of every process of this lab, each under a header (for failure reports)."""
        parts = []
        for tracked in self._procs:
            status = tracked.proc.poll()
            state = "running" if status is None else f"exit {status}"
            args = " ".join(str(a) for a in tracked.proc.args[4:])  # type: ignore[index]
            parts.append(f"===== {tracked.label} ({state}): {args}\n{self.logs(tracked.proc)}")
        return "\n".join(parts)

    def _lab_file(self, name: str) -> Path:
        """A file of this lab's temp dir (control files and ready files of its processes)."""
        if not self.is_up or self.tmpdir is None:
            raise LabError(f"lab {self.prefix} is not up")
        return self.tmpdir / name

    def _wait_ready(
        self, proc: subprocess.Popen[bytes], ready: Path, deadline: float, what: str
    ) -> None:
        """Wait until ``proc`` creates its ready file; stop it if it exits or is late."""
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop(proc, grace=0.5)
                raise LabError(f"{what} did not start:\n{self.logs(proc)}")
            time.sleep(0.01)

    # --- sdnsup ---------------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        """Where the sdnsup processes of this lab keep their saved AP lists (delete it to
        make the next start a first boot)."""
        assert self.tmpdir is not None
        return self.tmpdir / "sdnsup-state"

    def run_sdnsup(
        self,
        ns: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        wrapper: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        """Start ``python -m sdnsup.cli ARGS`` in ``ns``, output to a log file (:meth:`logs`).

        ``wrapper`` runs it under another command (``setpriv`` with fewer capabilities).

        sdnsup's own file log and its saved AP list go to the lab's temp dir (not the host's
        /tmp/sdnsup and /var/lib/sdnsup, which several labs would share), no host config
        file is read, and the host id is :data:`LAB_HOST_ID` (not this machine's), unless
        ``env`` says otherwise.
        """
        argv = [*wrapper, *python_module("sdnsup.cli", *(str(a) for a in args))]
        assert self.tmpdir is not None
        base = {
            "SDNSUP_LOG_DIR": str(self.tmpdir / "sdnsup-logs"),
            "SDNSUP_STATE_DIR": str(self.state_dir),
            "SDNSUP_HOST_ID": LAB_HOST_ID,
            "SDNSUP_CONFIG": "none",
        }
        label = f"{ns.removeprefix(self.prefix)}-sdnsup"
        return self.popen(ns, *argv, env={**base, **(env or {})}, label=label)

    # --- whoami servers and their clients (sdnsup.lab.whoami, probe, ticker) --------------

    def serve_whoami(
        self, ns: str, port: int = DEFAULT_PORT, timeout: float = 5.0
    ) -> subprocess.Popen[bytes]:
        """Start a :mod:`~sdnsup.lab.whoami` server in ``ns`` and wait until it listens."""
        assert self.tmpdir is not None
        ready = self.tmpdir / f"whoami-{len(self._procs)}.ready"
        argv = lab_script("whoami", "--port", str(port), "--ready-file", str(ready))
        label = f"{self._resolve(ns).removeprefix(self.prefix)}-whoami-{port}"
        proc = self.popen(ns, *argv, label=label)
        self._wait_ready(proc, ready, time.monotonic() + timeout, f"whoami in {ns} port {port}")
        return proc

    def whoami(
        self,
        ns: str,
        addr: object,
        port: int = DEFAULT_PORT,
        timeout: float = 3.0,
        source: object | None = None,
    ) -> str | None:
        """Connect from ``ns`` to a whoami server; the address it saw, None on failure.

        ``source`` binds the client to a local address first.
        """
        args = [str(addr), str(port), "--timeout", str(timeout)]
        if source is not None:
            args += ["--source", str(source)]
        argv = lab_script("probe", *args)
        try:
            proc = self.exec(ns, *argv, check=False, timeout=timeout + 10)
        except subprocess.TimeoutExpired:
            return None
        out = proc.stdout.strip()
        return out if proc.returncode == 0 and out else None

    def open_session(
        self, ns: str, addr: object, port: int = DEFAULT_PORT, timeout: float = 3.0
    ) -> Session:
        """Open one persistent TCP connection from ``ns`` to a whoami server.

        Raises :class:`~sdnsup.lab.commands.LabError` when it cannot be established within
        ``timeout``. The session is closed at teardown if not before.
        """
        argv = lab_script("probe", str(addr), str(port), "--session", "--timeout", str(timeout))
        label = f"{self._resolve(ns).removeprefix(self.prefix)}-session"
        proc = self.popen(
            ns, *argv, label=label, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        session = Session(proc, f"{ns}->[{addr}]:{port}")
        self._sessions.append(session)
        if session.wait_greeting(timeout + 5) is None:
            session.close(timeout=0.5)
            raise LabError(f"session {session.description} failed:\n{self.logs(proc)}")
        return session

    def open_ticker(
        self,
        ns: str,
        addr: object,
        port: int = DEFAULT_PORT,
        *,
        idle: bool = False,
        interval: float = 0.1,
        timeout: float = 3.0,
        wait: bool = True,
    ) -> Ticker:
        """Open a long-lived connection from ``ns`` to a whoami server that exchanges a line
        every ``interval`` (or, ``idle``, blocks in ``recv()`` and reconnects once it fails).

        Raises :class:`~sdnsup.lab.commands.LabError` when it does not open within
        ``timeout`` (with ``wait`` False it returns at once: the caller checks
        :meth:`Ticker.wait_open`, e.g. to open several at a time). It is stopped at teardown
        if not before.
        """
        argv = lab_script(
            "ticker", str(addr), str(port), "--interval", str(interval),
            "--timeout", str(timeout), *(["--idle"] if idle else []),
        )  # fmt: skip
        label = f"{self._resolve(ns).removeprefix(self.prefix)}-ticker"
        proc = self.popen(ns, *argv, label=label, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        ticker = Ticker(proc, f"{ns}->[{addr}]:{port}")
        self._tickers.append(ticker)
        if wait and ticker.wait_open(timeout + 5) is None:
            ticker.stop(timeout=0.5)
            raise LabError(f"ticker {ticker.description} failed:\n{self.logs(proc)}")
        return ticker

    # --- probe agents (sdnsup.lab.apagent) ------------------------------------------------

    def _agent_control(self, index: int) -> Path:
        return self._lab_file(f"apagent-ap{self.ap(index).index}.json")

    def start_ap_agents(
        self, delays: Mapping[int, float] | None = None, timeout: float = 5.0
    ) -> list[subprocess.Popen[bytes]]:
        """Start a probe agent (:mod:`~sdnsup.lab.apagent`) in every AP namespace.

        Each answers udp echo on 7300 and tcp/``GET /health`` on 7301 after its delay
        (``delays``: AP index -> seconds, default 0). Returns once every agent answered a
        udp echo and an http probe from A, on IPv4 and IPv6. Call it once per lab.

        Raises:
            LabError: an agent did not start or did not answer within ``timeout`` seconds.
            IndexError: ``delays`` names an AP this lab does not have.
        """
        delays = dict(delays or {})
        for index in delays:
            self.ap(index)
        deadline = time.monotonic() + timeout
        started = []
        for ap in self.aps:
            control = self._agent_control(ap.index)
            _apagent.write_control(control, delays.get(ap.index, 0.0))
            ready = self._lab_file(f"apagent-ap{ap.index}.ready")
            ready.unlink(missing_ok=True)
            argv = lab_script(
                "apagent", "serve", "--control", str(control), "--ready-file", str(ready)
            )
            proc = self.popen(ap.ns, *argv, label=f"ap{ap.index}-apagent")
            started.append((proc, ready))
        for index, (proc, ready) in enumerate(started, 1):
            self._wait_ready(proc, ready, deadline, f"the agent in AP {index}")
        addrs = [str(a) for ap in self.aps for a in (ap.addr, ap.addr6)]
        remaining = max(0.5, deadline - time.monotonic())
        argv = lab_script("apagent", "check", *addrs, "--timeout", str(remaining))
        result = self.exec(self.ns_a, *argv, check=False, timeout=remaining + 10)
        if result.returncode != 0:
            raise LabError(f"AP agents do not answer from A: {result.stderr.strip()}")
        return [proc for proc, _ in started]

    def _agent_settings(self, index: int) -> dict[str, Any]:
        control = self._agent_control(index)
        try:
            settings: dict[str, Any] = json.loads(control.read_text())
        except FileNotFoundError:
            raise LabError(f"no agent runs in AP {index}: call start_ap_agents()") from None
        return settings

    def set_ap_delay(self, index: int, seconds: float) -> None:
        """Make AP ``index``'s agent answer probes after ``seconds`` (from its next probe)."""
        settings = self._agent_settings(index)
        _apagent.write_control(self._agent_control(index), seconds, bool(settings.get("drop")))

    def set_ap_drop(self, index: int, drop: bool, firewall: bool = True) -> None:
        """Make AP ``index`` stop (or resume) answering probes, its sockets left open.

        Its agent reads and ignores udp and http probes. With ``firewall`` (the default), an
        nftables table in the AP's namespace also drops tcp connects to the agent's port and
        ICMP echo requests to the AP (:meth:`drop_ap_probes`), so every probe kind sees it
        dead; forwarded traffic through the AP is not affected.
        """
        settings = self._agent_settings(index)
        delay = float(settings.get("delay", 0.0))
        _apagent.write_control(self._agent_control(index), delay, drop)
        if firewall:
            self.drop_ap_probes(index, drop, _apagent.TCP_PORT)

    # --- the control center (sdnsup.lab.cc) -----------------------------------------------

    def cc_answer(
        self,
        aps: Sequence[int] | None = None,
        ttl: float = 60,
        probe: Mapping[str, Any] | None = None,
        weights: Mapping[int, int] | None = None,
    ) -> dict[str, Any]:
        """A CC answer listing this lab's APs ``aps`` (indexes, default all) as ``ap1``...

        Each entry has ``addr``/``addr6`` (the AP's uplink addresses), ``probe`` (default
        udp to the lab agent's port 7300) and its weight from ``weights`` (default 1).
        """
        spec = dict(probe) if probe is not None else {"kind": "udp", "port": _apagent.UDP_PORT}
        indexes = list(aps) if aps is not None else [ap.index for ap in self.aps]
        entries = []
        for index in indexes:
            ap = self.ap(index)
            entries.append(
                {
                    "id": f"ap{ap.index}",
                    "addr": str(ap.addr),
                    "addr6": str(ap.addr6),
                    "probe": dict(spec),
                    "weight": (weights or {}).get(index, 1),
                }
            )
        return {"aps": entries, "ttl": ttl}

    def set_cc(
        self,
        mode: str = "ok",
        answer: Mapping[str, Any] | None = None,
        aps: Sequence[int] | None = None,
        ttl: float = 60,
        slow_seconds: float = _cc.DEFAULT_SLOW_SECONDS,
        probe: Mapping[str, Any] | None = None,
        weights: Mapping[int, int] | None = None,
    ) -> None:
        """Set what the lab CC answers from its next request (see :mod:`sdnsup.lab.cc`).

        ``mode``: ``ok``, ``500``, ``garbage``, ``slow`` (after ``slow_seconds``) or
        ``oversize``. ``answer`` defaults to :meth:`cc_answer` ``(aps, ttl, probe, weights)``. The
        control file is replaced atomically; this may be called before :meth:`start_cc`.
        """
        if answer is None:
            answer = self.cc_answer(aps, ttl, probe, weights)
        _cc.write_control(self._lab_file("cc.json"), mode, answer, slow_seconds)

    def start_cc(
        self,
        ns: str | None = None,
        port: int = 8000,
        token: str | None = None,
        host: str | None = None,
        timeout: float = 5.0,
    ) -> str:
        """Start the lab CC (:mod:`~sdnsup.lab.cc`) and return its URL as seen from A.

        By default it runs in R on its br-lan address (``http://172.31.1.1:8000``): A
        reaches it on its LAN, never through an AP. ``host`` overrides the address it
        binds and the URL names. With ``token``, requests need ``Authorization: Bearer``
        that token. It serves what :meth:`set_cc` wrote (``ok`` with every AP if nothing).

        Raises:
            LabError: a CC already runs, or it did not start within ``timeout``.
        """
        if self._cc_proc is not None and self._cc_proc.poll() is None:
            raise LabError("the lab CC already runs: stop_cc() first")
        ns = self._resolve(ns or self.ns_r)
        host = host or self._address_in(ns)
        control = self._lab_file("cc.json")
        if not control.exists():
            self.set_cc()
        argv = ["--host", host, "--port", str(port), "--control", str(control)]
        if token is not None:
            token_file = self._lab_file("cc-token")
            token_file.touch(mode=0o600)
            token_file.write_text(token)
            argv += ["--token-file", str(token_file)]
        ready = self._lab_file("cc.ready")
        ready.unlink(missing_ok=True)
        label = f"{ns.removeprefix(self.prefix)}-cc-{port}"
        proc = self.popen(ns, *lab_script("cc", *argv, "--ready-file", str(ready)), label=label)
        self._wait_ready(proc, ready, time.monotonic() + timeout, f"the CC in {ns}")
        self._cc_proc = proc
        self._cc_url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        return self._cc_url

    @property
    def cc_process(self) -> subprocess.Popen[bytes] | None:
        """The running lab CC's process (for :meth:`logs`), None when it is not running."""
        return self._cc_proc

    def cc_requests(self) -> list[tuple[float, str, int]]:
        """The running lab CC's ``GET /v1/aps`` requests so far: (wall-clock time, client
        address, status), oldest first (from its log)."""
        if self._cc_proc is None:
            return []
        out = []
        for line in self.logs(self._cc_proc).splitlines():
            parts = line.split()
            if len(parts) == 7 and parts[0] == "cc:" and parts[3] == "/v1/aps":
                out.append((float(parts[6]), parts[1], int(parts[4])))
        return out

    def stop_cc(self) -> None:
        """Stop the lab CC: connections to its URL are refused from now on. Idempotent."""
        if self._cc_proc is not None:
            self.stop(self._cc_proc, grace=2.0)
            self._cc_proc = None


__all__ = ["DEFAULT_PORT", "LAB_HOST_ID", "Lab"]
