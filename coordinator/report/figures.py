"""The report's figures, drawn with matplotlib's object API (no pyplot state) into SVG.

Each function takes plain data (what results.json, sweep.json or an ablation JSON hold) and
returns a Figure; `to_svg` turns it into inline markup. Text stays text in the SVG (searchable,
crisp in print); ids are salted per figure so several SVGs can share one page.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, NullFormatter

from coordinator.massive import MASSIVE_RATIO
from coordinator.report import timeline as T
from coordinator.results import FLOOR_NAMES

# Okabe-Ito: distinguishable with the common colour-vision deficiencies and in greyscale print.
BLUE, ORANGE, GREEN, VERMILLION, PURPLE, SKY, YELLOW, GREY = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#D55E00",
    "#CC79A7",
    "#56B4E9",
    "#F0E442",
    "#777777",
)
SERIES = (BLUE, ORANGE, GREEN, PURPLE, VERMILLION, SKY)
WIDTH_IN = 7.2  # a journal's two-column width; the page scales it to the reader's window
STYLE: Any = {  # rcParams (typed as Any: matplotlib types the keys as one long Literal)
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 9.5,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "svg.fonttype": "none",
}


def new_figure(height_in: float, salt: str) -> Figure:
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(WIDTH_IN, height_in), layout="constrained")
    fig.set_label(salt)
    return fig


def to_svg(fig: Figure) -> str:
    """Inline SVG markup without the XML prolog; deterministic (no date, salted ids)."""
    buffer = io.StringIO()
    with matplotlib.rc_context({**STYLE, "svg.hashsalt": fig.get_label() or "fragsim"}):
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": "fragsim"})
    text = buffer.getvalue()
    start = text.find("<svg")
    return text[start:] if start >= 0 else text


def plain_ticks() -> FuncFormatter:
    """Tick labels 0.1, 1, 10, 1e+04: a new formatter per axis (matplotlib binds one to its axis)."""
    return FuncFormatter(lambda v, _: f"{v:.3g}")


def log_axis(ax: Any, axis: str = "y") -> None:
    """A log axis labelled 0.1, 1, 10, 1e+04 ...: mathtext tick labels (10^n) are slow to lay
    out, and minor labels crowd a short axis."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    plain = plain_ticks()
    target.set_major_formatter(plain)
    low, high = ax.get_ylim() if axis == "y" else ax.get_xlim()
    # within about a decade there may be no major tick at all: then the minor ones carry labels
    target.set_minor_formatter(plain if low > 0 and high / low < 20 else NullFormatter())


KL_LINEAR_BELOW = 1e-3  # nats/token: a KL axis is linear below this, logarithmic above


def symlog_axis(ax: Any) -> None:
    """A KL axis: logarithmic above KL_LINEAR_BELOW, linear down to the exact 0 of a checkpoint
    that equals the full model, labelled as log_axis labels."""
    ax.set_yscale("symlog", linthresh=KL_LINEAR_BELOW)
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(plain_ticks())


def styled() -> Any:
    """rcParams are read when artists are made: every figure is drawn inside this."""
    return matplotlib.rc_context(STYLE)


# ---- quality against active layers ---------------------------------------------------------


FLOOR_STYLE = {  # floor -> (colour, line style); its name is results.FLOOR_NAMES
    "uniform": (GREY, ":"),
    "unigram": (ORANGE, "-."),
    "embeddings": (PURPLE, (0, (5, 2, 1, 2))),
}


def floor_style(name: str) -> tuple[str, str, Any]:
    """(label, colour, line style) of a floor's line."""
    colour, style = FLOOR_STYLE.get(name, (GREY, ":"))
    return FLOOR_NAMES.get(name, name), colour, style


def floor_lines(ax: Any, floors: dict[str, dict[str, Any]], key: str, *, labelled: bool, linear: bool = False) -> None:
    """The floors' `key` (ce, kl, top1) as horizontal lines, labelled with their values on one
    panel of a figure (its legend collects them once). `linear`: on a linear axis a floor far
    above the data (the embeddings alone, ~100 nats) would flatten it: it is named in the legend
    as above the axis instead of drawn."""
    top = ax.get_ylim()[1]
    for name, q in floors.items():
        value = q.get(key)
        if value is None:
            continue
        label, colour, style = floor_style(name)
        text = f"{label} {value:.3f}" if labelled else None
        if linear and value > 2 * top:
            ax.plot([], [], color=colour, ls=style, lw=1.1, label=text and f"{text} (above the axis)")
            continue
        ax.axhline(value, color=colour, ls=style, lw=1.1, label=text)


