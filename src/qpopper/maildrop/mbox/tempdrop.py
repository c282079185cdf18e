"""qpopper's temp-drop mode (its default): serve a copy, leave the spool to new mail.

At login the spool's content moves to the end of the temp drop
`<temp_dir or spool dir>/.<name>.pop`, under the spool locks, and the
session serves from there; the spool is left empty for new mail. At UPDATE
(and when a session ends without UPDATE, as qpopper's restore) the kept
messages go back in front of whatever arrived meanwhile, and the temp drop
is removed (emptied with `keep_temp_drop`).

I/O: login reads the spool and writes it to the temp drop (plus a hash
pass over it, three fsyncs and a truncation); UPDATE writes the kept
messages and the new mail to a new spool (two fsyncs) *every* session,
changed or not. `fast_update` replaces both copies by rename(2) where it
can (the temp drop is empty at login, resp. nothing arrived, nothing was
deleted and no header changed at UPDATE, and both are on one file
system): then a session costs no copy at all. Temp-drop mode therefore
costs about two spool copies per session, server mode at most one and
usually none; its benefit is that an MUA reading the spool directly sees
only new mail during a POP session.

Both moves are journalled (`journal`), in these steps:

* Login: 1. record the temp drop's length L; 2. append the spool's N bytes
  to the temp drop, fsync; 3. record L, N and a digest of those N bytes;
  4. truncate the spool (fsync); 5. remove the journal.
* UPDATE: 1. write and fsync the new spool `.<name>.qpopper-new`;
  2. create the put-back flag (fsync dir); 3. rename the new spool over
  the spool (fsync dir); 4. remove the temp drop; 5. remove the flag.

`recovery` says how the next login finishes or undoes each.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import stat

from ...errors import MaildropError, ResponseCode
from ..dotlock import SpoolLock
from ..fsutil import (
    check_space,
    copy_owner_and_mode,
    fsync_dir,
    open_regular,
    unlink,
    unlink_quietly,
)
from ..mboxindex import MAX_FROM_LINE, MboxIndex, index_file, is_from_line, read_exact
from .journal import write_flag, write_gather_journal
from .paths import gather_journal_path, new_spool_path, putback_flag_path
from .spool import Spool
from .update import (
    COPY_CHUNK,
    FREE_SPACE_MARGIN,
    append_new_mail,
    plan_kept,
    total_size,
    write_new_spool,
)

log = logging.getLogger("qpopper.maildrop.mbox")


# ---- login ---------------------------------------------------------------------


def gather(spool: Spool) -> None:
    """Move the spool's content to the end of the temp drop."""
    if not os.path.isdir(spool.tdir):
        raise MaildropError(f"temp-drop directory {spool.tdir} does not exist")
    try:
        tfd = os.open(spool.temp_drop, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        code = ResponseCode.SYS_PERM if exc.errno == errno.ELOOP else ResponseCode.SYS_TEMP
        raise MaildropError(f"cannot open temp drop {spool.temp_drop}: {exc}", code) from exc
    try:
        tst = os.fstat(tfd)
        if not stat.S_ISREG(tst.st_mode) or tst.st_nlink != 1:
            raise MaildropError(f"temp drop {spool.temp_drop} is not a plain file of its own", ResponseCode.SYS_PERM)
        with spool.locked(create=False, writable=True) as (sfd, lock):
            if sfd is None or lock is None:
                return
            sst = os.fstat(sfd)
            moved = sst.st_size
            if moved == 0:
                return
            length = os.fstat(tfd).st_size
            if spool.settings.fast_update and length == 0 and spool.same_fs():
                _gather_by_rename(spool, sst)
                return
            _gather_by_copy(spool, sfd, sst, tfd, length, moved, lock)
    finally:
        os.close(tfd)


def open_temp_drop(spool: Spool) -> tuple[int, MboxIndex, tuple[int, int]]:
    """The temp drop's descriptor (open for the session), index and identity."""
    fd = open_regular(spool.temp_drop)
    if fd is None:
        raise MaildropError(f"temp drop {spool.temp_drop} vanished")
    try:
        st = os.fstat(fd)
        try:
            index = index_file(fd, st.st_size, use_content_length=spool.settings.use_content_length)
        except (OSError, ValueError) as exc:
            raise MaildropError(f"cannot index {spool.temp_drop}: {exc}") from exc
    except BaseException:
        os.close(fd)
        raise
    return fd, index, (st.st_dev, st.st_ino)


def _gather_by_rename(spool: Spool, sst: os.stat_result) -> None:
    """fast_update at login: the spool becomes the temp drop (one rename)."""
    try:
        os.rename(spool.path, spool.temp_drop)
    except OSError as exc:
        raise MaildropError(f"cannot move {spool.path} to {spool.temp_drop}: {exc}") from exc
    fsync_dir(spool.tdir)
    if spool.tdir != spool.dir:
        fsync_dir(spool.dir)
    _recreate_empty_spool(spool, sst)


def _recreate_empty_spool(spool: Spool, sst: os.stat_result) -> None:
    """An empty spool with the old owner and mode, unless an MDA made one."""
    tmp = new_spool_path(spool.path)
    unlink_quietly(tmp)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            copy_owner_and_mode(fd, sst)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, spool.path)
        except FileExistsError:
            pass
        os.unlink(tmp)
        fsync_dir(spool.dir)
    except OSError as exc:
        unlink_quietly(tmp)
        log.warning("cannot recreate the empty spool %s (the next delivery will): %s", spool.path, exc)


