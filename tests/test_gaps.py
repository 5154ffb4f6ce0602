"""`--reassembly gaps`: beside the prefix checkpoints, every arrived layer with the holes skipped."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import simulate
from coordinator.launch.cli import main
from coordinator.replay import run_replay
from protocol import log_events as E
from protocol.exit_codes import RunExit


def test_a_gapped_arrival_records_one_gap_checkpoint_and_the_final_stays_exact(
    tiny_model: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    result = simulate(tiny_model, run_dir, fragments=3, order="0,2,1", reassembly="gaps", max_new_tokens=4)
    assert result.code == 0, result.output
    assert result.results["final_matches_baseline"] is True
    gaps = result.results["gap_checkpoints"]
    assert len(gaps) == 1
    gap = gaps[0]
    assert gap["arrival"] == 2
    assert gap["layers"] == [0, 1, 4, 5] and gap["num_layers"] == 4
    assert gap["fragments"] == [0, 2] and gap["missing"] == ["2-3"] and gap["missing_fragments"] == [1]
    assert gap["tokens"] and isinstance(gap["text"], str) and gap["label"]
    assert math.isfinite(gap["kl_to_baseline"]) and math.isfinite(gap["quality"]["ppl"])
    assert len(gap["hidden_states"]) == 5
    logged = [json.loads(line) for line in (run_dir / "logs" / "coordinator.jsonl").read_text().splitlines()]
    assert [d["arrival"] for d in logged if d.get("event") == E.GAP_EVALUATED] == [2]
    assert "Gap checkpoints" in (run_dir / "results.md").read_text()
    replay = run_replay(run_dir)
    assert replay.agrees, replay.differences


def test_a_default_run_has_no_gap_checkpoints(tiny_model: Path, tmp_path: Path) -> None:
    result = simulate(tiny_model, tmp_path / "run", fragments=3, order="0,2,1", max_new_tokens=4)
    assert result.code == 0, result.output
    assert result.results["gap_checkpoints"] == []


def test_a_bad_reassembly_value_is_refused_before_anything_is_created(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, artifacts = tmp_path / "run", tmp_path / "artifacts"
    argv = ["simulate", "--model", str(tiny_model), "--run-dir", str(run_dir), "--artifacts", str(artifacts)]
    code = main([*argv, "--reassembly", "holes"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == RunExit.USAGE == 2
    assert len(err) == 1 and "--reassembly" in err[0], err
    assert not run_dir.exists() and not artifacts.exists()
