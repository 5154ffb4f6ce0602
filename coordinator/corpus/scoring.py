"""A model's quality on an evaluation corpus, scored the way lm-eval scores perplexity
(`HFLM.loglikelihood_rolling`): every document tokenized on its own without special tokens,
cut into disjoint rolling windows of WINDOW tokens whose first predicts the document's first
token from a prefix token (BOS, else EOS), every token predicted exactly once. Normalised by
the original text's words and bytes, as lm-eval's `word_perplexity`, `byte_perplexity` and
`bits_per_byte` are; tests/test_lm_eval_agreement.py checks the numbers against lm-eval's own.

KL to the full model needs its distribution at every scored token, and 20k tokens x a 49k
vocabulary of float32 is 4 GB, too much to keep in a run. A prefix shares the full model's
lm_head W (the same bytes, checked by digest), so for the full model's distribution p, its
lm_head input n_full and logits z_full, and a checkpoint's z = W n:

    sum_v p_v log q_v = p . z - logsumexp(z) = p . z_full + (W^T p) . (n - n_full) - logsumexp(z)

The baseline keeps per token m = W^T p (float64), n_full (float32) and p . z_full:
KL(p || q) = -H(p) - sum_v p_v log q_v. It is exactly 0 for a checkpoint whose lm_head input is
bit-identical to the full model's (the correction term vanishes and every other float64 operation
repeats the baseline's), and off by ~1e-5 nats per token at most elsewhere.
tests/test_corpus_quality.py compares it with the KL over the whole vocabulary."""

from __future__ import annotations

import ctypes
import gc
import hashlib
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from coordinator.corpus.documents import Corpus
from coordinator.corpus.head_rule import logits_transform

MAX_WINDOW = 2048  # lm-eval's default max_length when a model names none
CHUNK = 64  # positions scored at a time: float64 [CHUNK, vocab] stays ~25 MB for a 49k vocabulary


# glibc's mallopt(M_MMAP_THRESHOLD): blocks at least this large are mapped and unmapped on their
# own. By default the threshold adapts upwards to 32 MB, so the 25-150 MB tensors of scoring came
# from the heap and stayed there: 5 GB resident for 24 Lee documents, against 1 GB with this.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 4 * 2**20


def return_large_blocks() -> None:
    """Make freed large tensors go back to the system (glibc only; elsewhere nothing to do)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator has its own policy


def count_words(doc: str) -> int:
    """lm-eval's word count (`Task.count_words`): pieces of re.split on runs of whitespace."""
    return len(re.split(r"\s+", doc))


def count_bytes(doc: str) -> int:
    return len(doc.encode("utf-8"))


def document_tokens(tokenizer: Any, doc: str) -> list[int]:
    """The document as lm-eval's HFLM encodes it for a causal LM: no special tokens."""
    ids: list[int] = tokenizer.encode(doc, add_special_tokens=False)
    if not ids:
        raise ValueError(f"document {doc[:40]!r}: no tokens, expected text")
    return ids


def prefix_token(tokenizer: Any) -> int:
    """What the first token of a document is predicted from (HFLM.prefix_token_id)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("tokenizer: no BOS and no EOS token, expected one to predict a document's first token from")
    return int(token)


def window_size(config: Any) -> int:
    positions = getattr(config, "max_position_embeddings", None)
    return min(MAX_WINDOW, positions) if isinstance(positions, int) and positions > 1 else MAX_WINDOW


@dataclass(frozen=True)
class Window:
    inputs: list[int]  # one forward pass
    targets: list[int]  # predicted by the last len(targets) positions of inputs, in order


def rolling_windows(tokens: Sequence[int], prefix: int, size: int) -> list[Window]:
    """lm-eval's get_rolling_token_windows(context_len=1) + make_disjoint_window, as HFLM feeds
    them to the model: the first window is [prefix] + tokens[:size - 1]; each later one ends at
    the last token it predicts and is filled from the left with earlier tokens as context."""
    if size < 1:
        raise ValueError(f"window of {size} tokens, expected at least 1")
    tokens = list(tokens)
    first = min(size, len(tokens))
    out = [Window([prefix, *tokens[: first - 1]], tokens[:first])] if tokens else []
    done = first
    while done < len(tokens):
        take = min(len(tokens) - done, size)
        end = done + take
        out.append(Window(tokens[max(0, end - size - 1) : end - 1], tokens[end - take : end]))
        done = end
    return out


def protocol(corpus: Corpus, prefix: int, prefix_text: str, size: int) -> dict[str, Any]:
    """The scoring protocol by name, for results.json and the report."""
    return {
        "scoring": "lm-eval loglikelihood_rolling (HFLM)",
        "corpus": corpus.identity(),
        "window": size,
        "prefix_token": prefix,
        "prefix_token_text": prefix_text,
        "add_special_tokens": False,
        "positions": "every token of every eval document, once: disjoint rolling windows, "
        "the first token predicted from the prefix token",
        "words": "len(re.split(r'\\s+', document))",
        "bytes": "len(document.encode('utf-8'))",
    }


# ---- scoring a model -------------------------------------------------------------------------


@dataclass
class TokenScores:
    """Per scored token, over every eval document in order (doc_offsets bound each document)."""

    logq: np.ndarray  # float64: log q(target)
    argmax: np.ndarray | None  # int64: the model's most likely token (None: no defined argmax, uniform)
    cross: np.ndarray | None  # float64: sum_v p_v log q_v against the full model, when known


def lm_head_of(model: Any) -> torch.nn.Linear:
    """The output projection, refused unless logits are a plain bias-free W n (what the KL
    shortcut relies on)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise ValueError(f"lm_head {type(head).__name__}: expected a bias-free nn.Linear (logits = W h)")
    transform = logits_transform(model.config)
    if transform is not None:
        raise ValueError(f"config {transform}: expected logits that are lm_head(h) alone")
    return head


