"""`fragsim sweep`: repeated real runs per fragment count and launch order, summarised.

Each trial is a fresh real simulation (a coordinator process and agent processes, through
`run_quietly`), its run directory under OUT/runs/. Trials are interleaved (trial 1 of every
configuration, then trial 2, ...) so a slow spell of a shared machine spreads over all of them.

The summary (OUT/sweep.json, and OUT/sweep.md as tables) has, per (fragments, order, active
layers) — the number of active layers, not the checkpoint index, identifies a prefix when the
order is random — the generation seconds over trials (median, p95, min, max and a percentile
bootstrap 95 % CI of the median), the quality figures (deterministic: their value and whether
every trial had the same), and whether the greedy tokens were identical. Per (fragments,
layers), over every order, the determinism check: identical tokens in every trial, or the
trials that disagreed. Per (fragments, order): transfer MB/s, time to the first checkpoint and
to the verdict (bench.run_timeline), every trial's exit code and bit-exactness.

With --schedules (and --link, the coordinator's ingress every trial shares) a configuration is
(fragments, order, schedule), its agents start at once (--parallel is implied: a schedule only
decides something while several agents stream), and each one also gets, over trials, the seconds
from the first byte streamed to the first and to the final checkpoint (results.json
"since_start_s") and the area under KL-to-the-full-model over that time (results.json
"kl_area", nats·s), with the same statistics as the generation seconds.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from coordinator.lab.bench import _fragment_row, median_run, run_timeline
from coordinator.launch.options import SimulateOptions, check_link
from coordinator.launch.simulate import run_quietly
from coordinator.launch.terminal import wide_console
from coordinator.results import table as md_table
from coordinator.schedule import SCHEDULES
from protocol.errors import PlanError

ORDERS = ("forward", "reverse", "random")
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
QUALITY_KEYS = ("kl_to_baseline", "top1_agreement")
TIMING_KEYS = ("load_s", "snapshot_s", "score_s", "quality_s")
FAILURE_KEYS = ("fragments", "order", "trial", "exit_code", "final_matches_baseline", "error", "run_dir")
# Per configuration, over trials, from each run's results.json: seconds since the first byte to
# its first and final checkpoint, and the area under KL over that time (nats·s).
PROGRESSIVE_KEYS = ("first_checkpoint_s", "final_checkpoint_s", "kl_area", "top1_miss_area")


# ---- options --------------------------------------------------------------------------------


def parse_fragments(spec: str) -> list[int]:
    """'2,4,6' -> [2, 4, 6] (each at least 1, no repeats)."""
    try:
        counts = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise PlanError("--fragments", spec, "fragment counts separated by commas, e.g. 2,4,6") from None
    if not counts or any(n < 1 for n in counts) or len(set(counts)) != len(counts):
        raise PlanError("--fragments", spec, "distinct fragment counts of at least 1, e.g. 2,4,6")
    return counts


def parse_orders(spec: str) -> list[str]:
    """'forward,random' -> ['forward', 'random'] (each one of ORDERS, no repeats)."""
    orders = [x.strip() for x in spec.split(",") if x.strip()]
    if not orders or any(o not in ORDERS for o in orders) or len(set(orders)) != len(orders):
        raise PlanError("--orders", spec, f"distinct orders among {', '.join(ORDERS)}, e.g. forward,random")
    return orders


def parse_schedules(spec: str) -> list[str]:
    """'prefix,fair' -> ['prefix', 'fair'] (each one of coordinator.schedule.SCHEDULES, no repeats)."""
    schedules = [x.strip() for x in spec.split(",") if x.strip()]
    if not schedules or any(s not in SCHEDULES for s in schedules) or len(set(schedules)) != len(schedules):
        raise PlanError("--schedules", spec, f"distinct schedules among {', '.join(SCHEDULES)}, e.g. prefix,fair")
    return schedules


def check_link_axis(
    schedules: Sequence[str] | None, link: float | None, bandwidth: str | None, fragments: Sequence[int]
) -> None:
    """--schedules needs --link (a schedule decides who a limited link serves first); --link and
    --bandwidth are checked as `fragsim simulate` checks them, for every fragment count."""
    if schedules and link is None:
        raise PlanError(
            "--schedules", ",".join(schedules), "--link MB/s too (a schedule decides who a limited link serves first)"
        )
    for n in fragments:
        for schedule in schedules or [SimulateOptions.schedule]:
            check_link(SimulateOptions(fragments=n, link=link, bandwidth=bandwidth, schedule=schedule))


def trial_seed(seed: int, order: str, fragments: int, trial: int) -> int:
    """The launch-order seed of one trial: for random orders a different one per trial (derived
    from --seed), so the trials are independent draws; for the others --seed itself (unused)."""
    if order != "random":
        return seed
    return random.Random(f"sweep-{seed}-{fragments}-{trial}").randrange(2**31)


# ---- statistics -------------------------------------------------------------------------------


def bootstrap_ci(
    values: Sequence[float],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
    statistic: Callable[..., Any] = np.median,
) -> tuple[float, float] | None:
    """Percentile bootstrap CI of `statistic` (default the median) of `values`: resample with
    replacement `resamples` times (numpy, seeded), the central `confidence` share of the
    resampled statistics. None without values; one value gives (value, value)."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return None
    rng = np.random.default_rng(seed)
    samples = data[rng.integers(0, data.size, size=(resamples, data.size))]
    stats = statistic(samples, axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def timing_stats(values: Sequence[float], *, seed: int = 0) -> dict[str, Any]:
    """Median, p95 (numpy, linear interpolation), min, max and the bootstrap CI of the median."""
    if not values:
        return {"n": 0}
    data = np.asarray(values, dtype=float)
    ci = bootstrap_ci(values, seed=seed)
    assert ci is not None
    return {
        "n": int(data.size),
        "median": round(float(np.median(data)), 6),
        "p95": round(float(np.percentile(data, 95)), 6),
        "min": round(float(data.min()), 6),
        "max": round(float(data.max()), 6),
        "mean": round(float(data.mean()), 6),
        "ci95_of_median": [round(ci[0], 6), round(ci[1], 6)],
        "samples": [round(float(v), 6) for v in values],
    }


def _spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Median and range of a figure of each trial (None where a trial did not have it)."""
    have = [float(v) for v in values if isinstance(v, (int, float))]
    if not have:
        return {"median": None, "min": None, "max": None, "samples": list(values)}
    return {
        "median": round(float(np.median(have)), 6),
        "min": round(min(have), 6),
        "max": round(max(have), 6),
        "samples": list(values),
    }


def _same(values: Sequence[Any]) -> dict[str, Any]:
    """A figure that should be deterministic: the first trial's value, whether all were equal
    (compared as JSON, so NaN equals NaN), and the distinct values when they were not."""
    keys = [json.dumps(v, sort_keys=True) for v in values]
    out: dict[str, Any] = {"value": values[0] if values else None, "identical": len(set(keys)) <= 1}
    if not out["identical"]:
        out["distinct"] = [json.loads(k) for k in dict.fromkeys(keys)]
    return out


def check_determinism(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Greedy tokens of the same (fragments, layers) in every trial: each record has "trial",
    "tokens" (and optionally "order"). The first record is the reference; every record whose
    tokens differ is listed with the first position where they differ."""
    if not records:
        return {"trials": 0, "tokens_identical": True, "variants": 0, "disagreements": []}
    reference = records[0]
    ref_tokens = list(reference["tokens"])
    disagreements = []
    for record in records[1:]:
        tokens = list(record["tokens"])
        if tokens == ref_tokens:
            continue
        first = next(
            (i for i, (a, b) in enumerate(zip(tokens, ref_tokens, strict=False)) if a != b),
            min(len(tokens), len(ref_tokens)),
        )
        disagreements.append(
            {
                "trial": record.get("trial"),
                "order": record.get("order"),
                "reference_trial": reference.get("trial"),
                "reference_order": reference.get("order"),
                "first_difference": first,
                "tokens": tokens,
                "reference_tokens": ref_tokens,
            }
        )
    variants = len({tuple(r["tokens"]) for r in records})
    return {
        "trials": len(records),
        "tokens_identical": not disagreements,
        "variants": variants,
        "disagreements": disagreements,
    }


# ---- one trial ------------------------------------------------------------------------------


def run_trial(
    model: Path,
    root: Path,
    *,
    fragments: int,
    order: str,
    trial: int,
    seed: int,
    max_new_tokens: int | None = None,
    threads: int | None = None,
    schedule: str | None = None,
    link: float | None = None,
    bandwidth: str | None = None,
    parallel: bool = False,
) -> dict[str, Any]:
    """One fresh real run; its figures, or its exit code and error when it failed. `schedule`
    None: the run's default (arrival), and the record and run directory name no schedule."""
    options: dict[str, Any] = {}
    if max_new_tokens is not None:
        options["max_new_tokens"] = max_new_tokens
    if threads is not None:
        options["threads"] = threads
    if schedule is not None:
        options["schedule"] = schedule
    for key, value in (("link", link), ("bandwidth", bandwidth)):
        if value is not None:
            options[key] = value
    if parallel:
        options["parallel"] = True
    run_dir = root / (
        f"f{fragments}-{order}-t{trial}" if schedule is None else f"f{fragments}-{order}-{schedule}-t{trial}"
    )
    opts = SimulateOptions(
        model=str(model), run_dir=str(run_dir), fragments=fragments, order=order, seed=seed, **options
    )
    record: dict[str, Any] = {"fragments": fragments, "order": order, "trial": trial, "seed": seed}
    if schedule is not None:
        record["schedule"] = schedule
    launched = time.monotonic()
    started = time.perf_counter()
    try:
        code, results, run, output = run_quietly(opts, model)
    except Exception as exc:  # one broken trial is recorded, and the sweep goes on
        record.update(exit_code=None, error=f"{type(exc).__name__}: {exc}", final_matches_baseline=False)
        record.update(run_dir=str(run_dir.resolve()), wall_s=round(time.perf_counter() - started, 3))
        return record
    record.update(
        run_dir=str(run.run_dir),
        launch_order=list(run.order),
        exit_code=int(code),
        wall_s=round(time.perf_counter() - started, 3),
        final_matches_baseline=bool(results and results.get("final_matches_baseline")),
    )
    if results is None:
        record["error"] = output.strip().splitlines()[-1] if output.strip() else f"exit {code}, no results"
        return record
    frags = results["fragments"]
    seconds = sum(f.get("transfer_s") or 0.0 for f in frags)
    record.update(
        ranges=results["run"]["ranges"],
        arrival_order=results["run"]["arrival_order"],
        max_new_tokens=results["run"]["max_new_tokens"],
        threads=results["run"]["threads"],
        prompt=results["run"]["prompt"],
        baseline_generate_s=results["baseline"]["seconds"],
        baseline_tokens=results["baseline"]["tokens"],
        transfer_s=round(seconds, 6),
        transfer_mb_per_s=round(sum(f["bytes"] for f in frags) / seconds / 1e6, 1) if seconds else None,
        fragment_transfers=[_fragment_row(f) for f in frags],
        timeline=run_timeline(run.run_dir, launched),
        checkpoints=[_checkpoint_row(c) for c in results["checkpoints"]],
        kl_area=results.get("kl_area"),
        top1_miss_area=results.get("top1_miss_area"),
        progressive=results.get("progressive"),
        quality_floors=results["baseline"].get("quality_floors"),
    )
    return record


def _checkpoint_row(c: dict[str, Any]) -> dict[str, Any]:
    row = {
        k: c.get(k)
        for k in ("checkpoint", "layers", "label", "text", "tokens", "generate_s", *QUALITY_KEYS, *TIMING_KEYS)
    }
    if "since_start_s" in c:
        row["since_start_s"] = c["since_start_s"]
    if c.get("quality") is not None:
        row["quality"] = c["quality"]
    loaded = c.get("loaded")
    row["loaded"] = loaded.get("kind") if isinstance(loaded, dict) else None
    return row


# ---- the summary ----------------------------------------------------------------------------


def _group_seed(seed: int, fragments: int, order: str, layers: int | str, schedule: str | None = None) -> int:
    name = f"{order}" if schedule is None else f"{order}-{schedule}"  # without --schedules: as before
    return random.Random(f"sweep-ci-{seed}-{fragments}-{name}-{layers}").randrange(2**31)


def summarise_group(
    fragments: int,
    order: str,
    layers: int,
    rows: list[dict[str, Any]],
    *,
    seed: int = 0,
    schedule: str | None = None,
) -> dict[str, Any]:
    """One (fragments, order[, schedule], layers): `rows` are that checkpoint of each trial that
    had it, each with its "trial" beside the checkpoint's figures."""
    group: dict[str, Any] = {
        "fragments": fragments,
        "order": order,
        **({"schedule": schedule} if schedule is not None else {}),
        "layers": layers,
        "trials_counted": len(rows),
        "trials": [r["trial"] for r in rows],
        "generate_s": timing_stats(
            [r["generate_s"] for r in rows], seed=_group_seed(seed, fragments, order, layers, schedule)
        ),
    }
    for key in TIMING_KEYS:
        values = [r.get(key) for r in rows]
        if any(isinstance(v, (int, float)) for v in values):
            group[key] = _spread(values)
    for key in QUALITY_KEYS:
        group[key] = _same([r.get(key) for r in rows])
    with_quality = [r["quality"] for r in rows if isinstance(r.get("quality"), dict)]
    if with_quality:
        keys = list(dict.fromkeys(k for q in with_quality for k in q))
        group["quality"] = {k: _same([q.get(k) for q in with_quality]) for k in keys}
        group["quality"]["trials_with_quality"] = len(with_quality)
    determinism = check_determinism([{"trial": r["trial"], "order": order, "tokens": r["tokens"]} for r in rows])
    group["tokens_identical"] = determinism["tokens_identical"]
    group["label"] = _same([r.get("label") for r in rows])
    group["text"] = rows[0].get("text") if rows else None
    return group


def summarise(
    trials: list[dict[str, Any]],
    fragments: list[int],
    orders: list[str],
    seed: int,
    schedules: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The summary of `trials`; with `schedules` a configuration is (fragments, order, schedule)
    (trials carry "schedule"), without it (fragments, order) as before."""
    configs, groups, determinism = [], [], []
    axis: list[str | None] = list(schedules) if schedules else [None]
    for n in fragments:
        by_layers: dict[int, list[dict[str, Any]]] = {}
        for order in orders:
            for schedule in axis:
                mine = [
                    t for t in trials if t["fragments"] == n and t["order"] == order and t.get("schedule") == schedule
                ]
                configs.append(_summarise_config(n, order, mine, schedule=schedule, seed=seed))
                rows: dict[int, list[dict[str, Any]]] = {}
                for t in mine:
                    for c in t.get("checkpoints", []):
                        rows.setdefault(c["layers"], []).append({**c, "trial": t["trial"]})
                        by_layers.setdefault(c["layers"], []).append(
                            {"trial": t["trial"], "order": order, "tokens": c["tokens"]}
                        )
                groups += [
                    summarise_group(n, order, layers, rows[layers], seed=seed, schedule=schedule)
                    for layers in sorted(rows)
                ]
        for layers in sorted(by_layers):
            determinism.append({"fragments": n, "layers": layers, **check_determinism(by_layers[layers])})
    failed = [
        {**{k: t.get(k) for k in FAILURE_KEYS}, **({"schedule": t["schedule"]} if "schedule" in t else {})}
        for t in trials
        if t.get("exit_code") != 0 or not t.get("final_matches_baseline")
    ]
    determinism_ok = all(d["tokens_identical"] for d in determinism)
    return {
        "ok": not failed and determinism_ok and bool(trials),
        "trials_run": len(trials),
        "trials_failed": failed,
        "determinism_ok": determinism_ok,
        "groups": groups,
        "determinism": determinism,
        "configs": configs,
        # deterministic: every trial's baseline scores the same floors on the same text
        "quality_floors": next((t["quality_floors"] for t in trials if t.get("quality_floors")), None),
    }


def _progressive_values(trial: dict[str, Any]) -> dict[str, Any]:
    """One trial's seconds since the first byte to its first and final checkpoint, and its KL area."""
    p = trial.get("progressive") or {}
    return {
        "first_checkpoint_s": p.get("first_checkpoint_s"),
        "final_checkpoint_s": p.get("final_checkpoint_s"),
        "kl_area": trial.get("kl_area"),
        "top1_miss_area": trial.get("top1_miss_area"),
    }


def summarise_progressive(trials: list[dict[str, Any]], *, seed: int = 0, name: str = "") -> dict[str, Any]:
    """Per configuration over its trials: timing_stats of each PROGRESSIVE_KEYS figure (trials
    without it left out: "n" counts the others), the median trial by KL area (the lower middle
    one of an even count) and the link every trial shared."""
    values = [_progressive_values(t) for t in trials]
    out: dict[str, Any] = {}
    for key in PROGRESSIVE_KEYS:
        have = [float(v[key]) for v in values if isinstance(v[key], (int, float))]
        out[key] = timing_stats(have, seed=random.Random(f"sweep-progressive-{seed}-{name}-{key}").randrange(2**31))
    with_area = [
        {"trial": t["trial"], "kl_area": v["kl_area"]}
        for t, v in zip(trials, values, strict=True)
        if isinstance(v["kl_area"], (int, float))
    ]
    out["median_trial"] = median_run(with_area, "kl_area")["trial"] if with_area else None
    shared: dict[str, Any] = next((t["progressive"] for t in trials if isinstance(t.get("progressive"), dict)), {})
    out["link_mb_s"] = shared.get("link_mb_s")
    out["bandwidth"] = shared.get("bandwidth")
    return out


def _summarise_config(
    fragments: int, order: str, trials: list[dict[str, Any]], *, schedule: str | None = None, seed: int = 0
) -> dict[str, Any]:
    done = [t for t in trials if t.get("transfer_mb_per_s") is not None]
    transfer = median_run(done, "transfer_mb_per_s") if done else None
    timelines = [t.get("timeline") or {} for t in trials]
    return {
        "fragments": fragments,
        "order": order,
        **({"schedule": schedule} if schedule is not None else {}),
        "ranges": next((t["ranges"] for t in trials if t.get("ranges")), None),
        "trials": len(trials),
        "transfer_mb_per_s": {
            **_spread([t.get("transfer_mb_per_s") for t in trials]),
            # the median trial itself (the lower middle one of an even count), as bench reports it
            "median_trial": transfer["trial"] if transfer else None,
        },
        "first_checkpoint_s": _spread([tl.get("first_checkpoint_from_launch_seconds") for tl in timelines]),
        "first_checkpoint_from_first_process_start_s": _spread(
            [tl.get("first_checkpoint_from_first_process_start_seconds") for tl in timelines]
        ),
        "verdict_s": _spread([tl.get("verdict_from_launch_seconds") for tl in timelines]),
        "verdict_from_first_process_start_s": _spread(
            [tl.get("verdict_from_first_process_start_seconds") for tl in timelines]
        ),
        "wall_s": _spread([t.get("wall_s") for t in trials]),
        "baseline_generate_s": _spread([t.get("baseline_generate_s") for t in trials]),
        "exit_codes": [t.get("exit_code") for t in trials],
        "final_matches_baseline": [bool(t.get("final_matches_baseline")) for t in trials],
        "launch_orders": [t.get("launch_order") for t in trials],
        "seeds": [t["seed"] for t in trials],
        # from each run's results.json: seconds since its first byte, and the KL area (nats·s)
        "progressive": summarise_progressive(trials, seed=seed, name=f"{fragments}-{order}-{schedule}"),
    }


# ---- output -----------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    """Strict JSON: a non-finite float becomes the string "inf", "-inf" or "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return str(value)


def _ci(stats: dict[str, Any]) -> str:
    ci = stats.get("ci95_of_median")
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"


def _has_schedules(summary: dict[str, Any]) -> bool:
    return bool(summary.get("schedules"))


def _with_schedule(headers: list[str], summary: dict[str, Any]) -> list[str]:
    """With --schedules, a "schedule" column after "order": a configuration is (fragments, order, schedule)."""
    if not _has_schedules(summary):
        return headers
    at = headers.index("order") + 1
    return [*headers[:at], "schedule", *headers[at:]]


def _ids(row: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    ids = [str(row["fragments"]), row["order"]]
    return [*ids, str(row.get("schedule"))] if _has_schedules(summary) else ids


def _latency_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    for g in summary["groups"]:
        s = g["generate_s"]
        ppl = g.get("quality", {}).get("ppl", {}).get("value")
        rows.append(
            [
                *_ids(g, summary),
                str(g["layers"]),
                str(g["trials_counted"]),
                _num(s.get("median")),
                _num(s.get("p95")),
                _ci(s),
                f"{_num(s.get('min'))}–{_num(s.get('max'))}",
                "yes" if g["tokens_identical"] else "NO",
                _num(g["kl_to_baseline"]["value"], 4),
                _num(g["top1_agreement"]["value"], 2),
                f"{ppl:.4g}" if isinstance(ppl, (int, float)) else _num(ppl),
            ]
        )
    return rows


LATENCY_HEADERS = [
    "fragments",
    "order",
    "layers",
    "trials",
    "generate s median",
    "p95",
    "95% CI of median",
    "min–max",
    "tokens identical",
    "KL",
    "top1",
    "ppl",
]


def latency_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"generation seconds per checkpoint over trials (fragments × active layers), {summary['note']}")
    for header in _with_schedule(LATENCY_HEADERS, summary):
        table.add_column(header, justify="left" if header in ("order", "schedule") else "right")
    for row in _latency_rows(summary):
        table.add_row(*(("[red]NO[/]" if cell == "NO" else cell) for cell in row))
    return table


def _config_rows(summary: dict[str, Any]) -> list[list[str]]:
    return [
        [
            *_ids(c, summary),
            f"{_num(c['transfer_mb_per_s']['median'], 1)} ({_num(c['transfer_mb_per_s']['min'], 1)}–"
            f"{_num(c['transfer_mb_per_s']['max'], 1)})",
            _num(c["first_checkpoint_s"]["median"]),
            _num(c["verdict_s"]["median"]),
            _num(c["wall_s"]["median"]),
            ",".join(str(x) for x in c["exit_codes"]),
            f"{sum(c['final_matches_baseline'])}/{c['trials']}",
        ]
        for c in summary["configs"]
    ]


CONFIG_HEADERS = [
    "fragments",
    "order",
    "transfer MB/s median (range)",
    "first checkpoint s",
    "verdict s",
    "wall s",
    "exit codes",
    "bit-exact",
]


def config_table(summary: dict[str, Any]) -> Table:
    table = Table(title="per configuration (medians over trials; times from the launch of each run)")
    for header in _with_schedule(CONFIG_HEADERS, summary):
        table.add_column(header, justify="left" if header in ("order", "schedule") else "right")
    for row in _config_rows(summary):
        table.add_row(*row)
    return table


PROGRESSIVE_HEADERS = [
    "fragments",
    "order",
    "link MB/s",
    "trials",
    "first checkpoint s median [95% CI]",
    "final checkpoint s median [95% CI]",
    "KL area nats·s median [95% CI]",
    "top-1 miss area s median [95% CI]",
    "KL area min–max",
]
PROGRESSIVE_NOTE = (
    "seconds from the first byte streamed to the first and to the final checkpoint (results.json since_start_s), "
    "and the area under KL(full ‖ model) over that time (kl_area, nats·s; a uniform guess until the first "
    "checkpoint), and the area under 1 − top-1 agreement (top1_miss_area, s; 1 until the first checkpoint); "
    "medians over trials, CI = bootstrap 95% CI of the median (p95, min and max: sweep.json)"
)


def _has_progressive(summary: dict[str, Any]) -> bool:
    return any((c.get("progressive") or {}).get("kl_area", {}).get("n") for c in summary["configs"])


def _progressive_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    for c in summary["configs"]:
        p = c.get("progressive") or {}
        link = p.get("link_mb_s")
        row = [*_ids(c, summary), _num(link, 1) if link is not None else "unlimited", str(c["trials"])]
        for key in PROGRESSIVE_KEYS:
            stats = p.get(key) or {"n": 0}
            row.append(f"{_num(stats.get('median'))} {_ci(stats)}" if stats.get("n") else "-")
        area = p.get("kl_area") or {}
        row.append(f"{_num(area.get('min'))}–{_num(area.get('max'))}" if area.get("n") else "-")
        rows.append(row)
    return rows


def progressive_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"progressive arrival per configuration: {PROGRESSIVE_NOTE}")
    for header in _with_schedule(PROGRESSIVE_HEADERS, summary):
        table.add_column(header, justify="left" if header in ("order", "schedule") else "right")
    for row in _progressive_rows(summary):
        table.add_row(*row)
    return table


def render_markdown(summary: dict[str, Any]) -> str:
    out = [
        "# fragsim sweep",
        "",
        f"Model {summary['model']}, fragments {summary['fragments']}, orders {summary['orders']}, "
        + (f"schedules {summary['schedules']}, " if _has_schedules(summary) else "")
        + f"{summary['trials']} trials each, seed {summary['seed']}, {summary['max_new_tokens']} new tokens, "
        f"{summary['threads']} threads"
        + _link_words(summary)
        + f"; {summary['trials_run']} runs in {summary['seconds']} s.",
        "",
        f"**All trials completed and bit-exact: {not summary['trials_failed']}; "
        f"greedy tokens identical across trials: {summary['determinism_ok']}**",
        "",
        "## Generation seconds per checkpoint",
        "",
        summary["note"] + ".",
        "",
        md_table(_with_schedule(LATENCY_HEADERS, summary), _latency_rows(summary)),
        "",
        "## Per configuration",
        "",
        md_table(_with_schedule(CONFIG_HEADERS, summary), _config_rows(summary)),
        "",
    ]
    if _has_progressive(summary):
        out += [
            "## Progressive arrival",
            "",
            PROGRESSIVE_NOTE[0].upper() + PROGRESSIVE_NOTE[1:] + ".",
            "",
            md_table(_with_schedule(PROGRESSIVE_HEADERS, summary), _progressive_rows(summary)),
            "",
        ]
    bad = [d for d in summary["determinism"] if not d["tokens_identical"]]
    if bad:
        out += ["## Determinism failures", ""]
        for d in bad:
            for x in d["disagreements"]:
                out.append(
                    f"- {d['fragments']} fragments, {d['layers']} layers: trial {x['trial']} ({x['order']}) differs "
                    f"from trial {x['reference_trial']} ({x['reference_order']}) at token {x['first_difference']}"
                )
        out.append("")
    if summary["trials_failed"]:
        out += ["## Failed trials", ""]
        out += [
            f"- {t['fragments']} fragments, {t['order']}{_schedule_words(t)}, trial {t['trial']}: "
            f"exit {t['exit_code']}, bit-exact {t['final_matches_baseline']} {t.get('error') or ''} ({t['run_dir']})"
            for t in summary["trials_failed"]
        ]
        out.append("")
    return "\n".join(out)


def _schedule_words(row: dict[str, Any]) -> str:
    return f", schedule {row['schedule']}" if row.get("schedule") else ""


def _link_words(summary: dict[str, Any]) -> str:
    words = []
    if summary.get("link_mb_s") is not None:
        words.append(f"a shared link of {summary['link_mb_s']:g} MB/s")
    if summary.get("bandwidth") is not None:
        words.append(f"agent uplinks {summary['bandwidth']} MB/s")
    if summary.get("parallel"):
        words.append("every agent started at once")
    return (", " + ", ".join(words)) if words else ""


def _num_layers(model: Path) -> int:
    from agents.source import SourceCheckpoint

    source = SourceCheckpoint(model)
    try:
        return int(source.config["num_hidden_layers"])
    finally:
        source.close()


def sweep(
    model: Path,
    out: Path,
    *,
    fragments: list[int],
    trials: int,
    orders: list[str],
    seed: int = 0,
    max_new_tokens: int | None = None,
    threads: int | None = None,
    schedules: list[str] | None = None,
    link: float | None = None,
    bandwidth: str | None = None,
    parallel: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run every (fragments, order[, schedule]) `trials` times, interleaved; write and return the
    summary. `schedules` (needs `link`) implies `parallel`: a schedule shares the link among the
    agents that stream at once, and agents started one after another never share it."""
    console = console or wide_console()
    if trials < 1:
        raise PlanError("--trials", trials, "at least 1")
    check_link_axis(schedules, link, bandwidth, fragments)
    parallel = parallel or bool(schedules)
    num_layers = _num_layers(model)
    if max(fragments) > num_layers:
        raise PlanError("--fragments", max(fragments), f"at most the model's {num_layers} layers")
    root = out / "runs" / time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=False)
    d = SimulateOptions()
    summary: dict[str, Any] = {
        "model": str(model),
        "fragments": fragments,
        "orders": orders,
        "trials": trials,
        "seed": seed,
        "max_new_tokens": max_new_tokens if max_new_tokens is not None else d.max_new_tokens,
        "threads": threads if threads is not None else d.threads,
        "schedules": schedules or None,
        "link_mb_s": link,
        "bandwidth": bandwidth,
        "parallel": parallel,
        "runs_dir": str(root.resolve()),
        "statistics": {
            "groups": "per (fragments, order, active layers): a checkpoint is identified by its active layers",
            "generate_s.p95": "numpy percentile 95, linear interpolation, over trials",
            "generate_s.ci95_of_median": (
                f"percentile bootstrap {CONFIDENCE:.0%} CI of the MEDIAN generation seconds over trials, "
                f"{BOOTSTRAP_RESAMPLES} resamples, numpy default_rng seeded per group from --seed"
            ),
            "quality": "deterministic figures: the first trial's value, identical = every trial had the same",
            "determinism": "per (fragments, layers) over every order: greedy tokens identical in every trial",
            "times": "first_checkpoint_s / verdict_s from each run's launch (monotonic clock, its logs)",
            "progressive": (
                "per configuration: first_checkpoint_s / final_checkpoint_s = seconds from the first byte streamed "
                "to that checkpoint (results.json since_start_s), kl_area = area under KL(full || model) over that "
                "time in nats*s (results.json kl_area); median, p95, min, max and the bootstrap CI of the median "
                "over the trials that have it; median_trial = the trial of the median kl_area"
            ),
            "schedule": "trials interleaved: trial 1 of every configuration, then trial 2, ...",
        },
        "note": f"{trials} trial(s) per configuration; CI = bootstrap {CONFIDENCE:.0%} CI of the median",
    }
    records: list[dict[str, Any]] = []
    started = time.perf_counter()

    def save() -> None:  # after every trial: a sweep stopped half-way leaves what it measured
        summary.update(summarise(records, fragments, orders, seed, schedules))
        summary["seconds"] = round(time.perf_counter() - started, 1)
        summary["per_trial"] = records
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.json").write_text(json.dumps(_json_safe(summary), indent=1, allow_nan=False) + "\n")
        (out / "sweep.md").write_text(render_markdown(summary))

    axis: list[str | None] = list(schedules) if schedules else [None]
    queue = [(t, n, o, s) for t in range(trials) for n in fragments for o in orders for s in axis]
    shape = f"{fragments} fragments × {orders}" + (f" × {schedules}" if schedules else "")
    console.print(f"sweep: {len(queue)} real runs ({shape} × {trials} trials) of {model}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("sweep", total=len(queue))
        for t, n, order, schedule in queue:
            what = f"{n} fragments, {order}" + (f", {schedule}" if schedule else "")
            progress.update(task, description=f"trial {t + 1}/{trials}: {what}")
            record = run_trial(
                model,
                root,
                fragments=n,
                order=order,
                trial=t,
                seed=trial_seed(seed, order, n, t),  # the same across schedules: paired trials
                max_new_tokens=max_new_tokens,
                threads=threads,
                schedule=schedule,
                link=link,
                bandwidth=bandwidth,
                parallel=parallel,
            )
            records.append(record)
            save()
            progress.advance(task)
            progress.console.print(_trial_line(record, len(records), len(queue)))
    save()
    console.print(latency_table(summary))
    console.print(config_table(summary))
    if _has_progressive(summary):
        console.print(progressive_table(summary))
    for d in summary["determinism"]:
        for x in d["disagreements"]:
            console.print(
                f"[red]determinism failed[/]: {d['fragments']} fragments, {d['layers']} layers: trial {x['trial']} "
                f"({x['order']}) differs from trial {x['reference_trial']} at token {x['first_difference']}"
            )
    for f in summary["trials_failed"]:
        console.print(
            f"[red]trial failed[/]: {f['fragments']} fragments, {f['order']}{_schedule_words(f)}, "
            f"trial {f['trial']}: exit {f['exit_code']}, bit-exact {f['final_matches_baseline']} ({f['run_dir']})"
        )
    verdict = "[green]ok[/]" if summary["ok"] else "[bold red]NOT OK[/]"
    console.print(f"sweep {verdict}: {len(records)} runs in {summary['seconds']} s -> {out / 'sweep.json'}")
    from coordinator.report.build import write_report

    written = write_report([out])
    console.print(f"report: {written.path} ({written.figures} figures, {written.seconds:.2f}s)")
    return summary


def _trial_line(record: dict[str, Any], done: int, total: int) -> str:
    ok = record.get("exit_code") == 0 and record.get("final_matches_baseline")
    mark = "[green]exact[/]" if ok else f"[red]FAILED (exit {record.get('exit_code')})[/]"
    gens = ", ".join(f"{c['layers']}L {c['generate_s']:.2f}s" for c in record.get("checkpoints", []))
    order = record.get("launch_order")
    area = record.get("kl_area")
    return (
        f"run {done:3d}/{total}: {record['fragments']} fragments, {record['order']} {order}{_schedule_words(record)}, "
        f"trial {record['trial'] + 1}: {mark}, {record.get('transfer_mb_per_s')} MB/s, wall {record.get('wall_s')}s; "
        f"generate {gens or '-'}" + (f"; KL area {area:.3f} nats·s" if isinstance(area, (int, float)) else "")
    )
