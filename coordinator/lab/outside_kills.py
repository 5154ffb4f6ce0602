"""`fragsim outside-kills`: SIGKILL from outside fragsim, at a seeded random moment, then resume.

Each run is a real `fragsim simulate` process tree. At a moment drawn from a seeded
generator (within the length of an unkilled calibration run) a plain `os.kill` SIGKILLs the
coordinator or one live agent: no kill point, no barrier, nothing fragsim knows of. Then
`fragsim resume RUN_DIR` runs until the run is complete. Every final tensor is compared with
the source's bytes, and the machine is checked for orphan processes and the run directory
for leftovers (staging directories, partial snapshots).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from rich.console import Console
from safetensors import safe_open

from agents.source import SourceCheckpoint
from coordinator.launch.terminal import wide_console
from protocol.exit_codes import RunExit
from protocol.plan import WEIGHTS_FILE, Plan
from sandbox import layout

RUN_LIMIT_S = 600.0  # one launch or resume past this is a hang (recorded, then the tree is killed)
MAX_RESUMES = 4
MAX_ATTEMPTS = 4  # runs that end before their kill moment, retried with the moment halved


def _fragsim(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "coordinator.launch", *args], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip


def _wait(proc: subprocess.Popen[bytes]) -> int | None:
    """Exit status, or None after RUN_LIMIT_S (a hang: the whole tree is killed)."""
    try:
        return proc.wait(timeout=RUN_LIMIT_S)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait()
        return None


def _victims(proc: subprocess.Popen[bytes]) -> dict[str, list[psutil.Process]]:
    out: dict[str, list[psutil.Process]] = {"coordinator": [], "agent": []}
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return out
    for child in children:
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "coordinator" in cmd and "--run-dir" in cmd:
            out["coordinator"].append(child)
        elif "agents" in cmd and "run" in cmd:
            out["agent"].append(child)
    return out


def verify_against_source(run_dir: Path) -> tuple[int, list[str]]:
    """Every tensor of every promoted fragment, byte for byte against the source checkpoint."""
    plan = Plan.loads((run_dir / layout.PLAN).read_bytes())
    source = SourceCheckpoint(plan.model["source_dir"])
    checked, wrong = 0, []
    try:
        for fragment in plan.fragments:
            path = run_dir / layout.committed_dir(fragment.index) / WEIGHTS_FILE
            tensors = [item for item in fragment.items if item.kind == "tensor"]
            if not tensors:
                continue
            with safe_open(str(path), framework="numpy") as fh:
                for item in tensors:
                    mine = np.ascontiguousarray(fh.get_tensor(item.name)).view(np.uint8).tobytes()
                    theirs = source.view(item.source_file, item.source_offset, item.nbytes)
                    checked += 1
                    if mine != theirs:
                        wrong.append(item.name)
    finally:
        source.close()
    return checked, wrong


def _orphans(run_dir: Path) -> list[int]:
    mark = str(run_dir)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(mark in part for part in proc.info["cmdline"] or []):
            found.append(proc.info["pid"])
    return found


def _leftovers(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*.partial"))


def _kill_at(
    proc: subprocess.Popen[bytes], begun: float, delay: float, target: str, rng: random.Random
) -> dict[str, Any] | None:
    """SIGKILL the target (or, if none of that kind is alive then, any live process of the run) `delay` s in."""
    while proc.poll() is None and time.monotonic() < begun + delay:
        time.sleep(0.005)
    # Before the launcher has started anything there is nothing to kill: the first moment at or
    # after `delay` at which one of the run's processes is alive.
    while proc.poll() is None:
        victims = _victims(proc)
        pool = victims[target] or victims["agent"] or victims["coordinator"]
        if pool:
            break
        time.sleep(0.005)
    else:
        return None
    victim = rng.choice(pool)
    try:
        os.kill(victim.pid, signal.SIGKILL)
    except ProcessLookupError:
        return None
    role = "coordinator" if victim in victims["coordinator"] else "agent"
    return {"target": role, "pid": victim.pid, "at_s": round(time.monotonic() - begun, 3)}


def outside_kill_run(
    model: Path, root: Path, index: int, seed: int, window_s: float, extra: list[str]
) -> dict[str, Any]:
    rng = random.Random(f"outside-{seed}-{index}")
    run_dir = (root / f"run_{index:03d}").resolve()
    fragments = rng.randint(2, 4)
    args = ["simulate", "--model", str(model), "--run-dir", str(run_dir), "--fragments", str(fragments),
            "--order", "random", "--seed", str(rng.randrange(10**6)), "--threads", "1"]  # fmt: skip
    args += extra
    respawn = rng.random() < 0.5
    if respawn:
        args.append("--respawn")
    target = rng.choice(["coordinator", "agent"])
    delay = round(rng.uniform(0.0, window_s), 3)
    log = root / f"run_{index:03d}.log"
    started = time.monotonic()
    # A run that ends before its kill moment is run again from scratch with the moment
    # halved, so every run is killed at a seeded moment within its own life.
    for attempt in range(1, MAX_ATTEMPTS + 1):
        shutil.rmtree(run_dir, ignore_errors=True)
        begun = time.monotonic()
        proc = _fragsim(args, log)
        killed = _kill_at(proc, begun, delay, target, rng)
        if killed is not None or attempt == MAX_ATTEMPTS:
            break
        _wait(proc)
        delay = round(delay / 2, 3)
    if killed is not None:
        killed["attempt"] = attempt
    codes = [_wait(proc)]
    resumes = 0
    while codes[-1] not in (RunExit.OK, None) and resumes < MAX_RESUMES and (run_dir / layout.PLAN).exists():
        resumes += 1
        codes.append(_wait(_fragsim(["resume", str(run_dir)], log)))
    results = (
        json.loads((run_dir / layout.RESULTS_JSON).read_text()) if (run_dir / layout.RESULTS_JSON).exists() else {}
    )
    complete = codes[-1] == RunExit.OK and bool(results.get("final_matches_baseline"))
    checked, wrong = verify_against_source(run_dir) if complete else (0, [])
    return {
        "run": index, "fragments": fragments, "respawn": respawn, "planned_target": target, "delay_s": delay,
        "killed": killed, "codes": codes, "resumes": resumes, "hung": None in codes, "complete": complete,
        "tensors_checked": checked, "tensors_wrong": wrong, "bit_exact": complete and not wrong,
        "orphans": _orphans(run_dir), "leftovers": _leftovers(run_dir),
        "seconds": round(time.monotonic() - started, 3),
    }  # fmt: skip


def outside_kills(model: Path, runs: int, seed: int, out: Path, root: Path, *, max_new_tokens: int | None = None,
                  console: Console | None = None) -> dict[str, Any]:  # fmt: skip
    console = console or wide_console()
    root.mkdir(parents=True, exist_ok=True)
    extra = ["--max-new-tokens", str(max_new_tokens)] if max_new_tokens else []
    # Calibration: one unkilled run gives the window the kill moments are drawn from.
    calibration = root / "calibration"
    started = time.monotonic()
    code = _wait(_fragsim(["simulate", "--model", str(model), "--run-dir", str(calibration.resolve()), "--order",
                           "random", "--threads", "1", *extra],
                          root / "calibration.log"))  # fmt: skip
    window = time.monotonic() - started
    if code != RunExit.OK:
        raise RuntimeError(f"the calibration run failed with {code}; see {root / 'calibration.log'}")
    console.print(f"calibration: an unkilled run takes {window:.1f}s; kill moments are drawn from [0, {window:.1f}]s")
    records = []
    for index in range(runs):
        record = outside_kill_run(model, root, index, seed, window, extra)
        records.append(record)
        what = f"SIGKILL {record['killed']['target']} at {record['killed']['at_s']}s" if record["killed"] else "no kill"
        mark = "[green]exact[/]" if record["bit_exact"] else "[red]NOT EXACT[/]"
        console.print(f"run {index + 1:3d}/{runs}: {record['fragments']} fragments, {what}, "
                      f"exit codes {record['codes']}, {mark} ({record['seconds']:.1f}s)")  # fmt: skip
    killed = [r for r in records if r["killed"]]
    summary = {
        "model": str(model), "runs": runs, "seed": seed, "calibration_s": round(window, 3),
        "seconds": round(sum(r["seconds"] for r in records), 1),
        "kills": len(killed),
        "coordinator_kills": sum(1 for r in killed if r["killed"]["target"] == "coordinator"),
        "agent_kills": sum(1 for r in killed if r["killed"]["target"] == "agent"),
        "missed": runs - len(killed),
        "bit_exact": sum(1 for r in records if r["bit_exact"]),
        "tensors_checked": sum(r["tensors_checked"] for r in records),
        "tensors_wrong": sum(len(r["tensors_wrong"]) for r in records),
        "hangs": sum(1 for r in records if r["hung"]),
        "orphans": sum(len(r["orphans"]) for r in records),
        "leftovers": sum(len(r["leftovers"]) for r in records),
        "resumes": sum(r["resumes"] for r in records),
        "runs_resumed": sum(1 for r in records if r["resumes"]),
        "max_resumes": max((r["resumes"] for r in records), default=0),
        "median_run_s": statistics.median(r["seconds"] for r in records) if records else None,
        "per_run": records,
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    console.print(
        f"{runs} runs, {summary['kills']} outside kills ({summary['coordinator_kills']} coordinator, "
        f"{summary['agent_kills']} agents, {summary['missed']} missed), {summary['resumes']} resumes: "
        f"{summary['bit_exact']} bit-exact, {summary['tensors_wrong']} wrong tensors of {summary['tensors_checked']}, "
        f"{summary['hangs']} hangs, {summary['orphans']} orphans, {summary['leftovers']} leftovers -> {out}"
    )
    return summary
