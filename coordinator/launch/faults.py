"""Fault-injection plans: which agent to SIGKILL at which fraction of its bytes."""

from __future__ import annotations

import random
import re

from protocol.errors import PlanError

START = "start"  # killed right after spawn, before it can say HELLO
KillPoint = tuple[int, "float | str"]


def parse_kill(spec: str, fragments: int) -> KillPoint:
    """'2@0.5' kills fragment 2's agent once half its bytes arrived; '2@start' before its HELLO."""
    match = re.fullmatch(r"(\d+)@(start|\d+(?:\.\d+)?|\.\d+)", spec.strip())
    if not match:
        raise PlanError("--kill", spec, "FRAG@FRACTION with FRACTION in [0, 1] or 'start', e.g. 2@0.5")
    fragment = int(match.group(1))
    if fragment >= fragments:
        raise PlanError("--kill fragment", fragment, f"0..{fragments - 1}")
    if match.group(2) == START:
        return fragment, START
    fraction = float(match.group(2))
    if not 0.0 <= fraction <= 1.0:
        raise PlanError("--kill fraction", fraction, "between 0 (right after HELLO) and 1 (after the last chunk)")
    return fragment, fraction


def random_kills(count: int, fragments: int, seed: int) -> list[KillPoint]:
    """Reproducible kills: one seed, one list."""
    if count < 0:
        raise PlanError("--kill-random", count, "a count >= 0")
    rng = random.Random(f"kills-{seed}")
    return [(rng.randrange(fragments), round(rng.random(), 2)) for _ in range(count)]


def parse_coordinator_kill(spec: str | None) -> float | str | None:
    if spec is None:
        return None
    if spec == "reassembly":
        return spec
    try:
        fraction = float(spec)
    except ValueError:
        raise PlanError("--kill-coordinator", spec, "a fraction in [0, 1] of all bytes, or 'reassembly'") from None
    if not 0.0 <= fraction <= 1.0:
        raise PlanError("--kill-coordinator", spec, "a fraction in [0, 1] of all bytes, or 'reassembly'")
    return fraction
