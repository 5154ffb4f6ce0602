"""`fragsim ablate`: how much the model's language modelling suffers when decoder layers are
removed, one at a time and in contiguous blocks, measured on a held-out text; JSON figures.

The model is loaded once. Each ablation swaps the decoder's layer list for one without the
removed layers (the same modules, nothing copied or reloaded), sets num_hidden_layers (and any
per-layer list such as layer_types) to match and renumbers the kept attention modules'
layer_idx 0..k-1, so a KV cache, were one used, would index a slot per kept layer; the forward
passes run with use_cache=False anyway. Everything is restored after each measurement.

Cross-entropy and perplexity are coordinator.quality's (teacher-forced, nats/token). Every
result is compared with the claims of seed 001 (Wietrzykowski 2026, "Anatomical Heterogeneity
in Transformer Language Models", arXiv 2603.19348) about single-layer ablation of SmolLM2-135M.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from coordinator.evaluate import sequence_logits, set_determinism
from coordinator.launch.terminal import wide_console
from coordinator.quality import DEFAULT_EVAL_TEXT, eval_ids, perplexity, read_eval_text, token_cross_entropy
from coordinator.report.seeds import CRITICAL_CORE, MAGNITUDE_FACTOR, PAPER_ANTI_LAYERS, PAPER_MAX_CHANGE_PCT, SEED_001
from protocol.errors import PlanError
from protocol.run_settings import DEFAULT_THREADS

DEFAULT_OUT = Path("artifacts/ablation.json")
DEFAULT_BLOCKS = (1, 2, 4)
TOP = 10  # rows of the most-damaging table

PER_LAYER_CONFIG_LISTS = ("layer_types", "mlp_layer_types")


# ---- removing layers from a loaded model, and putting them back ----------------------------


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The decoder's layer list (`model.<base_model_prefix>.layers`), refused when there is none."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise PlanError(
            "decoder layers of this model", type(model).__name__, "a decoder whose layers are <prefix>.layers"
        )
    return layers


@contextmanager
def without_layers(model: Any, removed: Iterable[int]) -> Iterator[list[int]]:
    """`model` without the decoder layers `removed` while the block runs; yields the kept ones.

    Swaps the layer list, sets num_hidden_layers and the per-layer config lists to the kept
    layers, and renumbers every kept module's `layer_idx` 0..k-1; all restored afterwards,
    also when the block raises."""
    layers = decoder_layers(model)
    base = getattr(model, model.base_model_prefix)
    n = len(layers)
    gone = set(removed)
    if not gone <= set(range(n)):
        raise ValueError(f"layers to remove {sorted(gone)}: expected layers of 0-{n - 1}")
    kept = [i for i in range(n) if i not in gone]
    if not kept:
        raise ValueError(f"cannot remove all {n} layers")
    configs = list({id(c): c for c in (model.config, getattr(base, "config", model.config))}.values())
    saved_configs = [
        (config, config.num_hidden_layers, {key: getattr(config, key, None) for key in PER_LAYER_CONFIG_LISTS})
        for config in configs
    ]
    indexed: list[tuple[int, Any, int]] = [  # (layer, a module that knows its layer_idx, that layer_idx)
        (i, module, int(getattr(module, "layer_idx")))  # noqa: B009 (Module.__getattr__ is typed Tensor | Module)
        for i, layer in enumerate(layers)
        for module in layer.modules()
        if isinstance(getattr(module, "layer_idx", None), int)
    ]
    position = {layer: new for new, layer in enumerate(kept)}
    try:
        base.layers = torch.nn.ModuleList([layers[i] for i in kept])
        for config, _, lists in saved_configs:
            config.num_hidden_layers = len(kept)
            for key, value in lists.items():
                if isinstance(value, list) and len(value) == n:
                    setattr(config, key, [value[i] for i in kept])
        for i, module, _ in indexed:
            if i in position:
                module.layer_idx = position[i]
        yield kept
    finally:
        base.layers = layers
        for config, num_layers, lists in saved_configs:
            config.num_hidden_layers = num_layers
            for key, value in lists.items():
                if isinstance(value, list):
                    setattr(config, key, value)
        for _, module, index in indexed:
            module.layer_idx = index


# ---- measuring -----------------------------------------------------------------------------


def measure(model: Any, ids: list[int]) -> dict[str, float]:
    """Teacher-forced cross-entropy (nats/token) and perplexity of `model` over `ids`."""
    ce = token_cross_entropy(sequence_logits(model, ids), ids)
    return {"ce": ce, "ppl": perplexity(ce)}


def change_pct(ppl: float, full_ppl: float) -> float:
    """100 x (ppl_removed / ppl_full - 1)."""
    return 100.0 * (ppl / full_ppl - 1.0)


def block_spans(num_layers: int, widths: Iterable[int]) -> list[tuple[int, int]]:
    """Every contiguous block [a, b] of each width > 1 that leaves at least one layer."""
    return [(a, a + w - 1) for w in sorted(set(widths)) if 1 < w < num_layers for a in range(num_layers - w + 1)]


def parse_widths(spec: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]: block widths of at least 1 (1 = single layers, always measured)."""
    try:
        widths = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise PlanError("--blocks", spec, "block widths separated by commas, e.g. 1,2,4") from None
    if not widths or any(w < 1 for w in widths):
        raise PlanError("--blocks", spec, "block widths of at least 1, e.g. 1,2,4")
    return sorted(set(widths))


