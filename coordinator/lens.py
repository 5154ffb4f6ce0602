"""A tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the
Tuned Lens"): for each layer k an affine translator h -> h + A_k h + b_k applied to the residual
stream after k layers, before the final norm, fitted (`fragsim lens fit`) so that the final norm
and lm_head read the full model's next-token distribution out of a k-layer prefix.

A prefix's logit lens (what a truncated model computes) asks whether the full model's
prediction is already readable in the basis of the last layer; the tuned lens asks whether it is
there at all, in whatever basis layer k keeps it. A prefix far from the full model under the
logit lens but close under the tuned lens has the information and lacks only its translation.

The translators are applied with a forward pre-hook on the final norm, so every measurement of
a checkpoint (teacher-forced logits, the corpus scorer) runs unchanged on the lensed model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors_bytes


@dataclass
class TunedLens:
    weight: torch.Tensor  # [layers, hidden, hidden]: A_k for k = 0 .. layers-1 (k = embeddings only)
    bias: torch.Tensor  # [layers, hidden]
    meta: dict[str, Any] = field(default_factory=dict)  # how it was fitted, and what it scored

    @property
    def layers(self) -> int:
        return int(self.weight.shape[0])

    def translate(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """h + A_layer h + b_layer, in the hidden state's dtype."""
        a, b = self.weight[layer].to(hidden.dtype), self.bias[layer].to(hidden.dtype)
        return hidden + hidden @ a.T + b

    def to_bytes(self) -> bytes:
        return save_safetensors_bytes(
            {"weight": self.weight.contiguous(), "bias": self.bias.contiguous()},
            metadata={"fragsim_lens": json.dumps(self.meta)},
        )

    @classmethod
    def load(cls, path: Path) -> TunedLens:
        """A lens file, refused unless it holds one square translator and bias per layer."""
        with safe_open(str(path), framework="pt") as fh:
            names = set(fh.keys())
            if names != {"weight", "bias"}:
                raise ValueError(f"{path}: tensors {sorted(names)}, expected ['bias', 'weight']")
            weight, bias = fh.get_tensor("weight"), fh.get_tensor("bias")
            meta = json.loads((fh.metadata() or {}).get("fragsim_lens", "{}"))
        if weight.ndim != 3 or weight.shape[1] != weight.shape[2] or tuple(bias.shape) != tuple(weight.shape[:2]):
            raise ValueError(
                f"{path}: weight {tuple(weight.shape)}, bias {tuple(bias.shape)}, "
                "expected [layers, hidden, hidden] and [layers, hidden]"
            )
        return cls(weight, bias, meta)

    def check_fits(self, model: Any) -> None:
        """The lens was fitted for a model of this depth and width."""
        layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
        full = self.meta.get("num_layers", self.layers)
        if self.weight.shape[1] != hidden or full < layers:
            raise ValueError(
                f"lens for {full} layers of width {self.weight.shape[1]}, expected a model of at least "
                f"{layers} layers of width {hidden}"
            )


def final_norm(model: Any) -> torch.nn.Module:
    norm = getattr(getattr(model, model.base_model_prefix), "norm", None)
    if not isinstance(norm, torch.nn.Module):
        raise ValueError(f"{type(model).__name__}: no final norm at <base>.norm, expected a Llama-family decoder")
    return norm


@contextmanager
def lensed(model: Any, lens: TunedLens, layer: int) -> Iterator[None]:
    """While the block runs, `model` (a prefix of `layer` decoder layers) reads its residual
    stream through translator `layer` before the final norm."""
    if not 0 <= layer < lens.layers:
        raise ValueError(f"layer {layer}: expected 0..{lens.layers - 1} (the lens's translators)")

    def translate(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (lens.translate(layer, args[0]), *args[1:])

    handle = final_norm(model).register_forward_pre_hook(translate)
    try:
        yield
    finally:
        handle.remove()
