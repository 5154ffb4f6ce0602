"""fragsim on Ray (`make test-ray`): `fragsim serve --ray` against a real local Ray cluster
(`ray.cluster_utils.Cluster`: a head and worker nodes, each a real raylet with its own
processes), real actors, real SIGKILLs, a node removed without grace, and a coordinator
restarted that finds its actors by name. Every run must end bit-exact, or with the
documented status, and leave no actor behind."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO

NO_EXTRA = "the optional extra is not installed: pip install 'fragsim[ray]' (make test-ray)"
ray = pytest.importorskip("ray", reason=NO_EXTRA)
from ray.cluster_utils import Cluster  # noqa: E402

from coordinator.launch.ray_fleet import RAY_HEALTH_CHECK_ENV, RAY_NAMESPACE, actor_name  # noqa: E402
from protocol.exit_codes import RunExit  # noqa: E402

pytestmark = pytest.mark.ray

FRAGSIM = [sys.executable, "-m", "coordinator.launch"]
RUN_TIMEOUT_S = 240
PIECE_SIZE = 4096  # many pieces per fragment, so a kill lands mid-transfer


@pytest.fixture
def cluster_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Ray's health checks as the README sets them (a lost node is dead in ~4.5 s, not ~63 s),
    and Ray's session and address files in a directory of this test's own, removed after."""
    for key, value in RAY_HEALTH_CHECK_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    temp = Path(tempfile.mkdtemp(prefix="fsray-", dir="/tmp"))  # short: Ray's unix sockets live in it
    # Ray also writes its "current cluster" address file under $RAY_TMPDIR/ray (default /tmp/ray,
    # which a fresh machine does not have: Cluster() then fails): keep that here too.
    (temp / "ray").mkdir()
    monkeypatch.setenv("RAY_TMPDIR", str(temp))
    yield temp
    shutil.rmtree(temp, ignore_errors=True)