def _damage(row: dict[str, Any]) -> float:
    ce = row["ce"]
    return math.inf if ce is None or math.isnan(ce) else float(ce)  # a NaN model is as broken as it gets


def ranking(layers: Sequence[dict[str, Any]]) -> list[int]:
    """Removed layers, most damaging first (highest CE; ties by layer index)."""
    return [row["removed"] for row in sorted(layers, key=lambda r: (-_damage(r), r["removed"]))]


def anti_layers(full_ce: float, layers: Sequence[dict[str, Any]]) -> list[int]:
    """The layers whose removal lowers cross-entropy below the full model's, in layer order."""
    return sorted(row["removed"] for row in layers if _damage(row) < full_ce)


def seed_001(layers: Sequence[dict[str, Any]], order: list[int], anti: list[int]) -> dict[str, Any]:
    """Seed 001's claims next to what was measured here; "holds" is None when the model lacks
    the layers a claim is about."""
    by_layer = {row["removed"]: row for row in layers}
    rank = {layer: position + 1 for position, layer in enumerate(order)}
    claims: list[dict[str, Any]] = []

    core_known = all(i in by_layer for i in CRITICAL_CORE)
    top = order[: len(CRITICAL_CORE)]
    claims.append(
        {
            "claim": "critical core: removing one of L8-L11 does the most damage (they are the top 4)",
            "paper": {"critical_core": list(CRITICAL_CORE)},
            "measured": {
                "top_4": top,
                "core": [
                    {"layer": i, "rank": rank[i], "ppl_change_pct": by_layer[i]["ppl_change_pct"]}
                    for i in CRITICAL_CORE
                    if i in by_layer
                ],
                "core_in_top_4": sum(1 for i in CRITICAL_CORE if i in top),
            },
            "holds": set(top) == set(CRITICAL_CORE) if core_known else None,
        }
    )

    worst = by_layer[order[0]] if order else None
    paper_ratio = 1.0 + PAPER_MAX_CHANGE_PCT / 100.0
    worst_ratio = None if worst is None or worst["ppl_change_pct"] is None else 1.0 + worst["ppl_change_pct"] / 100.0
    finite = worst_ratio is not None and 0 < worst_ratio < math.inf  # False for inf and NaN too
    log10_ratio = math.log10(worst_ratio / paper_ratio) if finite and worst_ratio is not None else None
    claims.append(
        {
            "claim": f"max single-layer PPL degradation ~+{PAPER_MAX_CHANGE_PCT:,.0f} % (within the critical core)",
            "paper": {"max_ppl_change_pct": PAPER_MAX_CHANGE_PCT, "within_factor": MAGNITUDE_FACTOR},
            "measured": {
                "layer": worst["removed"] if worst else None,
                "max_ppl_change_pct": worst["ppl_change_pct"] if worst else None,
                "ppl_ratio_vs_paper_log10": round(log10_ratio, 4) if log10_ratio is not None else None,
                "in_critical_core": worst["removed"] in CRITICAL_CORE if worst else None,
            },
            "holds": (
                None
                if not core_known or worst_ratio is None
                else log10_ratio is not None and abs(log10_ratio) <= math.log10(MAGNITUDE_FACTOR)
            ),
        }
    )

    anti_known = all(i in by_layer for i in PAPER_ANTI_LAYERS)
    claims.append(
        {
            "claim": "anti-layers: removing L14 or L17 lowers perplexity",
            "paper": {"anti_layers": list(PAPER_ANTI_LAYERS)},
            "measured": {
                "anti_layers": anti,
                "layers": [
                    {"layer": i, "ce_change": by_layer[i]["ce_change"], "ppl_change_pct": by_layer[i]["ppl_change_pct"]}
                    for i in PAPER_ANTI_LAYERS
                    if i in by_layer
                ],
            },
            "holds": all(i in anti for i in PAPER_ANTI_LAYERS) if anti_known else None,
        }
    )
    return {
        **SEED_001,
        "note": "the paper's evaluation text and checkpoint (base, not Instruct) may differ from this run's",
        "claims": claims,
    }


