"""`fragsim simulate`: plan, baseline, then a coordinator process and agent processes in a
chosen arrival order, with live progress in the terminal and the checkpoint table at the end."""

from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from agents.faults import START, parse_coordinator_kill, parse_kill, random_kills
from agents.keys import make_run_keys
from agents.launcher import AgentLauncher, launch_order
from agents.planner import make_plan
from agents.source import SourceCheckpoint
from coordinator.results import CHECKPOINT_HEADERS, checkpoint_rows
from protocol.layers import parse_ranges, split_layers
from protocol.plan import Plan
from sandbox import Sandbox

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE, EXIT_INCOMPLETE, EXIT_FAILED, EXIT_COORDINATOR_KILLED = 0, 1, 2, 3, 4, 5
READY_TIMEOUT_S = 180.0


@dataclass
class SimulateOptions:
    model: str | None = None
    dtype: str = "float32"
    fragments: int = 4
    ranges: str | None = None
    order: str = "random"
    seed: int = 0
    stagger: float = 0.0
    parallel: bool = False
    prompt: str = "The capital of France is"
    max_new_tokens: int = 24
    run_dir: str | None = None
    artifacts: str = "artifacts"
    threads: int = 2
    piece_size: int = 2 * 1024 * 1024
    kill: list[str] = field(default_factory=list)
    kill_random: int = 0
    respawn: bool = False
    respawn_delay: float = 0.0
    kill_coordinator: str | None = None
    resume: bool = False
    bind: str = "tcp://127.0.0.1:0"
    quota_bytes: int | None = None
    curve: bool = True


def resolve_source(opts: SimulateOptions, console: Console) -> tuple[Path, str]:
    from coordinator.prepare import DEFAULT_MODEL_NAME, is_prepared, prepare_default

    if opts.model:
        path = Path(opts.model).resolve()
        return path, path.name
    artifacts = Path(opts.artifacts)
    with console.status("preparing the source checkpoint (once; cached under artifacts/source/)"):
        path = prepare_default(artifacts, opts.dtype, log=lambda msg: console.log(msg))
    assert is_prepared(path)
    return path.resolve(), DEFAULT_MODEL_NAME


class CoordinatorProcess:
    """The coordinator as a child process: progress JSON on its stdout, control on its stdin."""

    def __init__(self, run_dir: Path, box: Sandbox, faults: dict[str, Any] | None = None,
                 bind: str = "tcp://127.0.0.1:0", quota_bytes: int | None = None) -> None:
        stderr = box.open_append("logs/coordinator.stderr")
        extra = ["--quota-bytes", str(quota_bytes)] if quota_bytes else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "coordinator", "serve", "--run-dir", str(run_dir), "--control-stdin",
             "--faults", json.dumps(faults or {}), "--bind", bind, *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        stderr.close()
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except json.JSONDecodeError:
                self.events.put({"progress": "output", "line": line.rstrip()})
        self.events.put(None)

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return {"progress": "idle"}

    def control(self, line: str) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.write(line + "\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass


class LiveView:
    """Per-agent byte bars plus one printed line per arrival and checkpoint."""

    def __init__(self, console: Console, plan: Any) -> None:
        self.console = console
        self.plan = plan
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                             console=console, transient=False, disable=not console.is_terminal)
        self.tasks = {f.index: self.bars.add_task(f"fragment {f.index} ({f.label})", total=f.nbytes, start=False)
                      for f in plan.fragments}

    def __enter__(self) -> "LiveView":
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.__exit__(*exc)

    def show(self, ev: dict[str, Any]) -> None:
        kind = ev.get("progress")
        if kind == "hello":
            self.bars.start_task(self.tasks[ev["fragment"]])
            self.console.print(f"[cyan]agent {ev['fragment']}[/] connected (pid {ev['pid']}, attempt {ev['attempt']})")
        elif kind == "bytes":
            self.bars.update(self.tasks[ev["fragment"]], completed=ev["received"])
        elif kind == "arrival":
            grew = "[green]prefix grew[/]" if ev["grew"] else "prefix unchanged"
            self.console.print(f"arrival {ev['index']}: fragment {ev['fragment']} (layers {ev['fragment_layers']})"
                               f" -> active layers {ev['layers']} {grew}")
        elif kind == "checkpoint":
            self.console.print(f"  checkpoint {ev['checkpoint']}: {ev['layers']} layers "
                               + escape(f"[{ev['label']}] {ev['generate_s']:.2f}s {ev['text']!r}"))
        elif kind == "dead":
            self.console.print(f"[red]agent of fragment {ev['fragment']} dead[/]: {ev['reason']}")
        elif kind == "storage_error":
            self.console.print("[bold red]storage error[/]: " + escape(ev["error"]) +
                               " (promoted fragments are intact; staged pieces are kept for `fragsim resume`)")
        elif kind == "rejected":
            self.console.print("[yellow]rejected[/] " + escape(ev["reason"]))


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


