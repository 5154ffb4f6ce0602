"""Run management on real run directories: fragsim runs, rm, gc, --version, simulate --json and
results.json's schema_version."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from coordinator.launch.cli import main
from coordinator.launch.runs import disk_usage, resolve_run
from protocol.errors import PlanError
from protocol.exit_codes import RunExit

SMALL = ["--fragments", "2", "--max-new-tokens", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def made(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two real runs under one runs root: one by `fragsim simulate --json` (complete), one whose
    coordinator was killed half way and not resumed."""
    from coordinator.launch.simulate import SimulateOptions, run_quietly

    root = tmp_path_factory.mktemp("runs-root")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["simulate", "--json", "--model", str(tiny_model), "--run-dir", str(root / "complete"), *SMALL])
    assert code == RunExit.OK, err.getvalue()[-3000:]
    opts = SimulateOptions(model=str(tiny_model), run_dir=str(root / "killed"), threads=1, kill_coordinator="0.5",
                           max_new_tokens=2, fragments=2)  # fmt: skip
    killed_code, results, _, output = run_quietly(opts, tiny_model)
    assert killed_code == RunExit.COORDINATOR_KILLED, output
    assert results is None
    return {"root": root, "stdout": out.getvalue(), "stderr": err.getvalue()}


def runs_json(root: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, Any]]:
    capsys.readouterr()
    assert main(["runs", "--runs-dir", str(root), "--json"]) == 0
    return {Path(r["path"]).name: r for r in json.loads(capsys.readouterr().out)}


def copy_root(made: dict[str, Any], dst: Path, ages: dict[str, float] | None = None) -> Path:
    """A copy of the runs root (the originals stay for the other tests); `ages`: copies of the
    complete run (by new name, `complete` included) with their plan/results this many seconds old."""
    shutil.copytree(made["root"], dst, symlinks=True)
    now = time.time()
    for name, age in (ages or {}).items():
        if name != "complete" and name != "killed":
            shutil.copytree(dst / "complete", dst / name, symlinks=True)
        for record in ("plan.json", "results.json"):
            if (dst / name / record).exists():
                os.utime(dst / name / record, (now - age, now - age))
    return dst


