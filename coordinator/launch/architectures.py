"""Which checkpoints fragsim can split, stream and reassemble: refused up front, before a run
directory exists, with one line that names what is wrong and what would work.

A model_type is supported when it works end to end here: planned into fragments by the
`*.layers.N.*` tensor names, loaded from the first snapshot with stock `from_pretrained`, then
grown layer by layer (each decoder layer built from the config and given its tensors as saved).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agents.source import SourceCheckpoint
from protocol.errors import PlanError

# Each one verified with a tiny random checkpoint (tests/test_architectures.py): llama tied and
# untied, grouped-query attention, bfloat16, sharded; the others with their own config classes.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gpt_neox")
SUPPORTED_TEXT = ", ".join(SUPPORTED_ARCHITECTURES)

# Why some well-known model types are refused (any other unlisted type is refused too).
_WHY_NOT = {
    "gpt2": "decoder layers named transformer.h.N, not *.layers.N.",
    "falcon": "decoder layers named transformer.h.N, not *.layers.N.",
    "mixtral": "mixture-of-experts layers: transformers converts their saved keys on load, which growing bypasses",
}


def check_supported(source: SourceCheckpoint) -> None:
    """Raise PlanError unless `source` is a checkpoint of a supported architecture whose weights
    files are valid safetensors and whose decoder layers are exactly 0..num_hidden_layers-1."""
    config = _config(source)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        why = _WHY_NOT.get(model_type) if isinstance(model_type, str) else None
        note = f" ({model_type}: {why})" if why else ""
        raise PlanError("model_type in config.json", model_type, f"a supported architecture: {SUPPORTED_TEXT}{note}")
    for fname in source.files:
        check_weights_file(source.directory / fname)
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise PlanError(
            f"num_hidden_layers in config.json of this {model_type} checkpoint",
            layers,
            f"a whole number >= 1 (supported architectures: {SUPPORTED_TEXT})",
        )
    found = {loc.layer for loc in source.tensors.values() if loc.layer is not None}
    if found != set(range(layers)):
        raise PlanError(
            f"decoder layers of this {model_type} checkpoint",
            _spans(found),
            f"tensors named *.layers.N.* for exactly the layers 0-{layers - 1} of num_hidden_layers={layers} "
            f"(supported architectures: {SUPPORTED_TEXT})",
        )


def check_weights_file(path: Path) -> None:
    """Open the file with the safetensors library itself: the owner of the format is the judge."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        raise PlanError(f"weights file {path}", " ".join(str(exc).split()), "a valid safetensors file") from None


def _config(source: SourceCheckpoint) -> dict[str, Any]:
    path = source.directory / "config.json"
    try:
        config = source.config
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise PlanError(str(path), " ".join(str(exc).split()), "a JSON object") from None
    if not isinstance(config, dict):
        raise PlanError(str(path), f"a JSON {type(config).__name__}", "a JSON object")
    return config


def _spans(layers: set[int]) -> str:
    """{0, 1, 2, 5} -> '0-2,5'; the empty set -> 'none'."""
    out: list[str] = []
    for n in sorted(layers):
        if out and n == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{n}"
        else:
            out.append(str(n))
    return ",".join(out) or "none"
