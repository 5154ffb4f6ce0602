"""Replay rebuilds runs from their logs alone, agrees with results.json, and catches tampering."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import simulate
from coordinator.launch.cli import main as fragsim
from coordinator.replay import ReplayRefused, run_replay
from protocol.eventlog import line_digest


@pytest.fixture(scope="module")
def normal_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    result = simulate(
        tiny_model, tmp_path_factory.mktemp("replay") / "run", fragments=3, order="2,0,1", piece_size=4096
    )
    assert result.code == 0
    return result.run_dir


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(run_dir, target)
    return target


def rewrite(path: Path, edit, rechain: bool = False) -> None:
    """Apply edit(list of dicts) to a JSON-lines log; with rechain, forge a consistent seq/prev chain."""
    events = [json.loads(x) for x in path.read_text().splitlines()]
    events = edit(events)
    lines, prev, seq = [], None, 0
    for e in events:
        if rechain:
            if e["event"] == "process.start":
                prev, seq = None, 0
            e["seq"], e["prev"] = seq, prev
            seq += 1
        text = json.dumps(e, separators=(",", ":"))
        prev = line_digest(text)
        lines.append(text)
    path.write_text("\n".join(lines) + "\n")


def test_normal_run_replays_and_agrees(normal_run: Path) -> None:
    replay = run_replay(normal_run)
    assert replay.agrees, replay.differences
    assert replay.segments == 1 and not replay.notes
    assert [a["fragment"] for a in replay.rebuilt["arrivals"]] == [2, 0, 1]
    story = "\n".join(text for _, text in replay.story)
    for expected in (
        "agent 2 started",
        "agent 2 connected",
        "fragment 2 (4-5) verified and promoted",
        "arrival 2: fragment 0 -> 2 active layers (prefix grew)",
        "checkpoint 2: 6 layers",
        "run finished: complete True, final matches baseline True",
    ):
        assert expected in story
    assert fragsim(["replay", str(normal_run), "--timeline"]) == 0


def test_several_orders_and_a_faulted_resumed_run_replay(tiny_model: Path, tmp_path: Path) -> None:
    runs = [
        simulate(tiny_model, tmp_path / "fwd", fragments=4, order="forward"),
        simulate(tiny_model, tmp_path / "rev", fragments=4, order="reverse"),
        simulate(
            tiny_model,
            tmp_path / "chaos",
            fragments=3,
            order="forward",
            kill=["1@0.5", "2@0"],
            respawn=True,
            kill_coordinator="0.6",
            resume=True,
            piece_size=4096,
        ),
    ]
    for result in runs:
        assert result.code == 0, result.output
        replay = run_replay(result.run_dir)
        assert replay.agrees, (result.run_dir, replay.differences)
    chaos = run_replay(runs[2].run_dir)
    assert chaos.segments == 2, "the killed coordinator and the resumed one"
    story = "\n".join(text for _, text in chaos.story)
    assert "launcher SIGKILLed agent 1" in story and "launcher SIGKILLs the coordinator" in story
    assert "coordinator restored from the sandbox" in story and "resuming:" in story


def test_truncated_last_line_is_tolerated_and_reported(normal_run: Path, tmp_path: Path) -> None:
    run = copy_run(normal_run, tmp_path)
    log = run / "logs/agent_01.jsonl"
    log.write_text(log.read_text() + '{"event":"agent.hel')
    replay = run_replay(run)
    assert replay.agrees, replay.differences
    assert any("truncated line" in note for note in replay.notes)


def test_unknown_event_kinds_are_reported_not_fatal(normal_run: Path, tmp_path: Path) -> None:
    run = copy_run(normal_run, tmp_path)

    def add_unknown(events):
        extra = dict(events[-1], event="core.step", ev={"type": "telepathy", "t": 0.0}, out=[])
        return events + [extra]

    rewrite(run / "logs/coordinator.jsonl", add_unknown, rechain=True)
    replay = run_replay(run)
    assert replay.agrees, replay.differences
    assert any("unknown event kind 'telepathy'" in note for note in replay.notes)


def test_removed_event_is_detected(normal_run: Path, tmp_path: Path) -> None:
    run = copy_run(normal_run, tmp_path)

    def drop_a_chunk(events):
        index = next(i for i, e in enumerate(events) if e["event"] == "core.step" and e["ev"]["type"] == "chunk")
        return events[:index] + events[index + 1 :]

    rewrite(run / "logs/coordinator.jsonl", drop_a_chunk)
    replay = run_replay(run)
    assert not replay.agrees
    assert "log chain broken" in replay.differences[0]
    # Even with a forged chain, the core cannot reproduce the logged decisions without that chunk.
    run2 = copy_run(normal_run, tmp_path / "b")
    rewrite(run2 / "logs/coordinator.jsonl", drop_a_chunk, rechain=True)
    replay = run_replay(run2)
    assert not replay.agrees and "replayed decisions differ" in replay.differences[0]
    assert fragsim(["replay", str(run2)]) == 1


def test_changed_digest_or_decision_is_detected_where_it_happened(normal_run: Path, tmp_path: Path) -> None:
    def change_digest(events):
        e = next(e for e in events if e["event"] == "core.step" and e["ev"]["type"] == "chunk")
        e["ev"]["digest"] = "0" * 64
        return events

    def change_decision(events):
        e = next(e for e in events if e["event"] == "core.step" and e["ev"]["type"] == "verified")
        e["out"][0]["fragment"] = 1 - e["out"][0]["fragment"]
        return events

    for name, edit in (("digest", change_digest), ("decision", change_decision)):
        run = copy_run(normal_run, tmp_path / name)
        rewrite(run / "logs/coordinator.jsonl", edit, rechain=True)
        replay = run_replay(run)
        assert not replay.agrees
        assert replay.differences[0].startswith("coordinator.jsonl:") and "differ" in replay.differences[0]


def test_results_that_disagree_with_the_logs_are_detected(normal_run: Path, tmp_path: Path) -> None:
    run = copy_run(normal_run, tmp_path)
    results = json.loads((run / "results.json").read_text())
    results["checkpoints"][0]["text"] = "something else"
    (run / "results.json").write_text(json.dumps(results))
    replay = run_replay(run)
    assert not replay.agrees and replay.differences[0].startswith("checkpoint 1")


def test_logs_of_another_plan_or_protocol_are_refused(normal_run: Path, tmp_path: Path) -> None:
    run = copy_run(normal_run, tmp_path / "plan")

    def other_plan(events):
        events[0]["plan_digest"] = "f" * 64
        return events

    rewrite(run / "logs/agent_00.jsonl", other_plan, rechain=True)
    with pytest.raises(ReplayRefused, match="different plan"):
        run_replay(run)
    assert fragsim(["replay", str(run)]) == 2

    run = copy_run(normal_run, tmp_path / "proto")

    def other_protocol(events):
        events[0]["protocol_version"] = 99
        return events

    rewrite(run / "logs/coordinator.jsonl", other_protocol, rechain=True)
    with pytest.raises(ReplayRefused, match="protocol version 99"):
        run_replay(run)


def test_verify_model_re_evaluates_every_snapshot(normal_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert fragsim(["replay", str(normal_run), "--verify-model", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["agrees"] is True and len(data["rebuilt"]["checkpoints"]) == 2
