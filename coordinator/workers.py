"""Slow work off the receive loop.

The socket loop never blocks on a disk read-back, a model load or an evaluation: those run
in worker threads (hashing, fsync and torch all release the GIL), one job at a time per
worker, in the order they were submitted. A finished job lands in `Completions`, whose
pipe wakes the loop's poller; the loop then logs it and feeds its event to the core, so the
log stays single-threaded and a replay sees the same events in the same order.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Done:
    """A finished job: what it was, its value or the exception it raised, and how long it ran."""

    tag: str
    key: Any
    value: Any = None
    error: BaseException | None = None
    started: float = 0.0  # time.monotonic() when the job began
    seconds: float = 0.0


class Completions:
    """Finished jobs of every worker, and a pipe the loop polls to learn there are some."""

    def __init__(self) -> None:
        self._done: queue.SimpleQueue[Done] = queue.SimpleQueue()
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)

    def fileno(self) -> int:
        return self._read

    def put(self, done: Done) -> None:
        self._done.put(done)
        os.write(self._write, b"!")

    def drain(self) -> list[Done]:
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)


# Niceness of the threads that import torch and evaluate checkpoints. On a 2-core machine
# torch's two intra-op threads would otherwise take both cores from the receive path while the
# next fragment streams; evaluation waits for nobody, so it yields. The threads OpenMP starts
# from a niced thread inherit its niceness.
MODEL_NICENESS = 10


def lower_priority(niceness: int) -> None:
    """Raise the calling thread's nice value (Linux: a thread is its own scheduling entity)."""
    if niceness and hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
        except OSError:  # not permitted here: the thread keeps the process's priority
            pass


class Worker:
    """One thread running jobs in submission order, at `niceness` above the process's."""

    def __init__(self, name: str, completions: Completions, niceness: int = 0) -> None:
        self.name = name
        self.niceness = niceness
        self.completions = completions
        self.pending = 0  # submitted and not yet finished (read and written by the loop's thread only)
        self._jobs: queue.SimpleQueue[tuple[str, Any, Callable[[], Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, tag: str, key: Any, job: Callable[[], Any]) -> None:
        self.pending += 1
        self._jobs.put((tag, key, job))

    def _run(self) -> None:
        lower_priority(self.niceness)
        while True:
            item = self._jobs.get()
            if item is None:
                return
            tag, key, job = item
            started = time.monotonic()
            try:
                done = Done(tag, key, value=job())
            except BaseException as exc:  # handed to the loop, which decides (storage error, crash)
                done = Done(tag, key, error=exc)
            done.started, done.seconds = started, time.monotonic() - started
            self.completions.put(done)

    def stop(self, timeout: float = 60.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)
