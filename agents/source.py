"""Read-only access to a source checkpoint directory without torch: safetensors headers are
parsed by hand and tensor bytes are served straight from a read-only memory map."""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.layers import layer_of
from protocol.safetensors_format import parse_header

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
_MAX_SIDE_FILE = 64 * 1024 * 1024
# Files that describe a source checkpoint rather than the model: never shipped to the coordinator.
_NOT_SHIPPED = {"prepared.json"}


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
        files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"{self.directory}: no *.safetensors files; "
                f"run `fragsim prepare --model {self.directory}` to convert it"
            )
        self.tensors: dict[str, TensorLocation] = {}
        for fname in files:
            for loc in _read_locations(self.directory, fname):
                if loc.name in self.tensors:
                    raise ValueError(
                        f"tensor {loc.name} appears in {self.tensors[loc.name].file} and {fname}; expected once"
                    )
                self.tensors[loc.name] = loc
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

    def close(self) -> None:
        for mapping in self._maps.values():
            if mapping is not None:
                try:
                    mapping.close()
                except BufferError:  # zmq may still hold a zero-copy frame; the OS unmaps at exit
                    pass
        self._maps.clear()


def _read_locations(directory: Path, fname: str) -> list[TensorLocation]:
    path = directory / fname
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: {len(prefix)} bytes, expected a safetensors file")
        length = int.from_bytes(prefix, "little")
        data_start, header = parse_header(prefix + fh.read(min(length, 100 * 1024 * 1024)))
        size = os.fstat(fh.fileno()).st_size
    out = []
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if data_start + end > size:
            raise ValueError(f"{path}: tensor {name} ends at {data_start + end}, past the file size {size}")
        out.append(TensorLocation(name, fname, data_start + begin, end - begin, info["dtype"], tuple(info["shape"])))
    return out
