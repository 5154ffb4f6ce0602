"""The fragment plan: the run's trust anchor, like a torrent's metainfo.

It names every fragment's layer range and every item (tensor or file) it carries, with
byte size, a digest of the whole item and a digest per fixed-size piece. The coordinator
checks each piece against the plan before it touches disk, so a resume needs no journal:
a piece on disk is either verified-good or re-requested.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from protocol.digest import ALGORITHM, digest
from protocol.errors import PlanError
from protocol.layers import LayerRange, check_ranges, layer_of
from protocol.safetensors_format import DTYPE_SIZES, build_header, tensor_nbytes
from protocol.version import PLAN_FORMAT, PROTOCOL_VERSION

DEFAULT_PIECE_SIZE = 2 * 1024 * 1024  # 1-4 MiB frames are the loopback sweet spot (DESIGN)
WEIGHTS_FILE = "weights.safetensors"
_FILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HEX_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Item:
    """One tensor (stored in the fragment's safetensors file) or one whole file (config, tokenizer)."""

    name: str
    kind: str  # "tensor" | "file"
    nbytes: int
    digest: str
    pieces: tuple[str, ...]
    source_file: str  # path relative to the source checkpoint directory
    source_offset: int  # absolute byte offset of the item inside source_file
    dtype: str | None = None
    shape: tuple[int, ...] | None = None

    def piece_span(self, piece: int, piece_size: int) -> tuple[int, int]:
        """(offset within the item, length) of one piece."""
        start = piece * piece_size
        return start, min(piece_size, self.nbytes - start)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "nbytes": self.nbytes}
        if self.kind == "tensor":
            out.update(dtype=self.dtype, shape=list(self.shape or ()))
        out.update(
            digest=self.digest, source_file=self.source_file, source_offset=self.source_offset, pieces=list(self.pieces)
        )
        return out


@dataclass(frozen=True)
class Fragment:
    index: int
    first_layer: int
    last_layer: int
    items: tuple[Item, ...]

    @property
    def label(self) -> str:
        return f"{self.first_layer}-{self.last_layer}"

    @property
    def num_layers(self) -> int:
        return self.last_layer - self.first_layer + 1

    @property
    def nbytes(self) -> int:
        return sum(item.nbytes for item in self.items)

    @property
    def num_pieces(self) -> int:
        return sum(len(item.pieces) for item in self.items)

    @cached_property
    def layout(self) -> tuple[bytes, dict[str, int], int]:
        """Header bytes, {tensor name: offset in the weights file}, weights file size."""
        tensors = [(i.name, i.dtype or "", list(i.shape or ())) for i in self.items if i.kind == "tensor"]
        return build_header(tensors)

    def destination(self, item_index: int) -> tuple[str, int]:
        """Where an item's first byte lands: (file name inside the fragment dir, offset)."""
        item = self.items[item_index]
        if item.kind == "tensor":
            return WEIGHTS_FILE, self.layout[1][item.name]
        return item.name, 0

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "first_layer": self.first_layer,
            "last_layer": self.last_layer,
            "nbytes": self.nbytes,
            "items": [i.to_json() for i in self.items],
        }


@dataclass(frozen=True)
class Plan:
    run_id: str
    model: dict[str, Any]  # name, source_dir, dtype, num_layers, tied, config (the model's config.json)
    piece_size: int
    fragments: tuple[Fragment, ...]
    protocol_version: int = PROTOCOL_VERSION
    plan_format: int = PLAN_FORMAT
    digest_algorithm: str = ALGORITHM
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.model["num_layers"])

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.fragments)

    @property
    def ranges(self) -> list[LayerRange]:
        return [(f.first_layer, f.last_layer) for f in self.fragments]

    def body(self) -> dict[str, Any]:
        return {
            "plan_format": self.plan_format,
            "protocol_version": self.protocol_version,
            "digest_algorithm": self.digest_algorithm,
            "run_id": self.run_id,
            "model": self.model,
            "piece_size": self.piece_size,
            "fragments": [f.to_json() for f in self.fragments],
            **({"extra": self.extra} if self.extra else {}),
        }

    @cached_property
    def digest(self) -> str:
        """Digest of the canonical plan body: logs and results name the plan they belong to."""
        return digest(json.dumps(self.body(), sort_keys=True, separators=(",", ":")).encode())

    def to_json(self) -> dict[str, Any]:
        return {**self.body(), "plan_digest": self.digest}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1) + "\n"

    @classmethod
    def loads(cls, text: str | bytes) -> Plan:
        return plan_from_json(json.loads(text))


