"""The eval corpus and its scoring: lm-eval's windows and units, the KL shortcut against the KL
over the whole vocabulary, the floors, llama.cpp's block and the document bootstrap. Tiny real
Llama checkpoints; the agreement with lm-eval itself is tests/test_lm_eval_agreement.py."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from transformers import AutoModelForCausalLM, AutoTokenizer

from checkpoints import make_tiny_llama
from coordinator.corpus import scoring, stats
from coordinator.corpus.documents import LEE, read_corpus
from protocol.errors import PlanError

DOCS = [
    "The harbour was quiet before the boats came in, and the gulls waited on the posts.",
    "A baker opened her shop at six; the smell of bread reached the end of the street.",
    "Rain fell in the afternoon. Children ran home with their coats over their heads.",
    "By evening the lamps were lit along the water, and the town went slowly to sleep.",
]
FIT = ["The boats came back with fish.", "The shop sold bread and cakes to the town."]
WINDOW = 8  # small, so that every document needs several windows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    path = make_tiny_llama(tmp_path_factory.mktemp("corpus") / "model", num_layers=4, seed=11)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


@pytest.fixture(scope="module")
def scored(tiny: tuple[Any, Any]) -> dict[str, Any]:
    model, tokenizer = tiny
    docs = scoring.tokenize_corpus(tokenizer, DOCS)
    prefix = scoring.prefix_token(tokenizer)
    fit = scoring.tokenize_corpus(tokenizer, FIT)
    ref, floors, full = scoring.reference_and_floors(model, docs, fit, prefix, WINDOW)
    documents = stats.documents_for(DOCS, docs)
    return {"docs": docs, "prefix": prefix, "ref": ref, "floors": floors, "full": full, "documents": documents}


def _truncated(model: Any, keep: int) -> Any:
    """The model's first `keep` decoder layers, as a prefix checkpoint has them (same modules)."""
    import copy

    short = copy.deepcopy(model)
    short.model.layers = torch.nn.ModuleList(short.model.layers[:keep])
    short.config.num_hidden_layers = keep
    return short


def _full_vocab_kl(full: Any, partial: Any, docs: list[list[int]], prefix: int) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for doc in docs:
            for w in scoring.rolling_windows(doc, prefix, WINDOW):
                n = len(w.targets)
                p = torch.log_softmax(full(torch.tensor([w.inputs])).logits[0, -n:].double(), -1)
                q = torch.log_softmax(partial(torch.tensor([w.inputs])).logits[0, -n:].double(), -1)
                out.append((p.exp() * (p - q)).sum(-1).numpy())
    return np.concatenate(out)


# ---- lm-eval's protocol ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 60), size=st.integers(1, 20))
def test_rolling_windows_are_lm_evals_disjoint_windows(length: int, size: int) -> None:
    tokens = list(range(100, 100 + length))
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 7, size, 1)]
    ours = scoring.rolling_windows(tokens, 7, size)
    # HFLM feeds (context + continuation)[-(size + 1):][:-1] and scores the last len(continuation)
    assert [(w.inputs, w.targets) for w in ours] == [((a + b)[-(size + 1) :][:-1], b) for a, b in theirs]


def test_every_token_is_predicted_exactly_once() -> None:
    tokens = list(range(50))
    predicted = [t for w in scoring.rolling_windows(tokens, 1, 16) for t in w.targets]
    assert predicted == tokens


def test_words_are_counted_as_lm_eval_splits_them() -> None:
    assert scoring.count_words("one two  three") == 3
    assert scoring.count_words(" leading space") == 3  # re.split keeps the empty piece before it
    assert scoring.count_bytes("café") == 5


def test_units_agree_with_hand_computation() -> None:
    nll = np.array([10.0, 30.0])
    docs = stats.documents_of([4, 6], [3, 5], [20, 30])
    u = stats.units(nll, docs)
    assert u["ce"] == pytest.approx(40 / 10)
    assert u["bits_per_byte"] == pytest.approx(40 / 50 / math.log(2))
    assert u["byte_perplexity"] == pytest.approx(math.exp(40 / 50))
    assert u["word_perplexity"] == pytest.approx(math.exp(40 / 8))


# ---- the KL shortcut and the floors -------------------------------------------------------------


def test_the_kl_shortcut_equals_the_kl_over_the_whole_vocabulary(tiny: tuple[Any, Any], scored: dict[str, Any]) -> None:
    model, _ = tiny
    prefix_model = _truncated(model, 2)
    scores = scoring.score_model(prefix_model, scored["docs"], scored["prefix"], WINDOW, scored["ref"])
    direct = _full_vocab_kl(model, prefix_model, scored["docs"], scored["prefix"])
    assert np.allclose(stats._kl(scores, scored["ref"]), direct, atol=1e-6)
    assert direct.mean() > 0.01  # the prefix really differs: the comparison is not between zeros


