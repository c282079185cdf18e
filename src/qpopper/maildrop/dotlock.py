"""Locking an mbox spool the way Debian's delivery agents do.

Every program that writes /var/mail/USER (postfix local, procmail, exim,
Dovecot's LDA, mutt) takes the dotlock `USER.lock` in the spool directory,
and most also take an fcntl lock on the spool itself. A reader or rewriter
that wants to exclude them has to take both, and has to take them exactly
the way they do, or the exclusion silently fails:

* The dotlock is made NFS-safely, as liblockfile does: write a uniquely
  named file beside the lock, link(2) it to the lock name, and trust the
  link count of the unique file rather than link's return value (which
  NFS may get wrong after a retransmission). On a local file system this
  is equivalent to O_EXCL.
* A dotlock left by a crashed holder must not lock the user out. Like
  liblockfile's maillock(3), a lock older than five minutes is stale, and
  so is a lock whose recorded holder process no longer exists. Holders
  therefore refresh (touch) the lock during long operations; we do it at
  least every minute.
* The fcntl lock is an open-file-description lock where the kernel has
  them (Linux): it conflicts with the classic POSIX locks the MDAs take,
  but unlike those it is not dropped when this process closes some other
  descriptor of the same file, and two sessions in one process exclude
  each other.
* The two are taken all-or-nothing with a short randomised back-off: if
  the second cannot be had, the first is released before waiting. The
  MDAs disagree on the order (Debian policy says fcntl first, procmail and
  exim take the dotlock first), and holding one while waiting for the
  other is how two such programs deadlock.

The whole wait is bounded; running out of time is a temporary failure
(`-ERR [SYS/TEMP]`), never a hang.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import socket
import stat
import struct
import time
from types import TracebackType

from ..errors import MaildropError, ResponseCode, WouldBlock

log = logging.getLogger(__name__)

STALE_AGE = 300.0  # liblockfile: a dotlock untouched for 5 minutes is stale
REFRESH_INTERVAL = 60.0  # touch a held dotlock at least this often
LOCK_TIMEOUT = 30.0  # give up (SYS/TEMP) after waiting this long in total

# struct flock for F_OFD_SETLK: l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = "hhqqi"


# Seconds after which a dotlock with more than one name cannot be one
# that is still being made (link, then unlink of the temporary name).
PLANTED_AGE = 5.0


def dotlock_path(spool: str) -> str:
    """The dotlock name every MDA uses for `spool`."""
    return spool + ".lock"


def _this_host() -> bytes:
    return socket.gethostname().encode("ascii", "replace").replace(b" ", b"_")[:64] or b"localhost"


def _lock_content() -> bytes:
    """What our dotlocks hold: the pid, as liblockfile writes it, and the
    host, so that on shared storage another host does not judge our pid
    by its own processes (readers that take only the number still work)."""
    return b"%d %s\n" % (os.getpid(), _this_host())


def _pid_of_holder(path: str) -> int | None:
    """The process id a lock file records, if it records one of this host.

    liblockfile writes the holder's pid as text, this module the pid and
    the host; postfix and others leave the file empty. An empty or
    unreadable lock, or one made on another host (its pid means nothing
    here), tells us nothing, and only its age can make it stale.
    """
    try:
        with open(path, "rb") as f:
            text = f.read(128)
    except OSError:
        return None
    fields = text.split()
    if len(fields) > 1 and fields[1] != _this_host():
        return None
    try:
        pid = int(fields[0] if fields else b"0")
    except ValueError:
        return None
    return pid if pid > 0 else None


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # exists, owned by someone else
    return False


class DotLock:
    """The `<spool>.lock` file, created and judged as liblockfile does.

    `check_pid` lets a lock whose recorded holder is gone be broken at once
    (liblockfile does this); switch it off where MDAs run in another pid
    namespace than this server, because their pids mean nothing here.
    """

    def __init__(
        self, spool: str, stale_age: float = STALE_AGE, check_pid: bool = True, path: str | None = None
    ) -> None:
        """`path`: the lock's own name, where it is not the MDAs' `<spool>.lock`
        (the session lock's owner file); its temporary names go beside `spool`."""
        self.spool = spool
        self.path = dotlock_path(spool) if path is None else path
        self.stale_age = stale_age
        self.check_pid = check_pid
        # (inode, ctime) of the lock we made: an inode number alone can be
        # reused at once by a lock someone else made after breaking ours.
        self._stamp: tuple[int, int] | None = None
        self._touched = 0.0

    def _unique_name(self) -> str:
        directory, name = os.path.split(self.spool)
        host = socket.gethostname().replace("/", "_")[:64]
        token = os.urandom(4).hex()
        return os.path.join(directory, f".{name}.lk{os.getpid()}.{host}.{token}")

    def try_acquire(self) -> bool:
        """One attempt: True if the lock is now ours, False if it is held.

        Raises MaildropError when the lock cannot be made at all (for
        example the directory is not writable), because waiting would not
        help.
        """
        tmp = self._unique_name()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise MaildropError(f"cannot create dotlock for {self.spool}: {exc}") from exc
        try:
            try:
                os.write(fd, _lock_content())
            except OSError as exc:  # a full disk, a quota
                raise MaildropError(f"cannot write dotlock for {self.spool}: {exc}") from exc
            finally:
                os.close(fd)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                pass
            except OSError as exc:
                # NFS may report an error for a link that was made; the link
                # count below decides. Anything else is a real failure.
                if exc.errno not in (errno.EIO, errno.EINTR, errno.ETIMEDOUT):
                    raise MaildropError(f"cannot create dotlock {self.path}: {exc}") from exc
            st = os.lstat(tmp)
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if st.st_nlink != 2:
            return False
        try:
            now = os.lstat(self.path)
        except FileNotFoundError:
            return False  # broken as stale at once by someone else
        if now.st_ino != st.st_ino:
            return False
        self._stamp = (now.st_ino, now.st_ctime_ns)
        self._touched = time.monotonic()
        return True

    def break_if_stale(self) -> bool:
        """Remove the lock if it is stale; True if it is now gone.

        The lock is re-examined just before it is removed, so a lock that
        its holder refreshed or that a new holder took in the meantime is
        left alone (the window left is the one every MDA has).
        """
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return True
        age = time.time() - st.st_mtime
        reason = None
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
            reason = "not a lock file (a link or a special file planted there)"
        elif st.st_nlink > 1 and age > PLANTED_AGE:
            # A lock being made has two names for an instant, never longer.
            reason = f"a second name for another file ({st.st_nlink} links)"
        elif age > self.stale_age:
            reason = f"untouched for {age:.0f}s"
        elif self.check_pid:
            pid = _pid_of_holder(self.path)
            if pid is not None and pid != os.getpid() and _process_gone(pid):
                reason = f"holder pid {pid} is gone"
        if reason is None:
            return False
        try:
            again = os.lstat(self.path)
        except FileNotFoundError:
            return True
        if (again.st_ino, again.st_mtime_ns) != (st.st_ino, st.st_mtime_ns):
            return False
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return True
        except OSError as exc:
            raise MaildropError(f"cannot remove stale dotlock {self.path}: {exc}") from exc
        log.warning("removed stale dotlock %s (%s)", self.path, reason)
        return True

    def still_ours(self) -> bool:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        return self._stamp == (st.st_ino, st.st_ctime_ns)

    def refresh(self) -> None:
        """Touch the lock so no MDA judges it stale; fail if it was broken."""
        if self._stamp is None:
            return
        if not self.still_ours():
            self._stamp = None
            raise MaildropError(f"dotlock {self.path} was broken by another program")
        os.utime(self.path)
        st = os.lstat(self.path)
        self._stamp = (st.st_ino, st.st_ctime_ns)
        self._touched = time.monotonic()

    def refresh_if_due(self, interval: float = REFRESH_INTERVAL) -> None:
        if self._stamp is not None and time.monotonic() - self._touched >= interval:
            self.refresh()

    def release(self) -> None:
        """Remove the lock, but only if it is still the one we made."""
        if self._stamp is None:
            return
        ours = self.still_ours()
        self._stamp = None
        if ours:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def fcntl_try_lock(fd: int, exclusive: bool) -> bool:
    """Take a whole-file fcntl lock on `fd` without waiting; False if held."""
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    try:
        if hasattr(fcntl, "F_OFD_SETLK"):
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, kind, os.SEEK_SET, 0, 0, 0))
        else:  # pragma: no cover - non-Linux: classic POSIX lock
            fcntl.lockf(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise MaildropError(f"fcntl lock failed: {exc}") from exc
    return True


def fcntl_unlock(fd: int) -> None:
    try:
        if hasattr(fcntl, "F_OFD_SETLK"):
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0))
        else:  # pragma: no cover
            fcntl.lockf(fd, fcntl.LOCK_UN)
    except OSError:
        pass  # closing the descriptor releases it in any case


