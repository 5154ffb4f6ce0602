"""Make the fragment plan: read the source checkpoint once, hash every piece, assign items."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from blake3 import blake3

from agents.source import SourceCheckpoint, TensorLocation
from protocol.errors import PlanError
from protocol.layers import LayerRange, check_ranges
from protocol.plan import DEFAULT_PIECE_SIZE, Fragment, Item, Plan

Progress = Callable[[int, int], None]  # (bytes hashed so far, total bytes)


def make_plan(
    source: SourceCheckpoint,
    ranges: list[LayerRange],
    *,
    run_id: str,
    model_name: str,
    piece_size: int = DEFAULT_PIECE_SIZE,
    progress: Progress | None = None,
    extra: dict[str, Any] | None = None,
) -> Plan:
    config = source.config
    num_layers = int(config.get("num_hidden_layers", 0))
    check_ranges(ranges, num_layers)
    by_fragment: list[list[TensorLocation]] = [[] for _ in ranges]
    for loc in sorted(source.tensors.values(), key=_tensor_order):
        layer = loc.layer
        if layer is None:
            by_fragment[0].append(loc)
            continue
        if not 0 <= layer < num_layers:
            raise PlanError(f"tensor {loc.name}", layer, f"a layer index below num_hidden_layers={num_layers}")
        by_fragment[next(i for i, (a, b) in enumerate(ranges) if a <= layer <= b)].append(loc)

    side_files = source.side_files()
    total = sum(loc.nbytes for loc in source.tensors.values()) + sum(
        (source.directory / f).stat().st_size for f in side_files
    )
    done = 0

    def hashed(name: str, kind: str, file: str, offset: int, nbytes: int, **extra: Any) -> Item:
        nonlocal done
        view = source.view(file, offset, nbytes)
        whole = blake3(max_threads=blake3.AUTO)
        pieces = []
        for start in range(0, nbytes, piece_size):
            chunk = view[start : start + piece_size]
            whole.update(chunk)
            pieces.append(blake3(chunk).hexdigest())
            done += len(chunk)
            if progress:
                progress(done, total)
        return Item(
            name=name,
            kind=kind,
            nbytes=nbytes,
            digest=whole.hexdigest(),
            pieces=tuple(pieces),
            source_file=file,
            source_offset=offset,
            **extra,
        )

    fragments = []
    for index, ((first, last), locs) in enumerate(zip(ranges, by_fragment, strict=True)):
        items = [
            hashed(loc.name, "tensor", loc.file, loc.offset, loc.nbytes, dtype=loc.dtype, shape=loc.shape)
            for loc in locs
        ]
        if index == 0:
            for fname in side_files:
                size = (source.directory / fname).stat().st_size
                items.append(hashed(fname, "file", fname, 0, size))
        fragments.append(Fragment(index, first, last, tuple(items)))

    dtypes = sorted({loc.dtype for loc in source.tensors.values()})
    model = {
        "name": model_name,
        "source_dir": str(source.directory),
        "num_layers": num_layers,
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "tied": bool(config.get("tie_word_embeddings", False)) and "lm_head.weight" not in source.tensors,
        "num_parameters": sum(_numel(loc.shape) for loc in source.tensors.values()),
        "config": config,
    }
    return Plan(run_id=run_id, model=model, piece_size=piece_size, fragments=tuple(fragments), extra=extra or {})


def _tensor_order(loc: TensorLocation) -> tuple[int, int, str]:
    layer = loc.layer
    # Non-layer tensors first (embeddings, norm, head), then layer by layer.
    return (0 if layer is None else 1, layer if layer is not None else 0, loc.name)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
