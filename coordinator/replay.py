"""`fragsim replay RUN_DIR`: rebuild a run from its logs alone and check it.

The coordinator log holds every event its core consumed and the decisions it made. Replay
feeds those events, in order, to a fresh `Core` (one per coordinator process: a resumed run
has several) and requires the same decisions; then it checks what the logs say happened
against results.json. It does not re-implement any rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.core import Core, CoreSettings
from coordinator.events import EVENT_TYPES, event_from_dict
from protocol import log_events as E
from protocol.eventlog import line_digest
from protocol.plan import Plan, plan_from_json
from protocol.version import PROTOCOL_VERSION
from sandbox import layout

COORDINATOR_LOG_NAME = Path(layout.COORDINATOR_LOG).name


class ReplayRefused(Exception):
    """The logs cannot be replayed by this version (other protocol, other plan, no plan)."""


@dataclass
class Line:
    file: str
    number: int
    data: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.file}:{self.number}"


@dataclass
class Replay:
    run_dir: Path
    notes: list[str] = field(default_factory=list)  # tolerated oddities: truncated lines, unknown events
    differences: list[str] = field(default_factory=list)  # anything that makes replay disagree
    story: list[tuple[float, str]] = field(default_factory=list)
    rebuilt: dict[str, Any] = field(default_factory=dict)
    lines: list[Line] = field(default_factory=list)
    segments: int = 0

    @property
    def agrees(self) -> bool:
        return not self.differences


def read_logs(run_dir: Path, replay: Replay) -> dict[str, list[Line]]:
    files: dict[str, list[Line]] = {}
    for path in sorted((run_dir / layout.LOGS).glob("*.jsonl")):
        raw = path.read_text(errors="replace").split("\n")
        lines: list[Line] = []
        for number, text in enumerate(raw, start=1):
            if not text.strip():
                continue
            try:
                data = json.loads(text)
                if not isinstance(data, dict):
                    raise ValueError("not an object")
            except ValueError:
                # A process killed mid-write leaves half a line; its successor starts a new line.
                last_of_process = number == len(raw) or (number < len(raw) and "E.PROCESS_START" in raw[number])
                if last_of_process or all(not t.strip() for t in raw[number:]):
                    replay.notes.append(f"{path.name}:{number}: truncated line (its process was killed): {text[:60]!r}")
                else:
                    replay.differences.append(f"{path.name}:{number}: unreadable line in the middle of the log")
                continue
            data["_text"] = text
            lines.append(Line(path.name, number, data))
        files[path.name] = lines
    if COORDINATOR_LOG_NAME not in files:
        raise ReplayRefused(f"{run_dir}/{layout.COORDINATOR_LOG}: missing; nothing to replay")
    return files


def check_chain(name: str, lines: list[Line], replay: Replay) -> None:
    """seq/prev per process: a removed, inserted or edited line breaks the chain right there."""
    expected_seq, prev = 0, None
    for line in lines:
        d = line.data
        if d.get("event") == E.PROCESS_START:
            expected_seq, prev = 0, None
        if d.get("seq") != expected_seq or d.get("prev") != prev:
            replay.differences.append(
                f"{line.where}: log chain broken (seq {d.get('seq')}, expected {expected_seq}"
                f"{'' if d.get('prev') == prev else '; prev digest differs'}): a line was "
                "removed, inserted or edited before here"
            )
            expected_seq = d.get("seq", expected_seq)
        expected_seq += 1
        prev = line_digest(d["_text"])


def load_plan(files: dict[str, list[Line]]) -> Plan:
    starts = [ln for lines in files.values() for ln in lines if ln.data.get("event") == E.PROCESS_START]
    for ln in starts:
        version = ln.data.get("protocol_version")
        if version != PROTOCOL_VERSION:
            raise ReplayRefused(
                f"{ln.where}: log written with protocol version {version}; this fragsim replays "
                f"version {PROTOCOL_VERSION}"
            )
    plans = [ln for ln in files[COORDINATOR_LOG_NAME] if ln.data.get("event") == E.RUN_PLAN]
    if not plans:
        raise ReplayRefused(
            f"{COORDINATOR_LOG_NAME}: no {E.RUN_PLAN} event; expected the plan logged at coordinator start"
        )
    plan = plan_from_json(plans[0].data["plan"])
    for ln in starts + plans[1:]:
        digest = ln.data.get("plan_digest", ln.data.get("plan", {}).get("plan_digest"))
        if digest is not None and digest != plan.digest:
            raise ReplayRefused(
                f"{ln.where}: log of plan {str(digest)[:16]}…, but this run's plan is "
                f"{plan.digest[:16]}…: logs from a different plan"
            )
    return plan


def _normal(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=list))


def replay_core(plan: Plan, lines: list[Line], replay: Replay) -> Core | None:
    """Feed every logged core event to a fresh Core per coordinator process; decisions must match."""
    core: Core | None = None
    for line in lines:
        d = line.data
        if d.get("event") == E.PROCESS_START:
            core = Core(plan, CoreSettings(**d.get("settings", {})))
            replay.segments += 1
            continue
        if d.get("event") != E.CORE_STEP or core is None:
            continue
        kind = d.get("ev", {}).get("type")
        if kind not in EVENT_TYPES:
            replay.notes.append(f"{line.where}: unknown event kind {kind!r} (skipped)")
            continue
        actions = [_normal(a.to_dict()) for a in core.handle(event_from_dict(d["ev"]))]
        logged = d.get("out", [])
        if actions != logged:
            first = next(
                (i for i, (a, b) in enumerate(zip(actions, logged, strict=False)) if a != b),
                min(len(actions), len(logged)),
            )
            replay.differences.append(
                f"{line.where}: replayed decisions differ from the logged ones for event {kind} "
                f"(decision {first}: logged {logged[first] if first < len(logged) else None}, "
                f"replayed {actions[first] if first < len(actions) else None})"
            )
    return core


_GAP_KEYS = ("arrival", "layers", "fragments", "missing", "text", "tokens", "label")


def rebuild(plan: Plan, core: Core | None, coordinator: list[Line]) -> dict[str, Any]:
    last_start = max(i for i, ln in enumerate(coordinator) if ln.data.get("event") == E.PROCESS_START)
    segment = [ln.data for ln in coordinator[last_start:]]
    arrivals = [
        {k: v for k, v in a.items() if k in ("index", "fragment", "layers", "prefix", "grew")}
        for a in (d for d in segment if d.get("event") == E.PREFIX_ARRIVAL)
    ]
    checkpoints = [
        {k: d.get(k) for k in ("checkpoint", "layers", "fragments", "text", "tokens", "label", "snapshot")}
        for d in segment
        if d.get("event") == E.CHECKPOINT_EVALUATED
    ]
    gap_checkpoints = [{k: d.get(k) for k in _GAP_KEYS} for d in segment if d.get("event") == E.GAP_EVALUATED]
    finished = next((d for d in segment if d.get("event") == E.RUN_FINISHED), None)
    final = None
    if finished is not None:
        final = {
            k: v
            for k, v in finished.items()
            if k not in ("event", "time", "mono", "run", "role", "seq", "prev", "_text", "level")
        }
    return {
        "run_id": plan.run_id,
        "plan_digest": plan.digest,
        "arrivals": arrivals,
        "checkpoints": checkpoints,
        "gap_checkpoints": gap_checkpoints,
        "fragments": core.fragment_stats() if core else None,
        "final": final,
    }


def compare(rebuilt: dict[str, Any], results: dict[str, Any], replay: Replay) -> None:
    def differ(what: str, logged: Any, recorded: Any) -> None:
        replay.differences.append(
            f"{what}: the logs say {json.dumps(logged)[:200]}, results.json says {json.dumps(recorded)[:200]}"
        )

    if results["run"]["plan_digest"] != rebuilt["plan_digest"]:
        differ("plan digest", rebuilt["plan_digest"], results["run"]["plan_digest"])
    recorded = [{k: a[k] for k in ("index", "fragment", "layers", "prefix", "grew")} for a in results["arrivals"]]
    if recorded != rebuilt["arrivals"]:
        differ("arrivals", rebuilt["arrivals"], recorded)
    recorded_ck = [
        {k: c.get(k) for k in ("checkpoint", "layers", "fragments", "text", "tokens", "label", "snapshot")}
        for c in results["checkpoints"]
    ]
    for mine, theirs in zip(rebuilt["checkpoints"], recorded_ck, strict=False):  # counts compared below
        if mine != theirs:
            differ(f"checkpoint {mine['checkpoint']}", mine, theirs)
            break
    if len(rebuilt["checkpoints"]) != len(recorded_ck):
        differ("number of checkpoints", len(rebuilt["checkpoints"]), len(recorded_ck))
    recorded_gaps = [{k: g.get(k) for k in _GAP_KEYS} for g in results.get("gap_checkpoints", [])]
    for mine, theirs in zip(rebuilt["gap_checkpoints"], recorded_gaps, strict=False):
        if mine != theirs:
            differ(f"gap checkpoint after arrival {mine['arrival']}", mine, theirs)
            break
    if len(rebuilt["gap_checkpoints"]) != len(recorded_gaps):
        differ("number of gap checkpoints", len(rebuilt["gap_checkpoints"]), len(recorded_gaps))
    if rebuilt["fragments"] != results["fragments"]:
        for mine, theirs in zip(rebuilt["fragments"] or [], results["fragments"], strict=False):
            if mine != theirs:
                differ(f"fragment {mine['fragment']} stats", mine, theirs)
                break
    if rebuilt["final"] is None:
        replay.differences.append("the coordinator log has no run.finished event, but results.json exists")
    else:
        for key, value in results["final"].items():
            if rebuilt["final"].get(key) != value:
                differ(f"final.{key}", rebuilt["final"].get(key), value)
                break


def _link_story(grants: dict[str, Any], before: tuple[Any, ...] | None) -> tuple[str, tuple[Any, ...]] | None:
    """A line when the link changes hands: under prefix, the fragment at its head; under any
    schedule, the fragments it passes over for want of an agent (one line per change, not per grant)."""
    schedule = grants.get("schedule")
    absent = sorted(f for f, reason in grants.get("waiting", []) if reason == "no agent")
    streaming = [f for f, _ in grants.get("granted", [])] + [f for f, r in grants.get("waiting", []) if r != "no agent"]
    head = min(streaming) if schedule == "prefix" and streaming else None
    state = (schedule, head, tuple(absent))
    if state == before:
        return None
    serves = f"fragment {head} first" if head is not None else "the agents in turn"
    passed = f"; no agent for {', '.join(map(str, absent))}, passed over" if absent else ""
    return f"link ({schedule}) serves {serves}{passed}", state


def tell(files: dict[str, list[Line]], plan: Plan, replay: Replay) -> None:
    """The run's story, from every process's log merged by monotonic time."""
    merged = sorted((ln for lines in files.values() for ln in lines), key=lambda ln: ln.data.get("mono", 0.0))
    link_state: tuple[Any, ...] | None = None
    for ln in merged:
        d = ln.data
        ev, role, frag = d.get("event"), d.get("role"), d.get("fragment")
        who = f"agent {frag}" if role == "agent" else "coordinator"
        text = None
        if ev == E.CORE_STEP:
            for action in d.get("out", []):
                if action.get("type") == "grants":
                    text, link_state = _link_story(action, link_state) or (text, link_state)
        elif ev == E.PROCESS_START:
            text = f"{who} started (pid {d.get('pid')})"
        elif ev == E.AGENT_WELCOME:
            resumed = d["pieces_wanted"] < d["pieces_total"]
            text = (
                f"{who} connected, {'resuming: ' if resumed else ''}{d['pieces_wanted']}/{d['pieces_total']} "
                f"pieces to send"
            )
        elif ev == E.AGENT_COMMITTED:
            text = (
                f"{who} found its fragment committed already"
                if d.get("already")
                else f"{who} streamed {d['sent_bytes'] / 1e6:.1f} MB in {d['seconds']:.3f}s and was told: committed"
            )
        elif ev == E.AGENT_DEAD:
            text = f"coordinator declared the agent of fragment {d.get('fragment')} dead: {d.get('reason')}"
        elif ev == E.FAULT_KILLED and d.get("target") == "agent":
            text = f"launcher SIGKILLed agent {d.get('fragment')} at {d.get('fraction')} of its bytes"
        elif ev == E.FAULT_KILL_POINT and d.get("target") == "coordinator":
            text = f"launcher SIGKILLs the coordinator (at {d.get('at')}, {d.get('received')} bytes received)"
        elif ev == E.RESTORE:
            text = (
                f"coordinator restored from the sandbox: committed {d.get('committed')}, "
                f"staged pieces {d.get('staged')}"
            )
        elif ev == E.FRAGMENT_PROMOTED:
            text = f"fragment {frag} ({plan.fragments[int(frag or 0)].label}) verified and promoted"
        elif ev == E.PREFIX_ARRIVAL:
            text = (
                f"arrival {d['index']}: fragment {d['fragment']} -> {d['layers']} active layers"
                f"{' (prefix grew)' if d['grew'] else ''}"
            )
        elif ev == E.CHECKPOINT_EVALUATED:
            text = (
                f"checkpoint {d['checkpoint']}: {d['layers']} layers, {d['label']}, "
                f"{d['agree_tokens']} tokens = baseline, generate {d['generate_s']:.3f}s: {d['text']!r}"
            )
        elif ev == E.GAP_EVALUATED:
            text = (
                f"gap checkpoint after arrival {d['arrival']}: {d['num_layers']} layers {d['layers']} "
                f"(missing {', '.join(d['missing'])}), {d['label']}: {d['text']!r}"
            )
        elif ev == E.AUTH_DENIED:
            text = f"CURVE handshake refused: key {str(d.get('key'))[:12]}… is not in the plan"
        elif ev == E.AUTH_HANDSHAKE_FAILED:
            text = f"a peer failed the CURVE handshake ({d.get('kind')})"
        elif ev == E.STORAGE_ERROR:
            text = f"storage error, run stopped: {d.get('error')}"
        elif ev == E.MESSAGE_REJECTED:
            text = f"rejected a message from {d.get('peer')}: {d.get('reason')}"
        elif ev == E.RUN_FINISHED:
            text = (
                f"run finished: complete {d.get('complete')}, final matches baseline {d.get('final_matches_baseline')}"
            )
        if text:
            replay.story.append((d.get("mono", 0.0), text))


def run_replay(run_dir: Path) -> Replay:
    replay = Replay(run_dir)
    files = read_logs(run_dir, replay)
    for name, lines in files.items():
        check_chain(name, lines, replay)
    plan = load_plan(files)
    core = replay_core(plan, files[COORDINATOR_LOG_NAME], replay)
    replay.rebuilt = rebuild(plan, core, files[COORDINATOR_LOG_NAME])
    replay.lines = [ln for lines in files.values() for ln in lines]
    tell(files, plan, replay)
    results_path = run_dir / layout.RESULTS_JSON
    if results_path.exists():
        compare(replay.rebuilt, json.loads(results_path.read_text()), replay)
    else:
        replay.notes.append("no results.json (the run did not finish): replayed the decisions only")
    return replay
