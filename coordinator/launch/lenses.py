"""Where a model's tuned lens is cached (`fragsim lens fit` writes it) and how a run gets its
own copy: the coordinator reads only its run directory."""

from __future__ import annotations

from pathlib import Path

from coordinator.launch.prepare import checkpoint_files, source_digest
from sandbox import Sandbox
from sandbox.layout import BASELINE_LENS

LENSES_DIR = "lenses"


def lens_key(model_dir: Path) -> str:
    """The model's source digest (config and weights): a lens is for one model's exact bytes."""
    return source_digest(checkpoint_files(model_dir), model_dir)


def lens_path(artifacts: Path, model_dir: Path) -> Path:
    return Path(artifacts) / LENSES_DIR / f"{lens_key(model_dir)[:32]}.safetensors"


def store_lens(box: Sandbox, artifacts: Path, model_dir: Path) -> Path | None:
    """Copy the model's cached lens into the run, if `fragsim lens fit` made one; its path."""
    folder = Path(artifacts) / LENSES_DIR
    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        return None  # no lens at all: the source is not hashed for nothing
    path = lens_path(artifacts, model_dir)
    if not path.is_file():
        return None
    box.write_bytes(BASELINE_LENS, path.read_bytes())
    return path
