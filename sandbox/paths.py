"""Path validation and symlink-proof directory walking.

Checking a path with lstat and then opening it by name leaves a window in which
a directory can be swapped for a symlink. So every mutating operation walks
from the root one component at a time with ``O_NOFOLLOW|O_DIRECTORY`` and then
acts relative to the parent's fd (``dir_fd=``): the kernel, not a prior check,
guarantees that nothing outside the root is reached.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Union

from .errors import EscapeError, SandboxError, from_oserror

RelPath = Union[str, "os.PathLike[str]"]
Parts = tuple[str, ...]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def split_rel(rel: RelPath) -> Parts:
    """Validate ``rel`` and return its components; ``()`` means the root itself.

    Any '..' is refused, even one that would stay inside (``a/../b``): whether
    it stays inside depends on what ``a`` is at the time, which is exactly the
    kind of question we refuse to answer.
    """
    raw = os.fspath(rel)
    if not isinstance(raw, str):
        raise EscapeError(f"path {raw!r}: expected a str relative path, got {type(raw).__name__}")
    if raw == "":
        raise EscapeError("path '': expected a non-empty relative path")
    if "\0" in raw:
        raise EscapeError(f"path {raw!r}: expected no NUL byte")
    if raw.startswith("/"):
        raise EscapeError(f"path {raw!r}: expected a relative path, got an absolute one")
    parts = tuple(p for p in raw.split("/") if p not in ("", "."))
    if ".." in parts:
        raise EscapeError(f"path {raw!r}: expected no '..' component")
    return parts


def require_name(rel: RelPath, parts: Parts) -> None:
    """Refuse operations that would create, replace or delete the root itself."""
    if not parts:
        raise EscapeError(f"path {os.fspath(rel)!r}: expected a path below the root, got the root itself")


def existing_depth(root: Path, rel: RelPath, parts: Parts, *, strict: bool = True, final_link_ok: bool = False) -> int:
    """lstat every existing component below ``root``; return how many exist.

    A symlink anywhere is an escape. The walk stops at the first missing
    component (the rest cannot be a symlink yet), or, when not ``strict``, at
    a non-directory in the middle of the path instead of raising.
    ``final_link_ok`` lets the last component be a symlink, for callers that
    act on the link itself (unlinking it) and never follow it.
    """
    current = root
    for i, name in enumerate(parts):
        current = current / name
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return i
        except OSError as exc:
            raise from_oserror(exc, rel, "lstat") from exc
        shown = "/".join(parts[: i + 1])
        if stat.S_ISLNK(st.st_mode) and not (final_link_ok and i == len(parts) - 1):
            raise EscapeError(
                f"path {os.fspath(rel)!r}: component {shown!r} is a symlink; expected no symlinks inside the sandbox"
            )
        if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            if not strict:
                return i + 1
            raise SandboxError(f"path {os.fspath(rel)!r}: component {shown!r} is not a directory; expected a directory")
    return len(parts)


def open_root(root: Path) -> int:
    try:
        return os.open(root, _DIR_FLAGS)
    except OSError as exc:
        raise from_oserror(exc, str(root), "open sandbox root") from exc


def _open_subdir(dfd: int, name: str, rel: RelPath, shown: str, create: bool) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dfd)
    except FileNotFoundError:
        if not create:
            raise SandboxError(
                f"path {os.fspath(rel)!r}: directory {shown!r} does not exist; expected an existing directory"
            ) from None
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise from_oserror(exc, rel, "open directory") from exc
        _raise_not_a_dir(dfd, name, rel, shown)
    try:
        os.mkdir(name, 0o755, dir_fd=dfd)
    except FileExistsError:
        pass  # lost a race with another creator; the open below re-checks what is there
    except OSError as exc:
        raise from_oserror(exc, rel, "mkdir") from exc
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dfd)
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise from_oserror(exc, rel, "open directory") from exc
        _raise_not_a_dir(dfd, name, rel, shown)
    raise AssertionError("unreachable")


def _raise_not_a_dir(dfd: int, name: str, rel: RelPath, shown: str) -> None:
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except OSError as exc:
        raise from_oserror(exc, rel, "lstat") from exc
    if stat.S_ISLNK(st.st_mode):
        raise EscapeError(
            f"path {os.fspath(rel)!r}: component {shown!r} is a symlink; expected no symlinks inside the sandbox"
        )
    raise SandboxError(f"path {os.fspath(rel)!r}: component {shown!r} is not a directory; expected a directory")


def open_dir(root: Path, rel: RelPath, parts: Parts, *, create: bool = False) -> int:
    """Return an fd for directory ``parts`` below root, refusing symlinks at every step.

    With ``create`` missing directories are made (0o755) as the walk goes.
    """
    fd = open_root(root)
    try:
        for i, name in enumerate(parts):
            nxt = _open_subdir(fd, name, rel, "/".join(parts[: i + 1]), create)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def parent_fd(root: Path, rel: RelPath, parts: Parts, *, create: bool = False) -> Iterator[int]:
    """Yield an fd of the directory holding ``parts[-1]``; closed on exit."""
    fd = open_dir(root, rel, parts[:-1], create=create)
    try:
        yield fd
    finally:
        os.close(fd)


def lstat_at(dfd: int, name: str) -> os.stat_result | None:
    """lstat ``name`` in ``dfd``; None when it does not exist."""
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
