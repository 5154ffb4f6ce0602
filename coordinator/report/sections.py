"""What the report says about each kind of input: a run, a sweep, an ablation.

Each `*_sections` function adds headed sections to a Page from the input's own JSON (and, for
a run, its logs); none re-measures anything. Anchors carry a prefix so several inputs can
share one page.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from coordinator.massive import RULE_TEXT
from coordinator.report import corpus, gaps, seeds, selfcheck
from coordinator.report import figures as F
from coordinator.report import timeline as T
from coordinator.report.page import Page
from coordinator.report.sources import AblationSource, RunSource, SweepSource


def _fmt(value: Any, spec: str = ".4g") -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def _completion(text: Any, limit: int = 60) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


# ---- a run ---------------------------------------------------------------------------------


def run_title(src: RunSource) -> tuple[str, str]:
    r = src.results
    if r is None:
        return f"fragsim run {src.run_dir.name}", "the run has no results.json yet (it did not finish)"
    run, model = r["run"], r["run"]["model"]
    lede = (
        f"{model['name']}: {model['num_layers']} layers, {model['num_parameters']:,} parameters, {model['dtype']}; "
        f"{len(run['ranges'])} fragments {', '.join(run['ranges'])}; launch order {run.get('order')}, "
        f"arrival order {run.get('arrival_order')}."
    )
    return f"fragsim run {run['run_id']}", lede


def run_sections(page: Page, src: RunSource, prefix: str = "run") -> None:
    r = src.results
    page.section(f"{prefix}-summary", "Run")
    if r is None:
        page.verdict(
            f"{src.run_dir}: no results.json, so the run did not finish (the coordinator was killed, or is still "
            f"running). Its logs are drawn below; `fragsim resume {src.run_dir}` finishes it.",
            good=False,
        )
        _timeline_section(page, src, prefix)
        return
    final = r["final"]
    exact = bool(r.get("final_matches_baseline"))
    if exact:
        page.verdict(
            f"The final checkpoint is bit-identical to the source: {final.get('tensors_checked')} tensor digests in "
            f"{final.get('files_checked')} files match the plan, logits max |Δ| = {final.get('logits_max_abs_diff')} "
            f"over {final.get('logits_positions')} positions, greedy tokens identical.",
            good=True,
        )
    elif not final.get("complete"):
        page.verdict(
            f"Incomplete: fragments {', '.join(final.get('missing_ranges') or [])} never arrived; the longest prefix "
            f"was evaluated. `fragsim resume {src.run_dir}` can finish it from the staged pieces.",
            good=False,
        )
    else:
        page.verdict(
            f"The final checkpoint does NOT match the source: tensor digests {final.get('tensor_digests_match')}, "
            f"logits max |Δ| {final.get('logits_max_abs_diff')}, tokens identical {final.get('tokens_identical')}.",
            good=False,
        )
    _self_check(page, r, src)
    run, base = r["run"], r["baseline"]
    launcher = src.launcher or {}
    kills = launcher.get("kills") or []
    transfer = [f["transfer_s"] for f in r["fragments"] if f.get("transfer_s")]
    page.facts(
        [
            ("model", f"{run['model']['name']} ({run['model'].get('source_dir', '')})"),
            ("prompt", f"{run['prompt']!r}, {run['max_new_tokens']} greedy tokens, {run['threads']} threads"),
            ("baseline completion", f"{base['text']!r} ({base['seconds']:.2f} s)"),
            ("eval text", f"{base.get('quality', {}).get('tokens', '–')} scored positions"),
            ("transport", "ZeroMQ with CURVE" if run.get("curve", True) else "ZeroMQ without CURVE"),
            ("faults", ", ".join(_kill_text(k) for k in kills) or "none"),
            ("coordinator resumes", launcher.get("resumes", 0)),
            ("fragment transfer", f"{sum(transfer):.2f} s in all" if transfer else "–"),
        ]
    )
    _quality_section(page, r, prefix, src.vocab_size)
    corpus.corpus_section(page, r, prefix)
    _quality_time_section(page, r, prefix)
    gaps.gaps_section(page, r, prefix)
    _latency_section(page, r, prefix)
    _timeline_section(page, src, prefix)
    _residual_section(page, r, prefix)
    _census_section(page, r, prefix)


def _self_check(page: Page, r: dict[str, Any], src: RunSource) -> None:
    checks = selfcheck.run_checks(r, selfcheck.plan_tensor_digests(src.run_dir))
    page.table(
        ["self-check", "measured", "result"],
        [[c.name, c.measured, c.verdict] for c in checks],
        caption=f"Self-check, {sum(c.passed for c in checks)} of {len(checks)} pass: whether the figures below "
        "measure what they claim to.",
    )


def _kill_text(kill: dict[str, Any]) -> str:
    if kill.get("target") == "coordinator":
        return f"coordinator SIGKILLed at {kill.get('at')} of all bytes"
    return f"agent {kill.get('fragment')} SIGKILLed at {kill.get('fraction')} of its bytes"


def checkpoint_points(checkpoints: Sequence[dict[str, Any]], layers_key: str = "layers") -> list[dict[str, Any]]:
    return [
        {"layers": c[layers_key], **{k: c["quality"].get(k) for k in ("ce", "kl", "top1")}}
        for c in checkpoints
        if isinstance(c.get("quality"), dict)
    ]


def tuned_points(checkpoints: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Checkpoints read through a fitted tuned lens, as quality points; the last (full) one joins
    them unlensed, where both lenses meet."""
    out = [
        {"layers": c["layers"], **{k: c["quality"]["tuned"].get(k) for k in ("ce", "kl", "top1")}}
        for c in checkpoints
        if (c.get("quality") or {}).get("tuned", {}).get("fitted")
    ]
    if out and checkpoints and "tuned" not in (checkpoints[-1].get("quality") or {}):
        out += checkpoint_points(checkpoints[-1:])
    return out