def quality_curve(
    series: Sequence[dict[str, Any]],
    *,
    num_layers: int,
    vocab_size: int | None,
    full: dict[str, float] | None,
    gaps: Sequence[dict[str, Any]] = (),
    floors: dict[str, dict[str, Any]] | None = None,
) -> Figure:
    """CE, KL and top-1 on the eval text against active layers. `series`: {label, points:
    [{layers, ce, kl, top1}]}; `gaps`: the same for models with holes (drawn hollow); `floors`:
    name -> quality of the floors (drawn as lines; without them, ln V alone)."""
    fig = new_figure(2.7, "quality")
    with styled():
        axes = fig.subplots(1, 3, sharex=True)
        panels = (
            # log: the floors (the embeddings alone score ~100 nats on SmolLM2) and the full model
            # (~3) on one axis; symlog, because the final checkpoint's KL is exactly 0
            ("ce", "cross-entropy (nats/token)", "log"),
            ("kl", "KL to full (nats/token)", "symlog"),
            ("top1", "top-1 = full model (share)", "linear"),
        )
        for ax, (key, label, scale) in zip(axes, panels, strict=True):
            for i, s in enumerate(series):
                pts = [p for p in s["points"] if p.get(key) is not None]
                ax.plot(
                    [p["layers"] for p in pts],
                    [p[key] for p in pts],
                    marker="o",
                    ms=4,
                    lw=1.4,
                    color=SERIES[i % len(SERIES)],
                    label=s["label"],
                )
            gap_pts = [p for p in gaps if p.get(key) is not None]
            if gap_pts:
                ax.plot(
                    [p["layers"] for p in gap_pts],
                    [p[key] for p in gap_pts],
                    ls="none",
                    marker="D",
                    ms=5,
                    mfc="none",
                    color=VERMILLION,
                    label="with holes (gaps)",
                )
            if floors:
                floor_lines(ax, floors, key, labelled=key == "ce")
            elif key in ("ce", "kl") and vocab_size:
                uniform = f"uniform guess, ln {vocab_size:,}" if key == "ce" else None
                ax.axhline(math.log(vocab_size), color=GREY, ls=":", lw=1, label=uniform)
            if key == "ce" and full and full.get("ce") is not None:
                ax.axhline(full["ce"], color=GREEN, ls="--", lw=1, label=f"full model {full['ce']:.3f}")
            if key == "top1":
                ax.set_ylim(-0.03, 1.03)
            if scale == "log":
                log_axis(ax)
            elif scale == "symlog":
                symlog_axis(ax)
            ax.set_xlabel("active layers")
            ax.set_ylabel(label)
            ax.set_xlim(0, num_layers + 0.5)
        _legend_below(fig, axes)
    return fig


def _legend_below(fig: Figure, axes: Any, ncols: int = 4) -> None:
    """One legend under the axes for every labelled artist: none hides data."""
    seen: dict[str, Any] = {}
    for ax in np.atleast_1d(axes):
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen.keys()), loc="outside lower center", ncols=ncols, frameon=False)


# ---- quality over wall time ----------------------------------------------------------------


def _kl_steps(curve: dict[str, Any], right: float, key: str = "kl") -> tuple[list[float], list[float]]:
    """A step curve's corners: KL before the first checkpoint (when known) from 0 s, each
    checkpoint's KL from its time until the next, the last one held until `right`. With
    key="top1" the same for top-1 agreement, 0 before the first checkpoint."""
    pts = [p for p in curve["points"] if p.get(key) is not None]
    if not pts:
        return [], []
    xs = [float(p["t"]) for p in pts] + [max(right, float(pts[-1]["t"]))]
    ys = [float(p[key]) for p in pts] + [float(pts[-1][key])]
    before = curve.get("kl_before") if key == "kl" else 0.0
    if before is not None:
        xs, ys = [0.0, *xs], [float(before), *ys]
    return xs, ys


