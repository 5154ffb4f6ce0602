"""`fragsim simulate`: plan, baseline, then a coordinator process and agent processes in a
chosen arrival order, with live progress in the terminal and the checkpoint table at the end."""

from __future__ import annotations

import contextlib
import io
import json
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from agents.source import SourceCheckpoint
from coordinator.corpus.head_rule import logits_transform
from coordinator.launch.agents import launch_order
from coordinator.launch.architectures import check_supported
from coordinator.launch.driver import CoordinatorGone, Driver, run_faults
from coordinator.launch.keys import make_run_keys
from coordinator.launch.lenses import store_lens
from coordinator.launch.options import PreparedRun, SimulateOptions, check_dtype, check_options
from coordinator.launch.planner import make_plan
from coordinator.launch.terminal import LiveView, print_summary, wide_console
from protocol.errors import PlanError
from protocol.exit_codes import RunExit
from protocol.layers import parse_ranges, split_layers
from protocol.plan import Plan
from protocol.run_settings import RunSettings
from sandbox import Sandbox, layout

if TYPE_CHECKING:
    from coordinator.launch.ray_fleet import RayFleet


def resolve_source(opts: SimulateOptions, console: Console) -> tuple[Path, str]:
    from coordinator.launch.prepare import DEFAULT_MODEL_NAME, is_prepared, prepare_default

    check_options(opts)  # before anything, the prepared default model included, is created
    if opts.model:
        path = Path(opts.model).resolve()
        return path, path.name
    artifacts = Path(opts.artifacts)
    with console.status("preparing the source checkpoint (once; cached under artifacts/source/)"):
        path = prepare_default(artifacts, opts.dtype or "float32", log=lambda msg: console.log(msg))
    assert is_prepared(path)
    return path.resolve(), DEFAULT_MODEL_NAME


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def plan_run(opts: SimulateOptions, source_dir: Path, model_name: str) -> PreparedRun:
    """Read the source once and write plan.json and run.json: nothing has started yet."""
    check_options(opts)
    source = SourceCheckpoint(source_dir)
    check_supported(source)  # an architecture it cannot handle is refused before anything exists
    try:
        transform = logits_transform(source.config) if opts.eval_corpus else None
        if transform is not None:
            raise PlanError(
                "--eval-corpus",
                opts.eval_corpus,
                f"a model whose logits are lm_head(h) alone: the corpus's exact KL relies on it (this config has "
                f"{transform}); the eval text's metrics work without it",
            )
        num_layers = int(source.config.get("num_hidden_layers", 0))
        ranges = parse_ranges(opts.ranges, num_layers) if opts.ranges else split_layers(num_layers, opts.fragments)
        order = launch_order(opts.order, len(ranges), opts.seed)
        run_faults(opts, len(ranges))
        opts.dtype = check_dtype(opts.dtype, source, source_dir)
        run_id = new_run_id()
        run_dir = Path(opts.run_dir or Path(opts.artifacts) / "runs" / run_id).resolve()
        box = Sandbox(run_dir, create=True)
        box.mkdir(layout.LOGS)
        store_eval_text(box, opts)
        if opts.lens:
            store_lens(box, Path(opts.artifacts), source_dir)
        extra = {"curve": make_run_keys(box, len(ranges))} if opts.curve else {}
        plan = make_plan(source, ranges, run_id=run_id, model_name=model_name, piece_size=opts.piece_size, extra=extra)
    finally:
        source.close()
    box.write_text(layout.PLAN, plan.dumps())
    box.write_json(layout.RUN_SETTINGS, RunSettings(opts, order, str(source_dir)).to_json())
    return PreparedRun(run_dir, box, plan, order, source_dir)


def store_eval_text(box: Sandbox, opts: SimulateOptions) -> None:
    """Copy the eval text into the run (checked by check_options): baseline, coordinator and a
    resume then score the same bytes, whatever happens to the user's file later."""
    from coordinator.quality import read_eval_text

    box.write_text(layout.EVAL_TEXT, read_eval_text(opts.eval_text))
    if opts.eval_corpus is not None:
        from coordinator.corpus.documents import read_corpus

        box.write_json(layout.EVAL_CORPUS, read_corpus(opts.eval_corpus, opts.eval_documents).to_json())