def head_digest(model: Any) -> str:
    """sha256 of the lm_head weight's bytes: the KL shortcut needs the full model's W."""
    weight = lm_head_of(model).weight.detach().contiguous()
    return hashlib.sha256(weight.view(torch.uint8).numpy().tobytes()).hexdigest()


@contextmanager
def _head_inputs(model: Any) -> Iterator[list[torch.Tensor]]:
    seen: list[torch.Tensor] = []
    handle = lm_head_of(model).register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


@torch.inference_mode()
def forward_windows(model: Any, windows: list[Window]) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """(logits, lm_head inputs, targets) of the scored positions of each window, float32."""
    with _head_inputs(model) as seen:
        for w in windows:
            seen.clear()
            logits = model(torch.tensor([w.inputs]), use_cache=False).logits[0].float()
            n = len(w.targets)
            yield logits[-n:], seen[-1][0, -n:].float(), w.targets
            # Each window's tensors (logits alone are tokens x vocab x 4 bytes) end up in reference
            # cycles that Python's collector, counting objects and not bytes, reaches too late:
            # without this the baseline held 1.6 MB per corpus token (37 GB for the Lee eval set).
            del logits
            gc.collect()


@torch.inference_mode()
def score_model(
    model: Any, documents: list[list[int]], prefix: int, size: int, ref: Reference | None = None
) -> TokenScores:
    """Score `model` on the tokenized documents; with the full model's reference also the cross
    term sum_v p_v log q_v of KL to it."""
    return_large_blocks()
    logq, argmax, cross = [], [], []
    pz = torch.from_numpy(ref.pz) if ref is not None else None
    at = 0
    for doc in documents:
        for logits, hidden, targets in forward_windows(model, rolling_windows(doc, prefix, size)):
            target = torch.tensor(targets)
            for s in range(0, len(targets), CHUNK):
                z = logits[s : s + CHUNK].double()
                lse = torch.logsumexp(z, dim=-1)
                logq.append((z.gather(-1, target[s : s + CHUNK, None])[:, 0] - lse).numpy())
                argmax.append(z.argmax(-1).numpy())
                if ref is not None and pz is not None:
                    rows = slice(at + s, at + s + len(z))
                    shift = hidden[s : s + CHUNK].double() - ref.n[rows].double()
                    cross.append((pz[rows] + (ref.m[rows] * shift).sum(-1) - lse).numpy())
            at += len(targets)
    return TokenScores(np.concatenate(logq), np.concatenate(argmax), np.concatenate(cross) if ref is not None else None)


# ---- the full model's reference, and the floors it is measured against --------------------------