def piece_count(nbytes: int, piece_size: int) -> int:
    return -(-nbytes // piece_size)


def plan_from_json(data: dict[str, Any]) -> Plan:
    """Rebuild and validate a plan; any inconsistency is a PlanError naming the field."""
    _expect(data, "plan_format", int)
    if data["plan_format"] != PLAN_FORMAT:
        raise PlanError("plan_format", data["plan_format"], f"{PLAN_FORMAT}")
    if data.get("digest_algorithm") != ALGORITHM:
        raise PlanError("digest_algorithm", data.get("digest_algorithm"), ALGORITHM)
    piece_size = _expect(data, "piece_size", int)
    if not 4096 <= piece_size <= 64 * 1024 * 1024:
        raise PlanError("piece_size", piece_size, "between 4 KiB and 64 MiB")
    model = _expect(data, "model", dict)
    num_layers = _expect(model, "num_layers", int)
    fragments = []
    for fdata in _expect(data, "fragments", list):
        items = tuple(_item_from_json(idata, piece_size) for idata in _expect(fdata, "items", list))
        fragments.append(
            Fragment(
                _expect(fdata, "index", int),
                _expect(fdata, "first_layer", int),
                _expect(fdata, "last_layer", int),
                items,
            )
        )
    plan = Plan(
        run_id=_expect(data, "run_id", str),
        model=model,
        piece_size=piece_size,
        fragments=tuple(fragments),
        protocol_version=_expect(data, "protocol_version", int),
        extra=data.get("extra", {}),
    )
    check_plan(plan, num_layers)
    claimed = data.get("plan_digest")
    if claimed is not None and claimed != plan.digest:
        raise PlanError("plan_digest", claimed, f"{plan.digest} (the digest of the plan body): the plan was altered")
    return plan


def check_plan(plan: Plan, num_layers: int) -> None:
    check_ranges(plan.ranges, num_layers)
    seen: set[str] = set()
    for position, fragment in enumerate(plan.fragments):
        if fragment.index != position:
            raise PlanError("fragment index", fragment.index, f"{position} (fragments in layer order)")
        for item in fragment.items:
            if item.name in seen:
                raise PlanError("item name", item.name, "unique across the plan")
            seen.add(item.name)
            if item.kind == "tensor":
                layer = layer_of(item.name)
                if layer is None and position != 0:
                    raise PlanError(f"tensor {item.name}", f"fragment {position}", "non-layer tensors in fragment 0")
                if layer is not None and not fragment.first_layer <= layer <= fragment.last_layer:
                    raise PlanError(
                        f"tensor {item.name}",
                        f"fragment {position} ({fragment.label})",
                        "the fragment whose range holds its layer",
                    )
            elif position != 0:
                raise PlanError(f"file {item.name}", f"fragment {position}", "files in fragment 0")


def _item_from_json(d: dict[str, Any], piece_size: int) -> Item:
    name = _expect(d, "name", str)
    kind = _expect(d, "kind", str)
    nbytes = _expect(d, "nbytes", int)
    if nbytes < 0:
        raise PlanError(f"nbytes of {name}", nbytes, ">= 0")
    dtype = shape = None
    if kind == "tensor":
        dtype = _expect(d, "dtype", str)
        if dtype not in DTYPE_SIZES:
            raise PlanError(f"dtype of {name}", dtype, f"one of {sorted(DTYPE_SIZES)}")
        shape = tuple(_expect(d, "shape", list))
        if not all(isinstance(s, int) and s >= 0 for s in shape) or tensor_nbytes(dtype, list(shape)) != nbytes:
            raise PlanError(f"shape of {name}", list(shape), f"non-negative ints whose {dtype} size is {nbytes} bytes")
    elif kind == "file":
        if not _FILE_NAME_RE.fullmatch(name):
            raise PlanError("file name", name, "a plain file name: letters, digits, '.', '_', '-'")
    else:
        raise PlanError(f"kind of {name}", kind, "'tensor' or 'file'")
    pieces = tuple(_expect(d, "pieces", list))
    if len(pieces) != piece_count(nbytes, piece_size):
        raise PlanError(f"pieces of {name}", len(pieces), f"{piece_count(nbytes, piece_size)} for {nbytes} bytes")
    for value in (_expect(d, "digest", str), *pieces):
        if not isinstance(value, str) or not _HEX_RE.fullmatch(value):
            raise PlanError(f"digest in {name}", value, "64 lowercase hex digits")
    return Item(
        name=name,
        kind=kind,
        nbytes=nbytes,
        digest=d["digest"],
        pieces=pieces,
        source_file=_expect(d, "source_file", str),
        source_offset=_expect(d, "source_offset", int),
        dtype=dtype,
        shape=shape,
    )


def _expect(d: dict[str, Any], key: str, typ: type) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise PlanError(key, None, f"a {typ.__name__} field")
    value = d[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise PlanError(key, value, f"a {typ.__name__}")
    return value
