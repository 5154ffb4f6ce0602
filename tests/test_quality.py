"""Per-checkpoint quality on the eval text, the probe's residual stream and the parameter
census, measured on one real tiny run (coordinator and agent processes) and on the pieces."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import simulate
from coordinator.evaluate import prompt_ids, residual_stream_stats
from coordinator.launch.cli import main as fragsim
from coordinator.launch.options import SimulateOptions
from coordinator.launch.simulate import plan_run
from coordinator.quality import DEFAULT_EVAL_TEXT, MIN_EVAL_TOKENS, text_quality, token_cross_entropy, uniform_kl
from protocol.census import census
from protocol.exit_codes import RunExit
from protocol.plan import Plan
from protocol.run_settings import DEFAULT_PROBE, RunSettings
from sandbox import layout

STAT_KEYS = {"index", "mean", "std", "min", "max", "rms"}  # what results.py and the report read since the start
MAGNITUDE_KEYS = {"median_abs", "top", "max_over_median", "massive", "massive_entries", "top_share_of_squares"}


@pytest.fixture(scope="module")
def run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One forward run, 3 fragments: checkpoints of 2, 4 and 6 layers."""
    result = simulate(tiny_model, tmp_path_factory.mktemp("quality") / "run", fragments=3, order="forward")
    assert result.code == 0, result.output
    return {"results": result.results, "run_dir": result.run_dir}


def test_every_checkpoint_records_finite_quality_on_the_eval_text(run: dict[str, Any]) -> None:
    r = run["results"]
    scored = r["baseline"]["quality"]["tokens"]
    assert scored >= MIN_EVAL_TOKENS
    assert [c["layers"] for c in r["checkpoints"]] == [2, 4, 6]
    for c in r["checkpoints"]:
        q = c["quality"]
        assert set(q) == {"tokens", "ce", "ppl", "entropy", "kl", "top1"}
        assert q["tokens"] == scored
        assert math.isfinite(q["ce"]) and q["ce"] > 0 and q["ppl"] == pytest.approx(math.exp(q["ce"]))
        assert math.isfinite(q["kl"]) and q["kl"] >= 0.0 and 0.0 <= q["top1"] <= 1.0
        assert c["quality_s"] > 0 and "generate_s" in c, "the metrics' cost is timed apart from generation"


def test_partial_checkpoints_differ_from_the_full_model_on_the_eval_text(run: dict[str, Any]) -> None:
    first = run["results"]["checkpoints"][0]["quality"]
    assert first["kl"] > 0.0 and first["top1"] < 1.0


def test_the_final_checkpoint_has_zero_kl_and_the_baselines_cross_entropy(run: dict[str, Any]) -> None:
    r = run["results"]
    final, base = r["checkpoints"][-1]["quality"], r["baseline"]["quality"]
    assert r["checkpoints"][-1]["layers"] == r["baseline"]["num_layers"]
    assert final["kl"] == 0.0 and final["top1"] == 1.0
    assert final["ce"] == base["ce"] and final["ppl"] == base["ppl"] and final["entropy"] == base["entropy"]


def test_the_baseline_records_its_own_quality_without_a_comparison(run: dict[str, Any]) -> None:
    base = run["results"]["baseline"]
    assert set(base["quality"]) == {"tokens", "ce", "ppl", "entropy"} and base["quality_s"] > 0


def test_the_baseline_logits_hold_the_full_models_eval_logits_in_float32(run: dict[str, Any]) -> None:
    logits = load_file(str(run["run_dir"] / layout.BASELINE_LOGITS))
    scored = run["results"]["baseline"]["quality"]["tokens"]
    assert logits["eval"].dtype == torch.float32
    assert logits["eval"].shape[0] == scored + 1  # every id has logits; the last predicts nothing scored


def test_hidden_states_have_one_row_per_residual_index(run: dict[str, Any]) -> None:
    for c in run["results"]["checkpoints"]:
        rows = c["hidden_states"]
        assert [h["index"] for h in rows] == list(range(c["layers"] + 1))
        for h in rows:
            assert set(h) == STAT_KEYS | MAGNITUDE_KEYS | {"without_first"}
            assert set(h["without_first"]) == STAT_KEYS - {"index"} | MAGNITUDE_KEYS
            assert h["min"] <= h["mean"] <= h["max"] and h["std"] >= 0 and h["rms"] >= abs(h["mean"])


def test_the_baseline_hidden_states_cover_the_full_model(run: dict[str, Any]) -> None:
    base = run["results"]["baseline"]
    assert [h["index"] for h in base["hidden_states"]] == list(range(base["num_layers"] + 1))


def test_a_prefix_has_the_full_models_first_residual_rows(run: dict[str, Any]) -> None:
    base = run["results"]["baseline"]["hidden_states"]
    for c in run["results"]["checkpoints"]:
        assert c["hidden_states"] == base[: c["layers"] + 1], "same weights, same probe: the same stream"


