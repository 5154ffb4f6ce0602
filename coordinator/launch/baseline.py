"""The baseline: the full source model evaluated before any agent starts. It is the only
place that loads the source checkpoint with torch, and it runs in the launcher process,
never in the coordinator."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import save as save_safetensors_bytes
from transformers import AutoModelForCausalLM, AutoTokenizer

from coordinator.corpus.documents import LEE, Corpus, read_corpus
from coordinator.corpus.in_run import read_run_corpus, record_corpus_baseline
from coordinator.evaluate import generate, prompt_ids, residual_stream_stats, sequence_logits, set_determinism
from coordinator.floors import text_floors
from coordinator.quality import eval_ids, eval_limit, text_quality
from protocol.errors import PlanError
from protocol.run_settings import DEFAULT_PROBE
from sandbox import Sandbox
from sandbox.layout import BASELINE_DIR, BASELINE_JSON, BASELINE_LOGITS, EVAL_TEXT


class SourceModel:
    """The full source model, loaded once; `record` is timed separately so that the launcher
    can load while the coordinator starts and measure once the machine is quiet."""

    def __init__(self, source_dir: Path, threads: int) -> None:
        set_determinism(threads)
        started = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(source_dir, local_files_only=True, dtype="auto").eval()
        self.tokenizer = AutoTokenizer.from_pretrained(source_dir, local_files_only=True)
        self.load_s = time.perf_counter() - started

    def record(
        self,
        box: Sandbox,
        prompt: str,
        max_new_tokens: int,
        probe: str = DEFAULT_PROBE,
        report: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        return record_baseline(
            box, self.model, self.tokenizer, prompt, max_new_tokens, self.load_s, probe=probe, report=report
        )


def record_baseline(
    box: Sandbox,
    model: Any,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int,
    load_s: float = 0.0,
    *,
    probe: str = DEFAULT_PROBE,
    report: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Generate, then score the run's copy of the eval text and the probe's residual stream:
    every checkpoint is compared with what this records. `report`: progress in words."""
    generate(model, tokenizer, prompt, 2)  # warm-up: first calls pay one-off kernel setup
    gen = generate(model, tokenizer, prompt, max_new_tokens)
    ids = prompt_ids(tokenizer, prompt)[0].tolist()
    scored = eval_ids(tokenizer, box.read_bytes(EVAL_TEXT).decode("utf-8"), eval_limit(model.config))
    started = time.perf_counter()
    eval_logits = sequence_logits(model, scored)
    quality = text_quality(eval_logits, scored)
    hidden_states = residual_stream_stats(model, prompt_ids(tokenizer, probe)[0].tolist())
    quality_s = time.perf_counter() - started
    floors = text_floors(model, tokenizer, scored, eval_logits, _unigram_fit(box))
    logits = {
        "prompt": sequence_logits(model, ids).contiguous(),
        "sequence": sequence_logits(model, ids + gen.tokens).contiguous(),
        "eval": eval_logits.contiguous(),  # float32 [eval tokens, vocab]: the reference of kl and top1
    }
    box.mkdir(BASELINE_DIR)
    box.write_bytes(BASELINE_LOGITS, save_safetensors_bytes(logits))
    record = {
        "text": gen.text,
        "tokens": gen.tokens,
        "seconds": round(gen.seconds, 6),
        "label": gen.label,
        "prompt_tokens": ids,
        "load_s": round(load_s, 6),
        "num_layers": model.config.num_hidden_layers,
        "quality": quality,
        "quality_s": round(quality_s, 6),
        "quality_floors": floors,
        "hidden_states": hidden_states,
    }
    corpus = record_corpus_baseline(box, model, tokenizer, report)
    if corpus is not None:
        record["corpus"] = corpus
    box.write_json(BASELINE_JSON, record)
    return record


def _unigram_fit(box: Sandbox) -> Corpus | None:
    """The corpus whose fit set the eval text's unigram floor is fitted on: the run's own
    (--eval-corpus), else the Lee corpus when it is installed, else none (no unigram floor)."""
    corpus = read_run_corpus(box)
    if corpus is not None:
        return corpus
    try:
        return read_corpus(LEE)
    except PlanError:
        return None