def execute_run(
    opts: SimulateOptions,
    run: PreparedRun,
    console: Console,
    *,
    with_baseline: bool = True,
    prefetch_report: bool = False,
    local_agents: bool = True,
    fleet: RayFleet | None = None,
) -> tuple[int, dict[str, Any] | None]:
    """Start the coordinator, record the baseline, launch agents in order; (exit code, results).
    `prefetch_report`: import the report's modules while the agents stream; `local_agents`
    False: start no agents, wait for the ones other hosts start (`fragsim serve`); `fleet`:
    they are Ray actors, started once the coordinator listens (`fragsim serve --ray`)."""
    faults = run_faults(opts, len(run.plan.fragments))
    driver = Driver(opts, run, console, faults, local_agents=local_agents, fleet=fleet)
    outcome = "not started"
    launched = time.time()
    if not with_baseline and not run.box.exists(layout.BASELINE_JSON):
        from coordinator.launch.baseline import SourceModel

        if not run.box.exists(layout.EVAL_TEXT):  # a run planned before runs kept their eval text
            store_eval_text(run.box, opts)
        # The run stopped before its launcher recorded the baseline. Record it before the
        # coordinator starts: a restarted coordinator evaluates restored fragments at once.
        with console.status("baseline: the run has none yet; recording it first") as status:
            base = SourceModel(run.source_dir, opts.threads).record(
                run.box, opts.prompt, opts.max_new_tokens, opts.probe, status.update
            )
        console.print(f"baseline ({run.plan.num_layers} layers): {escape(repr(base['text']))} ({base['seconds']:.2f}s)")
    if with_baseline and opts.eval_corpus and opts.lens and not run.box.exists(layout.BASELINE_LENS):
        # Without a lens the corpus table has no tuned rows: say how to get them, once, up front.
        console.print(
            f"no tuned lens for {run.source_dir.name} yet: `fragsim lens fit --model {run.source_dir}` (make lens; "
            "~2 min on 2 cores) fits one, and later runs read every checkpoint through it too; this run has the "
            "logit lens only"
        )
    try:
        driver.start_coordinator()
        if with_baseline:
            with console.status("baseline: loading the full source model"):
                # torch and transformers are imported here, after the coordinator was started:
                # the two processes import them side by side on separate cores.
                from coordinator.launch.baseline import SourceModel

                source_model = SourceModel(run.source_dir, opts.threads)
                driver.await_ready()
                driver.await_warm()
            with console.status("baseline: evaluating the full source model") as status:
                base = source_model.record(run.box, opts.prompt, opts.max_new_tokens, opts.probe, status.update)
            del source_model
            console.print(
                f"baseline ({run.plan.num_layers} layers): {escape(repr(base['text']))} ({base['seconds']:.2f}s)"
            )
        else:
            driver.await_ready()
        if not local_agents:
            assert driver.launcher is not None
            console.print(f"coordinator listening on [bold]{driver.launcher.endpoint}[/]; waiting for the agents")
        if fleet is not None:
            assert driver.launcher is not None
            fleet.start(driver.launcher.endpoint, driver.committed)
        if prefetch_report:  # after the baseline: torch's import and matplotlib's never overlap
            import_report_in_background()
        with LiveView(console, run.plan) as view:
            driver.view = view
            outcome = driver.drive()
    except CoordinatorGone as exc:
        console.print(f"[red]{escape(str(exc))}[/]; continue with: fragsim resume {run.run_dir}")
        return RunExit.FAILED, None
    finally:
        driver.shutdown()
        if fleet is not None:  # actors of a run that did not end stay up for `fragsim resume --ray`
            fleet.finish(keep=outcome not in ("complete", "incomplete"))
    if outcome in ("coordinator killed", "coordinator stopped"):
        console.print(f"[bold red]the {outcome}[/]; continue with: fragsim resume {run.run_dir}")
        return RunExit.COORDINATOR_KILLED, None
    code = driver.coordinator_code
    results_path = run.run_dir / layout.RESULTS_JSON
    if code == RunExit.STORAGE:
        console.print(
            f"[red]a storage error stopped the run[/]; promoted fragments are intact, staged pieces kept: "
            f"free space, then fragsim resume {run.run_dir}"
        )
        return RunExit.STORAGE, json.loads(results_path.read_text()) if results_path.exists() else None
    results = json.loads(results_path.read_text()) if results_path.exists() else None
    if results is not None and results["run"]["finished"] < launched:
        results = None  # an earlier coordinator's (a run resumed before): not this one's verdict
    if results is None:
        console.print(
            f"[red]the coordinator exited with {code} and wrote no results[/]; see {run.run_dir}/logs/; "
            f"continue with: fragsim resume {run.run_dir}"
        )
        return (RunExit.CRASH if code == RunExit.CRASH else RunExit.FAILED), None
    results["launcher"] = driver.record()
    run.box.write_json(layout.LAUNCHER_JSON, results["launcher"])
    # The verdict is the record's: a coordinator killed after it wrote results.json finished its work.
    if not results["final"].get("complete"):
        return RunExit.INCOMPLETE, results
    return (RunExit.OK if results["final_matches_baseline"] else RunExit.MISMATCH), results


