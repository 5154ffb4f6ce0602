"""The model the coordinator evaluates while fragments arrive.

It is loaded once, with stock `from_pretrained`, from the first snapshot; afterwards each
growth of the prefix only builds the new decoder layers and loads their tensors from the
new fragment files. Earlier layers are never reloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from coordinator.snapshot import truncated_config
from protocol.layers import layer_of

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class LiveModel:
    def __init__(self, full_config: dict[str, Any]) -> None:
        self.full_config = full_config
        self.model: Any = None
        self.tokenizer: Any = None
        self.layers = 0
        self.loads: list[dict[str, Any]] = []  # what each growth read from disk

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        layers: torch.nn.ModuleList = getattr(self.model, self.model.base_model_prefix).layers
        return layers

    def start(self, snapshot: Path, layers: int) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(snapshot, local_files_only=True, dtype="auto")
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(snapshot, local_files_only=True)
        self.layers = layers
        self.loads.append({"kind": "from_pretrained", "layers": list(range(layers))})

    def grow(self, fragment_files: list[Path], layers: int) -> None:
        """Append decoder layers [self.layers, layers) from the new fragments' files."""
        per_layer: dict[int, dict[str, torch.Tensor]] = {}
        for path in fragment_files:
            for name, tensor in load_file(str(path)).items():
                layer = layer_of(name)
                if layer is None:
                    raise ValueError(f"{path}: non-layer tensor {name}, expected only decoder layers after fragment 0")
                prefix = name[: name.index(f"layers.{layer}.") + len(f"layers.{layer}.")]
                per_layer.setdefault(layer, {})[name[len(prefix) :]] = tensor
        expected = list(range(self.layers, layers))
        if sorted(per_layer) != expected:
            raise ValueError(f"new fragments hold layers {sorted(per_layer)}, expected {expected}")
        layer_cls = type(self.decoder_layers[0])
        config = self.model.config
        wanted = truncated_config(self.full_config, layers)
        config.num_hidden_layers = wanted["num_hidden_layers"]
        if "layer_types" in wanted:
            config.layer_types = wanted["layer_types"]
        for index in expected:
            with torch.device("meta"):
                module = layer_cls(config, index)
            module.load_state_dict(per_layer[index], strict=True, assign=True)
            module.eval()
            self.decoder_layers.append(module)
        self.layers = layers
        self.loads.append({"kind": "grow", "layers": expected, "files": [p.name for p in fragment_files]})
