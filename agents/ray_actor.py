"""An agent as a Ray actor, and the discovery task Ray runs once per node.

Ray is placement, start, restart and membership only. The actor runs the agent loop of
`fragsim agent --bundle`, with the keys of the bundle on its own host (keys never travel as
Ray arguments), and its bytes go over fragsim's ZeroMQ + CURVE plane, verified per piece.
Nothing here imports Ray: `coordinator.launch.ray_fleet` wraps these with `ray.remote`, so
the module is importable, and tested, without the extra.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from agents.agent import SourceMismatch, check_source, main_bundle_agent, verify_source
from agents.source import SourceCheckpoint
from protocol.bundle import read_bundle
from protocol.errors import PlanError
from protocol.exit_codes import AgentExit, is_permanent_agent_exit
from sandbox import layout

# After an attempt that can be retried (no coordinator yet, coordinator lost), the actor runs
# the agent loop again this much later; a restarted coordinator is found by the next attempt.
RETRY_DELAY_S = 1.0
# How long one attempt asks a coordinator that does not answer (the agent's --retry-for).
ATTEMPT_RETRY_FOR_S = 60.0


def discover(bundles_dir: str, source_dir: str, plan_digest: str, fragments: list[int]) -> dict[str, Any]:
    """What this node can serve: each fragment whose bundle is in `bundles_dir`, belongs to the
    plan with `plan_digest`, and whose copy in `source_dir` matches the plan piece by piece
    (BLAKE3). Returns {"servable": [i...], "refused": {i: why}, "seconds": s}; no key leaves."""
    started = time.monotonic()
    servable: list[int] = []
    refused: dict[str, str] = {}
    source: SourceCheckpoint | None = None
    try:
        for index in fragments:
            path = Path(bundles_dir) / layout.bundle_file_name(index)
            if not path.is_file():
                refused[str(index)] = f"no bundle at {path}"
                continue
            try:
                bundle = read_bundle(path, index)
                if bundle.plan.digest != plan_digest:
                    raise PlanError("bundle plan", bundle.plan.digest, f"the served run's plan {plan_digest}")
                fragment = bundle.plan.fragments[index]
                source = source or SourceCheckpoint(source_dir)
                check_source(fragment, source)
                verify_source(fragment, source, bundle.plan.piece_size)
            except (PlanError, SourceMismatch, ValueError, OSError) as exc:
                refused[str(index)] = " ".join(str(exc).split())
            else:
                servable.append(index)
    finally:
        if source is not None:
            source.close()
    return {"servable": servable, "refused": refused, "seconds": round(time.monotonic() - started, 6)}


class AgentActor:
    """One fragment's agent, kept alive by Ray (`max_restarts=-1`). The agent loop runs in a
    thread so that the actor answers `status`, `retarget` and `drain` while it streams; a
    process Ray restarts begins the loop again, and the coordinator sends it only the pieces
    it has not verified yet."""

    def __init__(self, bundle: str, source_dir: str, endpoint: str, fragment: int, log_dir: str | None = None) -> None:
        self.bundle, self.source_dir, self.fragment, self.log_dir = bundle, source_dir, fragment, log_dir
        self.endpoint = endpoint
        self.stop = threading.Event()  # the actor's: drain
        self.attempt_stop = threading.Event()  # this attempt's: retarget starts a fresh one
        self.attempts = 0
        self.code: int | None = None
        self.started = time.time()
        self.thread = threading.Thread(target=self._loop, name=f"fragsim-agent-{fragment}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.attempts += 1
            self.attempt_stop.clear()
            self.code = main_bundle_agent(self.bundle, self.source_dir, self.endpoint, fragment=self.fragment,
                                          retry_for_s=ATTEMPT_RETRY_FOR_S, log_dir=self.log_dir,
                                          stop=self.attempt_stop)  # fmt: skip
            if self.code == AgentExit.COMMITTED or is_permanent_agent_exit(self.code):
                return
            if not self.attempt_stop.is_set():  # retarget's fresh attempt starts at once
                self.stop.wait(RETRY_DELAY_S)

    def status(self) -> dict[str, Any]:
        """Where the agent is: `code` None while its first attempt runs; `streaming` while any runs."""
        import ray  # inside an actor, Ray is there

        return {
            "fragment": self.fragment,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "attempts": self.attempts,
            "code": self.code,
            "streaming": self.thread.is_alive(),
            "endpoint": self.endpoint,
            "started": self.started,
        }

    def retarget(self, endpoint: str) -> None:
        """A new coordinator of the run (at `endpoint`): end the attempt that streams to the old
        one and start a fresh session, HELLO first, that is sent only what is still missing."""
        self.endpoint = endpoint
        if self.thread.is_alive():
            self.attempt_stop.set()

    def drain(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """Stop the agent loop (as SIGTERM does) and say where it ended."""
        self.stop.set()
        self.attempt_stop.set()
        self.thread.join(timeout_s)
        return self.status()