def test_the_full_model_scores_exactly_zero_kl_against_itself(tiny: tuple[Any, Any], scored: dict[str, Any]) -> None:
    model, _ = tiny
    scores = scoring.score_model(model, scored["docs"], scored["prefix"], WINDOW, scored["ref"])
    block = stats.kl_block(scores, scored["ref"], scored["documents"])
    assert block["kl"]["max"] == 0.0
    assert block["same_top1"]["mean"] == 1.0
    assert np.array_equal(scores.logq, scored["ref"].logp)


def test_the_uniform_floor_has_cross_entropy_ln_v(tiny: tuple[Any, Any], scored: dict[str, Any]) -> None:
    vocab = tiny[0].config.vocab_size
    summary = stats.summarize(scored["floors"]["uniform"], scored["ref"], scored["documents"])
    assert summary["ce"] == pytest.approx(math.log(vocab))
    assert summary["kl"]["mean"] == pytest.approx(float(np.mean(math.log(vocab) - scored["ref"].entropy)))
    assert summary["same_top1"] is None


def test_the_unigram_is_add_one_smoothed_over_the_fit_set() -> None:
    logp = scoring.unigram_logprobs([[0, 0, 1], [0]], vocab=4)
    assert torch.allclose(logp.exp(), torch.tensor([4, 2, 1, 1], dtype=torch.float64) / 8)


def test_the_embeddings_lens_is_the_zero_layer_prefix(tiny: tuple[Any, Any], scored: dict[str, Any]) -> None:
    model, _ = tiny
    zero = _truncated(model, 0)
    scores = scoring.score_model(zero, scored["docs"], scored["prefix"], WINDOW, scored["ref"])
    lens = scored["floors"]["embeddings"]
    assert np.allclose(scores.logq, lens.logq, atol=1e-9)
    assert scores.cross is not None and lens.cross is not None
    assert np.allclose(scores.cross, lens.cross, atol=1e-6)


def test_a_model_whose_logits_are_not_a_plain_projection_is_refused(tiny: tuple[Any, Any]) -> None:
    model, _ = tiny
    model.config.final_logit_softcapping = 30.0
    try:
        with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
            scoring.lm_head_of(model)
    finally:
        model.config.final_logit_softcapping = None


# ---- llama.cpp's block and the bootstrap ----------------------------------------------------------


def test_the_kl_block_has_llama_cpps_statistics(tiny: tuple[Any, Any], scored: dict[str, Any]) -> None:
    scores = scoring.score_model(_truncated(tiny[0], 1), scored["docs"], scored["prefix"], WINDOW, scored["ref"])
    block = stats.kl_block(scores, scored["ref"], scored["documents"])
    kl = block["kl"]
    assert kl["min"] <= kl["p1"] <= kl["median"] <= kl["p90"] <= kl["p95"] <= kl["p99"] <= kl["p99.9"] <= kl["max"]
    assert kl["ci"][0] <= kl["mean"] <= kl["ci"][1]
    assert set(block) == {"kl", "same_top1", "delta_p_rms", "ln_ppl_ratio"}
    ratio = scored["ref"].logp - scores.logq
    assert block["ln_ppl_ratio"]["value"] == pytest.approx(float(ratio.mean()))


def test_the_bootstrap_is_over_documents_and_repeatable() -> None:
    num = np.array([1.0, 2.0, 3.0, 50.0])
    den = np.array([1.0, 1.0, 1.0, 1.0])
    first, second = stats.ratio_ci(num, den), stats.ratio_ci(num, den)
    assert first == second
    assert first[0] < num.sum() / den.sum() < first[1]
    assert stats.ratio_ci(np.ones(4), np.ones(4)) == [1.0, 1.0]  # documents that agree leave no doubt


def test_a_checkpoint_paired_with_itself_changes_by_exactly_zero(scored: dict[str, Any]) -> None:
    summary = stats.summarize(scored["floors"]["unigram"], scored["ref"], scored["documents"])
    change = stats.paired(summary, summary, scored["documents"])
    assert change["bits_per_byte"] == {"value": 0.0, "ci": [0.0, 0.0]}
    assert change["kl"]["value"] == 0.0


# ---- the corpus ---------------------------------------------------------------------------------


def test_the_lee_corpus_splits_into_disjoint_eval_and_fit_sets() -> None:
    corpus = read_corpus(LEE)
    identity = corpus.identity()
    assert (identity["eval_documents"], identity["fit_documents"]) == (100, 200)
    assert not set(corpus.eval_docs) & set(corpus.fit_docs)
    assert sum(len(d.split()) for d in corpus.eval_docs) > 15_000  # ~23k SmolLM2 tokens
    assert identity["eval_sha256"] != identity["fit_sha256"]


