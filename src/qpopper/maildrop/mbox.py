"""mbox spools (/var/mail/USER) served in place, updated by copy and rename.

This is the behaviour qpopper calls server mode, with qpopper's UIDs and
with none of the ways mbox servers lose mail:

* The spool is locked against delivery agents (dotlock + fcntl, see
  `dotlock`) only while it is indexed at login and while it is replaced at
  UPDATE; between the two, MDAs append freely. Mail that arrives during a
  session is not listed (message numbers stay as they were) and is kept
  by UPDATE, so the next session sees it.
* One POP session per spool: an OFD lock on `.<name>.qpopper-pop3.lock`
  in the spool directory (beside the spool, so separate processes and
  hosts sharing the directory exclude each other; the kernel drops it when
  the holder dies, so it never goes stale).
* UPDATE never writes into the spool. Under the locks it copies the kept
  messages and everything appended since login into `.<name>.qpopper-new`
  in the same directory, with the spool's owner, group and mode, fsyncs
  it, renames it over the spool and fsyncs the directory. Killed at any
  instant, it leaves either the old spool or the new one, and the next
  login cleans up the half-written copy. If nothing was deleted nothing
  is written. Before writing it checks that the spool is still the file it
  indexed and was only appended to (same inode, not shorter, every From_
  line where it was); otherwise it refuses rather than cut messages at
  stale offsets. Free space is checked first; any failure leaves the old
  spool and raises MaildropError (SYS/TEMP).
* Messages are read with pread on the descriptor opened at login, never
  through a long-lived mapping: another program truncating the spool
  would turn a read of a mapping into SIGBUS for the whole server process.

Cost in I/O: login reads the spool once (mapped, under the locks); RETR
reads what it sends; UPDATE with deletions writes the whole kept spool
once (in-kernel copy_file_range where available), plus two fsyncs. That
is the price of never rewriting in place.

Renaming over the spool is safe against every writer that takes the
dotlock before opening the spool (postfix local, procmail, exim, Dovecot
LDA, mutt). A writer configured for fcntl locking only (postfix virtual's
default `virtual_mailbox_lock = fcntl`) could open the old file while we
hold the locks and append to it after the rename; configure such writers
with a dotlock too.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator, Sequence, Set
from dataclasses import dataclass

from ..errors import MaildropError, ResponseCode
from ._base import MessageInfo
from .dotlock import LOCK_TIMEOUT, STALE_AGE, SpoolLock
from .mboxindex import MAX_FROM_LINE, MboxIndex, fingerprint, index_file, is_from_line, read_exact
from .sessionlock import SessionLock

log = logging.getLogger(__name__)

SESSION_LOCK_SUFFIX = ".qpopper-pop3.lock"
NEW_SPOOL_SUFFIX = ".qpopper-new"
FREE_SPACE_MARGIN = 1 << 20  # keep a megabyte spare for the MDAs
COPY_CHUNK = 8 << 20


def session_lock_path(spool: str) -> str:
    """`/var/mail/.alice.qpopper-pop3.lock` for `/var/mail/alice`."""
    directory, name = os.path.split(spool)
    return os.path.join(directory, f".{name}{SESSION_LOCK_SUFFIX}")


def new_spool_path(spool: str) -> str:
    """Where UPDATE writes the replacement spool before renaming it.

    One fixed name per spool is unique among writers because only the
    holder of the session lock writes it; a crash leaves at most this one
    file, which the next session removes.
    """
    directory, name = os.path.split(spool)
    return os.path.join(directory, f".{name}{NEW_SPOOL_SUFFIX}")


@dataclass(frozen=True, slots=True)
class _Copy:
    offset: int
    length: int


Piece = _Copy | bytes


class MboxMaildrop:
    """An open mbox spool; holds the POP session lock until closed."""

    def __init__(
        self,
        path: str,
        *,
        lock_timeout: float = LOCK_TIMEOUT,
        stale_age: float = STALE_AGE,
        check_pid: bool = True,
        use_content_length: bool = True,
    ) -> None:
        self.path = os.path.abspath(path)
        self._dir = os.path.dirname(self.path)
        self._lock_timeout = lock_timeout
        self._stale_age = stale_age
        self._check_pid = check_pid
        self._use_content_length = use_content_length
        self._session: SessionLock | None = None
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None
        self._index = MboxIndex()
        self._infos: list[MessageInfo] = []
        self._committed = False
        if not os.path.isdir(self._dir):
            return  # no spool directory: an empty maildrop with nothing to lock
        session = SessionLock(session_lock_path(self.path))
        session.acquire()
        try:
            self._remove_leftover()
            self._open_and_index()
        except BaseException:
            session.release()
            self._close_fd()
            raise
        self._session = session

    # ---- login -------------------------------------------------------------

    def _remove_leftover(self) -> None:
        """Delete the half-written copy of an UPDATE that was killed."""
        try:
            os.unlink(new_spool_path(self.path))
            log.warning("removed unfinished update copy of %s", self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise MaildropError(f"cannot remove {new_spool_path(self.path)}: {exc}") from exc

    def _open_spool(self) -> int | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            code = ResponseCode.SYS_PERM if exc.errno == errno.ELOOP else ResponseCode.SYS_TEMP
            raise MaildropError(f"cannot open spool {self.path}: {exc}", code) from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise MaildropError(f"spool {self.path} is not a regular file", ResponseCode.SYS_PERM)
        return fd

    def _open_and_index(self) -> None:
        for _ in range(5):
            fd = self._open_spool()
            if fd is None:
                return  # no mail ever delivered: empty maildrop
            self._fd = fd
            with self._spool_lock(fd) as lock:
                st = os.fstat(fd)
                if not self._path_is(st):
                    self._close_fd()  # replaced between open and lock: start over
                    continue
                try:
                    self._index = index_file(
                        fd, st.st_size, use_content_length=self._use_content_length, tick=lock.refresh
                    )
                except (OSError, ValueError) as exc:
                    raise MaildropError(f"cannot index {self.path}: {exc}") from exc
            self._ident = (st.st_dev, st.st_ino)
            idx = self._index
            self._infos = [MessageInfo(size=s, uid=u, seen=r) for s, u, r in zip(idx.sizes, idx.uids, idx.seen)]
            return
        raise MaildropError(f"spool {self.path} kept being replaced while opening it")

    def _spool_lock(self, fd: int) -> SpoolLock:
        """Dotlock + fcntl on the spool, for indexing or UPDATE only."""
        return SpoolLock(
            self.path, fd, timeout=self._lock_timeout, stale_age=self._stale_age, check_pid=self._check_pid
        )

    def _path_is(self, st: os.stat_result) -> bool:
        try:
            now = os.lstat(self.path)
        except FileNotFoundError:
            return False
        return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)

    # ---- the Maildrop interface ------------------------------------------------

    def messages(self) -> Sequence[MessageInfo]:
        return self._infos

    def read(self, index: int, chunk_size: int = 65536) -> Iterator[bytes]:
        if self._fd is None:
            raise MaildropError(f"{self.path} is closed")
        fd = self._fd
        pos, end = self._index.starts[index], self._index.ends[index]
        while pos < end:
            try:
                data = os.pread(fd, min(chunk_size, end - pos), pos)
            except OSError as exc:
                raise MaildropError(f"cannot read {self.path}: {exc}") from exc
            if not data:
                raise MaildropError(f"{self.path} shrank while message {index + 1} was read")
            pos += len(data)
            yield data

    def commit(self, deleted: Set[int], retrieved: Set[int]) -> None:
        drop = {i for i in deleted if 0 <= i < len(self._index)}
        if not drop or self._fd is None:
            return  # nothing to remove, nothing to write
        if self._committed:
            raise MaildropError(f"{self.path} was already updated in this session")
        with self._spool_lock(self._fd) as lock:
            current = self._verify_unchanged()
            pieces = self._plan(drop, current)
            self._check_space(sum(p.length if isinstance(p, _Copy) else len(p) for p in pieces))
            self._replace(pieces, lock)
        self._committed = True

    def close(self) -> None:
        self._close_fd()
        if self._session is not None:
            session, self._session = self._session, None
            session.release()

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    # ---- UPDATE ----------------------------------------------------------------

    def _verify_unchanged(self) -> int:
        """The spool's current length, after proving it was only appended to."""
        assert self._fd is not None
        st = os.fstat(self._fd)
        if not self._path_is(st) or (st.st_dev, st.st_ino) != self._ident:
            raise MaildropError(f"{self.path} was replaced by another program during the session; not updating")
        if st.st_size < self._index.length:
            raise MaildropError(f"{self.path} shrank during the session; not updating")
        fd = self._fd
        try:
            now = fingerprint(lambda a, n: read_exact(fd, a, n), self._index)
        except (OSError, EOFError) as exc:
            raise MaildropError(f"cannot re-read {self.path}: {exc}") from exc
        if now != self._index.fingerprint:
            raise MaildropError(f"{self.path} was rewritten by another program during the session; not updating")
        return st.st_size

    def _plan(self, drop: set[int], current: int) -> list[Piece]:
        """What the new spool is made of: kept segments, then new mail.

        Adjacent kept segments become one copy. A From_ line is always
        written after an empty line, adding one where a writer left none
        (this changes no message: that line is the format's).
        """
        idx = self._index
        pieces: list[Piece] = []
        end_bytes = b""  # the last (up to) three bytes written so far
        for i in range(len(idx)):
            if i in drop:
                continue
            a, b = idx.from_starts[i], idx.seg_ends[i]
            last = pieces[-1] if pieces else None
            if isinstance(last, _Copy) and last.offset + last.length == a:
                pieces[-1] = _Copy(last.offset, b - last.offset)
            else:
                if a != idx.starts[i]:  # a segment that starts with a From_ line
                    self._separate(pieces, end_bytes)
                pieces.append(_Copy(a, b - a))
            end_bytes = self._pread(max(0, b - 3), min(3, b))
        if current > idx.length:
            new = _Copy(idx.length, current - idx.length)
            head = self._pread(new.offset, min(new.length, MAX_FROM_LINE + 64))
            stripped = head.lstrip(b"\r\n")
            if is_from_line(stripped.split(b"\n", 1)[0] + b"\n"):
                skip = len(head) - len(stripped)
                new = _Copy(new.offset + skip, new.length - skip)
                self._separate(pieces, end_bytes)
            pieces.append(new)
        return pieces

    @staticmethod
    def _separate(pieces: list[Piece], end_bytes: bytes) -> None:
        """Add the empty line a From_ line must follow, if it is missing."""
        if not pieces or end_bytes.endswith((b"\n\n", b"\n\r\n")):
            return
        pieces.append(b"\n" if end_bytes.endswith(b"\n") else b"\n\n")

    def _pread(self, offset: int, n: int) -> bytes:
        assert self._fd is not None
        try:
            return read_exact(self._fd, offset, n)
        except (OSError, EOFError) as exc:
            raise MaildropError(f"cannot read {self.path}: {exc}") from exc

    def _check_space(self, needed: int) -> None:
        try:
            vfs = os.statvfs(self._dir)
        except OSError as exc:
            raise MaildropError(f"cannot statvfs {self._dir}: {exc}") from exc
        available = vfs.f_bavail * vfs.f_frsize
        if available < needed + FREE_SPACE_MARGIN:
            raise MaildropError(f"not enough space in {self._dir} to update {self.path}: need {needed}, have {available}")

    def _replace(self, pieces: list[Piece], lock: SpoolLock) -> None:
        assert self._fd is not None
        st = os.fstat(self._fd)
        tmp = new_spool_path(self.path)
        out: int | None = None
        try:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            _copy_owner_and_mode(out, st)
            for piece in pieces:
                if isinstance(piece, _Copy):
                    self._copy(out, piece, lock)
                else:
                    _write_all(out, piece)
            os.fsync(out)
            os.close(out)
            out = None
            os.rename(tmp, self.path)
        except (OSError, MaildropError) as exc:
            if out is not None:
                os.close(out)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(exc, MaildropError):
                raise
            what = "quota exceeded" if exc.errno == errno.EDQUOT else str(exc)
            raise MaildropError(f"cannot update {self.path}: {what}") from exc
        except BaseException:
            if out is not None:
                os.close(out)
            raise
        _fsync_dir(self._dir)

    def _copy(self, out: int, piece: _Copy, lock: SpoolLock) -> None:
        """Copy a range of the spool, in the kernel where it can."""
        assert self._fd is not None
        offset, left = piece.offset, piece.length
        use_kernel = hasattr(os, "copy_file_range")
        while left > 0:
            lock.refresh()
            n = min(left, COPY_CHUNK)
            if use_kernel:
                try:
                    done = os.copy_file_range(self._fd, out, n, offset)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    use_kernel = False
                    continue
                if done == 0:
                    raise MaildropError(f"{self.path} shrank during update")
            else:
                data = self._pread(offset, n)
                _write_all(out, data)
                done = len(data)
            offset += done
            left -= done


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _copy_owner_and_mode(fd: int, st: os.stat_result) -> None:
    """Give the new spool the old one's owner, group and permissions.

    Without root only the group can change (to one we belong to); that is
    all a user-run session needs, since the file is already its own. The
    mode is set after the owner because chown clears set-id bits.
    """
    try:
        os.fchown(fd, st.st_uid, st.st_gid)
    except PermissionError:
        try:
            os.fchown(fd, -1, st.st_gid)
        except PermissionError:
            pass
    os.fchmod(fd, stat.S_IMODE(st.st_mode))


def _fsync_dir(directory: str) -> None:
    """Make the rename durable: the new name must survive a power cut."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise MaildropError(f"cannot open {directory} to fsync it: {exc}") from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise MaildropError(f"fsync of {directory} failed: {exc}") from exc
    finally:
        os.close(fd)
