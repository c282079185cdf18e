"""mbox spools (/var/mail/USER): qpopper's server mode and temp-drop mode.

Both modes give the same guarantees, and neither ever rewrites a spool in
place:

* The spool is locked against delivery agents (dotlock + fcntl, see
  `dotlock`) only while it is read at login and while it is replaced at
  UPDATE; between the two, MDAs append freely. Mail that arrives during a
  session is not listed (message numbers stay as they were) and is kept
  by UPDATE, behind the kept messages, so the next session sees it.
* One POP session per spool: an OFD lock on `.<name>.qpopper-pop3.lock`
  in the spool directory (beside the spool, so separate processes and
  hosts sharing the directory exclude each other; the kernel drops it when
  the holder dies, so it never goes stale).
* UPDATE writes the new spool to `.<name>.qpopper-new` in the spool's
  directory, with the spool's owner, group and mode, fsyncs it, renames
  it over the spool and fsyncs the directory. Free space is checked
  first; any failure leaves the old spool and raises MaildropError
  (SYS/TEMP). Messages are read with pread on a descriptor opened at
  login, never through a long-lived mapping (a truncation by another
  program would turn that into SIGBUS for the whole server).
* A kill -9 at any instant leaves every message exactly once in the spool
  plus the temp drop, and the next login (in either mode) recovers.

**Server mode** (`server_mode`, qpopper's `-S`) serves the spool in place.
UPDATE writes only when something changed (a deletion, or with
`update_status_headers` a message retrieved for the first time); before
writing it checks that the spool is the file it indexed and was only
appended to (same inode, not shorter, every From_ line where it was),
otherwise it refuses rather than cut messages at stale offsets.
I/O: login reads the spool once (mapped, under the locks); RETR reads what
it sends; UPDATE with changes writes the whole kept spool once (in-kernel
copy_file_range where available) plus two fsyncs; a session that changed
nothing writes nothing.

**Temp-drop mode** (qpopper's default) moves the spool's content to the
temp drop `<temp_dir or spool dir>/.<name>.pop` at login, under the spool
locks, and serves from there; the spool is left empty for new mail. At
UPDATE (and when a session ends without UPDATE, as qpopper's restore) the
kept messages go back in front of whatever arrived meanwhile, and the
temp drop is removed (emptied with `keep_temp_drop`).
I/O: login reads the spool and writes it to the temp drop (plus a hash
pass over it, three fsyncs and a truncation); UPDATE writes the kept
messages and the new mail to a new spool (two fsyncs) *every* session,
changed or not. `fast_update` replaces both copies by rename(2) where it
can (the temp drop is empty at login, resp. nothing arrived, nothing was
deleted and no header changed at UPDATE, and both are on one file
system): then a session costs no copy at all. Temp-drop mode therefore
costs about two spool copies per session, server mode at most one and
usually none; temp-drop mode's benefit is that an MUA reading the spool
directly sees only new mail during a POP session.

Crash safety of temp-drop mode. Moving mail between two files cannot be
one atomic step, so each two-file step has a small journal file, and the
next login (under the session lock, before anything else) finishes or
undoes the step:

* Login (`.<temp>.qpopper-gather`, beside the temp drop): 1. record the
  temp drop's length L (file written whole and renamed into place);
  2. append the spool's N bytes to the temp drop, fsync; 3. record L, N
  and a BLAKE2b digest of those N spool bytes; 4. truncate the spool
  (fsync); 5. remove the journal. Recovery: if the journal has no digest
  (crash before 3) or the spool still begins with exactly the digested
  bytes (crash before 4 completed), the mail is still in the spool:
  truncate the temp drop back to L. Otherwise the spool was emptied after
  the append was durable: keep the temp drop. The test "the spool still
  holds those bytes" cannot lose mail: when it says yes, the bytes are
  there.
* UPDATE (`.<name>.qpopper-putback`, beside the spool): 1. write and fsync
  the new spool `.<name>.qpopper-new`; 2. create the flag (fsync dir);
  3. rename the new spool over the spool (fsync dir); 4. remove the temp
  drop; 5. remove the flag. Recovery with the flag present: if
  `.<name>.qpopper-new` still exists the rename did not happen, so remove
  the flag and then the copy (in that order) and keep the temp drop;
  otherwise the spool holds the messages, so remove the temp drop.
* A temp drop found at login without journals is a complete maildrop of a
  dead session: temp-drop mode appends the spool to it (as qpopper
  does); server mode first puts it back into the spool, so switching
  modes never strands mail.

The rename at UPDATE (and fast_update's renames) is safe against every
writer that takes the dotlock before opening the spool (postfix local,
procmail, exim, Dovecot LDA, mutt). A writer configured for fcntl locking
only (postfix virtual's default `virtual_mailbox_lock = fcntl`) could
open the old file while we hold the locks and append to it after the
rename; configure such writers with a dotlock too.

Status and X-UIDL write-back (`update_status_headers`, qpopper's default
on). UIDs stay qpopper's deterministic ones (reference 4.4, computed as
with the option off), so a UID never depends on whether a write-back
happened; a message without an X-UIDL header is listed with the size it
has with `X-UIDL: <uid>` as its first header line (so is a copy whose
copied X-UIDL had to get a suffix to be unique), RETR and TOP send it
so, and UPDATE writes it there whenever the spool is written anyway (then
the UID survives any later change to the hashed headers or to the order
of twin copies, and LIST sizes stay the same across sessions). A message
retrieved in the session for the first time gets `Status: RO` (its
Status lines replaced), which also makes UPDATE write in server mode:
each message causes at most one such write. qpopper's `Status: U` for
untouched messages is not written (no client reads it).

UW-IMAP's folder-internal-data message (`uw_kluge`) is hidden from the
listing when it is the first message and matches two of qpopper's three
signs; it stays in the spool.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import stat
from array import array
from collections.abc import Iterator, Set
from contextlib import contextmanager
from dataclasses import dataclass, replace

from ..errors import MaildropError, ResponseCode, WouldBlock
from ._base import MaildropSettings, MessageList
from .dotlock import SpoolLock
from .fsutil import fsync_dir, give_owner
from .mboxindex import (
    MAX_FROM_LINE,
    MAX_HEADER_PARSE,
    XUIDL_MAX,
    XUIDL_MIN,
    MboxIndex,
    fingerprint,
    index_file,
    is_from_line,
    read_exact,
    work_out_uids,
)
from .sessionlock import SessionLock

log = logging.getLogger(__name__)

SESSION_LOCK_SUFFIX = ".qpopper-pop3.lock"
NEW_SPOOL_SUFFIX = ".qpopper-new"
PUTBACK_SUFFIX = ".qpopper-putback"
GATHER_SUFFIX = ".qpopper-gather"
FREE_SPACE_MARGIN = 1 << 20  # keep a megabyte spare for the MDAs
COPY_CHUNK = 8 << 20
# A quick open (on the event loop) indexes spools up to this size: about a
# millisecond of work.
QUICK_SPOOL_BYTES = 512 * 1024

_UW_SUBJECT = re.compile(
    rb"^Subject: [^\n]*(?:DO NOT DELETE|DON'T DELETE THIS MESSAGE|FOLDER INTERNAL DATA)", re.MULTILINE | re.IGNORECASE
)
_UW_XIMAP = re.compile(rb"^X-IMAP: ", re.MULTILINE | re.IGNORECASE)
_UW_FROM = re.compile(rb"^From: Mail System Internal Data", re.MULTILINE | re.IGNORECASE)


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


def putback_flag_path(spool: str) -> str:
    """The flag that says a temp drop is being written back to `spool`."""
    directory, name = os.path.split(spool)
    return os.path.join(directory, f".{name}{PUTBACK_SUFFIX}")


def temp_drop_path(spool: str, settings: MaildropSettings) -> str:
    """qpopper's temp drop: `<temp_dir or spool dir>/<temp_name % name>`."""
    directory, name = os.path.split(os.path.abspath(spool))
    template = settings.temp_name
    if template.count("%s") != 1 or "/" in template or "\0" in template:
        raise MaildropError(f"temp-name {template!r} must hold one %s and no slash", ResponseCode.SYS_PERM)
    tname = template.replace("%s", name)
    if tname in (".", "..", name) and not settings.temp_dir:
        raise MaildropError(f"temp-name {template!r} names the spool itself", ResponseCode.SYS_PERM)
    tdir = settings.temp_dir or directory
    if not os.path.isabs(tdir):
        raise MaildropError(f"temp-dir {tdir!r} is not absolute", ResponseCode.SYS_PERM)
    path = os.path.join(os.path.normpath(tdir), tname)
    if path == os.path.abspath(spool):
        raise MaildropError(f"temp drop {path} would be the spool itself", ResponseCode.SYS_PERM)
    return path


