"""`fragsim ablate`: ablating decoder layers of a loaded model by each method (skip,
zero-output, mean, resample), measuring CE/PPL, greedy removal, and judging seed 001's claims.
Tiny random Llamas, except the one slow real-model test."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from checkpoints import make_tiny_llama
from coordinator.evaluate import sequence_logits
from coordinator.lab.ablate import (
    ablate,
    anti_layers,
    block_spans,
    greedy_removal,
    importance_range_log10,
    measure,
    parse_widths,
    ranking,
    run_ablation,
    seed_001,
    tables,
)
from coordinator.lab.ablation_methods import (
    METHODS,
    ablated,
    decoder_layers,
    hooked_layers,
    parse_methods,
    replace_update,
    sample_derangement,
    without_layers,
)
from coordinator.launch.cli import main
from coordinator.quality import eval_ids, read_eval_text
from protocol.errors import PlanError
from protocol.exit_codes import RunExit

LAYERS = 6
IDENTITY = 3  # the layer whose o_proj and down_proj are zero: its residual passes through unchanged
TOKENS = 64
GREEDY = 2


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=160)


def _load(path: Path) -> tuple[Any, Any]:
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype="auto").eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


@pytest.fixture(scope="module")
def identity_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama whose layer IDENTITY adds nothing to the residual stream."""
    root = tmp_path_factory.mktemp("ablate")
    model, tokenizer = _load(make_tiny_llama(root / "random", num_layers=LAYERS, seed=5))
    layer = decoder_layers(model)[IDENTITY]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(root / "identity")
    tokenizer.save_pretrained(root / "identity")
    return root / "identity"


