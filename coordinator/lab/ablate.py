"""`fragsim ablate`: how much the model's language modelling suffers when decoder layers are
ablated, one at a time and in contiguous blocks, measured on a held-out text; JSON figures.

The model is loaded once. What "ablated" means is the method (--ablation; see
coordinator.lab.ablation_methods for the semantics and why): `skip` deletes the layer (its
input passes through; the default, and what this command always did), `zero-output` zeroes
its output, `mean` and `resample` replace its residual update by the update's mean over the
positions or by another position's update. Several methods are measured in one load, each
against the same full-model pass, and every row records its method. Everything is restored
after each measurement.

`--greedy N` removes N single layers SLEB-style (Song et al. 2024): at each step every
remaining layer but the first and the last is tried on top of those already removed, and the
one that leaves the lowest CE goes. One more pass of the full model gives the cheap proxies of
coordinator.lab.proxies (ShortGPT's Block Influence, Gromov et al.'s angular distances) and
their Spearman rank correlation with the measured damage.

Cross-entropy and perplexity are coordinator.quality's (teacher-forced, nats/token). Every
method's result is compared with the claims of seed 001 (Wietrzykowski 2026, "Anatomical
Heterogeneity in Transformer Language Models", arXiv 2603.19348) about single-layer ablation
of SmolLM2-135M.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from coordinator.evaluate import sequence_logits, set_determinism
from coordinator.lab.ablation_methods import (
    DEFAULT_METHOD,
    DEFAULT_SEED,
    METHODS,
    ablated,
    decoder_layers,
)
from coordinator.lab.proxies import proxy_report
from coordinator.launch.terminal import wide_console
from coordinator.quality import DEFAULT_EVAL_TEXT, eval_ids, perplexity, read_eval_text, token_cross_entropy
from coordinator.report.seeds import CRITICAL_CORE, MAGNITUDE_FACTOR, PAPER_ANTI_LAYERS, PAPER_MAX_CHANGE_PCT, SEED_001
from protocol.errors import PlanError
from protocol.run_settings import DEFAULT_THREADS

DEFAULT_OUT = Path("artifacts/ablation.json")
DEFAULT_BLOCKS = (1, 2, 4)
TOP = 10  # rows of the most-damaging table
PAPER_IMPORTANCE_RANGE_LOG10 = 7.0  # seed 001's abstract: "Layer importance spans a 10^7 range"


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


def importance_range_log10(layers: Sequence[dict[str, Any]]) -> float | None:
    """log10(largest |PPL change %| / smallest non-zero one) over the single layers: how many
    orders of magnitude layer importance spans (seed 001: "a 10^7 range"); None when fewer than
    two layers have a finite non-zero change."""
    sizes = [
        abs(r["ppl_change_pct"])
        for r in layers
        if r["ppl_change_pct"] is not None and math.isfinite(r["ppl_change_pct"]) and r["ppl_change_pct"] != 0
    ]
    return round(math.log10(max(sizes) / min(sizes)), 4) if len(sizes) >= 2 else None


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
    core_worst = next((by_layer[i] for i in order if i in CRITICAL_CORE), None)
    paper_ratio = 1.0 + PAPER_MAX_CHANGE_PCT / 100.0
    worst_ratio = None if worst is None or worst["ppl_change_pct"] is None else 1.0 + worst["ppl_change_pct"] / 100.0
    finite = worst_ratio is not None and 0 < worst_ratio < math.inf  # False for inf and NaN too
    log10_ratio = math.log10(worst_ratio / paper_ratio) if finite and worst_ratio is not None else None
    claims.append(
        {
            "claim": f"max single-layer PPL degradation ~+{PAPER_MAX_CHANGE_PCT:,.0f} % (within the critical core)",
            "paper": {
                "max_ppl_change_pct": PAPER_MAX_CHANGE_PCT,
                "within_factor": MAGNITUDE_FACTOR,
                "importance_range_log10": PAPER_IMPORTANCE_RANGE_LOG10,
            },
            "measured": {
                "layer": worst["removed"] if worst else None,
                "max_ppl_change_pct": worst["ppl_change_pct"] if worst else None,
                "ppl_ratio_vs_paper_log10": round(log10_ratio, 4) if log10_ratio is not None else None,
                "in_critical_core": worst["removed"] in CRITICAL_CORE if worst else None,
                # zero-output ties every layer: then "the worst layer" is only the lowest index
                "layers_tied_with_worst": sum(1 for r in layers if worst and _damage(r) == _damage(worst)) - 1,
                "importance_range_log10": importance_range_log10(layers),
                "core_worst": (
                    {"layer": core_worst["removed"], "ppl_change_pct": core_worst["ppl_change_pct"]}
                    if core_worst
                    else None
                ),
            },
            # The paper's worst layer is in its core: the right size at another layer is no reproduction.
            "holds": (
                None
                if not core_known or worst_ratio is None or worst is None
                else log10_ratio is not None
                and abs(log10_ratio) <= math.log10(MAGNITUDE_FACTOR)
                and worst["removed"] in CRITICAL_CORE
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


def _row(removed: Any, quality: dict[str, float], full: dict[str, float], method: str) -> dict[str, Any]:
    return {
        "removed": removed,
        "method": method,
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
    *,
    method: str = DEFAULT_METHOD,
    seed: int = DEFAULT_SEED,
    full: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The full model (measured unless `full` is given), each layer ablated by `method` and each
    contiguous block of each width > 1 ablated: {"method", "full", "layers", "blocks", "ranking",
    "anti_layers", "seed_001"}. `step` is called with a description after each forward pass."""
    tick = step or (lambda _: None)
    n = len(decoder_layers(model))
    if full is None:
        full = measure(model, ids)
        tick("full model")
    layers = []
    for i in range(n):
        with ablated(model, [i], method, seed):
            layers.append(_row(i, measure(model, ids), full, method))
        tick(f"{method} L{i}")
    blocks = []
    for a, b in block_spans(n, widths):
        with ablated(model, range(a, b + 1), method, seed):
            blocks.append(_row([a, b], measure(model, ids), full, method))
        tick(f"{method} L{a}-L{b}")
    order = ranking(layers)
    anti = anti_layers(full["ce"], layers)
    return {
        "method": method,
        "full": full,
        "layers": layers,
        "blocks": blocks,
        "ranking": order,
        "anti_layers": anti,
        "seed_001": seed_001(layers, order, anti),
    }


