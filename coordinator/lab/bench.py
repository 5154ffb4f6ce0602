"""`fragsim bench`: measured figures of real runs, written as JSON (never asserted in tests).

Runs the default model (or --model) forward with 4 fragments a few times, once without CURVE,
once with all agents in parallel, and once with 10 fragments for a quality-versus-depth curve.

With stages (the default) the same JSON gets a "stages" section: each stage of the real-model
path measured against its own ceiling on this machine (coordinator/lab/ceilings.py), with the
ratio, the goal and whether it is met — reported, never asserted:

- transfer goodput (verified and stored bytes per second, from the runs' results.json) against
  raw pyzmq with and without CURVE, BLAKE3 alone and write + fsync alone of the same bytes;
- the wall time of a warm `fragsim simulate --order forward` (a fresh process, timed around the
  call) against the in-process floor, and its time to the first checkpoint and to the verdict
  (from its logs' monotonic times);
- agent start-up (spawn → process.start, → agent.hello) and private memory (USS);
- the coordinator's peak RSS against the model's bytes plus the torch runtime;
- dead-agent detection for a hung (SIGSTOP) and a dead (SIGKILL) agent, with the settings.

`fragments_curve` adds run time and per-fragment overhead for forward runs of N fragments.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from coordinator.lab import ceilings
from coordinator.launch.options import SimulateOptions
from coordinator.launch.simulate import run_quietly
from coordinator.launch.terminal import wide_console
from protocol import log_events as E
from protocol.plan import DEFAULT_PIECE_SIZE
from sandbox import layout

CURVE_GOAL = 0.9  # transfer goodput with CURVE, as a share of raw pyzmq with CURVE
PLAIN_GOAL = 0.7  # without CURVE, as a share of raw pyzmq without it
WALL_GOAL = 1.5  # a warm forward run, at most this many times the in-process floor
AGENT_START_GOAL_S = 0.3
AGENT_USS_GOAL_MB = 64.0
COORDINATOR_MODEL_FACTOR = 1.3  # peak RSS at most 1.3 x the model's bytes + the torch runtime
DETECTION_GOAL_S = 1.5
# Liveness settings that detect a hung agent within the goal on an idle machine; the defaults
# (500 ms, 3 s) trade that for no false deaths on a loaded one. Both are measured.
FAST_HEARTBEAT_MS = 250
FAST_DEAD_AFTER_S = 1.0
CLI_TIMEOUT_S = 3600.0
DEFAULT_CURVE = (1, 2, 4, 8, 15, 30)


def _stamp() -> str:
    return time.strftime("%H%M%S")


def _one(model: Path, name: str, root: Path, **options: Any) -> dict[str, Any]:
    opts = SimulateOptions(model=str(model), run_dir=str(root / f"{name}-{_stamp()}"), **options)
    started = time.perf_counter()
    code, results, run, _ = run_quietly(opts, model)
    if results is None or code != 0:
        raise RuntimeError(f"bench run {name} failed with exit {code}; see {run.run_dir}/logs")
    frags = results["fragments"]
    return {
        "name": name,
        "run_dir": str(run.run_dir),
        "wall_s": round(time.perf_counter() - started, 3),
        "transfer_s": round(sum(f["transfer_s"] for f in frags), 4),
        "transfer_mb_per_s": round(sum(f["bytes"] for f in frags) / sum(f["transfer_s"] for f in frags) / 1e6, 1),
        "fragments": [_fragment_row(f) for f in frags],
        "max_new_tokens": results["run"]["max_new_tokens"],
        "threads": results["run"]["threads"],
        "prompt": results["run"]["prompt"],
        "baseline_generate_s": results["baseline"]["seconds"],
        "checkpoints": [
            {
                k: c.get(k)
                for k in (
                    "layers",
                    "label",
                    "agree_tokens",
                    "kl_to_baseline",
                    "top1_agreement",
                    "generate_s",
                    "load_s",
                    "snapshot_s",
                    "score_s",
                )
            }
            for c in results["checkpoints"]
        ],
        "peak_rss_mb": results["launcher"]["peak_rss_mb"],
        "peak_unshared_mb": results["launcher"].get("peak_unshared_mb", {}),
        "final_matches_baseline": results["final_matches_baseline"],
    }


def _fragment_row(f: dict[str, Any]) -> dict[str, Any]:
    """Goodput of one fragment: verified and stored bytes over its first-to-last-piece time."""
    seconds = f.get("transfer_s")
    return {
        "fragment": f["fragment"],
        "layers": f["layers"],
        "bytes": f["bytes"],
        "transfer_s": seconds,
        "mb_per_s": round(f["bytes"] / seconds / 1e6, 1) if seconds else None,
    }


# ---- a warm `fragsim simulate` as the user runs it, and its timeline from the logs ----------


def cli_run(
    model: Path,
    root: Path,
    name: str,
    *,
    fragments: int = 4,
    threads: int | None = None,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """`fragsim simulate --order forward` in a fresh process, timed around the call."""
    run_dir = (root / f"{name}-{_stamp()}").resolve()
    argv = [
        sys.executable,
        "-m",
        "coordinator.launch",
        "simulate",
        "--model",
        str(model),
        "--order",
        "forward",
        "--fragments",
        str(fragments),
        "--run-dir",
        str(run_dir),
    ]
    if threads is not None:
        argv += ["--threads", str(threads)]
    if max_new_tokens is not None:
        argv += ["--max-new-tokens", str(max_new_tokens)]
    output = root / f"{run_dir.name}.out"
    with open(output, "w") as out:
        launched = time.monotonic()
        code = subprocess.run(
            argv, stdout=out, stderr=subprocess.STDOUT, timeout=CLI_TIMEOUT_S, env={**os.environ, "COLUMNS": "160"}
        ).returncode
        wall = time.monotonic() - launched
    if code != 0:
        raise RuntimeError(f"fragsim simulate exited with {code}; see {output}")
    results = json.loads((run_dir / layout.RESULTS_JSON).read_text())
    return {
        "name": name,
        "run_dir": str(run_dir),
        "argv": argv[1:],
        "exit_code": code,
        "wall_s": round(wall, 3),
        "final_matches_baseline": results["final_matches_baseline"],
        "fragments": [_fragment_row(f) for f in results["fragments"]],
        "timeline": run_timeline(run_dir, launched),
    }


def median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run whose `key` is the median of `runs` (the lower middle one of an even count), with
    every run's value beside it: one noisy sample on a shared machine decides nothing."""
    ordered = sorted(runs, key=lambda r: r[key])
    return {**ordered[(len(ordered) - 1) // 2], f"{key}_samples": [r[key] for r in runs]}


def run_timeline(run_dir: Path, launched: float | None = None) -> dict[str, Any]:
    """Times to the first checkpoint and to the verdict from the run's logs ("mono": the
    system-wide monotonic clock), from `launched` (measured around the call) and from the
    earliest process.start line of any process of the run."""
    lines = [line for path in sorted((run_dir / layout.LOGS).glob("*.jsonl")) for line in ceilings.read_log(path)]
    starts = [line["mono"] for line in lines if line.get("event") == E.PROCESS_START]
    coordinator = ceilings.read_log(run_dir / layout.COORDINATOR_LOG)
    checkpoints = [line["mono"] for line in coordinator if line.get("event") == E.CHECKPOINT_EVALUATED]
    finished = [line["mono"] for line in coordinator if line.get("event") == E.RUN_FINISHED]
    first_start = min(starts) if starts else None
    agent_starts = [
        line["mono"] for line in lines if line.get("event") == E.PROCESS_START and line.get("role") == "agent"
    ]
    out: dict[str, Any] = {"checkpoints": len(checkpoints)}
    for origin, t0 in (("launch", launched), ("first_process_start", first_start)):
        if t0 is None:
            continue
        out[f"first_checkpoint_from_{origin}_seconds"] = round(checkpoints[0] - t0, 6) if checkpoints else None
        out[f"verdict_from_{origin}_seconds"] = round(finished[-1] - t0, 6) if finished else None
        out[f"checkpoints_from_{origin}_seconds"] = [round(t - t0, 6) for t in checkpoints]
        # Everything before the first agent starts is start-up: imports, plan, baseline.
        out[f"first_agent_start_from_{origin}_seconds"] = round(min(agent_starts) - t0, 6) if agent_starts else None
    if launched is not None and first_start is not None:
        out["launch_to_first_process_start_seconds"] = round(first_start - launched, 6)
    return out


# ---- stages: a value against its ceiling, the ratio and the goal ----------------------------


def _ratio(value: float | None, ceiling: float | None) -> float | None:
    if value is None or ceiling is None or ceiling == 0 or not math.isfinite(ceiling):
        return None
    return round(value / ceiling, 3)


def stage(
    name: str,
    unit: str,
    value: float | None,
    ceiling: float | None,
    ceiling_is: str | None,
    *,
    goal: str | None = None,
    ratio_at_least: float | None = None,
    ratio_at_most: float | None = None,
    value_at_most: float | None = None,
    **detail: Any,
) -> dict[str, Any]:
    """One row: `met` is None when there is no goal or nothing was measured."""
    ratio = _ratio(value, ceiling)
    met: bool | None = None
    if ratio_at_least is not None and ratio is not None:
        met = ratio >= ratio_at_least
    elif ratio_at_most is not None and ratio is not None:
        met = ratio <= ratio_at_most
    elif value_at_most is not None and value is not None:
        met = value <= value_at_most
    return {
        "stage": name,
        "unit": unit,
        "value": value,
        "ceiling": ceiling,
        "ceiling_is": ceiling_is,
        "ratio": ratio,
        "goal": goal,
        "met": met,
        **detail,
    }


def _get(data: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _write_rate(write: dict[str, Any] | None) -> float | None:
    """MB/s of pwrite alone (no fsync: a run's transfer_s ends before its fragment is fsynced)."""
    if not isinstance(write, dict) or not write.get("write_seconds") or not write.get("nbytes"):
        return None
    return round(float(write["nbytes"]) / float(write["write_seconds"]) / 1e6, 1)


def _serial_bound(rates: list[float | None]) -> float | None:
    """The rate of doing each of `rates`' work in turn on the same bytes."""
    if any(not isinstance(r, (int, float)) or r <= 0 for r in rates):
        return None
    return round(1 / sum(1 / r for r in rates if r), 1)


def build_stages(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """The "stages" rows from what `measure_stages` and the runs measured (missing parts: None)."""
    c = figures.get("ceilings", {})
    sequential = figures.get("sequential") or []
    plain = figures.get("no_curve") or {}
    cli = figures.get("cli_forward") or {}
    floor = c.get("in_process_floor") or {}
    rows: list[dict[str, Any]] = []
    curve_mb_s = statistics.median(r["transfer_mb_per_s"] for r in sequential) if sequential else None
    median_run = min(sequential, key=lambda r: abs(r["transfer_mb_per_s"] - curve_mb_s)) if sequential else {}
    per_fragment: dict[str, Any] = {
        "per_fragment_mb_per_s": [f["mb_per_s"] for f in median_run.get("fragments", [])],
        "runs_mb_per_s": [r["transfer_mb_per_s"] for r in sequential],
    }
    rows.append(
        stage(
            "transfer, CURVE",
            "MB/s",
            curve_mb_s,
            _get(c, "zmq_curve", "mb_per_s"),
            "raw pyzmq DEALER→ROUTER, CURVE, credit 4, copy=False",
            goal=f"ratio >= {CURVE_GOAL}",
            ratio_at_least=CURVE_GOAL,
            **per_fragment,
        )
    )
    plain_mb_s = plain.get("transfer_mb_per_s")
    rows.append(
        stage(
            "transfer, no CURVE",
            "MB/s",
            plain_mb_s,
            _get(c, "zmq_plain", "mb_per_s"),
            "raw pyzmq DEALER→ROUTER, no CURVE, credit 4, copy=False",
            goal=f"ratio >= {PLAIN_GOAL}",
            ratio_at_least=PLAIN_GOAL,
            per_fragment_mb_per_s=[f["mb_per_s"] for f in plain.get("fragments", [])],
        )
    )
    for label, value in (("CURVE", curve_mb_s), ("no CURVE", plain_mb_s)):
        rows.append(
            stage(
                f"transfer, {label} vs hashing",
                "MB/s",
                value,
                _get(c, "blake3", "mb_per_s"),
                "BLAKE3 alone, per 2 MiB piece, 1 thread",
            )
        )
        rows.append(
            stage(
                f"transfer, {label} vs storage",
                "MB/s",
                value,
                _get(c, "write_fsync", "mb_per_s"),
                "pwrite + fsync alone, pre-allocated file",
            )
        )
        zmq_rate = _get(c, "zmq_curve" if label == "CURVE" else "zmq_plain", "mb_per_s")
        bound = _serial_bound([zmq_rate, _get(c, "blake3", "mb_per_s"), _write_rate(c.get("write_fsync"))])
        rows.append(
            stage(
                f"transfer, {label} vs serial bound",
                "MB/s",
                value,
                bound,
                "one thread receiving, hashing and writing each piece in turn: 1 / (1/zmq + 1/BLAKE3 + 1/pwrite)",
            )
        )
    timeline = cli.get("timeline") or {}
    rows.append(
        stage(
            "simulate --order forward (warm)",
            "s",
            cli.get("wall_s"),
            floor.get("seconds"),
            "in-process floor: fresh python, import, load, baseline + each prefix",
            goal=f"ratio <= {WALL_GOAL}",
            ratio_at_most=WALL_GOAL,
            floor_layers=floor.get("layers"),
        )
    )
    rows.append(
        stage(
            "time to first checkpoint",
            "s",
            timeline.get("first_checkpoint_from_launch_seconds"),
            floor.get("first_prefix_done_seconds"),
            "floor: its first prefix generated",
            from_first_process_start_seconds=timeline.get("first_checkpoint_from_first_process_start_seconds"),
        )
    )
    rows.append(
        stage(
            "time to final verdict",
            "s",
            timeline.get("verdict_from_launch_seconds"),
            floor.get("last_prefix_done_seconds"),
            "floor: its last prefix generated",
            from_first_process_start_seconds=timeline.get("verdict_from_first_process_start_seconds"),
        )
    )
    agents = c.get("agents") or {}
    bare = c.get("bare_agent_process") or {}
    rows.append(
        stage(
            "agent start-up: spawn → process.start",
            "s",
            agents.get("spawn_to_process_start_seconds_median"),
            bare.get("seconds"),
            "python + the agent's imports, spawn to exit",
            goal=f"<= {AGENT_START_GOAL_S} s (median)",
            value_at_most=AGENT_START_GOAL_S,
        )
    )
    rows.append(
        stage(
            "agent start-up: spawn → agent.hello",
            "s",
            agents.get("spawn_to_hello_seconds_median"),
            bare.get("seconds"),
            "python + the agent's imports, spawn to exit",
            goal=f"<= {AGENT_START_GOAL_S} s (median)",
            value_at_most=AGENT_START_GOAL_S,
            max_seconds=agents.get("spawn_to_hello_seconds_max"),
        )
    )
    rows.append(
        stage(
            "agent private memory (USS)",
            "MB",
            agents.get("peak_uss_mb_max"),
            bare.get("uss_mb"),
            "USS of python + the agent's imports",
            goal=f"<= {AGENT_USS_GOAL_MB:g} MB (peak, any agent)",
            value_at_most=AGENT_USS_GOAL_MB,
            peak_anonymous_mb=agents.get("peak_anonymous_mb_max"),
            peak_rss_mb=agents.get("peak_rss_mb_max"),
        )
    )
    uss_row = rows[-1]
    anon = agents.get("peak_anonymous_mb_max")
    if uss_row["met"] is False and isinstance(anon, (int, float)) and anon <= AGENT_USS_GOAL_MB:
        uss_row["note"] = (
            f"USS counts the pages of the source's read-only memory map that only this agent maps (page cache, "
            f"clean, reclaimable); its anonymous private memory peaks at {anon:g} MB"
        )
    model_mb = sum(f["bytes"] for f in median_run.get("fragments", [])) / 1e6 if median_run else None
    torch_mb = _get(c, "torch_runtime", "rss_mb")
    coordinator_mb = max((r["peak_rss_mb"].get("coordinator", 0) for r in sequential), default=None)
    unshared_mb = max((r.get("peak_unshared_mb", {}).get("coordinator", 0) for r in sequential), default=None)
    limit = round(COORDINATOR_MODEL_FACTOR * model_mb + torch_mb, 1) if model_mb and torch_mb else None
    rows.append(
        stage(
            "coordinator peak RSS",
            "MB",
            coordinator_mb,
            round(model_mb + torch_mb, 1) if model_mb and torch_mb else None,
            "model bytes + RSS of import torch, transformers",
            goal=f"<= {COORDINATOR_MODEL_FACTOR} x model + torch runtime" + (f" = {limit} MB" if limit else ""),
            value_at_most=limit,
            peak_unshared_mb=unshared_mb or None,
            model_mb=round(model_mb, 1) if model_mb else None,
            torch_runtime_mb=torch_mb,
        )
    )
    rss_row = rows[-1]
    with_code = _get(c, "torch_runtime", "rss_with_llama_code_mb")
    if rss_row["met"] is False and model_mb and isinstance(with_code, (int, float)):
        wider = round(COORDINATOR_MODEL_FACTOR * model_mb + with_code, 1)
        rss_row["limit_with_llama_code_mb"] = wider
        rss_row["note"] = (
            f"the torch runtime measured as `import torch, transformers` ({torch_mb:g} MB) leaves out the modelling "
            f"code the coordinator imports too ({with_code:g} MB with it); with that the limit is {wider:g} MB"
        )
    if unshared_mb and model_mb:
        # RSS counts the model's file pages once (zero-copy safetensors maps); what is not
        # file-backed is the runtime and the work: a second copy of the model would show here.
        rss_row["second_model_copy"] = unshared_mb - (with_code or torch_mb or 0) >= model_mb
    for figure, which in (("detection", "default liveness"), ("detection_fast", "fast liveness")):
        rows += _detection_rows(c.get(figure) or {}, which)
    return rows


def _detection_rows(detection: dict[str, Any], which: str) -> list[dict[str, Any]]:
    rows = []
    settings = detection.get("settings") or {}
    for key, label, setting_key in (
        ("hung_sigstop", f"hung agent (SIGSTOP) → agent.dead, {which}", "dead_after_s"),
        ("dead_sigkill", f"dead agent (SIGKILL) → agent.dead, {which}", "tick_s"),
    ):
        case = detection.get(key) or {}
        row = stage(
            label,
            "s",
            case.get("seconds"),
            None,
            None,
            goal=f"<= {DETECTION_GOAL_S} s",
            value_at_most=DETECTION_GOAL_S,
            settings=settings,
            reason=case.get("reason"),
        )
        setting = settings.get(setting_key)
        if row["met"] is False and isinstance(setting, (int, float)) and setting >= DETECTION_GOAL_S:
            row["note"] = (
                f"{setting_key} = {setting:g} s alone exceeds the {DETECTION_GOAL_S:g} s goal: the setting decides"
            )
        rows.append(row)
    return rows


def _attempt(console: Console, what: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One measurement; a failure is recorded (and shown) instead of ending a long bench."""
    started = time.perf_counter()
    try:
        out = measure()
    except Exception as exc:
        console.print(f"  [red]{what} failed[/]: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"}
    console.print(f"  {what} ({time.perf_counter() - started:.1f}s)")
    return out


def measure_stages(
    model: Path,
    root: Path,
    reference: dict[str, Any],
    console: Console,
    *,
    repeats: int = 3,
    into: dict[str, Any] | None = None,
    save: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Every ceiling, measured with nothing else of ours running, for the runs' settings. Results
    go into `into` (a new dict by default) one by one; `save` is called after each."""
    files = ceilings.weight_files(model)
    nbytes = ceilings.files_nbytes(files)
    piece = DEFAULT_PIECE_SIZE
    threads, tokens, prompt = reference["threads"], reference["max_new_tokens"], reference["prompt"]
    layers = [c["layers"] for c in reference["checkpoints"]]
    out = into if into is not None else {}
    out.update(nbytes=nbytes, piece_bytes=piece)
    steps: list[tuple[str, str, Callable[[], dict[str, Any]]]] = [
        ("zmq_plain", "raw pyzmq, no CURVE",
         lambda: ceilings.zmq_ceiling(nbytes, files=files, piece_size=piece, repeats=repeats)),
        ("zmq_curve", "raw pyzmq, CURVE",
         lambda: ceilings.zmq_ceiling(nbytes, files=files, piece_size=piece, curve=True, repeats=repeats)),
        ("blake3", "BLAKE3 alone",
         lambda: ceilings.blake3_ceiling(nbytes, files=files, piece_size=piece, repeats=repeats)),
        ("write_fsync", "write + fsync alone",
         lambda: ceilings.write_fsync_ceiling(nbytes, root, files=files, piece_size=piece,
                                              repeats=max(1, repeats - 1))),
        ("in_process_floor", f"in-process floor (layers {layers})",
         lambda: median_run([ceilings.in_process_floor(model, layers, prompt=prompt, max_new_tokens=tokens,
                                                       threads=threads) for _ in range(repeats)], "seconds")),
        ("torch_runtime", "torch runtime RSS", ceilings.torch_runtime_rss),
        ("bare_agent_process", "bare agent process", ceilings.bare_agent_process),
        ("agents", "agent start-up and USS",
         lambda: ceilings.agent_profile(model, root / f"agents-{_stamp()}", fragments=len(layers),
                                        max_new_tokens=tokens, threads=threads)),
        ("detection", "dead-agent detection",
         lambda: ceilings.detection_latency(model, root / f"detection-{_stamp()}", max_new_tokens=tokens,
                                            threads=threads)),
        ("detection_fast", f"dead-agent detection, beat {FAST_HEARTBEAT_MS} ms, dead after {FAST_DEAD_AFTER_S:g} s",
         lambda: ceilings.detection_latency(model, root / f"detection-fast-{_stamp()}", max_new_tokens=tokens,
                                            threads=threads, heartbeat_ms=FAST_HEARTBEAT_MS,
                                            dead_after=FAST_DEAD_AFTER_S)),
    ]  # fmt: skip
    console.print(f"ceilings ({nbytes / 1e6:.0f} MB of the model's files, {piece // 2**20} MiB pieces):")
    for key, label, measure in steps:
        out[key] = _attempt(console, label, measure)
        if save is not None:
            save()
    return out


def fragment_curve(
    model: Path,
    root: Path,
    counts: list[int],
    console: Console,
    *,
    into: list[dict[str, Any]] | None = None,
    save: Callable[[], None] | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Forward runs with N fragments: run time, and what each fragment costs beyond evaluation."""
    from agents.source import SourceCheckpoint

    source = SourceCheckpoint(model)
    try:
        num_layers = int(source.config["num_hidden_layers"])
    finally:
        source.close()
    rows: list[dict[str, Any]] = into if into is not None else []
    for n in counts:
        if save is not None:
            save()
        if n > num_layers:
            console.print(f"fragment curve: {n} fragments skipped (the model has {num_layers} layers)")
            rows.append({"fragments": n, "skipped": f"more fragments than the model's {num_layers} layers"})
            continue
        run = _one(model, f"fragments-{n}", root, fragments=n, order="forward", **options)
        evaluation = sum(
            sum(c.get(k) or 0.0 for k in ("generate_s", "load_s", "snapshot_s", "score_s")) for c in run["checkpoints"]
        )
        rows.append(
            {
                "fragments": n,
                "ranges": [f["layers"] for f in run["fragments"]],
                "wall_s": run["wall_s"],
                "transfer_s": run["transfer_s"],
                "transfer_mb_per_s": run["transfer_mb_per_s"],
                "checkpoints": len(run["checkpoints"]),
                "evaluation_s": round(evaluation, 3),
                "outside_evaluation_s": round(run["wall_s"] - evaluation, 3),
                "outside_evaluation_per_fragment_s": round((run["wall_s"] - evaluation) / n, 3),
                "final_matches_baseline": run["final_matches_baseline"],
                "run_dir": run["run_dir"],
            }
        )
        console.print(f"fragment curve: {n:2d} fragments: wall {run['wall_s']}s, evaluation {evaluation:.2f}s")
    done = [r for r in rows if "wall_s" in r]
    one = next((r for r in done if r["fragments"] == 1), None)
    for r in done:
        # Marginal cost of a fragment over a single one: everything but the evaluations it adds.
        if one is not None and r["fragments"] > 1:
            extra = (r["outside_evaluation_s"] - one["outside_evaluation_s"]) / (r["fragments"] - 1)
            r["overhead_per_extra_fragment_s"] = round(extra, 3)
            r["wall_per_extra_fragment_s"] = round((r["wall_s"] - one["wall_s"]) / (r["fragments"] - 1), 3)
    return rows


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    else:
        text = str(value)
    return f"{text} {unit}".strip()


def stages_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="stages against their ceilings (this machine)")
    for column in ("stage", "value", "ceiling", "ratio", "goal", "met"):
        table.add_column(column, justify="left" if column in ("stage", "goal") else "right")
    for row in rows:
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[row["met"]]
        table.add_row(
            row["stage"],
            _fmt(row["value"], row["unit"]),
            _fmt(row["ceiling"], row["unit"]),
            _fmt(row["ratio"]),
            row["goal"] or "-",
            met,
        )
    return table


def bench(
    model: Path,
    runs: int,
    out: Path,
    root: Path,
    console: Console | None = None,
    *,
    stages: bool = True,
    fragments_curve: list[int] | None = None,
    quality_fragments: int = 10,
    parallel: bool = True,
    max_new_tokens: int | None = None,
    threads: int | None = None,
    ceiling_repeats: int = 3,
) -> dict[str, Any]:
    console = console or wide_console()
    root.mkdir(parents=True, exist_ok=True)
    common: dict[str, Any] = {}
    if max_new_tokens is not None:
        common["max_new_tokens"] = max_new_tokens
    if threads is not None:
        common["threads"] = threads
    sequential = []
    for i in range(max(1, runs)):
        sequential.append(_one(model, f"forward-{i}", root, fragments=4, order="forward", **common))
        console.print(
            f"forward run {i + 1}/{runs}: transfer {sequential[-1]['transfer_mb_per_s']} MB/s, "
            f"wall {sequential[-1]['wall_s']}s"
        )
    plain = _one(model, "no-curve", root, fragments=4, order="forward", curve=False, **common)
    console.print(f"forward run without CURVE: transfer {plain['transfer_mb_per_s']} MB/s, wall {plain['wall_s']}s")
    par = None
    if parallel:
        par = _one(model, "parallel", root, fragments=4, order="forward", parallel=True, **common)
        console.print(f"parallel run: transfer {par['transfer_mb_per_s']} MB/s, wall {par['wall_s']}s")
    curve = None
    if quality_fragments > 0:
        curve = _one(model, "curve", root, fragments=quality_fragments, order="forward", **common)
        console.print("quality vs active layers:")
        for c in curve["checkpoints"]:
            kl = c["kl_to_baseline"] if c["kl_to_baseline"] is not None else math.nan
            bar = "#" * int(min(kl, 12) * 4) if math.isfinite(kl) else ""
            console.print(
                f"  {c['layers']:3d} layers  KL {kl:8.4f}  top1 {c['top1_agreement']:.2f}  {c['label']:20s} {bar}"
            )
    summary: dict[str, Any] = {
        "model": str(model),
        "runs": runs,
        "transfer_mb_per_s_median": statistics.median(r["transfer_mb_per_s"] for r in sequential),
        "whole_model_transfer_s_median": statistics.median(r["transfer_s"] for r in sequential),
        "generate_s_by_layers": {
            str(c["layers"]): statistics.median(r["checkpoints"][i]["generate_s"] for r in sequential)
            for i, c in enumerate(sequential[0]["checkpoints"])
        },
        "baseline_generate_s_median": statistics.median(r["baseline_generate_s"] for r in sequential),
        "peak_rss_mb_max": {
            k: max(r["peak_rss_mb"].get(k, 0) for r in sequential) for k in sequential[0]["peak_rss_mb"]
        },
        "transfer_mb_per_s_without_curve": plain["transfer_mb_per_s"],
        "final_matches_baseline": all(r["final_matches_baseline"] for r in [*sequential, plain]),
        "sequential": sequential,
        "no_curve": plain,
        "parallel": par,
        "quality_curve": curve,
    }

    def save() -> None:  # after every step: a bench killed half-way still leaves what it measured
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1) + "\n")

    save()
    if stages:
        # After the in-process runs: the page cache holds the model, so this run is warm.
        reference = sequential[0]
        summary["cli_forward"] = _attempt(
            console,
            f"warm `fragsim simulate --order forward` (fresh process, median of {ceiling_repeats})",
            lambda: median_run(
                [
                    cli_run(model, root, f"cli-forward-{i}", threads=threads, max_new_tokens=max_new_tokens)
                    for i in range(ceiling_repeats)
                ],
                "wall_s",
            ),
        )
        save()
        summary["ceilings"] = {}
        measure_stages(model, root, reference, console, repeats=ceiling_repeats, into=summary["ceilings"], save=save)
        summary["stages"] = build_stages(summary)
        console.print(stages_table(summary["stages"]))
        for row in summary["stages"]:
            if row.get("note"):
                console.print(f"[yellow]note[/] {row['stage']}: {row['note']}")
    if fragments_curve:
        summary["fragment_curve"] = []
        fragment_curve(model, root, fragments_curve, console, into=summary["fragment_curve"], save=save, **common)
        summary["final_matches_baseline"] = summary["final_matches_baseline"] and all(
            r.get("final_matches_baseline", True) for r in summary["fragment_curve"]
        )
    save()
    console.print(f"figures -> {out}")
    return summary


def parse_counts(spec: str) -> list[int]:
    """'1,2,4,8,15,30' -> [1, 2, 4, 8, 15, 30] (each at least 1)."""
    from protocol.errors import PlanError

    try:
        counts = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise PlanError("--fragments-curve", spec, "fragment counts separated by commas, e.g. 1,2,4,8,15,30") from None
    if not counts or any(n < 1 for n in counts):
        raise PlanError("--fragments-curve", spec, "fragment counts of at least 1, e.g. 1,2,4,8,15,30")
    return counts
