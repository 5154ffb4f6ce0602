"""`fragsim soak`: many seeded faulted runs on one checkpoint, summarised as JSON figures."""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from coordinator.launch.options import SimulateOptions
from coordinator.launch.simulate import run_quietly
from coordinator.launch.terminal import wide_console


def soak_run(model: Path, root: Path, index: int, seed: int) -> dict[str, Any]:
    rng = random.Random(f"soak-{seed}-{index}")
    fragments = rng.randint(2, 4)
    opts = SimulateOptions(
        model=str(model),
        run_dir=str(root / f"run_{index:03d}"),
        fragments=fragments,
        order="random",
        seed=rng.randrange(10**6),
        threads=1,
        piece_size=4096,
        respawn=True,
        kill_random=rng.randint(1, 3),
        max_new_tokens=8,
    )
    if rng.random() < 0.3:
        opts = replace(opts, kill_coordinator=str(round(rng.random(), 2)), resume=True)
    started = time.perf_counter()
    code, results, run, _ = run_quietly(opts, model)
    record: dict[str, Any] = {
        "run": index,
        "fragments": fragments,
        "order": run.order,
        "code": code,
        "seconds": round(time.perf_counter() - started, 3),
        "kill_random": opts.kill_random,
        "kill_coordinator": opts.kill_coordinator,
    }
    if results is None:
        record.update(bit_exact=False, lost_data=True, kills=0, resumes=0)
        return record
    launcher = results.get("launcher", {})
    frags = results["fragments"]
    record.update(
        bit_exact=bool(results["final_matches_baseline"]),
        kills=len(launcher.get("kills", [])),
        agent_kills=sum(1 for k in launcher.get("kills", []) if k["target"] == "agent"),
        coordinator_kills=sum(1 for k in launcher.get("kills", []) if k["target"] == "coordinator"),
        resumes=launcher.get("resumes", 0),
        resent_bytes=sum(f["resent_bytes"] for f in frags),
        duplicate_bytes=sum(f["duplicate_bytes"] for f in frags),
        attempts=sum(f["attempts"] for f in frags),
        # Lost data: a completed run that is not exact, or a fragment whose verified bytes had to be re-sent.
        lost_data=bool(
            not results["final_matches_baseline"]
            or any(f["resent_bytes"] for f in frags)
            or any(f["received_bytes"] != f["bytes"] for f in frags)
        ),
    )
    return record


def soak(model: Path, runs: int, seed: int, out: Path, root: Path, console: Console | None = None) -> dict[str, Any]:
    console = console or wide_console()
    root.mkdir(parents=True, exist_ok=True)
    records = []
    started = time.perf_counter()
    for index in range(runs):
        record = soak_run(model, root, index, seed)
        records.append(record)
        mark = "[green]exact[/]" if record["bit_exact"] else "[red]NOT EXACT[/]"
        console.print(
            f"run {index + 1:3d}/{runs}: {record['fragments']} fragments, {record['kills']} kills, "
            f"{record['resumes']} resumes, exit {record['code']}, {mark} ({record['seconds']:.1f}s)"
        )
    summary = {
        "model": str(model),
        "runs": runs,
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 1),
        "completed": sum(1 for r in records if r["code"] == 0),
        "bit_exact": sum(1 for r in records if r["bit_exact"]),
        "lost_data": sum(1 for r in records if r["lost_data"]),
        "kills": sum(r["kills"] for r in records),
        "agent_kills": sum(r.get("agent_kills", 0) for r in records),
        "coordinator_kills": sum(r.get("coordinator_kills", 0) for r in records),
        "resumes": sum(r["resumes"] for r in records),
        "bytes_resent": sum(r.get("resent_bytes", 0) for r in records),
        "duplicate_bytes": sum(r.get("duplicate_bytes", 0) for r in records),
        "per_run": records,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    console.print(
        f"{summary['runs']} runs, {summary['kills']} kills ({summary['agent_kills']} agents, "
        f"{summary['coordinator_kills']} coordinator), {summary['resumes']} resumes: "
        f"{summary['bit_exact']} bit-exact, {summary['lost_data']} lost data -> {out}"
    )
    return summary
