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

from coordinator.report import timeline as T

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


def log_axis(ax: Any, axis: str = "y") -> None:
    """A log axis labelled 0.1, 1, 10, 1e+04 ...: mathtext tick labels (10^n) are slow to lay
    out, and minor labels crowd a short axis."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    plain = FuncFormatter(lambda v, _: f"{v:.3g}")
    target.set_major_formatter(plain)
    low, high = ax.get_ylim() if axis == "y" else ax.get_xlim()
    # within about a decade there may be no major tick at all: then the minor ones carry labels
    target.set_minor_formatter(plain if low > 0 and high / low < 20 else NullFormatter())


def styled() -> Any:
    """rcParams are read when artists are made: every figure is drawn inside this."""
    return matplotlib.rc_context(STYLE)


# ---- quality against active layers ---------------------------------------------------------


def quality_curve(
    series: Sequence[dict[str, Any]],
    *,
    num_layers: int,
    vocab_size: int | None,
    full: dict[str, float] | None,
    gaps: Sequence[dict[str, Any]] = (),
) -> Figure:
    """CE, KL and top-1 on the eval text against active layers. `series`: {label, points:
    [{layers, ce, kl, top1}]}; `gaps`: the same for models with holes (drawn hollow)."""
    fig = new_figure(2.7, "quality")
    with styled():
        axes = fig.subplots(1, 3, sharex=True)
        panels = (
            ("ce", "cross-entropy (nats/token)", "linear"),
            ("kl", "KL to the full model (nats/token)", "linear"),
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
            if key == "ce" and vocab_size:
                ax.axhline(math.log(vocab_size), color=GREY, ls=":", lw=1, label=f"uniform guess, ln {vocab_size:,}")
            if key == "ce" and full and full.get("ce") is not None:
                ax.axhline(full["ce"], color=GREEN, ls="--", lw=1, label=f"full model {full['ce']:.3f}")
            if key == "kl" and vocab_size:
                ax.axhline(math.log(vocab_size), color=GREY, ls=":", lw=1)
            if key == "top1":
                ax.set_ylim(-0.03, 1.03)
            if scale == "log":
                log_axis(ax)
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


def quality_over_time(series: Sequence[dict[str, Any]], *, annotate: bool = False) -> Figure:
    """KL to the full model (nats/token) against seconds since the first byte, as steps: a
    uniform guess (`kl_before`) until the first checkpoint, then each checkpoint's KL until the
    next. `series`: {label, curves: [{points: [{t, kl, layers}], kl_before, main}]}; a main
    curve is drawn thick with its checkpoints marked (and, with `annotate`, their active layers)
    and, when there is one series, its area shaded (the area is its kl_area; several overlapping
    shades would hide each other), the others thin. Linear y: the area under a line reads."""
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
        ax.set_xlim(0, right)
        top = ax.get_ylim()[1] * (1.08 if annotate else 1.0)  # room for the labels of the highest markers
        ax.set_ylim(-0.03 * top, top)  # the final checkpoint's KL 0 shows above the axis
        ax_top1.set_xlabel("seconds since the first byte streamed")
        ax.set_ylabel("KL to full (nats/token)")
        ax_top1.set_ylabel("top-1 = full")
        ax_top1.set_ylim(-0.03, 1.05)
        _legend_below(fig, ax, ncols=2)
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
    """Std and max |a| of the residual stream per hidden-state index on the probe (log y)."""
    fig = new_figure(2.7, "residual")
    with styled():
        ax = fig.subplots()
        idx = [r["index"] for r in rows]
        ax.plot(idx, [r["std"] for r in rows], marker="o", ms=3.5, color=BLUE, label="std (this model)")
        peak = [max(abs(r["min"]), abs(r["max"])) for r in rows]
        ax.plot(idx, peak, marker=".", ms=3, ls="--", lw=1, color=ORANGE, label="max |a| (this model)")
        if reference:
            ax.plot(
                range(len(reference)), reference, ls=":", lw=1.4, marker="s", ms=2.5, color=GREY, label=reference_label
            )
        log_axis(ax)
        ax.set_xlabel("hidden state (0 = embeddings, i = after layer i−1)")
        ax.set_ylabel("residual-stream value")
        _legend_below(fig, ax, ncols=3)
    return fig


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
