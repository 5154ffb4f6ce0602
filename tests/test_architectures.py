"""Which checkpoints fragsim handles: every supported architecture runs end to end with real
processes; everything else is refused up front, with one line, before a file is created."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

from agents.source import SourceCheckpoint
from checkpoints import make_tiny_llama, make_tiny_model
from conftest import simulate
from coordinator.launch import cli
from coordinator.launch.architectures import SUPPORTED_ARCHITECTURES, SUPPORTED_TEXT
from protocol.errors import PlanError
from protocol.plan import Plan
from protocol.safetensors_format import parse_header

# Each case is one tiny checkpoint; the llama ones differ in the features the issue lists.
_LLAMA_VARIANTS: dict[str, Callable[[Path], Path]] = {
    "llama-tied": lambda p: make_tiny_llama(p, num_layers=4),
    "llama-untied-gqa-bf16-sharded": lambda p: make_tiny_llama(
        p, num_layers=4, tied=False, dtype="bfloat16", sharded=True, seed=3
    ),
}
SUPPORTED_CASES = [*_LLAMA_VARIANTS, "qwen2", "mistral", "qwen3", "phi3", "gemma2", "gpt_neox"]
REFUSED_CASES = ["gpt2", "falcon", "mixtral"]

# transformers' names -> the names of Mistral's own consolidated.safetensors, for the same weights
_MISTRAL_NATIVE = [
    ("model.embed_tokens.", "tok_embeddings."),
    ("model.norm.", "norm."),
    ("lm_head.", "output."),
    ("model.layers.", "layers."),
    ("self_attn.q_proj.", "attention.wq."),
    ("self_attn.k_proj.", "attention.wk."),
    ("self_attn.v_proj.", "attention.wv."),
    ("self_attn.o_proj.", "attention.wo."),
    ("mlp.gate_proj.", "feed_forward.w1."),
    ("mlp.down_proj.", "feed_forward.w2."),
    ("mlp.up_proj.", "feed_forward.w3."),
    ("post_attention_layernorm.", "ffn_norm."),
    ("input_layernorm.", "attention_norm."),
]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A tiny random checkpoint of one case, written once per session (read-only for tests)."""
    made: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in made:
            path = tmp_path_factory.mktemp(case) / "model"
            made[case] = _LLAMA_VARIANTS[case](path) if case in _LLAMA_VARIANTS else make_tiny_model(path, case)
        return made[case]

    return get


def copy_of(checkpoint: Callable[[str], Path], case: str, tmp_path: Path) -> Path:
    """A private copy of a session checkpoint, for a test that breaks it."""
    return Path(shutil.copytree(checkpoint(case), tmp_path / "model"))


def edit_config(model: Path, **changes: Any) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))


