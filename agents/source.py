"""Read-only access to a source checkpoint directory without torch: safetensors headers are
parsed by hand and tensor bytes are served straight from a read-only memory map."""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import PlanError
from protocol.layers import layer_of
from protocol.safetensors_format import MAX_HEADER, parse_header

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
_MAX_SIDE_FILE = 64 * 1024 * 1024
# Files that describe a source checkpoint rather than the model: never shipped to the coordinator.
_NOT_SHIPPED = {"prepared.json"}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorLocation:
    name: str
    file: str  # relative to the checkpoint directory
    offset: int  # absolute offset of the first byte in `file`
    nbytes: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def layer(self) -> int | None:
        return layer_of(self.name)


class SourceCheckpoint:
    """A Hugging Face checkpoint directory holding one or more safetensors files."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).resolve()
        if not (self.directory / "config.json").is_file():
            raise FileNotFoundError(f"{self.directory}: no config.json; expected a Hugging Face checkpoint directory")
        files, weight_map = _weight_files(self.directory)
        if not files:
            raise FileNotFoundError(
                f"{self.directory}: no *.safetensors files; "
                f"run `fragsim prepare --model {self.directory}` to convert it"
            )
        self.files: list[str] = files  # the weights files read, relative to the directory
        self.tensors: dict[str, TensorLocation] = {}
        for fname in files:
            for loc in _read_locations(self.directory, fname):
                if loc.name in self.tensors:
                    raise PlanError(
                        f"tensor {loc.name}", f"in both {self.tensors[loc.name].file} and {fname}", "in one file only"
                    )
                self.tensors[loc.name] = loc
        if weight_map is not None:
            _check_weight_map(self.directory / INDEX_FILE, weight_map, self.tensors)
        self._maps: dict[str, mmap.mmap | None] = {}

    @property
    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = json.loads((self.directory / "config.json").read_text())
        return config

    def side_files(self) -> list[str]:
        """Config, tokenizer and generation files that travel with fragment 0."""
        names = []
        for path in sorted(self.directory.iterdir()):
            name = path.name
            if (
                path.is_file()
                and not path.is_symlink()
                and not name.startswith(".")
                and not name.endswith(_WEIGHT_SUFFIXES)
                and not name.endswith(".index.json")
                and name not in _NOT_SHIPPED
                and path.stat().st_size <= _MAX_SIDE_FILE
            ):
                names.append(name)
        return names

    def view(self, file: str, offset: int, nbytes: int) -> memoryview:
        """Zero-copy read-only view of bytes in one of the checkpoint's files."""
        mapping = self._maps.get(file)
        if mapping is None:
            path = self.directory / file
            if path.parent != self.directory:
                raise ValueError(f"source file {file!r}: expected a file directly inside {self.directory}")
            with open(path, "rb") as fh:  # read-only: agents never write to the source
                size = os.fstat(fh.fileno()).st_size
                mapping = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
            self._maps[file] = mapping
        if mapping is None:
            if nbytes:
                raise ValueError(f"{file}: empty file, expected {nbytes} bytes at {offset}")
            return memoryview(b"")
        if offset < 0 or offset + nbytes > len(mapping):
            raise ValueError(f"{file}: bytes {offset}..{offset + nbytes} outside the file of {len(mapping)} bytes")
        return memoryview(mapping)[offset : offset + nbytes]

    def release(self, file: str, offset: int, nbytes: int) -> None:
        """Drop this process's pages of bytes already delivered. The mapping is read-only and
        file-backed, so the page cache keeps them and a later read faults them back in; without
        this, every page streamed stays resident and counts as the agent's private memory."""
        mapping = self._maps.get(file)
        if mapping is None or nbytes <= 0:
            return
        start = offset - offset % mmap.PAGESIZE
        end = min(len(mapping), offset + nbytes)
        mapping.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        for mapping in self._maps.values():
            if mapping is not None:
                try:
                    mapping.close()
                except BufferError:  # zmq may still hold a zero-copy frame; the OS unmaps at exit
                    pass
        self._maps.clear()


def _weight_files(directory: Path) -> tuple[list[str], dict[str, str] | None]:
    """The weights files to read, and the index's weight_map when there is one: exactly the files
    an index names; else model.safetensors alone (a `consolidated.safetensors` beside it holds the
    same weights again, for other tools); else every *.safetensors file."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            data = json.loads(index.read_text())
        except (ValueError, RecursionError) as exc:
            raise PlanError(str(index), " ".join(str(exc).split()), "a JSON object with a weight_map") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not (
            isinstance(weight_map, dict)
            and weight_map
            and all(isinstance(f, str) and f.endswith(".safetensors") for f in weight_map.values())
        ):
            raise PlanError(
                f"{index} weight_map", weight_map, "an object mapping each tensor name to a .safetensors file"
            )
        files = sorted(set(weight_map.values()))
        for fname in files:
            if Path(fname).name != fname or fname.startswith("."):
                raise PlanError(f"{index} weight_map file", fname, f"a file name directly inside {directory}")
            if not (directory / fname).is_file():
                raise PlanError(f"{index} weight_map file", fname, f"a file that exists in {directory}")
        return files, weight_map
    if (directory / SINGLE_FILE).is_file():
        return [SINGLE_FILE], None
    return sorted(p.name for p in directory.glob("*.safetensors")), None


def _check_weight_map(index: Path, weight_map: dict[str, str], tensors: dict[str, TensorLocation]) -> None:
    for name, fname in weight_map.items():
        loc = tensors.get(name)
        if loc is None or loc.file != fname:
            raise PlanError(f"{index}: tensor {name}", loc.file if loc else "in none of the files", f"in {fname}")
    for name, loc in tensors.items():
        if name not in weight_map:
            raise PlanError(f"{index}: tensor {name} of {loc.file}", "not in the weight_map", "every tensor listed")


def _read_locations(directory: Path, fname: str) -> list[TensorLocation]:
    path = directory / fname
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise PlanError(str(path), f"{len(prefix)} bytes", "a safetensors file (8-byte header length, header)")
        length = int.from_bytes(prefix, "little")
        try:
            data_start, header = parse_header(prefix + fh.read(min(length, MAX_HEADER)))
        except PlanError as exc:  # name the file: the header alone does not know it
            raise PlanError(f"{path}: {exc.what}", exc.value, exc.expected) from None
        size = os.fstat(fh.fileno()).st_size
    out = []
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if data_start + end > size:
            raise PlanError(f"{path}: end of tensor {name}", data_start + end, f"within the file size {size}")
        out.append(TensorLocation(name, fname, data_start + begin, end - begin, info["dtype"], tuple(info["shape"])))
    return out
