"""Exception hierarchy for the sandbox.

Every failure leaves through a ``SandboxError`` so the coordinator can catch one
type and still tell an attack (``EscapeError``) from a full disk
(``DiskFullError``) when reporting to the operator.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator


class SandboxError(Exception):
    """Base class; the message names the offending path and what was expected."""


class EscapeError(SandboxError):
    """The path would leave (or could be redirected out of) the sandbox root."""


class QuotaExceeded(SandboxError):
    """Writing ``requested`` more bytes would push ``used`` past ``quota``."""

    def __init__(self, path: str, requested: int, used: int, quota: int) -> None:
        self.path = path
        self.requested = requested
        self.used = used
        self.quota = quota
        super().__init__(
            f"{path!r}: writing {requested} bytes would exceed the sandbox quota "
            f"({used} of {quota} bytes already used, {max(quota - used, 0)} left)"
        )


class DiskFullError(SandboxError):
    """The filesystem ran out of space (ENOSPC) or the user's disk quota (EDQUOT)."""


class PermissionDeniedError(SandboxError):
    """The OS refused the operation (EACCES, EPERM, or a read-only filesystem)."""


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}


def from_oserror(exc: OSError, path: object, op: str) -> SandboxError:
    """Map an OSError onto the sandbox hierarchy; the caller chains it with ``from``.

    ``path`` is what the caller asked for (relative to the root), which is more
    useful in a report than the absolute path the kernel saw.
    """
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    msg = f"{op} {str(path)!r} failed: {reason}"
    if exc.errno in _DISK_FULL:
        return DiskFullError(msg + " (expected free space on the run directory's filesystem)")
    if exc.errno in _PERMISSION:
        return PermissionDeniedError(msg + " (expected the run directory to be writable)")
    if exc.errno == errno.ELOOP:
        # O_NOFOLLOW reports a symlink this way; it is an escape attempt, not an I/O fault.
        return EscapeError(msg + " (expected no symlinks inside the sandbox)")
    if exc.errno == errno.ENOENT:
        return SandboxError(msg + " (expected it to exist)")
    if exc.errno == errno.EEXIST:
        return SandboxError(msg + " (expected it not to exist)")
    return SandboxError(msg)


@contextlib.contextmanager
def oserrors_as(path: object, op: str) -> Iterator[None]:
    """Re-raise any OSError escaping the block as the matching SandboxError."""
    try:
        yield
    except OSError as exc:
        raise from_oserror(exc, path, op) from exc
