"""Fault paths that used to hang or crash: every wait has a bound and every run can be finished.

Real processes, real signals (SIGKILL, SIGSTOP, SIGCONT), real sockets, tiny checkpoints."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import zmq
from rich.console import Console

from agents.agent import configure_client
from agents.source import SourceCheckpoint
from conftest import StandaloneCoordinator, simulate
from coordinator.launch.simulate import SimulateOptions, execute_run, plan_run, resume_run
from protocol import log_events as E
from protocol.exit_codes import RunExit
from protocol.messages import decode_from_coordinator, encode
from protocol.version import PROTOCOL_VERSION
from sandbox import layout

BOUND_S = 120  # far above any of these runs; a run past it is a hang


def events(run_dir: Path, name: str, log: str = layout.COORDINATOR_LOG) -> list[dict]:
    return [e for e in map(json.loads, (run_dir / log).read_text().splitlines()) if e["event"] == name]


def quiet() -> Console:
    return Console(file=io.StringIO(), width=160)


def exact(run_dir: Path) -> bool:
    return bool(json.loads((run_dir / layout.RESULTS_JSON).read_text())["final_matches_baseline"])


class Watcher(threading.Thread):
    """Acts on this launcher's child processes as soon as one matches (as a user's `kill` would)."""

    def __init__(self, match: Callable[[list[str]], bool], act: Callable[[psutil.Process], None]) -> None:
        super().__init__(daemon=True)
        self.match, self.act, self.done = match, act, threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + BOUND_S
        me = psutil.Process(os.getpid())
        while time.monotonic() < deadline and not self.done.is_set():
            for child in me.children():
                try:
                    if self.match(child.cmdline()):
                        self.act(child)
                        self.done.set()
                        return
                except psutil.Error:
                    continue
            time.sleep(0.005)


def agent_of(fragment: int) -> Callable[[list[str]], bool]:
    return lambda cmd: "agents" in cmd and "--fragment" in cmd and cmd[cmd.index("--fragment") + 1] == str(fragment)


@pytest.mark.parametrize(
    "options",
    [
        {"fragments": 4, "order": "forward", "kill": ["3@0.5"]},
        {"fragments": 2, "order": "reverse", "kill": ["0@0.9"]},
        {"fragments": 4, "order": "random", "kill_random": 4, "seed": 3},
    ],
    ids=["last-forward", "last-reverse", "random-kills"],
)
def test_killing_the_last_outstanding_agent_without_respawn_ends_incomplete(
    tiny_model: Path, tmp_path: Path, options: dict
) -> None:
    started = time.monotonic()
    result = simulate(tiny_model, tmp_path / "run", piece_size=4096, **options)
    assert result.code == RunExit.INCOMPLETE, result.output
    assert result.results["final"]["missing"], "the missing fragments are listed"
    assert time.monotonic() - started < BOUND_S


def test_resume_finishes_a_run_whose_launcher_never_recorded_the_baseline(tiny_model: Path, tmp_path: Path) -> None:
    opts = SimulateOptions(model=str(tiny_model), run_dir=str(tmp_path / "run"), threads=1, fragments=3)
    run = plan_run(opts, tiny_model, "tiny")  # plan and run.json only: as if everything died right here
    assert not (run.run_dir / layout.BASELINE_JSON).exists()
    assert resume_run(run.run_dir, quiet()) == RunExit.OK
    assert exact(run.run_dir)


def test_resume_finishes_a_run_without_run_json(tiny_model: Path, tmp_path: Path) -> None:
    opts = SimulateOptions(model=str(tiny_model), run_dir=str(tmp_path / "run"), threads=1, fragments=2)
    run = plan_run(opts, tiny_model, "tiny")
    (run.run_dir / layout.RUN_SETTINGS).unlink()
    assert resume_run(run.run_dir, quiet()) == RunExit.OK
    assert exact(run.run_dir)


def test_an_outside_sigkill_of_the_coordinator_before_the_baseline_is_resumable(
    tiny_model: Path, tmp_path: Path
) -> None:
    watcher = Watcher(lambda cmd: "coordinator" in cmd and "--run-dir" in cmd, lambda p: p.send_signal(signal.SIGKILL))
    watcher.start()
    opts = SimulateOptions(model=str(tiny_model), run_dir=str(tmp_path / "run"), threads=1, fragments=3)
    run = plan_run(opts, tiny_model, "tiny")
    code, results = execute_run(opts, run, quiet())
    assert watcher.done.is_set() and results is None and code in (RunExit.FAILED, RunExit.CRASH)
    assert resume_run(run.run_dir, quiet()) == RunExit.OK
    assert exact(run.run_dir)


@pytest.mark.parametrize("respawn", [False, True], ids=["no-respawn", "respawn"])
def test_an_agent_stopped_for_good_before_its_hello_cannot_hang_the_run(
    tiny_model: Path, tmp_path: Path, respawn: bool
) -> None:
    watcher = Watcher(agent_of(1), lambda p: p.send_signal(signal.SIGSTOP))
    watcher.start()
    started = time.monotonic()
    result = simulate(tiny_model, tmp_path / "run", fragments=3, order="forward", respawn=respawn, connect_timeout=8.0)
    assert watcher.done.is_set()
    assert time.monotonic() - started < BOUND_S
    if respawn:
        assert result.code == RunExit.OK and result.results["final_matches_baseline"], result.output
    else:
        assert result.code == RunExit.INCOMPLETE and result.results["final"]["missing"] == [1], result.output
    assert "SIGKILLed" in result.output


def test_a_coordinator_stalled_for_ten_seconds_is_survived(tiny_model: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"

    def stall(proc: psutil.Process) -> None:
        deadline = time.monotonic() + 60
        while not (run_dir / layout.committed_dir(0)).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(10)
        proc.send_signal(signal.SIGCONT)

    watcher = Watcher(lambda cmd: "coordinator" in cmd and "--run-dir" in cmd, stall)
    watcher.start()
    result = simulate(tiny_model, run_dir, fragments=3, order="forward", stagger=0.5, piece_size=4096)
    assert watcher.done.is_set()
    assert result.code == RunExit.OK and result.results["final_matches_baseline"], result.output


def test_a_corrupted_promoted_fragment_is_set_aside_and_fetched_again(tiny_model: Path, tmp_path: Path) -> None:
    opts = SimulateOptions(
        model=str(tiny_model), run_dir=str(tmp_path / "run"), threads=1, fragments=3, order="forward",
        kill_coordinator="0.95", piece_size=4096,
    )  # fmt: skip
    run = plan_run(opts, tiny_model, "tiny")
    code, _ = execute_run(opts, run, quiet())
    assert code == RunExit.COORDINATOR_KILLED
    weights = run.run_dir / layout.committed_dir(1) / "weights.safetensors"
    assert weights.exists(), "fragment 1 was promoted before the kill"
    with open(weights, "r+b") as fh:  # one flipped byte, well inside the tensor data
        fh.seek(-100, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(-100, os.SEEK_END)
        fh.write(bytes([byte[0] ^ 0xFF]))
    assert resume_run(run.run_dir, quiet()) == RunExit.OK
    assert exact(run.run_dir)
    (quarantined,) = events(run.run_dir, E.QUARANTINE)
    assert quarantined["fragment"] == 1 and quarantined["mismatched_items"]
    assert (run.run_dir / quarantined["path"] / "weights.safetensors").exists(), "the bad copy is kept for a look"


def test_an_agent_whose_pid_is_not_on_this_host_lives_by_heartbeats(tiny_model: Path, tmp_path: Path) -> None:
    coord = StandaloneCoordinator(tiny_model, tmp_path / "run", fragments=2, piece_size=4096)
    plan, ctx = coord.plan, zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    configure_client(sock, coord.run.run_dir, 1, plan.extra["curve"]["coordinator"])
    sock.connect(coord.endpoint)
    source = SourceCheckpoint(tiny_model)
    remote_pid = 4_000_000  # above pid_max: no process here has it, as for an agent on another host
    assert not psutil.pid_exists(remote_pid)
    f = plan.fragments[1]
    try:
        sock.send_multipart(
            encode("HELLO", {"v": PROTOCOL_VERSION, "run": plan.run_id, "plan": plan.digest, "fragment": 1,
                             "first_layer": f.first_layer, "last_layer": f.last_layer, "pid": remote_pid})
        )  # fmt: skip
        welcome = decode_from_coordinator(sock.recv_multipart())
        assert welcome.kind == "WELCOME"
        time.sleep(1.0)  # a few liveness ticks: a pid check would declare it dead now
        pieces = [(i, p) for i, item in enumerate(f.items) for p in range(len(item.pieces))]
        credit = welcome.header["credit"]
        outcome = None
        while outcome is None:
            while credit and pieces:
                i, p = pieces.pop(0)
                start, length = f.items[i].piece_span(p, plan.piece_size)
                view = source.view(f.items[i].source_file, f.items[i].source_offset + start, length)
                sock.send_multipart(encode("CHUNK", {"item": i, "piece": p}, bytes(view)))
                credit -= 1
            assert sock.poll(10_000), "the coordinator stopped answering"
            msg = decode_from_coordinator(sock.recv_multipart())
            if msg.kind == "CREDIT":
                credit += msg.header["n"]
            elif msg.kind in ("COMMITTED", "REJECT"):
                outcome = msg
        assert outcome.kind == "COMMITTED", outcome.header
    finally:
        sock.close()
        source.close()
        coord.close()
    assert not events(coord.run.run_dir, E.AGENT_DEAD)
