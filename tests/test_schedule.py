"""The link schedules, rule by rule: the token bucket, the pick of each rule, and the sans-IO
core spending a link budget among agents that it drives on a simulated clock (no I/O in here,
so the clock is the test's)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_core import hello

from agents.source import SourceCheckpoint
from coordinator.core import Core, CoreSettings
from coordinator.events import (
    Action,
    AgentDead,
    AgentExited,
    Arrival,
    Chunk,
    Grants,
    Send,
    Tick,
    Verified,
    Verify,
)
from coordinator.launch.planner import make_plan
from coordinator.schedule import ARRIVAL, FAIR, PREFIX, Candidate, Scheduler
from protocol.errors import PlanError
from protocol.layers import split_layers
from protocol.messages import expand_want
from protocol.pacing import TokenBucket, uplinks
from protocol.plan import Plan

LINK = 2e6  # bytes/s of the simulated coordinator link
STEP = 0.001  # the simulated loop's tick


@pytest.fixture(scope="module")
def plan(tiny_model: Path) -> Plan:
    source = SourceCheckpoint(tiny_model)
    out = make_plan(source, split_layers(6, 3), run_id="sched", model_name="tiny", piece_size=8192)
    source.close()
    return out


# ---- the token bucket ------------------------------------------------------------------------


def test_bucket_starts_empty_and_fills_at_its_rate() -> None:
    bucket = TokenBucket(1000.0, burst_s=1.0)
    bucket.start(10.0)
    assert not bucket.ready(10.0)
    assert bucket.tokens(10.5) == pytest.approx(500.0)


def test_a_bucket_not_started_has_nothing() -> None:
    assert not TokenBucket(1000.0).ready(5.0)


def test_bucket_holds_at_most_its_burst() -> None:
    bucket = TokenBucket(1000.0, burst_s=0.05)
    bucket.start(0.0)
    assert bucket.tokens(100.0) == pytest.approx(50.0)
    bucket.take(100.0, 50.0)
    assert not bucket.ready(100.0)


def test_bucket_overdraft_is_repaid_before_it_is_ready_again() -> None:
    bucket = TokenBucket(1000.0)
    bucket.start(0.0)
    bucket.take(0.0, 250.0)
    assert bucket.wait_s(0.0) == pytest.approx(0.25, abs=1e-5)
    assert not bucket.ready(0.2) and bucket.ready(0.26)


def test_reading_a_bucket_does_not_change_it() -> None:
    bucket = TokenBucket(1000.0)
    bucket.start(0.0)
    bucket.take(0.0, 100.0)
    for t in (0.01, 0.05, 0.2):
        bucket.ready(t), bucket.tokens(t), bucket.wait_s(t)
    assert bucket.paid_at == pytest.approx(0.1)


def test_bytes_given_back_are_spent_again_but_not_beyond_the_burst() -> None:
    bucket = TokenBucket(1000.0, burst_s=0.05)
    bucket.start(0.0)
    bucket.take(0.0, 100.0)
    bucket.give(0.0, 80.0)
    assert bucket.tokens(0.0) == pytest.approx(-20.0)
    bucket.give(0.0, 1000.0)
    assert bucket.tokens(0.0) == pytest.approx(50.0)


def test_bucket_refuses_a_rate_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="bytes per second > 0"):
        TokenBucket(0.0)


# ---- --bandwidth -------------------------------------------------------------------------


def test_one_bandwidth_applies_to_every_agent() -> None:
    assert uplinks("50", 3) == {0: 50e6, 1: 50e6, 2: 50e6}


def test_per_fragment_bandwidth_leaves_the_others_unlimited() -> None:
    assert uplinks("0:50,2:200", 3) == {0: 50e6, 2: 200e6}


@pytest.mark.parametrize("spec", ["fast", "0:50,0:60", "5:50", "0:-1", "0-50", "0:inf"])
def test_bad_bandwidth_is_refused_with_what_was_wrong(spec: str) -> None:
    with pytest.raises(PlanError, match="--bandwidth"):
        uplinks(spec, 3)


# ---- the rules -------------------------------------------------------------------------------


def test_prefix_picks_the_lowest_fragment_with_room() -> None:
    scheduler = Scheduler(PREFIX)
    cands = [Candidate(2, "c", 3), Candidate(0, "a", 0), Candidate(1, "b", 1)]
    assert scheduler.pick(cands) == Candidate(1, "b", 1)


def test_fair_takes_turns_in_fragment_order() -> None:
    scheduler = Scheduler(FAIR)
    cands = [Candidate(0, "a", 9), Candidate(1, "b", 9), Candidate(2, "c", 9)]
    assert [scheduler.pick(cands).fragment for _ in range(5)] == [0, 1, 2, 0, 1]  # type: ignore[union-attr]


def test_arrival_serves_credit_in_the_order_it_fell_due() -> None:
    scheduler = Scheduler(ARRIVAL)
    scheduler.owe("b")
    scheduler.owe("a", 2)
    cands = [Candidate(0, "a", 9), Candidate(1, "b", 9)]
    assert [scheduler.pick(cands).peer for _ in range(3)] == ["b", "a", "a"]  # type: ignore[union-attr]
    assert scheduler.pick(cands) is None  # nothing is owed any more


def test_nobody_with_room_gets_nothing() -> None:
    assert Scheduler(PREFIX).pick([Candidate(0, "a", 0)]) is None


def test_an_unknown_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="expected one of"):
        Scheduler("fastest")


# ---- the core on a simulated clock -----------------------------------------------------------


@dataclass
class SimAgent:
    """An honest agent: sends the wanted pieces in order as credit allows, optionally paced."""

    fragment: int
    peer: str
    start: float
    uplink: float | None = None
    queue: list[tuple[int, int]] = field(default_factory=list)
    credit: int = 0
    bucket: TokenBucket | None = None
    said_hello: bool = False


def run_link(plan: Plan, schedule: str, agents: list[SimAgent], until: float = 30.0) -> tuple[Core, dict, list]:
    """Drive the core with ticks every STEP and the agents' chunks; returns the core, the commit
    time of each fragment and every Grants decision with its time."""
    core = Core(plan, CoreSettings(link_bytes_s=LINK, schedule=schedule))
    committed: dict[int, float] = {}
    grants: list[tuple[float, Grants]] = []
    by_peer = {a.peer: a for a in agents}
    for a in agents:
        a.bucket = TokenBucket(a.uplink) if a.uplink else None

    def apply(t: float, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Grants):
                grants.append((t, action))
            elif isinstance(action, Send) and action.kind == "WELCOME":
                agent = by_peer[action.peer]
                agent.queue = list(expand_want(action.header["want"]))
                agent.credit += action.header["credit"]
            elif isinstance(action, Send) and action.kind == "CREDIT":
                by_peer[action.peer].credit += action.header["n"]
            elif isinstance(action, Verify):
                apply(t, core.handle(Verified(t, action.fragment, [])))
            elif isinstance(action, Arrival):
                committed[action.fragment] = t

    step = 0
    while len(committed) < len(plan.fragments) and step * STEP < until:
        t = step * STEP
        for a in agents:
            if not a.said_hello and t >= a.start:
                a.said_hello = True
                apply(t, core.handle(hello(plan, a.fragment, a.peer, t)))
            while a.said_hello and a.credit > 0 and a.queue:
                if a.bucket is not None:
                    a.bucket.start(t)
                    if not a.bucket.ready(t):
                        break
                item, piece = a.queue.pop(0)
                spec = plan.fragments[a.fragment].items[item]
                _, length = spec.piece_span(piece, plan.piece_size)
                if a.bucket is not None:
                    a.bucket.take(t, length)
                a.credit -= 1
                apply(t, core.handle(Chunk(t, a.peer, item, piece, length, spec.pieces[piece])))
        apply(t, core.handle(Tick(t)))
        step += 1
    return core, committed, grants


def agents_at_once(plan: Plan, **kwargs: float) -> list[SimAgent]:
    return [SimAgent(i, f"peer{i}", 0.0, **kwargs) for i in range(len(plan.fragments))]  # type: ignore[arg-type]


def test_the_link_rate_holds(plan: Plan) -> None:
    _, committed, _ = run_link(plan, FAIR, agents_at_once(plan))
    # Every byte through a LINK bytes/s budget: no faster, and no capacity left idle.
    assert max(committed.values()) == pytest.approx(plan.nbytes / LINK, rel=0.05)


def test_prefix_commits_fragments_in_order_each_after_its_own_bytes(plan: Plan) -> None:
    _, committed, _ = run_link(plan, PREFIX, agents_at_once(plan))
    assert sorted(committed, key=committed.__getitem__) == [0, 1, 2]
    bytes_so_far = 0
    for f in plan.fragments:
        bytes_so_far += f.nbytes
        assert committed[f.index] == pytest.approx(bytes_so_far / LINK, rel=0.05, abs=0.01)


def test_fair_finishes_every_fragment_near_the_end(plan: Plan) -> None:
    _, committed, _ = run_link(plan, FAIR, agents_at_once(plan))
    end = plan.nbytes / LINK
    smallest = min(f.nbytes for f in plan.fragments)
    # Equal shares: nothing commits before the smallest fragment got a third of the link for its whole length.
    assert min(committed.values()) >= 0.9 * len(plan.fragments) * smallest / LINK
    assert max(committed.values()) == pytest.approx(end, rel=0.05)


def test_prefix_first_checkpoint_is_earlier_than_fair_and_the_end_no_later(plan: Plan) -> None:
    _, prefix, _ = run_link(plan, PREFIX, agents_at_once(plan))
    _, fair, _ = run_link(plan, FAIR, agents_at_once(plan))
    assert prefix[0] < fair[0]
    assert max(prefix.values()) <= max(fair.values()) * 1.05


def test_prefix_moves_on_while_the_fragment_it_needs_has_no_agent(plan: Plan) -> None:
    late = plan.fragments[1].nbytes / LINK  # fragment 0 arrives after the others could have used the link
    agents = [SimAgent(0, "peer0", late), SimAgent(1, "peer1", 0.0), SimAgent(2, "peer2", 0.0)]
    _, committed, grants = run_link(plan, PREFIX, agents)
    early = [g for t, g in grants if t < late]
    assert early and all([0, "no agent"] in g.waiting for g in early)
    assert all(f != 0 for g in early for f, _ in g.granted)
    # No capacity idle: the end is what the bytes cost, though fragment 0 came late.
    assert max(committed.values()) == pytest.approx(plan.nbytes / LINK, rel=0.05, abs=0.01)


def test_prefix_gives_a_slow_uplink_all_it_can_take_and_the_rest_to_others(plan: Plan) -> None:
    slow = LINK / 4
    agents = [SimAgent(0, "peer0", 0.0, uplink=slow), SimAgent(1, "peer1", 0.0), SimAgent(2, "peer2", 0.0)]
    _, committed, grants = run_link(plan, PREFIX, agents)
    assert committed[0] == pytest.approx(plan.fragments[0].nbytes / slow, rel=0.1)
    assert any([0, "window full"] in g.waiting for _, g in grants)
    assert committed[1] < committed[0] and committed[2] < committed[0]


def test_a_dead_agent_gives_its_reserved_link_back(plan: Plan) -> None:
    core = Core(plan, CoreSettings(link_bytes_s=LINK, schedule=PREFIX, dead_after_s=1.0))
    core.handle(hello(plan, 0, "peer0"))
    core.handle(Tick(0.01))
    reserved = sum(core.peers["peer0"].reserved)
    assert reserved > 0
    assert core.link is not None
    before = core.link.tokens(0.01)
    [dead] = core.handle(AgentExited(0.01, 1000))  # the pid test_core.hello gives fragment 0
    assert isinstance(dead, AgentDead) and "peer0" not in core.peers
    assert core.link.tokens(0.01) == pytest.approx(min(core.link.capacity, before + reserved))


def test_grants_replay_identically(plan: Plan) -> None:
    first = run_link(plan, PREFIX, agents_at_once(plan))[2]
    second = run_link(plan, PREFIX, agents_at_once(plan))[2]
    assert [(t, g.to_dict()) for t, g in first] == [(t, g.to_dict()) for t, g in second]


def test_without_a_link_the_welcome_grants_the_window_at_once(plan: Plan) -> None:
    core = Core(plan, CoreSettings(credit=3))
    actions = core.handle(hello(plan, 0, "peer0"))
    assert [a.header["credit"] for a in actions if isinstance(a, Send)] == [3]
    assert not any(isinstance(a, Grants) for a in actions)