@dataclass
class Reference:
    """The full model at every scored token: what each checkpoint is compared with."""

    logp: np.ndarray  # float64: log p(target)
    entropy: np.ndarray  # float64: H(p) = logsumexp(z_full) - p . z_full, nats
    top1: np.ndarray  # int64: argmax p
    pz: np.ndarray  # float64: p . z_full
    m: torch.Tensor  # float64 [tokens, hidden]: W^T p
    n: torch.Tensor  # float32 [tokens, hidden]: the full model's lm_head input

    def tensors(self) -> dict[str, torch.Tensor]:
        arrays = {"logp": self.logp, "entropy": self.entropy, "top1": self.top1, "pz": self.pz}
        tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
        return tensors | {"m": self.m.contiguous(), "n": self.n.contiguous()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> Reference:
        return cls(t["logp"].numpy(), t["entropy"].numpy(), t["top1"].numpy(), t["pz"].numpy(), t["m"], t["n"])


def unigram_logprobs(fit: list[list[int]], vocab: int) -> torch.Tensor:
    """log of add-one (Laplace) smoothed unigram frequencies over the fit set's tokens: a model
    that knows the corpus's word frequencies and nothing else."""
    counts = torch.zeros(vocab, dtype=torch.float64)
    for doc in fit:
        counts += torch.bincount(torch.tensor(doc), minlength=vocab).double()[:vocab]
    return torch.log((counts + 1.0) / (counts.sum() + vocab))


@torch.inference_mode()
def reference_and_floors(
    model: Any,
    documents: list[list[int]],
    fit: list[list[int]],
    prefix: int,
    size: int,
    on_document: Callable[[int], None] | None = None,
) -> tuple[Reference, dict[str, TokenScores], TokenScores]:
    """One pass of the full model: its reference, the floors scored against it (uniform, the
    unigram fitted on `fit`, the embeddings-only lens k = 0: the final norm and lm_head applied
    to the embeddings) and the full model's own scores. `on_document(done)` after each document."""
    return_large_blocks()
    head = lm_head_of(model)
    base = getattr(model, model.base_model_prefix)
    weight = head.weight.detach().double()  # m in float32 was off by up to 2e-3 nats per token
    vocab = weight.shape[0]
    log_unigram = unigram_logprobs(fit, vocab)
    entering: list[torch.Tensor] = []
    hook = base.layers[0].register_forward_pre_hook(
        lambda _m, args, kwargs: entering.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    parts: dict[str, list[np.ndarray]] = {
        key: []
        for key in ("logp", "entropy", "top1", "pz", "m", "n", "u_logq", "u_cross", "e_logq", "e_arg", "e_cross")
    }
    try:
        for done, doc in enumerate(documents, 1):
            for logits, hidden, targets in forward_windows(model, rolling_windows(doc, prefix, size)):
                n = len(targets)
                lens = head(base.norm(entering[-1][0, -n:])).float()  # k = 0: no decoder layer at all
                entering.clear()
                # Not bit-equal: a matmul over a slice may block differently from the whole.
                if not torch.allclose(head(hidden), logits, rtol=1e-4, atol=1e-4):
                    raise ValueError(
                        "the model's logits differ from lm_head(its last hidden state): expected logits = W h"
                    )
                target = torch.tensor(targets)
                for s in range(0, n, CHUNK):
                    # The same float64 operations as score_model's, so that a bit-identical
                    # checkpoint repeats them exactly and its KL is 0.
                    z = logits[s : s + CHUNK].double()
                    lse = torch.logsumexp(z, dim=-1)
                    logp = z - lse[:, None]
                    p = logp.exp()
                    pz = (p * z).sum(-1)
                    t = target[s : s + CHUNK, None]
                    parts["logp"].append(logp.gather(-1, t)[:, 0].numpy())
                    parts["entropy"].append((lse - pz).numpy())
                    parts["pz"].append(pz.numpy())
                    parts["top1"].append(z.argmax(-1).numpy())
                    parts["m"].append((p @ weight).numpy())
                    parts["n"].append(hidden[s : s + CHUNK].numpy())
                    parts["u_logq"].append(log_unigram[t[:, 0]].numpy())
                    parts["u_cross"].append((p @ log_unigram).numpy())
                    lens_logq = torch.log_softmax(lens[s : s + CHUNK].double(), dim=-1)
                    parts["e_logq"].append(lens_logq.gather(-1, t)[:, 0].numpy())
                    parts["e_arg"].append(lens_logq.argmax(-1).numpy())
                    parts["e_cross"].append((p * lens_logq).sum(-1).numpy())
            if on_document is not None:
                on_document(done)
    finally:
        hook.remove()
    cat: dict[str, np.ndarray] = {key: np.concatenate(value) for key, value in parts.items()}
    ref = Reference(
        cat["logp"], cat["entropy"], cat["top1"], cat["pz"], torch.from_numpy(cat["m"]), torch.from_numpy(cat["n"])
    )
    tokens = len(ref.logp)
    floors = {
        "uniform": TokenScores(np.full(tokens, -math.log(vocab)), None, np.full(tokens, -math.log(vocab))),
        "unigram": TokenScores(
            cat["u_logq"], np.full(tokens, int(log_unigram.argmax().item()), dtype=np.int64), cat["u_cross"]
        ),
        "embeddings": TokenScores(cat["e_logq"], cat["e_arg"], cat["e_cross"]),
    }
    # The full model against itself: its cross term is p . z_full - logsumexp(z_full) = -H(p).
    full = TokenScores(ref.logp.copy(), ref.top1.copy(), -ref.entropy)
    return ref, floors, full


def tokenize_corpus(tokenizer: Any, docs: Sequence[str]) -> list[list[int]]:
    return [document_tokens(tokenizer, d) for d in docs]