def _quality_section(page: Page, r: dict[str, Any], prefix: str, vocab_size: int | None) -> None:
    checkpoints = r["checkpoints"]
    points = checkpoint_points(checkpoints)
    if not points:
        return
    page.section(f"{prefix}-quality", "Quality against active layers")
    num_layers = int(r["run"]["model"]["num_layers"])
    gaps = checkpoint_points(r.get("gap_checkpoints") or [], "num_layers")
    series = [{"label": "contiguous prefix (this run)", "points": points}]
    tuned = tuned_points(checkpoints)
    if tuned:
        series.append({"label": "the same prefix through the tuned lens", "points": tuned})
    fig = F.quality_curve(
        series,
        num_layers=num_layers,
        vocab_size=vocab_size,
        full=r["baseline"].get("quality"),
        gaps=gaps,
        floors=r["baseline"].get("quality_floors"),
    )
    tokens = r["baseline"].get("quality", {}).get("tokens")
    page.figure(
        f"{prefix}-quality",
        F.to_svg(fig),
        f"Each checkpoint of this run (one marker per arrival that grew the prefix) scored teacher-forced on the "
        f"held-out eval text ({tokens} positions): next-token cross-entropy in nats/token, "
        f"KL(full model ‖ checkpoint) in nats per position, and the share of positions whose argmax equals the full "
        f"model's. A truncated model applies the final norm and the head after its last active layer (the logit "
        f"lens). "
        + (
            f"Lines: the floors, {floor_caption(r['baseline']['quality_floors'])}."
            if r["baseline"].get("quality_floors")
            else "Dotted: ln V, the cross-entropy of a uniform guess and the largest KL a uniform guess can have."
        )
        + (" Hollow diamonds: every arrived layer with the missing ones skipped (--reassembly gaps)." if gaps else "")
        + (
            " Second line: the same prefixes read through the model's tuned lens (fragsim lens fit), an affine "
            "translator of the last residual state before the final norm: where it lies far below the logit lens, "
            "the full model's prediction is already in the prefix, in another basis."
            if tuned
            else ""
        ),
    )
    # Seed 000 is about a 30-layer model: its rows mean something only beside one as deep.
    seed_applies = num_layers == seeds.SEED_000["checkpoints"][-1]["layers"]
    seed_rows = {c["layers"]: c for c in seeds.SEED_000["checkpoints"]} if seed_applies else {}
    measured = {c["layers"]: c for c in checkpoints}
    n_tokens = len(r["baseline"]["tokens"])
    rows = []
    for layers in sorted(set(seed_rows) | set(measured)):
        s, c = seed_rows.get(layers), measured.get(layers)
        q = (c or {}).get("quality") or {}
        rows.append(
            [
                layers,
                s["label"] if s else "",
                _fmt(s["seconds"], ".2f") if s else "",
                c["label"] if c else "(no checkpoint here)",
                _fmt(c["generate_s"], ".3f") if c else None,
                f"{c['agree_tokens']}/{n_tokens}" if c else None,
                _fmt(q.get("ce"), ".3f"),
                _fmt(q.get("ppl"), ".3g"),
                _fmt(q.get("kl"), ".3f"),
                _fmt(q.get("top1"), ".3f"),
                _completion(c["text"]) if c else s["text"] if s else "",
            ]
        )
    page.table(
        [
            "active layers",
            "seed 000 label",
            "seed 000 s",
            "measured label",
            "generate s",
            "tokens = baseline",
            "CE",
            "PPL",
            "KL",
            "top-1",
            "completion",
        ],
        rows,
        caption=(
            f"Seed 000 ({seeds.SEED_000['model']}, {', '.join(seeds.SEED_000['ranges'])}, their machine) beside "
            "this run's checkpoints, joined on active layers. CE and KL in nats/token on the eval text."
            if seed_applies
            else "This run's checkpoints (seed 000's table is about a 30-layer model, so it is left out). CE and KL "
            "in nats/token on the eval text."
        ),
        numeric=(0, 2, 4, 6, 7, 8, 9),
    )


def time_curve(checkpoints: Sequence[dict[str, Any]], kl_before: Any) -> dict[str, Any]:
    """A run's KL over time: (seconds since the first byte, KL, active layers) of each checkpoint
    that has both, and the uniform guess's KL before the first one (None when unknown)."""
    points = [
        {
            "t": float(c["since_start_s"]),
            "kl": float(c["quality"]["kl"]),
            "top1": c["quality"].get("top1"),
            "layers": c["layers"],
        }
        for c in checkpoints
        if isinstance(c.get("since_start_s"), (int, float))
        and isinstance((c.get("quality") or {}).get("kl"), (int, float))
    ]
    return {"points": points, "kl_before": kl_before if isinstance(kl_before, (int, float)) else None}


