"""What the next login does after a session was killed at any instant.

It runs under the session lock, before anything else, and leaves every
message exactly once in the spool plus the temp drop (see `journal` for
the files it reads, `tempdrop` for the steps they cover):

* Gather journal: if it has no digest (crash before step 3) or the spool
  still begins with exactly the digested bytes (crash before step 4
  completed), the mail is still in the spool: truncate the temp drop back
  to L. Otherwise the spool was emptied after the append was durable: keep
  the temp drop. The test "the spool still holds those bytes" cannot lose
  mail: when it says yes, the bytes are there.
* Put-back flag: if `.<name>.qpopper-new` still exists the rename did not
  happen, so remove the flag and then the copy (in that order) and keep
  the temp drop; otherwise the spool holds the messages, so remove the
  temp drop.
* A half-written `.<name>.qpopper-new` of a killed UPDATE is removed.
* A temp drop found at login without journals is a complete maildrop of a
  dead session: temp-drop mode appends the spool to it (as qpopper does);
  server mode first puts it back into the spool, so switching modes never
  strands mail.
"""

from __future__ import annotations

import hashlib
import logging
import os

from ...errors import MaildropError
from ..fsutil import fsync_dir, open_regular, unlink, unlink_quietly
from ..mboxindex import index_file
from .journal import read_gather_journal
from .paths import gather_journal_path, new_spool_path, putback_flag_path
from .spool import Spool
from .tempdrop import drop_temp_drop, put_back, truncate_temp_drop
from .update import COPY_CHUNK

log = logging.getLogger("qpopper.maildrop.mbox")


def recover(spool: Spool) -> None:
    """Finish or undo whatever a killed session left."""
    _resolve_putback_flag(spool)
    _remove_leftover(spool)
    _resolve_gather_journal(spool)
    if spool.settings.server_mode:
        _restore_leftover_temp_drop(spool)


def recovery_pending(spool: Spool) -> bool:
    """Whether `recover` would find anything (server mode)."""
    journal = gather_journal_path(spool.temp_drop)
    leftovers = (putback_flag_path(spool.path), new_spool_path(spool.path), journal, journal + ".tmp", spool.temp_drop)
    return any(os.path.lexists(p) for p in leftovers)


def _resolve_putback_flag(spool: Spool) -> None:
    flag = putback_flag_path(spool.path)
    if not os.path.lexists(flag):
        return
    if os.path.lexists(new_spool_path(spool.path)):
        # Killed before the rename: the temp drop still holds the mail.
        # The flag goes first, so a crash now cannot make the copy's
        # later absence look like a finished rename.
        unlink(flag)
        fsync_dir(spool.dir)
        log.warning("%s: undid an unfinished write-back of the temp drop", spool.path)
    else:
        # Killed after the rename: the spool holds the mail.
        drop_temp_drop(spool)
        unlink(flag)
        fsync_dir(spool.dir)
        log.warning("%s: finished a write-back of the temp drop", spool.path)


def _remove_leftover(spool: Spool) -> None:
    """Delete the half-written copy of an UPDATE that was killed."""
    try:
        os.unlink(new_spool_path(spool.path))
        log.warning("removed unfinished update copy of %s", spool.path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise MaildropError(f"cannot remove {new_spool_path(spool.path)}: {exc}") from exc


def _resolve_gather_journal(spool: Spool) -> None:
    journal = gather_journal_path(spool.temp_drop)
    unlink_quietly(journal + ".tmp")
    try:
        record = read_gather_journal(journal)
    except MaildropError as exc:
        raise MaildropError(f"{exc}; not touching {spool.path} or {spool.temp_drop}") from exc.__cause__
    if record is None:
        return
    undo = True
    if record.moved is not None and record.digest is not None:
        with spool.locked(create=False) as (fd, _lock):
            undo = fd is not None and _begins_with(fd, record.moved, record.digest)
    if undo:
        truncate_temp_drop(spool, record.length)
        log.warning("%s: undid an unfinished move into %s", spool.path, spool.temp_drop)
    else:
        log.warning("%s: finished a move into %s", spool.path, spool.temp_drop)
    unlink(journal)
    fsync_dir(spool.tdir)


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


def _restore_leftover_temp_drop(spool: Spool) -> None:
    """Server mode: put a temp drop left by a temp-drop session back."""
    fd = open_regular(spool.temp_drop)
    if fd is None:
        return
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return
        log.warning("%s: putting back the temp drop %s of an earlier session", spool.path, spool.temp_drop)
        try:
            index = index_file(fd, size, use_content_length=spool.settings.use_content_length)
        except (OSError, ValueError) as exc:
            raise MaildropError(f"cannot index {spool.temp_drop}: {exc}") from exc
        put_back(spool, fd, index, set(), {}, set())
    finally:
        os.close(fd)
