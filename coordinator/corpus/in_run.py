"""The eval corpus inside a run: the launcher's baseline records the full model's reference and
the floors once; the coordinator scores every checkpoint against it. Both read the run's own
copy of the corpus (eval_corpus.json), never the source it came from."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save as save_safetensors_bytes

from coordinator.corpus import scoring, stats
from coordinator.corpus.documents import Corpus
from coordinator.floors import FLOORS
from sandbox import Sandbox
from sandbox.layout import BASELINE_CORPUS, EVAL_CORPUS


def read_run_corpus(box: Sandbox) -> Corpus | None:
    """The run's corpus, or None when the run has none (no --eval-corpus)."""
    if not box.exists(EVAL_CORPUS):
        return None
    return Corpus.from_json(json.loads(box.read_bytes(EVAL_CORPUS)))


def _public(summary: dict[str, Any]) -> dict[str, Any]:
    """A floor's summary without its per-document sums (only checkpoints are paired)."""
    return {k: v for k, v in summary.items() if k != "per_document"}


def record_corpus_baseline(
    box: Sandbox, model: Any, tokenizer: Any, report: Callable[[str], None] | None = None
) -> dict[str, Any] | None:
    """Score the full model and the floors on the run's corpus and keep the reference in
    baseline/corpus.safetensors: {protocol, head_sha256, full, floors, seconds}. `report`
    is told the progress in words (minutes for the whole Lee eval set on 2 cores)."""
    corpus = read_run_corpus(box)
    if corpus is None:
        return None
    started = time.perf_counter()
    prefix, size = scoring.prefix_token(tokenizer), scoring.window_size(model.config)
    docs = scoring.tokenize_corpus(tokenizer, corpus.eval_docs)
    fit = scoring.tokenize_corpus(tokenizer, corpus.fit_docs)
    tokens = sum(len(d) for d in docs)

    def on_document(done: int) -> None:
        if report is not None:
            seconds = time.perf_counter() - started
            report(f"baseline: the eval corpus, document {done}/{len(docs)} of {tokens:,} tokens ({seconds:.0f} s)")

    ref, floors, full = scoring.reference_and_floors(model, docs, fit, prefix, size, on_document)
    box.write_bytes(BASELINE_CORPUS, save_safetensors_bytes(ref.tensors()))
    documents = stats.documents_for(corpus.eval_docs, docs)
    return {
        "protocol": scoring.protocol(corpus, prefix, tokenizer.decode([prefix]), size),
        "head_sha256": scoring.head_digest(model),
        "fit_tokens": sum(len(d) for d in fit),
        "full": _public(stats.summarize(full, ref, documents)),
        "floors": {name: _public(stats.summarize(floors[name], ref, documents)) for name in FLOORS},
        "seconds": round(time.perf_counter() - started, 3),
    }


class CorpusScorer:
    """The coordinator's side: every checkpoint scored on the corpus against the reference,
    and paired with the checkpoint before it on the same tokens."""

    def __init__(self, box: Sandbox, corpus: Corpus, baseline: dict[str, Any]) -> None:
        self.box, self.corpus, self.baseline = box, corpus, baseline
        self._loaded: tuple[list[list[int]], stats.Documents, scoring.Reference] | None = None

    def _load(self, tokenizer: Any) -> tuple[list[list[int]], stats.Documents, scoring.Reference]:
        if self._loaded is None:
            docs = scoring.tokenize_corpus(tokenizer, self.corpus.eval_docs)
            ref = scoring.Reference.from_tensors(load_safetensors_file(str(self.box.resolve(BASELINE_CORPUS))))
            tokens = sum(len(d) for d in docs)
            if tokens != len(ref.logp):
                raise ValueError(
                    f"{BASELINE_CORPUS}: {len(ref.logp)} tokens, but the corpus has {tokens}: "
                    "expected the corpus the baseline was recorded with"
                )
            self._loaded = docs, stats.documents_for(self.corpus.eval_docs, docs), ref
        return self._loaded

    def score(self, model: Any, tokenizer: Any, previous: dict[str, Any] | None) -> dict[str, Any]:
        """The checkpoint's corpus summary; `previous`: the last checkpoint's, for the paired change."""
        started = time.perf_counter()
        docs, documents, ref = self._load(tokenizer)
        protocol = self.baseline["protocol"]
        head = scoring.head_digest(model)
        if head != self.baseline["head_sha256"]:
            raise ValueError(f"lm_head sha256 {head}: expected the full model's {self.baseline['head_sha256']}")
        scores = scoring.score_model(model, docs, protocol["prefix_token"], protocol["window"], ref)
        out = stats.summarize(scores, ref, documents)
        if previous is not None:
            out["change_from_previous"] = stats.paired(out, previous, documents)
        out["seconds"] = round(time.perf_counter() - started, 3)
        return out
