"""The coordinator's rules, sans-IO: `Core.handle(event) -> [action, ...]`.

No sockets, clocks or files in here. The server loop feeds events (with its own clock
in `t`) and carries out the actions; a replay feeds logged events to a fresh Core and
must get the same actions back. Anything a peer says is checked against the plan here,
because only the plan is trusted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from coordinator.events import (
    Action,
    AgentDead,
    AgentExited,
    Arrival,
    Ban,
    Bye,
    Chunk,
    EndOfAgents,
    Event,
    Finish,
    Forget,
    Grants,
    Heartbeat,
    Hello,
    Malformed,
    Promote,
    Reassemble,
    Restored,
    Send,
    Tick,
    Verified,
    Verify,
    Write,
)
from coordinator.schedule import ARRIVAL, Candidate, Scheduler
from protocol.messages import want_ranges
from protocol.pacing import TokenBucket
from protocol.plan import Plan
from protocol.run_settings import DEFAULT_DEAD_AFTER_S, DEFAULT_HEARTBEAT_MS
from protocol.version import PROTOCOL_VERSION

WAITING, LIVE, VERIFYING, COMMITTED = "waiting", "live", "verifying", "committed"


@dataclass(frozen=True)
class CoreSettings:
    credit: int = 4  # pieces in flight per agent (ZeroMQ Guide ch. 7 credit-based flow control)
    heartbeat_ms: int = DEFAULT_HEARTBEAT_MS
    dead_after_s: float = DEFAULT_DEAD_AFTER_S  # several missed heartbeats (Paranoid Pirate)
    max_strikes: int = 16  # rejected messages before a peer is banned
    # The coordinator's total ingress in bytes/s (None: unlimited, every agent clocked by its own
    # returns). With a limit, credit comes out of a link budget, one piece at a time, to whom the
    # schedule (coordinator.schedule) says.
    link_bytes_s: float | None = None
    schedule: str = ARRIVAL
    # Pieces in flight per agent under a link: the coordinator's read of a piece takes a few ms,
    # and the fragment a schedule favours must not look "window full" (passing the link to
    # another) only for that. What is in flight stays bounded by the link budget as well.
    link_window: int = 8

    @property
    def scheduled(self) -> bool:
        return self.link_bytes_s is not None


@dataclass
class FragmentState:
    status: str = WAITING
    peer: str | None = None
    have: list[bytearray] = field(default_factory=list)
    missing: int = 0
    received_bytes: int = 0  # verified bytes held (kept across agent deaths)
    duplicate_bytes: int = 0
    resent_bytes: int = 0  # bytes that arrived again after an earlier attempt (wasted by a fault)
    rejected_chunks: int = 0
    attempts: int = 0
    first_chunk_t: float | None = None
    last_chunk_t: float | None = None
    deaths: int = 0
    lost_s: float = 0.0  # time between an agent's death and the next HELLO for the fragment
    dead_t: float | None = None


@dataclass
class PeerState:
    last_seen: float
    fragment: int | None = None
    pid: int | None = None
    credit: int = 0
    reserved: list[int] = field(default_factory=list)  # scheduled: link bytes held for each credit, oldest first
    strikes: int = 0
    banned: bool = False


class Core:
    def __init__(self, plan: Plan, settings: CoreSettings | None = None) -> None:
        self.plan = plan
        self.settings = settings or CoreSettings()
        self.fragments = [self._fresh(i) for i in range(len(plan.fragments))]
        self.peers: dict[str, PeerState] = {}
        self.arrivals: list[Arrival] = []
        self.prefix: list[int] = []
        self.checkpoints = 0
        self.finished = False
        self.sent_before: list[list[bytearray]] = [
            [bytearray(len(it.pieces)) for it in f.items] for f in plan.fragments
        ]
        self.scheduler = Scheduler(self.settings.schedule)
        self.link = TokenBucket(self.settings.link_bytes_s) if self.settings.link_bytes_s is not None else None

    def _fresh(self, index: int) -> FragmentState:
        items = self.plan.fragments[index].items
        return FragmentState(
            have=[bytearray(len(it.pieces)) for it in items], missing=sum(len(it.pieces) for it in items)
        )

    # ---- public read-only views -------------------------------------------------------

    @property
    def prefix_layers(self) -> int:
        return self.plan.fragments[self.prefix[-1]].last_layer + 1 if self.prefix else 0

    def missing_fragments(self) -> list[int]:
        return [i for i, f in enumerate(self.fragments) if f.status != COMMITTED]

    # ---- dispatch -----------------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        if self.finished:
            # Nothing is decided after the verdict, but a peer that leaves while the final
            # checkpoint is evaluated must still be forgotten: it is no longer heartbeaten or polled.
            if isinstance(event, Bye):
                self.peers.pop(event.peer, None)
            elif isinstance(event, AgentExited):
                for name in [n for n, p in self.peers.items() if p.pid == event.pid]:
                    del self.peers[name]
            return []
        handler: Callable[[Event], list[Action]] = getattr(self, "_on_" + event.type)
        return handler(event)

    def _on_hello(self, ev: Hello) -> list[Action]:
        peer = self._peer(ev.peer, ev.t)
        if peer.banned:
            return []
        h = ev.header
        if peer.fragment is not None:
            return self._reject(
                ev.peer,
                "HELLO",
                h.get("fragment"),
                f"one HELLO per connection (already fragment {peer.fragment})",
                fatal=False,
            )
        if h["v"] != PROTOCOL_VERSION:
            return self._reject(ev.peer, "HELLO.v", h["v"], f"protocol version {PROTOCOL_VERSION}")
        if h["run"] != self.plan.run_id:
            return self._reject(ev.peer, "HELLO.run", h["run"], f"run {self.plan.run_id}")
        if h["plan"] != self.plan.digest:
            return self._reject(ev.peer, "HELLO.plan", h["plan"], f"plan digest {self.plan.digest}")
        index = h["fragment"]
        if not 0 <= index < len(self.fragments):
            return self._reject(ev.peer, "HELLO.fragment", index, f"0..{len(self.fragments) - 1}")
        spec = self.plan.fragments[index]
        curve = self.plan.extra.get("curve")
        if curve is not None:  # a key speaks for exactly one fragment: the one the plan gave it
            owner = next((int(f) for f, key in curve["agents"].items() if key == ev.key), None)
            if owner != index:
                return self._reject(
                    ev.peer,
                    "HELLO.key",
                    "an unknown key" if owner is None else f"the key of fragment {owner}",
                    f"the key of fragment {index} from the plan",
                )
        if (h["first_layer"], h["last_layer"]) != (spec.first_layer, spec.last_layer):
            return self._reject(
                ev.peer,
                "HELLO.layers",
                f"{h['first_layer']}-{h['last_layer']}",
                f"{spec.label} for fragment {index} in the plan",
            )
        state = self.fragments[index]
        if state.status == COMMITTED:
            # A restarted agent (a pod rescheduled, a job re-run) finds its work done: that is
            # success, not a refusal a launcher would read as a permanent failure.
            return [Send(ev.peer, "COMMITTED", {"fragment": index})]
        if state.status in (LIVE, VERIFYING) and state.peer is not None:
            # Retryable: a respawned agent can arrive before its dead predecessor is noticed.
            return self._reject(
                ev.peer,
                "HELLO.fragment",
                index,
                f"a fragment without a live agent (peer {state.peer} holds it)",
                retry=True,
            )
        peer.fragment, peer.pid = index, h["pid"]
        state.peer = ev.peer
        state.attempts += 1
        if state.dead_t is not None:
            state.lost_s += ev.t - state.dead_t
            state.dead_t = None
        want = self._want(index)
        actions: list[Action] = []
        if state.status == VERIFYING:
            peer.credit = 0
        else:
            state.status = LIVE
            window = min(self._window, max(state.missing, 1))
            # Scheduled: the WELCOME grants nothing; the link budget does, below.
            peer.credit = 0 if self.settings.scheduled else window
            if self.link is not None:
                self.link.start(ev.t)  # the link opens with the first agent (a logged event)
                self.scheduler.owe(ev.peer, window)
        actions.append(
            Send(
                ev.peer,
                "WELCOME",
                {
                    "v": PROTOCOL_VERSION,
                    "fragment": index,
                    "want": want,
                    "credit": peer.credit,
                    "heartbeat_ms": self.settings.heartbeat_ms,
                },
            )
        )
        if state.status == LIVE and state.missing == 0:
            state.status = VERIFYING
            actions.append(Verify(index))
        return actions + self._grant(ev.t)

    def _on_chunk(self, ev: Chunk) -> list[Action]:
        peer = self._peer(ev.peer, ev.t)
        if peer.banned:
            return []
        if peer.fragment is None:
            return self._reject(ev.peer, "CHUNK", "no HELLO", "HELLO before any CHUNK")
        index = peer.fragment
        state = self.fragments[index]
        if state.peer != ev.peer:
            return self._reject(ev.peer, "CHUNK", f"fragment {index}", "a fragment this connection holds", fatal=True)
        if peer.credit <= 0:
            return self._reject(ev.peer, "CHUNK", "over credit", "at most the granted credit in flight", fatal=False)
        peer.credit -= 1
        if self.link is not None and peer.reserved:  # pay what the piece really was
            self.link.give(ev.t, peer.reserved.pop(0) - ev.length)
        actions: list[Action] = []
        problem = self._check_chunk(index, ev)
        if problem is not None:
            state.rejected_chunks += 1
            actions += self._reject(ev.peer, *problem, fatal=False)
            if problem[0] == "CHUNK.digest":  # the bytes were damaged: ask for that piece again
                actions.append(Send(ev.peer, "WANT", {"want": [[ev.item, [[ev.piece, ev.piece + 1]]]]}))
        elif state.have[ev.item][ev.piece]:
            state.duplicate_bytes += ev.length
        else:
            state.have[ev.item][ev.piece] = 1
            state.missing -= 1
            state.received_bytes += ev.length
            if self.sent_before[index][ev.item][ev.piece]:
                state.resent_bytes += ev.length
            self.sent_before[index][ev.item][ev.piece] = 1
            if state.first_chunk_t is None:
                state.first_chunk_t = ev.t
            state.last_chunk_t = ev.t
            actions.append(Write(index, ev.item, ev.piece))
        if state.status == LIVE and state.missing == 0:
            state.status = VERIFYING
            actions.append(Verify(index))
        elif state.status == LIVE and not self.settings.scheduled:
            peer.credit += 1
            actions.append(Send(ev.peer, "CREDIT", {"n": 1}))
        elif state.status == LIVE:
            self.scheduler.owe(ev.peer)
        if peer.banned:
            self._release(ev.peer, peer, ev.t)
            return [a for a in actions if not isinstance(a, Send)] + [Ban(ev.peer, "too many rejected messages")]
        return actions + self._grant(ev.t)

    def _check_chunk(self, index: int, ev: Chunk) -> tuple[str, Any, str] | None:
        items = self.plan.fragments[index].items
        if not 0 <= ev.item < len(items):
            return ("CHUNK.item", ev.item, f"an item index 0..{len(items) - 1} of fragment {index}")
        item = items[ev.item]
        if not 0 <= ev.piece < len(item.pieces):
            return ("CHUNK.piece", ev.piece, f"a piece index 0..{len(item.pieces) - 1} of {item.name}")
        _, length = item.piece_span(ev.piece, self.plan.piece_size)
        if ev.length != length:
            return ("CHUNK.payload", ev.length, f"{length} bytes for piece {ev.piece} of {item.name}")
        if ev.digest != item.pieces[ev.piece]:
            return ("CHUNK.digest", ev.digest, f"{item.pieces[ev.piece]} (piece {ev.piece} of {item.name})")
        return None

    def _on_heartbeat(self, ev: Heartbeat) -> list[Action]:
        self._peer(ev.peer, ev.t)
        return []

    def _on_bye(self, ev: Bye) -> list[Action]:
        peer = self.peers.pop(ev.peer, None)
        if peer is None or peer.fragment is None:
            return []
        self._release(ev.peer, peer, ev.t)
        state = self.fragments[peer.fragment]
        if state.peer == ev.peer:
            state.peer = None
            if state.status == LIVE:  # left before finishing: another agent may take over
                state.status = WAITING
                state.dead_t = ev.t
        return []

    def _on_malformed(self, ev: Malformed) -> list[Action]:
        peer = self._peer(ev.peer, ev.t)
        if peer.banned:
            return []
        actions = self._reject(ev.peer, ev.field, ev.value, ev.expected, fatal=False)
        if peer.banned:
            return [Ban(ev.peer, "too many rejected messages")]
        return actions

    def _on_tick(self, ev: Tick) -> list[Action]:
        actions: list[Action] = []
        for name in sorted(self.peers):
            peer = self.peers[name]
            if ev.t - peer.last_seen <= self.settings.dead_after_s:
                continue
            if peer.fragment is None:
                del self.peers[name]
                actions.append(Forget(name))
            else:
                actions += self._bury(
                    name,
                    ev.t,
                    f"silent for {ev.t - peer.last_seen:.1f}s (> {self.settings.dead_after_s}s of missed heartbeats)",
                )
        return actions + self._grant(ev.t)

    def _on_agent_exited(self, ev: AgentExited) -> list[Action]:
        for name in sorted(self.peers):
            if self.peers[name].pid == ev.pid and self.peers[name].fragment is not None:
                return self._bury(name, ev.t, f"process {ev.pid} exited")
        return []

    def _bury(self, name: str, t: float, reason: str) -> list[Action]:
        peer = self.peers.pop(name)
        self._release(name, peer, t)
        index = peer.fragment
        if index is not None:
            state = self.fragments[index]
            if state.peer == name:
                state.peer = None
                state.deaths += 1
                if state.status == LIVE:  # verified bytes stay; the next agent resumes from them
                    state.status = WAITING
                    state.dead_t = t
        return [AgentDead(name, index, reason)]

    def _on_verified(self, ev: Verified) -> list[Action]:
        state = self.fragments[ev.fragment]
        if state.status != VERIFYING:
            return []
        if ev.bad_items:
            for item in ev.bad_items:
                pieces = state.have[item]
                lost = self.plan.fragments[ev.fragment].items[item].nbytes
                state.missing += sum(pieces)
                state.received_bytes -= lost
                pieces[:] = bytearray(len(pieces))
            state.status = LIVE if state.peer else WAITING
            if not state.peer:
                return []
            want = Send(state.peer, "WANT", {"want": self._want(ev.fragment)})
            if self.settings.scheduled:
                self.scheduler.owe(state.peer, self._window)
                return [want, *self._grant(ev.t)]
            self.peers[state.peer].credit += self.settings.credit
            return [want, Send(state.peer, "CREDIT", {"n": self.settings.credit})]
        state.status = COMMITTED
        actions: list[Action] = [Promote(ev.fragment)]
        if state.peer:
            actions.append(Send(state.peer, "COMMITTED", {"fragment": ev.fragment}))
        return actions + self._arrive(ev.fragment)

    def _arrive(self, index: int) -> list[Action]:
        before = list(self.prefix)
        prefix: list[int] = []
        for i, state in enumerate(self.fragments):
            if state.status != COMMITTED:
                break
            prefix.append(i)
        self.prefix = prefix
        grew = len(prefix) > len(before)
        arrival = Arrival(len(self.arrivals) + 1, index, self.prefix_layers, list(prefix), grew)
        self.arrivals.append(arrival)
        actions: list[Action] = [arrival]
        if grew:
            self.checkpoints += 1
            actions.append(Reassemble(self.checkpoints, self.prefix_layers, list(prefix), prefix[len(before) :]))
        if not self.missing_fragments():
            self.finished = True
            actions.append(Finish(True, []))
        return actions

    def _on_restored(self, ev: Restored) -> list[Action]:
        actions: list[Action] = []
        for key, items in ev.pieces.items():
            index = int(key)
            state = self.fragments[index]
            for item_key, runs in items.items():
                item = int(item_key)
                spec = self.plan.fragments[index].items[item]
                for first, stop in runs:
                    for piece in range(first, stop):
                        if not state.have[item][piece]:
                            state.have[item][piece] = 1
                            self.sent_before[index][item][piece] = 1
                            state.missing -= 1
                            state.received_bytes += spec.piece_span(piece, self.plan.piece_size)[1]
        for index in sorted(ev.committed):
            state = self.fragments[index]
            state.status = COMMITTED
            state.received_bytes = self.plan.fragments[index].nbytes
            state.missing = 0
            for item_index, have in enumerate(state.have):
                have[:] = b"\x01" * len(have)
                self.sent_before[index][item_index][:] = b"\x01" * len(have)
        # The prefix is rebuilt (and re-evaluated) from what survived, as one arrival per committed fragment.
        for index in sorted(ev.committed):
            actions += self._arrive(index)
        for index, state in enumerate(self.fragments):
            if state.status == WAITING and state.missing == 0:  # killed between last piece and commit
                state.status = VERIFYING
                actions.append(Verify(index))
        return actions

    def _on_end_of_agents(self, ev: EndOfAgents) -> list[Action]:
        self.finished = True
        return [Finish(not self.missing_fragments(), self.missing_fragments())]

    # ---- the link schedule (only with settings.link_bytes_s) ---------------------------

    @property
    def _window(self) -> int:
        return self.settings.link_window if self.settings.scheduled else self.settings.credit

    def _grant(self, t: float) -> list[Action]:
        """Spend the link budget that has accrued by `t`, one piece at a time, as the schedule
        says; log who got it and why every other fragment that wants bytes got nothing."""
        if self.link is None:
            return []
        granted: dict[int, int] = {}  # fragment -> pieces
        candidates = {c.peer: c for c in self._candidates()}
        while self.link.ready(t):
            chosen = self.scheduler.pick(list(candidates.values()))
            if chosen is None:
                break
            peer = self.peers[chosen.peer]
            size = self._piece_bytes(chosen.fragment, peer.credit)
            peer.credit += 1
            peer.reserved.append(size)
            self.link.take(t, size)
            granted[chosen.fragment] = granted.get(chosen.fragment, 0) + 1
            candidates[chosen.peer] = Candidate(chosen.fragment, chosen.peer, chosen.room - 1)
        if not granted:
            return []
        sends: list[Action] = []
        for index, n in sorted(granted.items()):
            peer_name = self.fragments[index].peer
            assert peer_name is not None  # a candidate is a live agent's fragment
            sends.append(Send(peer_name, "CREDIT", {"n": n}))
        waiting: list[list[Any]] = []
        for index, state in enumerate(self.fragments):
            if index in granted or state.status == COMMITTED or state.missing == 0:
                continue
            if state.peer is None or state.status != LIVE:
                waiting.append([index, "no agent"])
            elif state.peer not in candidates or candidates[state.peer].room <= 0:
                waiting.append([index, "window full"])
            else:
                waiting.append([index, "link busy"])
        return [Grants(self.settings.schedule, [[i, n] for i, n in sorted(granted.items())], waiting), *sends]

    def _candidates(self) -> list[Candidate]:
        out = []
        for index, state in enumerate(self.fragments):
            if state.status != LIVE or state.peer is None:
                continue
            peer = self.peers[state.peer]
            if peer.banned:  # nothing it sends is read any more
                continue
            room = min(self._window, state.missing) - peer.credit
            out.append(Candidate(index, state.peer, room))
        return out

    def _piece_bytes(self, index: int, skip: int) -> int:
        """The size of the piece an agent sends next after `skip` granted ones: agents send the
        pieces they were asked for in plan order."""
        items = self.plan.fragments[index].items
        for item, have in zip(items, self.fragments[index].have, strict=True):
            for piece, got in enumerate(have):
                if not got:
                    if skip == 0:
                        return item.piece_span(piece, self.plan.piece_size)[1]
                    skip -= 1
        return self.plan.piece_size

    def _release(self, name: str, peer: PeerState, t: float) -> None:
        """A peer that leaves gives back the link bytes its unused credit held."""
        if self.link is not None:
            self.link.give(t, sum(peer.reserved))
        peer.reserved.clear()
        self.scheduler.forget(name)

    # ---- helpers ------------------------------------------------------------------------

    def _peer(self, name: str, t: float) -> PeerState:
        peer = self.peers.get(name)
        if peer is None:
            peer = self.peers[name] = PeerState(last_seen=t)
        peer.last_seen = t
        return peer

    def _want(self, index: int) -> list[list[Any]]:
        state = self.fragments[index]
        want = []
        for item, have in enumerate(state.have):
            missing = [p for p, got in enumerate(have) if not got]
            if missing:
                want.append([item, want_ranges(missing)])
        return want

    def _reject(
        self, peer_name: str, fld: str, value: Any, expected: str, *, fatal: bool = True, retry: bool = False
    ) -> list[Action]:
        peer = self.peers[peer_name]
        if not retry:  # waiting politely for a fragment is not misbehaviour
            peer.strikes += 1
        if peer.strikes >= self.settings.max_strikes:
            peer.banned = True
        return [
            Send(
                peer_name,
                "REJECT",
                {
                    "reason": f"{fld}: got {value!r}, expected {expected}",
                    "field": fld,
                    "value": value if isinstance(value, (int, str, type(None))) else repr(value),
                    "expected": expected,
                    "fatal": fatal,
                    "retry": retry,
                },
            )
        ]

    def fragment_stats(self) -> list[dict[str, Any]]:
        out = []
        for index, (spec, s) in enumerate(zip(self.plan.fragments, self.fragments, strict=True)):
            seconds = (
                (s.last_chunk_t - s.first_chunk_t)
                if s.first_chunk_t is not None and s.last_chunk_t is not None
                else None
            )
            out.append(
                {
                    "fragment": index,
                    "layers": spec.label,
                    "status": s.status,
                    "bytes": spec.nbytes,
                    "received_bytes": s.received_bytes,
                    "resent_bytes": s.resent_bytes,
                    "duplicate_bytes": s.duplicate_bytes,
                    "rejected_chunks": s.rejected_chunks,
                    "attempts": s.attempts,
                    "deaths": s.deaths,
                    "lost_s": round(s.lost_s, 6),
                    "transfer_s": round(seconds, 6) if seconds is not None else None,
                    "mb_per_s": round(spec.nbytes / seconds / 1e6, 1) if seconds else None,
                }
            )
        return out
