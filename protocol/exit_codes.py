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
    """One agent process."""

    COMMITTED = 0
    BAD_SETUP = 2  # bad options, missing plan or keys, a source that differs from the plan
    NO_WELCOME = 3  # the coordinator never answered HELLO
    REJECTED = 4  # the coordinator refused this agent for good
    COORDINATOR_LOST = 5  # the coordinator went silent mid-transfer


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
