"""Only the run's agents get in, malformed data is refused, nothing escapes the sandbox —
with a live coordinator, real CURVE handshakes and a rogue process hammering it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.source import SourceCheckpoint
from conftest import StandaloneCoordinator, simulate
from coordinator.core import Core
from coordinator.events import Chunk, Hello, Write
from coordinator.launch.agents import AgentLauncher
from coordinator.launch.planner import make_plan
from protocol.exit_codes import RunExit
from protocol.layers import split_layers
from protocol.messages import decode_from_coordinator, encode
from protocol.version import PROTOCOL_VERSION
from sandbox import PermissionDeniedError, Sandbox
from sandbox.layout import read_key_pair as load_keys


def listing(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath).resolve() == skip.resolve():
            dirnames[:] = []
            continue
        for name in filenames:
            path = Path(dirpath) / name
            st_ = path.lstat()
            out[str(path)] = (st_.st_size, st_.st_mtime_ns)
    return out


class Rogue:
    """A hostile peer on a real DEALER socket, with or without CURVE keys."""

    def __init__(self, endpoint: str, server_key: str, keys: tuple[bytes, bytes] | None) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            self.sock.curve_publickey, self.sock.curve_secretkey = keys
            self.sock.curve_serverkey = server_key.encode()
        self.sock.connect(endpoint)

    def send(self, frames: list) -> None:
        self.sock.send_multipart(frames)

    def replies(self, wait: float = 1.5) -> list:
        out = []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.sock.poll(100):
                msg = decode_from_coordinator(self.sock.recv_multipart())
                if msg.kind != "HEARTBEAT":  # liveness, not an answer
                    out.append(msg)
        return out

    def close(self) -> None:
        self.sock.close()


def hello(plan, fragment: int, **override) -> list:
    f = plan.fragments[fragment]
    return encode(
        "HELLO",
        {
            "v": PROTOCOL_VERSION,
            "run": plan.run_id,
            "plan": plan.digest,
            "fragment": fragment,
            "first_layer": f.first_layer,
            "last_layer": f.last_layer,
            "pid": os.getpid(),
            **override,
        },
    )


def test_rogue_process_hammers_a_live_run_and_the_run_ends_bit_exact(tiny_model: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    coord = StandaloneCoordinator(tiny_model, run_dir, fragments=3, piece_size=4096)
    plan = coord.plan
    server_key = plan.extra["curve"]["coordinator"]
    outside_before = listing(tmp_path, run_dir) | listing(tiny_model, run_dir)
    counts: dict[str, int] = {}

    # 1. no keys at all: the CURVE handshake cannot complete, nothing reaches the coordinator.
    rogue = Rogue(coord.endpoint, server_key, None)
    rogue.send(hello(plan, 1))
    assert rogue.replies() == []
    rogue.close()
    counts["no keys"] = 1
    # 2. a well-formed key that is not in the plan: refused by the ZAP authenticator.
    rogue = Rogue(coord.endpoint, server_key, zmq.curve_keypair())
    rogue.send(hello(plan, 1))
    assert rogue.replies() == []
    rogue.close()
    counts["unknown key"] = 1
    # 3. a valid key of another fragment: the handshake succeeds, the claim is refused.
    rogue = Rogue(coord.endpoint, server_key, load_keys(run_dir, 2))
    rogue.send(hello(plan, 1))
    [reject] = rogue.replies()
    assert reject.kind == "REJECT" and reject.header["field"] == "HELLO.key"
    rogue.close()
    counts["key of another fragment"] = 1
    # 4. fragment 1's own key, then hostile frames of every kind.
    rogue = Rogue(coord.endpoint, server_key, load_keys(run_dir, 1))
    rogue.send(hello(plan, 1))
    [welcome] = rogue.replies(1.0)
    assert welcome.kind == "WELCOME"
    piece = plan.piece_size
    hostile = {
        "oversized payload": encode("CHUNK", {"item": 0, "piece": 0}, b"\0" * (piece + 10)),
        "out-of-range item": encode("CHUNK", {"item": 10_000, "piece": 0}, b"\0" * 16),
        "out-of-range piece": encode("CHUNK", {"item": 0, "piece": 10_000}, b"\0" * 16),
        "wrong-dtype length": encode("CHUNK", {"item": 0, "piece": 0}, b"\0" * (piece // 2 + 2)),
        "wrong bytes": encode(
            "CHUNK", {"item": 0, "piece": 0}, b"\x7f" * min(piece, plan.fragments[1].items[0].nbytes)
        ),
        "replayed HELLO": hello(plan, 1),
        "garbage kind": [b"\xde\xad\xbe\xef", b"\x80"],
        "garbage header": [b"CHUNK", b"\xc1\xc1\xc1", b"x"],
        "negative offsets": encode("CHUNK", {"item": -1, "piece": -5}, b"x"),
    }
    for name, frames in hostile.items():
        rogue.send(frames)
        counts[name] = 1
    replies = rogue.replies(2.0)
    rejects = [m for m in replies if m.kind == "REJECT"]
    assert len(rejects) == len(hostile), [m.header for m in replies]
    rogue.send(encode("BYE", {}))
    time.sleep(0.3)
    rogue.close()

    # The real agents now deliver every fragment; the run must end exact.
    launcher = AgentLauncher(run_dir, coord.endpoint)
    for index in (2, 0, 1):
        launcher.spawn(index)
    coord.events_until("finished")
    assert coord.process.proc.wait(timeout=60) == 0
    launcher.stop_all()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["final_matches_baseline"] is True

    log = [json.loads(x) for x in (run_dir / "logs/coordinator.jsonl").read_text().splitlines()]
    events = [e["event"] for e in log]
    assert "auth.handshake_failed" in events or "auth.denied" in events, "no-key handshake logged"
    denied = [e for e in log if e["event"] == "auth.denied"]
    assert denied and denied[0]["reason"] == "CURVE key not in the plan"
    rejected = [e for e in log if e["event"] == "message.rejected"]
    fields = [e["field"] for e in rejected]
    for expected in (
        "HELLO.key",
        "CHUNK payload size",
        "CHUNK.item",
        "CHUNK.piece",
        "CHUNK.payload",
        "CHUNK.digest",
        "HELLO",
        "kind",
        "header",
    ):
        assert expected in fields, (expected, fields)
    assert all(e["reason"] and e["expected"] for e in rejected)
    # Nothing outside the run directory changed.
    assert listing(tmp_path, run_dir) | listing(tiny_model, run_dir) == outside_before
    (run_dir / "security-tried.json").write_text(json.dumps(counts))


@pytest.fixture(scope="module")
def curve_plan(tiny_model: Path):
    source = SourceCheckpoint(tiny_model)
    plan = make_plan(source, split_layers(6, 3), run_id="fuzz", model_name="tiny", piece_size=4096)
    source.close()
    return plan


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    item=st.integers(-3, 40),
    piece=st.integers(-3, 300),
    length=st.integers(-1, 9000),
    digest=st.sampled_from(["0" * 64, "f" * 64, "real"]),
    hello_ok=st.booleans(),
)
def test_fuzzed_chunks_never_reach_the_sandbox_unless_they_match_the_plan(
    curve_plan, item, piece, length, digest, hello_ok
) -> None:
    plan = curve_plan
    core = Core(plan)
    if hello_ok:
        f = plan.fragments[1]
        core.handle(
            Hello(
                0.0,
                "p",
                {
                    "v": PROTOCOL_VERSION,
                    "run": plan.run_id,
                    "plan": plan.digest,
                    "fragment": 1,
                    "first_layer": f.first_layer,
                    "last_layer": f.last_layer,
                    "pid": 1,
                },
            )
        )
    items = plan.fragments[1].items
    real = None
    if 0 <= item < len(items) and 0 <= piece < len(items[item].pieces):
        real = items[item].pieces[piece]
    actions = core.handle(Chunk(0.0, "p", item, piece, length, real if digest == "real" and real else digest))
    writes = [a for a in actions if isinstance(a, Write)]
    if writes:
        spec = items[item]
        assert hello_ok and digest == "real" and real is not None
        assert length == spec.piece_span(piece, plan.piece_size)[1]


def test_disk_full_is_reported_and_loses_nothing_promoted(tiny_model: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    if (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(disk)], capture_output=True).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (needs root): the quota test below covers the same path")
    try:
        from coordinator.launch.options import SimulateOptions
        from coordinator.launch.simulate import run_quietly

        # A short eval text keeps the baseline's eval logits small, so the disk fills while the
        # coordinator stores fragments, not while the launcher records the baseline.
        short = tmp_path / "eval.txt"
        short.write_text("The rain stopped at noon, and the people of the town came out to walk along the "
                         "wet streets by the water before the evening wind came up again.\n")  # fmt: skip
        opts = SimulateOptions(model=str(tiny_model), run_dir=str(disk / "run"), threads=1, fragments=3,
                               order="forward", piece_size=4096, eval_text=str(short))  # fmt: skip
        code, _, _, output = run_quietly(opts, tiny_model)
    finally:
        log = (disk / "run/logs/coordinator.jsonl").read_text()
        promoted = sorted(p.name for p in (disk / "run/quorum").glob("fragment_??"))
        from coordinator.store import FragmentStore
        from protocol.plan import Plan

        plan = Plan.loads((disk / "run/plan.json").read_bytes())
        store = FragmentStore(Sandbox(disk / "run"), plan)
        bad = {name: store.verify_committed(int(name[-2:])) for name in promoted}
        subprocess.run(["umount", "-l", str(disk)], check=False)
    assert '"storage.error"' in log and "DiskFullError" in log
    assert all(not items for items in bad.values()), bad
    assert code == RunExit.STORAGE, output


def test_quota_exhaustion_stops_cleanly_and_keeps_promoted_fragments(tiny_model: Path, tmp_path: Path) -> None:
    from coordinator.store import FragmentStore
    from protocol.plan import Plan

    probe = simulate(tiny_model, tmp_path / "probe", fragments=3, order="forward", piece_size=4096)
    sizes = [f["bytes"] for f in probe.results["fragments"]]
    quota = sizes[0] + sizes[1] + 64 * 1024  # room for two fragments and their small files, not the third
    run_dir = tmp_path / "run"
    with contextlib.suppress(AssertionError):
        simulate(tiny_model, run_dir, fragments=3, order="forward", piece_size=4096, quota_bytes=quota)
    log = [json.loads(x) for x in (run_dir / "logs/coordinator.jsonl").read_text().splitlines()]
    errors = [e for e in log if e["event"] == "storage.error"]
    assert errors and errors[0]["kind"] == "QuotaExceeded" and "quota" in errors[0]["error"]
    plan = Plan.loads((run_dir / "plan.json").read_bytes())
    store = FragmentStore(Sandbox(run_dir), plan)
    for index in (0, 1):
        assert store.is_committed(index) and store.verify_committed(index) == []
    assert not store.is_committed(2)


def test_read_only_filesystem_is_a_clear_error(tmp_path: Path) -> None:
    disk = tmp_path / "ro"
    disk.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(disk)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        box = Sandbox(disk)
        with pytest.raises(PermissionDeniedError, match="plan.json"):
            box.write_bytes("plan.json", b"{}")
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_agents_run_memory_bounded_and_only_read_the_source(tiny_model: Path, tmp_path: Path) -> None:
    before = listing(tiny_model, tmp_path / "nothing")
    coord = StandaloneCoordinator(tiny_model, tmp_path / "run", fragments=2)
    launcher = AgentLauncher(coord.run.run_dir, coord.endpoint)
    proc = launcher.spawn(0)
    limit = psutil.Process(proc.pid).rlimit(psutil.RLIMIT_AS)
    assert limit[0] == launcher.memory_limit and limit[0] < 4 * 1024**3
    launcher.spawn(1)
    coord.events_until("finished")
    launcher.stop_all()
    assert coord.process.proc.wait(timeout=60) == 0
    assert listing(tiny_model, tmp_path / "nothing") == before, "agents write nothing to the source"
    assert oct(os.stat(coord.run.run_dir / "keys/agent_00.secret").st_mode & 0o777) == "0o600"
