"""What a model's per-token scores on the eval corpus add up to: lm-eval's units, llama.cpp's
KL block (`llama-perplexity --kl-divergence`), confidence intervals and paired differences.

Tokens of one document are not independent draws, so every confidence interval here is a
bootstrap over documents: documents are resampled with replacement, each statistic is
recomputed as a ratio of sums, and the 2.5/97.5 percentiles are the 95 % interval. The
standard errors beside the means are llama.cpp's own, over tokens, so that its users can
compare them with what it prints. Pure numpy, no model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from coordinator.corpus.scoring import Reference, TokenScores, count_bytes, count_words

BOOTSTRAP = 2000  # resamples of the documents
BOOTSTRAP_SEED = 0  # fixed: the same run gives the same intervals
CI = (2.5, 97.5)
# llama.cpp's KL percentiles, as it prints them
PERCENTILES = (("max", 100.0), ("p99.9", 99.9), ("p99", 99.0), ("p95", 95.0), ("p90", 90.0), ("median", 50.0))
PERCENTILES_LOW = (("p10", 10.0), ("p5", 5.0), ("p1", 1.0), ("p0.1", 0.1), ("min", 0.0))
# KL computed as -H - (m . n - lse) is exact up to rounding of order 1e-9 nats: a value that
# small below 0 is a zero, not a model better than the reference.
KL_ROUNDING = 1e-6


@dataclass(frozen=True)
class Documents:
    """Where each eval document's tokens are, and its words and bytes as lm-eval counts them."""

    offsets: np.ndarray  # int64 [documents + 1]
    words: np.ndarray  # int64 [documents]
    bytes: np.ndarray  # int64 [documents]

    @property
    def count(self) -> int:
        return len(self.words)

    def sums(self, per_token: np.ndarray) -> np.ndarray:
        """Per-document sums of a per-token array."""
        return np.add.reduceat(per_token.astype(np.float64), self.offsets[:-1]) if self.count else np.zeros(0)

    @property
    def tokens(self) -> np.ndarray:
        return np.diff(self.offsets)


def documents_of(token_counts: list[int], words: list[int], nbytes: list[int]) -> Documents:
    return Documents(np.concatenate([[0], np.cumsum(token_counts)]).astype(np.int64), np.array(words), np.array(nbytes))


def documents_for(texts: Sequence[str], tokenized: Sequence[list[int]]) -> Documents:
    """The Documents of eval texts and their token ids, words and bytes counted as lm-eval does."""
    return documents_of([len(t) for t in tokenized], [count_words(d) for d in texts], [count_bytes(d) for d in texts])


def _weights(documents: int) -> np.ndarray:
    """[BOOTSTRAP, documents]: how often each document is drawn in each resample."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    return rng.multinomial(documents, np.full(documents, 1.0 / documents), size=BOOTSTRAP).astype(np.float64)


def ratio_ci(numerator: np.ndarray, denominator: np.ndarray, scale: float = 1.0) -> list[float]:
    """95 % bootstrap interval of scale x sum(numerator) / sum(denominator) over documents."""
    w = _weights(len(numerator))
    values = scale * (w @ numerator) / (w @ denominator)
    lo, hi = np.percentile(values, CI)
    return [float(lo), float(hi)]


def per_document(scores: TokenScores, ref: Reference | None, docs: Documents) -> dict[str, list[float]]:
    """Per-document sums a paired comparison of two checkpoints needs: nll, and with the
    reference kl and same-top-1 counts."""
    out = {"nll": docs.sums(-scores.logq).tolist()}
    if ref is not None and scores.cross is not None:
        out["kl"] = docs.sums(_kl(scores, ref)).tolist()
        if scores.argmax is not None:
            out["same_top1"] = docs.sums(scores.argmax == ref.top1).tolist()
    return out


def _kl(scores: TokenScores, ref: Reference) -> np.ndarray:
    assert scores.cross is not None
    kl = -ref.entropy - scores.cross
    return np.where((kl < 0) & (kl > -KL_ROUNDING), 0.0, kl)


def units(nll: np.ndarray, docs: Documents) -> dict[str, Any]:
    """Token CE and lm-eval's units from per-document nll sums (nats)."""
    total, tokens, words, nbytes = (
        float(nll.sum()),
        int(docs.tokens.sum()),
        int(docs.words.sum()),
        int(docs.bytes.sum()),
    )
    return {
        "ce": total / tokens,
        "bits_per_byte": total / nbytes / math.log(2),
        "bits_per_byte_ci": ratio_ci(nll, docs.bytes.astype(np.float64), 1 / math.log(2)),
        "byte_perplexity": _exp(total / nbytes),
        "word_perplexity": _exp(total / words),
        "token_perplexity": _exp(total / tokens),
    }