def link_label(schedule: Any, link_mb_s: Any, bandwidth: Any = None) -> str:
    """How the bytes travelled: "prefix, link 2 MB/s", or "no link limit" (schedule None: the
    link alone, "link 2 MB/s")."""
    if link_mb_s is None:
        words = "no link limit"
    else:
        words = (f"{schedule}, " if schedule else "") + f"link {link_mb_s:g} MB/s"
    return words + (f", agent uplinks {bandwidth} MB/s" if bandwidth else "")


KL_OVER_TIME = (
    "KL(full model ‖ model) on the held-out eval text, in nats/token, against seconds since the first byte was "
    "streamed: until the first checkpoint there is no model, only a uniform guess (dotted: ln V − H(full)); "
    "each checkpoint's KL then holds until the next, and the final one is the full model (KL 0). Below: the share "
    "of eval positions whose most likely next token is the full model's (top-1 agreement; 0 before the first "
    "checkpoint), the same way."
)


def floor_caption(floors: dict[str, Any]) -> str:
    """What each floor of the eval text is, for a figure's caption."""
    parts = {
        "uniform": "a uniform guess over the vocabulary (CE ln V, the largest KL any guess can have)",
        "unigram": "a unigram model (add-one smoothed token frequencies"
        + (f" of the fit set of {floors['unigram']['fit']['name']}" if "fit" in floors.get("unigram", {}) else "")
        + ")",
        "embeddings": "the embeddings alone, k = 0 (the final norm and lm_head applied to the token embeddings)",
    }
    return "; ".join(parts[name] for name in floors if name in parts)


def _quality_time_section(page: Page, r: dict[str, Any], prefix: str) -> None:
    progressive = r.get("progressive") or {}
    curve = time_curve(r["checkpoints"], progressive.get("kl_no_model"))
    if not curve["points"]:  # results from before since_start_s, or no quality figures
        return
    page.section(f"{prefix}-quality-time", "Quality over time")
    label = link_label(
        progressive.get("schedule") or "arrival", progressive.get("link_mb_s"), progressive.get("bandwidth")
    )
    area = r.get("kl_area")
    area_text = f"{area:.3f} nats·s" if isinstance(area, (int, float)) else "unknown"
    floors = r["baseline"].get("quality_floors")
    fig = F.quality_over_time([{"label": label, "curves": [{**curve, "main": True}]}], annotate=True, floors=floors)
    page.figure(
        f"{prefix}-quality-time",
        F.to_svg(fig),
        f"{KL_OVER_TIME} This run ({label}): markers are its checkpoints, labelled with their active layers; the "
        f"shaded area is its KL area, {area_text} (the smaller, the sooner a good model was there).",
    )
    page.table(
        ["schedule", "link MB/s", "first checkpoint s", "final checkpoint s", "KL area (nats·s)"],
        [
            [
                progressive.get("schedule") or "none (no link limit)",
                _fmt(progressive.get("link_mb_s"), "g") or "unlimited",
                _fmt(progressive.get("first_checkpoint_s"), ".3f"),
                _fmt(progressive.get("final_checkpoint_s"), ".3f"),
                _fmt(area, ".3f"),
            ]
        ],
        caption="Seconds from the first byte streamed until the first and the final checkpoint were committed, and "
        "the area under the curve above.",
        numeric=(1, 2, 3, 4),
    )


def _latency_section(page: Page, r: dict[str, Any], prefix: str) -> None:
    checkpoints = r["checkpoints"]
    if not checkpoints:
        return
    page.section(f"{prefix}-latency", "Latency per checkpoint")
    fig = F.latency_run(checkpoints, r["baseline"].get("seconds"))
    page.figure(
        f"{prefix}-latency",
        F.to_svg(fig),
        "Where each checkpoint's time went in this run, in seconds: writing the snapshot (hard links), loading or "
        "growing the live model, greedy generation of the completion, and the quality metrics. One run has one "
        "sample per checkpoint; `fragsim sweep` repeats runs and its report draws the median with a 95 % CI.",
    )


def _timeline_section(page: Page, src: RunSource, prefix: str) -> None:
    tl = src.timeline
    if not tl.spans:
        return
    page.section(f"{prefix}-timeline", "Timeline of agents, faults and evaluation")
    kills, deaths, resumes = (len(tl.marks_of(k)) for k in (T.KILLED, T.DEAD, T.RESUMED))
    restores = len(tl.marks_of(T.RESTORED))
    page.figure(
        f"{prefix}-timeline",
        F.to_svg(F.timeline(tl)),
        f"One lane per agent (every attempt of its fragment) and one for the coordinator (every process), in "
        f"seconds since the run's first logged line. Grey: the process runs; blue: an agent streams (WELCOME to "
        f"commit); green: the coordinator builds and scores a checkpoint. This run: {kills} SIGKILL(s), {deaths} "
        f"agent(s) declared dead, {resumes} agent resume(s), {restores} coordinator restore(s) from the sandbox.",
    )
    r = src.results
    if r is None:
        return
    rows = [
        [
            f["fragment"],
            f["layers"],
            f["status"],
            _fmt(f["bytes"] / 1e6, ".2f"),
            _fmt(f["resent_bytes"] / 1e6, ".2f"),
            _fmt(f["duplicate_bytes"] / 1e6, ".2f"),
            f["attempts"],
            f["deaths"],
            _fmt(f.get("lost_s"), ".2f"),
            _fmt(f.get("mb_per_s"), ".1f"),
        ]
        for f in r["fragments"]
    ]
    page.table(
        ["fragment", "layers", "status", "MB", "verified MB re-sent", "duplicate MB", "attempts", "deaths", "lost s"]
        + ["MB/s"],
        rows,
        caption="Per fragment: what arrived, what a fault cost (re-sent bytes of verified pieces, duplicates, time "
        "lost between a death and the next agent), and the transfer rate of its last attempt.",
        numeric=(0, 3, 4, 5, 6, 7, 8, 9),
    )