def gather_journal_path(temp_drop: str) -> str:
    return temp_drop + GATHER_SUFFIX


@dataclass(frozen=True, slots=True)
class _Copy:
    fd: int
    offset: int
    length: int


Piece = _Copy | bytes


def _uids_from_file(index: MboxIndex, fd: int | None, path: str) -> list[str]:
    if fd is None:
        return []
    try:
        return work_out_uids(index, lambda a, n: read_exact(fd, a, n))
    except (OSError, EOFError, ValueError) as exc:
        raise MaildropError(f"cannot read {path} for its UIDs: {exc}", ResponseCode.SYS_TEMP) from exc


class MboxMaildrop:
    """An open mbox spool; holds the POP session lock until closed.

    `settings` carries the site's choices (lock timing, server or temp-drop
    mode, write-back); the keyword arguments override single fields of it
    and are kept for callers that set only those.
    """

    # Slots: hundreds of idle sessions each hold one of these.
    __slots__ = ("settings", "path", "_dir", "temp_drop", "_tdir", "_session", "_fd", "_ident", "_index",
                 "_infos", "_hidden", "_xuidl", "_committed", "_returned")

    def __init__(
        self,
        path: str,
        settings: MaildropSettings | None = None,
        *,
        lock_timeout: float | None = None,
        stale_age: float | None = None,
        check_pid: bool | None = None,
        use_content_length: bool | None = None,
        quick: bool = False,
    ) -> None:
        s = settings or MaildropSettings()
        s = replace(
            s,
            lock_timeout=s.lock_timeout if lock_timeout is None else lock_timeout,
            stale_age=s.stale_age if stale_age is None else stale_age,
            check_pid=s.check_pid if check_pid is None else check_pid,
            use_content_length=s.use_content_length if use_content_length is None else use_content_length,
        )
        self.settings = s
        self.path = os.path.abspath(path)
        self._dir = os.path.dirname(self.path)
        self.temp_drop = temp_drop_path(self.path, s)
        self._tdir = os.path.dirname(self.temp_drop)
        self._session: SessionLock | None = None
        self._fd: int | None = None  # the file served: spool or temp drop
        self._ident: tuple[int, int] | None = None
        self._index = MboxIndex()
        self._infos = MessageList((), ())
        self._hidden = 0  # 1 when UW-IMAP's internal message is hidden
        self._xuidl: dict[int, bytes] = {}  # internal index -> X-UIDL line to add
        self._committed = False
        self._returned = False  # temp drop written back (temp-drop mode)
        if not os.path.isdir(self._dir):
            return  # no spool directory: an empty maildrop with nothing to lock
        if quick and not s.server_mode:
            raise WouldBlock("temp-drop mode copies the spool")
        session = SessionLock(session_lock_path(self.path))
        session.acquire()
        try:
            if not quick:
                self._recover()
            elif self._recovery_pending():
                raise WouldBlock(f"{self.path}: an earlier session left work to finish")
            if s.server_mode:
                self._open_and_index(quick)
            else:
                self._gather()
                self._open_temp_drop()
            self._prepare_listing()
        except BaseException:
            session.release()
            self._close_fd()
            raise
        self._session = session

    # ---- recovery (under the session lock, before anything else) -------------

    def _recover(self) -> None:
        self._resolve_putback_flag()
        self._remove_leftover()
        self._resolve_gather_journal()
        if self.settings.server_mode:
            self._restore_leftover_temp_drop()

    def _recovery_pending(self) -> bool:
        """Whether `_recover` would find anything (server mode)."""
        journal = gather_journal_path(self.temp_drop)
        leftovers = (putback_flag_path(self.path), new_spool_path(self.path), journal, journal + ".tmp", self.temp_drop)
        return any(os.path.lexists(p) for p in leftovers)

    def _resolve_putback_flag(self) -> None:
        flag = putback_flag_path(self.path)
        if not os.path.lexists(flag):
            return
        if os.path.lexists(new_spool_path(self.path)):
            # Killed before the rename: the temp drop still holds the mail.
            # The flag goes first, so a crash now cannot make the copy's
            # later absence look like a finished rename.
            _unlink(flag)
            fsync_dir(self._dir)
            log.warning("%s: undid an unfinished write-back of the temp drop", self.path)
        else:
            # Killed after the rename: the spool holds the mail.
            self._drop_temp_drop()
            _unlink(flag)
            fsync_dir(self._dir)
            log.warning("%s: finished a write-back of the temp drop", self.path)

    def _remove_leftover(self) -> None:
        """Delete the half-written copy of an UPDATE that was killed."""
        try:
            os.unlink(new_spool_path(self.path))
            log.warning("removed unfinished update copy of %s", self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise MaildropError(f"cannot remove {new_spool_path(self.path)}: {exc}") from exc

    def _resolve_gather_journal(self) -> None:
        journal = gather_journal_path(self.temp_drop)
        _unlink_quietly(journal + ".tmp")
        try:
            with open(journal, "rb") as f:
                text = f.read(4096)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise MaildropError(f"cannot read {journal}: {exc}") from exc
        fields = text.split()
        try:
            length = int(fields[0])
            moved = int(fields[1]) if len(fields) > 1 else None
            digest = bytes.fromhex(fields[2].decode()) if len(fields) > 2 else None
        except (IndexError, ValueError) as exc:
            raise MaildropError(f"{journal} is damaged; not touching {self.path} or {self.temp_drop}") from exc
        undo = True
        if moved is not None and digest is not None:
            with self._spool_locked(create=False) as (fd, _lock):
                undo = fd is not None and self._begins_with(fd, moved, digest)
        if undo:
            self._truncate_temp_drop(length)
            log.warning("%s: undid an unfinished move into %s", self.path, self.temp_drop)
        else:
            log.warning("%s: finished a move into %s", self.path, self.temp_drop)
        _unlink(journal)
        fsync_dir(self._tdir)

    @staticmethod
    def _begins_with(fd: int, n: int, digest: bytes) -> bool:
        if os.fstat(fd).st_size < n:
            return False
        h = hashlib.blake2b(digest_size=32)
        pos = 0
        while pos < n:
            data = os.pread(fd, min(COPY_CHUNK, n - pos), pos)
            if not data:
                return False
            h.update(data)
            pos += len(data)
        return h.digest() == digest

    def _truncate_temp_drop(self, length: int) -> None:
        try:
            fd = os.open(self.temp_drop, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise MaildropError(f"cannot open {self.temp_drop}: {exc}") from exc
        try:
            if os.fstat(fd).st_nlink != 1:
                raise MaildropError(f"temp drop {self.temp_drop} has other names", ResponseCode.SYS_PERM)
            os.ftruncate(fd, length)
            os.fsync(fd)
        except OSError as exc:
            raise MaildropError(f"cannot truncate {self.temp_drop}: {exc}") from exc
        finally:
            os.close(fd)

    def _drop_temp_drop(self) -> None:
        """Remove the temp drop (or empty it, with keep_temp_drop)."""
        if self.settings.keep_temp_drop:
            self._truncate_temp_drop(0)
        else:
            try:
                os.unlink(self.temp_drop)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise MaildropError(f"cannot remove {self.temp_drop}: {exc}") from exc
        fsync_dir(self._tdir)

    def _restore_leftover_temp_drop(self) -> None:
        """Server mode: put a temp drop left by a temp-drop session back."""
        fd = _open_regular(self.temp_drop)
        if fd is None:
            return
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return
            log.warning("%s: putting back the temp drop %s of an earlier session", self.path, self.temp_drop)
            try:
                index = index_file(fd, size, use_content_length=self.settings.use_content_length)
            except (OSError, ValueError) as exc:
                raise MaildropError(f"cannot index {self.temp_drop}: {exc}") from exc
            self._put_back(fd, index, set(), {}, set())
        finally:
            os.close(fd)

    # ---- login -------------------------------------------------------------

    def _open_spool(self, *, create: bool = False, writable: bool = False) -> int | None:
        flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        flags |= os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT
        try:
            fd = os.open(self.path, flags, 0o600)
        except FileNotFoundError:
            return None
        except PermissionError:
            if not writable:
                raise MaildropError(f"cannot open spool {self.path}: permission denied") from None
            return self._open_spool(create=create, writable=False)
        except OSError as exc:
            code = ResponseCode.SYS_PERM if exc.errno == errno.ELOOP else ResponseCode.SYS_TEMP
            raise MaildropError(f"cannot open spool {self.path}: {exc}", code) from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise MaildropError(f"spool {self.path} is not a regular file", ResponseCode.SYS_PERM)
        return fd

    @contextmanager
    def _spool_locked(self, *, create: bool, writable: bool = False) -> Iterator[tuple[int | None, SpoolLock | None]]:
        """The spool opened and locked (dotlock + fcntl), or None if missing."""
        for _ in range(5):
            fd = self._open_spool(create=create, writable=writable)
            if fd is None:
                yield None, None
                return
            try:
                with self._spool_lock(fd) as lock:
                    if not self._path_is(os.fstat(fd)):
                        continue  # replaced between open and lock: start over
                    yield fd, lock
                    return
            finally:
                os.close(fd)
        raise MaildropError(f"spool {self.path} kept being replaced while opening it")

    def _open_and_index(self, quick: bool = False) -> None:
        for _ in range(5):
            fd = self._open_spool()
            if fd is None:
                return  # no mail ever delivered: empty maildrop
            self._fd = fd
            if quick and os.fstat(fd).st_size > QUICK_SPOOL_BYTES:
                raise WouldBlock(f"{self.path} is too big to index on the event loop")
            with self._spool_lock(fd, wait=not quick) as lock:
                st = os.fstat(fd)
                if not self._path_is(st):
                    self._close_fd()  # replaced between open and lock: start over
                    continue
                try:
                    self._index = index_file(
                        fd, st.st_size, use_content_length=self.settings.use_content_length, tick=lock.refresh
                    )
                except (OSError, ValueError) as exc:
                    raise MaildropError(f"cannot index {self.path}: {exc}") from exc
            self._ident = (st.st_dev, st.st_ino)
            return
        raise MaildropError(f"spool {self.path} kept being replaced while opening it")

    def _gather(self) -> None:
        """Temp-drop mode: move the spool's content to the end of the temp drop."""
        if not os.path.isdir(self._tdir):
            raise MaildropError(f"temp-drop directory {self._tdir} does not exist")
        try:
            tfd = os.open(self.temp_drop, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            code = ResponseCode.SYS_PERM if exc.errno == errno.ELOOP else ResponseCode.SYS_TEMP
            raise MaildropError(f"cannot open temp drop {self.temp_drop}: {exc}", code) from exc
        try:
            tst = os.fstat(tfd)
            if not stat.S_ISREG(tst.st_mode) or tst.st_nlink != 1:
                raise MaildropError(f"temp drop {self.temp_drop} is not a plain file of its own", ResponseCode.SYS_PERM)
            with self._spool_locked(create=False, writable=True) as (sfd, lock):
                if sfd is None or lock is None:
                    return
                sst = os.fstat(sfd)
                moved = sst.st_size
                if moved == 0:
                    return
                length = os.fstat(tfd).st_size
                if self.settings.fast_update and length == 0 and self._same_fs():
                    self._gather_by_rename(sst)
                    return
                self._gather_by_copy(sfd, sst, tfd, length, moved, lock)
        finally:
            os.close(tfd)

    def _same_fs(self) -> bool:
        try:
            return os.stat(self._dir).st_dev == os.stat(self._tdir).st_dev
        except OSError:
            return False

    def _gather_by_rename(self, sst: os.stat_result) -> None:
        """fast_update at login: the spool becomes the temp drop (one rename)."""
        try:
            os.rename(self.path, self.temp_drop)
        except OSError as exc:
            raise MaildropError(f"cannot move {self.path} to {self.temp_drop}: {exc}") from exc
        fsync_dir(self._tdir)
        if self._tdir != self._dir:
            fsync_dir(self._dir)
        self._recreate_empty_spool(sst)

    def _recreate_empty_spool(self, sst: os.stat_result) -> None:
        """An empty spool with the old owner and mode, unless an MDA made one."""
        tmp = new_spool_path(self.path)
        _unlink_quietly(tmp)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                _copy_owner_and_mode(fd, sst)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                pass
            os.unlink(tmp)
            fsync_dir(self._dir)
        except OSError as exc:
            _unlink_quietly(tmp)
            log.warning("cannot recreate the empty spool %s (the next delivery will): %s", self.path, exc)

    def _gather_by_copy(self, sfd: int, sst: os.stat_result, tfd: int, length: int, moved: int, lock: SpoolLock) -> None:
        journal = gather_journal_path(self.temp_drop)
        self._check_space(self._tdir, moved + 2)
        _write_journal(journal, b"%d\n" % length)
        fsync_dir(self._tdir)
        h = hashlib.blake2b(digest_size=32)
        try:
            head = read_exact(sfd, 0, min(moved, MAX_FROM_LINE + 64))
            sep = b""
            skip = 0
            if length:
                tail = read_exact(tfd, max(0, length - 3), min(3, length))
                stripped = head.lstrip(b"\r\n")
                if is_from_line(stripped.split(b"\n", 1)[0] + b"\n"):
                    skip = len(head) - len(stripped)
                    if not tail.endswith((b"\n\n", b"\n\r\n")):
                        sep = b"\n" if tail.endswith(b"\n") else b"\n\n"
            pos_out = length
            if sep:
                os.pwrite(tfd, sep, pos_out)
                pos_out += len(sep)
            pos = 0
            while pos < moved:
                lock.refresh()
                data = os.pread(sfd, min(COPY_CHUNK, moved - pos), pos)
                if not data:
                    raise MaildropError(f"{self.path} shrank while it was locked")
                h.update(data)
                keep = data[max(0, skip - pos):] if pos < skip else data
                view = memoryview(keep)
                while view:
                    n = os.pwrite(tfd, view, pos_out)
                    view = view[n:]
                    pos_out += n
                pos += len(data)
            os.fsync(tfd)
        except (OSError, MaildropError) as exc:
            # Nothing was taken from the spool: undo the append and the journal.
            try:
                os.ftruncate(tfd, length)
                os.fsync(tfd)
                _unlink(journal)
            except OSError:
                pass  # the journal stays and the next login undoes it
            if isinstance(exc, MaildropError):
                raise
            what = "quota exceeded" if exc.errno == errno.EDQUOT else str(exc)
            raise MaildropError(f"cannot copy {self.path} to {self.temp_drop}: {what}") from exc
        try:
            _write_journal(journal, b"%d %d %s\n" % (length, moved, h.hexdigest().encode()))
            fsync_dir(self._tdir)
        except MaildropError:
            try:
                os.ftruncate(tfd, length)
                os.fsync(tfd)
                _unlink(journal)
            except OSError:
                pass
            raise
        self._empty_spool(sfd, sst)
        try:
            _unlink(journal)
            fsync_dir(self._tdir)
        except MaildropError as exc:
            log.warning("%s (the next login removes it)", exc)

    def _empty_spool(self, sfd: int, sst: os.stat_result) -> None:
        """After the move is durable: truncate the spool (it keeps its inode)."""
        writable = (os.O_ACCMODE & _getfl(sfd)) == os.O_RDWR
        try:
            if writable:
                os.ftruncate(sfd, 0)
                os.fsync(sfd)
                return
            # A spool we may not write but whose directory we may: replace it.
            tmp = new_spool_path(self.path)
            _unlink_quietly(tmp)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                _copy_owner_and_mode(fd, sst)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
            fsync_dir(self._dir)
        except OSError as exc:
            # The journal (with its digest) stays: the next login sees that
            # the spool still holds the bytes and undoes the append.
            raise MaildropError(f"cannot empty {self.path} after copying it: {exc}") from exc

    def _open_temp_drop(self) -> None:
        fd = _open_regular(self.temp_drop)
        if fd is None:
            raise MaildropError(f"temp drop {self.temp_drop} vanished")
        self._fd = fd
        st = os.fstat(fd)
        try:
            self._index = index_file(fd, st.st_size, use_content_length=self.settings.use_content_length)
        except (OSError, ValueError) as exc:
            raise MaildropError(f"cannot index {self.temp_drop}: {exc}") from exc
        self._ident = (st.st_dev, st.st_ino)

    def _prepare_listing(self) -> None:
        idx = self._index
        s = self.settings
        if s.uw_kluge and len(idx) and self._is_uw_internal(0):
            self._hidden = 1
        h = self._hidden
        if not s.update_status_headers:
            # UIDs wait for the first UIDL (MessageList), read from the file then,
            # by a function that holds the index and descriptor but not this
            # object (a cycle would keep it until a full garbage collection).
            fd, path = self._fd, self.path
            self._infos = MessageList(idx.sizes[h:] if h else idx.sizes,
                                      lambda: _uids_from_file(idx, fd, path)[h:], idx.seen[h:])
            return
        uids = _uids_from_file(idx, self._fd, self.path)
        sizes = array("q")
        for i in range(h, len(idx)):
            size = idx.sizes[i]
            uid = uids[i]
            # A twin whose copied X-UIDL had to get a suffix gets its own line too.
            needs = not idx.has_xuidl(i) or i in idx.renamed
            if needs and XUIDL_MIN <= len(uid) + 1 <= XUIDL_MAX:
                text = b"X-UIDL: " + uid.encode("ascii")
                self._xuidl[i] = text + (b"\r\n" if idx.crlf[i] else b"\n")
                size += len(text) + 2
            sizes.append(size)
        self._infos = MessageList(sizes, uids[h:], idx.seen[h:])


    def _is_uw_internal(self, i: int) -> bool:
        """qpopper's UW kluge: two of its three signs in the first message."""
        idx = self._index
        assert self._fd is not None
        n = min(idx.body_starts[i] - idx.starts[i], 64 * 1024)
        head = self._pread(idx.starts[i], n)
        signs = sum(1 for rx in (_UW_SUBJECT, _UW_XIMAP, _UW_FROM) if rx.search(head))
        return signs >= 2

    def _spool_lock(self, fd: int, wait: bool = True) -> SpoolLock:
        """Dotlock + fcntl on the spool, for indexing or UPDATE only."""
        s = self.settings
        return SpoolLock(self.path, fd, timeout=s.lock_timeout, stale_age=s.stale_age, check_pid=s.check_pid, wait=wait)

    def _path_is(self, st: os.stat_result) -> bool:
        try:
            now = os.lstat(self.path)
        except FileNotFoundError:
            return False
        return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)

    # ---- the Maildrop interface ------------------------------------------------

    def messages(self) -> MessageList:
        return self._infos

    def read(self, index: int, chunk_size: int = 65536) -> Iterator[bytes]:
        if self._fd is None:
            raise MaildropError(f"{self.path} is closed")
        if not 0 <= index < len(self._infos):
            raise IndexError(index)
        fd = self._fd
        i = index + self._hidden
        line = self._xuidl.get(i)
        if line is not None:
            yield line
        pos, end = self._index.starts[i], self._index.ends[i]
        while pos < end:
            try:
                data = os.pread(fd, min(chunk_size, end - pos), pos)
            except OSError as exc:
                raise MaildropError(f"cannot read {self.path}: {exc}") from exc
            if not data:
                raise MaildropError(f"{self.path} shrank while message {index + 1} was read")
            pos += len(data)
            yield data

    def writes_nothing(self, deleted: Set[int], retrieved: Set[int]) -> bool:
        if self._fd is None:
            return True
        if not self.settings.server_mode or self._committed:
            return False  # close puts the temp drop back; a second commit fails
        if any(0 <= i < len(self._infos) for i in deleted):
            return False
        if self.settings.update_status_headers:
            h = self._hidden
            return all(self._index.seen[i + h] for i in retrieved if 0 <= i < len(self._infos))
        return True

    def commit(self, deleted: Set[int], retrieved: Set[int]) -> None:
        visible = len(self._infos)
        h = self._hidden
        drop = {i + h for i in deleted if 0 <= i < visible}
        retr = {i + h for i in retrieved if 0 <= i < visible and i not in deleted}
        if self._fd is None:
            return  # no spool: nothing to remove, nothing to write
        if self._committed:
            raise MaildropError(f"{self.path} was already updated in this session")
        status = set()
        if self.settings.update_status_headers:
            status = {i for i in retr if not self._index.seen[i]}
        if self.settings.server_mode:
            if not drop and not status:
                return  # nothing changed: nothing is written
            self._update_in_place_mode(drop, status)
        else:
            self._put_back(self._fd, self._index, drop, self._xuidl, status)
            self._returned = True
        self._committed = True

    def close(self) -> None:
        try:
            if (
                not self.settings.server_mode
                and self._session is not None
                and self._fd is not None
                and not self._returned
                and not self._committed
            ):
                # qpopper's restore: a session that ends without UPDATE puts
                # the temp drop back unchanged. If that fails the mail stays
                # in the temp drop, and the next login takes it from there.
                try:
                    self._put_back(self._fd, self._index, set(), {}, set())
                    self._returned = True
                except MaildropError as exc:
                    log.error("cannot put back %s: %s; it is kept for the next login", self.temp_drop, exc)
        finally:
            self._close_fd()
            if self._session is not None:
                session, self._session = self._session, None
                session.release()

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    # ---- UPDATE ----------------------------------------------------------------

    def _update_in_place_mode(self, drop: set[int], status: set[int]) -> None:
        assert self._fd is not None
        with self._spool_lock(self._fd) as lock:
            current = self._verify_unchanged()
            pieces, end_bytes = self._plan(self._fd, self._index, drop, self._xuidl, status)
            self._append_new(pieces, end_bytes, self._fd, self._index.length, current)
            self._check_space(self._dir, _total(pieces))
            st = os.fstat(self._fd)
            tmp = self._write_new_spool(pieces, st, lock)
            try:
                os.rename(tmp, self.path)
            except OSError as exc:
                _unlink_quietly(tmp)
                raise MaildropError(f"cannot update {self.path}: {exc}") from exc
        fsync_dir(self._dir)

    def _put_back(
        self, tfd: int, index: MboxIndex, drop: set[int], xuidl: dict[int, bytes], status: set[int]
    ) -> None:
        """Temp drop -> spool: kept messages in front of the new mail."""
        flag = putback_flag_path(self.path)
        if os.path.lexists(flag):
            raise MaildropError(f"{flag} shows an unfinished write-back; the next login finishes it")
        if all(i in drop for i in range(len(index))):
            self._drop_temp_drop()  # nothing to keep: the spool is left alone
            return
        edited = bool(drop or status or xuidl)
        with self._spool_locked(create=True) as (sfd, lock):
            if sfd is None or lock is None:
                raise MaildropError(f"cannot create spool {self.path}")
            sst = os.fstat(sfd)
            current = sst.st_size
            if self.settings.fast_update and current == 0 and not edited and self._same_fs():
                self._put_back_by_rename(tfd, sst)
                return
            pieces, end_bytes = self._plan(tfd, index, drop, xuidl, status)
            self._append_new(pieces, end_bytes, sfd, 0, current)
            self._check_space(self._dir, _total(pieces))
            tmp = self._write_new_spool(pieces, sst, lock)
            try:
                _write_flag(flag)
                fsync_dir(self._dir)
            except MaildropError:
                _unlink_quietly(flag)
                _unlink_quietly(tmp)
                raise
            try:
                os.rename(tmp, self.path)
            except OSError as exc:
                # Order matters: without the flag the copy is mere garbage.
                try:
                    _unlink(flag)
                    fsync_dir(self._dir)
                    _unlink_quietly(tmp)
                except MaildropError:
                    pass  # flag and copy both stay: the next login undoes it
                raise MaildropError(f"cannot update {self.path}: {exc}") from exc
        try:
            fsync_dir(self._dir)
            self._drop_temp_drop()
            _unlink(flag)
            fsync_dir(self._dir)
        except MaildropError as exc:
            # The spool is complete; the flag makes the next login finish.
            log.warning("%s: %s (the next login finishes the update)", self.path, exc)

    def _put_back_by_rename(self, tfd: int, sst: os.stat_result) -> None:
        """fast_update: nothing changed and nothing arrived: rename the temp drop."""
        try:
            _copy_owner_and_mode(tfd, sst)
            os.fsync(tfd)
            os.rename(self.temp_drop, self.path)
        except OSError as exc:
            raise MaildropError(f"cannot move {self.temp_drop} to {self.path}: {exc}") from exc
        fsync_dir(self._dir)
        if self._tdir != self._dir:
            fsync_dir(self._tdir)
        if self.settings.keep_temp_drop:
            try:
                os.close(os.open(self.temp_drop, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
            except OSError as exc:
                log.warning("cannot recreate the kept temp drop %s: %s", self.temp_drop, exc)

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

    def _plan(
        self, fd: int, idx: MboxIndex, drop: set[int], xuidl: dict[int, bytes], status: set[int]
    ) -> tuple[list[Piece], bytes]:
        """The kept messages of `fd` as pieces of the new spool.

        Adjacent unchanged segments become one copy. A From_ line is always
        written after an empty line, adding one where a writer left none
        (this changes no message: that line is the format's). Returns the
        pieces and the last (up to) three bytes they end with.
        """
        pieces: list[Piece] = []
        end_bytes = b""
        for i in range(len(idx)):
            if i in drop:
                continue
            a, s, b = idx.from_starts[i], idx.starts[i], idx.seg_ends[i]
            if a != s:  # a segment that starts with a From_ line
                _separate(pieces, end_bytes)
            line = xuidl.get(i)
            header: bytes | None = None
            if i in status and idx.body_starts[i] - s <= MAX_HEADER_PARSE:
                header = _with_status_ro(_pread(fd, s, idx.body_starts[i] - s), bool(idx.crlf[i]))
            if line is None and header is None:
                _add_copy(pieces, _Copy(fd, a, b - a))
                end_bytes = _pread(fd, max(a, b - 3), min(3, b - a))
                continue
            _add_copy(pieces, _Copy(fd, a, s - a))
            if line is not None:
                pieces.append(line)
            rest = s
            if header is not None:
                pieces.append(header)
                rest = idx.body_starts[i]
            _add_copy(pieces, _Copy(fd, rest, b - rest))
            end_bytes = _last_bytes(pieces, 3)
        return pieces, end_bytes

    @staticmethod
    def _append_new(pieces: list[Piece], end_bytes: bytes, fd: int, start: int, current: int) -> None:
        """Add what was appended to `fd` from `start` to `current` (new mail)."""
        if current <= start:
            return
        new = _Copy(fd, start, current - start)
        head = _pread(fd, new.offset, min(new.length, MAX_FROM_LINE + 64))
        stripped = head.lstrip(b"\r\n")
        if is_from_line(stripped.split(b"\n", 1)[0] + b"\n"):
            skip = len(head) - len(stripped)
            new = _Copy(fd, new.offset + skip, new.length - skip)
            _separate(pieces, end_bytes)
        pieces.append(new)

    def _pread(self, offset: int, n: int) -> bytes:
        assert self._fd is not None
        return _pread(self._fd, offset, n)

    @staticmethod
    def _check_space(directory: str, needed: int) -> None:
        try:
            vfs = os.statvfs(directory)
        except OSError as exc:
            raise MaildropError(f"cannot statvfs {directory}: {exc}") from exc
        available = vfs.f_bavail * vfs.f_frsize
        if available < needed + FREE_SPACE_MARGIN:
            raise MaildropError(f"not enough space in {directory}: need {needed}, have {available}")

    def _write_new_spool(self, pieces: list[Piece], st: os.stat_result, lock: SpoolLock) -> str:
        """Write and fsync `.<name>.qpopper-new`; on failure remove it."""
        tmp = new_spool_path(self.path)
        out: int | None = None
        try:
            _unlink_quietly(tmp)
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            _copy_owner_and_mode(out, st)
            for piece in pieces:
                if isinstance(piece, _Copy):
                    _copy(out, piece, lock)
                else:
                    _write_all(out, piece)
            os.fsync(out)
            os.close(out)
            out = None
        except (OSError, MaildropError) as exc:
            if out is not None:
                os.close(out)
            _unlink_quietly(tmp)
            if isinstance(exc, MaildropError):
                raise
            what = "quota exceeded" if exc.errno == errno.EDQUOT else str(exc)
            raise MaildropError(f"cannot update {self.path}: {what}") from exc
        except BaseException:
            if out is not None:
                os.close(out)
            raise
        return tmp


# ---- helpers -------------------------------------------------------------------


def _total(pieces: list[Piece]) -> int:
    return sum(p.length if isinstance(p, _Copy) else len(p) for p in pieces)


def _add_copy(pieces: list[Piece], piece: _Copy) -> None:
    if piece.length <= 0:
        return
    last = pieces[-1] if pieces else None
    if isinstance(last, _Copy) and last.fd == piece.fd and last.offset + last.length == piece.offset:
        pieces[-1] = _Copy(piece.fd, last.offset, last.length + piece.length)
    else:
        pieces.append(piece)


def _last_bytes(pieces: list[Piece], n: int) -> bytes:
    out = b""
    for piece in reversed(pieces):
        if len(out) >= n:
            break
        if isinstance(piece, _Copy):
            k = min(n - len(out), piece.length)
            out = _pread(piece.fd, piece.offset + piece.length - k, k) + out
        else:
            out = piece[-(n - len(out)):] + out
    return out[-n:]


def _separate(pieces: list[Piece], end_bytes: bytes) -> None:
    """Add the empty line a From_ line must follow, if it is missing."""
    if not pieces or end_bytes.endswith((b"\n\n", b"\n\r\n")):
        return
    pieces.append(b"\n" if end_bytes.endswith(b"\n") else b"\n\n")


def _with_status_ro(block: bytes, crlf: bool) -> bytes:
    """A header block (with its ending empty line, if any) marked `Status: RO`.

    Every Status line (with its continuation lines) is replaced by one
    `Status: RO` at the end of the header, as qpopper's update does.
    """
    if block in (b"\n", b"\r\n"):
        head, blank = b"", block
    elif block.endswith(b"\n\r\n"):
        head, blank = block[:-2], b"\r\n"
    elif block.endswith(b"\n\n"):
        head, blank = block[:-1], b"\n"
    else:
        head, blank = block, b""
    eol = b"\r\n" if (head.endswith(b"\r\n") if head else crlf) else b"\n"
    out: list[bytes] = []
    skipping = False
    pos = 0
    while pos < len(head):
        nl = head.find(b"\n", pos)
        stop = len(head) if nl < 0 else nl + 1
        line = head[pos:stop]
        pos = stop
        if skipping and line[:1] in (b" ", b"\t"):
            continue
        skipping = line[:7].lower() == b"status:"
        if not skipping:
            out.append(line)
    if out and not out[-1].endswith(b"\n"):
        out[-1] += eol
    out.append(b"Status: RO" + eol)
    return b"".join(out) + blank


def _pread(fd: int, offset: int, n: int) -> bytes:
    try:
        return read_exact(fd, offset, n)
    except (OSError, EOFError) as exc:
        raise MaildropError(f"cannot read at {offset}: {exc}") from exc


def _copy(out: int, piece: _Copy, lock: SpoolLock) -> None:
    """Copy a range of a file, in the kernel where it can."""
    offset, left = piece.offset, piece.length
    use_kernel = hasattr(os, "copy_file_range")
    while left > 0:
        lock.refresh()
        n = min(left, COPY_CHUNK)
        if use_kernel:
            try:
                done = os.copy_file_range(piece.fd, out, n, offset)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                use_kernel = False
                continue
            if done == 0:
                raise MaildropError("a file shrank during update")
        else:
            data = _pread(piece.fd, offset, n)
            _write_all(out, data)
            done = len(data)
        offset += done
        left -= done


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _getfl(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


def _open_regular(path: str) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        code = ResponseCode.SYS_PERM if exc.errno == errno.ELOOP else ResponseCode.SYS_TEMP
        raise MaildropError(f"cannot open {path}: {exc}", code) from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise MaildropError(f"{path} is not a regular file", ResponseCode.SYS_PERM)
    if st.st_nlink != 1:
        # A second name for the file: maybe someone else's, planted here.
        os.close(fd)
        raise MaildropError(f"{path} has {st.st_nlink} links", ResponseCode.SYS_PERM)
    return fd


def _write_journal(path: str, content: bytes) -> None:
    """Write a small journal file whole or not at all (temp file + rename)."""
    tmp = path + ".tmp"
    try:
        _unlink_quietly(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise MaildropError(f"cannot write {path}: {exc}") from exc


def _write_flag(path: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise MaildropError(f"cannot create {path}: {exc}") from exc


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise MaildropError(f"cannot remove {path}: {exc}") from exc


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _copy_owner_and_mode(fd: int, st: os.stat_result) -> None:
    """Give the new spool the old one's owner, group and permissions.

    Without root only the group can change (to one we belong to); that is
    all a user-run session needs, since the file is already its own. The
    mode is set after the owner because chown clears set-id bits.
    """
    give_owner(fd, st.st_uid, st.st_gid)
    os.fchmod(fd, stat.S_IMODE(st.st_mode))
