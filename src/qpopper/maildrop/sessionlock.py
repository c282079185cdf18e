"""The POP session lock: one POP session per maildrop, across processes.

The lock lives in a file beside (or inside) the maildrop, never only in
process memory, so that worker processes and, on shared storage, other
hosts exclude each other. It is an open-file-description lock (Linux
F_OFD_SETLK): unlike classic fcntl locks it also excludes two sessions of
the same process, it is released by the kernel when the holder dies (no
stale locks after kill -9), and NFS maps it to a POSIX lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from ..errors import MaildropBusy, MaildropError

# struct flock for F_OFD_SETLK: l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = "hhqqi"


def _lock_fd(fd: int) -> bool:
    """Take an exclusive lock on `fd` without waiting; False if held."""
    try:
        if hasattr(fcntl, "F_OFD_SETLK"):
            request = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
        else:  # pragma: no cover - non-Linux fallback
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class SessionLock:
    """Held from login until the session ends; `release` is idempotent."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise MaildropError(f"cannot open session lock {self.path}: {exc}") from exc
        try:
            if not _lock_fd(fd):
                raise MaildropBusy()
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            # Unlock explicitly: a child forked meanwhile shares the open
            # file description, and a mere close would leave it locked
            # until that child exits or execs.
            try:
                if hasattr(fcntl, "F_OFD_SETLK"):
                    request = struct.pack(_FLOCK, fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0)
                    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
                else:  # pragma: no cover - non-Linux fallback
                    fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:
                pass
            os.close(fd)

    def __enter__(self) -> SessionLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