def kl_block(scores: TokenScores, ref: Reference, docs: Documents) -> dict[str, Any]:
    """llama.cpp's KL-divergence block for one model against the full one, plus bootstrap CIs."""
    n = len(ref.logp)
    counts = docs.tokens.astype(np.float64)
    out: dict[str, Any] = {}
    if scores.cross is not None:
        kl = _kl(scores, ref)
        mean = float(kl.mean())
        out["kl"] = {
            "mean": mean,
            "se": _se(kl),
            "ci": ratio_ci(docs.sums(kl), counts),
            **{name: float(np.percentile(kl, q)) for name, q in PERCENTILES + PERCENTILES_LOW},
        }
    if scores.argmax is not None:
        same = (scores.argmax == ref.top1).astype(np.float64)
        p = float(same.mean())
        out["same_top1"] = {
            "mean": p,
            "se": math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None,
            "ci": ratio_ci(docs.sums(same), counts),
        }
    else:
        out["same_top1"] = None  # a uniform guess has no most likely token
    dp = np.exp(scores.logq) - np.exp(ref.logp)  # llama.cpp's Δp: change in p(correct token)
    rms = math.sqrt(float((dp**2).mean()))
    se_square = _se(dp**2)
    out["delta_p_rms"] = {"value": rms, "se": se_square / (2 * rms) if se_square is not None and rms > 0 else None}
    ratio = ref.logp - scores.logq  # per token: ln q vs ln p of the correct token
    out["ln_ppl_ratio"] = {"value": float(ratio.mean()), "se": _se(ratio), "ci": ratio_ci(docs.sums(ratio), counts)}
    return out


def summarize(scores: TokenScores, ref: Reference | None, docs: Documents) -> dict[str, Any]:
    """Units (with a CI), the KL block when there is a reference, and per-document sums."""
    if len(scores.logq) != int(docs.offsets[-1]):
        raise ValueError(f"scores for {len(scores.logq)} tokens, expected {int(docs.offsets[-1])} (the eval corpus)")
    out = {"tokens": int(docs.offsets[-1]), "documents": docs.count, **units(docs.sums(-scores.logq), docs)}
    if ref is not None:
        out.update(kl_block(scores, ref, docs))
    out["per_document"] = per_document(scores, ref, docs)
    return out


def paired(current: dict[str, Any], previous: dict[str, Any], docs: Documents) -> dict[str, Any]:
    """The change from `previous` to `current` (two summaries of the same tokens): the
    difference of per-document sums, so both sides of each resample hold the same documents."""
    a, b = current["per_document"], previous["per_document"]
    counts = docs.tokens.astype(np.float64)
    out: dict[str, Any] = {}
    nll = np.array(a["nll"]) - np.array(b["nll"])
    out["bits_per_byte"] = {
        "value": float(nll.sum() / docs.bytes.sum() / math.log(2)),
        "ci": ratio_ci(nll, docs.bytes.astype(np.float64), 1 / math.log(2)),
    }
    for key in ("kl", "same_top1"):
        if key in a and key in b:
            diff = np.array(a[key]) - np.array(b[key])
            out[key] = {"value": float(diff.sum() / counts.sum()), "ci": ratio_ci(diff, counts)}
    return out


def _se(values: np.ndarray) -> float | None:
    n = len(values)
    return float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else None


def _exp(x: float) -> float | None:
    try:
        return math.exp(x)
    except OverflowError:
        return None