def _residual_section(page: Page, r: dict[str, Any], prefix: str) -> None:
    rows = r["baseline"].get("hidden_states") or []
    if not rows:
        return
    page.section(f"{prefix}-residual", "Residual stream per layer")
    reference = seeds.SEED_003["std"]
    # Drawn only beside a model of similar depth: otherwise its 33 points would squeeze this one's.
    comparable = len(rows) >= 0.75 * len(reference)
    fig = F.residual(
        rows,
        reference=reference if comparable else (),
        reference_label=f"seed 003 std: {seeds.SEED_003['model']} (another model)",
    )
    probe = r["run"].get("probe")
    agree = _checkpoint_rows_agree(r)
    page.figure(
        f"{prefix}-residual",
        F.to_svg(fig),
        f"Std and max |a| of the full model's residual stream over the probe {probe!r} (all positions and "
        f"dimensions, and without position 0), per hidden state, taken with hooks before the final norm; log scale. "
        + (
            "Dotted: seed 003's table for SmolLM2-360M-Instruct, a larger model, on the same probe (over all "
            "positions; its last entry is after the final norm). "
            if comparable
            else ""
        )
        + _massive_caption(rows)
        + agree,
    )
    _massive_table(page, rows)


def _massive_caption(rows: Sequence[dict[str, Any]]) -> str:
    """What the lower panel shows, in numbers: where the massive activations are and what they do to std."""
    if not any(row.get("max_over_median") is not None for row in rows):
        return ""
    flagged = [row for row in rows if row.get("massive")]
    text = (
        "Below: max |a| / median |a| over all positions and without position 0; dotted, Sun et al.'s line ("
        f"{RULE_TEXT}). "
    )
    if not flagged:
        return text + "No hidden state holds a massive activation. "
    peak = max(flagged, key=lambda row: row["top"][0]["abs"])
    top, rest = peak["top"][0], peak.get("without_first") or {}
    spans = ", ".join(
        f"{lo}–{hi}" if hi > lo else str(lo) for lo, hi in F.index_runs([row["index"] for row in flagged])
    )
    clean = not any((row.get("without_first") or {}).get("massive") for row in rows)
    return text + (
        f"Shaded: the hidden states {spans} hold a massive activation; the largest is {top['abs']:,.0f} at position "
        f"{top['position']}, dim {top['dim']} (hidden state {peak['index']}, {peak['max_over_median']:,.0f} x the "
        f"median, {100 * (peak.get('top_share_of_squares') or 0):.1f} % of the sum of squares), and std there is "
        f"{peak['std']:.4g} over all positions but {_fmt(rest.get('std'))} without position 0"
        + (", where nothing is massive. " if clean else ". ")
    )


def _massive_table(page: Page, rows: Sequence[dict[str, Any]]) -> None:
    flagged = [row for row in rows if row.get("massive") or (row.get("without_first") or {}).get("massive")]
    if not flagged:
        return

    def where(entry: dict[str, Any]) -> str:
        return f"{entry['abs']:,.1f} ({entry['position']}, {entry['dim']})"

    page.table(
        ["hidden state", "top 3 |a| (position, dim)", "max / median", "share of squares", "std", "w/o pos 0: std"]
        + ["w/o pos 0: top |a| (position, dim)", "w/o pos 0: max / median", "w/o pos 0: massive"],
        [
            [
                row["index"],
                "; ".join(where(e) for e in row["top"]),
                _fmt(row.get("max_over_median"), ",.0f"),
                _fmt(row.get("top_share_of_squares"), ".3f"),
                _fmt(row["std"]),
                _fmt(rest.get("std")),
                where(rest["top"][0]) if rest.get("top") else None,
                _fmt(rest.get("max_over_median"), ",.0f"),
                _yes_no(rest.get("massive")),
            ]
            for row in flagged
            for rest in [row.get("without_first") or {}]
        ],
        caption=f"The hidden states with a massive activation ({RULE_TEXT}) on the probe, the full model: the three "
        "largest entries, the largest one's multiple of the median |a| and its share of the sum of squares (std² + "
        "mean² times the entries), and the same stream without position 0.",
        numeric=(0, 2, 3, 4, 5, 7),
    )


def _checkpoint_rows_agree(r: dict[str, Any]) -> str:
    """A prefix's residual stream is the full model's up to its depth: check it on the record."""
    base = {row["index"]: row["std"] for row in r["baseline"].get("hidden_states") or []}
    worst = 0.0
    compared = 0
    for c in r["checkpoints"]:
        for row in c.get("hidden_states") or []:
            if row["index"] in base:
                worst = max(worst, abs(row["std"] - base[row["index"]]))
                compared += 1
    if not compared:
        return ""
    return f"The checkpoints' own rows ({compared} in all) equal these up to their depth: max |Δ std| = {worst:.3g}."


