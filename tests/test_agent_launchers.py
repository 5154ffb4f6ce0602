"""`fragsim agent` under a cluster launcher: the fragment from JOB_COMPLETION_INDEX,
SLURM_PROCID or RANK, exit statuses a launcher can act on (permanent or retriable), SIGTERM
that drains and exits 143, --ready-file, and the Slurm and Kubernetes files in docs/. Real
agent processes, a real `fragsim serve`, real signals."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from test_hosts import FRAGSIM, _free_port, _results, fragsim, plan

from agents.agent import DRAIN_S
from agents.launcher_env import LAUNCHER_VARIABLES, bundle_path_for, fragment_from_env, stop_on_sigterm
from checkpoints import make_tiny_llama
from conftest import REPO
from coordinator.launch.cli import build_parser
from protocol.bundle import read_bundle
from protocol.errors import PlanError
from protocol.exit_codes import PERMANENT_AGENT_EXITS, RETRIABLE_AGENT_EXITS, AgentExit, is_permanent_agent_exit

K8S_JOB = REPO / "docs" / "kubernetes" / "fragsim-agents.yaml"
SBATCH = REPO / "docs" / "slurm" / "fragsim-agents.sbatch"
# The agents' environment without whatever launcher ran these tests.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
UNREACHABLE = "tcp://127.0.0.1:9"
T = TypeVar("T")


def agent_command(bundle: Path | str, endpoint: str, *extra: str) -> list[str]:
    return [*FRAGSIM, "agent", "--bundle", str(bundle), "--connect", endpoint, *extra]


def start_agent(
    bundle: Path | str, endpoint: str, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(agent_command(bundle, endpoint, *extra), cwd=REPO, env={**CLEAN_ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def run_agent(
    bundle: Path | str, endpoint: str, *extra: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(agent_command(bundle, endpoint, *extra), cwd=REPO, env={**CLEAN_ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def events(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.endswith("}")]


def named(log: Path, name: str) -> list[dict[str, Any]]:
    return [e for e in events(log) if e.get("event") == name]


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 60.0, every: float = 0.002) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~95 MB, 6 layers: a fragment takes ~40 pieces, long enough to be stopped mid-transfer."""
    return make_tiny_llama(tmp_path_factory.mktemp("big") / "model", num_layers=6, hidden=512, heads=8, kv_heads=4,
                           intermediate=2048)  # fmt: skip


@pytest.fixture
def two_bundles(tiny_model: Path, tmp_path: Path) -> tuple[str, list[Path]]:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    return endpoint, plan(tiny_model, tmp_path / "run", endpoint)


# ---- the fragment from the launcher's environment ---------------------------------------------


def test_the_fragment_comes_from_the_flag_then_job_completion_index_then_slurm_procid_then_rank() -> None:
    every = {"JOB_COMPLETION_INDEX": "1", "SLURM_PROCID": "2", "RANK": "3"}
    assert fragment_from_env(0, every) == (0, "--fragment")
    assert fragment_from_env(None, every) == (1, "JOB_COMPLETION_INDEX")
    assert fragment_from_env(None, {"SLURM_PROCID": "2", "RANK": "3"}) == (2, "SLURM_PROCID")
    assert fragment_from_env(None, {"RANK": "3"}) == (3, "RANK")
    assert fragment_from_env(None, {"JOB_COMPLETION_INDEX": "", "SLURM_PROCID": " 2 "}) == (2, "SLURM_PROCID")
    assert fragment_from_env(None, {"OMPI_COMM_WORLD_RANK": "4"}) == (None, None)


@pytest.mark.parametrize("value", ["two", "-1", "1.0", "+1", "0x1", "٣"])
def test_a_launcher_value_that_is_no_fragment_index_is_an_error_naming_the_variable(value: str) -> None:
    with pytest.raises(PlanError) as caught:
        fragment_from_env(None, {"SLURM_PROCID": value, "RANK": "0"})
    assert str(caught.value).startswith(f"SLURM_PROCID: got {value!r}")


def test_a_negative_fragment_flag_is_an_error() -> None:
    with pytest.raises(PlanError, match="--fragment"):
        fragment_from_env(-1, {})


