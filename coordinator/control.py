"""The coordinator's end of the launcher link (protocol.link): progress out on stdout,
control lines in on stdin, and the kill points of launcher-driven fault injection."""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from collections import deque
from typing import Any, TextIO

from protocol import link
from protocol import log_events as E

KILL_WAIT_S = 30.0  # how long a kill point waits for the launcher before it goes on


class Progress:
    """JSON lines for the launcher's live view (the log file is the record)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.lock = threading.Lock()  # the torch-import thread reports too

    def __call__(self, kind: str, **fields: Any) -> None:
        line = link.progress_line(kind, **fields)
        with self.lock:
            self.stream.write(line)
            self.stream.flush()


class ControlChannel:
    """Control lines from the launcher. Lines are queued, so a kill point that waits for
    'killed' leaves any other line (an 'end' sent in the same write) for the loop."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.closed = False
        self._buf = b""
        self._lines: deque[str] = deque()

    def fileno(self) -> int:
        return self.fd

    def pump(self, timeout: float) -> None:
        """Read what is there (waiting up to `timeout`); EOF marks the channel closed."""
        if self.closed:
            return
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return
        data = os.read(self.fd, 4096)
        if not data:
            self.closed = True
            return
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        self._lines.extend(line.decode(errors="replace").strip() for line in lines if line.strip())

    def take(self, kind: str) -> str | None:
        """Remove and return the first queued line of `kind`."""
        for line in self._lines:
            if link.control_kind(line) == kind:
                self._lines.remove(line)
                return line
        return None

    def take_all(self, kind: str) -> list[str]:
        taken = [line for line in self._lines if link.control_kind(line) == kind]
        for line in taken:
            self._lines.remove(line)
        return taken

    def wait_for(self, kind: str, timeout: float) -> bool:
        """True once a line of `kind` arrived or the launcher closed the channel."""
        deadline = time.monotonic() + timeout
        while True:
            if self.take(kind) is not None or self.closed:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.pump(left)


class KillPoints:
    """The one hook through which fault injection reaches the server loop.

    At each planned point the loop stops, announces it and waits until the launcher has
    SIGKILLed the target from outside, so a kill lands exactly where asked (a tiny
    fragment would otherwise finish before any signal arrived)."""

    def __init__(self, faults: dict[str, Any], control: ControlChannel | None, log: Any, progress: Progress) -> None:
        self.agent_kills = sorted((int(f), float(x)) for f, x in faults.get("kills", []))
        self.coordinator_kill = faults.get("kill_coordinator")
        self.control, self.log, self.progress = control, log, progress

    def agent_progress(self, fragment: int, received: int, total: int, pid: int | None) -> None:
        """After a WELCOME and after every written piece of `fragment`."""
        fraction = received / max(1, total)
        for point in [p for p in self.agent_kills if p[0] == fragment and fraction >= p[1]]:
            self.agent_kills.remove(point)
            self._barrier(target="agent", fragment=fragment, fraction=point[1], pid=pid, received=received)

    def run_progress(self, received: int, total: int) -> None:
        at = self.coordinator_kill
        if isinstance(at, (int, float)) and received >= at * total:
            self.coordinator_kill = None
            self._barrier(target="coordinator", at=at, stage="bytes", pid=os.getpid(), received=received)

    def before_evaluation(self, received: int) -> None:
        if self.coordinator_kill == "reassembly":
            self.coordinator_kill = None
            self._barrier(target="coordinator", at="reassembly", stage="reassembly", pid=os.getpid(), received=received)

    def _barrier(self, **point: Any) -> None:
        if self.control is None:
            return
        self.log.warning(E.FAULT_KILL_POINT, **point)
        self.progress(link.KILL_POINT, **point)
        if self.control.wait_for(link.KILLED, KILL_WAIT_S):
            self.log.warning(E.FAULT_KILLED, **point)
