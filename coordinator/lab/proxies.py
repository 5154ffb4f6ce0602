"""Cheap layer-importance proxies from one forward pass of the full model, and how well they
rank the damage that ablating the layers really does.

- Block Influence (ShortGPT, Men et al. 2024): BI_i = 1 - mean over positions of
  cos(x_i, x_{i+1}), x_i the residual stream entering layer i and x_{i+1} what leaves it. A
  layer that barely turns the stream scores near 0 and is, by the proxy's claim, cheap to drop.
- Angular distance (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper
  Layers"): d(l, n) = arccos(cos(x_l, x_{l+n})) / π on the last position, for block widths
  n = 1..k; the block of layers l..l+n-1 with the smallest d is their choice to prune.

The states are taken with hooks on the decoder layers, because HF's output_hidden_states
applies the final norm to its last entry. The agreement with measured damage is Spearman's
rank correlation (average ranks for ties); a positive rho means the proxy ranks the layers the
way their ablation hurts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from coordinator.evaluate import residual_stream
from coordinator.lab.ablation_methods import decoder_layers

MIN_ANGULAR_WIDTH = 4


@torch.inference_mode()
def residual_states(model: Any, ids: list[int]) -> torch.Tensor:
    """The residual stream over `ids`, float64 [num_layers + 1, positions, hidden]: index 0 is
    what enters decoder layer 0 (the embeddings), i what leaves layer i - 1 (no final norm)."""
    decoder_layers(model)  # refused here, with its message, when the model has no layer list
    return torch.stack([state[0].double() for state in residual_stream(model, ids)])


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine along the last dimension; 1 where both vectors are equal (a zero stream included),
    since an unchanged stream is what a do-nothing layer leaves."""
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-30).clamp(-1.0, 1.0)
    return torch.where((a == b).all(-1), torch.ones_like(cos), cos)


def block_influence(states: torch.Tensor) -> list[float]:
    """ShortGPT's BI per layer from `residual_states`: 1 - mean over positions of cos(x_i, x_{i+1})."""
    return [float(1.0 - _cos(states[i], states[i + 1]).mean()) for i in range(states.shape[0] - 1)]


def angular_distances(states: torch.Tensor, max_width: int) -> dict[int, list[float]]:
    """Gromov et al.'s d(l, n) = arccos(cos(x_l, x_{l+n})) / π on the last position, for each
    width n = 1..max_width (at most the number of layers): {n: [d(0, n), ..., d(L - n, n)]}."""
    last = states[:, -1]
    num_layers = states.shape[0] - 1
    return {
        n: [float(torch.arccos(_cos(last[i], last[i + n])) / math.pi) for i in range(num_layers - n + 1)]
        for n in range(1, min(max_width, num_layers) + 1)
    }


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks of `values`, ties sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's r of average ranks); None when it is undefined:
    fewer than two pairs, or one side constant."""
    if len(xs) != len(ys):
        raise ValueError(f"spearman: {len(xs)} and {len(ys)} values, expected as many of each")
    if len(xs) < 2:
        return None
    rx, ry = average_ranks(xs), average_ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def _damage(row: dict[str, Any]) -> float:
    ce = row["ce"]
    return math.inf if ce is None or math.isnan(ce) else float(ce)  # a NaN model ranks as the most broken


def _width(row: dict[str, Any]) -> int:
    first, last = row["removed"]
    return int(last) - int(first) + 1


def agreement(
    bi: Sequence[float], angular: dict[int, list[float]], full_ce: float, methods: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per (proxy, method): Spearman's rho of the proxy with the measured ΔCE; Block
    Influence and d(·, 1) against single layers, d(·, n) against the width-n blocks measured."""
    rows: list[dict[str, Any]] = []
    for method, result in methods.items():
        singles = sorted(result["layers"], key=lambda r: r["removed"])
        delta = [_damage(r) - full_ce for r in singles]
        rows.append({"proxy": "block_influence", "width": 1, "method": method, "n": len(delta)})
        rows[-1]["spearman"] = spearman([bi[r["removed"]] for r in singles], delta)
        for width, distances in sorted(angular.items()):
            if width == 1:
                measured = [(r["removed"], _damage(r) - full_ce) for r in singles]
            else:
                blocks = [r for r in result["blocks"] if _width(r) == width]
                measured = [(r["removed"][0], _damage(r) - full_ce) for r in blocks]
            if not measured:
                continue  # no blocks of this width were measured
            rows.append(
                {
                    "proxy": "angular_distance",
                    "width": width,
                    "method": method,
                    "n": len(measured),
                    "spearman": spearman([distances[first] for first, _ in measured], [d for _, d in measured]),
                }
            )
    return rows


def pruning_choices(angular: dict[int, list[float]], methods: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per width: the block Gromov et al. would prune (smallest d) beside the block whose
    ablation measured least damaging, per method (first layer of each)."""
    out = []
    for width, distances in sorted(angular.items()):
        predicted = min(range(len(distances)), key=lambda first: (distances[first], first))
        measured: dict[str, int | None] = {}
        for method, result in methods.items():
            rows = (
                [{**r, "removed": [r["removed"], r["removed"]]} for r in result["layers"]]
                if width == 1
                else [r for r in result["blocks"] if _width(r) == width]
            )
            best = min(rows, key=lambda r: (_damage(r), r["removed"][0]), default=None)
            measured[method] = None if best is None else int(best["removed"][0])
        out.append(
            {"width": width, "predicted_first": predicted, "d": distances[predicted], "least_damaging_first": measured}
        )
    return out


def proxy_report(
    model: Any, ids: list[int], max_width: int, full_ce: float, methods: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Block Influence and the angular distances (widths 1..max(max_width, 4)) of the full
    model over `ids`, their Spearman rho with each method's measured ΔCE, and the pruning choices."""
    states = residual_states(model, ids)
    bi = block_influence(states)
    angular = angular_distances(states, max(max_width, MIN_ANGULAR_WIDTH))
    return {
        "block_influence": bi,
        "angular_distance": {str(n): d for n, d in angular.items()},  # JSON keys are strings
        "angular_widths": sorted(angular),
        "spearman": agreement(bi, angular, full_ce, methods),
        "pruning_choices": pruning_choices(angular, methods),
    }
