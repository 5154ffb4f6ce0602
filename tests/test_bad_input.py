"""Bad input gets one line naming the value and what was expected, the usage status, and
nothing created; a crash of fragsim itself has its own status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from coordinator.launch.cli import main as fragsim
from coordinator.launch.options import SimulateOptions
from coordinator.launch.simulate import plan_run
from protocol.exit_codes import RunExit
from sandbox import layout


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = fragsim(args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


@pytest.mark.parametrize(
    "options,named",
    [
        (["--max-new-tokens", "-1"], "--max-new-tokens"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--prompt", ""], "--prompt"),
        (["--threads", "0"], "--threads"),
        (["--bind", "bogus"], "--bind"),
        (["--bind", "tcp://127.0.0.1:99999"], "--bind"),
        (["--stagger", "-1"], "--stagger"),
        (["--respawn-delay", "-2"], "--respawn-delay"),
        (["--connect-timeout", "0"], "--connect-timeout"),
        (["--resume"], "--resume"),
        (["--no-curve", "--bind", "tcp://0.0.0.0:0"], "--no-curve"),
        (["--dtype", "bfloat16"], "--dtype"),
        (["--fragments", "0"], "--fragments"),
        (["--ranges", "0-2,4-5"], "layer range"),
        (["--order", "0,0,1"], "--order"),
        (["--kill", "9@0.5"], "--kill"),
        (["--kill-coordinator", "2"], "--kill-coordinator"),
    ],
)
def test_a_bad_option_is_one_line_with_the_usage_status_and_creates_nothing(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], named: str
) -> None:
    run_dir, artifacts = tmp_path / "run", tmp_path / "artifacts"
    code, err = run_cli(
        ["simulate", "--model", str(tiny_model), "--run-dir", str(run_dir), "--artifacts", str(artifacts), *options],
        capsys,
    )
    assert code == RunExit.USAGE
    assert len(err) == 1 and named in err[0] and "expected" in err[0], err
    assert not run_dir.exists() and not artifacts.exists()


def test_no_curve_on_a_network_address_is_allowed_only_with_insecure(tiny_model: Path, tmp_path: Path) -> None:
    opts = SimulateOptions(model=str(tiny_model), run_dir=str(tmp_path / "run"), curve=False, insecure=True,
                           bind="tcp://0.0.0.0:0")  # fmt: skip
    run = plan_run(opts, tiny_model, "tiny")
    assert "curve" not in run.plan.extra


def test_a_run_dir_that_is_a_file_is_refused(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "a-file"
    target.write_text("mine")
    code, err = run_cli(["simulate", "--model", str(tiny_model), "--run-dir", str(target)], capsys)
    assert code == RunExit.USAGE and len(err) == 1 and "is a file" in err[0]
    assert target.read_text() == "mine"


def test_a_run_dir_that_is_not_empty_is_refused(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "used"
    target.mkdir()
    (target / "keep").write_text("mine")
    code, err = run_cli(["simulate", "--model", str(tiny_model), "--run-dir", str(target)], capsys)
    assert code == RunExit.USAGE and len(err) == 1 and "empty" in err[0]
    assert sorted(p.name for p in target.iterdir()) == ["keep"]


def test_a_run_dir_on_a_read_only_filesystem_is_refused(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = tmp_path / "ro"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(disk)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        code, err = run_cli(["simulate", "--model", str(tiny_model), "--run-dir", str(disk / "run")], capsys)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
    assert code == RunExit.USAGE and len(err) == 1 and "read-only" in err[0], err


def test_resume_of_a_directory_that_is_no_run_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["resume", str(tmp_path / "nonexistent")], capsys)
    assert code == RunExit.USAGE and len(err) == 1 and "plan.json" in err[0]
    assert not (tmp_path / "nonexistent").exists()


def test_a_model_dir_without_a_checkpoint_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    code, err = run_cli(["simulate", "--model", str(tmp_path / "empty"), "--run-dir", str(tmp_path / "run")], capsys)
    assert code == RunExit.USAGE and len(err) == 1 and "config.json" in err[0]
    assert not (tmp_path / "run").exists()


def test_a_coordinator_that_crashes_exits_with_its_own_status(tiny_model: Path, tmp_path: Path) -> None:
    opts = SimulateOptions(model=str(tiny_model), run_dir=str(tmp_path / "run"), threads=1, fragments=2)
    run = plan_run(opts, tiny_model, "tiny")
    (run.run_dir / layout.RUN_SETTINGS).write_text("{not json")  # a run directory it cannot use
    proc = subprocess.run(
        [sys.executable, "-m", "coordinator", "--run-dir", str(run.run_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == RunExit.CRASH, proc.stderr
    assert proc.returncode != RunExit.MISMATCH and "Traceback" in proc.stderr
