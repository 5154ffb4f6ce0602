"""The safetensors container format, read and written without torch or numpy:
an 8-byte little-endian header length, a JSON header, then raw tensor bytes."""

from __future__ import annotations

import json
import struct
from typing import Any

from protocol.errors import PlanError

DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit
ALIGN = 8


def parse_header(prefix: bytes) -> tuple[int, dict[str, Any]]:
    """Parse a safetensors header from the first bytes of a file.

    Returns (data_start, {name: {"dtype", "shape", "data_offsets"}}) where data_start is
    the absolute file offset of the data section. `prefix` must hold at least the header.
    """
    if len(prefix) < 8:
        raise PlanError("safetensors header", len(prefix), "at least 8 bytes")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER or len(prefix) < 8 + n:
        raise PlanError("safetensors header length", n, f"<= {MAX_HEADER} and within the file")
    try:
        header = json.loads(bytes(prefix[8 : 8 + n]).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise PlanError("safetensors header", " ".join(str(exc).split()), "a UTF-8 JSON object") from None
    if not isinstance(header, dict):
        raise PlanError("safetensors header", f"a JSON {type(header).__name__}", "a JSON object of tensor entries")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise PlanError("safetensors __metadata__", f"a JSON {type(metadata).__name__}", "a JSON object")
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise PlanError(f"safetensors entry {name}", f"a JSON {type(info).__name__}", f"an object with {_KEYS}")
        missing = [key for key in ("dtype", "shape", "data_offsets") if key not in info]
        if missing:
            raise PlanError(f"safetensors entry {name}", f"no {', '.join(missing)}", f"an object with {_KEYS}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise PlanError(f"dtype of {name}", dtype, f"one of {sorted(DTYPE_SIZES)}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise PlanError(f"shape of {name}", shape, "a list of whole numbers >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise PlanError(f"data_offsets of {name}", offsets, "[BEGIN, END], whole numbers >= 0")
        begin, end = offsets
        if end < begin:
            raise PlanError(f"data_offsets of {name}", offsets, "BEGIN <= END")
        if end - begin != tensor_nbytes(dtype, shape):
            raise PlanError(f"byte size of {name}", end - begin, "dtype size x number of elements")
        spans.append((begin, end, name))
    previous_end, previous = 0, ""
    for begin, end, name in sorted(spans):
        if begin < previous_end:
            raise PlanError(f"data_offsets of {name}", [begin, end], f"no overlap with {previous}")
        previous_end, previous = end, name
    return 8 + n, header


_KEYS = '"dtype", "shape" and "data_offsets"'


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def tensor_nbytes(dtype: str, shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count * DTYPE_SIZES[dtype]


def build_header(tensors: list[tuple[str, str, list[int]]]) -> tuple[bytes, dict[str, int], int]:
    """Lay out tensors (name, dtype, shape) in the given order as one safetensors file.

    Returns (header bytes including the length prefix, {name: absolute file offset}, file size).
    Deterministic, so the coordinator can pre-allocate exactly the file the plan describes.
    """
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    relative: dict[str, int] = {}
    for name, dtype, shape in tensors:
        size = tensor_nbytes(dtype, shape)
        meta[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        relative[name] = offset
        offset += size
    body = json.dumps(meta, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % ALIGN)  # pad like the reference writer: data starts aligned
    data_start = 8 + len(body)
    header = struct.pack("<Q", len(body)) + body
    return header, {k: data_start + v for k, v in relative.items()}, data_start + offset