def _row(removed: Any, quality: dict[str, float], full: dict[str, float]) -> dict[str, Any]:
    return {
        "removed": removed,
        "ce": quality["ce"],
        "ppl": quality["ppl"],
        "ce_change": quality["ce"] - full["ce"],
        "ppl_change_pct": change_pct(quality["ppl"], full["ppl"]),
    }


def run_ablation(
    model: Any,
    ids: list[int],
    widths: Iterable[int] = DEFAULT_BLOCKS,
    step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The full model, each layer removed and each contiguous block of each width > 1 removed:
    {"full", "layers", "blocks", "ranking", "anti_layers", "seed_001"}. `step` is called with a
    description after each forward pass."""
    tick = step or (lambda _: None)
    n = len(decoder_layers(model))
    full = measure(model, ids)
    tick("full model")
    layers = []
    for i in range(n):
        with without_layers(model, [i]):
            layers.append(_row(i, measure(model, ids), full))
        tick(f"without L{i}")
    blocks = []
    for a, b in block_spans(n, widths):
        with without_layers(model, range(a, b + 1)):
            blocks.append(_row([a, b], measure(model, ids), full))
        tick(f"without L{a}-L{b}")
    order = ranking(layers)
    anti = anti_layers(full["ce"], layers)
    return {
        "full": full,
        "layers": layers,
        "blocks": blocks,
        "ranking": order,
        "anti_layers": anti,
        "seed_001": seed_001(layers, order, anti),
    }


def passes(num_layers: int, widths: Iterable[int]) -> int:
    """Forward passes of one ablation: the full model, each layer, each wider block."""
    return 1 + num_layers + len(block_spans(num_layers, widths))


# ---- the command ---------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    """JSON has no inf/NaN: they become null (a perplexity that overflowed)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _load(model_dir: Path, threads: int) -> tuple[Any, Any, float]:
    from coordinator.launch.baseline import SourceModel

    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json, expected a Hugging Face checkpoint directory")
    source = SourceModel(model_dir, threads)  # set_determinism(threads), then the stock from_pretrained
    return source.model, source.tokenizer, source.load_s


def ablate(
    model_dir: Path,
    out: Path = DEFAULT_OUT,
    *,
    text: Path | None = None,
    widths: Iterable[int] = DEFAULT_BLOCKS,
    threads: int = DEFAULT_THREADS,
    max_tokens: int | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Load `model_dir` once, ablate every layer and block on the text, write `out` and show tables."""
    console = console or wide_console()
    started = time.perf_counter()
    text_path = Path(text) if text is not None else DEFAULT_EVAL_TEXT
    if max_tokens is not None and max_tokens < 1:
        raise PlanError("--max-tokens", max_tokens, "a whole number of at least 1")
    widths = sorted(set(widths))
    try:
        eval_text = read_eval_text(text_path)
    except ValueError as exc:
        raise PlanError("--text", str(text_path), str(exc)) from None
    set_determinism(threads)
    model, tokenizer, load_s = _load(model_dir, threads)
    try:
        ids = eval_ids(tokenizer, eval_text, max_tokens)
    except ValueError as exc:
        raise PlanError("--text/--max-tokens", str(text_path), str(exc)) from None
    n = len(decoder_layers(model))
    total = passes(n, widths)
    console.print(
        f"ablating {model_dir.name}: {n} layers, blocks of width {', '.join(map(str, widths))}, "
        f"{len(ids)} tokens of {text_path.name}, {total} forward passes, {threads} thread(s) (load {load_s:.1f}s)"
    )
    progress = Progress(
        TextColumn("{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )
    measured_started = time.perf_counter()
    with progress:
        task = progress.add_task("full model", total=total)
        result = run_ablation(model, ids, widths, step=lambda what: progress.update(task, advance=1, description=what))
    measured_s = time.perf_counter() - measured_started
    summary: dict[str, Any] = _finite(
        {
            "model": str(model_dir),
            "text": str(text_path),
            "text_tokens": len(ids),
            "max_tokens": max_tokens,
            "num_layers": n,
            "block_widths": widths,
            "threads": threads,
            "full": result["full"],
            "layers": result["layers"],
            "blocks": result["blocks"],
            "ranking": result["ranking"],
            "anti_layers": result["anti_layers"],
            "seed_001": result["seed_001"],
            "forward_passes": total,
            "load_s": round(load_s, 3),
            "measure_s": round(measured_s, 3),
            "seconds": round(time.perf_counter() - started, 3),
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    show(summary, console)
    console.print(f"figures -> {out} ({summary['seconds']:.1f}s, {measured_s:.1f}s of forward passes)")
    from coordinator.report.build import write_report

    written = write_report([out])
    console.print(f"report: {written.path} ({written.figures} figures, {written.seconds:.2f}s)")
    return summary


# ---- what the user sees at the end ---------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+,.2f} %"


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _verdict(holds: bool | None) -> str:
    return {True: "[green]holds[/]", False: "[red]does not hold[/]", None: "[yellow]not judged[/]"}[holds]


def tables(summary: dict[str, Any]) -> list[Table]:
    """Most damaging layers, anti-layers, the worst block of each width, seed 001 vs measured."""
    by_layer = {row["removed"]: row for row in summary["layers"]}
    out = []
    worst = Table(title=f"most damaging single layers (top {TOP})")
    for column in ("rank", "removed", "CE", "PPL", "PPL change"):
        worst.add_column(column, justify="right")
    for position, layer in enumerate(summary["ranking"][:TOP]):
        row = by_layer[layer]
        worst.add_row(str(position + 1), f"L{layer}", _num(row["ce"]), _num(row["ppl"], 2), _pct(row["ppl_change_pct"]))
    out.append(worst)

    anti = Table(title="anti-layers (removal lowers CE)")
    for column in ("removed", "CE", "CE change", "PPL", "PPL change"):
        anti.add_column(column, justify="right")
    for layer in summary["anti_layers"]:
        row = by_layer[layer]
        anti.add_row(
            f"L{layer}", _num(row["ce"]), _num(row["ce_change"]), _num(row["ppl"], 2), _pct(row["ppl_change_pct"])
        )
    if not summary["anti_layers"]:
        anti.add_row("none", "-", "-", "-", "-")
    out.append(anti)

    if summary["blocks"]:
        blocks = Table(title="most damaging block of each width")
        for column in ("width", "removed", "CE", "PPL change", "least damaging", "its PPL change"):
            blocks.add_column(column, justify="right")
        for width in sorted({b - a + 1 for a, b in (r["removed"] for r in summary["blocks"])}):
            rows = [r for r in summary["blocks"] if r["removed"][1] - r["removed"][0] + 1 == width]
            hi = max(rows, key=_damage)
            lo = min(rows, key=_damage)
            blocks.add_row(
                str(width),
                "L{}-L{}".format(*hi["removed"]),
                _num(hi["ce"]),
                _pct(hi["ppl_change_pct"]),
                "L{}-L{}".format(*lo["removed"]),
                _pct(lo["ppl_change_pct"]),
            )
        out.append(blocks)

    seed = Table(title=f"seed 001 ({summary['seed_001']['url']}) claims vs this run")
    for column in ("claim", "paper", "measured", "verdict"):
        seed.add_column(column, justify="left")
    core, magnitude, antis = summary["seed_001"]["claims"]
    seed.add_row(
        core["claim"],
        "L8-L11",
        "top 4: "
        + ", ".join(f"L{i}" for i in core["measured"]["top_4"])
        + "; core ranks: "
        + (", ".join(f"L{c['layer']} #{c['rank']}" for c in core["measured"]["core"]) or "-"),
        _verdict(core["holds"]),
    )
    m = magnitude["measured"]
    seed.add_row(
        magnitude["claim"],
        _pct(PAPER_MAX_CHANGE_PCT),
        f"{_pct(m['max_ppl_change_pct'])} (L{m['layer']})" if m["layer"] is not None else "-",
        _verdict(magnitude["holds"]),
    )
    seed.add_row(
        antis["claim"],
        "L14, L17",
        "anti-layers: "
        + (", ".join(f"L{i}" for i in antis["measured"]["anti_layers"]) or "none")
        + "; "
        + (", ".join(f"L{r['layer']} {_pct(r['ppl_change_pct'])}" for r in antis["measured"]["layers"]) or "-"),
        _verdict(antis["holds"]),
    )
    out.append(seed)
    return out


def show(summary: dict[str, Any], console: Console) -> None:
    full = summary["full"]
    console.print(
        f"full model: CE {_num(full['ce'])} nats/token, PPL {_num(full['ppl'], 3)} "
        f"over {summary['text_tokens'] - 1} scored positions"
    )
    for table in tables(summary):
        console.print(table)
