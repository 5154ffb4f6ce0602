"""Shared fixtures: tiny random checkpoints, the prepared default model, and a harness that
runs real coordinator and agent processes over real sockets in a temporary run directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from checkpoints import make_tiny_llama

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 layers, tied embeddings, GQA (4 heads, 2 kv heads)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", num_layers=6)


@pytest.fixture(scope="session")
def tiny_untied_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untied lm_head, GQA, weights in several safetensors shards."""
    return make_tiny_llama(
        tmp_path_factory.mktemp("tiny-untied") / "model", num_layers=5, tied=False, sharded=True, seed=3
    )


@pytest.fixture(scope="session")
def default_source() -> Path:
    """The embedded SmolLM2 model, prepared once into the repo's artifacts/ (a cache kept across runs)."""
    from coordinator.launch.prepare import prepare_default

    return prepare_default(REPO / "artifacts", log=lambda *_: None)


@dataclass
class SimulationResult:
    code: int
    results: dict[str, Any]
    run_dir: Path
    output: str


def simulate(model: Path, run_dir: Path, **options: Any) -> SimulationResult:
    """One real run: coordinator and agents as separate processes, this process as the launcher."""
    from coordinator.launch.simulate import SimulateOptions, run_quietly

    opts = SimulateOptions(model=str(model), run_dir=str(run_dir), threads=options.pop("threads", 1), **options)
    code, results, _, output = run_quietly(opts, model)
    assert results is not None, output + _tail(run_dir / "logs" / "coordinator.stderr")
    return SimulationResult(code, results, run_dir, output)


def expected_prefix(order: list[int] | tuple[int, ...], plan: Any) -> list[int]:
    """Active layers after each arrival: the longest run of committed fragments from fragment 0."""
    done: set[int] = set()
    out = []
    for index in order:
        done.add(index)
        k = 0
        while k in done:
            k += 1
        out.append(plan.fragments[k - 1].last_layer + 1 if k else 0)
    return out


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else ""


class StandaloneCoordinator:
    """A coordinator process for a planned run (baseline recorded), for tests that talk to it
    directly over a real socket, like a hand-made agent would."""

    def __init__(self, model: Path, run_dir: Path, **options: Any) -> None:
        from coordinator.launch.baseline import SourceModel
        from coordinator.launch.driver import CoordinatorProcess
        from coordinator.launch.simulate import SimulateOptions, plan_run

        self.opts = SimulateOptions(model=str(model), run_dir=str(run_dir), threads=1, **options)
        self.run = plan_run(self.opts, model, model.name)
        SourceModel(model, 1).record(self.run.box, self.opts.prompt, self.opts.max_new_tokens)
        self.process = CoordinatorProcess(self.run.run_dir, self.run.box)
        self.endpoint = self.process.await_ready()
        self.events_until("warm")  # torch loaded: replies are prompt from here on

    @property
    def plan(self) -> Any:
        return self.run.plan

    def events_until(self, kind: str, timeout: float = 60.0) -> list[dict[str, Any]]:
        import time

        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ev = self.process.next_event(0.5)
            if ev is None:
                break
            seen.append(ev)
            if ev.get("progress") == kind:
                return seen
        raise AssertionError(f"no {kind!r} progress event; saw {[e.get('progress') for e in seen]}")

    def close(self) -> int:
        self.process.control("end", "test over")
        try:
            return self.process.proc.wait(timeout=60)
        finally:
            if self.process.proc.poll() is None:
                self.process.proc.kill()