def start_cluster(temp: Path, *node_resources: dict[str, float]) -> tuple[Cluster, list[Any]]:
    """A head and one worker node per resource dict: the cluster and its worker nodes, in order."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": str(temp)})
    nodes = [cluster.add_node(num_cpus=1, resources=resources) for resources in node_resources]
    cluster.wait_for_nodes()
    return cluster, nodes


@pytest.fixture
def stop_cluster() -> Iterator[list[Cluster]]:
    made: list[Cluster] = []
    yield made
    for cluster in made:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def plan(model: Path, run_dir: Path, fragments: int = 2) -> None:
    from coordinator.launch.hosts import plan_command
    from coordinator.launch.options import SimulateOptions

    opts = SimulateOptions(model=str(model), run_dir=str(run_dir), fragments=fragments, order="forward",
                           bind="tcp://0.0.0.0:0", max_new_tokens=4, threads=1, piece_size=PIECE_SIZE)  # fmt: skip
    with redirect_stdout(io.StringIO()):
        assert plan_command(opts) == 0


def fragsim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FRAGSIM, *args], cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def ray_events(run_dir: Path, event: str | None = None) -> list[dict[str, Any]]:
    lines = (run_dir / "logs" / "ray.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines if line.strip()]
    return [e for e in events if event is None or e["event"] == event]


def results(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "results.json").read_text())


def assert_bit_exact(run_dir: Path) -> dict[str, Any]:
    res = results(run_dir)
    assert res["final_matches_baseline"] is True
    assert res["final"]["tensor_digests_match"] and res["final"]["logits_max_abs_diff"] == 0.0
    return res


def named_actors(cluster: Cluster, run_id: str) -> list[str]:
    ray.init(address=cluster.address, namespace=RAY_NAMESPACE, log_to_driver=False)
    try:
        return sorted(a for a in ray.util.list_named_actors() if a.startswith(f"fragsim-{run_id}-"))
    finally:
        ray.shutdown()


def run_id(run_dir: Path) -> str:
    return json.loads((run_dir / "plan.json").read_text())["run_id"]


def test_serve_on_ray_places_each_actor_on_its_resource_node_and_ends_bit_exact(
    tiny_model: Path, tmp_path: Path, cluster_env: Path, stop_cluster: list[Cluster]
) -> None:
    cluster, nodes = start_cluster(cluster_env, {"fragsim_fragment_0": 1}, {"fragsim_fragment_1": 1})
    stop_cluster.append(cluster)
    run_dir = tmp_path / "run"
    plan(tiny_model, run_dir)
    served = fragsim("serve", str(run_dir), "--ray", cluster.address)
    assert served.returncode == RunExit.OK, served.stdout + served.stderr
    assert_bit_exact(run_dir)
    node_of = {n.node_id: r for n, r in zip(nodes, (0, 1), strict=True)}
    running = {e["fragment"]: e["node"] for e in ray_events(run_dir, "ray.actor_running")}
    assert {f: node_of.get(node) for f, node in running.items()} == {0: 0, 1: 1}
    discovered = ray_events(run_dir, "ray.node_discovered")
    assert len(discovered) == 3 and all(sorted(e["servable"]) == [0, 1] for e in discovered)
    assert named_actors(cluster, run_id(run_dir)) == [], "every actor of a finished run is ended"
    assert json.loads((run_dir / "ray.json").read_text())["endpoint"].startswith("tcp://")


def test_a_sigkilled_actor_is_restarted_by_ray_and_is_sent_no_verified_piece_again(
    tiny_model: Path, tmp_path: Path, cluster_env: Path, stop_cluster: list[Cluster]
) -> None:
    cluster, _ = start_cluster(cluster_env, {}, {})
    stop_cluster.append(cluster)
    run_dir = tmp_path / "run"
    plan(tiny_model, run_dir)
    served = fragsim("serve", str(run_dir), "--ray", cluster.address, "--kill", "1@0.5")
    assert served.returncode == RunExit.OK, served.stdout + served.stderr
    res = assert_bit_exact(run_dir)
    killed = ray_events(run_dir, "ray.actor_killed")
    restarted = ray_events(run_dir, "ray.actor_restarted")
    assert [e["fragment"] for e in killed] == [1]
    assert [e["fragment"] for e in restarted] == [1] and restarted[0]["old_pid"] == killed[0]["pid"]
    f1 = res["fragments"][1]
    assert f1["resent_bytes"] == 0, "verified bytes are never asked for again"
    assert f1["attempts"] == 2 and f1["received_bytes"] == f1["bytes"]
    welcomes = [json.loads(line) for line in (run_dir / "bundles/logs/agent_01.jsonl").read_text().splitlines()]
    welcomes = [e for e in welcomes if e["event"] == "agent.welcome"]
    assert 0 < welcomes[-1]["pieces_wanted"] < welcomes[-1]["pieces_total"], "the restarted actor resumed"


def test_a_node_removed_without_grace_is_replaced_by_another_node_with_its_resource(
    tiny_model: Path, tmp_path: Path, cluster_env: Path, stop_cluster: list[Cluster]
) -> None:
    cluster, nodes = start_cluster(cluster_env, {"fragsim_fragment_0": 1}, {"fragsim_fragment_1": 1})
    stop_cluster.append(cluster)
    run_dir = tmp_path / "run"
    plan(tiny_model, run_dir)
    node_1 = nodes[1]
    serve = subprocess.Popen([*FRAGSIM, "serve", str(run_dir), "--ray", cluster.address, "--kill", "1@0.5"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        # The kill point pauses fragment 1 half way; its actor is dead while Ray restarts it:
        # then its node goes too, and a node that joins with the resource takes over.
        await_event(run_dir, "ray.actor_killed", serve)
        cluster.add_node(num_cpus=1, resources={"fragsim_fragment_1": 1})
        cluster.remove_node(node_1, allow_graceful=False)
        out, _ = serve.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        serve.kill()
    assert serve.returncode == RunExit.OK, out
    assert_bit_exact(run_dir)
    assert results(run_dir)["fragments"][1]["resent_bytes"] == 0


def test_a_node_lost_for_good_ends_the_run_with_the_longest_prefix_and_exit_3(
    tiny_model: Path, tmp_path: Path, cluster_env: Path, stop_cluster: list[Cluster]
) -> None:
    cluster, nodes = start_cluster(cluster_env, {"fragsim_fragment_0": 1}, {"fragsim_fragment_1": 1})
    stop_cluster.append(cluster)
    run_dir = tmp_path / "run"
    plan(tiny_model, run_dir)
    serve = subprocess.Popen([*FRAGSIM, "serve", str(run_dir), "--ray", cluster.address, "--kill", "1@0.5",
                              "--rejoin-grace", "2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)  # fmt: skip
    try:
        await_event(run_dir, "ray.actor_killed", serve)
        cluster.remove_node(nodes[1], allow_graceful=False)
        out, _ = serve.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        serve.kill()
    assert serve.returncode == RunExit.INCOMPLETE, out
    res = results(run_dir)
    plan_doc = json.loads((run_dir / "plan.json").read_text())
    assert res["final"]["complete"] is False and res["final"]["missing"] == [1]
    assert res["checkpoints"][-1]["layers"] == plan_doc["fragments"][0]["last_layer"] + 1, "the longest prefix"
    lost = ray_events(run_dir, "ray.fragment_lost")
    assert [e["fragment"] for e in lost] == [1]
    assert named_actors(cluster, run_id(run_dir)) == [], "nothing is left running"


def test_a_restarted_coordinator_finds_its_actors_by_name_and_starts_no_second_set(
    tiny_model: Path, tmp_path: Path, cluster_env: Path, stop_cluster: list[Cluster]
) -> None:
    cluster, _ = start_cluster(cluster_env, {}, {})
    stop_cluster.append(cluster)
    run_dir = tmp_path / "run"
    plan(tiny_model, run_dir, fragments=3)
    first = fragsim("serve", str(run_dir), "--ray", cluster.address, "--kill-coordinator", "0.5")
    assert first.returncode == RunExit.COORDINATOR_KILLED, first.stdout + first.stderr
    rid = run_id(run_dir)
    alive = named_actors(cluster, rid)
    assert alive, "the actors of an unfinished run stay up"
    resumed = fragsim("resume", str(run_dir), "--ray", cluster.address)
    assert resumed.returncode == RunExit.OK, resumed.stdout + resumed.stderr
    assert_bit_exact(run_dir)
    reattached = {e["fragment"] for e in ray_events(run_dir, "ray.actor_reattached")}
    started = [e["fragment"] for e in ray_events(run_dir, "ray.actor_started")]
    assert reattached and reattached <= {int(name.rsplit("-", 1)[1]) for name in alive}
    assert sorted(started) == [0, 1, 2], "each fragment's actor was started once, by the first coordinator"
    assert actor_name(rid, 0) == f"fragsim-{rid}-0"
    assert named_actors(cluster, rid) == []


def test_serve_ray_without_a_cluster_at_the_address_is_refused_within_its_bound(
    tiny_model: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    plan(tiny_model, run_dir)
    env = {**os.environ, "RAY_gcs_rpc_server_reconnect_timeout_s": "3"}
    started = time.monotonic()
    done = subprocess.run([*FRAGSIM, "serve", str(run_dir), "--ray", "127.0.0.1:1"], cwd=REPO, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S, env=env)  # fmt: skip
    assert done.returncode == RunExit.USAGE, done.stdout + done.stderr
    assert "--ray" in done.stderr
    assert time.monotonic() - started < RUN_TIMEOUT_S


def await_event(run_dir: Path, event: str, proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    """The first `event` in logs/ray.jsonl, once it is there; fails if serve exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode} before {event}: {proc.stdout.read()}")  # type: ignore[union-attr]
        log = run_dir / "logs" / "ray.jsonl"
        if log.exists() and f'"{event}"' in log.read_text():
            return ray_events(run_dir, event)[0]
        time.sleep(0.05)
    raise AssertionError(f"no {event} within {timeout} s")
