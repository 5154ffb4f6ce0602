"""The launcher's side of a run: the coordinator as a child process, and the loop that starts
agents in order, carries out kills from outside the target, respawns and resumes."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from rich.console import Console

from coordinator.launch.agents import AgentLauncher
from coordinator.launch.faults import START, parse_coordinator_kill, parse_kill, random_kills
from coordinator.launch.options import PreparedRun, SimulateOptions
from protocol import link
from protocol.exit_codes import RETRIABLE_AGENT_EXITS, AgentExit
from protocol.run_settings import DEFAULT_BIND
from sandbox import Sandbox, layout

if TYPE_CHECKING:
    from coordinator.launch.ray_fleet import RayFleet
    from coordinator.launch.terminal import LiveView

READY_TIMEOUT_S = 180.0  # a cold start imports torch and transformers on a busy machine
FINISH_TIMEOUT_S = 60.0  # from the coordinator's "finished" to its exit
AGENT_RETRIES = 3  # restarts of an agent that exited with a retriable status (coordinator lost, no welcome)
RETRY_DELAY_S = 0.5
COORDINATOR_STOPPED_S = 60.0  # a coordinator stopped (SIGSTOP) this long is given up on
RETRIABLE = {int(code) for code in RETRIABLE_AGENT_EXITS}


class CoordinatorGone(RuntimeError):
    """The coordinator process ended (or never became ready) before the run could go on."""


class CoordinatorProcess:
    """The coordinator as a child process: progress JSON on its stdout, control on its stdin."""

    def __init__(
        self,
        run_dir: Path,
        box: Sandbox,
        faults: dict[str, Any] | None = None,
        bind: str = DEFAULT_BIND,
        quota_bytes: int | None = None,
    ) -> None:
        stderr = box.open_append(layout.COORDINATOR_STDERR)
        extra = ["--quota-bytes", str(quota_bytes)] if quota_bytes else []
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "coordinator",
                "--run-dir",
                str(run_dir),
                "--control-stdin",
                "--faults",
                json.dumps(faults or {}),
                "--bind",
                bind,
                *extra,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        stderr.close()
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(link.parse_progress(line))
        self.events.put(None)

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return {"progress": link.IDLE}

    def await_ready(self, early: list[dict[str, Any]] | None = None) -> str:
        """Wait for the coordinator's endpoint; events before it (a resumed run's restore) go to `early`."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            ev = self.next_event(1.0)
            if ev is None:
                raise CoordinatorGone(
                    f"the coordinator exited ({self.proc.wait()}) before it was ready; "
                    f"see {layout.COORDINATOR_STDERR} in the run directory"
                )
            if ev.get("progress") == link.READY:
                return str(ev["endpoint"])
            if early is not None and ev.get("progress") != link.IDLE:
                early.append(ev)
        self.proc.kill()
        raise CoordinatorGone(f"the coordinator was not ready within {READY_TIMEOUT_S}s: killed")

    def control(self, kind: str, reason: str = "") -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.write(link.control_line(kind, reason))
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass


def run_faults(opts: SimulateOptions, fragments: int) -> dict[str, Any]:
    kills = [parse_kill(spec, fragments) for spec in opts.kill]
    kills += random_kills(opts.kill_random, fragments, opts.seed)
    return {"kills": kills, "kill_coordinator": parse_coordinator_kill(opts.kill_coordinator)}