class SpoolLock:
    """Dotlock plus fcntl lock on an open spool, held for one short operation.

    `fd` is the spool opened for reading; the fcntl lock taken on it is a
    read lock, which is all a copy-and-rename writer needs: it excludes
    every appender (they take write locks) and never writes to the spool
    file itself, so the spool need not be opened for writing. Use as a
    context manager around indexing and around UPDATE; call `refresh` in
    long loops.
    """

    def __init__(
        self,
        spool: str,
        fd: int,
        *,
        timeout: float = LOCK_TIMEOUT,
        stale_age: float = STALE_AGE,
        check_pid: bool = True,
        exclusive: bool = False,
        wait: bool = True,
    ) -> None:
        self.dotlock = DotLock(spool, stale_age=stale_age, check_pid=check_pid)
        self.fd = fd
        self.timeout = timeout
        self.exclusive = exclusive
        self.wait = wait  # False: one attempt, WouldBlock if the spool is locked
        self._fcntl_held = False

    def acquire(self) -> None:
        if not self.wait:
            if self.dotlock.try_acquire():
                if fcntl_try_lock(self.fd, self.exclusive):
                    self._fcntl_held = True
                    return
                self.dotlock.release()
            raise WouldBlock(f"{self.dotlock.spool} is locked")
        deadline = time.monotonic() + self.timeout
        delay = 0.005
        while True:
            if self.dotlock.try_acquire():
                if fcntl_try_lock(self.fd, self.exclusive):
                    self._fcntl_held = True
                    return
                self.dotlock.release()  # never wait while holding half the locks
            elif self.dotlock.break_if_stale():
                continue
            if time.monotonic() >= deadline:
                raise MaildropError(
                    f"{self.dotlock.spool} stayed locked for {self.timeout:.0f}s", ResponseCode.SYS_TEMP
                )
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.25)

    def refresh(self) -> None:
        """Keep the dotlock fresh during a long operation (cheap to call often)."""
        self.dotlock.refresh_if_due()

    def release(self) -> None:
        if self._fcntl_held:
            self._fcntl_held = False
            fcntl_unlock(self.fd)
        self.dotlock.release()

    def __enter__(self) -> SpoolLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
