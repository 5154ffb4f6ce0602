"""One fragment agent: streams its own layer range to the coordinator.

Startup stays light (no torch): the agent parses its tensors' locations, memory-maps the
source read-only and sends pieces straight from the map (zero-copy) as the coordinator's
credit allows. The coordinator says which pieces it still wants, so a respawned agent
resumes where a dead one stopped.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import zmq

from agents.launcher_env import bundle_path_for, fragment_from_env
from agents.source import SourceCheckpoint
from protocol import log_events as E
from protocol.bundle import read_bundle
from protocol.digest import digest
from protocol.errors import PlanError, ProtocolError
from protocol.eventlog import log_start, open_event_log
from protocol.exit_codes import AgentExit
from protocol.messages import Frame, Message, decode_from_coordinator, encode, expand_want
from protocol.pacing import TokenBucket, uplinks
from protocol.plan import Fragment, Plan
from protocol.run_settings import RunSettings
from protocol.version import PROTOCOL_VERSION
from sandbox import Sandbox, SandboxError, layout

HEARTBEAT_S = 0.5
WELCOME_TIMEOUT_S = 30.0
COORDINATOR_DEAD_S = 10.0
# An agent on another host may start before its coordinator: it keeps trying, saying so at
# growing intervals (Paranoid Pirate's reconnect interval), until --retry-for runs out.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 10.0
PROGRESS_EVERY_S = 1.0
# A stop request (SIGTERM, or a caller's event) is noticed this soon, whatever the agent waits for.
STOP_CHECK_S = 0.1
# Asked to stop mid-session, the agent sends nothing new and waits this long at most for the
# coordinator to read what is in flight, or, with everything sent, for its verdict; then BYE.
DRAIN_S = 10.0
LINGER_MS = 2000  # at the end of a session, queued messages get this long to leave


def configure_client(sock: zmq.Socket[Any], run_dir: Path, fragment: int, server_public: str) -> None:
    """CURVE as this fragment's agent: its own key pair from the run's keys/, the coordinator's public key."""
    sock.curve_publickey, sock.curve_secretkey = layout.read_key_pair(run_dir, fragment)
    sock.curve_serverkey = server_public.encode()


class SourceMismatch(ValueError):
    pass


class Stopped(Exception):
    """A stop request arrived before the agent had anything to drain."""


def verify_source(
    fragment: Fragment, source: SourceCheckpoint, piece_size: int, *, stop: threading.Event | None = None
) -> int:
    """Hash every piece of the fragment in the local source against the plan's digests, before
    a byte is sent; returns the bytes checked. A host's copy of the model is not trusted.
    A set `stop` ends the check between pieces (raises Stopped)."""
    checked = 0
    for item in fragment.items:
        for piece, expected in enumerate(item.pieces):
            if stop is not None and stop.is_set():
                raise Stopped(f"asked to stop after verifying {checked} bytes")
            start, length = item.piece_span(piece, piece_size)
            view = source.view(item.source_file, item.source_offset + start, length)
            if digest(view) != expected:
                raise SourceMismatch(
                    f"{item.name} piece {piece} (bytes {start}..{start + length} of {item.source_file}) in "
                    f"{source.directory} differs from the plan's digest {expected[:16]}…: this source is not the "
                    f"model the run was planned from"
                )
            source.release(item.source_file, item.source_offset + start, length)
            checked += length
    return checked


def check_source(fragment: Fragment, source: SourceCheckpoint) -> None:
    """The plan is the contract: refuse to stream bytes the plan does not describe."""
    for item in fragment.items:
        if item.kind == "file":
            size = (source.directory / item.source_file).stat().st_size
            if size != item.nbytes:
                raise SourceMismatch(
                    f"file {item.name}: {size} bytes in the source, expected {item.nbytes} from the plan"
                )
            continue
        loc = source.tensors.get(item.name)
        if loc is None:
            raise SourceMismatch(f"tensor {item.name}: absent from the source {source.directory}, expected by the plan")
        if (loc.file, loc.offset, loc.nbytes, loc.dtype, loc.shape) != (
            item.source_file,
            item.source_offset,
            item.nbytes,
            item.dtype,
            item.shape,
        ):
            raise SourceMismatch(f"tensor {item.name}: source has {loc}, the plan expects {item}")


