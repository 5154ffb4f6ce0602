"""Layer splitting, range validation and the plan built from a real (tiny) checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from blake3 import blake3

from agents.source import SourceCheckpoint
from coordinator.launch.planner import make_plan
from protocol.errors import PlanError
from protocol.layers import layer_of, parse_ranges, split_layers
from protocol.plan import Plan
from protocol.safetensors_format import parse_header


@pytest.mark.parametrize(
    "layers,n,expected",
    [
        (30, 4, [(0, 7), (8, 15), (16, 22), (23, 29)]),
        (30, 1, [(0, 29)]),
        (30, 30, [(i, i) for i in range(30)]),
        (6, 4, [(0, 1), (2, 3), (4, 4), (5, 5)]),
        (7, 3, [(0, 2), (3, 4), (5, 6)]),
    ],
)
def test_split_layers_even_larger_first(layers: int, n: int, expected: list[tuple[int, int]]) -> None:
    assert split_layers(layers, n) == expected


@pytest.mark.parametrize("n", [0, -1, 31])
def test_split_layers_refuses_impossible_counts(n: int) -> None:
    with pytest.raises(PlanError, match="--fragments"):
        split_layers(30, n)


def test_parse_ranges_accepts_a_tiling() -> None:
    assert parse_ranges("0-7,8-15,16-22,23-29", 30) == [(0, 7), (8, 15), (16, 22), (23, 29)]
    assert parse_ranges("0-4, 5 ,6-29", 30) == [(0, 4), (5, 5), (6, 29)]


@pytest.mark.parametrize(
    "text,message",
    [
        ("0-7,9-29", "layers 8-8 are not covered"),
        ("0-7,7-29", "no overlap"),
        ("1-29", "layers 0-0 are not covered"),
        ("0-7,8-28", "covering layers 0-29"),
        ("0-7,8-30", "covering layers 0-29"),
        ("0-7,x", "FIRST-LAST"),
        ("7-0,8-29", "FIRST <= LAST"),
        ("8-15,0-7,16-29", "must start at layer 0|not covered"),
        ("", "FIRST-LAST"),
    ],
)
def test_parse_ranges_refuses_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        parse_ranges(text, 30)


def test_layer_of() -> None:
    assert layer_of("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_of("model.embed_tokens.weight") is None
    assert layer_of("lm_head.weight") is None


def _plan(model: Path, ranges: list[tuple[int, int]], piece_size: int = 4096) -> Plan:
    source = SourceCheckpoint(model)
    try:
        return make_plan(source, ranges, run_id="test", model_name="tiny", piece_size=piece_size)
    finally:
        source.close()


def test_plan_assigns_every_tensor_once_and_fragment_zero_carries_the_rest(tiny_model: Path) -> None:
    plan = _plan(tiny_model, split_layers(6, 3))
    names = [item.name for f in plan.fragments for item in f.items]
    assert len(names) == len(set(names))
    source = SourceCheckpoint(tiny_model)
    assert {i.name for f in plan.fragments for i in f.items if i.kind == "tensor"} == set(source.tensors)
    first = plan.fragments[0]
    assert "model.embed_tokens.weight" in [i.name for i in first.items]
    assert "model.norm.weight" in [i.name for i in first.items]
    assert {"config.json", "tokenizer.json"} <= {i.name for i in first.items if i.kind == "file"}
    assert plan.model["tied"] is True and "lm_head.weight" not in names
    for f in plan.fragments[1:]:
        assert all(i.kind == "tensor" and f.first_layer <= layer_of(i.name) <= f.last_layer for i in f.items)


def test_plan_untied_sharded_model_puts_lm_head_in_fragment_zero(tiny_untied_sharded: Path) -> None:
    assert len(list(tiny_untied_sharded.glob("*.safetensors"))) >= 2
    plan = _plan(tiny_untied_sharded, [(0, 1), (2, 4)])
    assert plan.model["tied"] is False
    assert "lm_head.weight" in [i.name for i in plan.fragments[0].items]
    assert len({i.source_file for f in plan.fragments for i in f.items if i.kind == "tensor"}) >= 2


def test_plan_digests_are_the_source_bytes(tiny_model: Path) -> None:
    plan = _plan(tiny_model, [(0, 5)], piece_size=4096)
    for item in plan.fragments[0].items:
        raw = (tiny_model / item.source_file).read_bytes()[item.source_offset : item.source_offset + item.nbytes]
        assert blake3(raw).hexdigest() == item.digest
        pieces = [blake3(raw[i : i + 4096]).hexdigest() for i in range(0, len(raw), 4096)]
        assert list(item.pieces) == pieces


def test_plan_round_trips_and_detects_tampering(tiny_model: Path) -> None:
    plan = _plan(tiny_model, split_layers(6, 2))
    again = Plan.loads(plan.dumps())
    assert again.digest == plan.digest and again.ranges == plan.ranges
    data = json.loads(plan.dumps())
    data["fragments"][1]["items"][0]["digest"] = "0" * 64
    with pytest.raises(PlanError, match="plan_digest"):
        Plan.loads(json.dumps(data))
    data = json.loads(plan.dumps())
    data["fragments"][1]["last_layer"] = 4
    with pytest.raises(PlanError, match="covering"):
        Plan.loads(json.dumps(data))


def test_fragment_layout_is_a_valid_safetensors_header(tiny_model: Path) -> None:
    plan = _plan(tiny_model, split_layers(6, 2))
    for fragment in plan.fragments:
        header, offsets, size = fragment.layout
        data_start, parsed = parse_header(header)
        assert data_start % 8 == 0
        tensors = [i for i in fragment.items if i.kind == "tensor"]
        assert set(parsed) == {i.name for i in tensors}
        assert size == data_start + sum(i.nbytes for i in tensors)
        for item in tensors:
            assert offsets[item.name] == data_start + parsed[item.name]["data_offsets"][0]
