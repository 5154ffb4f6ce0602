"""The Sandbox: the only way fragsim's coordinator touches the disk.

Paths come from the network, so each one is validated lexically (``split_rel``)
and then reached through a symlink-refusing fd walk (``paths.open_dir``);
operations act on the final name relative to its parent's fd. Missing parent
directories are created by writes, each one checked on the way down.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from . import files, paths
from .errors import EscapeError, QuotaExceeded, SandboxError, oserrors_as
from .files import PartialFile
from .paths import RelPath

_NEW_FILE = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Sandbox:
    """A directory that nothing written through this object can leave."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        quota_bytes: int | None = None,
        create: bool = False,
    ) -> None:
        if quota_bytes is not None and quota_bytes < 0:
            raise SandboxError(f"quota_bytes={quota_bytes}: expected None or a non-negative byte count")
        raw = os.fspath(root)
        if not isinstance(raw, str) or not raw or "\0" in raw:
            raise SandboxError(f"root {raw!r}: expected a non-empty str path without NUL")
        if create:
            with oserrors_as(raw, "create sandbox root"):
                os.makedirs(raw, exist_ok=True)
        # Resolved once: the root is trusted configuration, everything below it is not.
        resolved = Path(os.path.realpath(raw))
        if not resolved.is_dir():
            raise SandboxError(f"root {raw!r} (resolved {str(resolved)!r}): expected an existing directory")
        self.root: Path = resolved
        self.quota_bytes: int | None = quota_bytes
        self.used_bytes: int = 0
        # The coordinator serves agents concurrently; reservations must not interleave.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Sandbox({str(self.root)!r}, used_bytes={self.used_bytes}, quota_bytes={self.quota_bytes})"

    # -- quota ---------------------------------------------------------------

    @contextlib.contextmanager
    def _reserve(self, rel: RelPath, nbytes: int) -> Iterator[None]:
        """Charge ``nbytes`` before touching the disk; refund if the operation fails."""
        with self._lock:
            if self.quota_bytes is not None and self.used_bytes + nbytes > self.quota_bytes:
                raise QuotaExceeded(os.fspath(rel), nbytes, self.used_bytes, self.quota_bytes)
            self.used_bytes += nbytes
        try:
            yield
        except BaseException:
            with self._lock:
                self.used_bytes -= nbytes
            raise

    # -- paths ---------------------------------------------------------------

    def _path(self, parts: paths.Parts) -> Path:
        return self.root.joinpath(*parts)

    def resolve(self, rel: RelPath) -> Path:
        """Absolute path of ``rel`` inside root, after lstat-checking every existing component.

        Only valid as of the check; the sandbox's own methods re-walk by fd.
        """
        parts = paths.split_rel(rel)
        paths.existing_depth(self.root, rel, parts)
        return self._path(parts)

    def exists(self, rel: RelPath) -> bool:
        parts = paths.split_rel(rel)
        return paths.existing_depth(self.root, rel, parts, strict=False) == len(parts)

    def mkdir(self, rel: RelPath, *, exist_ok: bool = True) -> Path:
        parts = paths.split_rel(rel)
        if not parts:
            if exist_ok:
                return self.root
            raise SandboxError(f"mkdir {os.fspath(rel)!r}: is the root, which exists; expected a new directory")
        name = parts[-1]
        with oserrors_as(rel, "mkdir"), paths.parent_fd(self.root, rel, parts, create=True) as dfd:
            try:
                os.mkdir(name, 0o755, dir_fd=dfd)
            except FileExistsError:
                st = paths.lstat_at(dfd, name)
                if st is not None and stat.S_ISLNK(st.st_mode):
                    raise EscapeError(
                        f"mkdir {os.fspath(rel)!r}: is a symlink; expected no symlinks inside the sandbox"
                    ) from None
                if st is not None and not stat.S_ISDIR(st.st_mode):
                    raise SandboxError(
                        f"mkdir {os.fspath(rel)!r}: exists as {stat.filemode(st.st_mode)}; expected a directory"
                    ) from None
                if not exist_ok:
                    raise SandboxError(
                        f"mkdir {os.fspath(rel)!r}: already exists; expected it not to (exist_ok=False)"
                    ) from None
        return self._path(parts)

    def listdir(self, rel: RelPath = ".") -> list[str]:
        parts = paths.split_rel(rel)
        fd = paths.open_dir(self.root, rel, parts)
        try:
            with oserrors_as(rel, "listdir"):
                return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def disk_free(self) -> int:
        with oserrors_as(self.root, "disk_usage"):
            return shutil.disk_usage(self.root).free

    # -- whole-file writes and reads ------------------------------------------

    def write_bytes(
        self, rel: RelPath, data: bytes | bytearray | memoryview, *, durable: bool = True, mode: int = 0o644
    ) -> Path:
        """Atomically replace ``rel`` with ``data``: readers see the old file or the new one, never half.

        With ``durable`` the data and the rename are fsynced before returning. ``mode`` 0o600 keeps
        secrets (CURVE keys) owner-only from the first byte written.
        """
        parts = paths.split_rel(rel)
        paths.require_name(rel, parts)
        view = memoryview(data).cast("B")
        name = parts[-1]
        shown = os.fspath(rel)
        with self._reserve(rel, len(view)), oserrors_as(rel, "write"):
            with paths.parent_fd(self.root, rel, parts, create=True) as dfd:
                _refuse_non_file(dfd, name, shown, "write")
                # Same directory as the target so os.replace never crosses filesystems.
                tmp = f".{name[:200]}.{secrets.token_hex(8)}.sbtmp"
                fd = os.open(tmp, os.O_WRONLY | _NEW_FILE, mode, dir_fd=dfd)
                try:
                    os.fchmod(fd, mode)  # the umask must not widen or narrow what was asked
                    try:
                        files.write_all(fd, view, shown)
                        if durable:
                            files.fsync_fd(fd, shown)
                    finally:
                        os.close(fd)
                    os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=dfd)
                    raise
                if durable:
                    files.fsync_fd(dfd, shown)
        return self._path(parts)

    def write_text(self, rel: RelPath, text: str, *, encoding: str = "utf-8", durable: bool = True) -> Path:
        return self.write_bytes(rel, text.encode(encoding), durable=durable)

    def write_json(self, rel: RelPath, obj: Any, *, durable: bool = True) -> Path:
        return self.write_text(rel, json.dumps(obj, indent=2, sort_keys=False) + "\n", durable=durable)

    def read_bytes(self, rel: RelPath) -> bytes:
        with self.open_read(rel) as handle:
            return handle.read_at(0, handle.size)

    def open_append(self, rel: RelPath) -> TextIO:
        """Line-buffered UTF-8 text stream appending to ``rel`` (JSON-lines logs).

        Appends are not counted against the quota: only the coordinator's own
        log lines go here, never agent-sized payloads.
        """
        parts = paths.split_rel(rel)
        paths.require_name(rel, parts)
        shown = os.fspath(rel)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        with oserrors_as(rel, "append"), paths.parent_fd(self.root, rel, parts, create=True) as dfd:
            fd, _ = files.open_regular(dfd, parts[-1], flags, shown, "append", mode=0o644)
            try:
                return os.fdopen(fd, "a", buffering=1, encoding="utf-8")
            except BaseException:
                os.close(fd)
                raise

    def open_log(self, rel: RelPath) -> TextIO:
        """Append to a JSON-lines log; a killed writer's half line is ended first, so the
        next line starts clean and a reader sees exactly one truncated line."""
        dangling = False
        if self.exists(rel):
            with self.open_read(rel) as handle:
                dangling = handle.size > 0 and handle.read_at(handle.size - 1, 1) != b"\n"
        stream = self.open_append(rel)
        if dangling:
            stream.write("\n")
        return stream

    # -- random-access files ---------------------------------------------------

    def create_file(self, rel: RelPath, size: int, *, exist_ok: bool = False) -> PartialFile:
        """A file of exactly ``size`` bytes, blocks reserved up front so ENOSPC shows now, not mid-transfer.

        ``exist_ok`` reopens a same-sized regular file (resuming after a crash)
        without charging the quota again.
        """
        parts = paths.split_rel(rel)
        paths.require_name(rel, parts)
        shown = os.fspath(rel)
        if not isinstance(size, int) or size < 0:
            raise SandboxError(f"create_file {shown!r}: size={size!r}; expected a non-negative int")
        if paths.existing_depth(self.root, rel, parts) == len(parts):
            if not exist_ok:
                raise SandboxError(f"create_file {shown!r}: already exists; expected it not to (exist_ok=False)")
            return self._reopen(rel, parts, expected_size=size)
        with self._reserve(rel, size), oserrors_as(rel, "create_file"):
            with paths.parent_fd(self.root, rel, parts, create=True) as dfd:
                fd = os.open(parts[-1], os.O_RDWR | _NEW_FILE, 0o644, dir_fd=dfd)
                try:
                    _preallocate(fd, size)
                except BaseException:
                    os.close(fd)
                    with contextlib.suppress(OSError):
                        os.unlink(parts[-1], dir_fd=dfd)
                    raise
        return PartialFile(fd, self._path(parts), size)

    def open_file(self, rel: RelPath) -> PartialFile:
        """Reopen an existing regular file read/write, at its current size."""
        parts = paths.split_rel(rel)
        paths.require_name(rel, parts)
        return self._reopen(rel, parts, expected_size=None)

    def open_read(self, rel: RelPath) -> PartialFile:
        """Open an existing regular file read-only (hard links allowed: snapshots share inodes)."""
        parts = paths.split_rel(rel)
        paths.require_name(rel, parts)
        shown = os.fspath(rel)
        with oserrors_as(rel, "open"), paths.parent_fd(self.root, rel, parts) as dfd:
            fd, st = files.open_regular(dfd, parts[-1], os.O_RDONLY, shown, "open", allow_links=True)
        return PartialFile(fd, self._path(parts), st.st_size)

    def _reopen(self, rel: RelPath, parts: paths.Parts, expected_size: int | None) -> PartialFile:
        shown = os.fspath(rel)
        with oserrors_as(rel, "open"), paths.parent_fd(self.root, rel, parts) as dfd:
            fd, st = files.open_regular(dfd, parts[-1], os.O_RDWR, shown, "open")
        if expected_size is not None and st.st_size != expected_size:
            os.close(fd)
            raise SandboxError(
                f"create_file {shown!r}: existing file has {st.st_size} bytes; expected {expected_size} to resume"
            )
        return PartialFile(fd, self._path(parts), st.st_size)

    # -- publishing and cleanup --------------------------------------------------

    def promote(self, src_rel: RelPath, dst_rel: RelPath) -> Path:
        """Publish a finished file or directory tree: fsync its contents, then rename it into place.

        The rename is the commit point; a crash before it leaves ``dst`` absent,
        never partially written.
        """
        sp, dp = paths.split_rel(src_rel), paths.split_rel(dst_rel)
        paths.require_name(src_rel, sp)
        paths.require_name(dst_rel, dp)
        src_shown, dst_shown = os.fspath(src_rel), os.fspath(dst_rel)
        if dp[: len(sp)] == sp:
            raise SandboxError(
                f"promote {src_shown!r} -> {dst_shown!r}: destination is inside the source; expected disjoint paths"
            )
        with oserrors_as(src_rel, "promote"), paths.parent_fd(self.root, src_rel, sp) as sfd:
            st = paths.lstat_at(sfd, sp[-1])
            if st is None:
                raise SandboxError(f"promote: source {src_shown!r} does not exist; expected a file or directory")
            files.fsync_tree(sfd, sp[-1], "/".join(sp[:-1]))
            with paths.parent_fd(self.root, dst_rel, dp, create=True) as dfd:
                files.rename_noreplace(sfd, sp[-1], dfd, dp[-1], dst_shown)
                files.fsync_fd(dfd, dst_shown)
                if not os.path.samestat(os.fstat(sfd), os.fstat(dfd)):
                    files.fsync_fd(sfd, src_shown)
        return self._path(dp)

    def hardlink(self, src_rel: RelPath, dst_rel: RelPath) -> Path:
        """Give an existing regular file a second name inside root: no copy, no quota."""
        sp, dp = paths.split_rel(src_rel), paths.split_rel(dst_rel)
        paths.require_name(src_rel, sp)
        paths.require_name(dst_rel, dp)
        src_shown, dst_shown = os.fspath(src_rel), os.fspath(dst_rel)
        with oserrors_as(src_rel, "hardlink"), paths.parent_fd(self.root, src_rel, sp) as sfd:
            st = paths.lstat_at(sfd, sp[-1])
            if st is None:
                raise SandboxError(f"hardlink: source {src_shown!r} does not exist; expected a regular file")
            if stat.S_ISLNK(st.st_mode):
                raise EscapeError(f"hardlink: source {src_shown!r} is a symlink; expected a regular file")
            if not stat.S_ISREG(st.st_mode):
                raise SandboxError(
                    f"hardlink: source {src_shown!r} has mode {stat.filemode(st.st_mode)}; expected a regular file"
                )
            with paths.parent_fd(self.root, dst_rel, dp, create=True) as dfd:
                try:
                    # follow_symlinks=False: if src is swapped for a symlink after the
                    # lstat, link the symlink itself rather than whatever it points at.
                    os.link(sp[-1], dp[-1], src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
                except FileExistsError:
                    raise SandboxError(
                        f"hardlink: destination {dst_shown!r} already exists; expected it not to exist"
                    ) from None
                files.fsync_fd(dfd, dst_shown)
        return self._path(dp)

    def remove(self, rel: RelPath, *, missing_ok: bool = False) -> None:
        """Delete a file, symlink or directory tree; symlinks are unlinked, never followed."""
        parts = paths.split_rel(rel)
        paths.require_name(rel, parts)
        shown = os.fspath(rel)
        # A symlink on the way is refused, so nothing is ever deleted "through" one;
        # a symlink as the last component is just a name here and gets unlinked.
        if paths.existing_depth(self.root, rel, parts, final_link_ok=True) < len(parts):
            if missing_ok:
                return
            raise SandboxError(f"remove {shown!r}: does not exist; expected a file or directory")
        with oserrors_as(rel, "remove"):
            dfd = paths.open_dir(self.root, rel, parts[:-1])
            try:
                files.rmtree_at(dfd, parts[-1])
            finally:
                os.close(dfd)


def _refuse_non_file(dfd: int, name: str, shown: str, op: str) -> None:
    """Replacing a symlink or directory by name is never what a caller meant."""
    st = paths.lstat_at(dfd, name)
    if st is None or stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISLNK(st.st_mode):
        raise EscapeError(f"{op} {shown!r}: is a symlink; expected a regular file or nothing")
    raise SandboxError(f"{op} {shown!r}: exists as {stat.filemode(st.st_mode)}; expected a regular file or nothing")


def _preallocate(fd: int, size: int) -> None:
    if size == 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        # Some filesystems (and some container overlays) lack fallocate; a sparse
        # file is still the right size, it just defers ENOSPC to the writes.
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)
