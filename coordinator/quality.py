"""Language-modelling quality of a model on a held-out text: the one place where
cross-entropy and perplexity are defined (per checkpoint, in the baseline, in ablations),
and where a partial model's next-token distributions are compared with the full model's.

torch is imported only where tensors are computed: the launcher checks --eval-text with
this module before anything, torch included, is loaded."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DEFAULT_EVAL_TEXT = Path(__file__).parent / "data" / "eval_text.txt"  # provenance: data/README.md
MIN_EVAL_TOKENS = 16  # fewer scored positions than this measure nothing
# A longer text is cut here: the cost of one teacher-forced pass per checkpoint stays bounded
# (the shipped text is 356 SmolLM2 tokens, so it is scored whole).
MAX_EVAL_TOKENS = 1024


def read_eval_text(path: str | Path | None = None) -> str:
    """The eval text at `path` (the shipped one by default), refused when it is empty."""
    source = Path(path) if path is not None else DEFAULT_EVAL_TEXT
    text = source.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"eval text {source}: empty, expected natural-language text")
    return text


def eval_ids(tokenizer: Any, text: str, limit: int | None = None) -> list[int]:
    """Token ids of `text` as the model sees it (no chat template; BOS only if the tokenizer adds one)."""
    ids: list[int] = tokenizer(text)["input_ids"]
    if limit is not None:
        ids = ids[:limit]
    if len(ids) < MIN_EVAL_TOKENS + 1:
        raise ValueError(f"eval text: {len(ids)} tokens, expected at least {MIN_EVAL_TOKENS + 1}")
    return ids


def eval_limit(config: Any) -> int:
    """How many eval tokens a model with this config scores: MAX_EVAL_TOKENS, or fewer when the
    model has fewer positions (baseline and checkpoints share the config, so the same ids)."""
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and not isinstance(positions, bool) and positions > 0:
        return min(MAX_EVAL_TOKENS, positions)
    return MAX_EVAL_TOKENS


def token_cross_entropy(logits: torch.Tensor, ids: list[int]) -> float:
    """Mean next-token cross-entropy in nats/token: `logits` [len(ids), vocab] teacher-forced
    over `ids`; position t predicts ids[t + 1], so len(ids) - 1 positions are scored."""
    return _cross_entropy(_scored_log_probs(logits, ids), ids)


def _scored_log_probs(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    import torch

    if logits.shape[0] != len(ids):
        raise ValueError(f"logits for {logits.shape[0]} positions, expected {len(ids)}")
    # float64: a KL of nearly equal distributions is a small difference of large sums
    return torch.log_softmax(logits[:-1].double(), dim=-1)


def _cross_entropy(logp: torch.Tensor, ids: list[int]) -> float:
    import torch

    target = torch.tensor(ids[1:]).unsqueeze(-1)
    return float(-logp.gather(-1, target).mean().item())


def perplexity(ce: float) -> float:
    """exp(cross-entropy in nats/token); inf when it overflows."""
    try:
        return math.exp(ce)
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class FullReference:
    """The full model's next-token distributions over the eval text, prepared once per run:
    every checkpoint is compared with them."""

    probs: torch.Tensor  # float64 [scored positions, vocab]
    plogp: torch.Tensor  # float64 [scored positions]: sum of p log p, minus the entropy
    top1: torch.Tensor  # [scored positions]: the full model's most likely next token
    shape: tuple[int, ...]  # of the logits it was made from


def full_reference(full: torch.Tensor, ids: list[int]) -> FullReference:
    logp = _scored_log_probs(full, ids)
    probs = logp.exp()
    return FullReference(probs, _expected(probs, logp), logp.argmax(-1), tuple(full.shape))


def _expected(probs: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    import torch

    # One pass, no [positions, vocab] temporary: this is the per-checkpoint cost of the KL.
    return torch.einsum("tv,tv->t", probs, logp)


def text_quality(
    logits: torch.Tensor, ids: list[int], full: torch.Tensor | FullReference | None = None
) -> dict[str, Any]:
    """A model's quality on the eval text from its teacher-forced `logits` over `ids`:
    {tokens, ce, ppl}, and with the full model's logits over the same ids (or their
    FullReference) also kl = mean KL(full || this) and top1 = share of positions whose argmax
    agrees, both over the same len(ids) - 1 scored positions. A value that is not finite is
    None (JSON has no inf)."""
    logp = _scored_log_probs(logits, ids)
    ce = _cross_entropy(logp, ids)
    out: dict[str, Any] = {"tokens": len(ids) - 1, "ce": _finite(ce), "ppl": _finite(perplexity(ce))}
    if full is None:
        return out
    ref = full if isinstance(full, FullReference) else full_reference(full, ids)
    if ref.shape != tuple(logits.shape):
        raise ValueError(f"full model's eval logits of shape {ref.shape}, expected {tuple(logits.shape)}")
    # KL(p || q) = sum p log p - sum p log q. For the full model itself both sums are the same
    # computation on the same bits, so its kl is exactly 0.0.
    kl = float((ref.plogp - _expected(ref.probs, logp)).mean().item())
    top1 = float((logp.argmax(-1) == ref.top1).double().mean().item())
    out.update(kl=_finite(kl), top1=top1)
    return out


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
