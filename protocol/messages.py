"""Wire messages: multipart frames [kind][msgpack header][payload?].

Tensor bytes never go through msgpack (a 4 MiB pack costs two copies); they ride in their
own frame, sent zero-copy from the agent's memory map. `decode` checks structure and
types only; whether a tensor or piece belongs to the sender is the coordinator core's
rule, because only it knows which fragment the sender claimed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from protocol.errors import ProtocolError

Frame = bytes | bytearray | memoryview

# kind -> (required fields with their types, may carry a payload)
AGENT_KINDS: dict[str, tuple[dict[str, type], bool]] = {
    "HELLO": (
        {"v": int, "run": str, "plan": str, "fragment": int, "first_layer": int, "last_layer": int, "pid": int},
        False,
    ),
    "CHUNK": ({"item": int, "piece": int}, True),
    "HEARTBEAT": ({}, False),
    "BYE": ({}, False),
}
COORDINATOR_KINDS: dict[str, tuple[dict[str, type], bool]] = {
    "WELCOME": ({"v": int, "fragment": int, "want": list, "credit": int, "heartbeat_ms": int}, False),
    "CREDIT": ({"n": int}, False),
    "WANT": ({"want": list}, False),
    "COMMITTED": ({"fragment": int}, False),
    "REJECT": ({"reason": str, "field": str, "expected": str, "fatal": bool}, False),
    "HEARTBEAT": ({}, False),
}
MAX_AGENT_HEADER = 4096
MAX_COORDINATOR_HEADER = 4 * 1024 * 1024
MAX_KIND = 16

# want lists: [[item_index, [[first_piece, stop_piece], ...]], ...]
WantList = list[list[Any]]


@dataclass(frozen=True)
class Message:
    kind: str
    header: dict[str, Any]
    payload: memoryview | None = None


def encode(kind: str, header: dict[str, Any] | None = None, payload: Frame | None = None) -> list[Frame]:
    frames: list[Frame] = [kind.encode("ascii"), msgpack.packb(header or {}, use_bin_type=True)]
    if payload is not None:
        frames.append(payload)
    return frames


def decode_from_agent(frames: Sequence[Frame], max_payload: int) -> Message:
    return _decode(frames, AGENT_KINDS, MAX_AGENT_HEADER, max_payload)


def decode_from_coordinator(frames: Sequence[Frame]) -> Message:
    return _decode(frames, COORDINATOR_KINDS, MAX_COORDINATOR_HEADER, 0)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError("header", f"msgpack ext type {code}", "plain msgpack types only")


def _decode(
    frames: Sequence[Frame], kinds: dict[str, tuple[dict[str, type], bool]], max_header: int, max_payload: int
) -> Message:
    if not isinstance(frames, list) or not 2 <= len(frames) <= 3:
        raise ProtocolError("frames", len(frames) if isinstance(frames, list) else frames, "2 or 3 frames")
    raw_kind = memoryview(frames[0])
    if len(raw_kind) > MAX_KIND:
        raise ProtocolError("kind", bytes(raw_kind), f"at most {MAX_KIND} bytes")
    try:
        kind = bytes(raw_kind).decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("kind", bytes(raw_kind), f"one of {sorted(kinds)}") from None
    if kind not in kinds:
        raise ProtocolError("kind", kind, f"one of {sorted(kinds)}")
    fields, carries_payload = kinds[kind]
    raw_header = memoryview(frames[1])
    if len(raw_header) > max_header:
        raise ProtocolError("header size", len(raw_header), f"at most {max_header} bytes")
    try:
        header = msgpack.unpackb(raw_header, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises a zoo of types on garbage; all mean the same here
        raise ProtocolError("header", bytes(raw_header[:64]), f"a msgpack map ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise ProtocolError("header", header, "a msgpack map")
    for name, typ in fields.items():
        if name not in header:
            raise ProtocolError(f"{kind}.{name}", None, f"a {typ.__name__} (field missing)")
        value = header[name]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ProtocolError(f"{kind}.{name}", value, f"a {typ.__name__}")
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise ProtocolError(f"{kind}.{name}", value, "a 64-bit integer")
    payload = None
    if len(frames) == 3:
        if not carries_payload:
            raise ProtocolError(f"{kind} payload", len(memoryview(frames[2])), "no payload frame")
        payload = memoryview(frames[2])
        if payload.nbytes > max_payload:
            raise ProtocolError(f"{kind} payload size", payload.nbytes, f"at most {max_payload} bytes (one piece)")
    elif carries_payload:
        raise ProtocolError(f"{kind} payload", None, "a payload frame")
    return Message(kind, header, payload)


def want_ranges(missing: list[int]) -> list[list[int]]:
    """Compress sorted piece indices into [first, stop) runs: a resume point costs a few bytes."""
    runs: list[list[int]] = []
    for piece in missing:
        if runs and runs[-1][1] == piece:
            runs[-1][1] = piece + 1
        else:
            runs.append([piece, piece + 1])
    return runs


def expand_want(want: WantList) -> list[tuple[int, int]]:
    """[(item, piece), ...] in order from a want list (validated shape)."""
    out: list[tuple[int, int]] = []
    for entry in want:
        if not (
            isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int) and isinstance(entry[1], list)
        ):
            raise ProtocolError("want entry", entry, "[item, [[first, stop], ...]]")
        item, runs = entry
        for run in runs:
            if not (
                isinstance(run, list)
                and len(run) == 2
                and all(isinstance(x, int) for x in run)
                and 0 <= run[0] < run[1]
            ):
                raise ProtocolError("want run", run, "[first, stop) with 0 <= first < stop")
            out.extend((item, p) for p in range(run[0], run[1]))
    return out