def _yes_no(flag: Any) -> str | None:
    """A flag as a table cell; None (not measured) stays empty."""
    return None if flag is None else "yes" if flag else "no"


def census_parts(census: dict[str, Any], seed_applies: bool) -> list[tuple[str, int, int | None]]:
    blocks = census.get("blocks") or []
    n = len(blocks)
    attention = sum(sum(b["attention"].values()) for b in blocks)
    mlp = sum(sum(b["mlp"].values()) for b in blocks)
    norms = sum(b["norms"] for b in blocks)
    s = seeds.SEED_004

    def seed(value: int) -> int | None:
        return value if seed_applies else None

    return [
        ("embeddings", int(census["embeddings"]), seed(s["embeddings"])),
        (f"attention ({n} blocks)", attention, seed(s["attention_per_block"] * s["blocks"])),
        (f"MLP ({n} blocks)", mlp, seed(s["mlp_per_block"] * s["blocks"])),
        (f"block norms ({n} blocks)", norms, seed(s["norms_per_block"] * s["blocks"])),
        ("final norm", int(census.get("final_norm", 0)), seed(s["final_norm"])),
        ("LM head (0 when tied)", int(census.get("lm_head", 0)), seed(s["lm_head"])),
    ]


def _census_section(page: Page, r: dict[str, Any], prefix: str) -> None:
    census = r.get("census")
    if not census:
        return
    page.section(f"{prefix}-census", "Parameter census")
    s = seeds.SEED_004
    applies = len(census.get("blocks") or []) == s["blocks"] and census.get("embeddings") == s["embeddings"]
    parts = census_parts(census, applies)
    page.figure(
        f"{prefix}-census",
        F.to_svg(F.census(parts)),
        "Parameters per component, in millions of parameters, counted from the plan's tensor shapes and checked "
        "against the source's bytes"
        + (", beside seed 004's figures for SmolLM2-135M." if applies else "; seed 004 describes another model."),
    )
    rows = [
        [name, f"{value:,}", f"{ref:,}" if ref is not None else "", _same(value, ref)] for name, value, ref in parts
    ]
    rows.append(
        [
            "total",
            f"{census['total']:,}",
            f"{s['total']:,}" if applies else "",
            _same(census["total"], s["total"] if applies else None),
        ]
    )
    page.table(
        ["component", "measured", "seed 004", "same"],
        rows,
        caption=(
            f"{census.get('tensors')} tensors, {census.get('tensor_bytes', 0):,} bytes; the count matches the bytes: "
            f"{census.get('bytes_match')}."
        ),
        numeric=(1, 2),
    )


def _same(value: int, ref: int | None) -> str:
    return "" if ref is None else ("yes" if value == ref else "NO")


# ---- a sweep -------------------------------------------------------------------------------


def sweep_title(src: SweepSource) -> tuple[str, str]:
    s = src.sweep
    schedules = f", schedules {s['schedules']}" if s.get("schedules") else ""
    link = f" over a shared {link_label(None, s['link_mb_s'], s.get('bandwidth'))}" if s.get("link_mb_s") else ""
    lede = (
        f"{s['model']}: fragment counts {s['fragments']}, orders {s['orders']}{schedules}, {s['trials']} trials "
        f"each{link}, {s['trials_run']} runs in {s.get('seconds', 0):.0f} s."
    )
    return f"fragsim sweep {src.sweep_dir.name}", lede


def _series_key(g: dict[str, Any]) -> tuple[int, str, str]:
    return (int(g["fragments"]), str(g["order"]), str(g.get("schedule") or ""))


def _series_label(k: tuple[int, str, str], s: dict[str, Any]) -> str:
    label = f"{k[0]} fragments" + ("" if len(s["orders"]) == 1 else f", {k[1]}")
    return label + (f", {k[2]}" if k[2] else "")