def resume_run(
    run_dir: Path,
    console: Console | None = None,
    *,
    respawn: bool = True,
    local_agents: bool = True,
    bind: str | None = None,
    fleet: RayFleet | None = None,
    kills: list[str] | None = None,
    kill_coordinator: str | None = None,
) -> int:
    """Continue a run from its sandbox, which holds everything verified so far: after its
    coordinator died (`fragsim resume`), or a planned run whose agents are elsewhere
    (`fragsim serve`, local_agents False). The baseline is recorded first if the run has none."""
    console = console or wide_console()
    if not (run_dir / layout.PLAN).is_file():
        raise PlanError("run directory", str(run_dir), f"a directory holding the {layout.PLAN} of a run")
    box = Sandbox(run_dir)
    plan = Plan.loads(box.read_bytes(layout.PLAN))
    saved = _saved_settings(box, plan)
    opts = saved.options
    opts.kill, opts.kill_random, opts.kill_coordinator, opts.respawn = kills or [], 0, kill_coordinator, respawn
    if bind:
        opts.bind = bind
    if box.exists(layout.RESULTS_JSON) and json.loads(box.read_bytes(layout.RESULTS_JSON)).get(
        "final_matches_baseline"
    ):
        console.print(f"{run_dir}: already complete and matching the baseline; nothing to do")
        return RunExit.OK
    run = PreparedRun(run_dir.resolve(), box, plan, saved.order, Path(saved.source_dir))
    console.print(f"{'resuming' if local_agents else 'serving'} run [bold]{plan.run_id}[/] in {run.run_dir}")
    # The baseline is recorded before the coordinator binds: a restored fragment, or one from
    # an agent that started first, is scored at once.
    code, results = execute_run(opts, run, console, with_baseline=False, prefetch_report=True,
                                local_agents=local_agents, fleet=fleet)  # fmt: skip
    if results is not None:
        print_summary(console, results, run.run_dir)
    write_run_report(run, console)
    return code


def _saved_settings(box: Sandbox, plan: Plan) -> RunSettings:
    """run.json, or (when the launcher died before writing it) defaults with the plan's source."""
    if box.exists(layout.RUN_SETTINGS):
        return RunSettings.from_json(json.loads(box.read_bytes(layout.RUN_SETTINGS)))
    order = list(range(len(plan.fragments)))
    saved = RunSettings(SimulateOptions(order="forward"), order, str(plan.model["source_dir"]))
    box.write_json(layout.RUN_SETTINGS, saved.to_json())
    return saved


def run_quietly(opts: SimulateOptions, model: Path) -> tuple[int, dict[str, Any] | None, PreparedRun, str]:
    """Plan and execute one run of a local checkpoint with the terminal output captured
    (tests, soak and bench): (exit code, results, the run, what a user would have seen)."""
    buffer = io.StringIO()
    run = plan_run(opts, model, model.name)
    code, results = execute_run(opts, run, Console(file=buffer, width=160))
    return code, results, run, buffer.getvalue()


def import_report_in_background() -> None:
    """matplotlib takes about a second to import: do it, niced, while the agents stream, so
    writing the report at the end costs only the drawing."""

    def run() -> None:
        from coordinator.workers import MODEL_NICENESS, lower_priority

        lower_priority(MODEL_NICENESS)
        import coordinator.report.build  # noqa: F401

    threading.Thread(target=run, name="import-report", daemon=True).start()


def write_run_report(run: PreparedRun, console: Console) -> None:
    """report.html in the run directory; its time goes into launcher.json as report_s."""
    from coordinator.report.build import write_report

    try:
        written = write_report([run.run_dir])
    except Exception as exc:  # the run's verdict stands without its figures; say why they are missing
        console.print(f"[yellow]report not written[/]: {type(exc).__name__}: {escape(str(exc))}")
        return
    if run.box.exists(layout.LAUNCHER_JSON):
        record = json.loads(run.box.read_bytes(layout.LAUNCHER_JSON))
        record["report_s"] = written.seconds
        run.box.write_json(layout.LAUNCHER_JSON, record)
    console.print(f"report: {written.path} ({written.figures} figures, {written.seconds:.2f}s)")


def run_simulation(opts: SimulateOptions, console: Console | None = None, *, json_out: bool = False) -> int:
    """`fragsim simulate`. `json_out`: the results (results.json plus the launcher record, or
    null without results) are the only thing on stdout; the live view and tables go to stderr."""
    if not json_out:
        return _simulate(opts, console or wide_console())[0]
    with contextlib.redirect_stdout(sys.stderr):  # a stray print must not break the JSON
        code, results, run_dir = _simulate(opts, console or wide_console(stderr=True))
    if results is not None and (run_dir / layout.LAUNCHER_JSON).is_file():
        results["launcher"] = json.loads((run_dir / layout.LAUNCHER_JSON).read_text())  # with report_s
    print(json.dumps(results, indent=2), flush=True)
    return code


def _simulate(opts: SimulateOptions, console: Console) -> tuple[int, dict[str, Any] | None, Path]:
    source_dir, model_name = resolve_source(opts, console)
    started = time.perf_counter()
    run = plan_run(opts, source_dir, model_name)
    console.print(f"run [bold]{run.plan.run_id}[/] in {run.run_dir}")
    console.print(
        f"plan: {len(run.plan.fragments)} fragments {', '.join(f.label for f in run.plan.fragments)}, "
        f"{run.plan.nbytes / 1e6:.1f} MB, digest {run.plan.digest[:16]}… "
        f"({time.perf_counter() - started:.2f}s); launch order {run.order}"
    )
    code, results = execute_run(opts, run, console, prefetch_report=True)
    if results is not None:
        print_summary(console, results, run.run_dir)
    write_run_report(run, console)
    return code, results, run.run_dir
