"""The sans-IO coordinator core, rule by rule: no processes needed because it has no I/O."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from agents.source import SourceCheckpoint
from conftest import expected_prefix
from coordinator.core import COMMITTED, LIVE, WAITING, Core, CoreSettings
from coordinator.events import (
    AgentDead,
    AgentExited,
    Arrival,
    Bye,
    Chunk,
    EndOfAgents,
    Finish,
    Hello,
    Malformed,
    Reassemble,
    Send,
    Tick,
    Verified,
    Verify,
    Write,
)
from coordinator.launch.planner import make_plan
from protocol.layers import split_layers
from protocol.plan import Plan
from protocol.version import PROTOCOL_VERSION


@pytest.fixture(scope="module")
def plans(tiny_model: Path) -> dict[int, Plan]:
    source = SourceCheckpoint(tiny_model)
    out = {n: make_plan(source, split_layers(6, n), run_id="core", model_name="tiny", piece_size=4096) for n in (3, 4)}
    source.close()
    return out


def hello(plan: Plan, index: int, peer: str, t: float = 0.0, override: dict | None = None) -> Hello:
    f = plan.fragments[index]
    header = {
        "v": PROTOCOL_VERSION,
        "run": plan.run_id,
        "plan": plan.digest,
        "fragment": index,
        "first_layer": f.first_layer,
        "last_layer": f.last_layer,
        "pid": 1000 + index,
        **(override or {}),
    }
    return Hello(t, peer, header)


def chunk(plan: Plan, index: int, item: int, piece: int, peer: str, t: float = 0.0, digest: str | None = None) -> Chunk:
    spec = plan.fragments[index].items[item]
    _, length = spec.piece_span(piece, plan.piece_size)
    return Chunk(t, peer, item, piece, length, digest or spec.pieces[piece])


def stream_all(core: Core, plan: Plan, index: int, peer: str, t: float = 0.0) -> list:
    """An honest agent: HELLO, then every wanted piece, then the coordinator's verification."""
    actions = core.handle(hello(plan, index, peer, t))
    out = list(actions)
    for item, spec in enumerate(plan.fragments[index].items):
        for piece in range(len(spec.pieces)):
            out += core.handle(chunk(plan, index, item, piece, peer, t))
    assert any(isinstance(a, Verify) for a in out)
    out += core.handle(Verified(t, index, []))
    return out


@pytest.mark.parametrize("n", [3, 4])
def test_every_arrival_order_gives_the_longest_contiguous_prefix(plans: dict[int, Plan], n: int) -> None:
    plan = plans[n]
    for order in itertools.permutations(range(n)):
        core = Core(plan)
        arrivals, reassembled, finished = [], [], []
        for index in order:
            for action in stream_all(core, plan, index, f"peer{index}"):
                if isinstance(action, Arrival):
                    arrivals.append(action)
                elif isinstance(action, Reassemble):
                    reassembled.append(action.layers)
                elif isinstance(action, Finish):
                    finished.append(action)
        expected = expected_prefix(order, plan)
        assert [a.fragment for a in arrivals] == list(order)
        assert [a.layers for a in arrivals] == expected, order
        grew = [e for i, e in enumerate(expected) if e > (expected[i - 1] if i else 0)]
        assert reassembled == grew and reassembled[-1] == 6, order
        assert finished == [Finish(True, [])]


def test_hello_is_checked_against_the_plan(plans: dict[int, Plan]) -> None:
    plan = plans[3]
    cases = [
        ({"v": PROTOCOL_VERSION + 1}, "HELLO.v"),
        ({"run": "other"}, "HELLO.run"),
        ({"plan": "0" * 64}, "HELLO.plan"),
        ({"fragment": 9}, "HELLO.fragment"),
        ({"first_layer": 1}, "HELLO.layers"),
    ]
    for override, field in cases:
        core = Core(plan)
        [action] = core.handle(hello(plan, 0, "p", override=override))
        assert isinstance(action, Send) and action.kind == "REJECT" and action.header["field"] == field
        assert action.header["fatal"] is True
        assert core.fragments[0].status == WAITING


def test_welcome_grants_credit_and_wants_everything(plans: dict[int, Plan]) -> None:
    plan = plans[3]
    core = Core(plan, CoreSettings(credit=3))
    [welcome] = core.handle(hello(plan, 1, "p"))
    assert welcome.kind == "WELCOME" and welcome.header["credit"] == 3
    wanted = sum(b - a for _, runs in welcome.header["want"] for a, b in runs)
    assert wanted == plan.fragments[1].num_pieces


def test_rival_agent_for_a_live_fragment_is_rejected(plans: dict[int, Plan]) -> None:
    plan = plans[3]
    core = Core(plan)
    core.handle(hello(plan, 1, "first"))
    [reject] = core.handle(hello(plan, 1, "rival"))
    assert reject.kind == "REJECT" and "holds it" in reject.header["expected"]


def test_agent_for_a_committed_fragment_is_told_it_is_committed_without_a_strike(plans: dict[int, Plan]) -> None:
    plan = plans[3]
    core = Core(plan)
    stream_all(core, plan, 1, "first")
    [told] = core.handle(hello(plan, 1, "restarted"))
    assert (told.kind, told.header) == ("COMMITTED", {"fragment": 1})
    assert core.peers["restarted"].strikes == 0 and core.fragments[1].status == COMMITTED


