"""Many hosts: `fragsim plan` bundles, `fragsim serve` and `fragsim agent --bundle` as real
processes; on loopback, and across two network namespaces joined by a veth pair."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO

FRAGSIM = [sys.executable, "-m", "coordinator.launch"]
NS_SERVER, NS_AGENTS = "fragsim-test-coord", "fragsim-test-agents"
SERVER_IP, AGENTS_IP = "10.213.77.1", "10.213.77.2"
RUN_TIMEOUT_S = 240


def fragsim(*args: str, timeout: float = RUN_TIMEOUT_S, netns: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [*(["ip", "netns", "exec", netns] if netns else []), *FRAGSIM, *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def start(*args: str, netns: str | None = None) -> subprocess.Popen[str]:
    cmd = [*(["ip", "netns", "exec", netns] if netns else []), *FRAGSIM, *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def plan(model: Path, out: Path, bind: str, fragments: int = 2) -> list[Path]:
    done = fragsim("plan", "--model", str(model), "--fragments", str(fragments), "--out", str(out), "--bind", bind,
                   "--max-new-tokens", "4", "--threads", "1")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return sorted((out / "bundles").glob("*.bundle"))


@pytest.fixture
def agent_host(tiny_model: Path, tmp_path: Path) -> Path:
    """Another host's disk: its own copy of the source at a path the plan never named."""
    host = tmp_path / "agent-host"
    shutil.copytree(tiny_model, host / "models" / "tiny")
    return host


def _copy_bundles(bundles: list[Path], host: Path) -> list[Path]:
    return [Path(shutil.copy(b, host / b.name)) for b in bundles]


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


# ---- bundles -------------------------------------------------------------------------------


def test_plan_writes_one_owner_only_bundle_per_fragment_with_the_plan_and_keys_only(
    tiny_model: Path, tmp_path: Path
) -> None:
    bundles = plan(tiny_model, tmp_path / "run", "tcp://127.0.0.1:0", fragments=3)
    assert [b.name for b in bundles] == [f"fragment_{i:02d}.bundle" for i in range(3)]
    for i, bundle in enumerate(bundles):
        assert bundle.stat().st_mode & 0o777 == 0o600
        doc = json.loads(bundle.read_text())
        assert set(doc) == {"fragsim_bundle", "fragment", "plan", "agent_public", "agent_secret", "coordinator_public"}
        assert doc["fragment"] == i
        assert doc["agent_secret"] == (tmp_path / "run" / "keys" / f"agent_{i:02d}.secret").read_text().strip()


