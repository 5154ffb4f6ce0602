"""The run report's eval-corpus section (--eval-corpus): lm-eval's units and llama.cpp's KL
block per checkpoint, between the floors (uniform, unigram, embeddings only) and the full model."""

from __future__ import annotations

from typing import Any

from coordinator.report import figures as F
from coordinator.report.page import Page
from coordinator.results import CORPUS_HEADERS, corpus_rows, protocol_line


def corpus_section(page: Page, r: dict[str, Any], prefix: str) -> None:
    corpus = r.get("corpus")
    points = [{"layers": c["layers"], **c["corpus"]} for c in r.get("checkpoints") or [] if c.get("corpus")]
    if not corpus or not points:
        return
    page.section(f"{prefix}-corpus", "Quality on the eval corpus, against the floors")
    tuned = [
        {"layers": c["layers"], **c["corpus"]["tuned"]} for c in r["checkpoints"] if "tuned" in c.get("corpus", {})
    ]
    fig = F.corpus_quality(points, corpus.get("floors") or {}, corpus.get("full"), tuned=tuned)
    page.figure(
        f"{prefix}-corpus",
        F.to_svg(fig),
        "Left: bits per byte of each checkpoint (lm-eval's unit, so models with other tokenizers compare), with 95 % "
        "intervals from a bootstrap over documents, against the floors as lines: a uniform guess over the vocabulary, "
        "a unigram fitted on the disjoint fit set, and the embeddings alone through the final norm and lm_head "
        "(k = 0); the full model dashed. Right: mean KL(full ‖ checkpoint) per token with its interval and the 99th "
        "percentile of the per-token KL (llama.cpp's tail), the floors' mean KL as lines; log scales. A checkpoint "
        "above a floor predicts worse than that floor."
        + (" Vermillion squares: the same prefixes through the model's tuned lens." if tuned else "")
        + " "
        + protocol_line(corpus["protocol"]),
    )
    page.table(
        CORPUS_HEADERS,
        corpus_rows(r),
        caption="llama.cpp's KL block (`llama-perplexity --kl-divergence`; ± is its SE over tokens) and lm-eval's "
        "units per checkpoint, between the floors and the full model.",
    )
