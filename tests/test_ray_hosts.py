"""The README's Ray recipe across two hosts (`make test-ray`): a Ray head in one network
namespace and a worker in another, joined by a veth pair, with addresses that exist only
inside them and Ray's token auth on. `fragsim serve --ray` runs on the head; the agents are
actors on the worker. The kill matrix: an actor SIGKILLed, the worker's Ray processes
SIGKILLed, the veth link set down, a rogue CURVE key, a wrong Ray token. Each run ends
bit-exact or with the documented status, and every process the test started is stopped by
its pid (never `ray stop`, which would end every Ray on the machine)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_ray import NO_EXTRA

from conftest import REPO

pytest.importorskip("ray", reason=NO_EXTRA)
import psutil
from test_hosts import _why_no_namespaces, remove_namespaces, veth_namespaces
from test_ray import assert_bit_exact, await_event, plan, ray_events

from coordinator.launch.ray_fleet import RAY_HEALTH_CHECK_ENV
from protocol.exit_codes import RunExit

pytestmark = pytest.mark.ray

NS_HEAD, NS_WORKER = "fragsim-ray-head", "fragsim-ray-worker"
HEAD_IP, WORKER_IP = "10.213.78.1", "10.213.78.2"
VETH_HEAD, VETH_WORKER = "fsr-head", "fsr-worker"
RAY_PORT = 6379
RAY = str(Path(sys.executable).with_name("ray"))
FRAGSIM = [sys.executable, "-m", "coordinator.launch"]
WORKER_RESOURCES = json.dumps({"fragsim_fragment_0": 1, "fragsim_fragment_1": 1})
RUN_TIMEOUT_S = 240
START_TIMEOUT_S = 60


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


@dataclass
class TwoHosts:
    """Two namespaces, a Ray head in one and a worker in the other, all started by this test."""

    temp: Path
    token: str
    env: dict[str, str]
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    worker: subprocess.Popen[str] | None = None
    workers_started: int = 0

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{RAY_PORT}"

    def start(self, ns: str, *cmd: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        proc = subprocess.Popen(in_ns(ns, *cmd), cwd=REPO, env=env or self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
        self.procs.append(proc)
        return proc

    def start_head(self) -> None:
        temp = str(self.temp / "head")
        self.start(NS_HEAD, RAY, "start", "--head", "--node-ip-address", HEAD_IP, "--port", str(RAY_PORT),
                   "--num-cpus", "0", "--temp-dir", temp, "--block", "--disable-usage-stats")  # fmt: skip
        self.await_nodes(1)

    def start_worker(self) -> None:
        self.workers_started += 1
        temp = self.temp / f"worker{self.workers_started}"
        self.worker = self.start(NS_WORKER, RAY, "start", "--address", self.address, "--node-ip-address", WORKER_IP,
                                 "--num-cpus", "1", "--resources", WORKER_RESOURCES, "--temp-dir", str(temp),
                                 "--block", "--disable-usage-stats")  # fmt: skip
        self.await_nodes(2)

    def alive_nodes(self) -> int:
        probe = (f"import ray; ray.init(address={self.address!r}, log_to_driver=False, configure_logging=False); "
                 "print(sum(n['Alive'] for n in ray.nodes()))")  # fmt: skip
        done = subprocess.run(in_ns(NS_HEAD, sys.executable, "-c", probe), env=self.env, capture_output=True,
                              text=True, timeout=START_TIMEOUT_S)  # fmt: skip
        return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 and done.stdout.strip() else -1

    def await_nodes(self, n: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.alive_nodes() == n:
                return
            time.sleep(0.5)
        raise AssertionError(f"the Ray cluster did not reach {n} alive nodes in {START_TIMEOUT_S} s")

    def kill_worker(self) -> int:
        """SIGKILL every process of the worker's Ray (found by its temp dir): the node dies at once."""
        mark = str(self.temp / f"worker{self.workers_started}")
        return kill_matching(mark, extra=[self.worker] if self.worker else [])

    def serve(self, run_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return self.start(NS_HEAD, *FRAGSIM, "serve", str(run_dir), "--ray", self.address, *args, env=env)

    def link(self, state: str) -> None:
        subprocess.run(["ip", "-n", NS_WORKER, "link", "set", VETH_WORKER, state], check=True)


def kill_matching(mark: str, extra: list[subprocess.Popen[str]] | None = None) -> int:
    """SIGKILL, by pid, each process whose command line names `mark`, their children, and `extra`."""
    victims = {p for p in psutil.process_iter(["cmdline"]) if mark in " ".join(p.info["cmdline"] or [])}
    for proc in extra or []:
        try:
            victims.add(psutil.Process(proc.pid))
        except psutil.Error:
            pass
    for p in list(victims):
        try:
            victims |= set(p.children(recursive=True))
        except psutil.Error:
            pass
    for p in victims:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(victims), timeout=10)
    return len(victims)


@pytest.fixture
def two_hosts() -> Iterator[TwoHosts]:
    why = _why_no_namespaces()
    if why:
        pytest.skip(why)
    temp = Path(tempfile.mkdtemp(prefix="fsrh-", dir="/tmp"))  # short: Ray's unix sockets live in it
    token = secrets.token_hex(16)
    env = {**os.environ, **RAY_HEALTH_CHECK_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    hosts = TwoHosts(temp, token, env)
    try:
        veth_namespaces((NS_HEAD, VETH_HEAD, HEAD_IP), (NS_WORKER, VETH_WORKER, WORKER_IP))
        hosts.start_head()
        hosts.start_worker()
        yield hosts
    finally:
        kill_matching(str(temp), extra=hosts.procs)
        remove_namespaces(NS_HEAD, NS_WORKER)
        shutil.rmtree(temp, ignore_errors=True)
        left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(temp) in " ".join(p.info["cmdline"] or [])]
        assert not left, f"processes left running: {left}"