class Driver:
    """The launcher's loop: start agents in order, react to the coordinator's progress, carry
    out kills from outside the target process, respawn, and replace a killed coordinator."""

    def __init__(
        self,
        opts: SimulateOptions,
        run: PreparedRun,
        console: Console,
        faults: dict[str, Any],
        *,
        local_agents: bool = True,
        fleet: RayFleet | None = None,
    ) -> None:
        """`local_agents` False: agents run elsewhere (`fragsim agent --bundle`); the launcher
        starts none and waits for theirs, however long they take. `fleet`: they are Ray actors
        (`serve --ray`), which this loop supervises and, for fault injection, kills."""
        self.opts, self.run, self.console = opts, run, console
        self.local_agents = local_agents
        self.fleet = fleet
        self.start_kills = [f for f, x in faults["kills"] if x == START]
        self.coordinator_faults = {
            "kills": [[f, x] for f, x in faults["kills"] if x != START],
            "kill_coordinator": faults["kill_coordinator"],
        }
        self.planned_kills = [list(k) for k in self.coordinator_faults["kills"]]  # for the record
        self.view: LiveView | None = None
        self.coordinator: CoordinatorProcess | None = None
        self.launcher: AgentLauncher | None = None
        self.committed = self._committed_on_disk()
        self.pending = [f for f in run.order if f not in self.committed] if local_agents else []
        self.connect_by: dict[int, float] = {}  # spawned agents that have not said HELLO yet
        self.retries: dict[int, int] = {}
        self.stopped_since: float | None = None
        self.started: list[int] = []
        self.waiting_for: int | None = None
        self.respawn_at: dict[int, float] = {}
        self.given_up: set[int] = set()
        self.kills: list[dict[str, Any]] = []
        self.resumes = 0
        self.coordinator_code: int | None = None
        self.asked_to_end = False
        self.early: list[dict[str, Any]] = []
        self.peak_rss: dict[str, int] = {}
        self.peak_unshared: dict[str, int] = {}
        self._next_sample = 0.0

    # ---- processes -------------------------------------------------------------------

    def start_coordinator(self) -> None:
        self.coordinator = CoordinatorProcess(
            self.run.run_dir,
            self.run.box,
            self.coordinator_faults,
            bind=self.opts.bind,
            quota_bytes=self.opts.quota_bytes,
        )

    def _committed_on_disk(self) -> set[int]:
        return {i for i in range(len(self.run.plan.fragments)) if self.run.box.exists(layout.committed_dir(i))}

    def await_ready(self) -> None:
        assert self.coordinator is not None
        endpoint = self.coordinator.await_ready(self.early)
        if self.launcher is None:
            self.launcher = AgentLauncher(self.run.run_dir, endpoint)
        self.launcher.endpoint = endpoint
        # A restarted coordinator re-verified the sandbox before it was ready and may have set
        # fragments aside: what is committed now is what its restore left.
        on_disk = self._committed_on_disk()
        self.pending += [f for f in self.run.order if f in self.committed - on_disk and f not in self.pending]
        self.committed &= on_disk

    def await_warm(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Wait until the coordinator finished importing torch, so the baseline is timed on a quiet machine."""
        assert self.coordinator is not None
        if any(ev.get("progress") == link.WARM for ev in self.early):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ev = self.coordinator.next_event(0.5)
            if ev is None:
                raise CoordinatorGone(f"the coordinator exited while loading torch; see {layout.COORDINATOR_STDERR}")
            if ev.get("progress") == link.WARM:
                return
            if ev.get("progress") != link.IDLE:
                self.early.append(ev)

    def spawn(self, fragment: int) -> None:
        assert self.launcher is not None and self.coordinator is not None
        proc = self.launcher.spawn(fragment)
        # Only the coordinator's host can check a pid, and only this launcher knows which are its own.
        self.coordinator.control(link.SPAWNED, f"{fragment} {proc.pid}")
        self.connect_by[fragment] = time.monotonic() + self.opts.connect_timeout
        if fragment not in self.started:
            self.started.append(fragment)
        if fragment in self.start_kills:  # before HELLO: the process has not even imported zmq yet
            self.start_kills.remove(fragment)
            self.kill_agent(fragment, "start")

    def kill_agent(self, fragment: int, fraction: Any) -> None:
        assert self.launcher is not None
        if self.fleet is not None:  # Ray restarts the actor, which resumes: no respawn of ours
            pid = self.fleet.kill_actor(fragment)
            self.kills.append({"target": "agent", "fragment": fragment, "fraction": fraction, "pid": pid,
                               "t": time.time(), "ray": True})  # fmt: skip
            self.say(f"[red]SIGKILL[/] agent {fragment}'s Ray actor (pid {pid}) at {fraction}")
            return
        proc = self.launcher.procs[fragment]
        self.launcher.kill(fragment)
        self.kills.append(
            {"target": "agent", "fragment": fragment, "fraction": fraction, "pid": proc.pid, "t": time.time()}
        )
        self.say(f"[red]SIGKILL[/] agent {fragment} (pid {proc.pid}) at {fraction}")
        self._after_agent_loss(fragment)

    def _after_agent_loss(self, fragment: int) -> None:
        """A killed or hung agent: respawn it with --respawn, otherwise give its fragment up."""
        self.connect_by.pop(fragment, None)
        if self.opts.respawn:
            self.respawn_at[fragment] = time.monotonic() + self.opts.respawn_delay
        else:
            self.given_up.add(fragment)
            if self.waiting_for == fragment:
                self.waiting_for = None

    def _stop_hung(self, fragment: int, why: str) -> None:
        """SIGKILL an agent process that is alive but useless (stopped, or never connected)."""
        assert self.launcher is not None
        proc = self.launcher.procs[fragment]
        self.launcher.kill(fragment)
        self.say(f"[red]agent {fragment}[/] (pid {proc.pid}) {why}: SIGKILLed")
        self._after_agent_loss(fragment)

    def kill_coordinator(self, point: dict[str, Any]) -> bool:
        """SIGKILL the coordinator; with --resume start a new one on the same run. True if resumed."""
        assert self.coordinator is not None and self.launcher is not None
        self.coordinator.proc.kill()
        self.coordinator.proc.wait()
        self.kills.append(
            {
                "target": "coordinator",
                "at": point.get("at"),
                "stage": point.get("stage"),
                "pid": point.get("pid"),
                "t": time.time(),
            }
        )
        self.say(f"[red]SIGKILL[/] coordinator (pid {point.get('pid')}) at {point.get('at')}")
        # Agents of a dead coordinator are orphans: stop them; they are respawned against the new one.
        for fragment in list(self.launcher.procs):
            self.launcher.kill(fragment)
        if not self.opts.resume:
            return False
        self.resumes += 1
        self.coordinator_faults = {"kills": self.coordinator_faults["kills"], "kill_coordinator": None}
        self.start_coordinator()
        self.await_ready()
        self.say(f"coordinator resumed from the sandbox (resume {self.resumes})")
        if self.fleet is not None:
            self.fleet.start(self.launcher.endpoint, self.committed)
        for fragment in self.started:
            if fragment not in self.committed and fragment not in self.given_up:
                self.respawn_at[fragment] = time.monotonic()
        return True

    def say(self, text: str) -> None:
        self.console.print(text)

    # ---- the loop --------------------------------------------------------------------

    def drive(self) -> str:
        assert self.coordinator is not None and self.launcher is not None
        next_launch = time.monotonic()
        while True:
            now = time.monotonic()
            # --parallel without a stagger starts every agent in this one pass: agents that start
            # a loop turn apart would reach the coordinator (and a shared link) in that order.
            while self.pending and self.waiting_for is None and time.monotonic() >= next_launch:
                fragment = self.pending.pop(0)
                if not self.opts.parallel:
                    self.waiting_for = fragment
                self.spawn(fragment)
                next_launch = time.monotonic() + self.opts.stagger
            for fragment, when in list(self.respawn_at.items()):
                if now >= when:
                    del self.respawn_at[fragment]
                    if fragment not in self.committed:
                        self.say(f"respawning agent {fragment}")
                        self.spawn(fragment)
            ev = self.early.pop(0) if self.early else self.coordinator.next_event(0.05)
            if ev is None:
                self.coordinator_code = self.coordinator.proc.wait()
                return "coordinator exited"
            kind = ev.get("progress")
            if self.view is not None:
                self.view.show(ev)
            if kind == link.KILL_POINT and ev["target"] == "agent":
                self.kill_agent(ev["fragment"], ev["fraction"])
                self.coordinator.control(link.KILLED)
                # Done: a coordinator restarted later must not find this point again in its restored
                # progress and kill the fragment's next agent too.
                point = [ev["fragment"], ev["fraction"]]
                if point in self.coordinator_faults["kills"]:
                    self.coordinator_faults["kills"].remove(point)
            elif kind == link.KILL_POINT and ev["target"] == "coordinator":
                if not self.kill_coordinator(ev):
                    return "coordinator killed"
            elif kind == link.HELLO:
                self.connect_by.pop(ev["fragment"], None)
            elif kind == link.DEAD and ev.get("fragment") is not None:
                # Declared dead by missed heartbeats while its process lives (stopped, or stuck): end it.
                proc = self.launcher.procs.get(ev["fragment"])
                if proc is not None and proc.pid == ev.get("pid") and proc.poll() is None:
                    self._stop_hung(ev["fragment"], f"was declared dead by the coordinator ({ev['reason']})")
            elif kind in (link.COMMITTED, link.ARRIVAL):
                fragment = ev["fragment"]
                self.committed.add(fragment)
                self.connect_by.pop(fragment, None)
                self.respawn_at.pop(fragment, None)
                if self.waiting_for == fragment:
                    self.waiting_for = None
                    next_launch = time.monotonic() + self.opts.stagger
            elif kind == link.FINISHED:
                self.coordinator_code = self.coordinator.proc.wait(timeout=FINISH_TIMEOUT_S)
                return "complete" if ev["complete"] else "incomplete"
            self._notice_exits()
            self._notice_hung(time.monotonic())
            if self._coordinator_stopped_too_long(time.monotonic()):
                self.coordinator.proc.kill()
                self.coordinator_code = self.coordinator.proc.wait()
                return "coordinator stopped"
            self._sample_memory()
            if self.fleet is not None:
                self._supervise_fleet()
            if (
                self.local_agents
                and not self.pending
                and self.waiting_for is None
                and not self.respawn_at
                and not self.asked_to_end
                and all(self.launcher.exited(f) is not None for f in self.launcher.procs)
                and len(self.committed) < len(self.run.plan.fragments)
            ):
                # Nobody left to deliver the missing fragments: finish with the longest prefix.
                self.coordinator.control(link.END, "every agent has exited")
                self.asked_to_end = True

    def _supervise_fleet(self) -> None:
        assert self.fleet is not None and self.coordinator is not None
        lost = self.fleet.tick(self.committed)
        missing = set(range(len(self.run.plan.fragments))) - self.committed
        if lost and missing <= lost and not self.asked_to_end:
            # No alive node can serve what is missing: finish with the longest prefix.
            self.coordinator.control(link.END, f"no Ray node can serve fragments {sorted(lost)}")
            self.asked_to_end = True

    def _sample_memory(self) -> None:
        """Peak resident memory of the coordinator and of each agent, sampled every 50 ms, and
        the peak of what is not file-backed (RSS - shared): the coordinator maps the model's
        safetensors files, so its RSS counts the page cache that holds them."""
        now = time.monotonic()
        if now < self._next_sample or self.launcher is None or self.coordinator is None:
            return
        self._next_sample = now + 0.05
        targets: dict[str, subprocess.Popen[Any]] = {"coordinator": self.coordinator.proc}
        targets.update({f"agent_{f:02d}": p for f, p in self.launcher.procs.items()})
        for name, proc in targets.items():
            try:
                info = psutil.Process(proc.pid).memory_info()
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            self.peak_rss[name] = max(self.peak_rss.get(name, 0), info.rss)
            unshared = info.rss - getattr(info, "shared", 0)
            self.peak_unshared[name] = max(self.peak_unshared.get(name, 0), unshared)

    def _notice_hung(self, now: float) -> None:
        assert self.launcher is not None
        for fragment, deadline in list(self.connect_by.items()):
            proc = self.launcher.procs[fragment]
            if proc.poll() is not None:
                self.connect_by.pop(fragment)  # it exited: _notice_exits decides
            elif now > deadline:
                self._stop_hung(fragment, f"did not connect within {self.opts.connect_timeout:g}s")

    def _coordinator_stopped_too_long(self, now: float) -> bool:
        """A coordinator that is stopped (SIGSTOP, a debugger) for good would hold the run forever."""
        assert self.coordinator is not None
        try:
            stopped = psutil.Process(self.coordinator.proc.pid).status() == psutil.STATUS_STOPPED
        except psutil.Error:
            stopped = False
        if not stopped:
            self.stopped_since = None
            return False
        self.stopped_since = self.stopped_since or now
        if now - self.stopped_since < COORDINATOR_STOPPED_S:
            return False
        self.say(
            f"[bold red]the coordinator has been stopped for {COORDINATOR_STOPPED_S:g}s[/]: SIGKILLed; "
            f"continue with: fragsim resume {self.run.run_dir}"
        )
        return True

    def _notice_exits(self) -> None:
        assert self.launcher is not None
        for fragment, proc in self.launcher.procs.items():
            rc = proc.poll()
            if rc is None or rc == 0 or fragment in self.committed or fragment in self.given_up:
                continue
            if fragment in self.respawn_at:
                continue  # our own kill, respawn already scheduled
            if rc in RETRIABLE and self.retries.get(fragment, 0) < AGENT_RETRIES:
                self.retries[fragment] = self.retries.get(fragment, 0) + 1
                self.say(
                    f"[yellow]agent {fragment} exited with status {rc} ({AgentExit(rc).name.lower()})[/]: "
                    f"restart {self.retries[fragment]} of {AGENT_RETRIES}"
                )
                self.respawn_at[fragment] = time.monotonic() + RETRY_DELAY_S
                continue
            self.given_up.add(fragment)
            self.say(f"[red]agent {fragment} exited with status {rc}[/] ({layout.agent_stderr(fragment)})")
            if self.waiting_for == fragment:
                self.waiting_for = None

    def shutdown(self) -> None:
        if self.launcher:
            self.launcher.stop_all()
        if self.coordinator and self.coordinator.proc.poll() is None:
            try:
                self.coordinator.proc.wait(timeout=FINISH_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.coordinator.proc.kill()
                self.coordinator.proc.wait()
            self.coordinator_code = self.coordinator.proc.returncode
        if self.coordinator and self.coordinator_code is None:
            self.coordinator_code = self.coordinator.proc.returncode

    def record(self) -> dict[str, Any]:
        assert self.launcher is not None
        return {
            "kills": self.kills,
            "resumes": self.resumes,
            "agent_attempts": dict(self.launcher.attempts),
            "peak_rss_mb": {k: round(v / 1e6, 1) for k, v in sorted(self.peak_rss.items())},
            "peak_unshared_mb": {k: round(v / 1e6, 1) for k, v in sorted(self.peak_unshared.items())},
            "agent_memory_limit_mb": round(self.launcher.memory_limit / 1e6),
            "faults": {"kills": self.planned_kills + [[f, START] for f in self.start_kills]},
        }
