"""Run management: `fragsim runs` lists the run directories under a runs root, `fragsim rm`
removes named runs, `fragsim gc` removes old or unfinished ones.

A run directory is a directory holding a plan.json that names a run (its run_id and its
fragments): anything else is refused, so a typo or `fragsim rm /` never deletes anything.
Everything here reads the records a run left behind; nothing imports torch."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from protocol import log_events as E
from protocol.errors import PlanError
from sandbox import layout

DEFAULT_RUNS_DIR = "artifacts/runs"

COMPLETE = "complete"  # results.json: complete, and the final checkpoint matched the baseline
MISMATCH = "mismatch"  # complete, but the final checkpoint did not match
INCOMPLETE = "incomplete"  # results.json: agents ended without delivering every fragment
COORDINATOR_KILLED = "coordinator killed"  # no results: --kill-coordinator (continue with fragsim resume)
PLANNED = "planned"  # fragsim plan wrote its bundles, and no coordinator has served it yet
FAILED = "failed"  # no results otherwise (crashed, interrupted)
RUNNING = "running"  # its coordinator process is alive: never removed
STATUSES = (COMPLETE, MISMATCH, INCOMPLETE, COORDINATOR_KILLED, PLANNED, FAILED, RUNNING)


@dataclass(frozen=True)
class RunInfo:
    """One run directory, as `fragsim runs --json` shows it."""

    id: str
    model: str | None
    fragments: int | None
    order: list[int] | None
    status: str
    verdict: bool | None  # results.json final_matches_baseline; None without results
    size_bytes: int  # on disk, hard-linked files (reassembled/ snapshots) counted once
    freed_bytes: int  # what removing it gives back: files with links outside the run are kept
    age_s: float  # seconds since the newest of plan.json and results.json was written
    path: str

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["freed_bytes"]
        return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def read_plan(run_dir: Path) -> dict[str, Any] | None:
    """plan.json if it names a run (a run_id and a list of fragments), else None."""
    plan = _read_json(run_dir / layout.PLAN)
    if isinstance(plan, dict) and isinstance(plan.get("run_id"), str) and isinstance(plan.get("fragments"), list):
        return plan
    return None


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and read_plan(path) is not None


def disk_usage(path: Path) -> tuple[int, int]:
    """(bytes on disk, bytes freed by removing it): st_blocks * 512 over every file below
    `path`, each inode once; a file also linked from outside `path` is not freed."""
    seen: dict[tuple[int, int], list[int]] = {}  # inode -> [bytes, links seen, links it has]
    stack = [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                    continue
                st = entry.stat(follow_symlinks=False)
            except OSError:  # removed meanwhile
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                seen[key][1] += 1
            else:
                seen[key] = [st.st_blocks * 512, 1, st.st_nlink]
    size = sum(nbytes for nbytes, _, _ in seen.values())
    freed = sum(nbytes for nbytes, links, nlink in seen.values() if links >= nlink)
    return size, freed


def _coordinator_log(run_dir: Path) -> tuple[bool, bool, int | None]:
    """(a coordinator process ever started, the log shows a coordinator kill point, the pid of
    the last coordinator process if it has not finished the run)."""
    started, killed, pid = False, False, None
    try:
        with open(run_dir / layout.COORDINATOR_LOG, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if E.FAULT_KILL_POINT not in line and E.PROCESS_START not in line and E.RUN_FINISHED not in line:
                    continue
                try:
                    d = json.loads(line)
                except ValueError:  # a line cut short by a kill
                    continue
                if not isinstance(d, dict):
                    continue
                event = d.get("event")
                if event == E.FAULT_KILL_POINT and d.get("target") == "coordinator":
                    killed = True
                elif event == E.PROCESS_START:
                    started = True
                    pid = d.get("pid") if isinstance(d.get("pid"), int) else None
                elif event == E.RUN_FINISHED:
                    pid = None
    except OSError:
        pass
    return started, killed, pid


def _is_coordinator_of(pid: int, run_dir: Path) -> bool:
    """pid is alive and is a coordinator process of this run (not a reused pid)."""
    import psutil

    try:
        cmdline = psutil.Process(pid).cmdline()
    except (psutil.Error, OSError):
        return False
    return "coordinator" in cmdline and any(arg.rstrip("/").endswith(run_dir.name) for arg in cmdline)


def run_status(run_dir: Path) -> tuple[str, bool | None]:
    """(status, verdict) of one run directory: see STATUSES."""
    started, killed, live_pid = _coordinator_log(run_dir)
    if live_pid is not None and _is_coordinator_of(live_pid, run_dir):
        return RUNNING, None
    results = _read_json(run_dir / layout.RESULTS_JSON)
    if isinstance(results, dict):
        final = results.get("final")
        final = final if isinstance(final, dict) else {}
        verdict = results.get("final_matches_baseline")
        verdict = verdict if isinstance(verdict, bool) else None
        if not final.get("complete"):
            return INCOMPLETE, verdict
        return (COMPLETE if verdict else MISMATCH), verdict
    launcher = _read_json(run_dir / layout.LAUNCHER_JSON)
    kills = launcher.get("kills") if isinstance(launcher, dict) else None
    kills = kills if isinstance(kills, list) else []
    if killed or any(isinstance(k, dict) and k.get("target") == "coordinator" for k in kills):
        return COORDINATOR_KILLED, None
    if not started and (run_dir / layout.BUNDLES_DIR).is_dir():
        return PLANNED, None
    return FAILED, None


def run_info(run_dir: Path, now: float | None = None) -> RunInfo:
    """What `fragsim runs` shows of one run directory (refused if it is none)."""
    plan = read_plan(run_dir)
    if plan is None or not run_dir.is_dir():
        raise PlanError("run", str(run_dir), f"a run directory (one holding the {layout.PLAN} of a run)")
    model = plan.get("model")
    name = model.get("name") if isinstance(model, dict) else None
    settings = _read_json(run_dir / layout.RUN_SETTINGS)
    order = settings.get("order") if isinstance(settings, dict) else None
    if not (isinstance(order, list) and all(isinstance(i, int) for i in order)):
        order = None
    status, verdict = run_status(run_dir)
    size, freed = disk_usage(run_dir)
    mtimes = []
    for name_ in (layout.PLAN, layout.RESULTS_JSON):
        try:
            mtimes.append((run_dir / name_).stat().st_mtime)
        except OSError:
            pass
    now = time.time() if now is None else now
    return RunInfo(
        id=plan["run_id"],
        model=name if isinstance(name, str) else None,
        fragments=len(plan["fragments"]),
        order=order,
        status=status,
        verdict=verdict,
        size_bytes=size,
        freed_bytes=freed,
        age_s=max(0.0, now - max(mtimes)),
        path=str(run_dir.absolute()),
    )


def scan_runs(root: Path) -> list[RunInfo]:
    """Every run directory directly under `root`, oldest first (a missing root has none)."""
    if root.exists() and not root.is_dir():
        raise PlanError("--runs-dir", str(root), "a directory of run directories (it is a file)")
    if not root.is_dir():
        return []
    now = time.time()
    runs = [run_info(p, now) for p in sorted(root.iterdir()) if is_run_dir(p)]
    return sorted(runs, key=lambda r: (-r.age_s, r.id))


def resolve_run(name: str, root: Path) -> Path:
    """A run named by its id (a directory under `root`) or by its path; anything that is not
    a run directory is refused."""
    for candidate in (root / name, Path(name)):
        if candidate.is_symlink() and read_plan(candidate) is not None:
            raise PlanError("run", name, "a run directory itself, not a symbolic link to one")
        if is_run_dir(candidate):
            return candidate.absolute()
    if root.is_dir():  # a run directory not named by its id (simulate --run-dir)
        for candidate in sorted(root.iterdir()):
            plan = read_plan(candidate) if not candidate.is_symlink() else None
            if plan is not None and plan["run_id"] == name:
                return candidate.absolute()
    where = "no such file or directory" if not Path(name).exists() and not (root / name).exists() else ""
    where = where or f"it holds no {layout.PLAN} of a run"
    raise PlanError("run", name, f"a run id under {root} or a run directory ({where}); nothing was removed")


def check_gc_options(keep: int | None, failed: bool) -> None:
    if keep is None and not failed:
        raise PlanError(
            "--keep or --failed",
            None,
            "one of them or both: --keep N keeps the N newest runs, --failed removes the runs that are not complete",
        )
    if keep is not None and keep < 0:
        raise PlanError("--keep", keep, "a number of runs >= 0")


def select_gc(runs: list[RunInfo], keep: int | None, failed: bool) -> list[RunInfo]:
    """The runs `fragsim gc` removes: with `keep`, all but the `keep` newest; with `failed`,
    every run that is not complete; a running run never."""
    check_gc_options(keep, failed)
    newest_first = sorted(runs, key=lambda r: (r.age_s, r.id))
    doomed = {r.path for r in newest_first[keep:]} if keep is not None else set()
    if failed:
        doomed |= {r.path for r in runs if r.status != COMPLETE}
    return [r for r in runs if r.path in doomed and r.status != RUNNING]


def remove_run(run: RunInfo) -> None:
    path = Path(run.path)
    if not is_run_dir(path):  # checked again just before: never remove what is not a run
        raise PlanError("run", run.path, "a run directory (it changed since it was listed)")
    shutil.rmtree(path)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


# The commands: each prints to the console and returns its exit status.


def runs_command(root: Path, as_json: bool) -> int:
    runs = scan_runs(root)
    if as_json:
        try:
            print(json.dumps([r.as_json() for r in runs], indent=2), flush=True)
        except BrokenPipeError:  # `| head`: the reader has seen enough
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # so the exit's flush does not fail again
        return 0
    from rich.table import Table

    from coordinator.launch.terminal import wide_console

    console = wide_console()
    if not runs:
        console.print(f"no runs under {root}", highlight=False)
        return 0
    table = Table(title=f"runs under {root}")
    for header in ("id", "model", "fragments", "order", "status", "verdict", "size", "age", "path"):
        table.add_column(header, no_wrap=header in ("id", "status", "size", "age"), overflow="fold")
    colors = {COMPLETE: "green", MISMATCH: "red", INCOMPLETE: "yellow", RUNNING: "cyan", PLANNED: "cyan"}
    for r in runs:
        verdict = {True: "matches", False: "differs", None: "–"}[r.verdict]
        color = colors.get(r.status, "red")
        order = ",".join(map(str, r.order)) if r.order else "–"
        size, age = human_bytes(r.size_bytes), human_age(r.age_s)
        table.add_row(
            r.id, r.model or "–", str(r.fragments), order, f"[{color}]{r.status}[/]", verdict, size, age, r.path
        )
    console.print(table)
    total = sum(r.size_bytes for r in runs)
    console.print(f"{_runs(len(runs))}, {human_bytes(total)} on disk", highlight=False)
    return 0


def _remove_all(runs: list[RunInfo], dry_run: bool = False) -> int:
    freed, code = 0, 0
    for r in runs:
        if dry_run:
            print(f"would remove {r.id} ({r.status}, {human_bytes(r.freed_bytes)}): {r.path}")
            freed += r.freed_bytes
            continue
        try:
            remove_run(r)
        except (OSError, PlanError) as exc:  # the others are still removed: exit status 1 says so
            print(f"could not remove {r.id}: {exc}")
            code = 1
            continue
        print(f"removed {r.id} ({r.status}, {human_bytes(r.freed_bytes)}): {r.path}")
        freed += r.freed_bytes
    verb = "would free" if dry_run else "freed"
    print(f"{verb} {human_bytes(freed)} ({freed} bytes) in {_runs(len(runs))}")
    return code


def rm_command(names: list[str], root: Path) -> int:
    """Every name is checked before anything is removed: one refusal removes nothing."""
    runs: dict[str, RunInfo] = {}
    for name in names:
        info = run_info(resolve_run(name, root))
        if info.status == RUNNING:
            raise PlanError("run", name, "a run whose coordinator is not running (stop it first); nothing was removed")
        runs.setdefault(info.path, info)
    return _remove_all(list(runs.values()))


def gc_command(root: Path, keep: int | None, failed: bool, dry_run: bool) -> int:
    check_gc_options(keep, failed)  # before the runs are read
    runs = scan_runs(root)
    doomed = select_gc(runs, keep, failed)
    if not doomed:
        print(f"nothing to remove: {_runs(len(runs))} under {root}")
        return 0
    return _remove_all(doomed, dry_run)
