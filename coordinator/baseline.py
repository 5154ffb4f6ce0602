"""The baseline: the full source model evaluated before any agent starts. It is the only
place that loads the source checkpoint with torch, and it runs in the launcher process,
never in the coordinator."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from safetensors.torch import save as save_safetensors_bytes
from transformers import AutoModelForCausalLM, AutoTokenizer

from coordinator.evaluate import generate, prompt_ids, sequence_logits, set_determinism
from coordinator.reassembly import BASELINE_JSON, BASELINE_LOGITS
from sandbox import Sandbox


def record_baseline(box: Sandbox, source_dir: Path, prompt: str, max_new_tokens: int, threads: int) -> dict[str, Any]:
    set_determinism(threads)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(source_dir, local_files_only=True, dtype="auto").eval()
    tokenizer = AutoTokenizer.from_pretrained(source_dir, local_files_only=True)
    load_s = time.perf_counter() - started
    gen = generate(model, tokenizer, prompt, max_new_tokens)
    ids = prompt_ids(tokenizer, prompt)[0].tolist()
    logits = {"prompt": sequence_logits(model, ids).contiguous(),
              "sequence": sequence_logits(model, ids + gen.tokens).contiguous()}
    box.mkdir("baseline")
    box.write_bytes(BASELINE_LOGITS, save_safetensors_bytes(logits))
    record = {"text": gen.text, "tokens": gen.tokens, "seconds": round(gen.seconds, 6), "label": gen.label,
              "prompt_tokens": ids, "load_s": round(load_s, 6), "num_layers": model.config.num_hidden_layers}
    box.write_json(BASELINE_JSON, record)
    return record
