"""Fault injection with real processes and real SIGKILL: the run resumes and loses nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import zmq
from blake3 import blake3

from agents.agent import configure_client
from conftest import StandaloneCoordinator, simulate
from coordinator.launch.agents import AgentLauncher
from coordinator.launch.simulate import resume_run
from protocol.exit_codes import RunExit
from protocol.messages import decode_from_coordinator, encode
from protocol.version import PROTOCOL_VERSION


def assert_exact(result) -> None:
    assert result.code == 0, result.output
    final = result.results["final"]
    assert result.results["final_matches_baseline"] and final["logits_max_abs_diff"] == 0.0
    assert final["tensor_digests_match"] and final["tokens_identical"]
    assert not list(result.run_dir.rglob("*.partial")), "no staging leftovers after a successful run"


def fragment(result, index: int) -> dict:
    return result.results["fragments"][index]


def agent_events(run_dir: Path, index: int, event: str) -> list[dict]:
    lines = (run_dir / f"logs/agent_{index:02d}.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == event]


def test_kill_mid_tensor_and_respawn_resumes_from_verified_bytes(tiny_model: Path, tmp_path: Path) -> None:
    result = simulate(
        tiny_model, tmp_path / "run", fragments=3, order="forward", kill=["1@0.5"], respawn=True, piece_size=4096
    )
    assert_exact(result)
    f1 = fragment(result, 1)
    assert f1["attempts"] == 2 and f1["deaths"] == 1 and f1["received_bytes"] == f1["bytes"]
    assert f1["resent_bytes"] == 0, "verified bytes are never asked for again"
    welcomes = agent_events(result.run_dir, 1, "agent.welcome")
    assert welcomes[0]["pieces_wanted"] == welcomes[0]["pieces_total"]
    assert 0 < welcomes[1]["pieces_wanted"] < welcomes[1]["pieces_total"], "the respawn resumed"
    assert [k["fragment"] for k in result.results["launcher"]["kills"]] == [1]


def test_kill_before_hello_right_after_hello_and_before_commit(tiny_model: Path, tmp_path: Path) -> None:
    result = simulate(
        tiny_model, tmp_path / "run", fragments=3, order="forward", kill=["0@start", "1@0", "2@1"], respawn=True
    )
    assert_exact(result)
    assert result.results["launcher"]["agent_attempts"] == {0: 2, 1: 2, 2: 2} or result.results["launcher"][
        "agent_attempts"
    ] == {"0": 2, "1": 2, "2": 2}
    assert fragment(result, 0)["attempts"] == 1, "the first agent of fragment 0 never said HELLO"
    assert fragment(result, 1)["attempts"] == 2
    # Killed after its last chunk: every byte was already verified, so the fragment committed anyway.
    assert fragment(result, 2)["received_bytes"] == fragment(result, 2)["bytes"]


def test_kill_without_respawn_finishes_with_the_longest_prefix(tiny_model: Path, tmp_path: Path) -> None:
    result = simulate(tiny_model, tmp_path / "run", fragments=3, order="forward", kill=["1@0.3"], piece_size=4096)
    assert result.code == RunExit.INCOMPLETE
    final = result.results["final"]
    assert final["complete"] is False and final["missing"] == [1] and final["missing_ranges"] == ["2-3"]
    assert [c["layers"] for c in result.results["checkpoints"]] == [2]
    # The verified bytes of the killed agent are kept (staged, never promoted) for a later resume.
    staged = result.run_dir / "quorum/fragment_01.partial"
    assert staged.is_dir() and not (result.run_dir / "quorum/fragment_01").exists()
    assert 0 < fragment(result, 1)["received_bytes"] < fragment(result, 1)["bytes"]
    # ... and `fragsim resume` finishes the run from them.
    assert resume_run(result.run_dir, respawn=True) == 0
    assert json.loads((result.run_dir / "results.json").read_text())["final_matches_baseline"] is True


def _promoted(run_dir: Path) -> dict[str, tuple[int, int, str]]:
    out = {}
    for path in sorted((run_dir / "quorum").glob("fragment_??/*")):
        st = path.stat()
        out[str(path.relative_to(run_dir))] = (st.st_ino, st.st_mtime_ns, blake3(path.read_bytes()).hexdigest())
    return out


def test_coordinator_killed_during_reassembly_then_resume(tiny_model: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    import io

    from rich.console import Console

    from coordinator.launch.simulate import SimulateOptions, execute_run, plan_run

    opts = SimulateOptions(
        model=str(tiny_model),
        run_dir=str(run_dir),
        threads=1,
        fragments=3,
        order="forward",
        kill_coordinator="reassembly",
    )
    run = plan_run(opts, tiny_model, "tiny")
    code, results = execute_run(opts, run, Console(file=io.StringIO()))
    assert code == RunExit.COORDINATOR_KILLED and results is None
    before = _promoted(run_dir)
    assert before, "fragment 0 was promoted before the kill"
    assert resume_run(run_dir, Console(file=io.StringIO())) == 0
    after = _promoted(run_dir)
    assert {k: v for k, v in after.items() if k in before} == before, "nothing promoted was lost or rewritten"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["final_matches_baseline"] is True
    starts = [
        e
        for e in map(json.loads, (run_dir / "logs/coordinator.jsonl").read_text().splitlines())
        if e["event"] == "coordinator.restore"
    ]
    assert starts and starts[0]["committed"] == [0]


def test_coordinator_killed_mid_transfer_resumes_in_the_same_run(tiny_model: Path, tmp_path: Path) -> None:
    result = simulate(
        tiny_model,
        tmp_path / "run",
        fragments=3,
        order="forward",
        kill_coordinator="0.5",
        resume=True,
        respawn=True,
        piece_size=4096,
    )
    assert_exact(result)
    assert result.results["launcher"]["resumes"] == 1


def test_a_resumed_coordinator_does_not_kill_an_agent_a_second_time(tiny_model: Path, tmp_path: Path) -> None:
    # Fragment 2 is killed at 30 % of its bytes, then the coordinator at 80 % of all of them, while
    # fragment 2's second agent streams: the restored coordinator has 2 past 30 % at once.
    result = simulate(
        tiny_model,
        tmp_path / "run",
        fragments=3,
        order="forward",
        kill=["2@0.3"],
        kill_coordinator="0.8",
        resume=True,
        respawn=True,
        piece_size=4096,
    )
    assert_exact(result)
    launcher = result.results["launcher"]
    assert launcher["resumes"] == 1
    assert [k["fragment"] for k in launcher["kills"] if k.get("target") == "agent"] == [2]
    assert launcher["faults"]["kills"] == [[2, 0.3]]  # what was planned, executed or not


def _hello(plan, index: int) -> list:
    f = plan.fragments[index]
    return encode(
        "HELLO",
        {
            "v": PROTOCOL_VERSION,
            "run": plan.run_id,
            "plan": plan.digest,
            "fragment": index,
            "first_layer": f.first_layer,
            "last_layer": f.last_layer,
            "pid": os.getpid(),
        },
    )


def _recv(sock: zmq.Socket, kinds: tuple[str, ...] = ("WELCOME", "REJECT", "WANT", "COMMITTED")):
    while sock.poll(10_000):
        msg = decode_from_coordinator(sock.recv_multipart())
        if msg.kind in kinds:
            return msg
    raise AssertionError(f"no {kinds} from the coordinator")


def test_corrupt_duplicate_and_rival_chunks_over_a_real_socket(tiny_model: Path, tmp_path: Path) -> None:
    """A hand-made agent on a real DEALER socket: a corrupt piece is refused and asked for again,
    a duplicate is harmless, a rival is refused, and the run still ends bit-exact."""
    from agents.source import SourceCheckpoint

    coord = StandaloneCoordinator(tiny_model, tmp_path / "run", fragments=3, piece_size=4096)
    plan = coord.plan
    ctx = zmq.Context.instance()

    def dealer() -> zmq.Socket:  # holding fragment 1's CURVE key, as its agent (or a clone of it) would
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        configure_client(sock, coord.run.run_dir, 1, plan.extra["curve"]["coordinator"])
        sock.connect(coord.endpoint)
        return sock

    mine, rival = dealer(), dealer()
    source = SourceCheckpoint(tiny_model)
    try:
        mine.send_multipart(_hello(plan, 1))
        welcome = _recv(mine)
        assert welcome.kind == "WELCOME"
        rival.send_multipart(_hello(plan, 1))
        refused = _recv(rival)
        assert refused.kind == "REJECT" and "holds it" in refused.header["expected"]

        items = plan.fragments[1].items

        def piece(i: int, p: int) -> bytes:
            start, length = items[i].piece_span(p, plan.piece_size)
            return bytes(source.view(items[i].source_file, items[i].source_offset + start, length))

        bad = bytearray(piece(0, 0))
        bad[0] ^= 0xFF
        mine.send_multipart(encode("CHUNK", {"item": 0, "piece": 0}, bytes(bad)))
        reject = _recv(mine)
        assert reject.kind == "REJECT" and reject.header["field"] == "CHUNK.digest"
        want = _recv(mine)
        assert want.kind == "WANT" and want.header["want"] == [[0, [[0, 1]]]]
        # Now everything, honestly, with piece 0 twice (a harmless duplicate); credit is ample here
        # because the coordinator returns one credit per chunk and we pace on its replies.
        sends = [(0, 0)] + [(i, p) for i, it in enumerate(items) for p in range(len(it.pieces))]
        credit = welcome.header["credit"]
        for i, p in sends:
            while credit == 0:
                msg = decode_from_coordinator(mine.recv_multipart())
                credit += msg.header.get("n", 0) if msg.kind == "CREDIT" else 0
            mine.send_multipart(encode("CHUNK", {"item": i, "piece": p}, piece(i, p)))
            credit -= 1
        committed = _recv(mine, ("COMMITTED",))
        assert committed.header["fragment"] == 1
        late = dealer()
        late.send_multipart(_hello(plan, 1))
        told = _recv(late)  # a late agent for a committed fragment is told so: its work is done
        assert (told.kind, told.header) == ("COMMITTED", {"fragment": 1})
        late.close()
        mine.send_multipart(encode("BYE", {}))
    finally:
        mine.close()
        rival.close()
        source.close()
    # The real agents deliver the rest; the final checkpoint must be exact.
    launcher = AgentLauncher(coord.run.run_dir, coord.endpoint)
    for index in (0, 2):
        launcher.spawn(index)
    coord.events_until("finished")
    assert coord.process.proc.wait(timeout=60) == 0
    launcher.stop_all()
    results = json.loads((coord.run.run_dir / "results.json").read_text())
    assert results["final_matches_baseline"] is True
    f1 = results["fragments"][1]
    assert f1["rejected_chunks"] == 1 and f1["duplicate_bytes"] == len(piece(0, 0))
    log = [json.loads(x) for x in (coord.run.run_dir / "logs/coordinator.jsonl").read_text().splitlines()]
    fields = [e["field"] for e in log if e["event"] == "message.rejected"]
    assert fields.count("CHUNK.digest") == 1 and fields.count("HELLO.fragment") == 1  # the rival only


def test_no_orphans_and_no_partials_after_faulted_runs(tiny_model: Path, tmp_path: Path) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = simulate(
        tiny_model, tmp_path / "run", fragments=4, order="reverse", kill_random=3, seed=7, respawn=True, piece_size=4096
    )
    assert_exact(result)
    after = {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}
    assert after <= before