def quality_over_time(
    series: Sequence[dict[str, Any]], *, annotate: bool = False, floors: dict[str, dict[str, Any]] | None = None
) -> Figure:
    """KL to the full model (nats/token) against seconds since the first byte, as steps: a
    uniform guess (`kl_before`) until the first checkpoint, then each checkpoint's KL until the
    next. `series`: {label, curves: [{points: [{t, kl, layers}], kl_before, main}]}; a main
    curve is drawn thick with its checkpoints marked (and, with `annotate`, their active layers)
    and, when there is one series, its area shaded (the area is its kl_area; several overlapping
    shades would hide each other), the others thin. Linear y: the area under a line reads.
    `floors` (name -> quality): lines on both panels; the uniform guess is kl_before already."""
    fig = new_figure(4.6, "quality-time")
    with styled():
        ax, ax_top1 = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
        curves = [c for s in series for c in s["curves"] if c["points"]]
        right = max((float(p["t"]) for c in curves for p in c["points"]), default=0.0) * 1.06 or 1.0
        for i, s in enumerate(series):
            color = SERIES[i % len(SERIES)]
            for c in sorted((c for c in s["curves"] if c["points"]), key=lambda c: bool(c.get("main", True))):
                xs, ys = _kl_steps(c, right)
                top_xs, top_ys = _kl_steps(c, right, "top1")
                if not c.get("main", True):
                    ax.plot(xs, ys, drawstyle="steps-post", color=color, lw=0.8, alpha=0.35)
                    ax_top1.plot(top_xs, top_ys, drawstyle="steps-post", color=color, lw=0.8, alpha=0.35)
                    continue
                ax_top1.plot(top_xs, top_ys, drawstyle="steps-post", color=color, lw=1.8)
                ax.plot(xs, ys, drawstyle="steps-post", color=color, lw=1.8, label=s["label"])
                if len(series) == 1:
                    ax.fill_between(xs, ys, step="post", color=color, alpha=0.1, lw=0)
                pts = c["points"]
                ax.plot([p["t"] for p in pts], [p["kl"] for p in pts], ls="none", marker="o", ms=4, color=color)
                if annotate:
                    for p in pts:
                        ax.annotate(f"{p['layers']} L", (p["t"], p["kl"]), xytext=(3, 4), textcoords="offset points",
                                    fontsize=7, color=color)  # fmt: skip
        before = {round(float(c["kl_before"]), 9) for c in curves if c.get("kl_before") is not None}
        if len(before) == 1:
            level = before.pop()
            ax.axhline(level, color=GREY, ls=":", lw=1, label=f"no model yet (uniform guess): {level:.3f} nats/token")
        others = {k: v for k, v in (floors or {}).items() if k != "uniform"}
        floor_lines(ax, others, "kl", labelled=True, linear=True)
        floor_lines(ax_top1, others, "top1", labelled=False)
        ax.set_xlim(0, right)
        top = ax.get_ylim()[1] * (1.08 if annotate else 1.0)  # room for the labels of the highest markers
        ax.set_ylim(-0.03 * top, top)  # the final checkpoint's KL 0 shows above the axis
        ax_top1.set_xlabel("seconds since the first byte streamed")
        ax.set_ylabel("KL to full (nats/token)")
        ax_top1.set_ylabel("top-1 = full")
        ax_top1.set_ylim(-0.03, 1.05)
        _legend_below(fig, ax, ncols=2)
    return fig


# ---- holes skipped against the contiguous prefix ------------------------------------------


