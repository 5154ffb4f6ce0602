"""The ceiling functions of `fragsim bench`, at tiny sizes: real sockets, files, processes and
signals. Only shapes, units and sanity (positive, finite) are checked, never timings."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from coordinator.lab import ceilings
from coordinator.lab.bench import build_stages, parse_counts, run_timeline, stages_table
from protocol.errors import PlanError

SIZE = 8 * 1024 * 1024 + 12345  # 8 MiB and a partial last piece
PIECE = 2 * 1024 * 1024
UNITS = ("_seconds", "_mb_per_s", "_mb")


def positive_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_units(data: dict[str, Any], required: list[str]) -> None:
    """Every required key is there and positive; every number whose key names a unit is finite and >= 0."""
    for key in required:
        assert positive_finite(data[key]), (key, data[key])
    for key, value in data.items():
        if (key.endswith(UNITS) or key in ("seconds", "mb_per_s")) and isinstance(value, (int, float)):
            assert isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, (key, value)
    json.dumps(data, allow_nan=False)  # plain JSON: no NaN, no infinity


@pytest.fixture
def source_files(tmp_path: Path) -> list[Path]:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(bytes(range(256)) * (3 * 1024 * 1024 // 256))
    b.write_bytes(b"\x07" * (PIECE + 1))
    return [a, b]


def test_pieces_cover_the_bytes_across_files_and_cycle(source_files: list[Path]) -> None:
    total = ceilings.files_nbytes(source_files)
    pieces = list(ceilings._pieces(source_files, total + 5, PIECE))
    assert sum(p.nbytes for p in pieces) == total + 5
    assert max(p.nbytes for p in pieces) <= PIECE
    assert bytes(pieces[0][:4]) == bytes(range(4)) and bytes(pieces[-1]) == bytes(range(5))  # cycled to file a
    random = list(ceilings._pieces(None, SIZE, PIECE))
    assert sum(p.nbytes for p in random) == SIZE


@pytest.mark.parametrize("curve", [False, True], ids=["plain", "curve"])
def test_zmq_ceiling(curve: bool, source_files: list[Path]) -> None:
    out = ceilings.zmq_ceiling(SIZE, files=source_files, piece_size=PIECE, curve=curve, repeats=2)
    check_units(out, ["seconds", "mb_per_s", "from_welcome_seconds"])
    assert out["curve"] is curve and out["credit_pieces"] == 4 and out["piece_bytes"] == PIECE
    assert out["nbytes"] == SIZE and out["pieces"] == len(list(ceilings._pieces(source_files, SIZE, PIECE)))
    assert len(out["samples_mb_per_s"]) == 2 and all(positive_finite(x) for x in out["samples_mb_per_s"])


def test_zmq_ceiling_of_one_piece_is_timed_from_the_welcome() -> None:
    out = ceilings.zmq_ceiling(1000, piece_size=PIECE)
    assert out["pieces"] == 1 and out["timed"] == "welcome to last piece"
    check_units(out, ["seconds", "mb_per_s"])


def test_blake3_and_write_fsync_ceilings(tmp_path: Path, source_files: list[Path]) -> None:
    hashing = ceilings.blake3_ceiling(SIZE, files=source_files, piece_size=PIECE, repeats=2)
    check_units(hashing, ["seconds", "mb_per_s"])
    assert hashing["threads"] == 1 and len(hashing["samples_mb_per_s"]) == 2
    storing = ceilings.write_fsync_ceiling(SIZE, tmp_path / "scratch", piece_size=PIECE)
    check_units(storing, ["seconds", "mb_per_s", "write_seconds"])
    assert storing["fsync_seconds"] >= 0 and storing["nbytes"] == SIZE
    assert not any((tmp_path / "scratch").iterdir())  # the temporary file is gone


def test_in_process_floor(tiny_model: Path) -> None:
    out = ceilings.in_process_floor(
        tiny_model, [2, 4, 6], prompt="The capital of France is", max_new_tokens=4, threads=1
    )
    check_units(out, ["seconds", "import_seconds", "load_seconds", "baseline_generate_seconds"])
    assert [p["layers"] for p in out["prefixes"]] == [2, 4, 6]
    for p in out["prefixes"]:
        check_units(p, ["load_seconds", "generate_seconds", "done_seconds"])
    assert out["first_prefix_done_seconds"] <= out["last_prefix_done_seconds"] <= out["seconds"]
    assert out["full_prefix_matches_baseline"] is True  # 6 of 6 layers: the baseline's own tokens


def test_torch_runtime_and_bare_agent_process() -> None:
    runtime = ceilings.torch_runtime_rss()
    check_units(runtime, ["rss_mb", "uss_mb", "bare_python_rss_mb", "import_seconds", "seconds"])
    assert runtime["bare_python_rss_mb"] < runtime["rss_mb"] <= runtime["rss_with_llama_code_mb"]
    bare = ceilings.bare_agent_process()
    check_units(bare, ["seconds", "import_seconds", "uss_mb", "rss_mb", "bare_python_seconds"])


def test_agent_profile(tiny_model: Path, tmp_path: Path) -> None:
    out = ceilings.agent_profile(tiny_model, tmp_path / "run", fragments=3, max_new_tokens=2, threads=1)
    assert out["fragments"] == 3 and [a["fragment"] for a in out["agents"]] == [0, 1, 2]
    for agent in out["agents"]:
        assert agent["exit_code"] == 0 and agent["memory_samples"] > 0
        check_units(
            agent,
            [
                "spawn_to_process_start_seconds",
                "spawn_to_hello_seconds",
                "peak_uss_mb",
                "peak_rss_mb",
                "peak_anonymous_mb",
            ],
        )
        assert agent["spawn_to_process_start_seconds"] <= agent["spawn_to_hello_seconds"]
        assert agent["peak_uss_mb"] <= agent["peak_rss_mb"]
    check_units(out, ["spawn_to_hello_seconds_median", "peak_uss_mb_max"])
    assert json.loads((tmp_path / "run" / "results.json").read_text())["final_matches_baseline"] is True


def test_detection_latency_with_the_liveness_settings_asked_for(tiny_model: Path, tmp_path: Path) -> None:
    out = ceilings.detection_latency(
        tiny_model, tmp_path / "run", max_new_tokens=2, threads=1, heartbeat_ms=250, dead_after=1.0
    )
    settings = out["settings"]  # as the coordinator logged them: run.json carried them there
    assert (settings["heartbeat_ms"], settings["dead_after_s"], settings["agent_heartbeat_s"]) == (250, 1.0, 0.25)
    hung, dead = out["hung_sigstop"], out["dead_sigkill"]
    assert (hung["signal"], dead["signal"]) == ("SIGSTOP", "SIGKILL")
    for case in (hung, dead):
        check_units(case, ["seconds", "launcher_saw_seconds"])
    assert "missed heartbeats" in hung["reason"] and "exited" in dead["reason"]  # each found by its own detector
    timeline = run_timeline(tmp_path / "run")
    assert timeline["checkpoints"] == 0 and timeline["verdict_from_first_process_start_seconds"] > 0


def test_stages_from_figures() -> None:
    run = {
        "transfer_mb_per_s": 400.0,
        "peak_rss_mb": {"coordinator": 900.0},
        "fragments": [{"fragment": 0, "layers": "0-1", "bytes": 500_000_000, "transfer_s": 1.0, "mb_per_s": 500.0}],
    }
    figures = {
        "sequential": [run],
        "no_curve": {"transfer_mb_per_s": 700.0, "fragments": run["fragments"]},
        "cli_forward": {
            "wall_s": 30.0,
            "timeline": {"first_checkpoint_from_launch_seconds": 10.0, "verdict_from_launch_seconds": 29.0},
        },
        "ceilings": {
            "zmq_curve": {"mb_per_s": 420.0},
            "zmq_plain": {"mb_per_s": 2000.0},
            "blake3": {"mb_per_s": 3000.0},
            "write_fsync": {"mb_per_s": 600.0},
            "torch_runtime": {"rss_mb": 250.0},
            "in_process_floor": {"seconds": 15.0, "first_prefix_done_seconds": 5.0, "last_prefix_done_seconds": 14.0},
            "agents": {
                "spawn_to_hello_seconds_median": 0.25,
                "spawn_to_process_start_seconds_median": 0.2,
                "peak_uss_mb_max": 300.0,
            },
            "bare_agent_process": {"seconds": 0.2, "uss_mb": 20.0},
            "detection": {
                "settings": {"dead_after_s": 3.0, "tick_s": 0.25},
                "hung_sigstop": {"seconds": 3.1},
                "dead_sigkill": {"seconds": 0.1},
            },
        },
    }
    rows = {r["stage"]: r for r in build_stages(figures)}
    assert rows["transfer, CURVE"]["ratio"] == round(400 / 420, 3) and rows["transfer, CURVE"]["met"] is True
    assert rows["transfer, no CURVE"]["met"] is False  # 0.35 of the raw ceiling
    assert (
        rows["simulate --order forward (warm)"]["ratio"] == 2.0
        and rows["simulate --order forward (warm)"]["met"] is False
    )
    assert rows["coordinator peak RSS"]["ceiling"] == 750.0 and rows["coordinator peak RSS"]["met"] is True  # <= 900
    assert rows["agent private memory (USS)"]["met"] is False
    hung = rows["hung agent (SIGSTOP) → agent.dead, default liveness"]
    assert hung["met"] is False and "dead_after_s" in hung["note"]
    assert rows["dead agent (SIGKILL) → agent.dead, default liveness"]["met"] is True
    assert rows["hung agent (SIGSTOP) → agent.dead, fast liveness"]["value"] is None  # not measured: no figure
    assert rows["transfer, CURVE vs hashing"]["goal"] is None and rows["transfer, CURVE vs hashing"]["met"] is None
    assert build_stages({})  # nothing measured: every row is there, with None
    assert all(r["met"] is None for r in build_stages({}))
    assert stages_table(build_stages(figures)).row_count == len(rows)


def test_parse_counts() -> None:
    assert parse_counts("1,2,4,8,15,30") == [1, 2, 4, 8, 15, 30]
    for bad in ("", "1,x", "0,2"):
        with pytest.raises(PlanError):
            parse_counts(bad)


def test_synthetic_llama_script_writes_a_loadable_sharded_checkpoint(tmp_path: Path) -> None:
    from make_synthetic_llama import make, parse  # tests/ is on the path (pyproject pythonpath)

    from agents.source import SourceCheckpoint

    options = "--hidden 64 --layers 3 --intermediate 128 --heads 4 --kv-heads 2 --vocab 512 --shard-mb 0.02"
    out = make(parse([str(tmp_path / "m"), *options.split()]))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    source = SourceCheckpoint(out)
    try:
        assert len(source.files) >= 2 and set(index["weight_map"]) == set(source.tensors)
        assert {t.dtype for t in source.tensors.values()} == {"BF16"}
        assert index["metadata"]["total_size"] == sum(t.nbytes for t in source.tensors.values())
        assert source.config["num_hidden_layers"] == 3 and source.config["hidden_size"] == 64
    finally:
        source.close()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype="auto")
    assert sum(p.numel() for p in model.parameters()) * 2 == index["metadata"]["total_size"]
