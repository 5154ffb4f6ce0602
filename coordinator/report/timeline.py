"""A run's timeline from its logs: one lane per agent (every attempt) and one for the
coordinator (every process), with the spans and the moments a reader looks for.

Positions are wall-clock seconds from the first logged line ("time", UTC: comparable across
hosts whose clocks are synchronised); durations inside one process come from its "mono"
clock, which is only comparable within a host.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from protocol import log_events as E
from sandbox import layout

COORDINATOR_LANE = "coordinator"

# Span kinds, drawn from the back to the front.
ALIVE = "alive"  # the process runs
STREAMING = "streaming"  # an agent between WELCOME and its commit (or its end)
EVALUATING = "evaluating"  # the coordinator builds and scores a checkpoint
GAP_EVALUATING = "evaluating gaps"

# Mark kinds.
STARTED = "started"
RESUMED = "resumed"  # welcomed with fewer pieces than the fragment has: a resume
COMMITTED = "committed"
KILLED = "killed"  # SIGKILL by the launcher (fault injection)
DEAD = "declared dead"  # the coordinator gave the agent up (heartbeats or its pid)
RESTORED = "restored"  # a coordinator resumed the run from the sandbox
FINISHED = "verdict"


@dataclass(frozen=True)
class Span:
    lane: str
    start: float
    end: float
    kind: str
    note: str = ""


@dataclass(frozen=True)
class Mark:
    lane: str
    t: float
    kind: str
    note: str = ""


@dataclass
class Timeline:
    lanes: list[str] = field(default_factory=list)  # top to bottom
    spans: list[Span] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    duration: float = 0.0

    def marks_of(self, kind: str) -> list[Mark]:
        return [m for m in self.marks if m.kind == kind]


def wall(line: dict[str, Any]) -> float | None:
    stamp = line.get("time")
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def read_log_lines(path: Path) -> list[dict[str, Any]]:
    """Every JSON object line of one log; a torn last line (a SIGKILLed writer) is skipped."""
    out = []
    for raw in path.read_text(errors="replace").splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict):
            out.append(line)
    return out


def lives(lines: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Split one log into process lives: a new one starts at each process.start line."""
    out: list[list[dict[str, Any]]] = []
    for line in lines:
        if line.get("event") == E.PROCESS_START or not out:
            out.append([])
        out[-1].append(line)
    return [life for life in out if any(wall(d) is not None for d in life)]


def agent_lane(fragment: Any) -> str:
    return f"agent {fragment}"


def build_timeline(logs: dict[str, list[dict[str, Any]]]) -> Timeline:
    """`logs` maps a log file's name to its lines (read_log_lines)."""
    stamped = [t for lines in logs.values() for d in lines if (t := wall(d)) is not None]
    if not stamped:
        return Timeline()
    t0 = min(stamped)
    tl = Timeline()
    agent_lanes: dict[int, str] = {}

    def at(d: dict[str, Any]) -> float:
        t = wall(d)
        return (t if t is not None else t0) - t0

    for name, lines in sorted(logs.items()):
        for life in lives(lines):
            role = life[0].get("role")
            if role == "agent":
                fragment = next((d["fragment"] for d in life if "fragment" in d), None)
                lane = agent_lane(fragment)
                if isinstance(fragment, int):
                    agent_lanes[fragment] = lane
                _agent_life(tl, lane, life, at)
            elif name.startswith(COORDINATOR_LANE):
                _coordinator_life(tl, life, at)
    tl.lanes = [COORDINATOR_LANE] + [agent_lanes[f] for f in sorted(agent_lanes)]
    ends = [s.end for s in tl.spans] + [m.t for m in tl.marks]
    tl.duration = max(ends) if ends else 0.0
    return tl


def _agent_life(tl: Timeline, lane: str, life: list[dict[str, Any]], at: Any) -> None:
    pid = life[0].get("pid")
    begin, end = at(life[0]), at(life[-1])
    tl.spans.append(Span(lane, begin, end, ALIVE, f"pid {pid}"))
    tl.marks.append(Mark(lane, begin, STARTED, f"pid {pid}"))
    welcome = next((d for d in life if d.get("event") == E.AGENT_WELCOME), None)
    committed = next((d for d in life if d.get("event") == E.AGENT_COMMITTED), None)
    if welcome is not None:
        stream_end = at(committed) if committed is not None else end
        tl.spans.append(Span(lane, at(welcome), stream_end, STREAMING))
        wanted, total = welcome.get("pieces_wanted"), welcome.get("pieces_total")
        if isinstance(wanted, int) and isinstance(total, int) and wanted < total:
            tl.marks.append(Mark(lane, at(welcome), RESUMED, f"{total - wanted}/{total} pieces already verified"))
    if committed is not None:
        tl.marks.append(Mark(lane, at(committed), COMMITTED))


def _coordinator_life(tl: Timeline, life: list[dict[str, Any]], at: Any) -> None:
    lane = COORDINATOR_LANE
    pid = life[0].get("pid")
    begin, end = at(life[0]), at(life[-1])
    tl.spans.append(Span(lane, begin, end, ALIVE, f"pid {pid}"))
    tl.marks.append(Mark(lane, begin, STARTED, f"pid {pid}"))
    for d in life:
        ev = d.get("event")
        if ev in (E.CHECKPOINT_EVALUATED, E.GAP_EVALUATED):
            finish = at(d)
            took = (d.get("mono") or 0.0) - (d.get("started_mono") or d.get("mono") or 0.0)
            kind = EVALUATING if ev == E.CHECKPOINT_EVALUATED else GAP_EVALUATING
            note = f"checkpoint {d.get('checkpoint')}: {d.get('layers')} layers" if kind == EVALUATING else ""
            tl.spans.append(Span(lane, max(0.0, finish - max(0.0, took)), finish, kind, note))
        elif ev == E.RESTORE:
            tl.marks.append(Mark(lane, at(d), RESTORED, f"committed {d.get('committed')}"))
        elif ev == E.FAULT_KILL_POINT and d.get("target") == "coordinator":
            tl.marks.append(Mark(lane, at(d), KILLED, f"at {d.get('at')} of all bytes"))
        elif ev == E.FAULT_KILLED and d.get("target") == "agent":
            tl.marks.append(Mark(agent_lane(d.get("fragment")), at(d), KILLED, f"at {d.get('fraction')} of its bytes"))
        elif ev == E.AGENT_DEAD:
            tl.marks.append(Mark(agent_lane(d.get("fragment")), at(d), DEAD, str(d.get("reason", ""))))
        elif ev == E.RUN_FINISHED:
            tl.marks.append(Mark(lane, at(d), FINISHED, "bit-exact" if d.get("final_matches_baseline") else ""))


def run_timeline(run_dir: Path) -> Timeline:
    logs = {path.name: read_log_lines(path) for path in sorted((run_dir / layout.LOGS).glob("*.jsonl"))}
    return build_timeline(logs)
