"""`fragsim bench`: measured figures of real runs, written as JSON (never asserted in tests).

Runs the default model (or --model) forward with 4 fragments a few times, once with all
agents in parallel, and once with 10 fragments for a quality-versus-depth curve.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from coordinator.launch.options import SimulateOptions
from coordinator.launch.simulate import run_quietly
from coordinator.launch.terminal import wide_console


def _one(model: Path, name: str, root: Path, **options: Any) -> dict[str, Any]:
    opts = SimulateOptions(model=str(model), run_dir=str(root / f"{name}-{time.strftime('%H%M%S')}"), **options)
    started = time.perf_counter()
    code, results, run, _ = run_quietly(opts, model)
    if results is None or code != 0:
        raise RuntimeError(f"bench run {name} failed with exit {code}; see {run.run_dir}/logs")
    frags = results["fragments"]
    return {
        "name": name,
        "wall_s": round(time.perf_counter() - started, 3),
        "transfer_s": round(sum(f["transfer_s"] for f in frags), 4),
        "transfer_mb_per_s": round(sum(f["bytes"] for f in frags) / sum(f["transfer_s"] for f in frags) / 1e6, 1),
        "baseline_generate_s": results["baseline"]["seconds"],
        "checkpoints": [
            {
                k: c[k]
                for k in (
                    "layers",
                    "label",
                    "agree_tokens",
                    "kl_to_baseline",
                    "top1_agreement",
                    "generate_s",
                    "load_s",
                    "snapshot_s",
                )
            }
            for c in results["checkpoints"]
        ],
        "peak_rss_mb": results["launcher"]["peak_rss_mb"],
        "final_matches_baseline": results["final_matches_baseline"],
    }


def bench(model: Path, runs: int, out: Path, root: Path, console: Console | None = None) -> dict[str, Any]:
    console = console or wide_console()
    root.mkdir(parents=True, exist_ok=True)
    sequential = []
    for i in range(runs):
        sequential.append(_one(model, f"forward-{i}", root, fragments=4, order="forward"))
        console.print(
            f"forward run {i + 1}/{runs}: transfer {sequential[-1]['transfer_mb_per_s']} MB/s, "
            f"wall {sequential[-1]['wall_s']}s"
        )
    plain = _one(model, "no-curve", root, fragments=4, order="forward", curve=False)
    console.print(f"forward run without CURVE: transfer {plain['transfer_mb_per_s']} MB/s, wall {plain['wall_s']}s")
    parallel = _one(model, "parallel", root, fragments=4, order="forward", parallel=True)
    console.print(f"parallel run: transfer {parallel['transfer_mb_per_s']} MB/s, wall {parallel['wall_s']}s")
    curve = _one(model, "curve", root, fragments=10, order="forward")
    console.print("quality vs active layers:")
    for c in curve["checkpoints"]:
        bar = "#" * int(min(c["kl_to_baseline"], 12) * 4)
        console.print(
            f"  {c['layers']:3d} layers  KL {c['kl_to_baseline']:8.4f}  top1 {c['top1_agreement']:.2f}  "
            f"{c['label']:20s} {bar}"
        )
    summary = {
        "model": str(model),
        "runs": runs,
        "transfer_mb_per_s_median": statistics.median(r["transfer_mb_per_s"] for r in sequential),
        "whole_model_transfer_s_median": statistics.median(r["transfer_s"] for r in sequential),
        "generate_s_by_layers": {
            str(c["layers"]): statistics.median(r["checkpoints"][i]["generate_s"] for r in sequential)
            for i, c in enumerate(sequential[0]["checkpoints"])
        },
        "baseline_generate_s_median": statistics.median(r["baseline_generate_s"] for r in sequential),
        "peak_rss_mb_max": {
            k: max(r["peak_rss_mb"].get(k, 0) for r in sequential) for k in sequential[0]["peak_rss_mb"]
        },
        "transfer_mb_per_s_without_curve": plain["transfer_mb_per_s"],
        "sequential": sequential,
        "no_curve": plain,
        "parallel": parallel,
        "quality_curve": curve,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    console.print(f"figures -> {out}")
    return summary