def gaps_vs_prefix(
    prefix: Sequence[dict[str, Any]],
    gaps: Sequence[dict[str, Any]],
    served: Sequence[dict[str, Any]],
    *,
    kl_before: float | None,
    floors: dict[str, dict[str, Any]] | None = None,
) -> Figure:
    """KL to the full model (top) and top-1 agreement (bottom) of the contiguous prefix and of
    the models with holes skipped: (a) against active layers, (b) against seconds since the
    first byte as steps. Points are {layers, kl, top1, t}; `served` is what a gaps run has at
    each arrival (its gap model, else the prefix); without it (no times) panel (b) is left out.
    `floors` (name -> quality), but the uniform guess (kl_before), are lines on every panel."""
    others = {k: v for k, v in (floors or {}).items() if k != "uniform"}
    timed = bool(served)
    fig = new_figure(4.6, "gaps")
    with styled():
        axes = fig.subplots(2, 2 if timed else 1, sharex="col", squeeze=False)
        for row, (key, label) in enumerate((("kl", "KL to full (nats/token)"), ("top1", "top-1 = full"))):
            ax = axes[row, 0]
            pts = [p for p in prefix if p.get(key) is not None]
            # Dotted: between two prefix checkpoints nothing was measured (a forward run measures every one).
            ax.plot([p["layers"] for p in pts], [p[key] for p in pts], marker="o", ms=4, lw=1, ls=":", color=BLUE,
                    label="contiguous prefix")  # fmt: skip
            holes = [p for p in gaps if p.get(key) is not None]
            ax.plot([p["layers"] for p in holes], [p[key] for p in holes], ls="none", marker="D", ms=6, mfc="none",
                    mew=1.4, color=VERMILLION, label="every arrived layer, holes skipped")  # fmt: skip
            floor_lines(ax, others, key, labelled=key == "kl", linear=True)
            ax.set_ylabel(label)
            if key == "top1":
                ax.set_ylim(-0.03, 1.05)
                ax.set_xlabel("active layers")
            else:
                ax.set_title("(a) at equal layer count", loc="left")
            if not timed:
                continue
            tx = axes[row, 1]
            right = max(float(p["t"]) for p in [*prefix, *served]) * 1.06 or 1.0
            curves = (
                ({"points": list(prefix), "kl_before": kl_before}, BLUE, "-", "contiguous prefix"),
                (
                    {"points": list(served), "kl_before": kl_before},
                    VERMILLION,
                    "--",
                    "gaps run: its gap model, else the prefix",
                ),
            )
            for curve, color, ls, name in curves:
                xs, ys = _kl_steps(curve, right, key)
                tx.plot(xs, ys, drawstyle="steps-post", color=color, ls=ls, lw=1.6, label=name)
            tx.plot([p["t"] for p in pts], [p[key] for p in pts], ls="none", marker="o", ms=4, color=BLUE)
            timed_holes = [p for p in holes if p.get("t") is not None]
            tx.plot([p["t"] for p in timed_holes], [p[key] for p in timed_holes], ls="none", marker="D", ms=6,
                    mfc="none", mew=1.4, color=VERMILLION)  # fmt: skip
            for p in timed_holes:
                if key == "kl":
                    tx.annotate(f"{p['layers']} L", (p["t"], p[key]), xytext=(4, 4), textcoords="offset points",
                                fontsize=7, color=VERMILLION)  # fmt: skip
            if key == "kl" and kl_before is not None:
                tx.axhline(kl_before, color=GREY, ls=":", lw=1, label=f"no model yet (uniform guess): {kl_before:.3f}")
            floor_lines(tx, others, key, labelled=False, linear=True)
            tx.set_xlim(0, right)
            if key == "top1":
                tx.set_ylim(-0.03, 1.05)
                tx.set_xlabel("seconds since the first byte streamed")
            else:
                tx.set_title("(b) over wall-clock time", loc="left")
        _legend_below(fig, axes.ravel(), ncols=2)
    return fig


# ---- generation latency --------------------------------------------------------------------


def latency_run(checkpoints: Sequence[dict[str, Any]], baseline_s: float | None) -> Figure:
    """One run: per checkpoint, where its time went (snapshot, load, generate, quality)."""
    fig = new_figure(2.6, "latency-run")
    parts = (
        ("snapshot_s", "snapshot", SKY),
        ("load_s", "load", ORANGE),
        ("generate_s", "generate", BLUE),
        ("quality_s", "quality metrics", GREEN),
    )
    with styled():
        ax = fig.subplots()
        labels = [f"{c['layers']}" for c in checkpoints]
        x = list(range(len(checkpoints)))
        bottom = [0.0] * len(checkpoints)
        for key, name, color in parts:
            values = [float(c.get(key) or 0.0) for c in checkpoints]
            ax.bar(x, values, bottom=bottom, color=color, label=name, width=0.6)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        if baseline_s:
            ax.axhline(baseline_s, color=GREY, ls="--", lw=1, label=f"baseline generate {baseline_s:.2f} s")
        ax.set_xticks(x, labels)
        ax.set_xlabel("checkpoint (active layers)")
        ax.set_ylabel("seconds")
        _legend_below(fig, ax, ncols=5)
    return fig