def test_corrupt_chunk_is_not_written_and_is_asked_for_again(plans: dict[int, Plan]) -> None:
    plan = plans[3]
    core = Core(plan)
    core.handle(hello(plan, 1, "p"))
    actions = core.handle(chunk(plan, 1, 0, 0, "p", digest="f" * 64))
    assert not any(isinstance(a, Write) for a in actions)
    kinds = [a.kind for a in actions if isinstance(a, Send)]
    assert kinds == ["REJECT", "WANT", "CREDIT"]
    want = next(a for a in actions if isinstance(a, Send) and a.kind == "WANT")
    assert want.header["want"] == [[0, [[0, 1]]]]
    assert core.fragments[1].have[0][0] == 0


def test_duplicate_chunk_is_harmless(plans: dict[int, Plan]) -> None:
    plan = plans[3]
    core = Core(plan)
    core.handle(hello(plan, 1, "p"))
    first = core.handle(chunk(plan, 1, 0, 0, "p"))
    again = core.handle(chunk(plan, 1, 0, 0, "p"))
    assert any(isinstance(a, Write) for a in first) and not any(isinstance(a, Write) for a in again)
    assert core.fragments[1].duplicate_bytes == plan.fragments[1].items[0].piece_span(0, plan.piece_size)[1]


def test_chunk_outside_the_fragment_or_over_credit_is_refused(plans: dict[int, Plan]) -> None:
    plan = plans[3]
    core = Core(plan, CoreSettings(credit=1))
    [reject] = core.handle(chunk(plan, 1, 0, 0, "stranger"))
    assert reject.header["expected"] == "HELLO before any CHUNK"
    core.handle(hello(plan, 1, "p"))
    items = len(plan.fragments[1].items)
    actions = core.handle(Chunk(0.0, "p", items, 0, 10, "0" * 64))
    assert actions[0].header["field"] == "CHUNK.item"
    actions = core.handle(Chunk(0.0, "p", 0, 10_000, 10, "0" * 64))
    assert actions[0].header["field"] == "CHUNK.piece"
    actions = core.handle(Chunk(0.0, "p", 0, 0, 3, "0" * 64))
    assert actions[0].header["field"] == "CHUNK.payload"
    # credit=1, each refused chunk returned its credit; now spend it without a CREDIT back:
    core.peers["p"].credit = 0
    [reject] = core.handle(chunk(plan, 1, 0, 0, "p"))
    assert reject.header["value"] == "over credit"


def test_dead_agent_keeps_verified_bytes_and_a_new_agent_resumes(plans: dict[int, Plan]) -> None:
    plan = plans[3]
    core = Core(plan, CoreSettings(dead_after_s=3.0))
    core.handle(hello(plan, 1, "a", t=0.0))
    core.handle(chunk(plan, 1, 0, 0, "a", t=0.5))
    assert core.handle(Tick(3.0)) == []
    [dead] = core.handle(Tick(4.0))
    assert isinstance(dead, AgentDead) and dead.fragment == 1 and "silent" in dead.reason
    assert core.fragments[1].status == WAITING and core.fragments[1].have[0][0] == 1
    [welcome] = core.handle(hello(plan, 1, "b", t=6.0))
    wanted = sum(b - a for _, runs in welcome.header["want"] for a, b in runs)
    assert wanted == plan.fragments[1].num_pieces - 1
    assert core.fragments[1].attempts == 2 and core.fragments[1].lost_s == pytest.approx(2.0)


def test_agent_exit_is_noticed_by_pid(plans: dict[int, Plan]) -> None:
    plan = plans[3]
    core = Core(plan)
    core.handle(hello(plan, 2, "a"))
    [dead] = core.handle(AgentExited(1.0, 1002))
    assert dead.fragment == 2 and "exited" in dead.reason


def test_failed_verification_re_requests_the_bad_item(plans: dict[int, Plan]) -> None:
    plan = plans[3]
    core = Core(plan)
    core.handle(hello(plan, 1, "p"))
    for item, spec in enumerate(plan.fragments[1].items):
        for piece in range(len(spec.pieces)):
            core.handle(chunk(plan, 1, item, piece, "p"))
    actions = core.handle(Verified(1.0, 1, [0]))
    assert [a.kind for a in actions] == ["WANT", "CREDIT"]
    assert core.fragments[1].status == LIVE and core.fragments[1].missing == len(plan.fragments[1].items[0].pieces)


def test_garbage_sender_is_banned_after_repeated_rejections(plans: dict[int, Plan]) -> None:
    core = Core(plans[3], CoreSettings(max_strikes=3))
    out = [core.handle(Malformed(0.0, "g", "kind", "XX", "a known kind")) for _ in range(4)]
    assert out[2][0].type == "ban" and out[3] == []


def test_peer_that_leaves_after_the_verdict_is_forgotten(plans: dict[int, Plan]) -> None:
    plan = plans[3]
    core = Core(plan)
    for index, peer in enumerate("abc"):
        out = stream_all(core, plan, index, peer)
    assert any(isinstance(a, Finish) for a in out) and core.finished
    assert core.handle(Bye(1.0, "a")) == [] and "a" not in core.peers
    assert core.handle(AgentExited(1.0, 1001)) == [] and "b" not in core.peers
    assert core.handle(Tick(99.0)) == [] and set(core.peers) == {"c"}


def test_end_of_agents_finishes_incomplete(plans: dict[int, Plan]) -> None:
    plan = plans[3]
    core = Core(plan)
    stream_all(core, plan, 0, "a")
    core.handle(Bye(1.0, "a"))
    [finish] = core.handle(EndOfAgents(2.0))
    assert finish == Finish(False, [1, 2])
    assert core.fragments[0].status == COMMITTED
