"""The coordinator process: a ZeroMQ ROUTER loop around the sans-IO core.

It turns socket traffic into core events (with its own clock), logs every event the core
consumed together with the decisions it made, and carries those decisions out: sockets,
sandbox writes, verification, promotion, reassembly and evaluation.
"""

from __future__ import annotations

import json
import os
import select
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import zmq
from blake3 import blake3

from agents.eventlog import log_start, open_event_log, open_log_file
from agents.keys import load_keys
from coordinator.core import Core, CoreSettings
from coordinator.events import (
    AgentDead, AgentExited, Arrival, Ban, Bye, Chunk, EndOfAgents, Finish, Forget, Heartbeat, Hello, Malformed,
    Promote, Reassemble, Restored, Send, Tick, Verified, Verify, Write,
)
from coordinator.store import FragmentStore
from protocol.errors import ProtocolError
from protocol.messages import decode_from_agent, encode
from protocol.plan import Plan
from sandbox import Sandbox, SandboxError

TICK_S = 0.25
EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_INCOMPLETE = 3
EXIT_STORAGE = 6


class Progress:
    """JSON lines on stdout for the launcher's live view (the log file is the record)."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout
        self.lock = threading.Lock()  # the torch-import thread reports too

    def __call__(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"progress": kind, **fields}, default=str) + "\n"
        with self.lock:
            self.stream.write(line)
            self.stream.flush()


class CoordinatorServer:
    def __init__(self, run_dir: Path, *, bind: str = "tcp://127.0.0.1:0", settings: CoreSettings | None = None,
                 progress: Progress | None = None, control_fd: int | None = None,
                 faults: dict[str, Any] | None = None, quota_bytes: int | None = None) -> None:
        self.run_dir = run_dir.resolve()
        self.plan = Plan.loads((self.run_dir / "plan.json").read_bytes())
        # Quota: what the plan says will arrive, three times over for fragments + snapshots'
        # metadata + logs and results, and never more than that.
        self.box = Sandbox(self.run_dir, quota_bytes=quota_bytes or 3 * self.plan.nbytes + 256 * 1024 * 1024)
        self.box.mkdir("logs")
        self.log = open_event_log(open_log_file(self.box, "logs/coordinator.jsonl"), run_id=self.plan.run_id,
                                  role="coordinator")
        self.settings = settings or CoreSettings()
        self.core = Core(self.plan, self.settings)
        self.store = FragmentStore(self.box, self.plan)
        self.progress = progress or Progress()
        self.control_fd = control_fd
        self._control_buf = b""
        # Fault injection (launcher-driven): at these points the loop stops and waits for the
        # launcher to SIGKILL the target from outside, so a kill lands exactly where asked.
        faults = faults or {}
        self.agent_kills = sorted((int(f), float(x)) for f, x in faults.get("kills", []))
        self.coordinator_kill = faults.get("kill_coordinator")
        self.bind = bind
        self.payloads: dict[tuple[int, int], memoryview] = {}
        self.outcome: Finish | None = None
        self.pids: dict[str, int] = {}
        self._reported: dict[int, int] = {}
        # torch + transformers take seconds to import: do it while the first agents stream.
        self._reassembler: Any = None
        self._import_error: BaseException | None = None
        self._importer = threading.Thread(target=self._load_reassembler, name="import-torch", daemon=True)
        self._importer.start()

    def _load_reassembler(self) -> None:
        try:
            from coordinator.reassembly import Reassembler

            self._reassembler = Reassembler(self.box, self.plan, self.log, self.progress)
            self.progress("warm")  # torch is loaded: the machine is quiet again (the launcher times its baseline now)
        except BaseException as exc:  # surfaced on first use, in the loop's thread
            self._import_error = exc

    @property
    def reassembler(self) -> Any:
        self._importer.join()
        if self._import_error is not None:
            raise RuntimeError("loading the reassembler failed") from self._import_error
        return self._reassembler

    # ---- setup ----------------------------------------------------------------------

    def open_socket(self) -> str:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.monitor = None
        curve = self.plan.extra.get("curve")
        if curve:
            self._start_authenticator(set(curve["agents"].values()))
            public, secret = load_keys(self.run_dir, None)
            if public.decode() != curve["coordinator"]:
                raise RuntimeError(f"keys/coordinator.public is {public.decode()!r}; the plan expects "
                                   f"{curve['coordinator']!r}")
            self.sock.curve_server = True
            self.sock.curve_publickey = public
            self.sock.curve_secretkey = secret
            self.monitor = self.sock.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, self.plan.piece_size + 64 * 1024)
        self.sock.setsockopt(zmq.LINGER, 1000)
        if self.bind.endswith(":0"):
            port = self.sock.bind_to_random_port(self.bind[: -len(":0")])
            endpoint = f"{self.bind[: -len(':0')]}:{port}"
        else:
            self.sock.bind(self.bind)
            endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return endpoint

    def _start_authenticator(self, allowed: set[str]) -> None:
        """pyzmq's ZAP authenticator, admitting only the plan's agent keys. Denials are queued and
        logged by the loop's thread (the log's hash chain is single-threaded)."""
        from zmq.auth.thread import ThreadAuthenticator

        denied = self.denied = []

        class PlanKeys:
            def callback(self, domain: str, key: bytes) -> bool:
                ok = key.decode(errors="replace") in allowed
                if not ok:
                    denied.append(key.decode(errors="replace"))
                return ok

        self.auth = ThreadAuthenticator(self.ctx)
        self.auth.start()
        self.auth.configure_curve_callback(domain="*", credentials_provider=PlanKeys())

    def _log_auth(self) -> None:
        while getattr(self, "denied", None):
            key = self.denied.pop(0)
            self.log.warning("auth.denied", key=key, reason="CURVE key not in the plan", expected="one of the plan's agent keys")
            self.progress("rejected", peer="?", reason=f"CURVE handshake refused: key {key[:12]}… is not in the plan")
        if self.monitor is None:
            return
        from zmq.utils.monitor import recv_monitor_message

        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            name = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no detail", zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
                    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication"}.get(event["event"], str(event["event"]))
            self.log.warning("auth.handshake_failed", kind=name, code=event["value"],
                             expected="a CURVE handshake with a key from the plan")
            self.progress("rejected", peer="?", reason=f"handshake failed ({name})")

    def restore(self) -> None:
        """Pick up whatever an earlier coordinator of this run left in the sandbox."""
        committed = [i for i in range(len(self.plan.fragments)) if self.store.is_committed(i)]
        for index in committed:
            bad = self.store.verify_committed(index)
            if bad:
                names = [self.plan.fragments[index].items[i].name for i in bad]
                raise RuntimeError(f"promoted fragment {index} no longer matches the plan digests: {names}")
        pieces = {str(i): self.store.received_pieces(i) for i in range(len(self.plan.fragments))
                  if i not in committed}
        pieces = {k: v for k, v in pieces.items() if v}
        if committed or pieces:
            self.log.info("coordinator.restore", committed=committed,
                          staged={k: sum(b - a for runs in v.values() for a, b in runs) for k, v in pieces.items()})
            self.step(Restored(time.monotonic(), committed, pieces))

    # ---- the loop -------------------------------------------------------------------

    def run(self) -> int:
        endpoint = self.open_socket()
        log_start(self.log, pid=os.getpid(), endpoint=endpoint, plan_digest=self.plan.digest,
                  settings=self.settings.__dict__)
        # The plan itself, so that a replay needs nothing but the logs.
        self.log.info("run.plan", plan=self.plan.to_json())
        self.log.info("run.settings", settings=json.loads(self.box.read_bytes("run.json")))
        self.restore()
        self.progress("ready", endpoint=endpoint, pid=os.getpid())
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        if self.control_fd is not None:
            poller.register(self.control_fd, zmq.POLLIN)
        next_tick = next_beat = time.monotonic()
        while self.outcome is None:
            timeout = max(0.0, min(next_tick, next_beat) - time.monotonic())
            ready = dict(poller.poll(int(timeout * 1000) + 1))
            if self.sock in ready:
                self._drain()
            if self.control_fd is not None and self.control_fd in ready:
                self._control()
            now = time.monotonic()
            if now >= next_tick and self.outcome is None:
                self._log_auth()
                self._tick(now)
                next_tick = now + TICK_S
            if now >= next_beat and self.outcome is None:
                for peer in self._bound_peers():
                    self._send(peer, "HEARTBEAT", {})
                next_beat = now + self.settings.heartbeat_ms / 1000
        self._log_auth()
        self.store.close()
        if self.monitor is not None:
            self.sock.disable_monitor()
            self.monitor.close()
        self.sock.close()
        if getattr(self, "auth", None) is not None:
            self.auth.stop()
        return self.exit_code

    def _drain(self, limit: int = 512) -> None:
        for _ in range(limit):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._receive(frames)
            if self.outcome is not None:
                return

    def _receive(self, frames: list[zmq.Frame]) -> None:
        peer = frames[0].bytes.hex()
        now = time.monotonic()
        try:
            msg = decode_from_agent([f.buffer for f in frames[1:]], self.plan.piece_size)
        except ProtocolError as exc:
            self.step(Malformed(now, peer, exc.field, exc.value, exc.expected))
            return
        if msg.kind == "HELLO":
            self.step(Hello(now, peer, msg.header, _user_id(frames[1])))
        elif msg.kind == "CHUNK":
            payload = msg.payload
            assert payload is not None
            key = (msg.header["item"], msg.header["piece"])
            self.payloads[key] = payload
            try:
                self.step(Chunk(now, peer, msg.header["item"], msg.header["piece"], payload.nbytes,
                                blake3(payload).hexdigest()))
            finally:
                self.payloads.pop(key, None)
        elif msg.kind == "HEARTBEAT":
            self.step(Heartbeat(now, peer), quiet=True)
        elif msg.kind == "BYE":
            self.step(Bye(now, peer))

    def _tick(self, now: float) -> None:
        self.step(Tick(now), quiet=True)
        for peer, pid in list(self.pids.items()):
            if peer in self.core.peers and not _alive(pid):
                self.step(AgentExited(time.monotonic(), pid))

    def _control_lines(self, timeout: float) -> list[str] | None:
        """Complete lines from the launcher; None once it closed the channel."""
        assert self.control_fd is not None
        ready, _, _ = select.select([self.control_fd], [], [], timeout)
        if not ready:
            return []
        data = os.read(self.control_fd, 4096)
        if not data:
            return None
        self._control_buf += data
        *lines, self._control_buf = self._control_buf.split(b"\n")
        return [line.decode(errors="replace").strip() for line in lines]

    def _control(self) -> None:
        lines = self._control_lines(0)
        if lines is None:
            self.control_fd = None
            self.step(EndOfAgents(time.monotonic(), "launcher closed control"))
            return
        for line in lines:
            if line.startswith("end"):
                self.step(EndOfAgents(time.monotonic(), line))

    def _kill_barrier(self, **point: Any) -> None:
        """Announce a kill point and wait until the launcher has killed the target."""
        if self.control_fd is None:
            return
        self.log.warning("fault.kill_point", **point)
        self.progress("kill_point", **point)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            lines = self._control_lines(deadline - time.monotonic())
            if lines is None or "killed" in (lines or []):
                self.log.warning("fault.killed", **point)
                return

    def _check_agent_kills(self, fragment: int) -> None:
        state = self.core.fragments[fragment]
        fraction = state.received_bytes / max(1, self.plan.fragments[fragment].nbytes)
        for point in [p for p in self.agent_kills if p[0] == fragment and fraction >= p[1]]:
            self.agent_kills.remove(point)
            self._kill_barrier(target="agent", fragment=fragment, fraction=point[1], pid=self._pid_of(fragment),
                               received=state.received_bytes)

    def _check_coordinator_kill(self, stage: str) -> None:
        at = self.coordinator_kill
        if at is None:
            return
        received = sum(f.received_bytes for f in self.core.fragments)
        if (at == "reassembly" and stage == "reassembly") or (
                isinstance(at, (int, float)) and stage == "bytes" and received >= at * self.plan.nbytes):
            self.coordinator_kill = None
            self._kill_barrier(target="coordinator", at=at, stage=stage, pid=os.getpid(), received=received)

    def _pid_of(self, fragment: int) -> int | None:
        peer = self.core.fragments[fragment].peer
        return self.pids.get(peer) if peer else None

    def _bound_peers(self) -> list[str]:
        return [name for name, p in self.core.peers.items() if p.fragment is not None]

    # ---- core step: log the event and the decisions, then carry them out -------------

    def step(self, event: Any, *, quiet: bool = False) -> None:
        actions = self.core.handle(event)
        if actions or not quiet or event.type == "heartbeat":
            self.log.info("core.step", ev=event.to_dict(), out=[a.to_dict() for a in actions])
        for action in actions:
            self._execute(action, event)

    def _execute(self, action: Any, event: Any) -> None:
        try:
            self._carry_out(action, event)
        except SandboxError as exc:
            self._storage_failure(action, exc)

    def _storage_failure(self, action: Any, exc: SandboxError) -> None:
        """Disk full, quota or permissions: stop cleanly. Promoted fragments are whole files that
        were renamed into place, so nothing promoted is touched; staged pieces stay for a resume."""
        if self.outcome is not None:
            return
        self.log.error("storage.error", action=action.to_dict(), error=str(exc), kind=type(exc).__name__)
        self.progress("storage_error", error=f"{type(exc).__name__}: {exc}", action=action.type)
        self.outcome = Finish(False, self.core.missing_fragments())
        self.exit_code = EXIT_STORAGE

    def _carry_out(self, action: Any, event: Any) -> None:
        if isinstance(action, Send):
            self._send(action.peer, action.kind, action.header)
            if action.kind == "REJECT":
                self.log.warning("message.rejected", peer=action.peer, **action.header)
                self.progress("rejected", peer=action.peer, reason=action.header["reason"])
            elif action.kind == "WELCOME":
                fragment = action.header["fragment"]
                self.pids[action.peer] = event.header["pid"]
                self.log.info("agent.welcomed", peer=action.peer, fragment=fragment, pid=event.header["pid"],
                              attempt=self.core.fragments[fragment].attempts,
                              resume_bytes=self.core.fragments[fragment].received_bytes)
                self.progress("hello", fragment=fragment, pid=event.header["pid"],
                              attempt=self.core.fragments[fragment].attempts,
                              received=self.core.fragments[fragment].received_bytes,
                              total=self.plan.fragments[fragment].nbytes)
                self._check_agent_kills(fragment)
        elif isinstance(action, Write):
            self.store.write(action.fragment, action.item, action.piece, self.payloads[(action.item, action.piece)])
            self._report_bytes(action.fragment)
            self._check_agent_kills(action.fragment)
            self._check_coordinator_kill("bytes")
        elif isinstance(action, Verify):
            started = time.perf_counter()
            bad = self.store.verify(action.fragment)
            self.log.info("fragment.verified", fragment=action.fragment, ok=not bad, bad_items=bad,
                          seconds=round(time.perf_counter() - started, 6))
            self.step(Verified(time.monotonic(), action.fragment, bad))
        elif isinstance(action, Promote):
            path = self.store.promote(action.fragment)
            self.log.info("fragment.promoted", fragment=action.fragment, path=path)
            self.progress("committed", fragment=action.fragment)
        elif isinstance(action, Arrival):
            self.log.info("prefix.arrival", **action.to_dict())
            self.reassembler.record_arrival(action)
        elif isinstance(action, Reassemble):
            self.reassembler.reassemble(action, before_evaluation=lambda: self._check_coordinator_kill("reassembly"))
        elif isinstance(action, AgentDead):
            self.pids.pop(action.peer, None)
            self.log.warning("agent.dead", peer=action.peer, fragment=action.fragment, reason=action.reason)
            self.progress("dead", fragment=action.fragment, reason=action.reason)
        elif isinstance(action, (Forget, Ban)):
            self.pids.pop(action.peer, None)
            self.log.info(f"peer.{action.type}", **action.to_dict())
        elif isinstance(action, Finish):
            self.outcome = action
            self.exit_code = self.reassembler.finish(action, self.core, self.store)

    def _send(self, peer: str, kind: str, header: dict[str, Any]) -> None:
        try:
            self.sock.send_multipart([bytes.fromhex(peer), *encode(kind, header)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the peer is gone (ROUTER_MANDATORY) or its queue is full
            self.log.info("send.dropped", peer=peer, kind=kind, error=str(exc))

    def _report_bytes(self, fragment: int) -> None:
        state = self.core.fragments[fragment]
        last = self._reported.get(fragment, -1)
        total = self.plan.fragments[fragment].nbytes
        if state.received_bytes - last >= total / 50 or state.missing == 0:
            self._reported[fragment] = state.received_bytes
            self.progress("bytes", fragment=fragment, received=state.received_bytes, total=total)


def _user_id(frame: zmq.Frame) -> str | None:
    """The ZAP user id of a message: with CURVE, the sender's authenticated public key."""
    try:
        value = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return value or None


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def serve(run_dir: str, bind: str, control_stdin: bool, faults: str | None = None,
          quota_bytes: int | None = None) -> int:
    server = CoordinatorServer(Path(run_dir), bind=bind, control_fd=sys.stdin.fileno() if control_stdin else None,
                               faults=json.loads(faults) if faults else None, quota_bytes=quota_bytes)
    return server.run()