def refused(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    """Run `fragsim simulate` on `model`: it must exit 2 with one stderr line and create nothing."""
    run, art = tmp_path / "run", tmp_path / "art"
    capsys.readouterr()  # drop what writing the checkpoint printed (progress bars)
    code = cli.main(["simulate", "--model", str(model), "--run-dir", str(run), "--artifacts", str(art), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert not run.exists() and not art.exists(), "a refused run creates nothing"
    return err


def check_exact(result: Any) -> None:
    final = result.results["final"]
    assert result.code == 0, result.output
    assert result.results["final_matches_baseline"] is True
    assert final["tensor_digests_match"] and final["logits_max_abs_diff"] == 0.0 and final["tokens_identical"]


def write_safetensors(path: Path, header: Any, data: bytes = b"") -> None:
    body = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def test_the_supported_list_is_what_these_tests_run(checkpoint: Callable[[str], Path]) -> None:
    run = {json.loads((checkpoint(case) / "config.json").read_text())["model_type"] for case in SUPPORTED_CASES}
    assert run == set(SUPPORTED_ARCHITECTURES)
    assert ", ".join(SUPPORTED_ARCHITECTURES) in SUPPORTED_TEXT


@pytest.mark.parametrize("case", SUPPORTED_CASES)
def test_supported_architecture_runs_end_to_end_bit_exact(
    checkpoint: Callable[[str], Path], tmp_path: Path, case: str
) -> None:
    # Forward: fragment 0 is loaded with from_pretrained, fragment 1 grows the live model, the
    # path where an architecture whose saved keys transformers rewrites on load (MoE) breaks.
    result = simulate(checkpoint(case), tmp_path / "run", fragments=2, order="forward")
    check_exact(result)
    assert [c["loaded"]["kind"] for c in result.results["checkpoints"]] == ["from_pretrained", "grow"]
    # the floors run the model itself with no layer: its own final norm, head and softcapping
    floors = result.results["baseline"]["quality_floors"]
    assert all(floors[name]["ce"] is not None for name in ("uniform", "unigram", "embeddings"))


def test_eval_corpus_on_a_softcapped_model_is_refused_before_anything_exists(
    checkpoint: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = refused(checkpoint("gemma2"), tmp_path, capsys, "--eval-corpus", "lee", "--eval-documents", "2")
    assert "--eval-corpus" in err and "final_logit_softcapping=30.0" in err and "lm_head(h) alone" in err


@pytest.mark.parametrize("case", REFUSED_CASES)
def test_unsupported_architecture_is_refused_with_one_line_before_anything_exists(
    checkpoint: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    err = refused(checkpoint(case), tmp_path, capsys)
    assert f"model_type in config.json: got {case!r}" in err
    assert SUPPORTED_TEXT in err


def test_an_unknown_model_type_is_refused(
    checkpoint: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = copy_of(checkpoint, "llama-tied", tmp_path)
    edit_config(model, model_type="llama_next")
    err = refused(model, tmp_path, capsys)
    assert "model_type in config.json: got 'llama_next'" in err and SUPPORTED_TEXT in err


@pytest.mark.parametrize("value", [0, -1, "4", 4.0, True, None])
def test_num_hidden_layers_must_be_a_whole_number_of_at_least_one(
    checkpoint: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], value: Any
) -> None:
    model = copy_of(checkpoint, "llama-tied", tmp_path)
    edit_config(model, num_hidden_layers=value)
    err = refused(model, tmp_path, capsys)
    assert f"num_hidden_layers in config.json of this llama checkpoint: got {value!r}" in err
    assert SUPPORTED_TEXT in err


@pytest.mark.parametrize("layers,found", [(5, "0-3"), (3, "0-3")])
def test_decoder_layers_in_the_weights_must_be_exactly_those_of_the_config(
    checkpoint: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], layers: int, found: str
) -> None:
    model = copy_of(checkpoint, "llama-tied", tmp_path)
    edit_config(model, num_hidden_layers=layers)
    err = refused(model, tmp_path, capsys)
    assert f"decoder layers of this llama checkpoint: got {found!r}" in err
    assert f"layers 0-{layers - 1} of num_hidden_layers={layers}" in err and SUPPORTED_TEXT in err


def test_a_gap_in_the_decoder_layers_is_refused(
    checkpoint: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = copy_of(checkpoint, "llama-tied", tmp_path)
    weights = load_file(str(model / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if ".layers.2." not in k}, str(model / "model.safetensors"))
    err = refused(model, tmp_path, capsys)
    assert "decoder layers of this llama checkpoint: got '0-1,3'" in err


def test_consolidated_safetensors_beside_model_safetensors_is_not_read_and_the_run_is_bit_exact(
    checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    # Mistral's releases ship their own format's copy of the same weights next to transformers'.
    model = copy_of(checkpoint, "mistral", tmp_path)
    native = {}
    for name, tensor in load_file(str(model / "model.safetensors")).items():
        for old, new in _MISTRAL_NATIVE:
            name = name.replace(old, new)
        native[name] = tensor
    save_file(native, str(model / "consolidated.safetensors"))
    (model / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 4}))
    assert SourceCheckpoint(model).files == ["model.safetensors"]
    run_dir = tmp_path / "run"
    result = simulate(model, run_dir, fragments=2, order="forward")
    check_exact(result)
    plan = Plan.loads((run_dir / "plan.json").read_bytes())
    assert {item.source_file for f in plan.fragments for item in f.items if item.kind == "tensor"} == {
        "model.safetensors"
    }


def test_an_index_names_exactly_the_weights_files_that_are_read(
    checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    model = copy_of(checkpoint, "llama-untied-gqa-bf16-sharded", tmp_path)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    named = sorted(set(index["weight_map"].values()))
    shutil.copy(model / named[0], model / "model.safetensors")  # a stray file beside the shards
    source = SourceCheckpoint(model)
    assert source.files == named and len(named) >= 2
    assert {loc.file for loc in source.tensors.values()} == set(named)
    assert set(source.tensors) == set(index["weight_map"])


def test_an_index_naming_a_missing_file_is_refused_with_one_line(
    checkpoint: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = copy_of(checkpoint, "llama-untied-gqa-bf16-sharded", tmp_path)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[-1]
    (model / gone).unlink()
    err = refused(model, tmp_path, capsys)
    assert "model.safetensors.index.json weight_map file" in err and repr(gone) in err


def test_an_index_that_disagrees_with_its_files_is_refused_with_one_line(
    checkpoint: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = copy_of(checkpoint, "llama-untied-gqa-bf16-sharded", tmp_path)
    path = model / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == files[0])
    index["weight_map"][name] = files[1]
    path.write_text(json.dumps(index))
    err = refused(model, tmp_path, capsys)
    assert f"tensor {name}: got {files[0]!r}, expected in {files[1]}" in err


_F32 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
MALFORMED = {
    "a list for a header": ([1, 2], b""),
    "a list for an entry": ({"w": [1]}, b""),
    "an entry without shape": ({"w": {"dtype": "F32", "data_offsets": [0, 4]}}, b"\0" * 4),
    "an unknown dtype": ({"w": {**_F32, "dtype": "Q4"}}, b"\0" * 4),
    "a dtype that is a list": ({"w": {**_F32, "dtype": ["F32"]}}, b"\0" * 4),
    "a negative dimension": ({"w": {**_F32, "shape": [-1]}}, b"\0" * 4),
    "offsets END < BEGIN": ({"w": {**_F32, "data_offsets": [4, 0]}}, b"\0" * 4),
    "offsets that are not a pair": ({"w": {**_F32, "data_offsets": [0]}}, b"\0" * 4),
    "offsets past the file": ({"w": {**_F32, "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
    "overlapping tensors": ({"w": _F32, "v": {**_F32, "data_offsets": [2, 6]}}, b"\0" * 8),
    "metadata that is a list": ({"__metadata__": ["pt"], "w": _F32}, b"\0" * 4),
    # Accepted by the hand parser, refused by the safetensors library the launcher asks too:
    "bytes between tensors": ({"w": {**_F32, "data_offsets": [4, 8]}}, b"\0" * 8),
    "bytes after the last tensor": ({"w": _F32}, b"\0" * 8),
    "a header that is not UTF-8 JSON": (b"\xff\xfe{}", b""),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_weights_file_is_refused_with_one_line_naming_it(
    checkpoint: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    model = copy_of(checkpoint, "llama-tied", tmp_path)
    header, data = MALFORMED[case]
    write_safetensors(model / "model.safetensors", header, data)
    err = refused(model, tmp_path, capsys)
    assert str(model / "model.safetensors") in err


@pytest.mark.parametrize("case", [c for c in MALFORMED if not c.startswith("bytes ") and "past the file" not in c])
def test_parse_header_refuses_a_malformed_header_with_a_plan_error(case: str) -> None:
    header, data = MALFORMED[case]
    body = json.dumps(header).encode() if not isinstance(header, bytes) else header
    with pytest.raises(PlanError):
        parse_header(struct.pack("<Q", len(body)) + body + data)


def test_a_truncated_weights_file_is_refused_with_one_line_naming_it(
    checkpoint: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = copy_of(checkpoint, "llama-tied", tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    err = refused(model, tmp_path, capsys)
    assert str(weights) in err
