"""Parameter census of a planned model, from the plan's tensor shapes alone (no torch): what
the embeddings, each decoder block and the head hold, and a check that the counts times the
dtype sizes are exactly the bytes the plan streams."""

from __future__ import annotations

import math
from typing import Any

from protocol.errors import PlanError
from protocol.layers import layer_of
from protocol.plan import Item, Plan
from protocol.safetensors_format import DTYPE_SIZES

# Component of a decoder-block tensor, by the module name in front of `.weight`/`.bias`: the
# names of the supported architectures (llama family, phi3's fused projections, gpt_neox).
# Norms are matched first by "norm" anywhere in the name (qwen3's q_norm/k_norm included).
_ATTENTION = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "qkv_proj": "qkv",
    "query_key_value": "qkv",
    "dense": "o",  # gpt_neox attention.dense; its MLP's names are dense_h_to_4h / dense_4h_to_h
}
_MLP = {
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "gate_up_proj": "gate_up",
    "dense_h_to_4h": "up",
    "dense_4h_to_h": "down",
}
_EMBEDDINGS = ("embed_tokens", "embed_in")
_HEADS = ("lm_head", "embed_out")


def numel(shape: tuple[int, ...] | None) -> int:
    return math.prod(shape or ())


def census(plan: Plan) -> dict[str, Any]:
    """Parameter counts per part of the model; `bytes_match` says count times dtype size adds up
    to the plan's tensor bytes, so no tensor was miscounted or left out."""
    tensors = [item for fragment in plan.fragments for item in fragment.items if item.kind == "tensor"]
    blocks = [_empty_block(i) for i in range(plan.num_layers)]
    top = {"embeddings": 0, "final_norm": 0, "lm_head": 0, "other": 0}
    for item in tensors:
        count = numel(item.shape)
        layer = layer_of(item.name)
        if layer is None:
            top[_top_part(item.name)] += count
            continue
        if not 0 <= layer < len(blocks):
            raise PlanError(f"layer of {item.name}", layer, f"a decoder layer 0-{len(blocks) - 1}")
        group, part = _block_part(item.name)
        block = blocks[layer]
        if group in ("norms", "other"):
            block[group] += count
        else:
            block[group][part] = block[group].get(part, 0) + count
        block["total"] += count
    total = sum(top.values()) + sum(b["total"] for b in blocks)
    tensor_bytes = sum(item.nbytes for item in tensors)
    counted_bytes = sum(numel(item.shape) * _dtype_size(item) for item in tensors)
    return {
        "embeddings": top["embeddings"],
        "blocks": blocks,
        "blocks_total": sum(b["total"] for b in blocks),
        "final_norm": top["final_norm"],
        "lm_head": top["lm_head"],  # 0: tied to the embeddings (or absent)
        "other": top["other"],
        "total": total,
        "tensors": len(tensors),
        "tensor_bytes": tensor_bytes,
        "counted_bytes": counted_bytes,
        "bytes_match": counted_bytes == tensor_bytes,
    }


def _empty_block(layer: int) -> dict[str, Any]:
    attention: dict[str, int] = {"q": 0, "k": 0, "v": 0, "o": 0}
    mlp: dict[str, int] = {"gate": 0, "up": 0, "down": 0}
    return {"layer": layer, "attention": attention, "mlp": mlp, "norms": 0, "other": 0, "total": 0}


def _module_name(tensor_name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `q_proj`."""
    parts = tensor_name.split(".")
    return parts[-2] if len(parts) >= 2 else parts[-1]


def _block_part(name: str) -> tuple[str, str]:
    module = _module_name(name)
    if "norm" in module:
        return "norms", ""
    if module in _MLP:
        return "mlp", _MLP[module]
    if module in _ATTENTION:
        return "attention", _ATTENTION[module]
    return "other", ""


def _top_part(name: str) -> str:
    module = _module_name(name)
    if module in _EMBEDDINGS:
        return "embeddings"
    if module in _HEADS or name.split(".")[0] in _HEADS:
        return "lm_head"
    if "norm" in module:
        return "final_norm"
    return "other"


def _dtype_size(item: Item) -> int:
    if item.dtype not in DTYPE_SIZES:
        raise PlanError(f"dtype of {item.name}", item.dtype, f"one of {sorted(DTYPE_SIZES)}")
    return DTYPE_SIZES[item.dtype]