def sweep_sections(page: Page, src: SweepSource, prefix: str = "sweep") -> None:
    s = src.sweep
    page.section(f"{prefix}-summary", "Sweep")
    failed = s.get("trials_failed") or []
    good = bool(s.get("ok")) and bool(s.get("determinism_ok"))
    page.verdict(
        f"{s['trials_run']} real runs, {len(failed)} failed; greedy tokens identical in every trial of every "
        f"(fragments, layers): {s.get('determinism_ok')}.",
        good=good,
    )
    page.paragraph(str(s.get("note", "")))
    groups = s.get("groups") or []
    keys = sorted({_series_key(g) for g in groups})
    label = {k: _series_label(k, s) for k in keys}
    quality_series: list[dict[str, Any]] = []
    latency: list[dict[str, Any]] = []
    for k in keys:
        rows = sorted((g for g in groups if _series_key(g) == k), key=lambda g: g["layers"])
        points = [
            {
                "layers": g["layers"],
                **{q: (g.get("quality") or {}).get(q, {}).get("value") for q in ("ce", "kl", "top1")},
            }
            for g in rows
        ]
        quality_series.append({"label": label[k], "points": points})
        latency.append(
            {
                "label": label[k],
                "points": [
                    {
                        "layers": g["layers"],
                        "median": g["generate_s"]["median"],
                        "low": g["generate_s"]["ci95_of_median"][0],
                        "high": g["generate_s"]["ci95_of_median"][1],
                        "n": g["generate_s"]["n"],
                    }
                    for g in rows
                ],
            }
        )
    num_layers = max((g["layers"] for g in groups), default=0)
    if any(p.get("ce") is not None for series in quality_series for p in series["points"]):
        page.section(f"{prefix}-quality", "Quality against active layers, every split")
        page.figure(
            f"{prefix}-quality",
            F.to_svg(
                F.quality_curve(
                    quality_series,
                    num_layers=num_layers,
                    vocab_size=src.vocab_size,
                    full=None,
                    floors=s.get("quality_floors"),
                )
            ),
            "Every checkpoint of every split, on the held-out eval text: cross-entropy (nats/token), "
            "KL(full ‖ checkpoint) (nats per position) and top-1 agreement with the full model. These are "
            "deterministic, so one value stands for all trials. "
            + (
                f"Lines: the floors, {floor_caption(s['quality_floors'])}."
                if s.get("quality_floors")
                else "Dotted: ln V (a uniform guess)."
            ),
        )
    page.section(f"{prefix}-latency", "Generation latency with error bars")
    page.figure(
        f"{prefix}-latency",
        F.to_svg(F.latency_sweep(latency)),
        "Median greedy-generation seconds per checkpoint over the trials, with the percentile-bootstrap 95 % "
        f"confidence interval of the median as error bars (log scale; {s['trials']} trials per split, interleaved).",
    )
    rows = []
    for k in keys:
        for g in sorted((g for g in groups if _series_key(g) == k), key=lambda g: g["layers"]):
            gs = g["generate_s"]
            q = g.get("quality") or {}
            rows.append(
                [
                    g["fragments"],
                    g["order"],
                    g["layers"],
                    _value(g.get("label")),
                    _fmt(gs["median"], ".3f"),
                    f"[{gs['ci95_of_median'][0]:.3f}, {gs['ci95_of_median'][1]:.3f}]",
                    _fmt(gs.get("p95"), ".3f"),
                    gs["n"],
                    _fmt(q.get("ce", {}).get("value"), ".3f"),
                    _fmt(q.get("kl", {}).get("value"), ".3f"),
                    _fmt(q.get("top1", {}).get("value"), ".3f"),
                    "yes" if g.get("tokens_identical") else "NO",
                ]
            )
    page.table(
        [
            "fragments",
            "order",
            "layers",
            "label",
            "median s",
            "95 % CI",
            "p95 s",
            "n",
            "CE",
            "KL",
            "top-1",
            "same tokens",
        ],
        rows,
        caption="Per checkpoint (fragments, order, active layers): generation seconds over trials and the "
        "deterministic quality figures.",
        numeric=(0, 2, 4, 6, 7, 8, 9, 10),
    )
    if num_layers == seeds.SEED_000["checkpoints"][-1]["layers"]:
        _sweep_seed_000(page, groups)
    configs = s.get("configs") or []
    if configs:
        page.table(
            ["fragments", "order", "ranges", "trials", "transfer MB/s (median)", "first checkpoint s", "verdict s"],
            [
                [
                    c["fragments"],
                    c["order"] + (f", {c['schedule']}" if c.get("schedule") else ""),
                    ", ".join(c.get("ranges") or []),
                    c["trials"],
                    _fmt((c.get("transfer_mb_per_s") or {}).get("median"), ".1f"),
                    _fmt((c.get("first_checkpoint_s") or {}).get("median"), ".2f"),
                    _fmt((c.get("verdict_s") or {}).get("median"), ".2f"),
                ]
                for c in configs
            ],
            caption="Per split: median transfer rate and the times from launch to the first checkpoint and to the "
            "verdict.",
            numeric=(0, 3, 4, 5, 6),
        )
    _sweep_quality_time(page, s, prefix)
    if failed:
        page.table(
            ["fragments", "order", "trial", "exit code", "bit-exact", "error", "run directory"],
            [
                [
                    f.get(k)
                    for k in ("fragments", "order", "trial", "exit_code", "final_matches_baseline", "error", "run_dir")
                ]
                for f in failed
            ],
            caption="Trials that failed.",
        )


