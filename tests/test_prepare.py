"""Tests for coordinator.launch.prepare. Fast ones use tiny random checkpoints; the GGUF one is slow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from checkpoints import make_tiny_llama
from coordinator.launch.prepare import (
    MARKER_FILE,
    WEIGHTS_FILE,
    default_source_dir,
    is_prepared,
    prepare_model_dir,
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


def test_rerun_is_a_noop_unless_forced(tmp_path: Path) -> None:
    src = make_tiny_llama(tmp_path / "tiny")
    out = prepare_model_dir(src, tmp_path / "artifacts", log=quiet)
    stamp = (out / MARKER_FILE).stat().st_mtime_ns
    lines: list[str] = []

    assert prepare_model_dir(src, tmp_path / "artifacts", log=lines.append) == out
    assert (out / MARKER_FILE).stat().st_mtime_ns == stamp
    assert any("already prepared" in line for line in lines)

    prepare_model_dir(src, tmp_path / "artifacts", force=True, log=quiet)
    assert is_prepared(out)
    assert (out / MARKER_FILE).stat().st_mtime_ns != stamp
    assert [p.name for p in out.parent.iterdir()] == [out.name]


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
    assert marker["num_parameters"] == 134_515_008
    assert marker["num_layers"] == 30
    assert "lm_head.weight" not in stored_keys(out)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30
