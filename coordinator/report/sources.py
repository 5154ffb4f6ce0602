"""What a report is made from, read and told apart: a run directory (results.json and its
logs), a sweep directory (sweep.json), or an ablation JSON (fragsim ablate)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.report.timeline import Timeline, run_timeline
from protocol.errors import PlanError
from sandbox import layout

SWEEP_JSON = "sweep.json"
EXPECTED = (
    "a run directory (holding plan.json), a sweep directory (holding sweep.json) or an ablation JSON written by "
    "fragsim ablate"
)


@dataclass
class RunSource:
    run_dir: Path
    results: dict[str, Any] | None  # None: the run has not finished
    launcher: dict[str, Any] | None
    timeline: Timeline
    vocab_size: int | None


@dataclass
class SweepSource:
    sweep_dir: Path
    sweep: dict[str, Any]
    vocab_size: int | None


@dataclass
class AblationSource:
    path: Path
    ablation: dict[str, Any]


Source = RunSource | SweepSource | AblationSource


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PlanError("report input", str(path), f"readable JSON ({exc})") from None


def plan_vocab_size(run_dir: Path) -> int | None:
    """The vocabulary size from the run's plan (results.json leaves the model config out)."""
    try:
        plan = json.loads((run_dir / layout.PLAN).read_text())
        return int(plan["model"]["config"]["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_source(target: Path) -> Source:
    target = Path(target)
    if target.is_dir() and (target / layout.PLAN).is_file():
        results_path = target / layout.RESULTS_JSON
        launcher_path = target / layout.LAUNCHER_JSON
        results = _json(results_path) if results_path.is_file() else None
        launcher = _json(launcher_path) if launcher_path.is_file() else None
        return RunSource(target, results, launcher, run_timeline(target), plan_vocab_size(target))
    if target.is_dir() and (target / SWEEP_JSON).is_file():
        sweep = _json(target / SWEEP_JSON)
        if not isinstance(sweep, dict) or "groups" not in sweep:
            raise PlanError("report input", str(target / SWEEP_JSON), "the sweep.json fragsim sweep writes")
        return SweepSource(target, sweep, _sweep_vocab(sweep))
    if target.is_file() and target.suffix == ".json":
        data = _json(target)
        if isinstance(data, dict) and {"full", "layers", "ranking"} <= data.keys():
            return AblationSource(target, data)
        if isinstance(data, dict) and "groups" in data and "per_trial" in data:
            return SweepSource(target.parent, data, _sweep_vocab(data))
        raise PlanError("report input", str(target), EXPECTED)
    raise PlanError("report input", str(target), EXPECTED)


def _sweep_vocab(sweep: dict[str, Any]) -> int | None:
    for trial in sweep.get("per_trial") or []:
        if trial.get("run_dir") and (vocab := plan_vocab_size(Path(trial["run_dir"]))):
            return vocab
    return None