def latency_sweep(series: Sequence[dict[str, Any]]) -> Figure:
    """A sweep: median generation seconds per checkpoint with its bootstrap 95 % CI as error
    bars; one series per fragment count (and order). `series`: {label, points: [{layers,
    median, low, high, n}]}."""
    fig = new_figure(2.8, "latency-sweep")
    with styled():
        ax = fig.subplots()
        offsets = [0.25 * (i - (len(series) - 1) / 2) for i in range(len(series))]
        for i, s in enumerate(series):
            pts = s["points"]
            xs = [p["layers"] + offsets[i] for p in pts]
            med = [p["median"] for p in pts]
            err = [[max(0.0, p["median"] - p["low"]) for p in pts], [max(0.0, p["high"] - p["median"]) for p in pts]]
            ax.errorbar(xs, med, yerr=err, marker="o", ms=4, capsize=3, lw=1.2, color=SERIES[i % len(SERIES)])
            ax.plot([], [], marker="o", color=SERIES[i % len(SERIES)], label=s["label"])
        log_axis(ax)
        ax.set_xlabel("active layers")
        ax.set_ylabel("generate s (median, 95 % CI)")
        _legend_below(fig, ax)
    return fig


# ---- the run's timeline --------------------------------------------------------------------

SPAN_STYLE = {
    T.ALIVE: (GREY, 0.18, 0.5),
    T.STREAMING: (BLUE, 0.85, 0.5),
    T.EVALUATING: (GREEN, 0.9, 0.5),
    T.GAP_EVALUATING: (PURPLE, 0.9, 0.5),
}
MARK_STYLE = {
    T.STARTED: ("|", GREY, 9),
    T.RESUMED: (">", ORANGE, 7),
    T.COMMITTED: ("o", GREEN, 6),
    T.KILLED: ("X", VERMILLION, 9),
    T.DEAD: ("v", "#000000", 7),
    T.RESTORED: ("s", ORANGE, 6),
    T.FINISHED: ("*", GREEN, 11),
}


def timeline(tl: T.Timeline) -> Figure:
    lanes = tl.lanes or [T.COORDINATOR_LANE]
    fig = new_figure(max(1.6, 0.42 * len(lanes) + 1.0), "timeline")
    row = {lane: len(lanes) - 1 - i for i, lane in enumerate(lanes)}
    with styled():
        ax = fig.subplots()
        shortest = tl.duration / 400 if tl.duration else 0.01  # a span too short to see still shows
        for kind in (T.ALIVE, T.STREAMING, T.EVALUATING, T.GAP_EVALUATING):
            color, alpha, height = SPAN_STYLE[kind]
            for s in tl.spans:
                if s.kind == kind and s.lane in row:
                    width = max(s.end - s.start, shortest)
                    # white edges keep back-to-back evaluations apart
                    edge = "white" if kind in (T.EVALUATING, T.GAP_EVALUATING) else "none"
                    ax.broken_barh(
                        [(s.start, width)],
                        (row[s.lane] - height / 2, height),
                        facecolor=color,
                        alpha=alpha,
                        edgecolor=edge,
                        lw=0.8,
                    )
                    if kind == T.EVALUATING and s.note and width > tl.duration / 25:
                        ax.text(s.start + width / 2, row[s.lane], s.note.split(": ")[-1].replace(" layers", " L"),
                                ha="center", va="center", fontsize=7, color="white")  # fmt: skip
        for kind, (marker, color, size) in MARK_STYLE.items():
            marks = [m for m in tl.marks if m.kind == kind and m.lane in row]
            if marks:
                ax.plot(
                    [m.t for m in marks], [row[m.lane] for m in marks], ls="none", marker=marker, ms=size, color=color
                )
        ax.set_yticks(list(row.values()), list(row.keys()))
        ax.set_ylim(-0.7, len(lanes) - 0.3)
        ax.set_xlim(0, max(tl.duration * 1.01, 0.1))
        ax.set_xlabel("seconds since the first logged line")
        ax.grid(axis="y", visible=False)
        kinds = {s.kind for s in tl.spans}
        handles: list[Any] = [
            Patch(color=SPAN_STYLE[k][0], alpha=SPAN_STYLE[k][1], label=k) for k in SPAN_STYLE if k in kinds
        ]
        present = {m.kind for m in tl.marks}
        handles += [
            Line2D([], [], ls="none", marker=m, color=c, ms=min(s, 8), label=k)
            for k, (m, c, s) in MARK_STYLE.items()
            if k in present
        ]
        fig.legend(handles=handles, loc="outside lower center", ncols=min(6, len(handles)), frameon=False)
    return fig


