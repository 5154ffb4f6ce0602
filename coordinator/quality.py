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
# The full model's float32 logits over the eval text are kept by the baseline and the
# coordinator: tokens x vocab x 4 bytes stays within this (512 tokens for SmolLM2's 49,152
# vocabulary, 196 for a 128,256 one).
EVAL_LOGITS_BUDGET = 96 * 2**20


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
    model has fewer positions or the logits would exceed EVAL_LOGITS_BUDGET (baseline and
    checkpoints share the config, so they score the same ids)."""
    limit = MAX_EVAL_TOKENS
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and not isinstance(positions, bool) and positions > 0:
        limit = min(limit, positions)
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0:
        limit = min(limit, max(MIN_EVAL_TOKENS + 1, EVAL_LOGITS_BUDGET // (4 * vocab)))
    return limit


# Positions scored at a time: float64 distributions of [positions, vocab] are 0.4 MB per
# position for a 49k vocabulary, so a whole text at once would cost the coordinator ~0.6 GB.
CHUNK_POSITIONS = 32


def token_cross_entropy(logits: torch.Tensor, ids: list[int]) -> float:
    """Mean next-token cross-entropy in nats/token: `logits` [len(ids), vocab] teacher-forced
    over `ids`; position t predicts ids[t + 1], so len(ids) - 1 positions are scored."""
    ce = text_quality(logits, ids)["ce"]
    return math.inf if ce is None else float(ce)


def perplexity(ce: float) -> float:
    """exp(cross-entropy in nats/token); inf when it overflows."""
    try:
        return math.exp(ce)
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class FullReference:
    """The full model's teacher-forced logits over the eval text and its most likely next
    tokens: every checkpoint is compared with them."""

    logits: torch.Tensor  # float32 [len(ids), vocab], as the baseline recorded them
    top1: torch.Tensor  # [len(ids) - 1]: the full model's argmax at each scored position


def full_reference(full: torch.Tensor, ids: list[int]) -> FullReference:
    _check_positions(full, ids)
    return FullReference(full, full[:-1].argmax(-1))


def _check_positions(logits: torch.Tensor, ids: list[int]) -> None:
    if logits.shape[0] != len(ids):
        raise ValueError(f"logits for {logits.shape[0]} positions, expected {len(ids)}")


def text_quality(
    logits: torch.Tensor, ids: list[int], full: torch.Tensor | FullReference | None = None
) -> dict[str, Any]:
    """A model's quality on the eval text from its teacher-forced `logits` over `ids`:
    {tokens, ce, ppl, entropy} (entropy: of its own next-token distribution, nats, mean over
    positions), and with the full model's logits over the same ids (or their
    FullReference) also kl = mean KL(full || this) and top1 = share of positions whose argmax
    agrees, both over the same len(ids) - 1 scored positions. A value that is not finite is
    None (JSON has no inf)."""
    import torch

    _check_positions(logits, ids)
    ref = full if isinstance(full, FullReference) or full is None else full_reference(full, ids)
    if ref is not None and tuple(ref.logits.shape) != tuple(logits.shape):
        raise ValueError(f"full model's eval logits of shape {tuple(ref.logits.shape)}, expected {tuple(logits.shape)}")
    targets = torch.tensor(ids[1:]).unsqueeze(-1)
    scored = len(ids) - 1
    nll = kl = entropy = 0.0
    agree = 0
    for s in range(0, scored, CHUNK_POSITIONS):
        e = min(scored, s + CHUNK_POSITIONS)
        # float64: a KL of nearly equal distributions is a small difference of large sums
        logp = torch.log_softmax(logits[s:e].double(), dim=-1)
        nll -= float(logp.gather(-1, targets[s:e]).sum().item())
        probs = logp.exp()
        entropy -= float(torch.special.xlogy(probs, probs).sum().item())  # 0 log 0 = 0
        if ref is not None:
            full_logp = torch.log_softmax(ref.logits[s:e].double(), dim=-1)
            # The full model against itself: the same bits on both sides, so exactly 0.0.
            kl += float((full_logp.exp() * (full_logp - logp)).sum().item())
            agree += int((logp.argmax(-1) == ref.top1[s:e]).sum().item())
    ce = nll / scored
    out: dict[str, Any] = {
        "tokens": scored,
        "ce": _finite(ce),
        "ppl": _finite(perplexity(ce)),
        "entropy": _finite(entropy / scored),
    }
    if ref is not None:
        out.update(kl=_finite(kl / scored), top1=agree / scored)
    return out


def uniform_kl(entropy: float, vocab_size: int) -> float:
    """KL(full || uniform) = ln V - H(full): what a model that knows nothing (a uniform guess)
    costs against the full model, whose mean next-token entropy is `entropy`."""
    return math.log(vocab_size) - entropy


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
