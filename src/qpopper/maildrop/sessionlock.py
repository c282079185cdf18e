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

On storage several hosts share (`shared-storage`), the OFD lock is not
relied on alone: it holds across hosts only where NFS locking works (NFSv4,
or NFSv3 with lockd), and a mount with `nolock` or `local_lock` keeps it on
one host without a word. The session lock then also takes an owner file,
`<lock file>.owner`, made and judged as the mbox dotlock is (link(2) and
the link count, which every NFS version honours): it records the pid and
the host, a holder's process touches it every minute while the session
lasts, and another session breaks it only when it is stale: untouched for
stale-age (5 minutes: a host that died), or naming a process of this host
that is gone (a kill -9 here).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import threading
import time

from ..errors import MaildropBusy, MaildropError
from .dotlock import REFRESH_INTERVAL, STALE_AGE, DotLock

log = logging.getLogger(__name__)

OWNER_SUFFIX = ".owner"

# struct flock for F_OFD_SETLK (l_type, l_whence, l_start, l_len, l_pid),
# whole file: the two requests every session makes, packed once.
_OFD = hasattr(fcntl, "F_OFD_SETLK")
_FLOCK = "hhqqi"
_LOCK_REQUEST = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
_UNLOCK_REQUEST = struct.pack(_FLOCK, fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0)

# Start-overs after finding the locked file unlinked: each one means another
# session ended in between, so a few cover any real contention.
_MAX_ATTEMPTS = 20


def _lock_fd(fd: int) -> bool:
    """Take an exclusive lock on `fd` without waiting; False if held."""
    try:
        if _OFD:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _LOCK_REQUEST)
        else:  # pragma: no cover - non-Linux fallback
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class _Refresher:
    """Touches every owner file this process holds, once a REFRESH_INTERVAL,
    from one daemon thread started with the first: a session idles for up
    to ten minutes, and a lock untouched for stale-age is a dead host's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: set[DotLock] = set()
        self._thread: threading.Thread | None = None
        self.interval = REFRESH_INTERVAL
        os.register_at_fork(after_in_child=self._forget)  # a child holds none of its parent's

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._held = set()
        self._thread = None

    def add(self, owner: DotLock) -> None:
        with self._lock:
            self._held.add(owner)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="session-lock-refresh", daemon=True)
                self._thread.start()

    def remove(self, owner: DotLock) -> None:
        """After this, the thread no longer touches `owner` (so it may be released)."""
        with self._lock:
            self._held.discard(owner)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            with self._lock:
                if not self._held:
                    self._thread = None
                    return
                for owner in list(self._held):
                    try:
                        owner.refresh()
                    except (MaildropError, OSError) as exc:
                        # Broken as stale by another host: the session goes on, and
                        # its UPDATE still takes the spool's own locks.
                        log.error("session lock: %s", exc)
                        self._held.discard(owner)


_refresher = _Refresher()


class SessionLock:
    """Held from login until the session ends; `release` is idempotent.

    `shared`: the storage is shared by several hosts, and the owner file
    (see the module's docstring) is taken as well as the OFD lock."""

    def __init__(
        self, path: str, remove: bool = True, shared: bool = False, stale_age: float = STALE_AGE,
        check_pid: bool = True,
    ) -> None:
        self.path = path
        self.remove = remove  # unlink the file at release (see the module's docstring)
        self._fd: int | None = None
        self.owner = DotLock(path, stale_age, check_pid, path=path + OWNER_SUFFIX) if shared else None

    def acquire(self) -> None:
        for _ in range(_MAX_ATTEMPTS):
            fd = self._open()
            try:
                if not _lock_fd(fd):
                    raise MaildropBusy()
                # A file nobody removes needs no check that it is still the one named.
                if not self.remove or self._names(fd):
                    self._take_owner()
                    self._fd = fd
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the holder removed it after we opened it: try the new one
        raise MaildropBusy()

    def _take_owner(self) -> None:
        """The owner file too, on shared storage: MaildropBusy if a live
        session of any host has it (a stale one is broken first)."""
        owner = self.owner
        if owner is None:
            return
        if not owner.try_acquire() and not (owner.break_if_stale() and owner.try_acquire()):
            raise MaildropBusy()
        _refresher.add(owner)

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
            if self.owner is not None:  # first, while the OFD lock still excludes this host's sessions
                _refresher.remove(self.owner)
                try:
                    self.owner.release()
                except OSError:
                    pass
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
                if _OFD:
                    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _UNLOCK_REQUEST)
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
