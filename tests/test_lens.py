"""The tuned lens: its closed form, its file, the hook that applies it, `fragsim lens fit`, and
checkpoints read through it in a real run. A real-model test shows it recovers what the logit
lens misses at a middle layer."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from checkpoints import make_tiny_llama
from conftest import simulate
from coordinator.corpus.documents import LEE, read_corpus
from coordinator.lab.lens_fit import closed_form, fit_command, fit_lens, parse_layers
from coordinator.launch.lenses import lens_path
from coordinator.lens import TunedLens, lensed
from protocol.errors import PlanError

WORDS = [
    "harbour",
    "boats",
    "gulls",
    "bread",
    "street",
    "rain",
    "children",
    "coats",
    "lamps",
    "water",
    "town",
    "fish",
    "nets",
    "tide",
    "dog",
    "inn",
    "carts",
]


def _corpus(path: Path, lines: int = 48) -> Path:
    """Plain sentences, one document per line, enough fit tokens for a tiny lens."""
    text = [
        " ".join(f"the {WORDS[(i * 3 + j) % len(WORDS)]} and the {WORDS[(i + j * 5) % len(WORDS)]}" for j in range(6))
        + "."
        for i in range(lines)
    ]
    path.write_text("\n".join(text) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("lens") / "model", num_layers=4, seed=13)


def test_the_closed_form_recovers_an_affine_map() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=generator)
    a_true, b_true = torch.randn(8, 8, generator=generator) * 0.3, torch.randn(8, generator=generator)
    a, b = closed_form(x, x + x @ a_true.T + b_true)
    assert torch.allclose(a, a_true, atol=1e-3) and torch.allclose(b, b_true, atol=1e-3)


def test_a_lens_file_round_trips_and_a_wrong_one_is_refused(tmp_path: Path) -> None:
    lens = TunedLens(torch.randn(3, 4, 4), torch.randn(3, 4), {"num_layers": 3})
    (tmp_path / "lens.safetensors").write_bytes(lens.to_bytes())
    back = TunedLens.load(tmp_path / "lens.safetensors")
    assert torch.equal(back.weight, lens.weight) and back.meta == {"num_layers": 3}
    bad = TunedLens(torch.randn(3, 4, 5), torch.randn(3, 4))
    (tmp_path / "bad.safetensors").write_bytes(bad.to_bytes())
    with pytest.raises(ValueError, match=r"weight \(3, 4, 5\)"):
        TunedLens.load(tmp_path / "bad.safetensors")


def test_a_zero_translator_leaves_the_logits_unchanged(tiny: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny, local_files_only=True).eval()
    ids = torch.tensor([[1, 5, 9, 14, 20]])
    lens = TunedLens(torch.zeros(4, 64, 64), torch.zeros(4, 64))
    with torch.inference_mode():
        plain = model(ids).logits
        with lensed(model, lens, 2):
            same = model(ids).logits
        moved = TunedLens(torch.zeros(4, 64, 64), torch.ones(4, 64))
        with lensed(model, moved, 2):
            other = model(ids).logits
        after = model(ids).logits
    assert torch.equal(plain, same) and not torch.equal(plain, other)
    assert torch.equal(plain, after)  # the hook is gone afterwards


def test_fitting_beats_the_logit_lens_on_held_out_tokens(tiny: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny, local_files_only=True)
    corpus = read_corpus(str(_corpus(tmp_path / "docs.txt")))
    lens = fit_lens(model, tokenizer, list(corpus.fit_docs), tokens=256, epochs=1, layers=[1, 2], held_out=64)
    scores = lens.meta["held_out_kl"]
    assert set(scores) == {"1", "2"}
    for s in scores.values():
        assert min(s["closed_form_kl"], s["tuned_kl"]) < s["logit_lens_kl"]
    assert torch.equal(lens.weight[0], torch.zeros(64, 64))  # layers not asked for stay identity


def test_bad_layers_are_refused() -> None:
    with pytest.raises(PlanError, match="5,x"):
        parse_layers("5,x")


def test_a_run_reads_its_checkpoints_through_the_cached_lens(tiny: Path, tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    corpus = _corpus(tmp_path / "docs.txt")
    out = fit_command(tiny, artifacts, corpus=str(corpus), tokens=256, epochs=0, threads=1, held_out=64,
                      console=Console(file=io.StringIO()))  # fmt: skip
    assert out == lens_path(artifacts, tiny)
    result = simulate(tiny, tmp_path / "run", fragments=2, order="forward", max_new_tokens=4, artifacts=str(artifacts))
    assert result.code == 0, result.output
    first, last = result.results["checkpoints"]
    tuned: dict[str, Any] = first["quality"]["tuned"]
    assert tuned["fitted"] is True and tuned["kl"] is not None
    assert "tuned" not in last["quality"]  # the full model needs no lens
    assert (tmp_path / "run" / "baseline" / "lens.safetensors").is_file()
    plain = simulate(tiny, tmp_path / "plain", fragments=2, order="forward", max_new_tokens=4,
                     artifacts=str(artifacts), lens=False)  # fmt: skip
    assert "tuned" not in plain.results["checkpoints"][0]["quality"]


@pytest.mark.slow
def test_the_tuned_lens_reads_a_middle_layer_of_smollm2_better_than_the_logit_lens(default_source: Path) -> None:
    from coordinator.launch.baseline import SourceModel

    source = SourceModel(default_source, threads=2)
    fit = list(read_corpus(LEE).fit_docs)
    lens = fit_lens(source.model, source.tokenizer, fit, tokens=512, epochs=0, layers=[15], held_out=256)
    s = lens.meta["held_out_kl"]["15"]
    assert s["closed_form_kl"] < 0.5 * s["logit_lens_kl"], s
