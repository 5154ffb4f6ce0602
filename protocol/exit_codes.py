"""Every exit status fragsim's processes return: the launcher reads them, the README lists them."""

from __future__ import annotations

import os
import sys
from enum import IntEnum
from typing import NoReturn


class RunExit(IntEnum):
    """`fragsim simulate`, `resume` and the coordinator process."""

    OK = 0  # complete, and the final checkpoint matched the baseline exactly
    MISMATCH = 1  # complete, but the final checkpoint did not match
    USAGE = 2  # bad options or input, refused before anything was created
    INCOMPLETE = 3  # agents ended without delivering every fragment
    FAILED = 4  # the coordinator ended without results
    COORDINATOR_KILLED = 5  # --kill-coordinator without --resume: continue with `fragsim resume`
    STORAGE = 6  # disk full, quota or permissions stopped the run
    CRASH = 7  # fragsim itself failed (a bug): the traceback is in the logs


class AgentExit(IntEnum):
    """One agent process. Every status but COMMITTED is permanent or retriable, and launchers
    (Kubernetes podFailurePolicy, Slurm scripts, Ray, simulate's driver) decide by that alone:
    see PERMANENT_AGENT_EXITS and RETRIABLE_AGENT_EXITS."""

    COMMITTED = 0
    BAD_SETUP = 2  # bad options or launcher variable, missing plan or keys, a source that differs from the plan
    NO_WELCOME = 3  # the coordinator never answered HELLO
    REJECTED = 4  # the coordinator refused this agent for good
    COORDINATOR_LOST = 5  # the coordinator went silent mid-transfer
    TERMINATED = 143  # 128 + SIGTERM: asked to stop, stopped after draining (a shell reports a SIGTERM death so)


# The same agent started again fails the same way: fix the bundle, source or plan first.
PERMANENT_AGENT_EXITS = frozenset({AgentExit.BAD_SETUP, AgentExit.REJECTED})
# A new attempt for the same fragment is sent only the pieces the coordinator still lacks.
RETRIABLE_AGENT_EXITS = frozenset({AgentExit.NO_WELCOME, AgentExit.COORDINATOR_LOST, AgentExit.TERMINATED})


def is_permanent_agent_exit(code: int) -> bool:
    """True for a status no retry can fix. Any other failure (retriable, or a status that is no
    AgentExit: a crash, a signal) is worth another attempt, up to the launcher's own limit."""
    return code in PERMANENT_AGENT_EXITS


def exit_process(code: int) -> NoReturn:
    """End a process whose work is done: its logs are line-buffered and its records closed
    files, so only stdio is left to flush. Skipping the interpreter's teardown saves the
    ~1.4 s that unloading torch's runtime takes after a run."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to say on it
            pass
    os._exit(code)
