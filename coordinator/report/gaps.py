"""The run report's gaps section (`--reassembly gaps`): the model of every arrived layer with the
holes skipped beside the contiguous prefix, at equal layer count and over wall-clock time. Only
an arrival-driven run has both at every arrival, so only it can draw this."""

from __future__ import annotations

from typing import Any

from coordinator.report import figures as F
from coordinator.report.page import Page
from coordinator.results import step_area


def _fmt(value: Any, spec: str) -> str | None:
    return None if not isinstance(value, (int, float)) else format(value, spec)


def _point(record: dict[str, Any], layers: int, t: Any) -> dict[str, Any] | None:
    q = record.get("quality") or {}
    if not isinstance(q.get("kl"), (int, float)):
        return None
    return {"layers": layers, "kl": float(q["kl"]), "top1": q.get("top1"), "t": t}


def gap_series(r: dict[str, Any]) -> dict[str, Any]:
    """{prefix, gaps, served, kl_before}: the prefix checkpoints and the gap models as points
    {layers, kl, top1, t} (t: seconds since the first byte, None when unknown), and `served`,
    what a gaps run has at each arrival: its gap model, or the prefix when the arrival left no
    hole (then the two are one model)."""
    checkpoints = r.get("checkpoints") or []
    gaps = r.get("gap_checkpoints") or []
    prefix = [p for c in checkpoints if (p := _point(c, c["layers"], c.get("since_start_s")))]
    gap_points = [p for g in gaps if (p := _point(g, g["num_layers"], g.get("since_start_s")))]
    by_arrival = {g["arrival"]: g for g in gaps}
    by_layers = {c["layers"]: c for c in checkpoints}
    served = []
    for a in r.get("arrivals") or []:
        g = by_arrival.get(a.get("index"))
        if g is not None:
            p = _point(g, g["num_layers"], g.get("since_start_s", a.get("since_start_s")))
        elif a.get("layers") in by_layers:
            c = by_layers[a["layers"]]
            p = _point(c, c["layers"], a.get("since_start_s"))
        else:  # fragment 0 has not arrived: neither has a model yet
            p = None
        if p is not None:
            served.append(p)
    kl_before = (r.get("progressive") or {}).get("kl_no_model")
    return {"prefix": prefix, "gaps": gap_points, "served": served, "kl_before": kl_before}


def _area(points: list[dict[str, Any]], before: Any, key: str) -> float | None:
    if not points or not isinstance(before, (int, float)):
        return None
    values = [(p["t"], p[key] if key == "kl" else (None if p[key] is None else 1.0 - p[key])) for p in points]
    return step_area(values, float(before) if key == "kl" else 1.0)


SERIES = ("prefix", "served")  # the two step curves of panel (b), compared by their areas


def gaps_section(page: Page, r: dict[str, Any], prefix: str) -> None:
    series = gap_series(r)
    if not series["gaps"]:
        return
    page.section(f"{prefix}-gaps", "Holes skipped against the contiguous prefix")
    timed = all(isinstance(p["t"], (int, float)) for p in series["prefix"] + series["served"])
    fig = F.gaps_vs_prefix(
        series["prefix"],
        series["gaps"],
        series["served"] if timed else [],
        kl_before=series["kl_before"],
        floors=r["baseline"].get("quality_floors"),
    )
    areas = {k: (_area(series[k], series["kl_before"], "kl"), _area(series[k], 1.0, "top1")) for k in SERIES}
    area_text = ""
    if timed and None not in (*areas["prefix"], *areas["served"]):
        (kp, mp), (kg, mg) = areas["prefix"], areas["served"]
        area_text = (
            f" Areas up to the final checkpoint: KL {kg:.3f} nats·s with holes skipped against {kp:.3f} for the "
            f"prefix alone, top-1 misses {mg:.3f} s against {mp:.3f} s."
        )
    page.figure(
        f"{prefix}-gaps",
        F.to_svg(fig),
        "KL(full model ‖ model) on the held-out eval text in nats/token (top) and top-1 agreement with the full model "
        "(bottom), for the contiguous prefix (its checkpoints) and for every arrived layer with the missing ones "
        "skipped (hollow diamonds: --reassembly gaps). (a) Against active layers: at equal layer count, a diamond "
        "below the prefix means holes cost less than truncation; the dotted line only joins this run's prefix "
        "checkpoints (a prefix of a diamond's depth exists only in a run whose missing layers came first, e.g. "
        "--order forward). (b) Against seconds since the first byte "
        "streamed, as steps from the commit that made each model (a uniform guess before fragment 0): the prefix "
        "alone, and what a gaps run serves, its gap model after each arrival that left holes, else the prefix."
        + area_text,
    )
    by_layers = {c["layers"]: c for c in r.get("checkpoints") or []}
    arrivals = {a.get("index"): a for a in r.get("arrivals") or []}
    rows = []
    for g in r.get("gap_checkpoints") or []:
        q = g.get("quality") or {}
        held = by_layers.get((arrivals.get(g["arrival"]) or {}).get("layers"))
        hq = (held or {}).get("quality") or {}
        rows.append(
            [
                g["arrival"],
                _fmt(g.get("since_start_s"), ".3f"),
                g["num_layers"],
                ",".join(g.get("missing") or []),
                _fmt(q.get("kl"), ".3f"),
                _fmt(q.get("top1"), ".3f"),
                held["layers"] if held else None,
                _fmt(hq.get("kl"), ".3f"),
                _fmt(hq.get("top1"), ".3f"),
            ]
        )
    page.table(
        ["arrival", "at s", "layers (holes skipped)", "missing", "KL", "top-1", "prefix layers then", "prefix KL"]
        + ["prefix top-1"],
        rows,
        caption="Each arrival that left holes: the gap model's layers, what was missing, its KL (nats/token) and top-1 "
        "on the eval text, beside the contiguous prefix in force at the same moment.",
        numeric=(0, 1, 2, 4, 5, 6, 7, 8),
    )