def test_eval_documents_cuts_only_the_eval_set() -> None:
    assert len(read_corpus(LEE, 5).eval_docs) == 5
    assert len(read_corpus(LEE, 5).fit_docs) == 200


def test_a_corpus_file_is_one_document_per_line(tmp_path: Path) -> None:
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(DOCS) + "\n\n")
    corpus = read_corpus(str(path))
    assert corpus.eval_docs == tuple(DOCS[:2]) and corpus.fit_docs == tuple(DOCS[2:])


@pytest.mark.parametrize(
    ("content", "documents", "message"),
    [
        (b"only one document\n", None, "at least 2 documents"),
        (b"\xff\xfe not text\nsecond\n", None, "not UTF-8 at byte 0"),
        ("\n".join(DOCS).encode(), 3, "1..2"),
    ],
)
def test_a_bad_corpus_is_refused_with_what_was_expected(
    tmp_path: Path, content: bytes, documents: int | None, message: str
) -> None:
    path = tmp_path / "docs.txt"
    path.write_bytes(content)
    with pytest.raises(PlanError, match=message):
        read_corpus(str(path), documents)


# ---- the floors of the short eval text (coordinator.floors) -----------------------------------

TEXT = " ".join(DOCS)


@pytest.fixture(scope="module")
def text_floors(tiny: tuple[Any, Any]) -> dict[str, Any]:
    from coordinator.corpus.documents import Corpus
    from coordinator.evaluate import sequence_logits
    from coordinator.floors import text_floors as floors_of

    model, tokenizer = tiny
    ids = tokenizer(TEXT)["input_ids"]
    full = sequence_logits(model, ids)
    fit = Corpus("two", "a test", (DOCS[0],), tuple(FIT))
    return {"ids": ids, "full": full, "floors": floors_of(model, tokenizer, ids, full, fit), "fit": fit}


def test_the_text_floors_are_the_uniform_the_unigram_and_the_embeddings(text_floors: dict[str, Any]) -> None:
    assert list(text_floors["floors"]) == ["uniform", "unigram", "embeddings"]


def test_the_uniform_text_floor_is_ln_v_and_has_no_top1(tiny: tuple[Any, Any], text_floors: dict[str, Any]) -> None:
    from coordinator.quality import text_quality, uniform_kl

    vocab = tiny[0].config.vocab_size
    uniform = text_floors["floors"]["uniform"]
    assert uniform["ce"] == pytest.approx(math.log(vocab))
    full = text_quality(text_floors["full"], text_floors["ids"])
    assert uniform["kl"] == pytest.approx(uniform_kl(full["entropy"], vocab))
    assert uniform["top1"] is None


def test_the_unigram_text_floor_is_fitted_on_the_fit_set_only(
    tiny: tuple[Any, Any], text_floors: dict[str, Any]
) -> None:
    _, tokenizer = tiny
    ids, vocab = text_floors["ids"], tiny[0].config.vocab_size
    logu = scoring.unigram_logprobs(scoring.tokenize_corpus(tokenizer, FIT), vocab)
    by_hand = -float(logu[torch.tensor(ids[1:])].mean())
    unigram = text_floors["floors"]["unigram"]
    assert unigram["ce"] == pytest.approx(by_hand, rel=1e-6)
    assert unigram["fit"]["fit_documents"] == len(FIT) and unigram["fit"]["name"] == "two"
    assert unigram["top1"] == pytest.approx(
        float(np.mean(text_floors["full"][:-1].argmax(-1).numpy() == int(logu.argmax())))
    )


def test_the_embeddings_text_floor_is_the_zero_layer_prefix(tiny: tuple[Any, Any], text_floors: dict[str, Any]) -> None:
    from coordinator.evaluate import sequence_logits
    from coordinator.quality import text_quality

    zero = _truncated(tiny[0], 0)
    by_prefix = text_quality(sequence_logits(zero, text_floors["ids"]), text_floors["ids"], text_floors["full"])
    lens = text_floors["floors"]["embeddings"]
    for key in ("ce", "kl", "top1"):
        assert lens[key] == pytest.approx(by_prefix[key], rel=1e-5, abs=1e-7)


def test_without_a_fit_set_the_text_has_no_unigram_floor(tiny: tuple[Any, Any], text_floors: dict[str, Any]) -> None:
    from coordinator.floors import text_floors as floors_of

    model, tokenizer = tiny
    floors = floors_of(model, tokenizer, text_floors["ids"], text_floors["full"], None)
    assert list(floors) == ["uniform", "embeddings"]


def test_the_baseline_reports_its_progress_after_every_document(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    docs = scoring.tokenize_corpus(tokenizer, DOCS)
    done: list[int] = []
    scoring.reference_and_floors(model, docs, docs, scoring.prefix_token(tokenizer), WINDOW, done.append)
    assert done == list(range(1, len(DOCS) + 1))