# ---- ablation ------------------------------------------------------------------------------


def ablation(
    layers: Sequence[dict[str, Any]],
    blocks: Sequence[dict[str, Any]],
    *,
    critical_core: Sequence[int],
    anti_layers: Sequence[int],
    measured_anti: Sequence[int],
) -> Figure:
    """PPL change per removed layer (symmetric log: an improvement is negative), seed 001's
    critical core shaded and its anti-layers marked; below, contiguous blocks by width."""

    def width(block: dict[str, Any]) -> int:  # a block's "removed" is its [first, last] layer
        first, last = block["removed"]
        return int(last) - int(first) + 1

    widths = sorted({width(b) for b in blocks} - {1})
    fig = new_figure(4.6 if widths else 2.8, "ablation")
    with styled():
        axes = fig.subplots(2 if widths else 1, 1, sharex=True, squeeze=False)[:, 0]
        ax = axes[0]
        xs = [row["removed"] for row in layers]
        ys = [row["ppl_change_pct"] for row in layers]
        colors = [VERMILLION if row["removed"] in measured_anti else BLUE for row in layers]
        if critical_core:
            ax.axvspan(min(critical_core) - 0.5, max(critical_core) + 0.5, color=ORANGE, alpha=0.2, lw=0)
        ax.bar(xs, ys, color=colors, width=0.75)
        for layer in anti_layers:
            if layer in xs:
                y = ys[xs.index(layer)]
                ax.annotate(
                    f"L{layer}",
                    (layer, y),
                    xytext=(0, 10),
                    textcoords="offset points",
                    ha="center",
                    color=PURPLE,
                    arrowprops={"arrowstyle": "-|>", "color": PURPLE, "lw": 0.8},
                )
        ax.set_yscale("symlog", linthresh=1.0)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,g}"))
        ax.set_ylabel("PPL change when removed (%)")
        ax.axhline(0, color="#000000", lw=0.6)
        handles: list[Any] = []
        if critical_core:
            handles.append(Patch(color=ORANGE, alpha=0.2, label="seed 001: critical core"))
        if anti_layers:
            handles.append(
                Line2D([], [], ls="none", marker=r"$\downarrow$", color=PURPLE, label="seed 001: anti-layers")
            )
        handles.append(Patch(color=BLUE, label="measured: removal hurts"))
        if measured_anti:
            handles.append(Patch(color=VERMILLION, label="measured: removal helps"))
        ax.legend(handles=handles, frameon=False, loc="upper right", ncols=2)
        if widths:
            bx = axes[1]
            for i, w in enumerate(widths):
                rows = sorted((b for b in blocks if width(b) == w), key=lambda b: b["removed"][0])
                bx.plot(
                    [b["removed"][0] for b in rows],
                    [b["ppl_change_pct"] for b in rows],
                    marker="o",
                    ms=3,
                    color=SERIES[(i + 1) % len(SERIES)],
                    label=f"{w} contiguous layers",
                )
            bx.plot(xs, ys, marker="o", ms=3, color=BLUE, lw=0.8, alpha=0.6, label="1 layer")
            bx.set_yscale("symlog", linthresh=1.0)
            bx.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,g}"))
            bx.set_ylabel("PPL change (%)")
            bx.legend(frameon=False, loc="upper right")
            bx.set_xlabel("first removed layer")
        else:
            ax.set_xlabel("removed layer")
    return fig


# ---- residual stream -----------------------------------------------------------------------