@dataclass
class PreparedRun:
    run_dir: Path
    box: Sandbox
    plan: Any
    order: list[int]
    source_dir: Path


def plan_run(opts: SimulateOptions, source_dir: Path, model_name: str) -> PreparedRun:
    """Read the source once and write plan.json and run.json: nothing has started yet."""
    source = SourceCheckpoint(source_dir)
    try:
        num_layers = int(source.config.get("num_hidden_layers", 0))
        ranges = parse_ranges(opts.ranges, num_layers) if opts.ranges else split_layers(num_layers, opts.fragments)
        order = launch_order(opts.order, len(ranges), opts.seed)
        run_faults(opts, len(ranges))
        run_id = new_run_id()
        run_dir = Path(opts.run_dir or Path(opts.artifacts) / "runs" / run_id).resolve()
        box = Sandbox(run_dir, create=True)
        if box.listdir("."):
            raise FileExistsError(f"run directory {run_dir} is not empty; expected a new or empty directory")
        box.mkdir("logs")
        extra = {"curve": make_run_keys(box, len(ranges))} if opts.curve else {}
        plan = make_plan(source, ranges, run_id=run_id, model_name=model_name, piece_size=opts.piece_size,
                         extra=extra)
    finally:
        source.close()
    box.write_text("plan.json", plan.dumps())
    box.write_json("run.json", {**asdict(opts), "order": order, "source_dir": str(source_dir)})
    return PreparedRun(run_dir, box, plan, order, source_dir)


def execute_run(opts: SimulateOptions, run: PreparedRun, console: Console, *,
                with_baseline: bool = True) -> tuple[int, dict[str, Any] | None]:
    """Start the coordinator, record the baseline, launch agents in order; (exit code, results)."""
    from coordinator.baseline import SourceModel  # torch: imported while the coordinator starts

    faults = run_faults(opts, len(run.plan.fragments))
    driver = Driver(opts, run, console, faults)
    try:
        driver.start_coordinator()
        if with_baseline:
            with console.status("baseline: loading the full source model"):
                source_model = SourceModel(run.source_dir, opts.threads)
                driver.await_ready()
                driver.await_warm()
            with console.status("baseline: evaluating the full source model"):
                base = source_model.record(run.box, opts.prompt, opts.max_new_tokens)
            del source_model
            console.print(f"baseline ({run.plan.num_layers} layers): {escape(repr(base['text']))} "
                          f"({base['seconds']:.2f}s)")
        else:
            driver.await_ready()
        with LiveView(console, run.plan) as view:
            driver.view = view
            outcome = driver.drive()
    finally:
        driver.shutdown()
    if outcome == "coordinator killed":
        console.print(f"[bold red]the coordinator was killed[/]; continue with: fragsim resume {run.run_dir}")
        return EXIT_COORDINATOR_KILLED, None
    code = driver.coordinator_code
    results_path = run.run_dir / "results.json"
    if not results_path.exists():
        console.print(f"[red]the coordinator exited with {code} and wrote no results[/]; see {run.run_dir}/logs/")
        return EXIT_FAILED, None
    results = json.loads(results_path.read_text())
    results["launcher"] = driver.record()
    run.box.write_json("launcher.json", results["launcher"])
    if outcome == "incomplete" or code == EXIT_INCOMPLETE:
        return EXIT_INCOMPLETE, results
    return (EXIT_OK if code == 0 and results["final_matches_baseline"] else EXIT_MISMATCH), results


