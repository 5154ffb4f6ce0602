"""fd-level file primitives: pre-allocated random-access files and tree helpers.

Everything here works on fds that ``paths`` already obtained without following
symlinks, so none of it ever resolves a name from the root again.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

from .errors import DiskFullError, EscapeError, SandboxError, from_oserror

# O_NONBLOCK keeps a planted FIFO from hanging the coordinator in open(); it is
# cleared again once fstat has proven the fd is a regular file.
_OPEN_CHECKED = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def open_regular(
    dfd: int,
    name: str,
    flags: int,
    rel: str,
    op: str,
    *,
    mode: int = 0o644,
    allow_links: bool = False,
) -> tuple[int, os.stat_result]:
    """Open ``name`` in ``dfd`` refusing symlinks, non-regular files and (unless allowed) hard links.

    A file with st_nlink > 1 may share its inode with a file outside the root
    (``ln /etc/passwd run/log``); writing through it would write outside.
    Reading is allowed through links because ``Sandbox.hardlink`` makes them.
    """
    try:
        fd = os.open(name, flags | _OPEN_CHECKED, mode, dir_fd=dfd)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # FIFO with no reader, only possible with O_NONBLOCK
            raise SandboxError(f"{op} {rel!r}: is a FIFO; expected a regular file") from exc
        raise from_oserror(exc, rel, op) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SandboxError(f"{op} {rel!r}: mode {stat.filemode(st.st_mode)}; expected a regular file")
        if st.st_nlink > 1 and not allow_links:
            raise EscapeError(
                f"{op} {rel!r}: has {st.st_nlink} hard links; expected exactly 1 "
                "(a second link may live outside the sandbox)"
            )
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def write_all(fd: int, data: memoryview, rel: str) -> None:
    """os.write until every byte is out; a short write is normal, a zero write is not."""
    done = 0
    while done < len(data):
        try:
            n = os.write(fd, data[done:])
        except OSError as exc:
            raise from_oserror(exc, rel, "write") from exc
        if n == 0:
            raise _stalled(rel, done, len(data))
        done += n


def _stalled(rel: str, done: int, total: int) -> DiskFullError:
    # write(2) returning 0 for a non-empty buffer only happens when the device is out of space.
    return DiskFullError(f"write {rel!r} stalled after {done} of {total} bytes; expected the full write to succeed")


def fsync_fd(fd: int, rel: str) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        raise from_oserror(exc, rel, "fsync") from exc


def fsync_tree(dfd: int, name: str, rel: str) -> None:
    """fsync every regular file and directory under ``name``, refusing symlinks.

    A published tree must not contain a symlink: the sandbox never makes one,
    so finding one means something else tampered with the staging area.
    """
    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    shown = f"{rel}/{name}" if rel else name
    if stat.S_ISLNK(st.st_mode):
        raise EscapeError(f"promote: {shown!r} is a symlink; expected only regular files and directories")
    if stat.S_ISREG(st.st_mode):
        fd = os.open(name, os.O_RDONLY | _OPEN_CHECKED, dir_fd=dfd)
        try:
            fsync_fd(fd, shown)
        finally:
            os.close(fd)
        return
    if not stat.S_ISDIR(st.st_mode):
        raise SandboxError(
            f"promote: {shown!r} has mode {stat.filemode(st.st_mode)}; expected only regular files and directories"
        )
    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    try:
        for child in sorted(os.listdir(sub)):
            fsync_tree(sub, child, shown)
        fsync_fd(sub, shown)
    finally:
        os.close(sub)


_RENAME_NOREPLACE = 1  # from <linux/fs.h>
_libc: ctypes.CDLL | None = None


def _renameat2() -> Callable[..., int] | None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return getattr(_libc, "renameat2", None)


def rename_noreplace(sfd: int, sname: str, dfd: int, dname: str, shown_dst: str) -> None:
    """rename(2) that fails if the destination exists, atomically where the kernel allows.

    A lstat-then-rename would let a concurrent writer's file be silently
    replaced; renameat2(RENAME_NOREPLACE) closes that window. Filesystems that
    lack it (EINVAL) fall back to the check, which is still right single-threaded.
    """
    exists_msg = f"promote: destination {shown_dst!r} already exists; expected it not to exist"
    fn = _renameat2()
    if fn is not None:
        rc = fn(sfd, os.fsencode(sname), dfd, os.fsencode(dname), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise SandboxError(exists_msg)
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), sname)
    try:
        os.stat(dname, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
        return
    raise SandboxError(exists_msg)


def rmtree_at(dfd: int, name: str) -> None:
    """Delete ``name`` in ``dfd`` recursively; symlinks are unlinked, never followed."""
    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dfd)
        return
    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    try:
        for child in os.listdir(sub):
            rmtree_at(sub, child)
    finally:
        os.close(sub)
    os.rmdir(name, dir_fd=dfd)


class PartialFile:
    """A fixed-size file being filled at arbitrary offsets (e.g. weight shards arriving out of order).

    Writes beyond ``size`` are refused so a hostile sender cannot grow the file
    past what the quota was charged for.
    """

    def __init__(self, fd: int, path: Path, size: int) -> None:
        self._fd: int | None = fd
        self.path = path
        self.size = size

    @property
    def closed(self) -> bool:
        return self._fd is None

    def _live_fd(self) -> int:
        if self._fd is None:
            raise SandboxError(f"{str(self.path)!r}: file is closed; expected an open PartialFile")
        return self._fd

    def _check_range(self, op: str, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise SandboxError(
                f"{op} {str(self.path)!r}: range offset={offset} length={length} (end={offset + length}) "
                f"is outside the file; expected 0 <= offset and end <= size={self.size}"
            )

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        fd = self._live_fd()
        view = memoryview(data).cast("B")
        self._check_range("write_at", offset, len(view))
        done = 0
        while done < len(view):
            try:
                n = os.pwrite(fd, view[done:], offset + done)
            except OSError as exc:
                raise from_oserror(exc, self.path, "pwrite") from exc
            if n == 0:
                raise _stalled(str(self.path), done, len(view))
            done += n

    def read_at(self, offset: int, length: int) -> bytes:
        fd = self._live_fd()
        self._check_range("read_at", offset, length)
        chunks = []
        done = 0
        while done < length:
            try:
                chunk = os.pread(fd, length - done, offset + done)
            except OSError as exc:
                raise from_oserror(exc, self.path, "pread") from exc
            if not chunk:
                # Only possible if something outside the sandbox truncated the file.
                raise SandboxError(
                    f"read_at {str(self.path)!r}: hit EOF at {offset + done}; expected {self.size} bytes on disk"
                )
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)

    def iter_chunks(self, chunk: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
        """Yield ``(offset, bytes)`` covering the whole file, for hashing what actually hit the disk."""
        if chunk <= 0:
            raise SandboxError(f"iter_chunks {str(self.path)!r}: chunk={chunk}; expected a positive chunk size")
        for offset in range(0, self.size, chunk):
            yield offset, self.read_at(offset, min(chunk, self.size - offset))

    def fsync(self) -> None:
        fsync_fd(self._live_fd(), str(self.path))

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> PartialFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Leaking fds in a long-running server eventually hits EMFILE; be forgiving.
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"PartialFile({str(self.path)!r}, size={self.size}, {state})"