def test_the_bundle_path_placeholder_is_filled_with_the_fragment() -> None:
    assert bundle_path_for("b/fragment_{fragment:02d}.bundle", 3) == "b/fragment_03.bundle"
    assert bundle_path_for("b/{fragment}/f{fragment}.bundle", 12) == "b/12/f12.bundle"
    assert bundle_path_for("b/fragment_01.bundle", None) == "b/fragment_01.bundle"
    with pytest.raises(PlanError, match="SLURM_PROCID"):
        bundle_path_for("b/fragment_{fragment}.bundle", None)
    with pytest.raises(PlanError, match="integer format"):
        bundle_path_for("b/fragment_{fragment:s}.bundle", 1)


def test_a_launcher_variable_that_disagrees_with_the_bundle_exits_2(two_bundles: tuple[str, list[Path]]) -> None:
    _, [b0, _] = two_bundles
    done = run_agent(b0, UNREACHABLE, "--retry-for", "1", env={"SLURM_PROCID": "1"})
    assert done.returncode == AgentExit.BAD_SETUP, done.stderr
    assert "is for fragment 0" in done.stderr


def test_a_launcher_variable_that_is_no_integer_exits_2_naming_it(two_bundles: tuple[str, list[Path]]) -> None:
    _, [b0, _] = two_bundles
    done = run_agent(b0, UNREACHABLE, "--retry-for", "1", env={"JOB_COMPLETION_INDEX": "two", "SLURM_PROCID": "0"})
    assert done.returncode == 2, done.stderr
    assert "JOB_COMPLETION_INDEX: got 'two'" in done.stderr


# ---- exit statuses -------------------------------------------------------------------------


def test_every_agent_exit_but_committed_is_either_permanent_or_retriable() -> None:
    failures = set(AgentExit) - {AgentExit.COMMITTED}
    assert failures == PERMANENT_AGENT_EXITS | RETRIABLE_AGENT_EXITS
    assert not PERMANENT_AGENT_EXITS & RETRIABLE_AGENT_EXITS
    assert AgentExit.TERMINATED == 128 + signal.SIGTERM == 143
    permanent = [c for c in (1, 2, 3, 4, 5, 7, 137, 143) if is_permanent_agent_exit(c)]
    assert permanent == [2, 4]  # a status that is no AgentExit (a crash, a kill) is worth another attempt


def test_the_agent_help_says_which_exit_statuses_are_permanent_and_which_retriable() -> None:
    parsers = next(a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = parsers["agent"].format_help()
    block = text.split("exit statuses:\n", 1)[1].split("\n\n", 1)[0]
    lines = {int(m[1]): m[2] for m in re.finditer(r"^\s+(\d+)\s+(.+)$", block, re.M)}
    assert set(lines) == {int(c) for c in AgentExit}
    for code in AgentExit:
        if code != AgentExit.COMMITTED:
            kind = "permanent" if code in PERMANENT_AGENT_EXITS else "retriable"
            assert lines[code].startswith(f"{kind}: "), lines[code]


def test_sigterm_sets_the_stop_event_in_the_main_thread_only() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_sigterm() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5)
    assert signal.getsignal(signal.SIGTERM) == before
    seen: list[Any] = []

    def elsewhere() -> None:
        with stop_on_sigterm() as stop:
            seen.append((signal.getsignal(signal.SIGTERM), stop.is_set()))

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert seen == [(before, False)]


# ---- --ready-file ---------------------------------------------------------------------------


@dataclass
class LaunchedRun:
    """One run whose two agents found their fragments as a launcher's tasks do."""

    run_dir: Path
    endpoint: str
    bundle0: Path
    logs: Path
    ready: Path
    ready_while_retrying: bool
    served: subprocess.CompletedProcess[str]
    agents: list[subprocess.Popen[str]]
    outputs: list[str]


