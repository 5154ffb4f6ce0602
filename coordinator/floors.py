"""The floors of the eval text: what models that know less than any checkpoint score on it.
Without them a reader cannot tell a prefix that predicts something from a blind guess (a
uniform guess is at most ln V from any distribution). The eval corpus has its own, scored
under lm-eval's protocol (coordinator.corpus); these are the same three on the short text."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from coordinator.corpus.documents import Corpus
from coordinator.corpus.scoring import tokenize_corpus, unigram_logprobs
from coordinator.evaluate import sequence_logits
from coordinator.quality import full_reference, text_quality

FLOORS = ("uniform", "unigram", "embeddings")  # what a model that knows less than any checkpoint scores


@torch.inference_mode()
def text_floors(
    model: Any, tokenizer: Any, ids: list[int], full_logits: torch.Tensor, fit: Corpus | None
) -> dict[str, dict[str, Any]]:
    """`text_quality` of each floor over `ids` against the full model's logits: the uniform
    guess, the unigram fitted on `fit`'s fit set (left out without one) and the embeddings-only
    lens (k = 0: the model run with no decoder layer, as a zero-layer checkpoint would be: the
    final norm and the head, softcapping included, applied to the embeddings)."""
    ref = full_reference(full_logits, ids)
    positions, vocab = full_logits.shape
    floors: dict[str, dict[str, Any]] = {}
    # expand: one row of logits seen at every position, without positions x vocab floats
    floors["uniform"] = text_quality(torch.zeros(1, vocab).expand(positions, vocab), ids, ref)
    floors["uniform"]["top1"] = None  # every token is an argmax: agreement is not defined
    if fit is not None:
        log_unigram = unigram_logprobs(tokenize_corpus(tokenizer, fit.fit_docs), vocab).float()
        unigram = text_quality(log_unigram[None].expand(positions, vocab), ids, ref)
        identity = fit.identity()
        unigram["fit"] = {k: identity[k] for k in ("name", "source", "fit_documents", "fit_sha256")}
        floors["unigram"] = unigram
    with without_layers(model):
        floors["embeddings"] = text_quality(sequence_logits(model, ids), ids, ref)
    return floors


@contextmanager
def without_layers(model: Any) -> Iterator[None]:
    """The model with its decoder layers taken out while the block runs, and put back after."""
    base = getattr(model, model.base_model_prefix)
    layers, count = base.layers, model.config.num_hidden_layers
    base.layers, model.config.num_hidden_layers = torch.nn.ModuleList(), 0
    try:
        yield
    finally:
        base.layers, model.config.num_hidden_layers = layers, count