def _sweep_quality_time(page: Page, s: dict[str, Any], prefix: str) -> None:
    """One colour per configuration (per schedule with --schedules): every trial thin, the trial
    of the median KL area thick; then the seconds and KL areas over trials."""
    configs = [c for c in s.get("configs") or [] if ((c.get("progressive") or {}).get("kl_area") or {}).get("n")]
    if not configs:  # a sweep from before since_start_s and kl_area
        return
    trials = s.get("per_trial") or []
    series = []
    for c in configs:
        p = c["progressive"]
        key = _series_key(c)
        mine = [t for t in trials if _series_key({**t, "schedule": t.get("schedule")}) == key]
        curves = [
            {**time_curve(t.get("checkpoints") or [], (t.get("progressive") or {}).get("kl_no_model")),
             "main": t.get("trial") == p.get("median_trial")}
            for t in mine
        ]  # fmt: skip
        what = key[2] or ("arrival" if s.get("link_mb_s") else "no link limit")
        parts = ([f"{key[0]} fragments"] if len(s["fragments"]) > 1 else []) + (
            [key[1]] if len(s["orders"]) > 1 else []
        )
        area = p["kl_area"]["median"]
        series.append({"label": ", ".join([*parts, what]) + f": median KL area {area:.3f} nats·s", "curves": curves})
    page.section(f"{prefix}-quality-time", "Quality over time" + (", per schedule" if s.get("schedules") else ""))
    link = link_label(None, s.get("link_mb_s"), s.get("bandwidth"))
    page.figure(
        f"{prefix}-quality-time",
        F.to_svg(F.quality_over_time(series, floors=s.get("quality_floors"))),
        f"{KL_OVER_TIME} One colour per configuration"
        + (" (schedule)" if s.get("schedules") else "")
        + f", {s['trials']} trial(s) each, {link}: every trial thin, the trial with the median KL area (the lower "
        "middle one of an even count) thick with its checkpoints marked; the area under a line is that trial's KL "
        "area in nats·s, and the legend gives the median over trials.",
    )

    def stat(stats: dict[str, Any], spec: str) -> tuple[str | None, str | None]:
        if not stats.get("n"):
            return None, None
        low, high = stats["ci95_of_median"]
        return _fmt(stats["median"], spec), f"[{low:{spec}}, {high:{spec}}]"

    rows = []
    for c in configs:
        p = c["progressive"]
        row: list[Any] = [c["fragments"], c["order"], c.get("schedule") or "none"]
        row += [_fmt(p.get("link_mb_s"), "g") or "unlimited", p["kl_area"]["n"]]
        for figure in ("first_checkpoint_s", "final_checkpoint_s", "kl_area"):
            row += stat(p.get(figure) or {}, ".3f")
        rows.append(row)
    page.table(
        ["fragments", "order", "schedule", "link MB/s", "n", "first checkpoint s", "95 % CI", "final checkpoint s"]
        + ["95 % CI", "KL area (nats·s)", "95 % CI"],
        rows,
        caption="Per configuration, medians over trials with the percentile-bootstrap 95 % CI of the median: seconds "
        "from the first byte streamed to the first and to the final checkpoint, and the KL area.",
        numeric=(0, 3, 4, 5, 7, 9),
    )


def _value(field: Any) -> Any:
    """A sweep's deterministic figure is {value, identical}: the value."""
    return field.get("value") if isinstance(field, dict) else field


def _sweep_seed_000(page: Page, groups: Sequence[dict[str, Any]]) -> None:
    seed_rows = []
    four = {g["layers"]: g for g in groups if g["fragments"] == len(seeds.SEED_000["ranges"])}
    for c in seeds.SEED_000["checkpoints"]:
        g = four.get(c["layers"])
        seed_rows.append(
            [
                c["layers"],
                c["label"],
                _fmt(c["seconds"], ".2f"),
                _value(g.get("label")) if g else "(not in this sweep)",
                _fmt(g["generate_s"]["median"], ".3f") if g else None,
                f"[{g['generate_s']['ci95_of_median'][0]:.3f}, {g['generate_s']['ci95_of_median'][1]:.3f}]"
                if g
                else None,
            ]
        )
    page.table(
        ["active layers", "seed 000 label", "seed 000 s", "measured label", "median s", "95 % CI"],
        seed_rows,
        caption="Seed 000's checkpoint table (one run, their machine) beside this sweep's 4-fragment checkpoints.",
        numeric=(0, 2, 4),
    )


# ---- an ablation ---------------------------------------------------------------------------


def ablation_title(src: AblationSource) -> tuple[str, str]:
    a = src.ablation
    full = a["full"]
    methods = a.get("ablation") or [a.get("method", "skip")]
    lede = (
        f"{a['model']}: {a['num_layers']} layers, each ablated in turn by {', '.join(methods)} (and contiguous "
        f"blocks of {', '.join(str(w) for w in a.get('block_widths', []) if w > 1) or 'no other width'}), scored on "
        f"{a.get('text_tokens')} tokens of {a.get('text')}; full model CE {full['ce']:.4f} nats/token, PPL "
        f"{full['ppl']:.2f}."
    )
    return f"fragsim ablation {src.path.stem}", lede


def ablation_sections(page: Page, src: AblationSource, prefix: str = "ablation") -> None:
    a = src.ablation
    seed = a.get("seed_001") or {}
    page.section(f"{prefix}-layers", "Layer ablation")
    layers = a.get("layers") or []
    blocks = a.get("blocks") or []
    applies = a.get("num_layers") == seeds.SEED_001_LAYERS
    fig = F.ablation(
        layers,
        blocks,
        critical_core=seeds.CRITICAL_CORE if applies else (),
        anti_layers=seeds.PAPER_ANTI_LAYERS if applies else (),
        measured_anti=a.get("anti_layers") or [],
    )
    page.figure(
        f"{prefix}-layers",
        F.to_svg(fig),
        f"Perplexity change on the eval text, in %, when one decoder layer is ablated by "
        f"{a.get('method', 'skip')} (skip: removed, the rest kept in order), "
        "symmetric log scale (linear within ±1 %). "
        + (
            "Shaded: the critical core L8–L11 that seed 001 claims; arrows: its claimed anti-layers L14 and L17, "
            "whose removal it says lowers perplexity."
            if applies
            else f"Seed 001's claims are about a {seeds.SEED_001_LAYERS}-layer model and are not drawn."
        )
        + (" Below: removing contiguous blocks, by their first layer." if blocks else ""),
    )
    claims = seed.get("claims") or []
    page.table(
        ["claim (seed 001)", "paper", "measured here", "holds"],
        [
            [
                c["claim"],
                _compact(c.get("paper")),
                _compact(c.get("measured")),
                {True: "yes", False: "no"}.get(c.get("holds"), "n/a"),
            ]
            for c in claims
        ],
        caption=f"Seed 001 ({seed.get('title', '')}, {seed.get('url', '')}) against this ablation: "
        f"{seed.get('note', '')}.",
    )
    by_layer = {row["removed"]: row for row in layers}
    ranking = a.get("ranking") or []
    page.table(
        ["rank", "removed layer", "CE", "ΔCE (nats/token)", "PPL", "PPL change %"],
        [
            [
                i + 1,
                f"L{layer}",
                _fmt(by_layer[layer]["ce"], ".4f"),
                _fmt(by_layer[layer]["ce_change"], "+.4f"),
                _fmt(by_layer[layer]["ppl"], ".4g"),
                _fmt(by_layer[layer]["ppl_change_pct"], "+,.1f"),
            ]
            for i, layer in enumerate(ranking)
            if layer in by_layer
        ],
        caption=f"Every layer, most damaging first ({a.get('method', 'skip')}).",
        numeric=(0, 2, 3, 4, 5),
    )
    _ablation_methods_tables(page, a)


