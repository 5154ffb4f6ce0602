"""What the launcher holds for one run: its options and what planning made of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from protocol.plan import Plan
from protocol.run_settings import RunOptions
from sandbox import Sandbox

SimulateOptions = RunOptions  # `fragsim simulate`'s options are the run's options (one definition)


@dataclass
class PreparedRun:
    run_dir: Path
    box: Sandbox
    plan: Plan
    order: list[int]
    source_dir: Path
