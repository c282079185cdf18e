"""The POP session lock: one POP session per maildrop, across processes.

The lock lives in a file beside (or inside) the maildrop, never only in
process memory, so that worker processes and, on shared storage, other
hosts exclude each other. It is an open-file-description lock (Linux
F_OFD_SETLK): unlike classic fcntl locks it also excludes two sessions of
the same process, it is released by the kernel when the holder dies (no
stale locks after kill -9), and NFS maps it to a POSIX lock.

The file beside an mbox spool is removed when the session ends, so spool
directories do not fill with empty lock files; a Maildir keeps its one lock
file (`remove=False`): creating and removing a file costs the file system's
journal at every login, often more than the rest of a session. Removing a lock file is the classic race (a
second session opens the file, the holder unlinks it, a third creates a
new one: two sessions hold "the" lock). Two rules close it: only the
holder unlinks, and only while it still holds the lock; and a locker,
once it holds the lock, checks that the path still names the file it
locked, and starts over if not. Whoever holds a lock on the file the path
names is then the one session.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from ..errors import MaildropBusy, MaildropError

# struct flock for F_OFD_SETLK: l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = "hhqqi"

# Start-overs after finding the locked file unlinked: each one means another
# session ended in between, so a few cover any real contention.
_MAX_ATTEMPTS = 20


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

    def __init__(self, path: str, remove: bool = True) -> None:
        self.path = path
        self.remove = remove  # unlink the file at release (see the module's docstring)
        self._fd: int | None = None

    def acquire(self) -> None:
        for _ in range(_MAX_ATTEMPTS):
            fd = self._open()
            try:
                if not _lock_fd(fd):
                    raise MaildropBusy()
                # A file nobody removes needs no check that it is still the one named.
                if not self.remove or self._names(fd):
                    self._fd = fd
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the holder removed it after we opened it: try the new one
        raise MaildropBusy()

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise MaildropError(f"cannot open session lock {self.path}: {exc}") from exc

    def _names(self, fd: int) -> bool:
        """True if the path still names the file open on `fd`."""
        try:
            on_path = os.lstat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (on_path.st_dev, on_path.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            # Remove the file while the lock is still ours (see the module's
            # docstring); a directory we may not write keeps it, as before.
            try:
                if self.remove and self._names(fd):
                    os.unlink(self.path)
            except OSError:
                pass
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
