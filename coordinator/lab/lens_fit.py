"""`fragsim lens fit`: fit a tuned lens (coordinator.lens) for a model on the eval corpus's fit set
and cache it under artifacts/lenses/, keyed by the model's source digest, where `simulate` finds it.

Per layer k the translator starts from the closed-form least-squares map of the residual after k
layers onto the residual after the last layer (ridge-regularised, in float64), then takes a few
epochs of Adam on KL(full model ‖ lens) itself, the tuned lens's objective. Each layer is fitted on
its own (they share nothing), and the result of each stage is scored on held-out fit tokens:
the file records logit-lens, closed-form and tuned KL per layer, and the tuned stage is kept
only where it beats the closed form there."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from coordinator.corpus import scoring
from coordinator.corpus.documents import LEE, read_corpus
from coordinator.evaluate import hooked_residuals, set_determinism
from coordinator.launch.lenses import lens_key, lens_path
from coordinator.lens import TunedLens, final_norm
from protocol.errors import PlanError
from protocol.run_settings import DEFAULT_THREADS

DEFAULT_TOKENS = 2048  # fit-set tokens the translators are fitted on (2,048 x 49k float32 targets: 400 MB)
HELD_OUT = 512  # further fit-set tokens every stage is scored on
DEFAULT_EPOCHS = 1
BATCH = 256
LEARNING_RATE = 1e-3
RIDGE = 1e-4  # x the mean diagonal of X^T X: keeps the normal equations solvable for rank-poor early layers


def parse_layers(spec: str) -> list[int]:
    """'5,15' -> [5, 15]."""
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise PlanError("--layers", spec, "layer indices separated by commas, e.g. 5,15") from None
    if not layers:
        raise PlanError("--layers", spec, "at least one layer index")
    return layers


@torch.inference_mode()
def residual_states(model: Any, documents: list[list[int]], prefix: int, window: int, budget: int) -> torch.Tensor:
    """[layers + 1, tokens, hidden] float32: the residual stream before layer 0 (embeddings) and
    after each layer (before the final norm) at the first `budget` scored corpus positions."""
    base = getattr(model, model.base_model_prefix)
    rows: list[torch.Tensor] = []
    taken = 0
    with hooked_residuals(model) as seen:
        for doc in documents:
            for w in scoring.rolling_windows(doc, prefix, window):
                seen.clear()
                base(input_ids=torch.tensor([w.inputs]), use_cache=False)
                n = min(len(w.targets), budget - taken)
                rows.append(torch.stack([s[0, len(w.inputs) - len(w.targets) :][:n].float() for s in seen]))
                taken += n
                if taken >= budget:
                    return torch.cat(rows, dim=1)
    raise PlanError("--tokens", budget, f"at most {taken} (the fit set's scored tokens)")


def _lens_logp(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model.get_output_embeddings()(final_norm(model)(hidden)).float(), dim=-1)


def _kl(model: Any, hidden: torch.Tensor, target_logp: torch.Tensor) -> float:
    """Mean KL(full ‖ lens) over the tokens, nats."""
    with torch.inference_mode():
        total = 0.0
        for s in range(0, len(hidden), BATCH):
            logq = _lens_logp(model, hidden[s : s + BATCH]).double()
            logp = target_logp[s : s + BATCH].double()
            total += float((logp.exp() * (logp - logq)).sum().item())
    return total / len(hidden)


def closed_form(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A, b minimising |x + x A^T + b - y|^2 (ridge-regularised), in float64."""
    x64, y64 = x.double(), y.double()
    ones = torch.ones(len(x64), 1, dtype=torch.float64)
    design = torch.cat([x64, ones], dim=1)
    gram = design.T @ design
    gram += RIDGE * gram.diagonal().mean() * torch.eye(len(gram), dtype=torch.float64)
    solution = torch.linalg.solve(gram, design.T @ (y64 - x64))  # [hidden + 1, hidden]
    return solution[:-1].T.float().contiguous(), solution[-1].float().contiguous()


