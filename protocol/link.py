"""The launcher link: how a coordinator process and the launcher that started it talk.

Progress goes out as one JSON object per line on the coordinator's stdout (the log file is
the record; this is for the live view); control comes in as plain lines on its stdin.
"""

from __future__ import annotations

import json
from typing import Any

# ---- progress kinds (coordinator -> launcher) ----
READY = "ready"  # the socket is bound: {endpoint, pid}
WARM = "warm"  # torch is imported: the launcher may time its baseline now
HELLO = "hello"  # an agent was welcomed: {fragment, pid, attempt, received, total}
BYTES = "bytes"  # {fragment, received, total}
COMMITTED = "committed"  # {fragment}
ARRIVAL = "arrival"  # a fragment was promoted: the arrival row
CHECKPOINT = "checkpoint"  # a prefix was evaluated: the checkpoint row without tokens
DEAD = "dead"  # {fragment, pid, reason}
QUARANTINED = "quarantined"  # a promoted fragment failed re-verification: {fragment, items, path}
REJECTED = "rejected"  # {peer, reason}
STORAGE_ERROR = "storage_error"  # {error, action}
KILL_POINT = "kill_point"  # fault injection: the launcher must kill {target} now
FINISHED = "finished"  # {complete, final_matches_baseline, final}
# What the launcher's reader makes of its side of the pipe:
OUTPUT = "output"  # a line that was not JSON
IDLE = "idle"  # nothing arrived within the wait

# ---- control kinds (launcher -> coordinator) ----
KILLED = "killed"  # the target of the last kill point is dead
END = "end"  # no agent is left to start: finish with what is here
SPAWNED = "spawned"  # "spawned: FRAGMENT PID": an agent this launcher started on the coordinator's host


def progress_line(kind: str, **fields: Any) -> str:
    return json.dumps({"progress": kind, **fields}, default=str) + "\n"


def parse_progress(line: str) -> dict[str, Any]:
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        return {"progress": OUTPUT, "line": line.rstrip()}
    if not isinstance(data, dict) or "progress" not in data:
        return {"progress": OUTPUT, "line": line.rstrip()}
    return data


def control_line(kind: str, reason: str = "") -> str:
    return f"{kind}: {reason}\n" if reason else f"{kind}\n"


def control_kind(line: str) -> str:
    """The kind of one control line ('end: every agent has exited' -> 'end')."""
    return line.split(":", 1)[0].strip()