def test_residual_rows_are_the_decoder_outputs_before_the_final_norm(tiny_model: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = prompt_ids(AutoTokenizer.from_pretrained(tiny_model), DEFAULT_PROBE)[0].tolist()
    rows = residual_stream_stats(model, ids)
    with torch.inference_mode():
        hf = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    layers = model.config.num_hidden_layers
    assert len(rows) == len(hf) == layers + 1
    for i in range(layers):  # HF's entries agree up to the last, which has the final norm applied
        assert rows[i]["std"] == pytest.approx(hf[i].double().std(correction=0).item(), rel=1e-9)
    assert rows[layers]["std"] != pytest.approx(hf[layers].double().std(correction=0).item(), rel=1e-3)


def test_the_run_directory_keeps_the_eval_text_it_scored(run: dict[str, Any]) -> None:
    copy = run["run_dir"] / layout.EVAL_TEXT
    assert copy.read_text(encoding="utf-8") == DEFAULT_EVAL_TEXT.read_text(encoding="utf-8")
    assert run["results"]["run"]["eval_text"] is None and run["results"]["run"]["probe"] == DEFAULT_PROBE


def test_results_markdown_shows_quality_residual_stream_and_census(run: dict[str, Any]) -> None:
    md = (run["run_dir"] / layout.RESULTS_MD).read_text()
    for heading in ("## Checkpoint quality on the eval text", "## Residual stream on the probe", "## Parameter census"):
        assert heading in md


def test_census_totals_match_the_plan_bytes(run: dict[str, Any]) -> None:
    c = run["results"]["census"]
    plan = Plan.loads((run["run_dir"] / layout.PLAN).read_bytes())
    assert c["bytes_match"] is True and c["counted_bytes"] == c["tensor_bytes"]
    assert c["tensor_bytes"] == sum(i.nbytes for f in plan.fragments for i in f.items if i.kind == "tensor")
    assert c["total"] == plan.model["num_parameters"]
    assert len(c["blocks"]) == plan.num_layers and c["lm_head"] == 0, "tiny_model ties its lm_head"
    block = c["blocks"][0]
    parts = sum(block["attention"].values()) + sum(block["mlp"].values()) + block["norms"] + block["other"]
    assert parts == block["total"] and block["other"] == 0


def test_census_counts_an_untied_lm_head(tiny_untied_sharded: Path, tmp_path: Path) -> None:
    opts = SimulateOptions(model=str(tiny_untied_sharded), run_dir=str(tmp_path / "run"), threads=1)
    c = census(plan_run(opts, tiny_untied_sharded, "untied").plan)
    assert c["lm_head"] == c["embeddings"] > 0 and c["bytes_match"]
    assert c["total"] == c["embeddings"] + c["blocks_total"] + c["final_norm"] + c["lm_head"] + c["other"]


@pytest.mark.slow
def test_census_of_smollm2_135m_is_its_parameter_count(default_source: Path, tmp_path: Path) -> None:
    opts = SimulateOptions(model=str(default_source), run_dir=str(tmp_path / "run"))
    c = census(plan_run(opts, default_source, "smollm2").plan)
    assert c["total"] == 134_515_008 and c["bytes_match"] and len(c["blocks"]) == 30


def test_identical_logits_have_zero_kl_and_the_defined_cross_entropy() -> None:
    torch.manual_seed(0)
    logits, ids = torch.randn(20, 50), torch.randint(0, 50, (20,)).tolist()
    q = text_quality(logits, ids, logits.clone())
    assert q["kl"] == 0.0 and q["top1"] == 1.0 and q["tokens"] == 19
    assert q["ce"] == token_cross_entropy(logits, ids)


def test_uniform_logits_have_the_entropy_ln_v_and_their_kl_is_ln_v_minus_the_full_entropy() -> None:
    torch.manual_seed(2)
    full, ids = torch.randn(20, 50), torch.randint(0, 50, (20,)).tolist()
    uniform = text_quality(torch.zeros(20, 50), ids, full)
    assert uniform["entropy"] == pytest.approx(math.log(50))
    assert uniform["kl"] == pytest.approx(uniform_kl(text_quality(full, ids)["entropy"], 50))


def test_kl_is_positive_for_other_logits_and_shapes_must_agree() -> None:
    torch.manual_seed(1)
    logits, ids = torch.randn(20, 50), torch.randint(0, 50, (20,)).tolist()
    assert text_quality(logits, ids, torch.randn(20, 50))["kl"] > 0.0
    with pytest.raises(ValueError, match="expected"):
        text_quality(logits, ids, torch.randn(19, 50))


def test_a_chosen_eval_text_and_probe_are_copied_and_recorded(tiny_model: Path, tmp_path: Path) -> None:
    text = tmp_path / "mine.txt"
    text.write_text("A quiet morning on the river, with boats and gulls and the smell of bread. " * 3)
    opts = SimulateOptions(model=str(tiny_model), run_dir=str(tmp_path / "run"), eval_text=str(text), probe="2 + 2")
    prepared = plan_run(opts, tiny_model, "tiny")
    assert (prepared.run_dir / layout.EVAL_TEXT).read_text() == text.read_text()
    saved = RunSettings.from_json(json.loads((prepared.run_dir / layout.RUN_SETTINGS).read_text()))
    assert saved.options.eval_text == str(text) and saved.options.probe == "2 + 2"


@pytest.mark.parametrize(
    "content,why",
    [
        (None, "no such file"),
        ("", "empty"),
        ("   \n\n", "empty"),
        ("far too short", "words"),
        (b"\xff\xfe not utf-8 " * 10, "UTF-8"),
    ],
    ids=["missing", "empty", "blank", "too-short", "not-utf8"],
)
def test_a_bad_eval_text_is_refused_before_anything_is_created(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | bytes | None, why: str
) -> None:
    path = tmp_path / "eval.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    run_dir, artifacts = tmp_path / "run", tmp_path / "artifacts"
    args = ["simulate", "--model", str(tiny_model), "--run-dir", str(run_dir), "--artifacts", str(artifacts)]
    code = fragsim([*args, "--eval-text", str(path)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == RunExit.USAGE and len(err) == 1, err
    assert "--eval-text" in err[0] and "expected" in err[0] and why in err[0] and str(path) in err[0]
    assert not run_dir.exists() and not artifacts.exists()


def test_an_empty_probe_is_refused(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = fragsim(["simulate", "--model", str(tiny_model), "--run-dir", str(tmp_path / "run"), "--probe", " "])
    err = capsys.readouterr().err
    assert code == RunExit.USAGE and "--probe" in err and not (tmp_path / "run").exists()