def _ablation_methods_tables(page: Page, a: dict[str, Any]) -> None:
    """Seed 001's verdicts per ablation method, ΔCE per layer per method beside the proxies,
    the greedy removal and the proxies' Spearman rho (JSON from before --ablation: none)."""
    methods: dict[str, Any] = a.get("methods") or {}
    if not methods:
        return
    verdict = {True: "yes", False: "no"}
    claims = [c["claim"] for c in (a.get("seed_001") or {}).get("claims") or []]
    page.table(
        ["claim (seed 001)", *methods],
        [
            [
                claim,
                *(
                    verdict.get(m["seed_001"]["claims"][i].get("holds"), "n/a") if m.get("seed_001") else "n/a"
                    for m in methods.values()
                ),
            ]
            for i, claim in enumerate(claims)
        ],
        caption="Seed 001's verdicts per ablation method: skip deletes the layer, zero-output zeroes its output "
        "(on a Llama the stream then stays zero, CE = ln V whichever layer), mean and resample replace its residual "
        "update by the update's mean over the positions or by another position's update.",
    )
    proxies = a.get("proxies") or {}
    bi = proxies.get("block_influence") or []
    d1 = (proxies.get("angular_distance") or {}).get("1") or []
    deltas = {name: {r["removed"]: r.get("ce_change") for r in m.get("layers") or []} for name, m in methods.items()}
    page.table(
        ["layer", "Block Influence", "d(l, 1)", *(f"ΔCE {name}" for name in methods)],
        [
            [
                f"L{i}",
                _fmt(bi[i] if i < len(bi) else None, ".4f"),
                _fmt(d1[i] if i < len(d1) else None, ".4f"),
                *(_fmt(deltas[name].get(i), "+.4f") for name in methods),
            ]
            for i in range(a.get("num_layers") or 0)
        ],
        caption="Per layer, in order: the cheap proxies from one pass of the full model (ShortGPT's Block "
        "Influence, all positions; Gromov et al.'s angular distance to the next layer, last position) beside the "
        "measured ΔCE (nats/token) of ablating the layer by each method.",
        numeric=tuple(range(1, 3 + len(methods))),
    )
    greedy = a.get("greedy")
    if greedy:
        by_method = greedy.get("by_method") or {}
        page.table(
            ["step", *by_method],
            [
                [
                    n + 1,
                    *(
                        f"−L{rows[n]['removed']}: CE {_fmt(rows[n]['ce'], '.4f')}, PPL {_fmt(rows[n]['ppl'], '.4g')}"
                        if n < len(rows)
                        else None
                        for rows in by_method.values()
                    ),
                ]
                for n in range(greedy.get("steps") or 0)
            ],
            caption="Greedy removal, SLEB-style: at each step the layer whose ablation (on top of the earlier ones) "
            f"leaves the lowest CE goes; layers {', '.join(f'L{i}' for i in greedy.get('protected') or [])} are kept.",
            numeric=(0,),
        )
    rows = proxies.get("spearman") or []
    if rows:
        keys = list(dict.fromkeys((r["proxy"], r["width"]) for r in rows))
        rho = {(r["proxy"], r["width"], r["method"]): r["spearman"] for r in rows}
        page.table(
            ["proxy", "against", *methods],
            [
                [
                    "Block Influence" if proxy == "block_influence" else f"angular distance d(l, {width})",
                    "single layers" if width == 1 else f"blocks of {width}",
                    *(
                        (_fmt(rho[proxy, width, name], "+.3f") or "undefined") if (proxy, width, name) in rho else None
                        for name in methods
                    ),
                ]
                for proxy, width in keys
            ],
            caption="Do the cheap proxies predict the damage? Spearman's rank correlation of each proxy with the "
            "measured ΔCE (+1: the proxy ranks the layers exactly as their ablation hurts; undefined when every "
            "ablation measured the same, as zero-output does).",
            numeric=tuple(range(2, 2 + len(methods))),
        )


def _compact(value: Any) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_compact(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "[" + ", ".join(_compact(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:,.4g}"
    return str(value)