def residual(rows: Sequence[dict[str, Any]], *, reference: Sequence[float] = (), reference_label: str = "") -> Figure:
    """The residual stream per hidden-state index on the probe, log y. Above: std and max |a|
    over all positions and without position 0; below: max |a| / median |a| both ways, with
    Sun et al.'s 1000x line. Layers whose stream holds a massive activation are shaded. Rows
    from before the massive-activation keys get the upper panel only."""
    measured = any(r.get("max_over_median") is not None for r in rows)
    fig = new_figure(4.6 if measured else 2.7, "residual")
    with styled():
        axes = fig.subplots(2 if measured else 1, 1, sharex=True, squeeze=False, height_ratios=[3, 2][: 1 + measured])
        ax = axes[0, 0]
        idx = [r["index"] for r in rows]
        rest = [r.get("without_first") or {} for r in rows]
        ax.plot(idx, [r["std"] for r in rows], marker="o", ms=3.5, color=BLUE, label="std, all positions")
        peak = [max(abs(r["min"]), abs(r["max"])) for r in rows]
        ax.plot(idx, peak, marker=".", ms=3, lw=1.2, color=ORANGE, label="max |a|, all positions")
        if measured:
            _series(ax, idx, [w.get("std") for w in rest], marker="o", mfc="none", ms=3.5, ls="--", lw=1, color=BLUE,
                    label="std without position 0")  # fmt: skip
            _series(ax, idx, [(w.get("top") or [{}])[0].get("abs") for w in rest], marker=".", ms=3, ls="--", lw=1,
                    color=ORANGE, label="max |a| without position 0")  # fmt: skip
        if reference:
            ax.plot(
                range(len(reference)), reference, ls=":", lw=1.4, marker="s", ms=2.5, color=GREY, label=reference_label
            )
        log_axis(ax)
        ax.set_ylabel("residual-stream value")
        flagged = [r["index"] for r in rows if r.get("massive")]
        for lo, hi in index_runs(flagged):
            for a in axes[:, 0]:
                a.axvspan(lo - 0.5, hi + 0.5, color=VERMILLION, alpha=0.08, lw=0)
        if measured:
            bx = axes[1, 0]
            _series(bx, idx, [r.get("max_over_median") for r in rows], marker="o", ms=3.5, color=VERMILLION,
                    label="max |a| / median |a|, all positions")  # fmt: skip
            _series(bx, idx, [w.get("max_over_median") for w in rest], marker="o", mfc="none", ms=3.5, ls="--",
                    lw=1, color=PURPLE, label="max |a| / median |a|, without position 0")  # fmt: skip
            bx.axhline(MASSIVE_RATIO, color=GREY, ls=":", lw=1, label=f"massive: > {MASSIVE_RATIO:g} x median, > 100")
            marks = [(r["index"], r["max_over_median"]) for r in rows if r.get("massive")]
            marks += [(r["index"], w["max_over_median"]) for r, w in zip(rows, rest, strict=True) if w.get("massive")]
            if marks:
                bx.plot(*zip(*marks, strict=True), ls="none", marker="*", ms=9, color=VERMILLION,
                        label="massive activation (shaded above)")  # fmt: skip
                first = next(r for r in rows if r.get("massive"))
                top = first["top"][0]
                text = f"{top['abs']:,.0f} at position {top['position']}, dim {top['dim']}"
                ax.annotate(text, (first["index"], top["abs"]), xytext=(6, 4), textcoords="offset points", fontsize=7,
                            color=VERMILLION)  # fmt: skip
            log_axis(bx)
            bx.set_ylabel("max / median |a|")
        axes[-1, 0].set_xlabel("hidden state (0 = embeddings, i = after layer i−1)")
        _legend_below(fig, axes[:, 0], ncols=3)
    return fig


def _series(ax: Any, xs: Sequence[Any], ys: Sequence[Any], **style: Any) -> None:
    """A line through the points that have a value (None: not measured there)."""
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    if pts:
        ax.plot([x for x, _ in pts], [y for _, y in pts], **style)


def index_runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """[3, 4, 5, 9] as [(3, 5), (9, 9)]: contiguous runs, to shade each once."""
    runs: list[tuple[int, int]] = []
    for i in sorted(indices):
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


# ---- census --------------------------------------------------------------------------------


