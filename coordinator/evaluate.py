"""Deterministic evaluation of a (partial) model: greedy generation, text labels,
agreement with the baseline and next-token divergence from it."""

from __future__ import annotations

import itertools
import math
import re
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from coordinator.massive import massive_bar
from protocol.digest import digest


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
def residual_stream_stats(model: Any, ids: list[int]) -> list[dict[str, Any]]:
    """Statistics of the residual stream on `ids`, one row per index 0..k: 0 is what enters
    decoder layer 0 (the embedding output), i the output of decoder layer i-1. Taken with hooks
    on the decoder layers because HF's output_hidden_states applies the final norm to its last
    entry, so row k is what enters the final norm. Each row is `hidden_state_stats`."""
    return [hidden_state_stats(state, i) for i, state in enumerate(residual_stream(model, ids))]


@contextmanager
def hooked_residuals(model: Any) -> Iterator[list[torch.Tensor]]:
    """While the block runs, every forward pass appends the residual stream to the yielded list
    ([1, positions, hidden] each): what enters decoder layer 0, then what leaves each layer. Hooks
    on the layers, because HF's output_hidden_states applies the final norm to its last entry."""
    layers = getattr(model, model.base_model_prefix).layers
    states: list[torch.Tensor] = []

    def entering(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        states.append(args[0] if args else kwargs["hidden_states"])

    def leaving(_module: Any, _args: Any, output: Any) -> None:
        # Some transformers versions return (hidden_states, ...) from a decoder layer.
        states.append(output[0] if isinstance(output, tuple) else output)

    handles = [layers[0].register_forward_pre_hook(entering, with_kwargs=True)]
    handles += [layer.register_forward_hook(leaving) for layer in layers]
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def residual_stream(model: Any, ids: list[int]) -> list[torch.Tensor]:
    """The residual stream of one pass over `ids`: num_layers + 1 states (hooked_residuals)."""
    base = getattr(model, model.base_model_prefix)
    with hooked_residuals(model) as states:
        # The base model: the stream is all we read, the lm_head would only cost time.
        base(input_ids=torch.tensor([ids]), use_cache=False)
    if len(states) != len(base.layers) + 1:
        raise RuntimeError(f"residual stream: {len(states)} hooked states, expected {len(base.layers) + 1}")
    return list(states)


TOP_K = 3  # the top |a| entries a row names, as in their layer-wise plots


def hidden_state_stats(hidden: torch.Tensor, index: int = 0) -> dict[str, Any]:
    """One residual-stream row of a [1, positions, channels] hidden state. Over all positions:
    mean, std (population), min, max, rms, `median_abs` (the lower median of |a|, as
    torch.median gives it), `top` (the TOP_K largest |a|, each {abs, value, position, dim}),
    `max_over_median` (top |a| / median |a|; None when the median is 0), `massive` (Sun et
    al.'s rule, coordinator.massive: top |a| > 100 and > 1000 x median |a|) and `massive_entries`
    (how many entries pass it), `top_share_of_squares` (top |a|^2 / sum of a^2: the share of
    the rms that one entry is). `without_first` holds the same keys over positions 1.. (their
    positions keep their numbers), or None for a one-token input: massive activations sit on
    the first token, so the two views tell them apart from the rest of the stream."""
    if hidden.dim() != 3 or hidden.shape[0] != 1:
        raise ValueError(f"hidden state of shape {tuple(hidden.shape)}: expected [1, positions, channels]")
    x = hidden[0].double()
    row: dict[str, Any] = {"index": index, **_magnitudes(x, 0)}
    row["without_first"] = _magnitudes(x[1:], 1) if x.shape[0] > 1 else None
    return row


def _magnitudes(x: torch.Tensor, first_position: int) -> dict[str, Any]:
    """`hidden_state_stats`' keys over x [positions, channels], whose row 0 is `first_position`."""
    flat = x.flatten()
    magnitude = flat.abs()
    median = magnitude.median().item()
    values, where = magnitude.topk(min(TOP_K, flat.numel()))
    channels = x.shape[1]
    top = [
        {"abs": v, "value": flat[i].item(), "position": first_position + i // channels, "dim": i % channels}
        for v, i in zip(values.tolist(), where.tolist(), strict=True)
    ]
    peak = top[0]["abs"]
    bar = massive_bar(median)
    return {
        "mean": flat.mean().item(),
        "std": flat.std(correction=0).item(),  # population std: every value of the stream is here
        "min": flat.min().item(),
        "max": flat.max().item(),
        "rms": flat.square().mean().sqrt().item(),
        "median_abs": median,
        "top": top,
        "max_over_median": peak / median if median > 0 else None,
        "massive": peak > bar,
        "massive_entries": int((magnitude > bar).sum().item()),
        # How much of std/rms the single largest entry is: near 1, those figures describe it alone.
        "top_share_of_squares": peak**2 / total if (total := flat.square().sum().item()) > 0 else None,
    }


# The hand-made norm may round differently from the module's kernel (a fused LayerNorm does):
# it passes within this many units of the model dtype's epsilon, relative to the largest output.
NORM_CHECK_ULPS = 8.0


@torch.inference_mode()
def final_norm_check(model: Any, ids: list[int]) -> dict[str, Any]:
    """Hook the model's final norm on `ids` and recompute it by hand from the module's own
    weight and eps on the input it received (the model's own last hidden state, so a prefix
    is normalised on its own statistics, not the full model's). `max_abs_diff` is the largest
    |module output - hand-made|, `ok` whether it is within `tolerance`; `input_rms` is the
    input's rms as `hidden_state_stats` computes it (it equals the last residual row's),
    `weight_digest` the BLAKE3 of the weight's bytes (the plan's digest of that tensor)."""
    base = getattr(model, model.base_model_prefix)
    name, norm = _final_norm(base)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = norm.register_forward_hook(lambda _m, args, output: seen.append((args[0], output)))
    try:
        base(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise RuntimeError(f"final norm {name}: called {len(seen)} times in one forward pass, expected once")
    x, output = seen[0]
    kind, eps, expected = _norm_by_hand(norm, x)
    diff = (output.double() - expected.double()).abs().max().item()
    tolerance = NORM_CHECK_ULPS * torch.finfo(output.dtype).eps * max(1.0, output.double().abs().max().item())
    weight = norm.weight.detach().contiguous()
    return {
        "module": f"{model.base_model_prefix}.{name}",
        "kind": kind,
        "eps": eps,
        "weight_name": f"{model.base_model_prefix}.{name}.weight",
        "weight_digest": digest(weight.view(torch.uint8).numpy().tobytes()),
        "positions": int(x.shape[-2]),
        "input_rms": x.double().flatten().square().mean().sqrt().item(),
        "max_abs_diff": diff,
        "tolerance": tolerance,
        "ok": diff <= tolerance,
    }


def _final_norm(base: Any) -> tuple[str, Any]:
    # Llama, Mistral, Qwen, Phi-3 and Gemma 2 call it `norm`; GPT-NeoX `final_layer_norm`.
    for name in ("norm", "final_layer_norm"):
        module = getattr(base, name, None)
        if isinstance(module, torch.nn.Module):
            return name, module
    raise ValueError(f"{type(base).__name__}: no final norm, expected a module named norm or final_layer_norm")


def _norm_by_hand(norm: Any, x: torch.Tensor) -> tuple[str, float, torch.Tensor]:
    """(kind, eps, the norm of x) from the module's parameters, in the module's own order of operations."""
    if isinstance(norm, torch.nn.LayerNorm):
        x32 = x.float()
        centred = x32 - x32.mean(-1, keepdim=True)
        y = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps)
        bias = norm.bias.float() if norm.bias is not None else 0.0
        return "layernorm", float(norm.eps), (y * norm.weight.float() + bias).to(x.dtype)
    if hasattr(norm, "variance_epsilon"):  # Llama's RMSNorm: normalise in float32, scale in the input dtype
        x32 = x.to(torch.float32)
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return "rmsnorm", float(norm.variance_epsilon), norm.weight * y.to(x.dtype)
    if type(norm).__name__.startswith("Gemma") and hasattr(norm, "eps"):  # scales by 1 + weight, in float32
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)
        return "rmsnorm (1 + weight)", float(norm.eps), (y * (1.0 + norm.weight.float())).type_as(x)
    raise ValueError(
        f"final norm {type(norm).__name__}: unknown kind, expected an RMSNorm with variance_epsilon, "
        "a Gemma RMSNorm or a LayerNorm"
    )


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
