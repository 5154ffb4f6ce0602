"""Residual statistics as the massive-activation literature measures them (Sun et al. 2024):
median |a|, the top entries with their (position, dimension), max/median and the flag, over
all positions and without position 0; and the final-norm check on the stream's last row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from coordinator.evaluate import final_norm_check, hidden_state_stats, prompt_ids, residual_stream_stats
from coordinator.massive import MASSIVE_ABS, MASSIVE_RATIO, massive_bar
from protocol.run_settings import DEFAULT_PROBE

PLANT_DIM = 5
PLANT = 5_000.0
# In the tiny random model the median |a| grows to ~8 by the last layer: a planted value stays
# above 1000 x the median all the way through only from this size on.
MODEL_PLANT = 50_000.0


def planted(positions: int = 6, channels: int = 32, seed: int = 0) -> torch.Tensor:
    """N(0, 1) activations with one huge entry at (position 0, PLANT_DIM)."""
    x = torch.randn(1, positions, channels, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[0, 0, PLANT_DIM] = PLANT
    return x


def test_a_planted_huge_value_at_position_0_is_flagged_with_its_place() -> None:
    row = hidden_state_stats(planted(), 7)
    assert row["index"] == 7 and row["massive"] and row["massive_entries"] == 1
    assert row["top"][0] == {"abs": PLANT, "value": PLANT, "position": 0, "dim": PLANT_DIM}
    assert len(row["top"]) == 3 and row["top"][1]["abs"] <= row["top"][0]["abs"]
    assert row["max_over_median"] == pytest.approx(PLANT / row["median_abs"])
    assert row["max_over_median"] > MASSIVE_RATIO
    assert row["top_share_of_squares"] > 0.99, "one entry is almost all of the rms"


def test_without_position_0_the_statistics_do_not_see_it() -> None:
    x = planted()
    rest = hidden_state_stats(x)["without_first"]
    assert not rest["massive"] and rest["massive_entries"] == 0
    assert all(t["position"] >= 1 for t in rest["top"]), "positions keep their numbers"
    assert rest["max"] < 10 and rest["std"] < 2
    same = hidden_state_stats(x[:, 1:])  # the same numbers as the stream that never had position 0
    for key in ("mean", "std", "min", "max", "rms", "median_abs", "max_over_median"):
        assert rest[key] == same[key], key
    assert [(t["position"] - 1, t["dim"]) for t in rest["top"]] == [(t["position"], t["dim"]) for t in same["top"]]


def test_the_flag_needs_both_halves_of_the_rule() -> None:
    x = torch.full((1, 4, 8), 0.01, dtype=torch.float64)
    x[0, 0, 0] = 50.0  # 5000 x the median but not above 100
    assert not hidden_state_stats(x)["massive"]
    y = torch.full((1, 4, 8), 1.0, dtype=torch.float64)
    y[0, 0, 0] = 500.0  # above 100 but only 500 x the median
    assert not hidden_state_stats(y)["massive"]
    assert massive_bar(0.01) == MASSIVE_ABS and massive_bar(1.0) == MASSIVE_RATIO


def test_the_old_keys_keep_their_meaning_over_all_positions() -> None:
    x = planted()
    row = hidden_state_stats(x)
    flat = x.flatten()
    assert row["mean"] == pytest.approx(flat.mean().item()) and row["max"] == PLANT
    assert row["std"] == pytest.approx(flat.std(correction=0).item())
    assert row["rms"] == pytest.approx(flat.square().mean().sqrt().item())


def test_a_one_token_input_has_no_without_first_and_a_batch_is_refused() -> None:
    assert hidden_state_stats(planted(positions=1))["without_first"] is None
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4\): expected \[1, positions, channels\]"):
        hidden_state_stats(torch.zeros(2, 3, 4))


@pytest.fixture
def planted_model(tiny_model: Path) -> tuple[Any, list[int]]:
    """The tiny model with a huge value planted in the first token's embedding, in one dimension."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = prompt_ids(AutoTokenizer.from_pretrained(tiny_model), DEFAULT_PROBE)[0].tolist()
    assert ids[0] not in ids[1:], "the planted token must occur at position 0 only"
    with torch.no_grad():
        model.get_input_embeddings().weight[ids[0], PLANT_DIM] = MODEL_PLANT
    return model, ids


def test_a_real_model_with_a_planted_activation_is_flagged_at_position_0_only(
    planted_model: tuple[Any, list[int]],
) -> None:
    model, ids = planted_model
    rows = residual_stream_stats(model, ids)
    assert len(rows) == model.config.num_hidden_layers + 1
    assert rows[0]["massive"] and (rows[0]["top"][0]["position"], rows[0]["top"][0]["dim"]) == (0, PLANT_DIM)
    assert rows[0]["top"][0]["abs"] == pytest.approx(MODEL_PLANT, rel=1e-6)
    for row in rows:  # the residual connections carry it through every layer, at the first token only
        assert row["massive"] and (row["top"][0]["position"], row["top"][0]["dim"]) == (0, PLANT_DIM), row["index"]
        assert not row["without_first"]["massive"], row["index"]
        assert row["without_first"]["std"] < row["std"] / 10


def test_the_last_row_is_what_enters_the_final_norm(planted_model: tuple[Any, list[int]]) -> None:
    model, ids = planted_model
    seen: list[torch.Tensor] = []
    handle = model.model.norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        rows = residual_stream_stats(model, ids)
    finally:
        handle.remove()
    assert len(seen) == 1
    assert rows[-1] == hidden_state_stats(seen[0], len(rows) - 1), "before the final norm, not after it"
    with torch.inference_mode():
        after = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]
    assert rows[-1] != hidden_state_stats(after, len(rows) - 1)


def test_the_final_norm_check_recomputes_the_norm_on_the_models_own_last_state(
    planted_model: tuple[Any, list[int]],
) -> None:
    model, ids = planted_model
    check = final_norm_check(model, ids)
    assert check["ok"] and check["max_abs_diff"] == 0.0 and check["kind"] == "rmsnorm"
    assert check["eps"] == model.model.norm.variance_epsilon and check["positions"] == len(ids)
    assert check["module"] == "model.norm" and check["weight_name"] == "model.norm.weight"
    assert check["input_rms"] == residual_stream_stats(model, ids)[-1]["rms"]
    with torch.no_grad():  # a norm that is not what its weight says: the check sees it
        model.model.norm.variance_epsilon = 1e3
        model.model.norm.forward = lambda h: h  # type: ignore[method-assign]
    broken = final_norm_check(model, ids)
    assert not broken["ok"] and broken["max_abs_diff"] > 1.0


def test_a_truncated_model_is_normalised_on_its_own_statistics(tiny_model: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = prompt_ids(AutoTokenizer.from_pretrained(tiny_model), DEFAULT_PROBE)[0].tolist()
    full = final_norm_check(model, ids)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    short = final_norm_check(model, ids)
    assert short["ok"] and short["weight_digest"] == full["weight_digest"]
    assert short["input_rms"] == residual_stream_stats(model, ids)[-1]["rms"] != full["input_rms"]