class Agent:
    def __init__(
        self,
        run_dir: Path,
        plan: Plan,
        fragment_index: int,
        endpoint: str,
        *,
        log: Any,
        keys: tuple[bytes, bytes] | None = None,
        source_dir: Path | None = None,
        retry_for_s: float = 0.0,
        say: Any = None,
        heartbeat_s: float = HEARTBEAT_S,
        coordinator_dead_s: float = COORDINATOR_DEAD_S,
        stop: threading.Event | None = None,
        on_welcome: Callable[[], None] | None = None,
        drain_s: float = DRAIN_S,
        uplink_bytes_s: float | None = None,
    ) -> None:
        """`keys`: this agent's CURVE pair (default: from the run directory's keys/);
        `source_dir`: this host's copy of the source (default: the plan's path);
        `retry_for_s`: how long to keep asking a coordinator that does not answer (0: ask once);
        `say`: where a person reads progress (None: the log only);
        `stop`: set by another thread or a signal handler, makes `run` drain and return TERMINATED;
        `on_welcome`: called once the coordinator's WELCOME arrived, before the first CHUNK;
        `uplink_bytes_s`: this agent's own uplink (None: as fast as the socket takes it): sends
        are paced to it, piece by piece."""
        self.run_dir = run_dir
        self.plan = plan
        if not 0 <= fragment_index < len(self.plan.fragments):
            raise ValueError(f"--fragment {fragment_index}: expected 0..{len(self.plan.fragments) - 1}")
        self.fragment = self.plan.fragments[fragment_index]
        self.endpoint = endpoint
        self.log = log
        self.keys = keys
        self.retry_for_s = retry_for_s
        self.say = say or (lambda _text: None)
        self.heartbeat_s = heartbeat_s
        self.coordinator_dead_s = coordinator_dead_s
        self.stop = stop
        self.on_welcome = on_welcome
        self.drain_s = drain_s
        self.uplink = TokenBucket(uplink_bytes_s) if uplink_bytes_s else None
        self.source = SourceCheckpoint(source_dir or self.plan.model["source_dir"])
        check_source(self.fragment, self.source)
        self.sent_bytes = 0
        self.sent_pieces = 0

    def _span(self, item_index: int, piece: int) -> tuple[str, int, int]:
        item = self.fragment.items[item_index]
        start, length = item.piece_span(piece, self.plan.piece_size)
        return item.source_file, item.source_offset + start, length

    def _payload(self, item_index: int, piece: int) -> memoryview:
        return self.source.view(*self._span(item_index, piece))

    def _socket(self) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        if self.retry_for_s > 0:  # queue only to a completed connection (see _await_connection)
            sock.setsockopt(zmq.IMMEDIATE, 1)
        curve = self.plan.extra.get("curve")
        if curve:  # authenticated and encrypted: the coordinator admits only the plan's agent keys
            if self.keys is None:
                configure_client(sock, self.run_dir, self.fragment.index, curve["coordinator"])
            else:
                sock.curve_publickey, sock.curve_secretkey = self.keys
                sock.curve_serverkey = curve["coordinator"].encode()
        sock.connect(self.endpoint)
        return sock

    def run(self) -> int:
        # A context of its own: its end waits for the last messages (BYE) to leave, without
        # touching the sockets of anyone else in this process (a Ray actor's, a test's).
        self.ctx: zmq.Context[Any] = zmq.Context()
        sock = self._socket()
        code: int = AgentExit.COORDINATOR_LOST
        try:
            if self.retry_for_s > 0 and not self._await_connection(sock):
                code = self._terminated(sock, "connecting") if self._stopped() else AgentExit.NO_WELCOME
            elif self._stopped():
                code = self._terminated(sock, "connecting")
            else:
                code = self._session(sock)
            return code
        finally:
            # With a coordinator that answered, flush what is queued (BYE after a commit or a stop);
            # with one that is gone or never came, nothing queued can reach it: do not wait.
            sock.close(linger=LINGER_MS if code in (AgentExit.COMMITTED, AgentExit.TERMINATED) else 0)
            self.ctx.term()
            self.source.close()

    def _stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def _sleep(self, seconds: float) -> bool:
        """Wait; True if a stop request came meanwhile."""
        if self.stop is None:
            time.sleep(seconds)
            return False
        return self.stop.wait(seconds)

    def _poll(self, sock: zmq.Socket[Any], seconds: float, flags: int) -> bool:
        """`sock.poll` in slices short enough to notice a stop request; False on a stop."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if sock.poll(max(0, int(min(left, STOP_CHECK_S) * 1000)), flags):
                return True
            if self._stopped() or time.monotonic() >= deadline:
                return False

    def _terminated(self, sock: zmq.Socket[Any], phase: str, *, bye: bool = False) -> AgentExit:
        """Stopped on request. After a HELLO, BYE frees the fragment at once: the next agent for it
        is welcomed without waiting for this one to be declared dead, and resumes."""
        if bye:
            try:
                sock.send_multipart(encode("BYE", {}), zmq.NOBLOCK)
            except zmq.Again:  # no connection to say it on: the coordinator's dead-after rule frees it
                bye = False
        self.log.warning(E.AGENT_TERMINATED, phase=phase, sent_bytes=self.sent_bytes, sent_pieces=self.sent_pieces,
                         bye=bye)  # fmt: skip
        self.say(
            f"stopped on request while {phase} (sent {self.sent_bytes / 1e6:.1f} MB); "
            f"a new agent for fragment {self.fragment.index} resumes where this one stopped"
        )
        return AgentExit.TERMINATED

    def _await_connection(self, sock: zmq.Socket[Any]) -> bool:
        """Wait, saying so with growing intervals, until the coordinator accepts the connection.
        With ZMQ_IMMEDIATE the socket is writable only then, so HELLO is sent once, to a
        coordinator that is there: a HELLO queued for an absent one could not reach it late."""
        deadline = time.monotonic() + self.retry_for_s
        wait, attempt = RETRY_FIRST_S, 1
        while not self._poll(sock, wait, zmq.POLLOUT):
            if self._stopped():
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                self.log.error(E.AGENT_NO_WELCOME, waited_s=round(self.retry_for_s, 3), connected=False)
                self.say(f"no coordinator answered at {self.endpoint} within {self.retry_for_s:.0f} s; giving up")
                return False
            attempt += 1
            wait = min(RETRY_MAX_S, wait * 2, left)
            self.log.info(E.AGENT_RETRY_CONNECT, attempt=attempt, wait_s=round(wait, 3), left_s=round(left, 3))
            self.say(
                f"no coordinator at {self.endpoint} yet; still trying (check {attempt}, next in {wait:.0f} s, "
                f"giving up in {left:.0f} s)"
            )
        return True

    def _hello_frames(self) -> list[Frame]:
        f = self.fragment
        return encode(
            "HELLO",
            {
                "v": PROTOCOL_VERSION,
                "run": self.plan.run_id,
                "plan": self.plan.digest,
                "fragment": f.index,
                "first_layer": f.first_layer,
                "last_layer": f.last_layer,
                "pid": os.getpid(),
            },
        )

    def _session(self, sock: zmq.Socket[Any], welcome_timeout_s: float = WELCOME_TIMEOUT_S) -> int:
        f = self.fragment
        sock.send_multipart(self._hello_frames())
        self.log.info(E.AGENT_HELLO, endpoint=self.endpoint, layers=f.label, nbytes=f.nbytes)
        welcome = self._await_welcome(sock, welcome_timeout_s)
        if welcome is AgentExit.TERMINATED:
            return self._terminated(sock, "waiting for WELCOME", bye=True)
        if isinstance(welcome, AgentExit):
            return welcome
        queue: deque[tuple[int, int]] = deque(expand_want(welcome.header["want"]))
        credit = welcome.header["credit"]
        # The coordinator sets the beat: its dead-after rule counts missed beats of its own length.
        self.heartbeat_s = welcome.header["heartbeat_ms"] / 1000
        in_flight: deque[tuple[int, int]] = deque()  # sent, not yet paid for by a CREDIT
        self.log.info(E.AGENT_WELCOME, pieces_wanted=len(queue), pieces_total=f.num_pieces, credit=credit)
        wanted_bytes = sum(self._span(item, piece)[2] for item, piece in queue)
        self.say(
            f"connected to {self.endpoint}: {len(queue)}/{f.num_pieces} pieces to send ({wanted_bytes / 1e6:.1f} MB)"
            + ("; the rest were verified before" if len(queue) < f.num_pieces else "")
        )
        if self.on_welcome is not None:
            self.on_welcome()
        if self.uplink is not None:
            self.log.info(E.AGENT_PACED, uplink_bytes_s=self.uplink.rate)
        started = last_send = last_recv = last_said = time.monotonic()
        sent_at_start = self.sent_bytes
        drain_until: float | None = None  # set on a stop request: nothing new is sent from then
        while True:
            if drain_until is None and self._stopped():
                drain_until = time.monotonic() + self.drain_s
            # Draining ends once the coordinator has read (credited) what is in flight; with nothing
            # left to send, the agent waits for the verdict instead, so a commit is not missed.
            if drain_until is not None and ((queue and not in_flight) or time.monotonic() >= drain_until):
                return self._terminated(sock, "sending" if queue else "waiting for the verdict", bye=True)
            paced_s = 0.0  # with an uplink limit: how long until the next piece may go
            while credit > 0 and queue and drain_until is None:
                if self.uplink is not None:
                    now = time.monotonic()
                    self.uplink.start(now)
                    if not self.uplink.ready(now):
                        paced_s = self.uplink.wait_s(now)
                        break
                item, piece = queue.popleft()
                payload = self._payload(item, piece)
                sock.send_multipart(encode("CHUNK", {"item": item, "piece": piece}, payload), copy=False)
                if self.uplink is not None:
                    self.uplink.take(time.monotonic(), payload.nbytes)
                credit -= 1
                in_flight.append((item, piece))
                self.sent_bytes += payload.nbytes
                self.sent_pieces += 1
                last_send = time.monotonic()
            wait = min(STOP_CHECK_S, max(0.0, self.heartbeat_s - (time.monotonic() - last_send)))
            if paced_s:
                wait = min(wait, paced_s)
            if sock.poll(int(wait * 1000) + 1, zmq.POLLIN):
                while sock.poll(0, zmq.POLLIN):
                    try:
                        msg = decode_from_coordinator(sock.recv_multipart())
                    except ProtocolError as exc:
                        self.log.warning(E.AGENT_BAD_MESSAGE, **exc.as_dict())
                        continue
                    last_recv = time.monotonic()
                    if msg.kind == "CREDIT":
                        credit += msg.header["n"]
                        # Credit comes back only for pieces the coordinator has read, so zmq
                        # is done with the oldest ones: their pages can go.
                        for _ in range(min(msg.header["n"], len(in_flight))):
                            self.source.release(*self._span(*in_flight.popleft()))
                    elif msg.kind == "WANT":
                        again = expand_want(msg.header["want"])
                        queue.extend(again)
                        self.log.info(E.AGENT_WANT, pieces=len(again))
                    elif msg.kind == "REJECT":
                        self.log.warning(E.AGENT_REJECTED, **msg.header)
                        if msg.header["fatal"]:
                            return AgentExit.REJECTED
                    elif msg.kind == "COMMITTED":
                        seconds = time.monotonic() - started
                        self.log.info(
                            E.AGENT_COMMITTED,
                            sent_bytes=self.sent_bytes,
                            sent_pieces=self.sent_pieces,
                            seconds=round(seconds, 6),
                        )
                        sock.send_multipart(encode("BYE", {}))
                        self.say(
                            f"committed: the coordinator verified fragment {f.index} ({f.label}); sent "
                            f"{(self.sent_bytes - sent_at_start) / 1e6:.1f} MB in {seconds:.2f} s"
                        )
                        return AgentExit.COMMITTED
            now = time.monotonic()
            if now - last_said >= PROGRESS_EVERY_S:
                done = self.sent_bytes - sent_at_start
                rate = done / max(now - started, 1e-9) / 1e6
                self.say(f"sent {done / 1e6:.1f}/{wanted_bytes / 1e6:.1f} MB ({rate:.0f} MB/s)")
                last_said = now
            if now - last_send >= self.heartbeat_s:
                sock.send_multipart(encode("HEARTBEAT", {}))
                last_send = now
            if now - last_recv > self.coordinator_dead_s:
                self.log.error(E.AGENT_COORDINATOR_LOST, silent_s=round(now - last_recv, 3))
                return AgentExit.COORDINATOR_LOST

    def _await_welcome(self, sock: zmq.Socket[Any], timeout_s: float = WELCOME_TIMEOUT_S) -> Message | AgentExit:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self._poll(sock, self.heartbeat_s, zmq.POLLIN):
                if self._stopped():
                    return AgentExit.TERMINATED
                continue
            try:
                msg = decode_from_coordinator(sock.recv_multipart())
            except ProtocolError as exc:
                self.log.warning(E.AGENT_BAD_MESSAGE, **exc.as_dict())
                continue
            if msg.kind == "WELCOME":
                return msg
            if msg.kind == "COMMITTED" and msg.header["fragment"] == self.fragment.index:
                self.log.info(E.AGENT_COMMITTED, sent_bytes=0, sent_pieces=0, seconds=0.0, already=True)
                sock.send_multipart(encode("BYE", {}))
                self.say(f"already committed: the coordinator holds fragment {self.fragment.index} verified")
                return AgentExit.COMMITTED
            if msg.kind == "REJECT" and msg.header.get("retry") is True:
                # Our fragment is still held by a predecessor the coordinator has not yet declared
                # dead: ask again after a heartbeat.
                self.log.info(E.AGENT_RETRY_HELLO, **msg.header)
                if self._sleep(self.heartbeat_s):
                    return AgentExit.TERMINATED
                sock.send_multipart(self._hello_frames())
                continue
            if msg.kind == "REJECT":
                self.log.error(E.AGENT_REJECTED, **msg.header)
                return AgentExit.REJECTED
        self.log.error(E.AGENT_NO_WELCOME, waited_s=round(timeout_s, 3))
        return AgentExit.NO_WELCOME


def run_uplink(root: Path, plan: Plan, fragment: int) -> float | None:
    """This agent's uplink in bytes/s from the run's --bandwidth (run.json is the launcher's
    record, so trusted; a run directory without one has no limits)."""
    path = root / layout.RUN_SETTINGS
    if not path.exists():
        return None
    options = RunSettings.from_json(json.loads(path.read_bytes())).options
    return uplinks(options.bandwidth, len(plan.fragments)).get(fragment)


def main_agent(run_dir: str, fragment: int, endpoint: str) -> int:
    root = Path(run_dir).resolve()
    box = Sandbox(root)
    box.mkdir(layout.LOGS)
    stream = box.open_log(layout.agent_log(fragment))
    plan = Plan.loads((root / layout.PLAN).read_bytes())
    log = open_event_log(stream, run_id=plan.run_id, role="agent", fragment=fragment)
    log_start(log, pid=os.getpid(), endpoint=endpoint, plan_digest=plan.digest)
    try:
        uplink = run_uplink(root, plan, fragment)
        agent = Agent(root, plan, fragment, endpoint, log=log, uplink_bytes_s=uplink)
    except (ValueError, OSError) as exc:
        log.error(E.AGENT_SETUP_FAILED, error=str(exc))
        print(f"agent {fragment}: {exc}", flush=True)
        return AgentExit.BAD_SETUP
    code = agent.run()
    log.info(E.PROCESS_EXIT, code=int(code))
    return int(code)


def main_bundle_agent(
    bundle_path: str,
    source_dir: str | None,
    endpoint: str,
    *,
    fragment: int | None = None,
    retry_for_s: float = 300.0,
    log_dir: str | None = None,
    environ: Mapping[str, str] | None = None,
    stop: threading.Event | None = None,
    ready_file: str | None = None,
    uplink_bytes_s: float | None = None,
) -> int:
    """An agent on a host of its own: the bundle is its plan and keys, `source_dir` this host's
    copy of the model, verified piece by piece before anything is sent. Its log goes to
    LOG_DIR/logs/agent_KK.jsonl (default: beside the bundle); a person reads stderr.

    `environ`: where a launcher's JOB_COMPLETION_INDEX, SLURM_PROCID or RANK is looked up when
    `fragment` is None (None: nowhere; the CLI passes os.environ); `bundle_path` may hold
    `{fragment}`. `stop`: an event that makes the agent drain and return TERMINATED (the CLI's
    SIGTERM handler sets it; an in-process caller may). `ready_file`: written (JSON) once the
    source is verified and the coordinator's WELCOME arrived, and left in place: it means "was
    ready"; a leftover from an earlier attempt is removed before anything else."""

    def say(text: str) -> None:
        print(f"agent {label}: {text}", file=sys.stderr, flush=True)

    label = "?" if fragment is None else str(fragment)
    try:
        ready = ReadyFile(Path(ready_file)) if ready_file else None
    except (SandboxError, OSError) as exc:
        say(f"refused: --ready-file {ready_file}: {exc}")
        return AgentExit.BAD_SETUP
    try:
        fragment, fragment_from = fragment_from_env(fragment, environ or {})
        label = "?" if fragment is None else str(fragment)
        bundle_path = bundle_path_for(bundle_path, fragment)
        bundle = read_bundle(Path(bundle_path), fragment)
    except PlanError as exc:
        say(f"refused: {exc}")
        return AgentExit.BAD_SETUP
    label = str(bundle.fragment)
    fragment_from = fragment_from or "bundle"
    root = Path(log_dir or Path(bundle_path).resolve().parent).resolve()
    box = Sandbox(root, create=log_dir is not None)
    box.mkdir(layout.LOGS)
    plan = bundle.plan
    source_dir = source_dir or str(plan.model["source_dir"])
    log = open_event_log(box.open_log(layout.agent_log(bundle.fragment)), run_id=plan.run_id, role="agent",
                         fragment=bundle.fragment)  # fmt: skip
    log_start(log, pid=os.getpid(), endpoint=endpoint, plan_digest=plan.digest, source=str(source_dir),
              fragment_from=fragment_from, ready_file=str(ready.path) if ready else None)  # fmt: skip
    keys = (bundle.agent_public, bundle.agent_secret) if bundle.agent_public and bundle.agent_secret else None
    f = plan.fragments[bundle.fragment]

    def on_welcome() -> None:
        if ready is None:
            return
        doc = {"run": plan.run_id, "fragment": f.index, "pid": os.getpid(), "endpoint": endpoint}
        try:
            ready.write(doc)
        except (SandboxError, OSError) as exc:  # a readiness flag is no reason to stop a transfer
            log.warning(E.AGENT_READY, path=str(ready.path), error=str(exc))
            say(f"could not write the ready file {ready.path}: {exc}")
            return
        log.info(E.AGENT_READY, path=str(ready.path))

    try:
        agent = Agent(root, plan, bundle.fragment, endpoint, log=log, keys=keys, source_dir=Path(source_dir),
                      retry_for_s=retry_for_s, say=say, stop=stop, on_welcome=on_welcome,
                      uplink_bytes_s=uplink_bytes_s)  # fmt: skip
        origin = "" if fragment_from == "bundle" else f" (fragment from {fragment_from})"
        say(
            f"run {plan.run_id}{origin}, layers {f.label}: verifying {f.nbytes / 1e6:.1f} MB of {source_dir} "
            "against the plan"
        )
        started = time.monotonic()
        checked = verify_source(f, agent.source, plan.piece_size, stop=stop)
    except Stopped:
        agent.source.close()
        log.warning(E.AGENT_TERMINATED, phase="verifying", sent_bytes=0, sent_pieces=0, bye=False)
        say("stopped on request while verifying the source; nothing was sent")
        log.info(E.PROCESS_EXIT, code=int(AgentExit.TERMINATED))
        return AgentExit.TERMINATED
    except (ValueError, OSError) as exc:
        log.error(E.AGENT_SETUP_FAILED, error=str(exc))
        say(f"refused: {exc}")
        return AgentExit.BAD_SETUP
    log.info(E.AGENT_SOURCE_VERIFIED, nbytes=checked, seconds=round(time.monotonic() - started, 6))
    say(f"source verified ({checked / 1e6:.1f} MB in {time.monotonic() - started:.2f} s); connecting to {endpoint}")
    code = agent.run()
    log.info(E.PROCESS_EXIT, code=int(code))
    if code != AgentExit.COMMITTED:
        say(f"ended with exit {int(code)} ({AgentExit(code).name.lower()})")
    return int(code)


class ReadyFile:
    """--ready-file: what a Kubernetes readinessProbe (`test -f`) or a script polls for. Written
    atomically (a temporary file beside it, then a rename) through a Sandbox of its directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(os.path.abspath(path))
        if not self.path.name or self.path.name in (".", ".."):
            raise SandboxError("expected a file path")
        self.box = Sandbox(self.path.parent, create=True)
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISDIR(mode):
            raise SandboxError("a directory; expected a file path")
        self.box.remove(self.path.name)  # a leftover of an earlier attempt must not say "ready"

    def write(self, doc: dict[str, Any]) -> None:
        self.box.write_json(self.path.name, doc, durable=False)