def test_a_bundle_for_another_fragment_is_refused_before_connecting(
    tiny_model: Path, tmp_path: Path, agent_host: Path
) -> None:
    [b0, _] = _copy_bundles(plan(tiny_model, tmp_path / "run", "tcp://127.0.0.1:0"), agent_host)
    done = fragsim("agent", "--bundle", str(b0), "--fragment", "1", "--source", str(agent_host / "models" / "tiny"),
                   "--connect", "tcp://127.0.0.1:9", "--retry-for", "1", timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "is for fragment 0" in done.stderr


@pytest.mark.parametrize("rate", ["0", "-5"])
def test_an_agent_uplink_of_zero_or_less_is_refused_not_unlimited(
    tiny_model: Path, tmp_path: Path, agent_host: Path, rate: str
) -> None:
    [b0, _] = _copy_bundles(plan(tiny_model, tmp_path / "run", "tcp://127.0.0.1:0"), agent_host)
    done = fragsim("agent", "--bundle", str(b0), "--source", str(agent_host / "models" / "tiny"),
                   "--connect", "tcp://127.0.0.1:9", "--retry-for", "1", "--bandwidth", rate, timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "--bandwidth" in done.stderr and "MB/s > 0" in done.stderr


def test_a_bundle_whose_key_the_plan_does_not_admit_is_refused(
    tiny_model: Path, tmp_path: Path, agent_host: Path
) -> None:
    b0, b1 = _copy_bundles(plan(tiny_model, tmp_path / "run", "tcp://127.0.0.1:0"), agent_host)
    doc = json.loads(b0.read_text())
    doc["agent_public"] = json.loads(b1.read_text())["agent_public"]
    b0.write_text(json.dumps(doc))
    done = fragsim("agent", "--bundle", str(b0), "--source", str(agent_host / "models" / "tiny"),
                   "--connect", "tcp://127.0.0.1:9", "--retry-for", "1", timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "the key the plan admits for fragment 0" in done.stderr


def test_a_tampered_local_source_is_refused_before_anything_is_sent(
    tiny_model: Path, tmp_path: Path, agent_host: Path
) -> None:
    [b0, _] = _copy_bundles(plan(tiny_model, tmp_path / "run", "tcp://127.0.0.1:0"), agent_host)
    weights = agent_host / "models" / "tiny" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one bit pattern in the last tensor's bytes: sizes and header unchanged
    weights.write_bytes(bytes(data))
    done = fragsim("agent", "--bundle", str(b0), "--source", str(weights.parent),
                   "--connect", "tcp://127.0.0.1:9", "--retry-for", "1", timeout=60)  # fmt: skip
    if done.returncode == 0 or "differs from the plan's digest" not in done.stderr:
        # the flipped byte belongs to fragment 1's layers: fragment 1's agent must refuse instead
        b1 = agent_host / "fragment_01.bundle"
        done = fragsim("agent", "--bundle", str(b1), "--source", str(weights.parent),
                       "--connect", "tcp://127.0.0.1:9", "--retry-for", "1", timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "differs from the plan's digest" in done.stderr
    log = next((agent_host / "logs").glob("agent_*.jsonl")).read_text()
    assert "agent.hello" not in log and "agent.setup_failed" in log


def test_an_agent_gives_up_on_a_coordinator_that_never_comes_with_exit_3(
    tiny_model: Path, tmp_path: Path, agent_host: Path
) -> None:
    [b0, _] = _copy_bundles(plan(tiny_model, tmp_path / "run", "tcp://127.0.0.1:0"), agent_host)
    done = fragsim("agent", "--bundle", str(b0), "--source", str(agent_host / "models" / "tiny"),
                   "--connect", "tcp://127.0.0.1:9", "--retry-for", "2", timeout=60)  # fmt: skip
    assert done.returncode == 3
    assert "still trying" in done.stderr and "giving up" in done.stderr


# ---- a whole run on loopback ----------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_agents_started_before_their_coordinator_find_it_and_the_run_ends_bit_exact(
    tiny_model: Path, tmp_path: Path, agent_host: Path
) -> None:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    run_dir = tmp_path / "run"
    bundles = _copy_bundles(plan(tiny_model, run_dir, endpoint), agent_host)
    assert _status(tmp_path) == "planned"
    source = str(agent_host / "models" / "tiny")
    agents = [start("agent", "--bundle", str(b), "--source", source, "--connect", endpoint) for b in bundles]
    try:
        served = fragsim("serve", str(run_dir))
        outputs = [a.communicate(timeout=60)[0] for a in agents]
    finally:
        for a in agents:
            a.kill()
    assert served.returncode == 0, served.stdout + served.stderr
    assert [a.returncode for a in agents] == [0, 0], outputs
    assert all("committed" in out for out in outputs)
    results = _results(run_dir)
    assert results["final_matches_baseline"] is True
    assert "MATCHES the baseline" in served.stdout and "waiting for the agents" in served.stdout
    assert (run_dir / "report.html").is_file()
    assert _status(tmp_path) == "complete"


def test_an_agent_restarted_after_its_fragment_committed_exits_0_and_the_run_goes_on(
    tiny_model: Path, tmp_path: Path, agent_host: Path
) -> None:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    run_dir = tmp_path / "run"
    b0, b1 = _copy_bundles(plan(tiny_model, run_dir, endpoint), agent_host)
    source = str(agent_host / "models" / "tiny")
    served = start("serve", str(run_dir))
    try:
        first = fragsim("agent", "--bundle", str(b0), "--source", source, "--connect", endpoint)
        again = fragsim("agent", "--bundle", str(b0), "--source", source, "--connect", endpoint)
        last = fragsim("agent", "--bundle", str(b1), "--source", source, "--connect", endpoint)
        out = served.communicate(timeout=RUN_TIMEOUT_S)[0]
    finally:
        served.kill()
    assert first.returncode == 0, first.stdout + first.stderr
    # a restarted pod or job finds its work done: success, not a permanent failure (4)
    assert again.returncode == 0 and "already committed" in again.stdout + again.stderr, again.stderr
    assert last.returncode == 0 and served.returncode == 0, out
    assert _results(run_dir)["final_matches_baseline"] is True


def _status(runs_dir: Path) -> str:
    """The one run's status as `fragsim runs --json` shows it."""
    listed = fragsim("runs", "--runs-dir", str(runs_dir), "--json")
    assert listed.returncode == 0, listed.stderr
    (run,) = json.loads(listed.stdout)
    return run["status"]


# ---- two hosts: network namespaces joined by a veth pair ------------------------------------


def _why_no_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns add); CI runs as root"
    if shutil.which("ip") is None:
        return "the ip command (Debian package iproute2) is not installed"
    probe = subprocess.run(["ip", "netns", "add", "fragsim-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns add failed here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "fragsim-probe"], capture_output=True)
    return None


def veth_namespaces(a: tuple[str, str, str], b: tuple[str, str, str]) -> None:
    """Two network namespaces (name, device, address) joined by a veth pair, loopback up in
    each; a namespace left by an earlier run is removed first."""
    for ns, _, _ in (a, b):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    steps = [
        ["ip", "netns", "add", a[0]],
        ["ip", "netns", "add", b[0]],
        ["ip", "link", "add", a[1], "type", "veth", "peer", "name", b[1]],
    ]
    for ns, dev, ip in (a, b):
        steps += [
            ["ip", "link", "set", dev, "netns", ns],
            ["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev],
            ["ip", "-n", ns, "link", "set", dev, "up"],
            ["ip", "-n", ns, "link", "set", "lo", "up"],
        ]
    for step in steps:
        subprocess.run(step, check=True, capture_output=True, text=True)


def remove_namespaces(*names: str) -> None:
    for ns in names:  # deleting a namespace removes its end of the veth pair
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def two_hosts() -> Iterator[None]:
    why = _why_no_namespaces()
    if why:
        pytest.skip(why)
    try:
        veth_namespaces((NS_SERVER, "fsv-coord", SERVER_IP), (NS_AGENTS, "fsv-agents", AGENTS_IP))
        yield
    finally:
        remove_namespaces(NS_SERVER, NS_AGENTS)


def test_two_hosts_in_network_namespaces_with_curve_end_bit_exact(
    two_hosts: None, tiny_model: Path, tmp_path: Path, agent_host: Path
) -> None:
    endpoint = f"tcp://{SERVER_IP}:5555"
    run_dir = tmp_path / "run"
    bundles = _copy_bundles(plan(tiny_model, run_dir, endpoint, fragments=3), agent_host)
    # the agents' namespace cannot reach the coordinator's loopback, only the veth address
    assert json.loads(bundles[0].read_text())["coordinator_public"]
    source = str(agent_host / "models" / "tiny")
    agents = [start("agent", "--bundle", str(b), "--source", source, "--connect", endpoint, netns=NS_AGENTS)
              for b in bundles]  # fmt: skip
    try:
        served = fragsim("serve", str(run_dir), netns=NS_SERVER)
        outputs = [a.communicate(timeout=60)[0] for a in agents]
    finally:
        for a in agents:
            a.kill()
    assert served.returncode == 0, served.stdout + served.stderr
    assert [a.returncode for a in agents] == [0, 0, 0], outputs
    results = _results(run_dir)
    assert results["final_matches_baseline"] is True
    assert results["run"]["bind"] == endpoint


def test_serve_of_a_directory_that_is_no_run_is_refused(tmp_path: Path) -> None:
    done = fragsim("serve", str(tmp_path), timeout=60)
    assert done.returncode == 2
    assert "made by fragsim plan" in done.stderr
    assert list(tmp_path.iterdir()) == []
