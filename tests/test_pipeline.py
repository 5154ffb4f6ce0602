"""The coordinator keeps serving its socket while it evaluates (evaluation runs off the loop)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import simulate
from protocol import log_events as E
from sandbox import layout


def coordinator_events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / layout.COORDINATOR_LOG).read_text().splitlines()]


def test_an_agent_is_welcomed_while_a_checkpoint_is_being_evaluated(tiny_model: Path, tmp_path: Path) -> None:
    # 480 new tokens make each evaluation take seconds on the tiny model; forward order starts
    # agent 1 as soon as fragment 0 is committed, i.e. while checkpoint 1 is evaluated.
    result = simulate(tiny_model, tmp_path / "run", fragments=3, order="forward", max_new_tokens=480)
    assert result.code == 0 and result.results["final_matches_baseline"], result.output
    events = coordinator_events(result.run_dir)
    (first,) = [e for e in events if e["event"] == E.CHECKPOINT_EVALUATED and e["checkpoint"] == 1]
    welcomed = [e["mono"] for e in events if e["event"] == E.AGENT_WELCOMED and e["fragment"] == 1]
    assert welcomed and first["started_mono"] < welcomed[0] < first["mono"], (first, welcomed)


def test_checkpoints_are_evaluated_in_arrival_order(tiny_model: Path, tmp_path: Path) -> None:
    result = simulate(tiny_model, tmp_path / "run", fragments=3, order="forward", parallel=True, max_new_tokens=64)
    assert result.code == 0, result.output
    evaluated = [e["checkpoint"] for e in coordinator_events(result.run_dir) if e["event"] == E.CHECKPOINT_EVALUATED]
    reassembled = [a["checkpoint"] for e in coordinator_events(result.run_dir) if e["event"] == E.CORE_STEP
                   for a in e["out"] if a["type"] == "reassemble"]  # fmt: skip
    assert evaluated == reassembled == sorted(evaluated)
