"""fragsim's corpus units against lm-eval's own: HFLM.loglikelihood_rolling on the same
documents and the full SmolLM2 model, aggregated by lm-eval's metric functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.corpus import scoring, stats
from coordinator.corpus.documents import LEE, read_corpus

pytestmark = pytest.mark.slow
DOCUMENTS = 4
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def smollm2(default_source: Path) -> tuple[Any, Any]:
    from coordinator.launch.baseline import SourceModel

    source = SourceModel(default_source, threads=2)
    return source.model, source.tokenizer


def _lm_eval(model: Any, tokenizer: Any, docs: tuple[str, ...], max_length: int) -> dict[str, float]:
    from lm_eval.api.instance import Instance
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=1)
    requests = [
        Instance(request_type="loglikelihood_rolling", doc={"text": d}, arguments=(d,), idx=i)
        for i, d in enumerate(docs)
    ]
    ll = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    words = [(x, scoring.count_words(d)) for x, d in zip(ll, docs, strict=True)]
    nbytes = [(x, scoring.count_bytes(d)) for x, d in zip(ll, docs, strict=True)]
    return {
        "word_perplexity": weighted_perplexity(words),
        "byte_perplexity": weighted_perplexity(nbytes),
        "bits_per_byte": bits_per_byte(nbytes),
    }


def _fragsim(model: Any, tokenizer: Any, docs: tuple[str, ...], max_length: int) -> dict[str, Any]:
    tokens = scoring.tokenize_corpus(tokenizer, docs)
    scores = scoring.score_model(model, tokens, scoring.prefix_token(tokenizer), max_length)
    documents = stats.documents_for(docs, tokens)
    return stats.units(documents.sums(-scores.logq), documents)


@pytest.mark.parametrize("max_length", [2048, 96], ids=["one-window-per-document", "several-windows"])
def test_bits_per_byte_and_perplexities_agree_with_lm_eval(smollm2: tuple[Any, Any], max_length: int) -> None:
    model, tokenizer = smollm2
    docs = read_corpus(LEE, DOCUMENTS).eval_docs
    theirs = _lm_eval(model, tokenizer, docs, max_length)
    ours = _fragsim(model, tokenizer, docs, max_length)
    for key, value in theirs.items():
        assert np.isclose(ours[key], value, rtol=TOLERANCE, atol=0), (key, ours[key], value)
