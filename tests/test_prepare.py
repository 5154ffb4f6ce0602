"""Tests for coordinator.launch.prepare. Fast ones use tiny random checkpoints; the GGUF one is slow."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from checkpoints import make_tiny_llama
from coordinator.launch.prepare import (
    DIGEST_ALGORITHM,
    MARKER_FILE,
    WEIGHTS_FILE,
    checkpoint_files,
    default_source_dir,
    gguf_path,
    is_prepared,
    prepare_model_dir,
    source_digest,
)

PROMPT = "The capital of France is"


def quiet(_: str) -> None:
    pass


def stored_keys(out: Path) -> set[str]:
    with safe_open(str(out / WEIGHTS_FILE), "pt") as f:
        return set(f.keys())


def stored_metadata(out: Path) -> dict[str, str]:
    with safe_open(str(out / WEIGHTS_FILE), "pt") as f:
        return f.metadata()


def read_marker(out: Path) -> dict[str, object]:
    marker: dict[str, object] = json.loads((out / MARKER_FILE).read_text())
    return marker


def digest_of(src: Path) -> str:
    return source_digest(checkpoint_files(src), src)


def same_tensors(out: Path, src: Path) -> bool:
    """True when every tensor stored in `out` equals the one of that name in the checkpoint `src`."""
    source: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(src)[1:]:
        if path.suffix == ".safetensors":
            source.update(load_file(str(path)))
    stored = load_file(str(out / WEIGHTS_FILE))
    return stored.keys() <= source.keys() and all(torch.equal(t, source[k]) for k, t in stored.items())


def logits(model_dir: Path) -> torch.Tensor:
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize(
    "tied,sharded",
    [(True, False), (False, False), (True, True), (False, True)],
    ids=["tied", "untied", "tied-sharded", "untied-sharded"],
)
def test_float32_roundtrip_is_exact(tmp_path: Path, tied: bool, sharded: bool) -> None:
    src = make_tiny_llama(tmp_path / "tiny", tied=tied, sharded=sharded)
    if sharded:
        assert len(list(src.glob("model-*.safetensors"))) >= 2

    out = prepare_model_dir(src, tmp_path / "artifacts", log=quiet)

    assert out == tmp_path / "artifacts" / "source" / "tiny-float32"
    assert is_prepared(out)
    assert ("lm_head.weight" in stored_keys(out)) is (not tied)
    assert stored_metadata(out) == {"format": "pt"}
    assert not list(out.glob("*.index.json"))
    assert torch.equal(logits(src), logits(out))


def test_marker_and_config(tmp_path: Path) -> None:
    src = make_tiny_llama(tmp_path / "tiny", num_layers=3)
    out = prepare_model_dir(src, tmp_path / "artifacts", log=quiet)

    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker["dtype"] == "float32"
    assert marker["num_layers"] == 3
    assert marker["source"] == str(src.resolve())
    assert marker["digest_algorithm"] == DIGEST_ALGORITHM == "blake3"
    assert marker["source_digest"] == digest_of(src)
    assert len(marker["source_digest"]) == 64
    assert marker["num_parameters"] == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(src).parameters())
    assert isinstance(marker["seconds"], float)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    assert "quantization_config" not in config
    assert (out / "generation_config.json").is_file()
    assert (out / "tokenizer.json").is_file()
    # Nothing but the target is left in source/: the temp build dir was renamed away.
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_bfloat16_conversion(tmp_path: Path) -> None:
    src = make_tiny_llama(tmp_path / "tiny", tied=False)
    out = prepare_model_dir(src, tmp_path / "artifacts", "bfloat16", log=quiet)

    assert out.name == "tiny-bfloat16"
    with safe_open(str(out / WEIGHTS_FILE), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118  (safe_open is no dict)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / MARKER_FILE).read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    reference = AutoModelForCausalLM.from_pretrained(src).to(torch.bfloat16).state_dict()
    assert all(torch.equal(t, reference[k]) for k, t in model.state_dict().items())


def test_dtype_none_keeps_checkpoint_dtype(tmp_path: Path) -> None:
    src = make_tiny_llama(tmp_path / "tiny", dtype="bfloat16")
    out = prepare_model_dir(src, tmp_path / "artifacts", log=quiet)
    assert out.name == "tiny-bfloat16"


def test_same_model_twice_is_a_noop(tmp_path: Path) -> None:
    src = make_tiny_llama(tmp_path / "tiny")
    out = prepare_model_dir(src, tmp_path / "artifacts", log=quiet)
    stamp = (out / MARKER_FILE).stat().st_mtime_ns
    lines: list[str] = []

    assert prepare_model_dir(src, tmp_path / "artifacts", log=lines.append) == out
    assert (out / MARKER_FILE).stat().st_mtime_ns == stamp
    assert lines == [f"already prepared: {out} (source blake3 {digest_of(src)[:12]})"]


def test_force_rebuilds_the_same_model(tmp_path: Path) -> None:
    src = make_tiny_llama(tmp_path / "tiny")
    out = prepare_model_dir(src, tmp_path / "artifacts", log=quiet)
    stamp = (out / MARKER_FILE).stat().st_mtime_ns

    prepare_model_dir(src, tmp_path / "artifacts", force=True, log=quiet)
    assert is_prepared(out)
    assert (out / MARKER_FILE).stat().st_mtime_ns != stamp
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_same_model_at_another_path_is_a_noop(tmp_path: Path) -> None:
    # The cache is keyed by content: a copy of the model elsewhere is the same source.
    src = make_tiny_llama(tmp_path / "a" / "tiny")
    out = prepare_model_dir(src, tmp_path / "artifacts", log=quiet)
    stamp = (out / MARKER_FILE).stat().st_mtime_ns
    copy = shutil.copytree(src, tmp_path / "b" / "tiny")
    lines: list[str] = []

    assert prepare_model_dir(copy, tmp_path / "artifacts", log=lines.append) == out
    assert (out / MARKER_FILE).stat().st_mtime_ns == stamp
    assert any("already prepared" in line for line in lines)


def test_touched_mtimes_are_a_noop(tmp_path: Path) -> None:
    src = make_tiny_llama(tmp_path / "tiny")
    out = prepare_model_dir(src, tmp_path / "artifacts", log=quiet)
    stamp = (out / MARKER_FILE).stat().st_mtime_ns
    for path in src.iterdir():
        info = path.stat()
        os.utime(path, ns=(info.st_atime_ns + 10**12, info.st_mtime_ns + 10**12))
    lines: list[str] = []

    assert prepare_model_dir(src, tmp_path / "artifacts", log=lines.append) == out
    assert (out / MARKER_FILE).stat().st_mtime_ns == stamp
    assert any("already prepared" in line for line in lines)


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_other_model_under_same_name_is_rebuilt(tmp_path: Path, sharded: bool) -> None:
    # The reported bug: /a/tiny and /b/tiny both prepare into tiny-float32.
    first = make_tiny_llama(tmp_path / "a" / "tiny", seed=0, sharded=sharded)
    other = make_tiny_llama(tmp_path / "b" / "tiny", seed=1, sharded=sharded)
    out = prepare_model_dir(first, tmp_path / "artifacts", log=quiet)
    assert same_tensors(out, first) and not same_tensors(out, other)
    lines: list[str] = []

    assert prepare_model_dir(other, tmp_path / "artifacts", log=lines.append) == out

    old, new = digest_of(first), digest_of(other)
    assert old != new
    rebuilt = [line for line in lines if line.startswith(f"rebuilding {out}: it holds another model")]
    assert len(rebuilt) == 1 and f"{old[:12]} -> {new[:12]}" in rebuilt[0]
    assert not any("already prepared" in line for line in lines)
    assert same_tensors(out, other) and not same_tensors(out, first)
    marker = read_marker(out)
    assert marker["source"] == str(other.resolve())
    assert marker["source_digest"] == new
    assert torch.equal(logits(other), logits(out))
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_marker_without_digest_is_rebuilt(tmp_path: Path) -> None:
    # A cache from before digests were recorded cannot vouch for its model.
    src = make_tiny_llama(tmp_path / "tiny")
    out = prepare_model_dir(src, tmp_path / "artifacts", log=quiet)
    marker = read_marker(out)
    del marker["source_digest"], marker["digest_algorithm"]
    (out / MARKER_FILE).write_text(json.dumps(marker))
    assert is_prepared(out)
    lines: list[str] = []

    assert prepare_model_dir(src, tmp_path / "artifacts", log=lines.append) == out

    assert any(
        line.startswith(f"rebuilding {out}: it holds a cache without a source digest")
        and f"none -> {digest_of(src)[:12]}" in line
        for line in lines
    )
    assert read_marker(out)["source_digest"] == digest_of(src)
    assert same_tensors(out, src)
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_fingerprint_covers_every_shard(tmp_path: Path) -> None:
    src = make_tiny_llama(tmp_path / "tiny", sharded=True)
    files = checkpoint_files(src)
    shards = sorted(src.glob("model-*.safetensors"))
    assert files == [src / "config.json", src / "model.safetensors.index.json", *shards]
    before = digest_of(src)
    # Flip one byte of tensor data at the very end of the last shard.
    data = bytearray(shards[-1].read_bytes())
    data[-1] ^= 0xFF
    shards[-1].write_bytes(bytes(data))
    assert digest_of(src) != before


def test_fingerprint_covers_pytorch_bin(tmp_path: Path) -> None:
    src = make_tiny_llama(tmp_path / "tiny")
    state = load_file(str(src / WEIGHTS_FILE))
    (src / WEIGHTS_FILE).unlink()
    torch.save(state, src / "pytorch_model.bin")
    assert checkpoint_files(src) == [src / "config.json", src / "pytorch_model.bin"]
    before = digest_of(src)
    torch.save({k: t + 1 for k, t in state.items()}, src / "pytorch_model.bin")
    assert digest_of(src) != before


def test_fingerprint_covers_config(tmp_path: Path) -> None:
    src = make_tiny_llama(tmp_path / "tiny")
    before = digest_of(src)
    config = json.loads((src / "config.json").read_text())
    config["rms_norm_eps"] = config["rms_norm_eps"] * 10
    (src / "config.json").write_text(json.dumps(config))
    assert digest_of(src) != before


def test_checkpoint_without_weights_raises(tmp_path: Path) -> None:
    src = make_tiny_llama(tmp_path / "tiny")
    (src / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="has no weights"):
        prepare_model_dir(src, tmp_path / "artifacts", log=quiet)


def test_incomplete_dir_is_not_prepared_and_gets_replaced(tmp_path: Path) -> None:
    src = make_tiny_llama(tmp_path / "tiny")
    target = tmp_path / "artifacts" / "source" / "tiny-float32"
    target.mkdir(parents=True)
    (target / WEIGHTS_FILE).write_bytes(b"half written")
    assert not is_prepared(target)

    out = prepare_model_dir(src, tmp_path / "artifacts", log=quiet)
    assert out == target and is_prepared(out)


def test_failed_load_leaves_nothing_behind(tmp_path: Path) -> None:
    src = make_tiny_llama(tmp_path / "tiny")
    (src / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(Exception):
        prepare_model_dir(src, tmp_path / "artifacts", log=quiet)
    assert list((tmp_path / "artifacts" / "source").iterdir()) == []


@pytest.mark.parametrize("dtype", ["float16", "fp32", "int8"])
def test_bad_dtype_raises(tmp_path: Path, dtype: str) -> None:
    src = make_tiny_llama(tmp_path / "tiny")
    with pytest.raises(ValueError, match=dtype) as err:
        prepare_model_dir(src, tmp_path / "artifacts", dtype, log=quiet)
    assert "bfloat16" in str(err.value) and "float32" in str(err.value)
    with pytest.raises(ValueError, match=dtype):
        default_source_dir(tmp_path, dtype)


def test_not_a_checkpoint_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        prepare_model_dir(tmp_path, tmp_path / "artifacts", log=quiet)


def test_default_source_dir(tmp_path: Path) -> None:
    assert default_source_dir(tmp_path) == tmp_path / "source" / "smollm2-135m-instruct-float32"
    assert default_source_dir(tmp_path, "bfloat16") == tmp_path / "source" / "smollm2-135m-instruct-bfloat16"


def test_tiny_checkpoint_generates_varied_text(tmp_path: Path) -> None:
    # Guards the fixture itself: later tests compare generated sequences, which is
    # meaningless if a random model just repeats one token.
    src = make_tiny_llama(tmp_path / "tiny", heads=4, kv_heads=2)
    model = AutoModelForCausalLM.from_pretrained(src)
    tokenizer = AutoTokenizer.from_pretrained(src)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert 1 < ids.shape[1] < len(PROMPT)
    new = model.generate(ids, do_sample=False, max_new_tokens=16)[0, ids.shape[1] :]
    assert len(set(new.tolist())) > 4
    tokenizer.decode(new)


@pytest.mark.slow
def test_prepare_default(default_source: Path) -> None:
    # The conftest fixture ran prepare_default once into the repo's artifacts/ cache.
    out = default_source
    assert out == default_source_dir(out.parent.parent)
    marker = json.loads((out / MARKER_FILE).read_text())
    gguf = gguf_path()
    assert marker["source"] == str(gguf)
    assert marker["digest_algorithm"] == "blake3"
    assert marker["source_digest"] == source_digest([gguf], gguf.parent)
    assert marker["num_parameters"] == 134_515_008
    assert marker["num_layers"] == 30
    assert "lm_head.weight" not in stored_keys(out)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30