def _gather_by_copy(
    spool: Spool, sfd: int, sst: os.stat_result, tfd: int, length: int, moved: int, lock: SpoolLock
) -> None:
    journal = gather_journal_path(spool.temp_drop)
    check_space(spool.tdir, moved + 2, FREE_SPACE_MARGIN)
    write_gather_journal(journal, length)
    fsync_dir(spool.tdir)
    h = hashlib.blake2b(digest_size=32)
    try:
        sep, skip = _seam(sfd, tfd, length, moved)
        pos_out = length
        if sep:
            os.pwrite(tfd, sep, pos_out)
            pos_out += len(sep)
        _copy_spool(spool, sfd, tfd, moved, skip, pos_out, lock, h)
        os.fsync(tfd)
    except (OSError, MaildropError) as exc:
        # Nothing was taken from the spool: undo the append and the journal.
        _undo_append(tfd, length, journal)
        if isinstance(exc, MaildropError):
            raise
        what = "quota exceeded" if exc.errno == errno.EDQUOT else str(exc)
        raise MaildropError(f"cannot copy {spool.path} to {spool.temp_drop}: {what}") from exc
    try:
        write_gather_journal(journal, length, moved, h.hexdigest())
        fsync_dir(spool.tdir)
    except MaildropError:
        _undo_append(tfd, length, journal)
        raise
    _empty_spool(spool, sfd, sst)
    try:
        unlink(journal)
        fsync_dir(spool.tdir)
    except MaildropError as exc:
        log.warning("%s (the next login removes it)", exc)


def _seam(sfd: int, tfd: int, length: int, moved: int) -> tuple[bytes, int]:
    """How the spool's text joins the temp drop's `length` octets: the separator
    to write first, and how many leading line ends of the spool to skip."""
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
    return sep, skip


def _copy_spool(
    spool: Spool, sfd: int, tfd: int, moved: int, skip: int, pos_out: int, lock: SpoolLock, h: hashlib.blake2b
) -> None:
    """The spool's first `moved` octets, less `skip`, to the temp drop at `pos_out`;
    all `moved` go into the digest `h`."""
    pos = 0
    while pos < moved:
        lock.refresh()
        data = os.pread(sfd, min(COPY_CHUNK, moved - pos), pos)
        if not data:
            raise MaildropError(f"{spool.path} shrank while it was locked")
        h.update(data)
        keep = data[max(0, skip - pos):] if pos < skip else data
        view = memoryview(keep)
        while view:
            n = os.pwrite(tfd, view, pos_out)
            view = view[n:]
            pos_out += n
        pos += len(data)


def _undo_append(tfd: int, length: int, journal: str) -> None:
    """Cut the temp drop back to `length` and drop the journal, as far as possible."""
    try:
        os.ftruncate(tfd, length)
        os.fsync(tfd)
        unlink(journal)
    except OSError:
        pass  # the journal stays and the next login undoes it


