"""Which layers go to which fragment: splitting, parsing and validating layer ranges."""

from __future__ import annotations

import re

from protocol.errors import PlanError

LayerRange = tuple[int, int]  # inclusive: (0, 7) is layers 0..7

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(tensor_name: str) -> int | None:
    """The decoder layer a tensor belongs to, or None for embeddings, final norm, lm_head."""
    match = _LAYER_RE.search(tensor_name)
    return int(match.group(1)) if match else None


def split_layers(num_layers: int, fragments: int) -> list[LayerRange]:
    """Split layers into contiguous ranges as even as possible, larger ranges first.

    30 layers into 4 gives 0-7, 8-15, 16-22, 23-29.
    """
    if num_layers < 1:
        raise PlanError("number of layers", num_layers, "at least 1")
    if not 1 <= fragments <= num_layers:
        raise PlanError("--fragments", fragments, f"between 1 and the number of layers ({num_layers})")
    base, extra = divmod(num_layers, fragments)
    ranges, start = [], 0
    for i in range(fragments):
        size = base + (1 if i < extra else 0)
        ranges.append((start, start + size - 1))
        start += size
    return ranges


def parse_ranges(text: str, num_layers: int) -> list[LayerRange]:
    """Parse '0-7,8-15,16-29' (a bare '5' means 5-5) and check the ranges tile 0..num_layers-1."""
    ranges: list[LayerRange] = []
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise PlanError("--ranges entry", part, "FIRST-LAST with whole numbers, e.g. 0-7")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise PlanError("--ranges entry", part, "FIRST <= LAST")
        ranges.append((first, last))
    check_ranges(ranges, num_layers)
    return ranges


def check_ranges(ranges: list[LayerRange], num_layers: int) -> None:
    """Ranges must be contiguous, non-overlapping, in order and cover every layer exactly once."""
    if not ranges:
        raise PlanError("layer ranges", ranges, "at least one range")
    expected_first = 0
    for first, last in ranges:
        if first < expected_first:
            raise PlanError("layer range", f"{first}-{last}", f"no overlap: must start at layer {expected_first}")
        if first > expected_first:
            raise PlanError(
                "layer range", f"{first}-{last}", f"contiguous: layers {expected_first}-{first - 1} are not covered"
            )
        if last < first:
            raise PlanError("layer range", f"{first}-{last}", "FIRST <= LAST")
        expected_first = last + 1
    if expected_first != num_layers:
        raise PlanError(
            "layer ranges",
            ",".join(f"{a}-{b}" for a, b in ranges),
            f"covering layers 0-{num_layers - 1} (the model has {num_layers})",
        )
