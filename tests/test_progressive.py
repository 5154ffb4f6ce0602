"""Progressive arrival on real processes: agents streaming at once over a limited link, the
coordinator granting credit by its schedule, and every checkpoint timed from the first byte.

Times are only ever bounded from below here (a limit can make a transfer slower, never
faster); how close to the bound it comes is measured by the benchmarks, not asserted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import simulate
from coordinator.replay import run_replay

LINK_MB_S = 1.0  # the tiny model's ~1 MB then takes about a second


def core_steps(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "logs" / "coordinator.jsonl").read_text().splitlines()
    return [d for d in map(json.loads, lines) if d.get("event") == "core.step"]


def grants(run_dir: Path) -> list[dict[str, Any]]:
    return [a for d in core_steps(run_dir) for a in d["out"] if a["type"] == "grants"]


@pytest.fixture(scope="module")
def prefix_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    result = simulate(
        tiny_model, tmp_path_factory.mktemp("prefix") / "run", fragments=3, parallel=True,
        link=LINK_MB_S, schedule="prefix", piece_size=8192,
    )  # fmt: skip
    assert result.code == 0, result.output
    return result


def test_a_limited_link_is_not_exceeded(prefix_run: Any) -> None:
    r = prefix_run.results
    total = sum(f["bytes"] for f in r["fragments"])
    # From the first byte to the last commit the link carried every byte at most at its rate
    # (less the bucket's 50 ms burst).
    assert r["progressive"]["final_checkpoint_s"] >= total / (LINK_MB_S * 1e6) - 0.06


def test_every_grant_goes_to_the_lowest_fragment_that_can_take_it(prefix_run: Any) -> None:
    decisions = grants(prefix_run.run_dir)
    assert decisions and all(g["schedule"] == "prefix" for g in decisions)
    for g in decisions:
        lowest = g["granted"][0][0]
        passed = {f: reason for f, reason in g["waiting"] if f < lowest}
        # A lower fragment that wanted bytes got none only because it could not take them.
        assert all(reason in ("no agent", "window full") for reason in passed.values()), g


def test_checkpoints_are_timed_from_the_first_byte(prefix_run: Any) -> None:
    r = prefix_run.results
    times = [c["since_start_s"] for c in r["checkpoints"]]
    assert all(t is not None and t > 0 for t in times) and times == sorted(times)
    assert r["progressive"] | {"kl_no_model": None} == {
        "schedule": "prefix", "link_mb_s": LINK_MB_S, "bandwidth": None,
        "first_checkpoint_s": times[0], "final_checkpoint_s": times[-1], "kl_no_model": None,
    }  # fmt: skip


def test_kl_area_is_the_step_curve_from_a_uniform_guess(prefix_run: Any) -> None:
    r = prefix_run.results
    kl_before = r["progressive"]["kl_no_model"]
    assert kl_before > 0
    area, t_prev, kl_prev = 0.0, 0.0, kl_before
    for c in r["checkpoints"]:
        area += kl_prev * (c["since_start_s"] - t_prev)
        t_prev, kl_prev = c["since_start_s"], c["quality"]["kl"]
    assert r["kl_area"] == pytest.approx(area, abs=1e-5)
    assert r["checkpoints"][-1]["quality"]["kl"] == 0.0 and r["final_matches_baseline"]


def test_a_scheduled_run_replays_its_grants(prefix_run: Any) -> None:
    replay = run_replay(prefix_run.run_dir)
    assert replay.agrees, replay.differences


def test_an_agent_uplink_is_paced(tiny_model: Path, tmp_path: Path) -> None:
    result = simulate(tiny_model, tmp_path / "run", fragments=2, parallel=True, bandwidth="0:0.5", piece_size=8192)
    assert result.code == 0, result.output
    slow = result.results["fragments"][0]
    # Paced: the first piece leaves at once, every later one waits for its bytes at 0.5 MB/s.
    assert slow["transfer_s"] >= (slow["bytes"] - 8192) / 0.5e6 - 0.06
    agent_log = (tmp_path / "run" / "logs" / "agent_00.jsonl").read_text()
    assert (
        '"agent.paced"' in agent_log
        and '"agent.paced"' not in (tmp_path / "run" / "logs" / "agent_01.jsonl").read_text()
    )


def test_a_killed_agent_under_prefix_resumes_bit_exact_and_the_log_shows_the_gap(
    tiny_model: Path, tmp_path: Path
) -> None:
    result = simulate(
        tiny_model, tmp_path / "run", fragments=3, parallel=True, link=LINK_MB_S, schedule="prefix",
        piece_size=8192, kill=["0@0.4"], respawn=True, respawn_delay=0.3,
    )  # fmt: skip
    assert result.code == 0, result.output
    r = result.results
    assert r["final_matches_baseline"] and r["fragments"][0]["deaths"] == 1
    # While fragment 0 had no agent the link went to the others, and the log says why.
    gap = [g for g in grants(result.run_dir) if [0, "no agent"] in g["waiting"]]
    assert gap and all(0 not in [f for f, _ in g["granted"]] for g in gap)
    assert run_replay(result.run_dir).agrees


def test_a_schedule_without_a_link_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    from coordinator.launch.cli import main as fragsim

    code = fragsim(["simulate", "--model", str(tiny_model), "--run-dir", str(tmp_path / "r"), "--schedule", "prefix"])
    assert code == 2 and not (tmp_path / "r").exists()


def test_top1_miss_area_counts_the_seconds_of_disagreement(prefix_run: Any) -> None:
    r = prefix_run.results
    area, t_prev, miss_prev = 0.0, 0.0, 1.0
    for c in r["checkpoints"]:
        area += miss_prev * (c["since_start_s"] - t_prev)
        t_prev, miss_prev = c["since_start_s"], 1.0 - c["quality"]["top1"]
    assert r["top1_miss_area"] == pytest.approx(area, abs=1e-5)
    assert 0 < r["top1_miss_area"] <= r["progressive"]["final_checkpoint_s"]