def greedy_removal(
    model: Any,
    ids: list[int],
    steps: int,
    *,
    method: str = DEFAULT_METHOD,
    seed: int = DEFAULT_SEED,
    full: dict[str, float] | None = None,
    step: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """SLEB-style greedy removal: `steps` times, ablate (by `method`) each remaining layer on top
    of those already gone and let the one leaving the lowest CE go (ties: the lower index). The
    first and last layers are never candidates (SLEB and ShortGPT keep them: they map between
    the embeddings and the stream). One row per step, CE/PPL of the model after it."""
    tick = step or (lambda _: None)
    n = len(decoder_layers(model))
    candidates = list(range(1, n - 1))
    if not 0 <= steps <= len(candidates):
        raise PlanError("--greedy", steps, f"a whole number of 0-{len(candidates)} (the layers but the first and last)")
    if full is None:
        full = measure(model, ids)
        tick("full model")
    gone: list[int] = []
    out = []
    for number in range(1, steps + 1):
        tried = []
        for layer in candidates:
            with ablated(model, gone + [layer], method, seed):
                tried.append((measure(model, ids), layer))
            tick(f"greedy {method} {number}: L{layer}")
        quality, best = min(tried, key=lambda t: (_damage(t[0]), t[1]))
        gone.append(best)
        candidates.remove(best)
        out.append({"step": number, **_row(best, quality, full, method), "removed_so_far": sorted(gone)})
    return out


def greedy_passes(num_layers: int, steps: int) -> int:
    """Forward passes of `steps` greedy steps: each tries every remaining unprotected layer."""
    return sum(max(num_layers - 2 - k, 0) for k in range(steps))


def passes(num_layers: int, widths: Iterable[int], methods: int = 1, greedy: int = 0) -> int:
    """Forward passes of an ablation: the full model, then per method each layer, each wider
    block and the greedy steps; one more for the proxies (counted by the caller)."""
    per_method = num_layers + len(block_spans(num_layers, widths)) + greedy_passes(num_layers, greedy)
    return 1 + methods * per_method


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
    methods: Sequence[str] = (DEFAULT_METHOD,),
    greedy: int = 0,
    seed: int = DEFAULT_SEED,
    threads: int = DEFAULT_THREADS,
    max_tokens: int | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Load `model_dir` once; ablate every layer and block by each of `methods`, run `greedy`
    SLEB steps per method and the proxies on the text; write `out` and show tables."""
    console = console or wide_console()
    started = time.perf_counter()
    text_path = Path(text) if text is not None else DEFAULT_EVAL_TEXT
    if max_tokens is not None and max_tokens < 1:
        raise PlanError("--max-tokens", max_tokens, "a whole number of at least 1")
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise PlanError("--ablation", ",".join(unknown or methods), f"one or more of {', '.join(METHODS)}")
    if greedy < 0:
        raise PlanError("--greedy", greedy, "a whole number of at least 0 (0: no greedy removal)")
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
    vocab = getattr(model.config, "vocab_size", None)
    if greedy > max(n - 2, 0):
        raise PlanError("--greedy", greedy, f"a whole number of 0-{max(n - 2, 0)} (the layers but the first and last)")
    total = passes(n, widths, len(methods), greedy) + 1  # + the proxies' pass
    console.print(
        f"ablating {model_dir.name} by {', '.join(methods)}: {n} layers, blocks of width "
        f"{', '.join(map(str, widths))}{f', {greedy} greedy steps' if greedy else ''}, {len(ids)} tokens of "
        f"{text_path.name}, {total} forward passes, {threads} thread(s) (load {load_s:.1f}s)"
    )
    progress = Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )
    measured_started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    greedy_rows: dict[str, list[dict[str, Any]]] = {}
    with progress:
        task = progress.add_task("full model", total=total)

        def tick(what: str) -> None:
            progress.update(task, advance=1, description=what)

        full = measure(model, ids)
        tick("full model")
        for method in methods:
            method_started = time.perf_counter()
            results[method] = run_ablation(model, ids, widths, tick, method=method, seed=seed, full=full)
            if greedy:
                greedy_rows[method] = greedy_removal(model, ids, greedy, method=method, seed=seed, full=full, step=tick)
            results[method]["measure_s"] = round(time.perf_counter() - method_started, 3)
        proxies = proxy_report(model, ids, max(widths), full["ce"], results)
        tick("proxies")
    measured_s = time.perf_counter() - measured_started
    first = results[methods[0]]
    summary: dict[str, Any] = _finite(
        {
            "model": str(model_dir),
            "text": str(text_path),
            "text_tokens": len(ids),
            "max_tokens": max_tokens,
            "num_layers": n,
            "vocab_size": vocab,
            "ln_vocab": math.log(vocab) if vocab else None,  # zero-output's CE on a Llama, whatever the layer
            "block_widths": widths,
            "ablation": methods,
            "resample_seed": seed,
            "threads": threads,
            "full": full,
            # The first method's result at the top level too, as before --ablation existed, so
            # readers of older ablation JSON (and the report's figure) keep working.
            "method": methods[0],
            "layers": first["layers"],
            "blocks": first["blocks"],
            "ranking": first["ranking"],
            "anti_layers": first["anti_layers"],
            "seed_001": first["seed_001"],
            "methods": {
                method: {key: value for key, value in result.items() if key != "full"}
                for method, result in results.items()
            },
            "greedy": ({"steps": greedy, "protected": [0, n - 1], "by_method": greedy_rows} if greedy else None),
            "proxies": proxies,
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


def _methods(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each method's result; a JSON from before --ablation existed holds one, skip, at the top."""
    return summary.get("methods") or {summary.get("method", DEFAULT_METHOD): summary}


def _width(row: dict[str, Any]) -> int:
    first, last = row["removed"]
    return int(last) - int(first) + 1


def _rho(value: float | None) -> str:
    return "undefined" if value is None else f"{value:+.3f}"


def tables(summary: dict[str, Any]) -> list[Table]:
    """Per method: the most damaging layers, the anti-layers, the worst block of each width and
    seed 001's claims against them; then the greedy removal and the proxies' rank agreement."""
    methods = _methods(summary)
    out = []
    worst = Table(title=f"most damaging single layers (top {TOP}), PPL change when ablated")
    worst.add_column("rank", justify="right")
    for method in methods:
        worst.add_column(method, justify="right")
    for position in range(min(TOP, summary["num_layers"])):
        cells = []
        for result in methods.values():
            by_layer = {row["removed"]: row for row in result["layers"]}
            layer = result["ranking"][position]
            cells.append(f"L{layer} {_pct(by_layer[layer]['ppl_change_pct'])}")
        worst.add_row(str(position + 1), *cells)
    out.append(worst)

    anti = Table(title="anti-layers (ablation lowers CE) and the mildest layer")
    for column in ("method", "anti-layers", "mildest", "its PPL change", "L14", "L17"):
        anti.add_column(column, justify="right")
    for method, result in methods.items():
        by_layer = {row["removed"]: row for row in result["layers"]}
        mildest = by_layer[result["ranking"][-1]]
        anti.add_row(
            method,
            ", ".join(f"L{i}" for i in result["anti_layers"]) or "none",
            f"L{mildest['removed']}",
            _pct(mildest["ppl_change_pct"]),
            *(_pct(by_layer[i]["ppl_change_pct"]) if i in by_layer else "-" for i in PAPER_ANTI_LAYERS),
        )
    out.append(anti)

    if any(result["blocks"] for result in methods.values()):
        blocks = Table(title="most damaging block of each width")
        for column in ("method", "width", "removed", "CE", "PPL change", "least damaging", "its PPL change"):
            blocks.add_column(column, justify="right")
        for method, result in methods.items():
            for width in sorted({_width(r) for r in result["blocks"]}):
                rows = [r for r in result["blocks"] if _width(r) == width]
                hi = max(rows, key=_damage)
                lo = min(rows, key=_damage)
                blocks.add_row(
                    method,
                    str(width),
                    "L{}-L{}".format(*hi["removed"]),
                    _num(hi["ce"]),
                    _pct(hi["ppl_change_pct"]),
                    "L{}-L{}".format(*lo["removed"]),
                    _pct(lo["ppl_change_pct"]),
                )
        out.append(blocks)

    seed = Table(title=f"seed 001 ({summary['seed_001']['url']}) claims vs this run")
    for column in ("method", "claim", "paper", "measured", "verdict"):
        seed.add_column(column, justify="left")
    for method, result in methods.items():
        core, magnitude, antis = result["seed_001"]["claims"]
        seed.add_row(
            method,
            core["claim"],
            "L8-L11",
            "top 4: "
            + ", ".join(f"L{i}" for i in core["measured"]["top_4"])
            + "; core ranks: "
            + (", ".join(f"L{c['layer']} #{c['rank']}" for c in core["measured"]["core"]) or "-"),
            _verdict(core["holds"]),
        )
        m = magnitude["measured"]
        tied = m.get("layers_tied_with_worst") or 0
        span = m.get("importance_range_log10")
        seed.add_row(
            "",
            magnitude["claim"],
            f"{_pct(PAPER_MAX_CHANGE_PCT)}; range 10^{PAPER_IMPORTANCE_RANGE_LOG10:g}",
            (f"{_pct(m['max_ppl_change_pct'])} (L{m['layer']})" if m["layer"] is not None else "-")
            + (f", tied with {tied} other layers" if tied else "")
            + (f"; range 10^{span:.2f}" if span is not None else "; range undefined"),
            _verdict(magnitude["holds"]),
        )
        seed.add_row(
            "",
            antis["claim"],
            "L14, L17",
            "anti-layers: "
            + (", ".join(f"L{i}" for i in antis["measured"]["anti_layers"]) or "none")
            + "; "
            + (", ".join(f"L{r['layer']} {_pct(r['ppl_change_pct'])}" for r in antis["measured"]["layers"]) or "-"),
            _verdict(antis["holds"]),
            end_section=True,
        )
    out.append(seed)

    greedy = summary.get("greedy")
    if greedy:
        first, last = greedy["protected"]
        table = Table(title=f"greedy removal (SLEB-style; L{first} and L{last} protected): CE / PPL after each step")
        table.add_column("step", justify="right")
        for method in greedy["by_method"]:
            table.add_column(method, justify="right")
        for number in range(greedy["steps"]):
            table.add_row(
                str(number + 1),
                *(
                    f"-L{rows[number]['removed']}  {_num(rows[number]['ce'])} / {_num(rows[number]['ppl'], 2)}"
                    for rows in greedy["by_method"].values()
                ),
            )
        out.append(table)

    proxies = summary.get("proxies")
    if proxies:
        table = Table(
            title="cheap proxies vs measured damage: Spearman ρ with ΔCE (+1: ranks layers as ablation hurts)"
        )
        table.add_column("proxy", justify="left")
        table.add_column("against", justify="left")
        for method in methods:
            table.add_column(method, justify="right")
        keys = list(dict.fromkeys((r["proxy"], r["width"]) for r in proxies["spearman"]))
        for proxy, width in keys:
            by_method = {r["method"]: r for r in proxies["spearman"] if (r["proxy"], r["width"]) == (proxy, width)}
            n = next(iter(by_method.values()))["n"]
            table.add_row(
                "Block Influence" if proxy == "block_influence" else f"angular distance d(l, {width})",
                f"{n} single layers" if width == 1 else f"{n} blocks of {width}",
                *(_rho(by_method[m]["spearman"]) if m in by_method else "-" for m in methods),
            )
        out.append(table)
        choices = Table(title="the block angular distance would prune (smallest d, last token) vs the least damaging")
        choices.add_column("width", justify="right")
        choices.add_column("smallest d", justify="right")
        for method in methods:
            choices.add_column(f"least damaging ({method})", justify="right")
        for choice in proxies["pruning_choices"]:
            w = choice["width"]

            def span(first: int | None, w: int = w) -> str:
                return "-" if first is None else (f"L{first}" if w == 1 else f"L{first}-L{first + w - 1}")

            choices.add_row(
                str(w),
                f"{span(choice['predicted_first'])} (d {choice['d']:.3f})",
                *(span(choice["least_damaging_first"].get(m)) for m in methods),
            )
        out.append(choices)
    return out


def show(summary: dict[str, Any], console: Console) -> None:
    full = summary["full"]
    console.print(
        f"full model: CE {_num(full['ce'])} nats/token, PPL {_num(full['ppl'], 3)} "
        f"over {summary['text_tokens'] - 1} scored positions"
    )
    if "zero-output" in _methods(summary) and summary.get("ln_vocab") is not None:
        console.print(
            f"zero-output leaves a zero stream for good on a Llama: CE = ln V = {summary['ln_vocab']:.6f} "
            "whichever layer is zeroed"
        )
    for table in tables(summary):
        console.print(table)