@pytest.fixture(scope="module")
def launched_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> LaunchedRun:
    """Agent 0 from SLURM_PROCID, with --ready-file; agent 1 from JOB_COMPLETION_INDEX, which
    SLURM_PROCID=0 beside it does not override; both started before the coordinator, one
    --bundle with {fragment:02d} for both. Shared by the tests below: a run takes ~10 s."""
    tmp = tmp_path_factory.mktemp("launched")
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    b0, _ = plan(tiny_model, tmp / "run", endpoint)
    template = str(b0.parent / "fragment_{fragment:02d}.bundle")
    logs, ready = tmp / "agent-logs", tmp / "probe" / "ready"
    agents = [start_agent(template, endpoint, "--log-dir", str(logs), "--ready-file", str(ready),
                          env={"SLURM_PROCID": "0"}),
              start_agent(template, endpoint, "--log-dir", str(logs),
                          env={"JOB_COMPLETION_INDEX": "1", "SLURM_PROCID": "0"})]  # fmt: skip
    try:
        log = logs / "logs" / "agent_00.jsonl"
        wait_for("the agent to retry an absent coordinator", lambda: named(log, "agent.retry_connect"), every=0.05)
        ready_while_retrying = ready.exists()  # verified, asking: not welcomed yet
        served = fragsim("serve", str(tmp / "run"), timeout=120)
        outputs = [a.communicate(timeout=60)[0] for a in agents]
    finally:
        for a in agents:
            a.kill()
    return LaunchedRun(tmp / "run", endpoint, b0, logs, ready, ready_while_retrying, served, agents, outputs)


def test_agents_take_their_fragments_from_the_launchers_variables_and_the_run_ends_bit_exact(
    launched_run: LaunchedRun,
) -> None:
    run = launched_run
    assert run.served.returncode == 0, run.served.stdout + run.served.stderr
    assert [a.returncode for a in run.agents] == [0, 0], run.outputs
    assert _results(run.run_dir)["final_matches_baseline"] is True
    for i, variable in enumerate(["SLURM_PROCID", "JOB_COMPLETION_INDEX"]):
        assert f"(fragment from {variable})" in run.outputs[i] and "committed" in run.outputs[i]
        (start,) = named(run.logs / "logs" / f"agent_{i:02d}.jsonl", "process.start")
        assert start["fragment_from"] == variable and start["fragment"] == i


def test_the_ready_file_appears_only_once_the_coordinator_welcomed_the_agent(launched_run: LaunchedRun) -> None:
    run = launched_run
    assert run.ready_while_retrying is False
    assert json.loads(run.ready.read_text()) == {
        "run": read_bundle(run.bundle0).plan.run_id, "fragment": 0, "pid": run.agents[0].pid, "endpoint": run.endpoint,
    }  # fmt: skip
    order = [e["event"] for e in events(run.logs / "logs" / "agent_00.jsonl")]
    assert order.index("agent.source_verified") < order.index("agent.welcome") < order.index("agent.ready")
    assert sorted(p.name for p in run.ready.parent.iterdir()) == ["ready"]  # written by rename: no temporary left


