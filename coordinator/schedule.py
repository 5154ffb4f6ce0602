"""Which agent the link serves next, when the coordinator's ingress is limited (sans-IO).

The core grants credit one piece at a time out of a link budget (protocol.pacing); these
rules decide who gets each piece:

- `prefix`: the lowest-index fragment that still wants bytes, so the contiguous prefix (the
  next checkpoint) grows as early as the link allows; a fragment with no live agent or a full
  window is passed over and the capacity goes to the next one.
- `fair`: round-robin over the fragments that want bytes, one piece each in turn.
- `arrival`: credit owed in the order it became due (on WELCOME and on each chunk read),
  which is what an unscheduled coordinator does: each agent is clocked by its own returns.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

ARRIVAL, FAIR, PREFIX = "arrival", "fair", "prefix"
SCHEDULES = (ARRIVAL, FAIR, PREFIX)


@dataclass(frozen=True)
class Candidate:
    """An agent that could take more credit now."""

    fragment: int
    peer: str
    room: int  # pieces it could still be granted: its window and its missing pieces bound it


class Scheduler:
    def __init__(self, schedule: str) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
        self.schedule = schedule
        self._last_fragment = -1  # fair: the fragment served last
        self._owed: deque[str] = deque()  # arrival: one entry per credit owed, oldest first

    def owe(self, peer: str, n: int = 1) -> None:
        """Credit became due to `peer` (only `arrival` keeps the order)."""
        if self.schedule == ARRIVAL:
            self._owed.extend([peer] * n)

    def forget(self, peer: str) -> None:
        if self.schedule == ARRIVAL and peer in self._owed:
            self._owed = deque(p for p in self._owed if p != peer)

    def pick(self, candidates: Sequence[Candidate]) -> Candidate | None:
        """The candidate the next piece of the link goes to (None: nobody can take one)."""
        ready = [c for c in candidates if c.room > 0]
        if not ready:
            return None
        if self.schedule == PREFIX:
            return min(ready, key=lambda c: c.fragment)
        if self.schedule == FAIR:
            after = [c for c in ready if c.fragment > self._last_fragment]
            chosen = min(after or ready, key=lambda c: c.fragment)
            self._last_fragment = chosen.fragment
            return chosen
        by_peer = {c.peer: c for c in ready}
        for i, peer in enumerate(self._owed):
            if peer in by_peer:
                del self._owed[i]
                return by_peer[peer]
        return None
