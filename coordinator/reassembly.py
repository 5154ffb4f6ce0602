"""Reassemble the longest contiguous prefix on every growth and evaluate it; at the end,
check the final checkpoint against the source: digests, logits, tokens."""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file as load_safetensors_file

from coordinator.corpus.in_run import CorpusScorer, read_run_corpus
from coordinator.evaluate import (
    agreement,
    divergence,
    final_norm_check,
    generate,
    prompt_ids,
    residual_stream_stats,
    sequence_logits,
    set_determinism,
)
from coordinator.events import Reassemble
from coordinator.lens import TunedLens, lensed
from coordinator.live_model import LiveModel
from coordinator.quality import FullReference, eval_ids, eval_limit, full_reference, text_quality
from coordinator.snapshot import write_snapshot
from coordinator.store import FragmentStore
from protocol.layers import layer_of
from protocol.plan import WEIGHTS_FILE, Plan
from protocol.run_settings import RunSettings
from sandbox import Sandbox
from sandbox.layout import BASELINE_JSON, BASELINE_LENS, BASELINE_LOGITS, EVAL_TEXT, committed_dir


class Reassembler:
    """The model side of the coordinator. It runs in the model worker, one job at a time in
    arrival order; it neither logs nor reports (the loop does, from what it returns)."""

    def __init__(self, box: Sandbox, plan: Plan, settings: RunSettings) -> None:
        self.box, self.plan, self.settings = box, plan, settings
        set_determinism(settings.threads)
        self.live = LiveModel(plan.model["config"])
        self.checkpoints: list[dict[str, Any]] = []
        self.gap_checkpoints: list[dict[str, Any]] = []  # --reassembly gaps
        self._baseline: dict[str, Any] | None = None
        self._eval_ids: list[int] | None = None
        self._eval_reference: FullReference | None = None
        self._corpus: CorpusScorer | bool | None = False  # False: not looked for yet
        self._lens: TunedLens | bool | None = False

    @property
    def baseline(self) -> dict[str, Any]:
        # Read lazily: the launcher records the baseline before any agent starts, possibly
        # while this process is still importing torch.
        if self._baseline is None:
            data = json.loads(self.box.read_bytes(BASELINE_JSON))
            # From the file, not from bytes read first: the eval text's logits alone are ~70 MB,
            # and a bytes copy beside the tensors would double that in the coordinator's peak.
            data["logits"] = load_safetensors_file(str(self.box.resolve(BASELINE_LOGITS)))
            self._baseline = data
        return self._baseline

    @property
    def eval_ids(self) -> list[int]:
        """The run's copy of the eval text as the live model's tokenizer reads it: the ids the
        baseline scored, which its eval logits prove (one row per id)."""
        if self._eval_ids is None:
            text = self.box.read_bytes(EVAL_TEXT).decode("utf-8")
            ids = eval_ids(self.live.tokenizer, text, eval_limit(self.live.model.config))
            reference = self.baseline["logits"]["eval"]
            if reference.shape[0] != len(ids):
                raise ValueError(
                    f"{EVAL_TEXT}: {len(ids)} tokens, but the baseline scored {reference.shape[0]}: "
                    "expected the text the baseline was recorded with"
                )
            self._eval_ids = ids
        return self._eval_ids

    @property
    def eval_reference(self) -> FullReference:
        # Once per run: the full model's distributions are the same at every checkpoint.
        if self._eval_reference is None:
            self._eval_reference = full_reference(self.baseline["logits"]["eval"], self.eval_ids)
        return self._eval_reference

    @property
    def corpus(self) -> CorpusScorer | None:
        """The eval corpus's scorer, or None when the run has no --eval-corpus."""
        if self._corpus is False:
            corpus = read_run_corpus(self.box)
            self._corpus = None if corpus is None else CorpusScorer(self.box, corpus, self.baseline["corpus"])
        return self._corpus if isinstance(self._corpus, CorpusScorer) else None

    @property
    def lens(self) -> TunedLens | None:
        """The model's tuned lens, when the launcher gave the run one (`fragsim lens fit`)."""
        if self._lens is False:
            self._lens = TunedLens.load(self.box.resolve(BASELINE_LENS)) if self.box.exists(BASELINE_LENS) else None
            if self._lens is not None:
                self._lens.check_fits(self.live.model)
        return self._lens if isinstance(self._lens, TunedLens) else None

    def _tuned(self, model: Any, layers: int, record: dict[str, Any]) -> None:
        """The same prefix read through the tuned lens: quality["tuned"] on the eval text and
        corpus["tuned"] on the corpus, beside the logit lens. The full model needs no lens."""
        lens = self.lens
        if lens is None or layers >= self.plan.num_layers:
            return
        started = time.perf_counter()
        with lensed(model, lens, layers):
            tuned = text_quality(sequence_logits(model, self.eval_ids), self.eval_ids, self.eval_reference)
            # A lens fitted for some layers only leaves the others identity: the logit lens again.
            tuned["fitted"] = layers in lens.meta.get("fitted_layers", range(lens.layers))
            record["quality"]["tuned"] = tuned
            if self.corpus is not None and "corpus" in record:
                summary = self.corpus.score(model, self.live.tokenizer, None)
                record["corpus"]["tuned"] = {k: v for k, v in summary.items() if k != "per_document"}
        record["tuned_s"] = round(time.perf_counter() - started, 6)

    def reassemble(self, action: Reassemble) -> dict[str, Any]:
        """Snapshot, grow the live model to the new prefix and evaluate it: the checkpoint's record."""
        t0 = time.perf_counter()
        rel = write_snapshot(self.box, self.plan, action.checkpoint, action.layers, action.fragments)
        t1 = time.perf_counter()
        if self.live.model is None:
            self.live.start(self.box.resolve(rel), action.layers)
            generate(self.live.model, self.live.tokenizer, self.settings.prompt, 2)  # warm-up, as the baseline had
        else:
            self.live.grow(
                [self.box.resolve(f"{committed_dir(i)}/{WEIGHTS_FILE}") for i in action.new_fragments], action.layers
            )
        t2 = time.perf_counter()
        base = self.baseline
        gen = generate(self.live.model, self.live.tokenizer, self.settings.prompt, self.settings.max_new_tokens)
        t3 = time.perf_counter()
        ids = prompt_ids(self.live.tokenizer, self.settings.prompt)[0].tolist()
        logits = sequence_logits(self.live.model, ids + base["tokens"])
        t4 = time.perf_counter()
        quality = text_quality(sequence_logits(self.live.model, self.eval_ids), self.eval_ids, self.eval_reference)
        probe = prompt_ids(self.live.tokenizer, self.settings.options.probe)[0].tolist()
        hidden_states = residual_stream_stats(self.live.model, probe)
        norm_check = final_norm_check(self.live.model, probe)
        t5 = time.perf_counter()
        record = {
            "checkpoint": action.checkpoint,
            "layers": action.layers,
            "fragments": action.fragments,
            "new_fragments": action.new_fragments,
            "ranges": [self.plan.fragments[i].label for i in action.fragments],
            "snapshot": rel,
            "text": gen.text,
            "tokens": gen.tokens,
            "label": gen.label,
            **agreement(gen.tokens, base["tokens"]),
            **divergence(logits, base["logits"]["sequence"]),
            "generate_s": round(gen.seconds, 6),
            "snapshot_s": round(t1 - t0, 6),
            "load_s": round(t2 - t1, 6),
            "score_s": round(t4 - t3, 6),
            "quality_s": round(t5 - t4, 6),
            "loaded": self.live.loads[-1],
            "quality": quality,
            "hidden_states": hidden_states,
            "norm_check": norm_check,
        }
        if self.corpus is not None:
            previous = self.checkpoints[-1].get("corpus") if self.checkpoints else None
            record["corpus"] = self.corpus.score(self.live.model, self.live.tokenizer, previous)
        self._tuned(self.live.model, action.layers, record)
        self.checkpoints.append(record)
        return record

    def evaluate_gaps(self, arrival: int, fragments: list[int]) -> dict[str, Any]:
        """Every arrived decoder layer in layer order, the missing ones skipped, renumbered
        0..m-1 on a copy of the live model's non-layer parts: the live model is not touched."""
        t0 = time.perf_counter()
        if self.live.model is None:
            raise ValueError("a gapped model needs fragment 0's model loaded first")
        per_layer: dict[int, dict[str, torch.Tensor]] = {}
        for index in fragments:
            path = self.box.resolve(f"{committed_dir(index)}/{WEIGHTS_FILE}")
            with safe_open(str(path), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    layer = layer_of(name)
                    if layer is None:
                        continue
                    cut = name.index(f"layers.{layer}.") + len(f"layers.{layer}.")
                    per_layer.setdefault(layer, {})[name[cut:]] = fh.get_tensor(name)
        layers = sorted(per_layer)
        live_layers = self.live.decoder_layers
        # The copy shares nothing with the live model; its decoder layers are not copied at all.
        model = copy.deepcopy(self.live.model, memo={id(live_layers): torch.nn.ModuleList()})
        config = model.config
        config.num_hidden_layers = len(layers)
        full_types = self.plan.model["config"].get("layer_types")
        if isinstance(full_types, list):
            config.layer_types = [full_types[i] for i in layers]
        layer_cls = type(live_layers[0])
        decoder = getattr(model, model.base_model_prefix).layers
        for new_index, original in enumerate(layers):
            with torch.device("meta"):
                module = layer_cls(config, new_index)
            module.load_state_dict(per_layer.pop(original), strict=True, assign=True)
            module.eval()
            decoder.append(module)
        t1 = time.perf_counter()
        try:
            record = self._measure(model, t1 - t0)
        finally:
            del model, decoder
        missing = [i for i in range(len(self.plan.fragments)) if i not in fragments]
        record = {
            "arrival": arrival,
            "layers": layers,
            "num_layers": len(layers),
            "fragments": sorted(fragments),
            "ranges": [self.plan.fragments[i].label for i in sorted(fragments)],
            "missing": [self.plan.fragments[i].label for i in missing],
            "missing_fragments": missing,
            **record,
        }
        self.gap_checkpoints.append(record)
        return record

    def _measure(self, model: Any, load_s: float) -> dict[str, Any]:
        """A checkpoint's measurements of a model that shares the live model's tokenizer."""
        tokenizer, base = self.live.tokenizer, self.baseline
        gen = generate(model, tokenizer, self.settings.prompt, self.settings.max_new_tokens)
        t3 = time.perf_counter()
        ids = prompt_ids(tokenizer, self.settings.prompt)[0].tolist()
        logits = sequence_logits(model, ids + base["tokens"])
        t4 = time.perf_counter()
        quality = text_quality(sequence_logits(model, self.eval_ids), self.eval_ids, self.eval_reference)
        probe = prompt_ids(tokenizer, self.settings.options.probe)[0].tolist()
        hidden_states = residual_stream_stats(model, probe)
        norm_check = final_norm_check(model, probe)
        t5 = time.perf_counter()
        return {
            "text": gen.text,
            "tokens": gen.tokens,
            "label": gen.label,
            **agreement(gen.tokens, base["tokens"]),
            **divergence(logits, base["logits"]["sequence"]),
            "generate_s": round(gen.seconds, 6),
            "load_s": round(load_s, 6),
            "score_s": round(t4 - t3, 6),
            "quality_s": round(t5 - t4, 6),
            "quality": quality,
            "hidden_states": hidden_states,
            "norm_check": norm_check,
        }

    def final_check(self, store: FragmentStore) -> dict[str, Any]:
        """Every promoted byte re-hashed against the plan, the prompt's logits and the last
        checkpoint's tokens against the baseline: the final checkpoint must equal the source."""
        bad = {i: store.verify_committed(i) for i in range(len(self.plan.fragments))}
        bad_names = [self.plan.fragments[i].items[j].name for i, items in bad.items() for j in items]
        tensors = sum(1 for f in self.plan.fragments for it in f.items if it.kind == "tensor")
        files = sum(1 for f in self.plan.fragments for it in f.items if it.kind == "file")
        base = self.baseline
        ids = prompt_ids(self.live.tokenizer, self.settings.prompt)[0].tolist()
        prompt_logits = sequence_logits(self.live.model, ids)
        reference = base["logits"]["prompt"]
        same_shape = tuple(prompt_logits.shape) == tuple(reference.shape)
        max_diff = float((prompt_logits - reference).abs().max().item()) if same_shape else None
        last = self.checkpoints[-1] if self.checkpoints else {}
        tokens_identical = last.get("tokens") == base["tokens"] and last.get("layers") == self.plan.num_layers
        out = {
            "tensor_digests_match": not bad_names,
            "tensors_checked": tensors,
            "files_checked": files,
            "mismatched_items": bad_names,
            "logits_max_abs_diff": max_diff,
            "logits_positions": int(prompt_logits.shape[0]),
            "tokens_identical": tokens_identical,
        }
        out["final_matches_baseline"] = bool(not bad_names and max_diff == 0.0 and tokens_identical)
        return out