def run_faults(opts: SimulateOptions, fragments: int) -> dict[str, Any]:
    kills = [parse_kill(spec, fragments) for spec in opts.kill]
    kills += random_kills(opts.kill_random, fragments, opts.seed)
    return {"kills": kills, "kill_coordinator": parse_coordinator_kill(opts.kill_coordinator)}


class Driver:
    """The launcher's loop: start agents in order, react to the coordinator's progress, carry
    out kills from outside the target process, respawn, and replace a killed coordinator."""

    def __init__(self, opts: SimulateOptions, run: PreparedRun, console: Console, faults: dict[str, Any]) -> None:
        self.opts, self.run, self.console = opts, run, console
        self.start_kills = [f for f, x in faults["kills"] if x == START]
        self.coordinator_faults = {"kills": [[f, x] for f, x in faults["kills"] if x != START],
                                   "kill_coordinator": faults["kill_coordinator"]}
        self.view: LiveView | None = None
        self.coordinator: CoordinatorProcess | None = None
        self.launcher: AgentLauncher | None = None
        self.committed: set[int] = {i for i in range(len(run.plan.fragments))
                                    if run.box.exists(f"quorum/fragment_{i:02d}")}
        self.pending = [f for f in run.order if f not in self.committed]
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
        self._next_sample = 0.0

    # ---- processes -------------------------------------------------------------------

    def start_coordinator(self) -> None:
        self.coordinator = CoordinatorProcess(self.run.run_dir, self.run.box, self.coordinator_faults,
                                              bind=self.opts.bind, quota_bytes=self.opts.quota_bytes)

    def await_ready(self) -> None:
        assert self.coordinator is not None
        endpoint = _await_ready(self.coordinator, self.early)
        if self.launcher is None:
            self.launcher = AgentLauncher(self.run.run_dir, endpoint)
        self.launcher.endpoint = endpoint

    def await_warm(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Wait until the coordinator finished importing torch, so the baseline is timed on a quiet machine."""
        assert self.coordinator is not None
        if any(ev.get("progress") == "warm" for ev in self.early):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ev = self.coordinator.next_event(0.5)
            if ev is None:
                raise RuntimeError("the coordinator exited while loading torch; see logs/coordinator.stderr")
            if ev.get("progress") == "warm":
                return
            if ev.get("progress") != "idle":
                self.early.append(ev)

    def spawn(self, fragment: int) -> None:
        assert self.launcher is not None
        self.launcher.spawn(fragment)
        if fragment not in self.started:
            self.started.append(fragment)
        if fragment in self.start_kills:  # before HELLO: the process has not even imported zmq yet
            self.start_kills.remove(fragment)
            self.kill_agent(fragment, "start")

    def kill_agent(self, fragment: int, fraction: Any) -> None:
        assert self.launcher is not None
        proc = self.launcher.procs[fragment]
        self.launcher.kill(fragment)
        self.kills.append({"target": "agent", "fragment": fragment, "fraction": fraction, "pid": proc.pid,
                           "t": time.time()})
        self.say(f"[red]SIGKILL[/] agent {fragment} (pid {proc.pid}) at {fraction}")
        if self.opts.respawn:
            self.respawn_at[fragment] = time.monotonic() + self.opts.respawn_delay
        else:
            self.given_up.add(fragment)
            if self.waiting_for == fragment:
                self.waiting_for = None

    def kill_coordinator(self, point: dict[str, Any]) -> bool:
        """SIGKILL the coordinator; with --resume start a new one on the same run. True if resumed."""
        assert self.coordinator is not None and self.launcher is not None
        self.coordinator.proc.kill()
        self.coordinator.proc.wait()
        self.kills.append({"target": "coordinator", "at": point.get("at"), "stage": point.get("stage"),
                           "pid": point.get("pid"), "t": time.time()})
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
            if self.pending and self.waiting_for is None and now >= next_launch:
                fragment = self.pending.pop(0)
                if not self.opts.parallel:
                    self.waiting_for = fragment
                self.spawn(fragment)
                next_launch = now + self.opts.stagger
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
            if kind == "kill_point" and ev["target"] == "agent":
                self.kill_agent(ev["fragment"], ev["fraction"])
                self.coordinator.control("killed")
            elif kind == "kill_point" and ev["target"] == "coordinator":
                if not self.kill_coordinator(ev):
                    return "coordinator killed"
            elif kind in ("committed", "arrival"):
                fragment = ev["fragment"]
                self.committed.add(fragment)
                self.respawn_at.pop(fragment, None)
                if self.waiting_for == fragment:
                    self.waiting_for = None
                    next_launch = time.monotonic() + self.opts.stagger
            elif kind == "finished":
                self.coordinator_code = self.coordinator.proc.wait(timeout=60)
                return "complete" if ev["complete"] else "incomplete"
            self._notice_exits()
            self._sample_memory()
            if (not self.pending and self.waiting_for is None and not self.respawn_at and not self.asked_to_end
                    and all(self.launcher.exited(f) is not None for f in self.launcher.procs)
                    and len(self.committed) < len(self.run.plan.fragments)):
                # Nobody left to deliver the missing fragments: finish with the longest prefix.
                self.coordinator.control("end: every agent has exited")
                self.asked_to_end = True

    def _sample_memory(self) -> None:
        """Peak resident memory of the coordinator and of each agent, sampled every 50 ms."""
        now = time.monotonic()
        if now < self._next_sample or self.launcher is None or self.coordinator is None:
            return
        self._next_sample = now + 0.05
        targets = {"coordinator": self.coordinator.proc}
        targets.update({f"agent_{f:02d}": p for f, p in self.launcher.procs.items()})
        for name, proc in targets.items():
            try:
                rss = psutil.Process(proc.pid).memory_info().rss
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            self.peak_rss[name] = max(self.peak_rss.get(name, 0), rss)

    def _notice_exits(self) -> None:
        assert self.launcher is not None
        for fragment, proc in self.launcher.procs.items():
            rc = proc.poll()
            if rc is None or rc == 0 or fragment in self.committed or fragment in self.given_up:
                continue
            if rc == -signal.SIGKILL and (fragment in self.respawn_at):
                continue  # our own kill, respawn already scheduled
            self.given_up.add(fragment)
            self.say(f"[red]agent {fragment} exited with status {rc}[/] (logs/agent_{fragment:02d}.*)")
            if self.waiting_for == fragment:
                self.waiting_for = None

    def shutdown(self) -> None:
        if self.launcher:
            self.launcher.stop_all()
        if self.coordinator and self.coordinator.proc.poll() is None:
            try:
                self.coordinator.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.coordinator.proc.kill()
                self.coordinator.proc.wait()
            self.coordinator_code = self.coordinator.proc.returncode
        if self.coordinator and self.coordinator_code is None:
            self.coordinator_code = self.coordinator.proc.returncode

    def record(self) -> dict[str, Any]:
        assert self.launcher is not None
        return {"kills": self.kills, "resumes": self.resumes, "agent_attempts": dict(self.launcher.attempts),
                "peak_rss_mb": {k: round(v / 1e6, 1) for k, v in sorted(self.peak_rss.items())},
                "agent_memory_limit_mb": round(self.launcher.memory_limit / 1e6),
                "faults": {"kills": [list(k) for k in self.coordinator_faults["kills"]] +
                           [[f, START] for f in self.start_kills]}}


def resume_run(run_dir: Path, console: Console | None = None, *, respawn: bool = True) -> int:
    """Continue a run whose coordinator died: its sandbox holds everything verified so far."""
    console = console or wide_console()
    box = Sandbox(run_dir)
    plan = Plan.loads(box.read_bytes("plan.json"))
    saved = json.loads(box.read_bytes("run.json"))
    known = {f.name for f in fields(SimulateOptions)}
    opts = SimulateOptions(**{k: v for k, v in saved.items() if k in known and k != "order"})
    opts.kill, opts.kill_random, opts.kill_coordinator, opts.respawn = [], 0, None, respawn
    if box.exists("results.json") and json.loads(box.read_bytes("results.json")).get("final_matches_baseline"):
        console.print(f"{run_dir}: already complete and matching the baseline; nothing to resume")
        return EXIT_OK
    run = PreparedRun(run_dir.resolve(), box, plan, list(saved["order"]), Path(saved["source_dir"]))
    console.print(f"resuming run [bold]{plan.run_id}[/] in {run.run_dir}")
    code, results = execute_run(opts, run, console, with_baseline=False)
    if results is not None:
        print_summary(console, results, run.run_dir)
    return code


def wide_console() -> Console:
    console = Console()
    if not console.is_terminal:  # logs and CI: wide enough that tables and bars do not fold
        console.width = max(console.width, 160)
    return console


def run_simulation(opts: SimulateOptions, console: Console | None = None) -> int:
    console = console or wide_console()
    source_dir, model_name = resolve_source(opts, console)
    started = time.perf_counter()
    run = plan_run(opts, source_dir, model_name)
    console.print(f"run [bold]{run.plan.run_id}[/] in {run.run_dir}")
    console.print(f"plan: {len(run.plan.fragments)} fragments {', '.join(f.label for f in run.plan.fragments)}, "
                  f"{run.plan.nbytes / 1e6:.1f} MB, digest {run.plan.digest[:16]}… "
                  f"({time.perf_counter() - started:.2f}s); launch order {run.order}")
    code, results = execute_run(opts, run, console)
    if results is not None:
        print_summary(console, results, run.run_dir)
    return code


def _await_ready(coordinator: CoordinatorProcess, early: list[dict[str, Any]] | None = None) -> str:
    """Wait for the coordinator's endpoint; events before it (a resumed run's restore) go to `early`."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        ev = coordinator.next_event(1.0)
        if ev is None:
            raise RuntimeError(f"the coordinator exited ({coordinator.proc.wait()}) before it was ready; "
                               "see logs/coordinator.stderr in the run directory")
        if ev.get("progress") == "ready":
            return ev["endpoint"]
        if early is not None and ev.get("progress") != "idle":
            early.append(ev)
    raise RuntimeError(f"the coordinator was not ready within {READY_TIMEOUT_S}s")