def finish(proc: subprocess.Popen[str]) -> str:
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        proc.kill()
    return out


def test_the_ray_recipe_across_two_namespaces_with_token_auth_ends_bit_exact(
    two_hosts: TwoHosts, tiny_model: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    plan(tiny_model, run_dir)
    out = finish(serve := two_hosts.serve(run_dir))
    assert serve.returncode == RunExit.OK, out
    assert_bit_exact(run_dir)
    assert json.loads((run_dir / "ray.json").read_text())["endpoint"].startswith(f"tcp://{HEAD_IP}:")
    running = ray_events(run_dir, "ray.actor_running")
    head_node = [e["node"] for e in ray_events(run_dir, "ray.node_discovered") if e["ip"] == HEAD_IP]
    assert sorted(e["fragment"] for e in running) == [0, 1]
    assert all(e["node"] not in head_node for e in running), "the actors ran on the worker, across the veth"


def test_an_actor_sigkilled_on_the_worker_is_restarted_and_ends_bit_exact(
    two_hosts: TwoHosts, tiny_model: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    plan(tiny_model, run_dir)
    out = finish(serve := two_hosts.serve(run_dir, "--kill", "1@0.5"))
    assert serve.returncode == RunExit.OK, out
    res = assert_bit_exact(run_dir)
    assert [e["fragment"] for e in ray_events(run_dir, "ray.actor_restarted")] == [1]
    assert res["fragments"][1]["resent_bytes"] == 0


def test_the_workers_ray_processes_sigkilled_then_a_new_worker_ends_bit_exact(
    two_hosts: TwoHosts, tiny_model: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    plan(tiny_model, run_dir)
    serve = two_hosts.serve(run_dir, "--kill", "1@0.5")
    await_event(run_dir, "ray.actor_killed", serve)
    assert two_hosts.kill_worker() > 0
    two_hosts.await_nodes(1)  # Ray declared the node dead: fragment 1 waits for a node to rejoin
    two_hosts.start_worker()  # the same resources: Ray restarts the actor there
    out = finish(serve)
    assert serve.returncode == RunExit.OK, out
    res = assert_bit_exact(run_dir)
    assert res["fragments"][1]["resent_bytes"] == 0


def test_the_veth_link_set_down_for_two_seconds_mid_transfer_ends_bit_exact(
    two_hosts: TwoHosts, tiny_model: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    plan(tiny_model, run_dir)
    serve = two_hosts.serve(run_dir, "--kill", "1@0.5")
    await_event(run_dir, "ray.actor_killed", serve)
    two_hosts.link("down")
    time.sleep(2.0)  # shorter than Ray's ~4.5 s to declare the node dead: the node comes back
    two_hosts.link("up")
    out = finish(serve)
    assert serve.returncode == RunExit.OK, out
    assert_bit_exact(run_dir)


ROGUE = """
import sys, zmq
ctx = zmq.Context.instance()
s = ctx.socket(zmq.DEALER)
s.curve_publickey, s.curve_secretkey = zmq.curve_keypair()
s.curve_serverkey = sys.argv[2].encode()
s.setsockopt(zmq.LINGER, 0)
s.connect(sys.argv[1])
s.send_multipart([b"HELLO", b"\\x80"])
print(len(s.recv_multipart()) if s.poll(3000) else 0)
"""


def test_a_rogue_curve_key_on_the_worker_gets_nothing_and_the_run_ends_bit_exact(
    two_hosts: TwoHosts, tiny_model: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    plan(tiny_model, run_dir)
    server_key = json.loads((run_dir / "plan.json").read_text())["extra"]["curve"]["coordinator"]
    serve = two_hosts.serve(run_dir, "--kill", "1@0.5")
    await_event(run_dir, "ray.actor_killed", serve)  # the coordinator is up and mid-run
    endpoint = json.loads((run_dir / "ray.json").read_text())["endpoint"]
    rogue = subprocess.run(in_ns(NS_WORKER, sys.executable, "-c", ROGUE, endpoint, server_key), capture_output=True,
                           text=True, timeout=30)  # fmt: skip
    assert rogue.stdout.strip() == "0", rogue.stdout + rogue.stderr
    out = finish(serve)
    assert serve.returncode == RunExit.OK, out
    assert_bit_exact(run_dir)
    coordinator_log = (run_dir / "logs" / "coordinator.jsonl").read_text()
    assert '"auth.denied"' in coordinator_log, "the rogue key was refused by the authenticator"


def test_a_driver_with_a_wrong_ray_token_is_refused_with_exit_2_and_nothing_starts(
    two_hosts: TwoHosts, tiny_model: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    plan(tiny_model, run_dir)
    wrong = {**two_hosts.env, "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    out = finish(serve := two_hosts.serve(run_dir, env=wrong))
    assert serve.returncode == RunExit.USAGE, out
    assert "--ray" in out
    assert not (run_dir / "results.json").exists() and not (run_dir / "ray.json").exists()