def census(parts: Sequence[tuple[str, int, int | None]]) -> Figure:
    """Parameters per component (millions), measured beside the seed's where it has one."""
    fig = new_figure(0.34 * len(parts) + 0.9, "census")
    with styled():
        ax = fig.subplots()
        ys = list(range(len(parts)))[::-1]
        ax.barh([y + 0.18 for y in ys], [p[1] / 1e6 for p in parts], height=0.36, color=BLUE, label="measured")
        seed = [(y, p[2]) for y, p in zip(ys, parts, strict=True) if p[2] is not None]
        if seed:
            ax.barh(
                [y - 0.18 for y, _ in seed], [v / 1e6 for _, v in seed], height=0.36, color=ORANGE, label="seed 004"
            )
        ax.set_yticks(ys, [p[0] for p in parts])
        ax.set_xlabel("parameters (millions)")
        ax.grid(axis="y", visible=False)
        _legend_below(fig, ax)
    return fig


# ---- the eval corpus (--eval-corpus) --------------------------------------------------------


def corpus_quality(
    points: Sequence[dict[str, Any]],
    floors: dict[str, Any],
    full: dict[str, Any] | None,
    *,
    tuned: Sequence[dict[str, Any]] = (),
) -> Figure:
    """Bits per byte and KL to the full model on the eval corpus against active layers, with
    document-bootstrap 95 % intervals, the KL tail (p99) and the floors as lines. `points`:
    [{layers, bits_per_byte, bits_per_byte_ci, kl: {mean, ci, p99}}]; `floors`: name -> summary."""
    fig = new_figure(2.9, "corpus")
    with styled():
        axes = fig.subplots(1, 2, sharex=True)
        bpb, kl = axes
        xs = [p["layers"] for p in points]
        ys = [p["bits_per_byte"] for p in points]
        lo = [y - p["bits_per_byte_ci"][0] for y, p in zip(ys, points, strict=True)]
        hi = [p["bits_per_byte_ci"][1] - y for y, p in zip(ys, points, strict=True)]
        bpb.errorbar(
            xs, ys, yerr=[lo, hi], marker="o", ms=4, lw=1.4, capsize=3, color=BLUE, label="checkpoint (95 % CI)"
        )
        with_kl = [p for p in points if p.get("kl")]
        if with_kl:
            kx = [p["layers"] for p in with_kl]
            km = [p["kl"]["mean"] for p in with_kl]
            klo = [m - p["kl"]["ci"][0] for m, p in zip(km, with_kl, strict=True)]
            khi = [p["kl"]["ci"][1] - m for m, p in zip(km, with_kl, strict=True)]
            kl.errorbar(kx, km, yerr=[klo, khi], marker="o", ms=4, lw=1.4, capsize=3, color=BLUE)
            kl.plot(
                kx,
                [p["kl"]["p99"] for p in with_kl],
                marker="^",
                ms=4,
                lw=1,
                ls="--",
                color=SKY,
                label="KL p99",
            )
        for name, summary in floors.items():
            label, colour, style = floor_style(name)
            bpb.axhline(
                summary["bits_per_byte"],
                color=colour,
                ls=style,
                lw=1.1,
                label=f"{label} {summary['bits_per_byte']:.2f}",
            )
            if summary.get("kl"):
                kl.axhline(summary["kl"]["mean"], color=colour, ls=style, lw=1.1)
        if full:
            bpb.axhline(
                full["bits_per_byte"], color=GREEN, ls="--", lw=1, label=f"full model {full['bits_per_byte']:.3f}"
            )
        if tuned:
            bpb.plot([p["layers"] for p in tuned], [p["bits_per_byte"] for p in tuned], marker="s", ms=4, lw=1.2,
                     color=VERMILLION, label="tuned lens")  # fmt: skip
            kl.plot([p["layers"] for p in tuned], [p["kl"]["mean"] for p in tuned], marker="s", ms=4, lw=1.2,
                    color=VERMILLION)  # fmt: skip
        bpb.set_ylabel("bits per byte (lm-eval)")
        kl.set_ylabel("KL to full (nats/token)")
        log_axis(bpb)
        symlog_axis(kl)
        for ax in axes:
            ax.set_xlabel("active layers")
        _legend_below(fig, axes, ncols=3)
    return fig
