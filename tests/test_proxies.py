"""Layer-importance proxies (ShortGPT's Block Influence, Gromov et al.'s angular distance) from
the residual stream, and Spearman's rank correlation with the measured damage. A tiny random
Llama with one do-nothing layer, and hand-made numbers."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from checkpoints import make_tiny_llama
from coordinator.lab.ablation_methods import decoder_layers
from coordinator.lab.proxies import (
    MIN_ANGULAR_WIDTH,
    agreement,
    angular_distances,
    average_ranks,
    block_influence,
    proxy_report,
    pruning_choices,
    residual_states,
    spearman,
)
from coordinator.quality import eval_ids, read_eval_text

LAYERS = 6
IDENTITY = 3  # o_proj and down_proj zero: the layer leaves the residual stream as it found it
TOKENS = 48


@pytest.fixture(scope="module")
def model_and_ids(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, list[int]]:
    path = make_tiny_llama(tmp_path_factory.mktemp("proxies") / "random", num_layers=LAYERS, seed=5)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype="auto").eval()
    layer = decoder_layers(model)[IDENTITY]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, eval_ids(tokenizer, read_eval_text(), TOKENS)


@pytest.fixture(scope="module")
def states(model_and_ids: tuple[Any, list[int]]) -> torch.Tensor:
    return residual_states(*model_and_ids)


# ---- the residual stream --------------------------------------------------------------------


def test_residual_states_hold_the_embeddings_and_every_layers_output(states: torch.Tensor) -> None:
    assert states.shape == (LAYERS + 1, TOKENS, 64) and states.dtype == torch.float64


def test_residual_states_are_hf_hidden_states_before_the_final_norm(
    model_and_ids: tuple[Any, list[int]], states: torch.Tensor
) -> None:
    model, ids = model_and_ids
    with torch.inference_mode():
        hidden = model(torch.tensor([ids]), output_hidden_states=True, use_cache=False).hidden_states
    for index in range(LAYERS):  # HF's last entry is normed; ours is not
        assert torch.equal(states[index], hidden[index][0].double()), index
    assert not torch.allclose(states[LAYERS], hidden[LAYERS][0].double())


def test_the_hooks_are_gone_after_the_states_are_taken(model_and_ids: tuple[Any, list[int]]) -> None:
    model, ids = model_and_ids

    def hooks() -> list[list[int]]:  # HF installs hooks of its own (for output_hidden_states) and keeps them
        return [[*layer._forward_hooks, *layer._forward_pre_hooks] for layer in decoder_layers(model)]

    before = hooks()
    residual_states(model, ids)
    assert hooks() == before


# ---- Block Influence and angular distance ---------------------------------------------------


def test_block_influence_of_the_identity_layer_is_zero(states: torch.Tensor) -> None:
    assert abs(block_influence(states)[IDENTITY]) < 1e-6


def test_block_influence_of_a_normal_layer_is_positive(states: torch.Tensor) -> None:
    bi = block_influence(states)
    assert len(bi) == LAYERS
    assert all(bi[i] > 1e-4 for i in range(LAYERS) if i != IDENTITY)


def test_block_influence_is_one_minus_the_mean_cosine() -> None:
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]], dtype=torch.float64)  # [2, 2, 2]
    assert block_influence(x) == [pytest.approx(0.5)]  # cosines 0 and 1


def test_angular_distance_of_the_identity_layer_is_zero(states: torch.Tensor) -> None:
    assert abs(angular_distances(states, 1)[1][IDENTITY]) < 1e-6


def test_angular_distances_have_one_value_per_block_of_each_width(states: torch.Tensor) -> None:
    angular = angular_distances(states, 4)
    assert sorted(angular) == [1, 2, 3, 4]
    for width, distances in angular.items():
        assert len(distances) == LAYERS - width + 1 and all(0 <= d <= 1 for d in distances)


def test_angular_distance_is_the_angle_on_the_last_token_over_pi() -> None:
    x = torch.zeros(3, 2, 2, dtype=torch.float64)
    x[0, -1] = torch.tensor([1.0, 0.0])
    x[1, -1] = torch.tensor([0.0, 1.0])  # a right angle: 1/2
    x[2, -1] = torch.tensor([-1.0, 0.0])  # opposite to x_0: 1
    angular = angular_distances(x, 5)  # widths beyond the depth are left out
    assert angular == {1: [pytest.approx(0.5), pytest.approx(0.5)], 2: [pytest.approx(1.0)]}


# ---- Spearman ------------------------------------------------------------------------------


def test_average_ranks_share_the_ranks_of_ties() -> None:
    assert average_ranks([10.0, 30.0, 20.0, 20.0]) == [1.0, 4.0, 2.5, 2.5]


def test_spearman_of_monotone_pairs_is_plus_or_minus_one() -> None:
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, -1]) == pytest.approx(-1.0)


def test_spearman_with_ties_uses_average_ranks() -> None:
    # scipy.stats.spearmanr([1, 2, 2, 3], [1, 2, 3, 4]) = 0.9486832980505138
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138, abs=1e-12)


def test_spearman_ranks_an_infinite_damage_as_the_largest() -> None:
    assert spearman([0.1, 0.2, 0.3], [1.0, 2.0, math.inf]) == pytest.approx(1.0)


def test_spearman_is_undefined_for_a_constant_side_or_a_single_pair() -> None:
    assert spearman([1, 2, 3], [5, 5, 5]) is None
    assert spearman([1], [2]) is None
    with pytest.raises(ValueError, match="as many"):
        spearman([1, 2], [1])


# ---- agreement with measured damage ---------------------------------------------------------


def _result(layer_ce: list[float], blocks: dict[tuple[int, int], float]) -> dict[str, Any]:
    return {
        "layers": [{"removed": i, "ce": ce} for i, ce in enumerate(layer_ce)],
        "blocks": [{"removed": [a, b], "ce": ce} for (a, b), ce in blocks.items()],
    }


def test_agreement_ranks_each_proxy_against_each_methods_damage() -> None:
    bi = [0.5, 0.1, 0.3]
    angular = {1: [0.5, 0.1, 0.3], 2: [0.2, 0.4], 3: [0.9]}
    methods = {
        "skip": _result([4.0, 2.0, 3.0], {(0, 1): 5.0, (1, 2): 6.0}),
        "zero-output": _result([9.0, 9.0, 9.0], {}),
    }
    rows = {(r["proxy"], r["width"], r["method"]): r for r in agreement(bi, angular, 1.0, methods)}
    assert rows["block_influence", 1, "skip"]["spearman"] == pytest.approx(1.0)
    assert rows["angular_distance", 2, "skip"]["spearman"] == pytest.approx(1.0)
    assert rows["block_influence", 1, "zero-output"]["spearman"] is None  # every layer equally bad
    assert ("angular_distance", 2, "zero-output") not in rows and ("angular_distance", 3, "skip") not in rows


def test_pruning_choices_set_the_smallest_distance_beside_the_mildest_block() -> None:
    angular = {1: [0.5, 0.1, 0.3], 2: [0.2, 0.4]}
    methods = {"skip": _result([4.0, 2.0, 3.0], {(0, 1): 6.0, (1, 2): 5.0})}
    choices = pruning_choices(angular, methods)
    assert [(c["width"], c["predicted_first"], c["least_damaging_first"]["skip"]) for c in choices] == [
        (1, 1, 1),
        (2, 0, 1),
    ]


def test_proxy_report_of_the_identity_model_puts_the_identity_layer_last(model_and_ids: tuple[Any, list[int]]) -> None:
    model, ids = model_and_ids
    methods = {"skip": _result([5.0 - 0.1 * i for i in range(LAYERS)], {})}
    report = proxy_report(model, ids, 2, 1.0, methods)
    assert min(range(LAYERS), key=lambda i: report["block_influence"][i]) == IDENTITY
    assert report["angular_widths"] == list(range(1, MIN_ANGULAR_WIDTH + 1))  # at least 4 widths
    assert sorted(report["angular_distance"]) == ["1", "2", "3", "4"]
    assert {(r["proxy"], r["width"]) for r in report["spearman"]} == {("block_influence", 1), ("angular_distance", 1)}
