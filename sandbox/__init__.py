"""Confined disk access for the coordinator: every byte fragsim writes goes through here.

Nothing reachable through this package can create, modify or delete anything
outside the Sandbox root: paths are validated lexically, then reached by a
symlink-refusing fd walk, and hard-linked files are refused for writing.
"""

from .errors import (
    DiskFullError,
    EscapeError,
    PermissionDeniedError,
    QuotaExceeded,
    SandboxError,
)
from .files import PartialFile
from .sandbox import Sandbox

__all__ = [
    "DiskFullError",
    "EscapeError",
    "PartialFile",
    "PermissionDeniedError",
    "QuotaExceeded",
    "Sandbox",
    "SandboxError",
]
