"""Deterministic evaluation of a (partial) model: greedy generation, text labels,
agreement with the baseline and next-token divergence from it."""

from __future__ import annotations

import itertools
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Generation:
    tokens: list[int]  # generated token ids only
    text: str
    seconds: float
    label: str


def set_determinism(threads: int) -> None:
    """Same thread count in every process that must agree bit for bit (baseline vs coordinator)."""
    torch.set_num_threads(threads)
    # The ATen switch of torch.use_deterministic_algorithms, without the ~2 s import of
    # torch._inductor that the public function makes only to set inductor's copy of the flag
    # (fragsim never compiles); the bit-exact tests prove baseline and coordinator still agree.
    torch._C._set_deterministic_algorithms(True, warn_only=True)


def prompt_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    ids: torch.Tensor = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return ids


@torch.inference_mode()
def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> Generation:
    ids = prompt_ids(tokenizer, prompt)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    started = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        pad_token_id=pad,
        num_beams=1,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    seconds = time.perf_counter() - started
    tokens = out[0, ids.shape[1] :].tolist()
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return Generation(tokens, text, seconds, label_text(text, tokens))


@torch.inference_mode()
def sequence_logits(model: Any, ids: list[int]) -> torch.Tensor:
    """Teacher-forced logits over a token sequence, shape [len(ids), vocab], float32."""
    out = model(torch.tensor([ids]), use_cache=False)
    logits: torch.Tensor = out.logits[0].float()
    return logits


@torch.inference_mode()
def residual_stream_stats(model: Any, ids: list[int]) -> list[dict[str, float | int]]:
    """Statistics of the residual stream over all positions and channels of `ids`, one row per
    index 0..k: 0 is what enters decoder layer 0 (the embedding output), i the output of
    decoder layer i-1. Taken with hooks on the decoder layers because HF's
    output_hidden_states applies the final norm to its last entry."""
    layers = getattr(model, model.base_model_prefix).layers
    rows: list[dict[str, float | int]] = []

    def entering(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        rows.append(_stats(0, args[0] if args else kwargs["hidden_states"]))

    def leaving(_module: Any, _args: Any, output: Any) -> None:
        # Some transformers versions return (hidden_states, ...) from a decoder layer.
        rows.append(_stats(len(rows), output[0] if isinstance(output, tuple) else output))

    handles = [layers[0].register_forward_pre_hook(entering, with_kwargs=True)]
    handles += [layer.register_forward_hook(leaving) for layer in layers]
    try:
        # The base model: the stream is all we read, the lm_head would only cost time.
        getattr(model, model.base_model_prefix)(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if len(rows) != len(layers) + 1:
        raise RuntimeError(f"residual stream: {len(rows)} hooked states, expected {len(layers) + 1}")
    return rows


def _stats(index: int, hidden: torch.Tensor) -> dict[str, float | int]:
    x = hidden.double()
    return {
        "index": index,
        "mean": x.mean().item(),
        "std": x.std(correction=0).item(),  # population std: every value of the stream is here
        "min": x.min().item(),
        "max": x.max().item(),
        "rms": x.square().mean().sqrt().item(),
    }


LABELS = ("empty", "whitespace collapse", "repetition loop", "coherent", "other")
COHERENT_MIN_WORDS = 3
COHERENT_WORDLIKE = 0.8  # share of words that are numbers, or letters with a vowel and at most 20 of them
COHERENT_PRINTABLE = 0.95  # share of characters that are printable (no control bytes, no U+FFFD)


def label_text(text: str, tokens: list[int]) -> str:
    """One label from the text alone, checked in order of severity; "coherent" only when the
    text measurably reads as words, and "other" for whatever fits no label."""
    if not text.strip():
        return "empty"
    if _whitespace_collapse(text):
        return "whitespace collapse"
    if _repetition_loop(tokens, text):
        return "repetition loop"
    if _reads_as_words(text):
        return "coherent"
    return "other"


def _reads_as_words(text: str) -> bool:
    printable = sum(1 for c in text if (c.isprintable() or c in "\n\t") and c != "\ufffd")
    words = re.findall(r"[^\W_]+", text)
    if len(words) < COHERENT_MIN_WORDS or printable < COHERENT_PRINTABLE * len(text):
        return False
    wordlike = sum(
        1 for w in words if w.isdigit() or (len(w) <= 20 and (not w.isascii() or re.search("[aeiouyAEIOUY]", w)))
    )
    return wordlike >= COHERENT_WORDLIKE * len(words)


def _whitespace_collapse(text: str) -> bool:
    # Mostly whitespace/punctuation, or long runs of newlines/spaces: the model is emitting filler.
    visible = re.sub(r"\s", "", text)
    words = re.findall(r"\w+", text)
    return (
        len(visible) < 0.35 * len(text) or re.search(r"\s{6,}", text) is not None or (len(words) == 0 and len(text) > 3)
    )


def _repetition_loop(tokens: list[int], text: str) -> bool:
    # A loop: the tail repeats a short cycle, or one n-gram dominates the output.
    n = len(tokens)
    if n < 6:
        return False
    for period in range(1, min(8, n // 3) + 1):
        tail = tokens[-3 * period :]
        if tail == tail[:period] * 3:
            return True
    words = re.findall(r"\w+", text.lower())
    if len(words) >= 6:
        bigrams = Counter(itertools.pairwise(words))
        top = bigrams.most_common(1)[0][1]
        if top >= 3 and top * 2 >= len(words) // 2:
            return True
    return False


def agreement(tokens: list[int], baseline: list[int]) -> dict[str, int]:
    # a partial model may stop early (EOS): compare the positions both have
    same = sum(1 for a, b in zip(tokens, baseline, strict=False) if a == b)
    prefix = 0
    for a, b in zip(tokens, baseline, strict=False):
        if a != b:
            break
        prefix += 1
    return {"agree_tokens": same, "agree_prefix": prefix}


def divergence(logits: torch.Tensor, baseline: torch.Tensor) -> dict[str, float | None]:
    """Mean KL(baseline || partial) and top-1 agreement over teacher-forced positions."""
    base_logp = torch.log_softmax(baseline.double(), dim=-1)
    logp = torch.log_softmax(logits.double(), dim=-1)
    kl = (base_logp.exp() * (base_logp - logp)).sum(-1).mean().item()
    top1 = (logits.argmax(-1) == baseline.argmax(-1)).double().mean().item()
    return {"kl_to_baseline": round(kl, 6) if math.isfinite(kl) else None, "top1_agreement": round(top1, 4)}
