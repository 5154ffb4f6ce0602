"""What a cluster launcher tells an agent: which fragment it is, and when to stop.

A Kubernetes indexed Job sets JOB_COMPLETION_INDEX in each pod, `srun` sets SLURM_PROCID in
each task, torchrun-style launchers set RANK: one `fragsim agent` command line then serves
every fragment, each process finding its own. Both Kubernetes and Slurm ask a process to
stop with SIGTERM and kill it a grace period later; the agent drains and exits on the first.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
from collections.abc import Iterator, Mapping

from protocol.errors import PlanError

# Looked up in this order when --fragment is not given; the first one set wins.
LAUNCHER_VARIABLES = ("JOB_COMPLETION_INDEX", "SLURM_PROCID", "RANK")
EXPLICIT = "--fragment"
# `{fragment}` or `{fragment:SPEC}` (a format spec for an integer, e.g. 02d as fragsim plan names bundles)
PLACEHOLDER = re.compile(r"\{fragment(?::([^{}]*))?\}")
_INDEX = re.compile(r"[0-9]+")


def fragment_from_env(explicit: int | None, environ: Mapping[str, str]) -> tuple[int | None, str | None]:
    """The fragment this agent serves and where it came from: `--fragment` if given, else the
    first of LAUNCHER_VARIABLES that is set (an empty value counts as unset), else (None, None)
    and the bundle decides. A value that is no non-negative integer raises PlanError naming it."""
    if explicit is not None:
        if explicit < 0:
            raise PlanError(EXPLICIT, explicit, "a fragment index, 0 or more")
        return explicit, EXPLICIT
    for name in LAUNCHER_VARIABLES:
        raw = environ.get(name, "").strip()
        if not raw:
            continue
        if not _INDEX.fullmatch(raw):
            raise PlanError(name, raw, "a fragment index, 0 or more (the launcher's task index)")
        return int(raw), name
    return None, None


def bundle_path_for(path: str, fragment: int | None) -> str:
    """`--bundle` with each `{fragment}` / `{fragment:02d}` replaced by the fragment index."""
    if not PLACEHOLDER.search(path):
        return path
    if fragment is None:
        sources = ", ".join((EXPLICIT, *LAUNCHER_VARIABLES))
        raise PlanError("--bundle", path, f"a path without {{fragment}}, or a fragment from one of {sources}")

    def fill(match: re.Match[str]) -> str:
        try:
            return format(fragment, match[1] or "")
        except ValueError:
            expected = "{fragment}, or {fragment:SPEC} with an integer format such as 02d"
            raise PlanError("--bundle", match[0], expected) from None

    return PLACEHOLDER.sub(fill, path)


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[threading.Event]:
    """An event SIGTERM sets, for the agent to drain and exit on. Signal handlers belong to the
    main thread: called from any other (a Ray actor's), the event is only the caller's to set."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)
