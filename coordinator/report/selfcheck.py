"""The run report's self-check: three lines at the top that say, each with its number, whether
the figures below can be trusted. (1) The all-layer checkpoint is the full model (logits
max |Δ| 0). (2) Every evaluated prefix went through the real final norm on its own last hidden
state (evaluate.final_norm_check, per checkpoint). (3) Every checkpoint was scored by the
baseline's evaluation protocol. Read from results.json and plan.json; nothing is re-measured."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox import layout


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    measured: str

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "FAIL"


def plan_tensor_digests(run_dir: Path) -> dict[str, str]:
    """Tensor name -> digest from the run's plan; empty when the plan cannot be read (the
    weight check then says so instead of passing on nothing)."""
    try:
        plan = json.loads((run_dir / layout.PLAN).read_text())
        return {it["name"]: it["digest"] for f in plan["fragments"] for it in f["items"] if it.get("kind") == "tensor"}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def run_checks(r: dict[str, Any], plan_digests: dict[str, str]) -> list[Check]:
    return [final_logits_check(r), final_norm_checks(r, plan_digests), protocol_check(r)]


def final_logits_check(r: dict[str, Any]) -> Check:
    name = "all-layer checkpoint = full model"
    final = r.get("final_check") or r.get("final") or {}
    if not final.get("complete", "logits_max_abs_diff" in final):
        missing = ", ".join(final.get("missing_ranges") or []) or "unknown"
        return Check(name, False, f"the run is incomplete (layers {missing} never arrived): no all-layer checkpoint")
    diff = final.get("logits_max_abs_diff")
    matches = bool(final.get("final_matches_baseline", r.get("final_matches_baseline")))
    return Check(
        name,
        diff == 0 and matches,
        f"logits max |Δ| = {diff} over {final.get('logits_positions')} prompt positions (must be 0); "
        f"final_matches_baseline {str(matches).lower()}",
    )


def final_norm_checks(r: dict[str, Any], plan_digests: dict[str, str]) -> Check:
    """Every record's norm_check: the hand-made norm equals the module's output, its input is
    that record's own last residual row (same rms), and its weight is the source's."""
    name = "each prefix through the real final norm, on its own statistics"
    records = [(f"checkpoint {c['checkpoint']}", c) for c in r.get("checkpoints") or []]
    records += [(f"gap model after arrival {g['arrival']}", g) for g in r.get("gap_checkpoints") or []]
    checked = [(what, c, c["norm_check"]) for what, c in records if isinstance(c.get("norm_check"), dict)]
    if not checked:
        return Check(name, False, "no checkpoint records a norm_check (results from before it was measured)")
    problems: list[str] = []
    for what, record, check in checked:
        if not check.get("ok"):
            problems.append(f"{what}: max |Δ| {check.get('max_abs_diff')} > tolerance {check.get('tolerance')}")
        last = (record.get("hidden_states") or [{}])[-1]
        if last.get("rms") != check.get("input_rms"):
            problems.append(f"{what}: norm input rms {check.get('input_rms')}, last residual row {last.get('rms')}")
    digests = {check.get("weight_digest") for _, _, check in checked}
    weight_name = checked[0][2].get("weight_name")
    source = plan_digests.get(str(weight_name))
    if len(digests) != 1:
        problems.append(f"{len(digests)} different final-norm weights across the checkpoints, expected 1")
    elif source is None:
        problems.append(f"the plan has no tensor {weight_name} to compare the norm weight with")
    elif digests != {source}:
        problems.append(f"the norm weight's digest is not the plan's {weight_name}")
    worst = max(float(check.get("max_abs_diff") or 0.0) for _, _, check in checked)
    rms = [float(check["input_rms"]) for _, _, check in checked if check.get("input_rms") is not None]
    first = checked[0][2]
    measured = (
        f"hand-made {first.get('kind')} (eps {first.get('eps'):.3g}) vs the module: max |Δ| = {worst:.3g} over "
        f"{len(checked)} model(s) (tolerance {first.get('tolerance'):.2g}); norm input = the model's own last hidden "
        f"state (rms {min(rms):.4g}–{max(rms):.4g}, equal to each one's last residual row); weight = the plan's "
        f"{weight_name}"
    )
    if problems:
        measured = "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
    return Check(name, not problems, measured)


def protocol_check(r: dict[str, Any]) -> Check:
    """The protocol results.json states (a corpus evaluation's, when there is one), else the eval
    text's name and positions; it passes when every checkpoint scored what the baseline did."""
    name = "evaluation protocol"
    base = (r.get("baseline") or {}).get("quality") or {}
    tokens = base.get("tokens")
    records = [*(r.get("checkpoints") or []), *(r.get("gap_checkpoints") or [])]
    scored = [(c.get("quality") or {}).get("tokens") for c in records]
    same = tokens is not None and all(t == tokens for t in scored)
    protocol = r.get("quality_protocol") or (r.get("corpus") or {}).get("protocol")
    if protocol:
        stated = _compact(protocol)
    else:
        text = (r.get("run") or {}).get("eval_text")
        shown = Path(text).name if text else "eval_text.txt (shipped, coordinator/data)"
        stated = f"{shown}, {tokens} scored positions"
    outcome = (
        f"every one of {len(scored)} checkpoint(s) scored the baseline's {tokens} positions"
        if same
        else f"checkpoints scored {sorted({t for t in scored if t is not None})} positions, the baseline {tokens}"
    )
    return Check(name, same, f"{stated}; {outcome}")


def _compact(value: Any) -> str:
    """A protocol record as one line: nested records in parentheses, no Python reprs."""
    if isinstance(value, dict):
        return "; ".join(
            f"{k}: {_compact(v) if not isinstance(v, dict) else '(' + _compact(v) + ')'}" for k, v in value.items()
        )
    return str(value)
