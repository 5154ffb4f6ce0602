"""reassembled/checkpoint_KK/: a checkpoint stock `from_pretrained` loads, made of hard links
to the promoted fragment files (no copies), an index mapping tensors to those files and a
config.json whose num_hidden_layers is the number of active layers."""

from __future__ import annotations

import json
from typing import Any

from protocol.plan import WEIGHTS_FILE, Plan
from sandbox import Sandbox
from sandbox.layout import SNAPSHOT_INDEX, committed_dir, snapshot_dir, snapshot_weights


def truncated_config(config: dict[str, Any], layers: int) -> dict[str, Any]:
    """The model config for a prefix of `layers` decoder layers."""
    out = dict(config)
    out["num_hidden_layers"] = layers
    for key in ("layer_types",):  # per-layer lists must match the layer count
        if isinstance(out.get(key), list):
            out[key] = out[key][:layers]
    return out


def write_snapshot(box: Sandbox, plan: Plan, checkpoint: int, layers: int, fragments: list[int]) -> str:
    rel = snapshot_dir(checkpoint)
    staging = rel + ".partial"
    if box.exists(staging):
        box.remove(staging)
    box.mkdir(staging)
    weight_map: dict[str, str] = {}
    total = 0
    for index in fragments:
        spec = plan.fragments[index]
        if any(item.kind == "tensor" for item in spec.items):
            box.hardlink(f"{committed_dir(index)}/{WEIGHTS_FILE}", f"{staging}/{snapshot_weights(index)}")
        for item in spec.items:
            if item.kind == "tensor":
                weight_map[item.name] = snapshot_weights(index)
                total += item.nbytes
            elif item.name != "config.json":
                box.hardlink(f"{committed_dir(index)}/{item.name}", f"{staging}/{item.name}")
    config = json.loads(box.read_bytes(f"{committed_dir(0)}/config.json"))
    box.write_json(f"{staging}/config.json", truncated_config(config, layers))
    box.write_json(f"{staging}/{SNAPSHOT_INDEX}", {"metadata": {"total_size": total}, "weight_map": weight_map})
    if box.exists(rel):  # a resumed run rebuilds its snapshots
        box.remove(rel)
    box.promote(staging, rel)
    return rel
