"""The wire codec: round trips, clear refusals, and fuzzing that only ever yields ProtocolError."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ProtocolError
from protocol.messages import (
    AGENT_KINDS,
    decode_from_agent,
    decode_from_coordinator,
    encode,
    expand_want,
    want_ranges,
)


def test_chunk_round_trip_keeps_payload_out_of_msgpack() -> None:
    frames = encode("CHUNK", {"item": 3, "piece": 7}, memoryview(b"x" * 100))
    assert len(frames) == 3 and bytes(frames[2]) == b"x" * 100
    msg = decode_from_agent(frames, max_payload=100)
    assert (msg.kind, msg.header, bytes(msg.payload)) == ("CHUNK", {"item": 3, "piece": 7}, b"x" * 100)


@pytest.mark.parametrize(
    "frames,field",
    [
        ([b"NOPE", msgpack.packb({})], "kind"),
        ([b"\xff\xfe", msgpack.packb({})], "kind"),
        ([b"CHUNK", msgpack.packb({"item": 1})], "CHUNK.piece"),
        ([b"CHUNK", msgpack.packb({"item": "1", "piece": 0}), b"x"], "CHUNK.item"),
        ([b"CHUNK", msgpack.packb({"item": True, "piece": 0}), b"x"], "CHUNK.item"),
        ([b"CHUNK", msgpack.packb({"item": 1, "piece": 0})], "CHUNK payload"),
        ([b"CHUNK", msgpack.packb({"item": 1, "piece": 0}), b"x" * 11], "CHUNK payload size"),
        ([b"HEARTBEAT", msgpack.packb({}), b"x"], "HEARTBEAT payload"),
        ([b"HELLO", msgpack.packb([1, 2])], "header"),
        ([b"HELLO", b"\xc1garbage"], "header"),
        ([b"HELLO", b"x" * 5000], "header size"),
        ([b"HELLO"], "frames"),
        ([b"BYE", msgpack.packb({}), b"", b""], "frames"),
    ],
)
def test_decode_refuses_with_the_field(frames: list[bytes], field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_from_agent(frames, max_payload=10)
    assert info.value.field == field


def test_want_ranges_round_trip() -> None:
    assert want_ranges([0, 1, 2, 5, 7, 8]) == [[0, 3], [5, 6], [7, 9]]
    assert expand_want([[4, [[0, 2], [5, 6]]]]) == [(4, 0), (4, 1), (4, 5)]
    with pytest.raises(ProtocolError):
        expand_want([[4, [[3, 1]]]])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
def test_fuzz_arbitrary_frames_only_raise_protocol_error(frames: list[bytes]) -> None:
    try:
        decode_from_agent(frames, max_payload=16)
    except ProtocolError:
        pass


_int64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_values = st.one_of(
    st.none(),
    st.booleans(),
    _int64,
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.lists(_int64, max_size=3),
)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(sorted(AGENT_KINDS)),
    st.dictionaries(st.text(max_size=12), _values, max_size=8),
    st.one_of(st.none(), st.binary(max_size=32)),
)
def test_fuzz_well_typed_headers_decode_or_refuse(kind: str, header: dict, payload: bytes | None) -> None:
    frames = [kind.encode(), msgpack.packb(header, use_bin_type=True)] + ([payload] if payload is not None else [])
    try:
        msg = decode_from_agent(frames, max_payload=16)
    except ProtocolError:
        return
    fields, _ = AGENT_KINDS[kind]
    for name, typ in fields.items():
        assert isinstance(msg.header[name], typ) and not (typ is int and isinstance(msg.header[name], bool))


def test_coordinator_messages_decode() -> None:
    msg = decode_from_coordinator(
        encode("WELCOME", {"v": 1, "fragment": 0, "want": [], "credit": 4, "heartbeat_ms": 500})
    )
    assert msg.kind == "WELCOME"
