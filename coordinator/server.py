"""The coordinator process: a ZeroMQ ROUTER loop around the sans-IO core.

It turns socket traffic into core events (with its own clock), logs every event the core
consumed together with the decisions it made, and carries those decisions out: sockets,
sandbox writes, verification, promotion, reassembly and evaluation.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import zmq
from blake3 import blake3

from coordinator.background import Background
from coordinator.control import ControlChannel, KillPoints, Progress
from coordinator.core import Core, CoreSettings
from coordinator.curve import CurveGuard
from coordinator.events import (
    Action,
    AgentDead,
    AgentExited,
    Arrival,
    Ban,
    Bye,
    Chunk,
    EndOfAgents,
    Event,
    Finish,
    Forget,
    Grants,
    Heartbeat,
    Hello,
    Malformed,
    Promote,
    Reassemble,
    Restored,
    Send,
    Tick,
    Verified,
    Verify,
    Write,
)
from coordinator.results import build_results, write_results
from coordinator.store import FragmentStore
from coordinator.workers import MODEL_NICENESS, Completions, Done, Worker, lower_priority
from protocol import link
from protocol import log_events as E
from protocol.errors import ProtocolError
from protocol.eventlog import log_start, open_event_log
from protocol.exit_codes import RunExit
from protocol.messages import decode_from_agent, encode
from protocol.plan import Plan
from protocol.run_settings import DEFAULT_BIND, RunSettings
from sandbox import Sandbox, SandboxError, layout

if TYPE_CHECKING:
    from coordinator.reassembly import Reassembler

TICK_S = 0.25  # liveness checks: heartbeat deadlines and the pids of local agents
# With a link limit, the core spends link budget on every tick too: a tick well inside the
# bucket's burst (protocol.pacing.BURST_S) keeps the link busy while no chunk comes in.
LINK_TICK_S = 0.01
# The receive loop takes the GIL back after every recv, hash and write (each releases it); a
# model thread evaluating a checkpoint meanwhile holds it for up to the switch interval each
# time, which at Python's 5 ms capped the loop near 140 MB/s. At 0.5 ms the loop keeps its
# rate while checkpoints are evaluated (measured: README, "Progressive arrival").
GIL_SWITCH_S = 0.0005
DRAIN_BUDGET_S = 0.02  # socket reads per loop turn, before completions, control and ticks get theirs


class CoordinatorServer:
    def __init__(
        self,
        run_dir: Path,
        *,
        bind: str = DEFAULT_BIND,
        settings: CoreSettings | None = None,
        progress: Progress | None = None,
        control: ControlChannel | None = None,
        faults: dict[str, Any] | None = None,
        quota_bytes: int | None = None,
    ) -> None:
        self.run_dir = run_dir.resolve()
        self.plan = Plan.loads((self.run_dir / layout.PLAN).read_bytes())
        # Quota: what the plan says will arrive, three times over for fragments + snapshots'
        # metadata + logs and results, and never more than that.
        self.box = Sandbox(self.run_dir, quota_bytes=quota_bytes or 3 * self.plan.nbytes + 256 * 1024 * 1024)
        self.run_settings = RunSettings.from_json(json.loads(self.box.read_bytes(layout.RUN_SETTINGS)))
        self.box.mkdir(layout.LOGS)
        self.log = open_event_log(
            self.box.open_log(layout.COORDINATOR_LOG), run_id=self.plan.run_id, role="coordinator"
        )
        options = self.run_settings.options
        self.settings = settings or CoreSettings(
            heartbeat_ms=options.heartbeat_ms,
            dead_after_s=options.dead_after,
            link_bytes_s=options.link * 1e6 if options.link is not None else None,
            schedule=options.schedule,
        )
        self.core = Core(self.plan, self.settings)
        self.store = FragmentStore(self.box, self.plan)
        self.progress = progress or Progress()
        self.control = control
        self.faults = KillPoints(faults or {}, control, self.log, self.progress)
        self.bind = bind
        self.started = time.time()
        self.ctx: zmq.Context[Any] = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.curve: CurveGuard | None = None
        self.payloads: dict[tuple[int, int], memoryview] = {}  # the chunk being stepped, for its Write
        self.pids: dict[str, int] = {}  # peer -> the pid its HELLO claims
        self.local_pids: set[int] = set()  # pids the launcher started on this host: only these are checked
        self.outcome: Finish | None = None
        self.exit_code = RunExit.FAILED
        self.arrivals: list[dict[str, Any]] = []
        self.arrived: set[int] = set()  # every fragment an Arrival reported (deterministic from the log)
        self._gaps_due: list[tuple[Arrival, list[int]]] = []  # --reassembly gaps jobs of the current step
        self._reported: dict[int, int] = {}
        self._checkpoint_t: dict[int, float] = {}  # checkpoint -> loop time of the commit that made it
        self._reassembler = Background(self._build_reassembler, "import-torch")
        # Off the receive loop: read-back verification, and the model (reassembly, evaluation, verdict).
        self.completions = Completions()
        self.verifier = Worker("verify", self.completions)
        self.modeller = Worker("model", self.completions, niceness=MODEL_NICENESS)

    def _build_reassembler(self) -> Reassembler:
        lower_priority(MODEL_NICENESS)  # this thread imports torch: the first agents stream meanwhile
        from coordinator.reassembly import Reassembler

        reassembler = Reassembler(self.box, self.plan, self.run_settings)
        self.progress(link.WARM)  # torch is loaded: the machine is quiet again (the launcher times its baseline now)
        return reassembler

    @property
    def reassembler(self) -> Reassembler:
        return self._reassembler.get()

    # ---- setup ----------------------------------------------------------------------

    def open_socket(self) -> str:
        if self.plan.extra.get("curve"):
            self.curve = CurveGuard(self.ctx, self.sock, self.plan, self.run_dir)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, self.plan.piece_size + 64 * 1024)
        self.sock.setsockopt(zmq.LINGER, 1000)
        if self.bind.endswith(":0"):
            port = self.sock.bind_to_random_port(self.bind[: -len(":0")])
            return f"{self.bind[: -len(':0')]}:{port}"
        self.sock.bind(self.bind)
        return str(self.sock.getsockopt_string(zmq.LAST_ENDPOINT))

    def restore(self) -> None:
        """Pick up whatever an earlier coordinator of this run left in the sandbox. The run
        directory is untrusted here: a promoted fragment that no longer matches the plan is
        set aside (kept, for a look) and fetched again."""
        committed = []
        for index in range(len(self.plan.fragments)):
            if not self.store.is_committed(index):
                continue
            bad = self.store.verify_committed(index)
            if not bad:
                committed.append(index)
                continue
            names = [self.plan.fragments[index].items[i].name for i in bad]
            where = self.store.quarantine(index)
            self.log.warning(
                E.QUARANTINE,
                fragment=index,
                mismatched_items=names,
                path=where,
                expected="every item matching its digest in the plan",
            )
            self.progress(link.QUARANTINED, fragment=index, items=names, path=where)
        pieces = {str(i): self.store.received_pieces(i) for i in range(len(self.plan.fragments)) if i not in committed}
        pieces = {k: v for k, v in pieces.items() if v}
        if committed or pieces:
            self.log.info(
                E.RESTORE,
                committed=committed,
                staged={k: sum(b - a for runs in v.values() for a, b in runs) for k, v in pieces.items()},
            )
            self.step(Restored(time.monotonic(), committed, pieces))

    # ---- the loop -------------------------------------------------------------------

    def run(self) -> int:
        endpoint = self.open_socket()
        log_start(
            self.log, pid=os.getpid(), endpoint=endpoint, plan_digest=self.plan.digest, settings=self.settings.__dict__
        )
        # The plan and the run's options, so that a replay needs nothing but the logs.
        self.log.info(E.RUN_PLAN, plan=self.plan.to_json())
        self.log.info(E.RUN_SETTINGS, settings=self.run_settings.to_json())
        self.restore()
        self.progress(link.READY, endpoint=endpoint, pid=os.getpid())
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.completions.fileno(), zmq.POLLIN)
        if self.control is not None:
            poller.register(self.control.fd, zmq.POLLIN)
        next_tick = next_beat = next_pids = time.monotonic()
        tick_s = LINK_TICK_S if self.settings.scheduled else TICK_S
        while self.outcome is None:
            timeout = max(0.0, min(next_tick, next_beat) - time.monotonic())
            ready = dict(poller.poll(int(timeout * 1000) + 1))
            if self.sock in ready:
                self._drain()
            if self.completions.fileno() in ready and self.outcome is None:
                for done in self.completions.drain():
                    self._completed(done)
            if self.control is not None:
                if self.control.fd in ready:
                    self.control.pump(0)
                self._obey_control(poller)
            now = time.monotonic()
            if now >= next_tick and self.outcome is None:
                self._tick(now, pids=now >= next_pids)
                if now >= next_pids:
                    self._report_auth()
                    next_pids = now + TICK_S
                next_tick = now + tick_s
            if now >= next_beat and self.outcome is None:
                for peer in self._bound_peers():
                    self._send(peer, "HEARTBEAT", {})
                next_beat = now + self.settings.heartbeat_ms / 1000
        self._report_auth()
        for worker in (self.verifier, self.modeller):
            worker.stop(timeout=5.0)  # idle after a normal end; a storage error leaves them to exit with us
        self.store.close()
        self.completions.close()
        if self.curve is not None:
            self.curve.close()
        self.sock.close()
        return int(self.exit_code)

    def _drain(self, limit: int = 512) -> None:
        # Bounded in time as well: agents that keep the socket busy must not starve the loop's
        # other duties (a finished verification waited 1.7 s behind 512 pieces at 200 MB/s).
        until = time.monotonic() + DRAIN_BUDGET_S
        for _ in range(limit):
            if time.monotonic() > until:
                return
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
                self.step(
                    Chunk(
                        now, peer, msg.header["item"], msg.header["piece"], payload.nbytes, blake3(payload).hexdigest()
                    )
                )
            finally:
                self.payloads.pop(key, None)
        elif msg.kind == "HEARTBEAT":
            self.step(Heartbeat(now, peer))
        elif msg.kind == "BYE":
            self.step(Bye(now, peer))

    def _obey_control(self, poller: zmq.Poller) -> None:
        assert self.control is not None
        for spawned in self.control.take_all(link.SPAWNED):
            self.local_pids.add(_spawned_pid(spawned))
        line = self.control.take(link.END)
        if line is not None:
            self.step(EndOfAgents(time.monotonic(), line))
        elif self.control.closed:
            poller.unregister(self.control.fd)  # EOF stays readable: polling it would spin
            self.control = None
            self.step(EndOfAgents(time.monotonic(), "launcher closed control"))

    def _tick(self, now: float, *, pids: bool = True) -> None:
        self.step(Tick(now))
        if not pids:
            return
        for peer, pid in list(self.pids.items()):
            # A pid only means something for a process this launcher started on this host; any
            # other agent (another host, another launcher) lives by its heartbeats alone.
            if pid in self.local_pids and peer in self.core.peers and not _alive(pid):
                self.step(AgentExited(time.monotonic(), pid))

    def _report_auth(self) -> None:
        if self.curve is not None:
            self.curve.report(self.log, self.progress)

    def _bound_peers(self) -> list[str]:
        return [name for name, p in self.core.peers.items() if p.fragment is not None]

    def _pid_of(self, fragment: int) -> int | None:
        peer = self.core.fragments[fragment].peer
        return self.pids.get(peer) if peer else None

    def _received(self) -> int:
        return sum(f.received_bytes for f in self.core.fragments)

    # ---- core step: log the event and the decisions, then carry them out -------------

    def step(self, event: Event) -> None:
        actions = self.core.handle(event)
        if actions or not isinstance(event, Tick):  # a tick that decides nothing changes nothing
            self.log.info(E.CORE_STEP, ev=event.to_dict(), out=[a.to_dict() for a in actions])
        for action in actions:
            try:
                self._carry_out(action, event)
            except SandboxError as exc:
                self._storage_failure(action, exc)
        self._submit_gaps()  # after this step's prefix evaluation: the model worker keeps arrival order

    def _storage_failure(self, action: Action, exc: SandboxError) -> None:
        """Disk full, quota or permissions: stop cleanly. Promoted fragments are whole files that
        were renamed into place, so nothing promoted is touched; staged pieces stay for a resume."""
        if self.outcome is not None:
            return
        self.log.error(E.STORAGE_ERROR, action=action.to_dict(), error=str(exc), kind=type(exc).__name__)
        self.progress(link.STORAGE_ERROR, error=f"{type(exc).__name__}: {exc}", action=action.type)
        self.outcome = Finish(False, self.core.missing_fragments())
        self.exit_code = RunExit.STORAGE

    def _carry_out(self, action: Action, event: Event) -> None:
        if isinstance(action, Send):
            self._send(action.peer, action.kind, action.header)
            if action.kind == "REJECT":
                self.log.warning(E.MESSAGE_REJECTED, peer=action.peer, **action.header)
                self.progress(link.REJECTED, peer=action.peer, reason=action.header["reason"])
            elif action.kind == "WELCOME" and isinstance(event, Hello):
                self._welcomed(action, event)
        elif isinstance(action, Write):
            self.store.write(action.fragment, action.item, action.piece, self.payloads[(action.item, action.piece)])
            state = self.core.fragments[action.fragment]
            if state.missing and all(state.have[action.item]):
                # A whole item while its fragment still streams: read it back now, so the
                # fragment's own verification (and its commit) waits only for its last items.
                job = functools.partial(self.store.verify_item, action.fragment, action.item)
                self.verifier.submit("verify_item", action, job)
            self._report_bytes(action.fragment)
            self.faults.agent_progress(
                action.fragment,
                state.received_bytes,
                self.plan.fragments[action.fragment].nbytes,
                self._pid_of(action.fragment),
            )
            self.faults.run_progress(self._received(), self.plan.nbytes)
        elif isinstance(action, Verify):
            self.verifier.submit("verify", action, functools.partial(self.store.verify, action.fragment))
        elif isinstance(action, Promote):
            path = self.store.promote(action.fragment)
            self.log.info(E.FRAGMENT_PROMOTED, fragment=action.fragment, path=path)
            self.progress(link.COMMITTED, fragment=action.fragment)
        elif isinstance(action, Arrival):
            self.log.info(E.PREFIX_ARRIVAL, **action.to_dict())
            row = {k: v for k, v in action.to_dict().items() if k != "type"}
            row.update(fragment_layers=self.plan.fragments[action.fragment].label,
                       ranges=[self.plan.fragments[i].label for i in action.prefix],
                       since_start_s=self._since_start(event.t))  # fmt: skip
            self.arrivals.append(row)
            self.progress(link.ARRIVAL, **row)
            self.arrived.add(action.fragment)
            holes = 0 in self.arrived and self.arrived != set(action.prefix)
            if holes and self.run_settings.options.reassembly == "gaps":
                self._gaps_due.append((action, sorted(self.arrived)))
        elif isinstance(action, Reassemble):
            self._checkpoint_t[action.checkpoint] = event.t
            self.faults.before_evaluation(self._received())
            self.modeller.submit("evaluate", action, functools.partial(self._evaluate, action))
        elif isinstance(action, AgentDead):
            pid = self.pids.pop(action.peer, None)
            self.log.warning(E.AGENT_DEAD, peer=action.peer, fragment=action.fragment, reason=action.reason)
            self.progress(link.DEAD, fragment=action.fragment, pid=pid, reason=action.reason)
        elif isinstance(action, Forget):
            self.pids.pop(action.peer, None)
            self.log.info(E.PEER_FORGET, **action.to_dict())
        elif isinstance(action, Ban):
            self.pids.pop(action.peer, None)
            self.log.info(E.PEER_BAN, **action.to_dict())
        elif isinstance(action, Grants):
            pass  # the decision is in the step's log line; its CREDIT sends follow it
        elif isinstance(action, Finish):
            self._submit_gaps()
            self._finish(action)

    def _welcomed(self, action: Send, hello: Hello) -> None:
        fragment = action.header["fragment"]
        state = self.core.fragments[fragment]
        pid = hello.header["pid"]
        self.pids[action.peer] = pid
        self.log.info(
            E.AGENT_WELCOMED,
            peer=action.peer,
            fragment=fragment,
            pid=pid,
            attempt=state.attempts,
            resume_bytes=state.received_bytes,
        )
        total = self.plan.fragments[fragment].nbytes
        self.progress(
            link.HELLO, fragment=fragment, pid=pid, attempt=state.attempts, received=state.received_bytes, total=total
        )
        self.faults.agent_progress(fragment, state.received_bytes, total, pid)

    def _submit_gaps(self) -> None:
        for arrival, fragments in self._gaps_due:
            job = functools.partial(self.reassembler.evaluate_gaps, arrival.index, fragments)
            self.modeller.submit("gaps", arrival, job)
        self._gaps_due.clear()

    def _evaluate(self, action: Reassemble) -> dict[str, Any]:
        return self.reassembler.reassemble(action)

    def _finish(self, action: Finish) -> None:
        """The verdict waits for every queued evaluation: it is the model worker's last job."""

        def verdict() -> dict[str, Any]:
            final: dict[str, Any] = {
                "complete": action.complete,
                "missing": action.missing,
                "missing_ranges": [self.plan.fragments[i].label for i in action.missing],
            }
            if action.complete:
                final.update(self.reassembler.final_check(self.store))
            return final

        self.modeller.submit("finish", action, verdict)

    def _completed(self, done: Done) -> None:
        """A worker finished a job: log it and feed its outcome to the core, in this thread."""
        if isinstance(done.error, SandboxError):
            self._storage_failure(done.key, done.error)
            return
        if done.error is not None:
            raise RuntimeError(f"the {done.tag} job for {done.key} failed") from done.error
        if done.tag == "verify_item":
            self.log.info(E.ITEM_VERIFIED, fragment=done.key.fragment, item=done.key.item, ok=done.value,
                          seconds=round(done.seconds, 6))  # fmt: skip
        elif done.tag == "verify":
            fragment, bad = done.key.fragment, done.value
            self.log.info(E.FRAGMENT_VERIFIED, fragment=fragment, ok=not bad, bad_items=bad,
                          seconds=round(done.seconds, 6))  # fmt: skip
            self.step(Verified(time.monotonic(), fragment, bad))
        elif done.tag == "evaluate":
            record = done.value
            self.log.info(E.CHECKPOINT_EVALUATED, **record, started_mono=round(done.started, 6))
            self.progress(link.CHECKPOINT, **{k: v for k, v in record.items() if k != "tokens"})
        elif done.tag == "gaps":
            self.log.info(E.GAP_EVALUATED, **done.value, started_mono=round(done.started, 6))
        elif done.tag == "finish":
            self._conclude(done.key, done.value)

    def _conclude(self, action: Finish, final: dict[str, Any]) -> None:
        self.outcome = action
        reassembler = self.reassembler
        results = build_results(
            self.plan,
            self.run_settings,
            started=self.started,
            baseline=reassembler.baseline,
            fragments=self.core.fragment_stats(),
            arrivals=self.arrivals,
            checkpoints=reassembler.checkpoints,
            gap_checkpoints=reassembler.gap_checkpoints,
            final=final,
            timing=self._timing(),
        )
        write_results(self.box, results)
        matches = results["final_matches_baseline"]
        self.log.info(E.RUN_FINISHED, **final)
        self.progress(link.FINISHED, complete=action.complete, final_matches_baseline=matches, final=final)
        if not action.complete:
            self.exit_code = RunExit.INCOMPLETE
        else:
            self.exit_code = RunExit.OK if matches else RunExit.MISMATCH

    def _since_start(self, t: float) -> float | None:
        """Seconds from the first byte streamed to `t` (this coordinator's first byte: a resumed
        run counts from its own; what was restored is there from 0)."""
        firsts = [f.first_chunk_t for f in self.core.fragments if f.first_chunk_t is not None]
        return round(max(0.0, t - min(firsts)), 6) if firsts else None

    def _timing(self) -> dict[str, Any]:
        """When each checkpoint became available, and the link it came over."""
        return {
            "schedule": self.settings.schedule if self.settings.scheduled else None,
            "link_bytes_s": self.settings.link_bytes_s,
            "bandwidth": self.run_settings.options.bandwidth,
            "since_start_s": {k: self._since_start(t) for k, t in self._checkpoint_t.items()},
        }

    def _send(self, peer: str, kind: str, header: dict[str, Any]) -> None:
        try:
            self.sock.send_multipart([bytes.fromhex(peer), *encode(kind, header)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the peer is gone (ROUTER_MANDATORY) or its queue is full
            self.log.info(E.SEND_DROPPED, peer=peer, kind=kind, error=str(exc))

    def _report_bytes(self, fragment: int) -> None:
        state = self.core.fragments[fragment]
        last = self._reported.get(fragment, -1)
        total = self.plan.fragments[fragment].nbytes
        if state.received_bytes - last >= total / 50 or state.missing == 0:
            self._reported[fragment] = state.received_bytes
            self.progress(link.BYTES, fragment=fragment, received=state.received_bytes, total=total)


def _user_id(frame: zmq.Frame) -> str | None:
    """The ZAP user id of a message: with CURVE, the sender's authenticated public key."""
    try:
        value = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return str(value) if value else None


def _spawned_pid(line: str) -> int:
    """The pid of a 'spawned: FRAGMENT PID' control line (the launcher's own: trusted)."""
    return int(line.split(":", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def serve(
    run_dir: str, bind: str, control_stdin: bool, faults: str | None = None, quota_bytes: int | None = None
) -> int:
    sys.setswitchinterval(GIL_SWITCH_S)
    server = CoordinatorServer(
        Path(run_dir),
        bind=bind,
        control=ControlChannel(sys.stdin.fileno()) if control_stdin else None,
        faults=json.loads(faults) if faults else None,
        quota_bytes=quota_bytes,
    )
    return server.run()