def _empty_spool(spool: Spool, sfd: int, sst: os.stat_result) -> None:
    """After the move is durable: truncate the spool (it keeps its inode)."""
    writable = (os.O_ACCMODE & fcntl.fcntl(sfd, fcntl.F_GETFL)) == os.O_RDWR
    try:
        if writable:
            os.ftruncate(sfd, 0)
            os.fsync(sfd)
            return
        # A spool we may not write but whose directory we may: replace it.
        tmp = new_spool_path(spool.path)
        unlink_quietly(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            copy_owner_and_mode(fd, sst)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, spool.path)
        fsync_dir(spool.dir)
    except OSError as exc:
        # The journal (with its digest) stays: the next login sees that
        # the spool still holds the bytes and undoes the append.
        raise MaildropError(f"cannot empty {spool.path} after copying it: {exc}") from exc


# ---- UPDATE (and the end of a session without one) -----------------------------------


def put_back(
    spool: Spool, tfd: int, index: MboxIndex, drop: set[int], xuidl: dict[int, bytes], status: set[int]
) -> None:
    """Temp drop -> spool: kept messages in front of the new mail."""
    flag = putback_flag_path(spool.path)
    if os.path.lexists(flag):
        raise MaildropError(f"{flag} shows an unfinished write-back; the next login finishes it")
    if all(i in drop for i in range(len(index))):
        drop_temp_drop(spool)  # nothing to keep: the spool is left alone
        return
    edited = bool(drop or status or xuidl)
    with spool.locked(create=True) as (sfd, lock):
        if sfd is None or lock is None:
            raise MaildropError(f"cannot create spool {spool.path}")
        sst = os.fstat(sfd)
        current = sst.st_size
        if spool.settings.fast_update and current == 0 and not edited and spool.same_fs():
            _put_back_by_rename(spool, tfd, sst)
            return
        pieces, end_bytes = plan_kept(tfd, index, drop, xuidl, status)
        append_new_mail(pieces, end_bytes, sfd, 0, current)
        check_space(spool.dir, total_size(pieces), FREE_SPACE_MARGIN)
        tmp = write_new_spool(spool.path, pieces, sst, lock)
        try:
            write_flag(flag)
            fsync_dir(spool.dir)
        except MaildropError:
            unlink_quietly(flag)
            unlink_quietly(tmp)
            raise
        try:
            os.rename(tmp, spool.path)
        except OSError as exc:
            # Order matters: without the flag the copy is mere garbage.
            try:
                unlink(flag)
                fsync_dir(spool.dir)
                unlink_quietly(tmp)
            except MaildropError:
                pass  # flag and copy both stay: the next login undoes it
            raise MaildropError(f"cannot update {spool.path}: {exc}") from exc
    try:
        fsync_dir(spool.dir)
        drop_temp_drop(spool)
        unlink(flag)
        fsync_dir(spool.dir)
    except MaildropError as exc:
        # The spool is complete; the flag makes the next login finish.
        log.warning("%s: %s (the next login finishes the update)", spool.path, exc)


def _put_back_by_rename(spool: Spool, tfd: int, sst: os.stat_result) -> None:
    """fast_update: nothing changed and nothing arrived: rename the temp drop."""
    try:
        copy_owner_and_mode(tfd, sst)
        os.fsync(tfd)
        os.rename(spool.temp_drop, spool.path)
    except OSError as exc:
        raise MaildropError(f"cannot move {spool.temp_drop} to {spool.path}: {exc}") from exc
    fsync_dir(spool.dir)
    if spool.tdir != spool.dir:
        fsync_dir(spool.tdir)
    if spool.settings.keep_temp_drop:
        try:
            os.close(os.open(spool.temp_drop, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            log.warning("cannot recreate the kept temp drop %s: %s", spool.temp_drop, exc)


def truncate_temp_drop(spool: Spool, length: int) -> None:
    try:
        fd = os.open(spool.temp_drop, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise MaildropError(f"cannot open {spool.temp_drop}: {exc}") from exc
    try:
        if os.fstat(fd).st_nlink != 1:
            raise MaildropError(f"temp drop {spool.temp_drop} has other names", ResponseCode.SYS_PERM)
        os.ftruncate(fd, length)
        os.fsync(fd)
    except OSError as exc:
        raise MaildropError(f"cannot truncate {spool.temp_drop}: {exc}") from exc
    finally:
        os.close(fd)


def drop_temp_drop(spool: Spool) -> None:
    """Remove the temp drop (or empty it, with keep_temp_drop)."""
    if spool.settings.keep_temp_drop:
        truncate_temp_drop(spool, 0)
    else:
        try:
            os.unlink(spool.temp_drop)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise MaildropError(f"cannot remove {spool.temp_drop}: {exc}") from exc
    fsync_dir(spool.tdir)
