"""`fragsim simulate`: plan, baseline, then a coordinator process and agent processes in a
chosen arrival order, with live progress in the terminal and the checkpoint table at the end."""

from __future__ import annotations

import json
import os
import queue
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from agents.launcher import AgentLauncher, launch_order
from agents.planner import make_plan
from agents.source import SourceCheckpoint
from coordinator.results import CHECKPOINT_HEADERS, checkpoint_rows
from protocol.layers import parse_ranges, split_layers
from sandbox import Sandbox

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE, EXIT_INCOMPLETE, EXIT_FAILED = 0, 1, 2, 3, 4
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

    def __init__(self, run_dir: Path, box: Sandbox) -> None:
        stderr = box.open_append("logs/coordinator.stderr")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "coordinator", "serve", "--run-dir", str(run_dir), "--control-stdin"],
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
        run_id = new_run_id()
        run_dir = Path(opts.run_dir or Path(opts.artifacts) / "runs" / run_id).resolve()
        box = Sandbox(run_dir, create=True)
        if box.listdir("."):
            raise FileExistsError(f"run directory {run_dir} is not empty; expected a new or empty directory")
        box.mkdir("logs")
        plan = make_plan(source, ranges, run_id=run_id, model_name=model_name, piece_size=opts.piece_size)
    finally:
        source.close()
    box.write_text("plan.json", plan.dumps())
    box.write_json("run.json", {**asdict(opts), "order": order, "source_dir": str(source_dir)})
    return PreparedRun(run_dir, box, plan, order, source_dir)


def execute_run(opts: SimulateOptions, run: PreparedRun, console: Console) -> tuple[int, dict[str, Any] | None]:
    """Start the coordinator, record the baseline, launch agents in order; (exit code, results)."""
    from coordinator.baseline import SourceModel  # torch: imported while the coordinator starts

    coordinator = CoordinatorProcess(run.run_dir, run.box)
    launcher: AgentLauncher | None = None
    try:
        with console.status("baseline: loading the full source model"):
            source_model = SourceModel(run.source_dir, opts.threads)
            endpoint = _await_ready(coordinator)
        with console.status("baseline: evaluating the full source model"):
            base = source_model.record(run.box, opts.prompt, opts.max_new_tokens)
        del source_model
        console.print(f"baseline ({run.plan.num_layers} layers): {escape(repr(base['text']))} ({base['seconds']:.2f}s)")
        launcher = AgentLauncher(run.run_dir, endpoint)
        with LiveView(console, run.plan) as view:
            outcome = _drive(opts, run.order, coordinator, launcher, view)
        code = coordinator.proc.wait(timeout=60)
    except BaseException:
        coordinator.proc.kill()
        if launcher:
            for fragment in list(launcher.procs):
                launcher.kill(fragment)
        raise
    finally:
        if launcher:
            launcher.stop_all()
    results_path = run.run_dir / "results.json"
    if not results_path.exists():
        console.print(f"[red]the coordinator exited with {code} and wrote no results[/]; see {run.run_dir}/logs/")
        return EXIT_FAILED, None
    results = json.loads(results_path.read_text())
    if outcome == "incomplete" or code == EXIT_INCOMPLETE:
        return EXIT_INCOMPLETE, results
    return (EXIT_OK if code == 0 and results["final_matches_baseline"] else EXIT_MISMATCH), results


def run_simulation(opts: SimulateOptions, console: Console | None = None) -> int:
    console = console or Console()
    if not console.is_terminal:  # logs and CI: wide enough that tables do not fold
        console.width = max(console.width, 160)
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


def _await_ready(coordinator: CoordinatorProcess) -> str:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        ev = coordinator.next_event(1.0)
        if ev is None:
            raise RuntimeError(f"the coordinator exited ({coordinator.proc.wait()}) before it was ready; "
                               "see logs/coordinator.stderr in the run directory")
        if ev.get("progress") == "ready":
            return ev["endpoint"]
    raise RuntimeError(f"the coordinator was not ready within {READY_TIMEOUT_S}s")


def _drive(opts: SimulateOptions, order: list[int], coordinator: CoordinatorProcess, launcher: AgentLauncher,
           view: LiveView) -> str:
    committed: set[int] = set()
    reported: set[int] = set()
    pending = list(order)
    waiting_for: int | None = None
    next_launch = time.monotonic()
    while True:
        now = time.monotonic()
        if pending and waiting_for is None and now >= next_launch:
            fragment = pending.pop(0)
            launcher.spawn(fragment)
            if not opts.parallel:
                waiting_for = fragment
            next_launch = now + opts.stagger
        ev = coordinator.next_event(0.05)
        if ev is None:
            return "coordinator exited"
        kind = ev.get("progress")
        view.show(ev)
        if kind == "committed":
            committed.add(ev["fragment"])
            if waiting_for == ev["fragment"]:
                waiting_for = None
                next_launch = time.monotonic() + opts.stagger
        elif kind == "finished":
            return "complete" if ev["complete"] else "incomplete"
        # An agent that exits without its fragment committed will not come back in this run.
        for fragment, proc in launcher.procs.items():
            rc = proc.poll()
            if rc is not None and rc != 0 and fragment not in committed and fragment not in reported:
                reported.add(fragment)
                view.console.print(f"[red]agent {fragment} exited with status {rc}[/] (logs/agent_{fragment:02d}.*)")
                if waiting_for == fragment:
                    waiting_for = None
        if not pending and waiting_for is None and all(
                launcher.exited(f) is not None for f in launcher.procs) and len(committed) < len(order):
            coordinator.control("end: every agent has exited")
            waiting_for = -1  # ask once


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