def print_summary(console: Console, results: dict[str, Any], run_dir: Path) -> None:
    table = Table(title="checkpoints", show_lines=False)
    for header in CHECKPOINT_HEADERS:
        wide = header == "completion"
        table.add_column(header, overflow="ellipsis" if wide else "fold", no_wrap=wide, ratio=1 if wide else None)
    for row in checkpoint_rows(results):
        table.add_row(*[escape(str(v)) for v in row])
    console.print(table)
    arrivals = Table(title="arrivals")
    for header in ["#", "fragment", "its layers", "active layers", "prefix grew"]:
        arrivals.add_column(header)
    for a in results["arrivals"]:
        arrivals.add_row(str(a["index"]), str(a["fragment"]), a["fragment_layers"], str(a["layers"]), str(a["grew"]))
    console.print(arrivals)
    final = results["final"]
    if final.get("complete"):
        verdict = "[bold green]MATCHES[/]" if results["final_matches_baseline"] else "[bold red]DOES NOT MATCH[/]"
        console.print(f"final checkpoint {verdict} the baseline: tensor digests {final['tensor_digests_match']} "
                      f"({final['tensors_checked']} tensors, {final['files_checked']} files), logits max abs diff "
                      f"{final['logits_max_abs_diff']}, tokens identical {final['tokens_identical']}")
    else:
        console.print(f"[bold yellow]incomplete[/]: missing fragments {final['missing']} "
                      f"(layers {', '.join(final['missing_ranges'])})")
    console.print(f"run directory: {run_dir}  (results.md, results.json, logs/)")
