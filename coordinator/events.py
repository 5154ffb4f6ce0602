"""Inbound events and outbound actions of the coordinator core.

Both are plain frozen dataclasses that round-trip through JSON, because the coordinator
log records every event the core consumed and every action it decided: a replay feeds
the events back and checks the actions are the same.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar


class _Record:
    type: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **dataclasses.asdict(self)}  # type: ignore[call-overload]


# ---- events (inputs); `t` is the loop's monotonic clock, never read inside the core ----


@dataclass(frozen=True)
class Hello(_Record):
    type: ClassVar[str] = "hello"
    t: float
    peer: str
    header: dict[str, Any]
    key: str | None = None  # the sender's CURVE public key, as authenticated by ZAP


@dataclass(frozen=True)
class Chunk(_Record):
    type: ClassVar[str] = "chunk"
    t: float
    peer: str
    item: int
    piece: int
    length: int
    digest: str


@dataclass(frozen=True)
class Heartbeat(_Record):
    type: ClassVar[str] = "heartbeat"
    t: float
    peer: str


@dataclass(frozen=True)
class Bye(_Record):
    type: ClassVar[str] = "bye"
    t: float
    peer: str


@dataclass(frozen=True)
class Malformed(_Record):
    """A message that failed structural validation in protocol.messages."""

    type: ClassVar[str] = "malformed"
    t: float
    peer: str
    field: str
    value: Any
    expected: str


@dataclass(frozen=True)
class Tick(_Record):
    type: ClassVar[str] = "tick"
    t: float


@dataclass(frozen=True)
class AgentExited(_Record):
    type: ClassVar[str] = "agent_exited"
    t: float
    pid: int


@dataclass(frozen=True)
class Verified(_Record):
    """Result of re-reading a complete fragment from disk and hashing it against the plan."""

    type: ClassVar[str] = "verified"
    t: float
    fragment: int
    bad_items: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Restored(_Record):
    """State found in the sandbox when a coordinator (re)starts: committed fragments and verified pieces."""

    type: ClassVar[str] = "restored"
    t: float
    committed: list[int]
    pieces: dict[str, dict[str, list[list[int]]]]  # fragment -> item -> [[first, stop), ...]


@dataclass(frozen=True)
class EndOfAgents(_Record):
    """The launcher will start no more agents: finish with what is here."""

    type: ClassVar[str] = "end_of_agents"
    t: float
    reason: str = ""


Event = Hello | Chunk | Heartbeat | Bye | Malformed | Tick | AgentExited | Verified | Restored | EndOfAgents
EVENT_TYPES: dict[str, type[Event]] = {
    c.type: c for c in (Hello, Chunk, Heartbeat, Bye, Malformed, Tick, AgentExited, Verified, Restored, EndOfAgents)
}


def event_from_dict(data: dict[str, Any]) -> Event:
    data = dict(data)
    cls = EVENT_TYPES.get(data.pop("type", None))
    if cls is None:
        raise ValueError(f"event type {data!r}: expected one of {sorted(EVENT_TYPES)}")
    return cls(**data)


# ---- actions (outputs) ----


@dataclass(frozen=True)
class Send(_Record):
    type: ClassVar[str] = "send"
    peer: str
    kind: str
    header: dict[str, Any]


@dataclass(frozen=True)
class Write(_Record):
    type: ClassVar[str] = "write"
    fragment: int
    item: int
    piece: int


@dataclass(frozen=True)
class Verify(_Record):
    type: ClassVar[str] = "verify"
    fragment: int


@dataclass(frozen=True)
class Promote(_Record):
    type: ClassVar[str] = "promote"
    fragment: int


@dataclass(frozen=True)
class Arrival(_Record):
    type: ClassVar[str] = "arrival"
    index: int
    fragment: int
    layers: int  # active layers of the longest contiguous prefix after this arrival
    prefix: list[int]  # fragments in that prefix
    grew: bool


@dataclass(frozen=True)
class Reassemble(_Record):
    type: ClassVar[str] = "reassemble"
    checkpoint: int
    layers: int
    fragments: list[int]
    new_fragments: list[int]


@dataclass(frozen=True)
class AgentDead(_Record):
    type: ClassVar[str] = "agent_dead"
    peer: str
    fragment: int | None
    reason: str


@dataclass(frozen=True)
class Forget(_Record):
    type: ClassVar[str] = "forget"
    peer: str


@dataclass(frozen=True)
class Ban(_Record):
    type: ClassVar[str] = "ban"
    peer: str
    reason: str


@dataclass(frozen=True)
class Grants(_Record):
    """A scheduled coordinator spent link budget: pieces of credit per fragment, and why each
    other fragment that still wants bytes got none ('no agent', 'window full', 'link busy')."""

    type: ClassVar[str] = "grants"
    schedule: str
    granted: list[list[int]]  # [[fragment, pieces], ...]
    waiting: list[list[Any]]  # [[fragment, reason], ...]


@dataclass(frozen=True)
class Finish(_Record):
    type: ClassVar[str] = "finish"
    complete: bool
    missing: list[int]


Action = Send | Write | Verify | Promote | Arrival | Reassemble | AgentDead | Forget | Ban | Grants | Finish