def tune(
    model: Any, x: torch.Tensor, target_logp: torch.Tensor, a: torch.Tensor, b: torch.Tensor, epochs: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`epochs` of Adam on KL(full ‖ lens) from (a, b); the model's own weights stay frozen."""
    a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([a, b], lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(BATCH):
            h = x[batch]
            logq = _lens_logp(model, h + h @ a.T + b)
            loss = torch.nn.functional.kl_div(logq, target_logp[batch], log_target=True, reduction="batchmean")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return a.detach(), b.detach()


def fit_lens(
    model: Any,
    tokenizer: Any,
    fit_docs: list[str],
    *,
    tokens: int = DEFAULT_TOKENS,
    epochs: int = DEFAULT_EPOCHS,
    layers: list[int] | None = None,
    seed: int = 0,
    held_out: int = HELD_OUT,
    step: Any = None,
) -> TunedLens:
    """A lens for every layer (or only `layers`; the others stay identity) fitted on `fit_docs`."""
    scoring.return_large_blocks()
    for p in model.parameters():
        p.requires_grad_(False)
    num_layers = model.config.num_hidden_layers
    hidden_size = model.config.hidden_size
    wanted = list(range(num_layers)) if layers is None else layers
    bad = [k for k in wanted if not 0 <= k < num_layers]
    if bad:
        raise PlanError("--layers", bad, f"layers of 0..{num_layers - 1} (0 = the embeddings alone)")
    prefix, window = scoring.prefix_token(tokenizer), scoring.window_size(model.config)
    docs = scoring.tokenize_corpus(tokenizer, fit_docs)
    states = residual_states(model, docs, prefix, window, tokens + held_out)
    train, held = states[:, :tokens], states[:, tokens:]
    with torch.inference_mode():
        target = torch.cat([_lens_logp(model, train[-1][s : s + BATCH]) for s in range(0, tokens, BATCH)])
        held_target = _lens_logp(model, held[-1])
    weight = torch.zeros(num_layers, hidden_size, hidden_size)
    bias = torch.zeros(num_layers, hidden_size)
    scores: dict[str, dict[str, Any]] = {}
    for k in wanted:
        started = time.perf_counter()
        a, b = closed_form(train[k], train[-1])
        closed_kl = _kl(model, held[k] + held[k] @ a.T + b, held_target)
        ta, tb = tune(model, train[k], target, a, b, epochs, seed + k) if epochs else (a, b)
        tuned_kl = _kl(model, held[k] + held[k] @ ta.T + tb, held_target)
        keep_tuned = tuned_kl < closed_kl
        weight[k], bias[k] = (ta, tb) if keep_tuned else (a, b)
        scores[str(k)] = {
            "logit_lens_kl": _kl(model, held[k], held_target),
            "closed_form_kl": closed_kl,
            "tuned_kl": tuned_kl,
            "kept": "tuned" if keep_tuned else "closed form",
            "seconds": round(time.perf_counter() - started, 3),
        }
        if step is not None:
            step(k, scores[str(k)])
    meta = {
        "num_layers": num_layers,
        "fitted_layers": wanted,
        "tokens": tokens,
        "held_out_tokens": held_out,
        "epochs": epochs,
        "batch": BATCH,
        "learning_rate": LEARNING_RATE,
        "ridge": RIDGE,
        "seed": seed,
        "held_out_kl": scores,
    }
    return TunedLens(weight, bias, meta)


def fit_command(
    model_dir: Path,
    artifacts: Path,
    *,
    corpus: str = LEE,
    tokens: int = DEFAULT_TOKENS,
    epochs: int = DEFAULT_EPOCHS,
    layers: list[int] | None = None,
    threads: int = DEFAULT_THREADS,
    held_out: int = HELD_OUT,
    console: Console | None = None,
) -> Path:
    """Load the model, fit, write artifacts/lenses/<key>.safetensors and show each layer's KL."""
    from coordinator.launch.baseline import SourceModel

    console = console or Console(stderr=True)
    if tokens < BATCH:
        raise PlanError("--tokens", tokens, f"at least {BATCH}")
    if epochs < 0:
        raise PlanError("--epochs", epochs, "0 or more (0: the closed form alone)")
    documents = read_corpus(corpus)
    started = time.perf_counter()
    set_determinism(threads)
    source = SourceModel(model_dir, threads)
    out = lens_path(artifacts, model_dir)
    console.print(
        f"fitting a tuned lens for {model_dir.name}: {tokens:,} tokens of {documents.name}'s fit set "
        f"({len(documents.fit_docs)} documents), {epochs} epoch(s) of KL after the closed form"
    )
    table = Table(title="held-out KL(full ‖ lens), nats/token")
    for column in ("layer", "logit lens", "closed form", "tuned", "kept", "s"):
        table.add_column(column, justify="right")

    def step(k: int, s: dict[str, Any]) -> None:
        console.print(
            f"  layer {k:>2}: logit lens {s['logit_lens_kl']:.3f} -> closed form {s['closed_form_kl']:.3f} "
            f"-> tuned {s['tuned_kl']:.3f} ({s['seconds']:.1f}s)"
        )
        table.add_row(
            str(k),
            f"{s['logit_lens_kl']:.3f}",
            f"{s['closed_form_kl']:.3f}",
            f"{s['tuned_kl']:.3f}",
            s["kept"],
            str(s["seconds"]),
        )

    lens = fit_lens(
        source.model,
        source.tokenizer,
        list(documents.fit_docs),
        tokens=tokens,
        epochs=epochs,
        layers=layers,
        held_out=held_out,
        step=step,
    )
    lens.meta.update(
        model=str(model_dir),
        source_digest=lens_key(model_dir),
        corpus=documents.identity(),
        seconds=round(time.perf_counter() - started, 3),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(lens.to_bytes())
    tmp.replace(out)
    console.print(table)
    console.print(f"lens -> {out} ({out.stat().st_size / 2**20:.1f} MiB, {lens.meta['seconds']:.0f}s)")
    (out.with_suffix(".json")).write_text(json.dumps(lens.meta, indent=1) + "\n")
    return out