@pytest.fixture(scope="module")
def identity_run(identity_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`ablate` once on the identity model by every method, blocks of width 1 and 2, GREEDY
    greedy steps; the JSON it wrote."""
    out = tmp_path_factory.mktemp("ablate-out") / "ablation.json"
    ablate(
        identity_model,
        out,
        widths=[1, 2],
        methods=METHODS,
        greedy=GREEDY,
        threads=1,
        max_tokens=TOKENS,
        console=_quiet(),
    )
    data: dict[str, Any] = json.loads(out.read_text())
    return data


@pytest.fixture
def loaded(identity_model: Path) -> tuple[Any, list[int]]:
    model, tokenizer = _load(identity_model)
    return model, eval_ids(tokenizer, read_eval_text(), TOKENS)


def _hooks(model: Any) -> list[list[int]]:
    """The forward hooks on each decoder layer (HF may install some of its own and keep them)."""
    return [[*layer._forward_hooks, *layer._forward_pre_hooks] for layer in decoder_layers(model)]


def _layer(data: dict[str, Any], index: int) -> dict[str, Any]:
    row: dict[str, Any] = next(r for r in data["layers"] if r["removed"] == index)
    return row


# ---- removing layers ------------------------------------------------------------------------


def test_removing_an_identity_layer_leaves_cross_entropy_unchanged(identity_run: dict[str, Any]) -> None:
    row = _layer(identity_run, IDENTITY)
    assert math.isclose(row["ce"], identity_run["full"]["ce"], rel_tol=0, abs_tol=1e-6)
    assert abs(row["ppl_change_pct"]) < 1e-3


def test_removing_a_normal_layer_changes_cross_entropy(identity_run: dict[str, Any]) -> None:
    for index in range(LAYERS):
        if index != IDENTITY:
            assert abs(_layer(identity_run, index)["ce"] - identity_run["full"]["ce"]) > 1e-3, index


def test_a_block_with_the_identity_layer_measures_as_its_other_layer_alone(identity_run: dict[str, Any]) -> None:
    block = next(b for b in identity_run["blocks"] if b["removed"] == [IDENTITY - 1, IDENTITY])
    assert math.isclose(block["ce"], _layer(identity_run, IDENTITY - 1)["ce"], rel_tol=0, abs_tol=1e-6)


def test_kept_layers_are_renumbered_while_others_are_removed(loaded: tuple[Any, list[int]]) -> None:
    model, _ = loaded
    originals = list(decoder_layers(model))
    with without_layers(model, [1, 2]) as kept:
        layers = decoder_layers(model)
        assert kept == [0, 3, 4, 5] and list(layers) == [originals[i] for i in kept]
        assert model.config.num_hidden_layers == len(layers) == 4
        assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3]


def test_an_ablated_model_gives_the_same_logits_with_a_kv_cache(loaded: tuple[Any, list[int]]) -> None:
    model, ids = loaded
    with without_layers(model, [0, 4]), torch.inference_mode():
        cached = model(torch.tensor([ids]), use_cache=True).logits[0]
        assert torch.allclose(cached, sequence_logits(model, ids), atol=1e-5)


def test_the_model_is_restored_after_the_ablation(loaded: tuple[Any, list[int]]) -> None:
    model, ids = loaded
    before = sequence_logits(model, ids)
    layers = decoder_layers(model)
    run_ablation(model, ids, [1, 2, 4])
    assert decoder_layers(model) is layers and model.config.num_hidden_layers == LAYERS
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(LAYERS))
    assert torch.equal(sequence_logits(model, ids), before)


def test_the_model_is_restored_when_a_measurement_raises(loaded: tuple[Any, list[int]]) -> None:
    model, _ = loaded
    layers = decoder_layers(model)
    with pytest.raises(RuntimeError, match="mid-ablation"), without_layers(model, [2]):
        raise RuntimeError("mid-ablation")
    assert decoder_layers(model) is layers and model.config.num_hidden_layers == LAYERS
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(LAYERS))


def test_removing_every_layer_or_a_missing_one_is_refused(loaded: tuple[Any, list[int]]) -> None:
    model, _ = loaded
    for removed in (range(LAYERS), [LAYERS], [-1]):
        with pytest.raises(ValueError), without_layers(model, removed):
            pass
    assert len(decoder_layers(model)) == LAYERS


# ---- the ablation methods -------------------------------------------------------------------


def _method_layer(data: dict[str, Any], method: str, index: int) -> dict[str, Any]:
    row: dict[str, Any] = next(r for r in data["methods"][method]["layers"] if r["removed"] == index)
    return row


@pytest.mark.parametrize("method", ["skip", "mean", "resample"])
def test_ablating_the_identity_layer_changes_nothing(identity_run: dict[str, Any], method: str) -> None:
    row = _method_layer(identity_run, method, IDENTITY)
    assert math.isclose(row["ce"], identity_run["full"]["ce"], rel_tol=0, abs_tol=1e-6)


@pytest.mark.parametrize("method", ["mean", "resample"])
def test_ablating_a_normal_layer_by_its_update_changes_cross_entropy(identity_run: dict[str, Any], method: str) -> None:
    for index in range(LAYERS):
        if index != IDENTITY:
            assert abs(_method_layer(identity_run, method, index)["ce_change"]) > 1e-4, index


def test_zero_output_of_any_layer_or_block_gives_the_uniform_cross_entropy(identity_run: dict[str, Any]) -> None:
    ln_v = math.log(identity_run["vocab_size"])
    result = identity_run["methods"]["zero-output"]
    assert identity_run["ln_vocab"] == ln_v
    for row in result["layers"] + result["blocks"]:
        assert math.isclose(row["ce"], ln_v, rel_tol=0, abs_tol=1e-6), row["removed"]


def test_every_row_records_its_method(identity_run: dict[str, Any]) -> None:
    assert identity_run["ablation"] == list(METHODS) and list(identity_run["methods"]) == list(METHODS)
    for method, result in identity_run["methods"].items():
        assert result["method"] == method
        assert {row["method"] for row in result["layers"] + result["blocks"]} == {method}
    for method, rows in identity_run["greedy"]["by_method"].items():
        assert {row["method"] for row in rows} == {method}


def test_the_top_level_result_is_the_first_methods(identity_run: dict[str, Any]) -> None:
    first = identity_run["methods"][identity_run["method"]]
    assert identity_run["method"] == METHODS[0]
    assert identity_run["layers"] == first["layers"] and identity_run["ranking"] == first["ranking"]


def test_mean_replaces_each_update_by_the_mean_update() -> None:
    x = torch.randn(1, 5, 3, generator=torch.Generator().manual_seed(1))
    y = x + torch.arange(15.0).reshape(1, 5, 3)
    out = replace_update("mean", x, y, torch.Generator())
    assert torch.allclose(out - x, torch.tensor([6.0, 7.0, 8.0]).expand(1, 5, 3))


def test_resample_gives_each_position_another_positions_update() -> None:
    x = torch.zeros(1, 6, 2)
    y = torch.arange(6.0).repeat_interleave(2).reshape(1, 6, 2)  # position t's update is (t, t)
    out = replace_update("resample", x, y, torch.Generator().manual_seed(3))
    taken = out[0, :, 0].long().tolist()
    assert sorted(taken) == list(range(6)) and all(t != position for position, t in enumerate(taken))


def test_a_derangement_has_no_fixed_point_and_needs_two_positions() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        permutation = sample_derangement(4, generator)
        assert sorted(permutation.tolist()) == [0, 1, 2, 3] and all(permutation != torch.arange(4))
    with pytest.raises(ValueError, match="at least 2"):
        sample_derangement(1, generator)


def test_resample_is_reproducible_with_its_seed(loaded: tuple[Any, list[int]]) -> None:
    model, ids = loaded
    runs = []
    for seed in (0, 0, 1):
        with ablated(model, [1], "resample", seed):
            runs.append(measure(model, ids)["ce"])
    assert runs[0] == runs[1] != runs[2]


@pytest.mark.parametrize("method", METHODS)
def test_the_model_is_restored_bit_exactly_after_each_method(loaded: tuple[Any, list[int]], method: str) -> None:
    model, ids = loaded
    before, hooks = sequence_logits(model, ids), _hooks(model)
    layers = decoder_layers(model)
    run_ablation(model, ids, [1, 2], method=method)
    assert decoder_layers(model) is layers and model.config.num_hidden_layers == LAYERS
    assert _hooks(model) == hooks
    assert torch.equal(sequence_logits(model, ids), before)


def test_the_hooks_are_removed_when_a_measurement_raises(loaded: tuple[Any, list[int]]) -> None:
    model, ids = loaded
    before, hooks = sequence_logits(model, ids), _hooks(model)
    with pytest.raises(RuntimeError, match="mid-ablation"), hooked_layers(model, [1, 2], "mean"):
        raise RuntimeError("mid-ablation")
    assert _hooks(model) == hooks
    assert torch.equal(sequence_logits(model, ids), before)


def test_a_hooked_method_refuses_skip_and_unknown_layers(loaded: tuple[Any, list[int]]) -> None:
    model, _ = loaded
    hooks = _hooks(model)
    for layers, method in (([0], "skip"), ([LAYERS], "mean"), ([0], "drop")):
        with pytest.raises(ValueError), hooked_layers(model, layers, method):
            pass
    assert _hooks(model) == hooks


def test_ablation_methods_are_parsed_in_order_each_once() -> None:
    assert parse_methods("mean, skip,mean") == ["mean", "skip"]
    assert parse_methods("skip,zero-output,mean,resample") == list(METHODS)


def test_an_unknown_or_empty_ablation_method_is_refused_naming_the_choices() -> None:
    for bad, named in (("skip,drop", "drop"), ("", ""), (" , ", " , ")):
        with pytest.raises(PlanError, match="--ablation") as refused:
            parse_methods(bad)
        assert refused.value.value == named and all(m in str(refused.value) for m in METHODS)


# ---- greedy removal -------------------------------------------------------------------------


def test_greedy_never_removes_the_first_or_last_layer(loaded: tuple[Any, list[int]]) -> None:
    model, ids = loaded
    steps = greedy_removal(model, ids, LAYERS - 2)
    assert sorted(row["removed"] for row in steps) == list(range(1, LAYERS - 1))


def test_greedy_reports_one_row_per_step_each_on_top_of_the_last(identity_run: dict[str, Any]) -> None:
    greedy = identity_run["greedy"]
    assert greedy["steps"] == GREEDY and greedy["protected"] == [0, LAYERS - 1]
    for rows in greedy["by_method"].values():
        assert [row["step"] for row in rows] == list(range(1, GREEDY + 1))
        for before, after in zip([[]] + [r["removed_so_far"] for r in rows], rows, strict=False):
            assert after["removed_so_far"] == sorted(before + [after["removed"]])


def test_a_greedy_step_measures_the_model_without_everything_removed_so_far(loaded: tuple[Any, list[int]]) -> None:
    model, ids = loaded
    last = greedy_removal(model, ids, 3, method="mean")[-1]
    with ablated(model, last["removed_so_far"], "mean"):
        assert measure(model, ids)["ce"] == last["ce"]


def test_greedy_picks_the_layer_whose_removal_leaves_the_lowest_cross_entropy(loaded: tuple[Any, list[int]]) -> None:
    model, ids = loaded
    first = greedy_removal(model, ids, 1)[0]
    for layer in range(1, LAYERS - 1):
        with without_layers(model, [layer]):
            assert measure(model, ids)["ce"] >= first["ce"], layer


def test_greedy_refuses_more_steps_than_unprotected_layers(loaded: tuple[Any, list[int]]) -> None:
    model, ids = loaded
    with pytest.raises(PlanError, match="--greedy"):
        greedy_removal(model, ids, LAYERS - 1)


# ---- the JSON and what is derived from it ----------------------------------------------------


def test_the_json_has_every_documented_field(identity_run: dict[str, Any], identity_model: Path) -> None:
    data = identity_run
    assert data["model"] == str(identity_model) and data["text"].endswith("eval_text.txt")
    assert data["text_tokens"] == TOKENS and set(data["full"]) == {"ce", "ppl"}
    assert [r["removed"] for r in data["layers"]] == list(range(LAYERS))
    for row in data["layers"] + data["blocks"]:
        assert {"removed", "ce", "ppl", "ppl_change_pct"} <= set(row)
        assert math.isclose(row["ppl_change_pct"], 100 * (row["ppl"] / data["full"]["ppl"] - 1), rel_tol=1e-9)
    assert sorted(data["ranking"]) == list(range(LAYERS))
    assert isinstance(data["anti_layers"], list) and data["seconds"] > 0
    assert [c["holds"] for c in data["seed_001"]["claims"]] == [None, None, None]  # no L8-L17 in 6 layers
    assert data["resample_seed"] == 0 and data["vocab_size"] == 384
    for result in data["methods"].values():
        assert {"method", "layers", "blocks", "ranking", "anti_layers", "seed_001", "measure_s"} <= set(result)
    assert {"block_influence", "angular_distance", "spearman", "pruning_choices"} <= set(data["proxies"])
    assert data["forward_passes"] == 1 + len(METHODS) * (LAYERS + (LAYERS - 1) + (4 + 3)) + 1  # + greedy, proxies


def test_blocks_hold_only_the_wider_widths(identity_run: dict[str, Any]) -> None:
    assert [b["removed"] for b in identity_run["blocks"]] == [[a, a + 1] for a in range(LAYERS - 1)]


def test_block_spans_skip_widths_that_would_remove_every_layer() -> None:
    assert block_spans(4, [1, 2, 4, 8]) == [(0, 1), (1, 2), (2, 3)]
    assert block_spans(5, [3]) == [(0, 2), (1, 3), (2, 4)]


def test_block_widths_are_parsed_and_bad_ones_refused() -> None:
    assert parse_widths("4,1,2,2") == [1, 2, 4]
    for bad in ("", "0", "2,-1", "two"):
        with pytest.raises(PlanError, match="--blocks"):
            parse_widths(bad)


FULL_CE = 3.0


def _rows(ce_by_layer: dict[int, float]) -> list[dict[str, Any]]:
    full_ppl = math.exp(FULL_CE)
    return [
        {
            "removed": i,
            "ce": ce,
            "ppl": math.exp(ce),
            "ce_change": ce - FULL_CE,
            "ppl_change_pct": 100 * (math.exp(ce) / full_ppl - 1),
        }
        for i, ce in sorted(ce_by_layer.items())
    ]


def test_ranking_orders_layers_by_damage() -> None:
    rows = _rows({0: 3.5, 1: 9.0, 2: 2.0, 3: 3.5, 4: float("nan")})
    assert ranking(rows) == [4, 1, 0, 3, 2]  # a NaN is the worst; ties by layer index


def test_anti_layers_are_the_layers_whose_removal_lowers_cross_entropy() -> None:
    rows = _rows({0: 5.0, 1: 2.9, 2: FULL_CE, 3: 1.0})
    assert anti_layers(FULL_CE, rows) == [1, 3]  # removing layer 2 changes nothing: not an anti-layer


def _paper_like(worst_change_pct: float = 63_419.0) -> dict[int, float]:
    ce = {i: FULL_CE + 0.1 for i in range(30)}
    ce.update({8: 6.0, 10: 6.5, 11: 6.2, 14: 2.9, 17: 2.95})
    ce[9] = FULL_CE + math.log(1 + worst_change_pct / 100)
    return ce


def test_seed_claims_hold_on_measurements_like_the_papers() -> None:
    rows = _rows(_paper_like())
    order = ranking(rows)
    result = seed_001(rows, order, anti_layers(FULL_CE, rows))
    assert [c["holds"] for c in result["claims"]] == [True, True, True]
    assert result["claims"][1]["measured"]["layer"] == 9 and result["claims"][1]["measured"]["in_critical_core"]


def test_seed_claims_fail_on_measurements_unlike_the_papers() -> None:
    ce = _paper_like(worst_change_pct=500.0)  # a far milder worst layer ...
    ce[0] = 20.0  # ... and layer 0, not the core, is the most damaging
    ce[14] = FULL_CE + 0.01  # removing L14 now hurts
    rows = _rows(ce)
    result = seed_001(rows, ranking(rows), anti_layers(FULL_CE, rows))
    assert [c["holds"] for c in result["claims"]] == [False, False, False]


def test_the_tables_show_the_worst_layers_the_anti_layers_and_the_seed_claims(identity_run: dict[str, Any]) -> None:
    console = _quiet()
    for table in tables(identity_run):
        console.print(table)
    shown = console.file.getvalue()  # type: ignore[attr-defined]
    for title in ("most damaging single layers", "anti-layers", "most damaging block", "seed 001"):
        assert title in shown
    for title in ("greedy removal", "Spearman", "angular distance would prune"):
        assert title in shown
    assert all(method in shown for method in METHODS)


def test_the_magnitude_claim_needs_the_worst_layer_in_the_critical_core() -> None:
    ce = _paper_like()
    ce[0] = ce[9] + 0.01  # the paper's size of damage, but at L0
    rows = _rows(ce)
    magnitude = seed_001(rows, ranking(rows), anti_layers(FULL_CE, rows))["claims"][1]
    assert magnitude["measured"]["ppl_ratio_vs_paper_log10"] < math.log10(2) and magnitude["holds"] is False
    assert magnitude["measured"]["core_worst"]["layer"] == 9


def test_the_importance_range_counts_orders_of_magnitude_between_layers() -> None:
    rows = _rows({0: FULL_CE + math.log(1.5), 1: FULL_CE + math.log(1.005), 2: FULL_CE})  # +50 %, +0.5 %, 0
    assert importance_range_log10(rows) == 2.0  # the unchanged layer has no order of magnitude
    assert importance_range_log10(rows[:1]) is None


# ---- the command ----------------------------------------------------------------------------


def test_the_ablate_command_writes_the_json(identity_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "ablation.json"
    argv = ["ablate", "--model", str(identity_model), "--out", str(out), "--max-tokens", "32", "--blocks", "1"]
    assert main([*argv, "--threads", "1"]) == 0
    data = json.loads(out.read_text())
    assert data["text_tokens"] == 32 and len(data["layers"]) == LAYERS and data["blocks"] == []


def test_the_ablate_command_measures_each_method_into_one_json(identity_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "ablation.json"
    argv = ["ablate", "--model", str(identity_model), "--out", str(out), "--max-tokens", "32", "--blocks", "1"]
    assert main([*argv, "--ablation", "mean,skip", "--greedy", "1", "--seed", "7", "--threads", "1"]) == 0
    data = json.loads(out.read_text())
    assert data["ablation"] == ["mean", "skip"] and list(data["methods"]) == ["mean", "skip"]
    assert data["method"] == "mean" and data["resample_seed"] == 7
    assert list(data["greedy"]["by_method"]) == ["mean", "skip"]


def test_the_ablate_command_refuses_an_unknown_ablation_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ablation.json"
    argv = ["ablate", "--model", str(tmp_path / "absent"), "--ablation", "skip,drop", "--out", str(out)]
    assert main(argv) == RunExit.USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert "--ablation" in err and "'drop'" in err and "skip, zero-output, mean, resample" in err
    assert not out.exists()


def test_the_ablate_command_refuses_a_negative_greedy_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ablation.json"
    assert main(["ablate", "--model", str(tmp_path / "absent"), "--greedy", "-1", "--out", str(out)]) == RunExit.USAGE
    assert "--greedy" in capsys.readouterr().err and not out.exists()


def test_the_ablate_command_refuses_bad_blocks_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ablation.json"
    assert main(["ablate", "--model", str(tmp_path / "absent"), "--blocks", "0", "--out", str(out)]) == RunExit.USAGE
    assert "--blocks" in capsys.readouterr().err and not out.exists()


def test_the_ablate_command_refuses_a_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ablation.json"
    assert main(["ablate", "--model", str(tmp_path / "absent"), "--out", str(out)]) == RunExit.USAGE
    assert "config.json" in capsys.readouterr().err and not out.exists()


def test_the_ablate_command_refuses_an_empty_text(
    identity_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty.txt").write_text(" \n")
    out = tmp_path / "ablation.json"
    argv = ["ablate", "--model", str(identity_model), "--text", str(tmp_path / "empty.txt"), "--out", str(out)]
    assert main(argv) == RunExit.USAGE
    assert "empty" in capsys.readouterr().err and not out.exists()


# ---- the real model -------------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_ablation_on_a_short_text(default_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "ablation.json"
    summary = ablate(
        default_source, out, widths=[1], methods=["skip", "zero-output"], threads=2, max_tokens=48, console=_quiet()
    )
    assert json.loads(out.read_text()) == summary
    assert summary["text_tokens"] == 48 and summary["num_layers"] == 30 and summary["blocks"] == []
    assert 0 < summary["full"]["ce"] < 8  # a trained model, far below ln(49152) = 10.8 nats
    skip, zero = summary["methods"]["skip"], summary["methods"]["zero-output"]
    assert sorted(skip["ranking"]) == list(range(30))
    assert all(row["ce_change"] != 0 for row in skip["layers"])  # every real layer does something
    assert all(isinstance(c["holds"], bool) for c in skip["seed_001"]["claims"])  # all judged on 30 layers
    assert all(math.isclose(row["ce"], math.log(49152), rel_tol=0, abs_tol=1e-6) for row in zero["layers"])
    assert len(summary["proxies"]["block_influence"]) == 30