def test_an_agent_whose_source_is_refused_writes_no_ready_file_and_removes_a_stale_one(
    two_bundles: tuple[str, list[Path]], tiny_model: Path, tmp_path: Path
) -> None:
    _, [b0, _] = two_bundles
    source = Path(shutil.copytree(tiny_model, tmp_path / "copy"))
    item = next(i for i in read_bundle(b0).plan.fragments[0].items if i.kind != "file")
    with open(source / item.source_file, "r+b") as fh:  # one byte of fragment 0's first tensor
        fh.seek(item.source_offset + item.nbytes // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))
    ready = tmp_path / "ready"
    ready.write_text('{"run": "an earlier attempt"}')
    done = run_agent(b0, UNREACHABLE, "--source", str(source), "--retry-for", "1", "--ready-file", str(ready))
    assert done.returncode == 2, done.stderr
    assert "differs from the plan's digest" in done.stderr
    assert not ready.exists()


# ---- SIGTERM --------------------------------------------------------------------------------


def test_sigterm_while_waiting_for_the_coordinator_exits_143_at_once(
    two_bundles: tuple[str, list[Path]], tmp_path: Path
) -> None:
    _, [b0, _] = two_bundles
    logs, ready = tmp_path / "agent-logs", tmp_path / "ready"
    endpoint = f"tcp://127.0.0.1:{_free_port()}"  # nobody there
    agent = start_agent(b0, endpoint, "--retry-for", "60", "--log-dir", str(logs), "--ready-file", str(ready))
    log = logs / "logs" / "agent_00.jsonl"
    try:
        wait_for("the agent to retry", lambda: named(log, "agent.retry_connect"), every=0.05)
        asked = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        out = agent.communicate(timeout=10)[0]
    finally:
        agent.kill()
    assert agent.returncode == AgentExit.TERMINATED, out
    assert time.monotonic() - asked < 2.0
    assert "stopped on request while connecting" in out
    (stopped,) = named(log, "agent.terminated")
    assert stopped["phase"] == "connecting" and stopped["bye"] is False and stopped["sent_bytes"] == 0
    assert not ready.exists()


@pytest.fixture
def stopped_coordinator() -> Iterator[list[int]]:
    """Pids the test SIGSTOPped: continued whatever happens."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def test_sigterm_mid_transfer_drains_exits_143_and_a_new_agent_resumes_to_a_bit_exact_run(
    big_model: Path, tmp_path: Path, stopped_coordinator: list[int]
) -> None:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    run_dir = tmp_path / "run"
    b0, b1 = plan(big_model, run_dir, endpoint)
    logs, ready = tmp_path / "agent-logs", tmp_path / "ready"
    coordinator_log = run_dir / "logs" / "coordinator.jsonl"

    def first_chunk() -> int | None:
        lines = events(coordinator_log)
        chunks = [e for e in lines if e.get("event") == "core.step" and e["ev"]["type"] == "chunk"]
        return int(lines[0]["pid"]) if chunks else None

    with open(tmp_path / "serve.out", "w") as serve_out:
        serve = subprocess.Popen([*FRAGSIM, "serve", str(run_dir)], cwd=REPO, env=CLEAN_ENV, stdout=serve_out,
                                 stderr=subprocess.STDOUT, text=True)  # fmt: skip
    agent = start_agent(b0, endpoint, "--log-dir", str(logs), "--ready-file", str(ready))
    try:
        coordinator = wait_for("the coordinator to receive a first chunk", first_chunk)
        assert ready.exists()
        # Freeze the coordinator so that the agent is caught with pieces in flight, whatever this machine's speed.
        os.kill(coordinator, signal.SIGSTOP)
        stopped_coordinator.append(coordinator)
        agent.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        os.kill(coordinator, signal.SIGCONT)
        continued = time.monotonic()
        out = agent.communicate(timeout=30)[0]
        drained_s = time.monotonic() - continued
        assert agent.returncode == AgentExit.TERMINATED, out
        assert "stopped on request while sending" in out and "ended with exit 143 (terminated)" in out
        assert drained_s < DRAIN_S  # it ended once its pieces in flight were read, not at the deadline
        (stopped,) = named(logs / "logs" / "agent_00.jsonl", "agent.terminated")
        assert stopped["bye"] is True and 0 < stopped["sent_bytes"] < read_bundle(b0).plan.fragments[0].nbytes

        again = run_agent(b0, endpoint, "--log-dir", str(tmp_path / "again"))
        assert again.returncode == 0, again.stderr
        assert "the rest were verified before" in again.stderr
        other = run_agent(b1, endpoint, "--log-dir", str(tmp_path / "again"))
        assert other.returncode == 0, other.stderr
        assert serve.wait(timeout=120) == 0, (tmp_path / "serve.out").read_text()
    finally:
        for process in (agent, serve):
            if process.poll() is None:
                process.kill()
    assert _results(run_dir)["final_matches_baseline"] is True
    steps = [e["ev"] for e in events(coordinator_log) if e.get("event") == "core.step"]
    (peer,) = {ev["peer"] for ev in steps if ev["type"] == "hello" and ev["header"]["pid"] == agent.pid}
    # the stopped agent said BYE, so its fragment was free for the next agent at once
    assert any(ev["type"] == "bye" and ev["peer"] == peer for ev in steps)


# ---- the files in docs/ ---------------------------------------------------------------------


def _job() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    (job,) = [doc for doc in yaml.safe_load_all(K8S_JOB.read_text()) if doc]
    assert job["kind"] == "Job"
    return job  # type: ignore[no-any-return]


def test_the_kubernetes_job_fails_on_the_permanent_exit_codes_and_counts_the_retriable_ones() -> None:
    rules = _job()["spec"]["podFailurePolicy"]["rules"]
    by_action = {r["action"]: set(r["onExitCodes"]["values"]) for r in rules if "onExitCodes" in r}
    assert by_action == {
        "FailJob": {int(c) for c in PERMANENT_AGENT_EXITS},
        "Count": {int(c) for c in RETRIABLE_AGENT_EXITS},
    }
    assert all(r["onExitCodes"]["containerName"] == "agent" for r in rules if "onExitCodes" in r)


def test_the_kubernetes_job_is_indexed_probes_the_ready_file_and_outwaits_the_drain() -> None:
    spec = _job()["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
    assert pod["terminationGracePeriodSeconds"] > DRAIN_S + 2  # the drain, then the socket's 2 s linger
    (container,) = pod["containers"]
    assert container["command"] == ["fragsim", "agent"]  # exec form: fragsim itself receives SIGTERM
    args = dict(a.removeprefix("--").split("=", 1) for a in container["args"])
    assert "{fragment:02d}" in args["bundle"] and "fragment" not in args
    assert container["readinessProbe"]["exec"]["command"] == ["test", "-f", args["ready-file"]]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert args["bundle"].startswith(mounts["bundles"] + "/") and "secret" in volumes["bundles"]
    assert Path(args["ready-file"]).parent == Path(mounts["ready"]) and "emptyDir" in volumes["ready"]


def _sbatch_codes(name: str) -> set[int]:
    match = re.search(rf'^{name}="([\d ]+)"', SBATCH.read_text(), re.M)
    assert match, name
    return {int(c) for c in match[1].split()}


def test_the_sbatch_script_is_bash_and_carries_the_exit_codes() -> None:
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    assert _sbatch_codes("PERMANENT_EXITS") == {int(c) for c in PERMANENT_AGENT_EXITS}
    assert _sbatch_codes("RETRIABLE_EXITS") == {int(c) for c in RETRIABLE_AGENT_EXITS}
    text = SBATCH.read_text()
    assert "srun --kill-on-bad-exit=1" in text and "fragment_{fragment:02d}.bundle" in text


FAKE_SRUN = """#!/bin/bash
# srun's part here: run the command once per task, with SLURM_PROCID; the highest status
n=$SLURM_NTASKS
while [[ $1 == --* ]]; do [[ $1 == --ntasks=* ]] && n=${1#--ntasks=}; shift; done
pids=()
for ((i = 0; i < n; i++)); do SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p"; c=$?; ((c > rc)) && rc=$c; done
exit $rc
"""
FAKE_FRAGSIM = """#!/bin/bash
# fragsim agent's part here: say how it was called, exit with the next status planned for this task
echo "$SLURM_PROCID $*" >>"$FAKE/calls"
read -r code rest <"$FAKE/codes.$SLURM_PROCID"
echo "$rest" >"$FAKE/codes.$SLURM_PROCID"
exit "${code:-0}"
"""


def _run_sbatch(tmp_path: Path, codes: list[str]) -> tuple[int, list[str], str]:
    fake = tmp_path / "fake"
    (fake / "bin").mkdir(parents=True)
    for name, body in (("srun", FAKE_SRUN), ("fragsim", FAKE_FRAGSIM)):
        (fake / "bin" / name).write_text(body)
        (fake / "bin" / name).chmod(0o755)
    for task, planned in enumerate(codes):
        (fake / f"codes.{task}").write_text(planned + "\n")
    env = {**CLEAN_ENV, "PATH": f"{fake / 'bin'}:{os.environ['PATH']}", "FAKE": str(fake),
           "SLURM_NTASKS": str(len(codes)), "SLURM_JOB_ID": "1", "FRAGSIM_LOGS": str(tmp_path / "logs"),
           "FRAGSIM_RETRY_DELAY": "0", "FRAGSIM_BUNDLES": "/bundles"}  # fmt: skip
    done = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    return done.returncode, (fake / "calls").read_text().splitlines(), done.stderr


def test_the_sbatch_script_starts_again_only_the_fragments_not_yet_committed(tmp_path: Path) -> None:
    code, calls, stderr = _run_sbatch(tmp_path, ["0", "5 143 0", "0"])
    assert code == 0, stderr
    assert sorted(c.split()[0] for c in calls) == ["0", "1", "1", "1", "2"]
    assert all("--bundle /bundles/fragment_{fragment:02d}.bundle" in c for c in calls)
    assert "not committed yet: 1;" in stderr


def test_the_sbatch_script_gives_up_on_a_permanent_exit(tmp_path: Path) -> None:
    code, calls, stderr = _run_sbatch(tmp_path, ["143 0", "2 0"])
    assert code == 2, stderr
    assert len(calls) == 2 and "fragment 1: exit 2 is permanent" in stderr
