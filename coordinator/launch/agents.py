"""Agent processes started by this launcher, in a chosen order; kills land here too."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from protocol.errors import PlanError
from sandbox import Sandbox, layout

ORDER_HELP = "random (seeded shuffle), forward, reverse, or an explicit permutation such as 2,0,3,1"


def launch_order(spec: str, fragments: int, seed: int) -> list[int]:
    if spec == "forward":
        return list(range(fragments))
    if spec == "reverse":
        return list(reversed(range(fragments)))
    if spec == "random":
        order = list(range(fragments))
        random.Random(seed).shuffle(order)
        return order
    try:
        order = [int(x) for x in spec.split(",")]
    except ValueError:
        raise PlanError("--order", spec, ORDER_HELP) from None
    if sorted(order) != list(range(fragments)):
        raise PlanError("--order", spec, f"a permutation of 0..{fragments - 1} (each fragment once)")
    return order


# An agent maps the source read-only and holds a few pieces in flight: its address space is
# bounded at 2 GiB plus twice the source's size (mapping + page-table slack), set by the launcher.
AGENT_BASE_AS = 2 * 1024**3


def agent_memory_limit(run_dir: Path) -> int:
    plan = json.loads((run_dir / layout.PLAN).read_text())
    source = Path(plan["model"]["source_dir"])
    return AGENT_BASE_AS + 2 * sum(p.stat().st_size for p in source.glob("*.safetensors"))


def _limit_memory(limit: int) -> Callable[[], None]:
    def apply() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


class AgentLauncher:
    def __init__(self, run_dir: Path, endpoint: str, *, python: str = sys.executable) -> None:
        self.run_dir = run_dir
        self.box = Sandbox(run_dir)
        self.memory_limit = agent_memory_limit(run_dir)
        self.endpoint = endpoint
        self.python = python
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.attempts: dict[int, int] = {}

    def spawn(self, fragment: int) -> subprocess.Popen[bytes]:
        self.attempts[fragment] = self.attempts.get(fragment, 0) + 1
        stderr = self.box.open_append(layout.agent_stderr(fragment))
        proc = subprocess.Popen(
            [
                self.python,
                "-m",
                "agents",
                "run",
                "--run-dir",
                str(self.run_dir),
                "--fragment",
                str(fragment),
                "--connect",
                self.endpoint,
            ],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=_limit_memory(self.memory_limit),
        )
        stderr.close()
        self.procs[fragment] = proc
        return proc

    def kill(self, fragment: int) -> None:
        proc = self.procs.get(fragment)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def exited(self, fragment: int) -> int | None:
        proc = self.procs.get(fragment)
        return None if proc is None else proc.poll()

    def stop_all(self, timeout: float = 5.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