def test_runs_json_lists_a_complete_run_and_a_coordinator_killed_run(
    made: dict[str, Any], tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = runs_json(made["root"], capsys)
    assert set(runs) == {"complete", "killed"}
    complete, killed = runs["complete"], runs["killed"]
    assert complete["status"] == "complete" and complete["verdict"] is True
    assert killed["status"] == "coordinator killed" and killed["verdict"] is None
    plan = json.loads((made["root"] / "complete" / "plan.json").read_text())
    assert complete["id"] == plan["run_id"] and complete["model"] == tiny_model.name
    assert complete["fragments"] == killed["fragments"] == 2
    assert sorted(complete["order"]) == [0, 1]
    for run in runs.values():
        assert isinstance(run["size_bytes"], int) and run["size_bytes"] > 0
        assert isinstance(run["age_s"], float) and 0 <= run["age_s"] < 600


def test_a_runs_size_counts_hard_linked_snapshot_files_once(
    made: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = made["root"] / "complete"
    snapshot_files = [p for p in (run_dir / "reassembled").rglob("*") if p.is_file()]
    assert any(p.stat().st_nlink > 1 for p in snapshot_files)  # the snapshots are hard links to quorum/
    linked = (run_dir / "quorum", run_dir / "reassembled")
    blocks = {p: p.stat().st_blocks * 512 for p in run_dir.rglob("*") if p.is_file() and not p.is_symlink()}
    naive = sum(n for p, n in blocks.items() if p.is_relative_to(linked[0]) or p.is_relative_to(linked[1]))
    others = sum(blocks.values()) - naive
    size = runs_json(made["root"], capsys)["complete"]["size_bytes"]
    assert size < others + naive  # every link counted would be the naive sum
    assert size == disk_usage(run_dir)[0]


def test_runs_prints_a_table_with_every_run(made: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["runs", "--runs-dir", str(made["root"])]) == 0
    out = capsys.readouterr().out
    for name in ("complete", "killed"):
        assert json.loads((made["root"] / name / "plan.json").read_text())["run_id"] in out
    assert "coordinator killed" in out and "matches" in out and "2 runs" in out


def test_an_incomplete_run_and_a_mismatch_are_told_apart(
    made: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = copy_root(made, tmp_path / "runs", {"incomplete": 0, "mismatch": 0})
    for name, final, matches in (("incomplete", {"complete": False}, False), ("mismatch", None, False)):
        path = root / name / "results.json"
        results = json.loads(path.read_text())
        results["final"] = final or results["final"]
        results["final_matches_baseline"] = matches
        path.write_text(json.dumps(results))
    runs = runs_json(root, capsys)
    assert (runs["incomplete"]["status"], runs["incomplete"]["verdict"]) == ("incomplete", False)
    assert (runs["mismatch"]["status"], runs["mismatch"]["verdict"]) == ("mismatch", False)


def test_rm_removes_the_named_run_and_says_how_many_bytes_it_freed(
    made: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = copy_root(made, tmp_path / "runs")
    run_id = json.loads((root / "killed" / "plan.json").read_text())["run_id"]
    size = runs_json(root, capsys)["killed"]["size_bytes"]
    assert main(["rm", run_id, "--runs-dir", str(root)]) == 0  # by id: the directory is not named by it
    out = capsys.readouterr().out
    assert not (root / "killed").exists() and (root / "complete" / "plan.json").is_file()
    assert f"removed {run_id}" in out and "freed" in out and f"({size} bytes)" in out


def test_rm_refuses_a_directory_that_is_not_a_run_and_removes_nothing(
    made: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = copy_root(made, tmp_path / "runs")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    code = main(["rm", str(root / "complete"), str(precious), "--runs-dir", str(root)])
    assert code == RunExit.USAGE
    err = capsys.readouterr().err
    assert err.startswith("fragsim rm: run:") and "nothing was removed" in err and len(err.splitlines()) == 1
    assert (precious / "notes.txt").read_text() == "keep me"
    assert (root / "complete" / "plan.json").is_file()  # named first, still not removed


def test_rm_refuses_the_filesystem_root_and_a_typo(made: dict[str, Any]) -> None:
    for name in ("/", "no-such-run"):
        with pytest.raises(PlanError, match="nothing was removed"):
            resolve_run(name, made["root"])


def test_gc_keep_1_keeps_only_the_newest_run(
    made: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = copy_root(made, tmp_path / "runs", {"complete": 1000, "killed": 500, "newest": 10})
    assert main(["gc", "--keep", "1", "--runs-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == ["newest"]
    assert out.count("removed ") == 2 and "freed" in out


def test_gc_failed_removes_only_the_runs_that_are_not_complete(
    made: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = copy_root(made, tmp_path / "runs", {"complete": 1000, "killed": 500, "newest": 10})
    assert main(["gc", "--failed", "--runs-dir", str(root)]) == 0
    assert sorted(p.name for p in root.iterdir()) == ["complete", "newest"]
    assert "removed" in capsys.readouterr().out


def test_gc_dry_run_removes_nothing(made: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = copy_root(made, tmp_path / "runs")
    assert main(["gc", "--keep", "0", "--failed", "--dry-run", "--runs-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.count("would remove ") == 2 and "would free" in out
    assert sorted(p.name for p in root.iterdir()) == ["complete", "killed"]


def test_gc_without_keep_or_failed_is_refused_with_exit_2(
    made: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = copy_root(made, tmp_path / "runs")
    assert main(["gc", "--runs-dir", str(root)]) == RunExit.USAGE
    err = capsys.readouterr().err
    assert "--keep N" in err and "--failed" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in root.iterdir()) == ["complete", "killed"]


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"fragsim {version('fragsim')}"


def test_results_json_has_schema_version_1(made: dict[str, Any]) -> None:
    from coordinator.results import RESULTS_SCHEMA_VERSION

    results = json.loads((made["root"] / "complete" / "results.json").read_text())
    assert results["schema_version"] == RESULTS_SCHEMA_VERSION == 1


def test_replay_agrees_with_a_results_json_that_has_a_schema_version(made: dict[str, Any]) -> None:
    from coordinator.replay import run_replay

    replay = run_replay(made["root"] / "complete")
    assert replay.agrees, replay.differences


def test_simulate_json_prints_only_the_results_on_stdout(made: dict[str, Any]) -> None:
    results = json.loads(made["stdout"])  # nothing else on stdout: it parses whole
    assert results["final_matches_baseline"] is True and results["schema_version"] == 1
    assert results["run"]["run_id"] == json.loads((made["root"] / "complete" / "plan.json").read_text())["run_id"]
    assert "kills" in results["launcher"] and "report_s" in results["launcher"]
    assert "baseline" in made["stderr"] and "checkpoints" in made["stderr"]  # the live view and tables
