"""mbox spools (/var/mail/USER) as a Maildrop, in qpopper's two modes.

Both modes give the same guarantees, and neither ever rewrites a spool in
place:

* The spool is locked against delivery agents only while it is read at
  login and while it is replaced at UPDATE (`spool`); between the two,
  MDAs append freely. Mail that arrives during a session is not listed
  (message numbers stay as they were) and is kept by UPDATE, behind the
  kept messages, so the next session sees it.
* One POP session per spool: an OFD lock on `.<name>.qpopper-pop3.lock`
  in the spool directory (beside the spool, so separate processes and
  hosts sharing the directory exclude each other; the kernel drops it when
  the holder dies, so it never goes stale).
* UPDATE writes the new spool to `.<name>.qpopper-new` in the spool's
  directory, with the spool's owner, group and mode, fsyncs it, renames
  it over the spool and fsyncs the directory (`update`). Free space is
  checked first; any failure leaves the old spool and raises MaildropError
  (SYS/TEMP). Messages are read with pread on a descriptor opened at
  login, never through a long-lived mapping (a truncation by another
  program would turn that into SIGBUS for the whole server).
* A kill -9 at any instant leaves every message exactly once in the spool
  plus the temp drop, and the next login (in either mode) recovers
  (`recovery`).

Server mode (`server_mode`, qpopper's `-S`) serves the spool in place
(`spool`); temp-drop mode, qpopper's default, serves a copy (`tempdrop`).

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

import logging
import os
import re
from array import array
from collections.abc import Iterator, Set
from dataclasses import replace
from typing import TYPE_CHECKING

from ...errors import MaildropError, ResponseCode, WouldBlock
from .._base import MaildropSettings, MessageList
from ..mboxindex import XUIDL_MAX, XUIDL_MIN, MboxIndex, read_exact, work_out_uids
from ..sessionlock import SessionLock
from .paths import session_lock_path
from .recovery import recover, recovery_pending
from .spool import Spool, open_in_place, update_in_place
from .tempdrop import gather, open_temp_drop, put_back
from .update import pread

if TYPE_CHECKING:
    from .indexcache import KeptIndex

log = logging.getLogger("qpopper.maildrop.mbox")

_UW_SUBJECT = re.compile(
    rb"^Subject: [^\n]*(?:DO NOT DELETE|DON'T DELETE THIS MESSAGE|FOLDER INTERNAL DATA)", re.MULTILINE | re.IGNORECASE
)
_UW_XIMAP = re.compile(rb"^X-IMAP: ", re.MULTILINE | re.IGNORECASE)
_UW_FROM = re.compile(rb"^From: Mail System Internal Data", re.MULTILINE | re.IGNORECASE)


def _uids_from_file(index: MboxIndex, fd: int | None, path: str, kept: KeptIndex | None = None) -> list[str]:
    if fd is None:
        return []
    try:
        try:
            return work_out_uids(index, lambda a, n: read_exact(fd, a, n))
        except ValueError:
            # From_ lines that differ from the fingerprint: with an index from
            # the cache, they may have changed before this session (a rewrite
            # in place that moved no boundary); a full index tells.
            if kept is None or not kept.refresh(index, fd):
                raise
            return work_out_uids(index, lambda a, n: read_exact(fd, a, n))
    except (OSError, EOFError, ValueError) as exc:
        if kept is not None:
            kept.forget()
        raise MaildropError(f"cannot read {path} for its UIDs: {exc}", ResponseCode.SYS_TEMP) from exc


class MboxMaildrop:
    """An open mbox spool; holds the POP session lock until closed.

    `settings` carries the site's choices (lock timing, server or temp-drop
    mode, write-back); the keyword arguments override single fields of it
    and are kept for callers that set only those.
    """

    # Slots: hundreds of idle sessions each hold one of these.
    __slots__ = (
        "_cache",
        "_committed",
        "_fd",
        "_hidden",
        "_ident",
        "_index",
        "_infos",
        "_returned",
        "_session",
        "_spool",
        "_xuidl",
        "path",
        "settings",
        "temp_drop",
    )

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
        self._spool = spool = Spool(path, s)
        self.path = spool.path
        self.temp_drop = spool.temp_drop
        self._session: SessionLock | None = None
        self._fd: int | None = None  # the file served: spool or temp drop
        self._ident: tuple[int, int] | None = None
        self._cache: KeptIndex | None = None  # a big spool's index kept between sessions
        self._index = MboxIndex()
        self._infos = MessageList((), ())
        self._hidden = 0  # 1 when UW-IMAP's internal message is hidden
        self._xuidl: dict[int, bytes] = {}  # internal index -> X-UIDL line to add
        self._committed = False
        self._returned = False  # temp drop written back (temp-drop mode)
        if not os.path.isdir(spool.dir):
            return  # no spool directory: an empty maildrop with nothing to lock
        if quick and not s.server_mode:
            raise WouldBlock("temp-drop mode copies the spool")
        session = SessionLock(session_lock_path(self.path), shared=s.shared_storage, stale_age=s.stale_age,
                              check_pid=s.check_pid)
        session.acquire()
        try:
            if not quick:
                recover(spool)
            elif recovery_pending(spool):
                raise WouldBlock(f"{self.path}: an earlier session left work to finish")
            if s.server_mode:
                kept = open_in_place(spool, quick)
                if kept is not None:
                    self._fd, self._index, self._ident, self._cache = kept
            else:
                gather(spool)
                self._fd, self._index, self._ident = open_temp_drop(spool)
            self._prepare_listing()
        except BaseException:
            session.release()
            self._close_fd()
            raise
        self._session = session

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
            fd, path, kept = self._fd, self.path, self._cache
            self._infos = MessageList(idx.sizes[h:] if h else idx.sizes,
                                      lambda: _uids_from_file(idx, fd, path, kept)[h:], idx.seen[h:])
            return
        uids = _uids_from_file(idx, self._fd, self.path, self._cache)
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
        head = pread(self._fd, idx.starts[i], n)
        signs = sum(1 for rx in (_UW_SUBJECT, _UW_XIMAP, _UW_FROM) if rx.search(head))
        return signs >= 2

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
        if self._cache is not None and self._cache.needs_saving(self._index):
            return False  # close writes the kept index (in a worker thread)
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
            assert self._ident is not None
            update_in_place(self._spool, self._fd, self._index, self._ident, drop, self._xuidl, status, self._cache)
            if self._cache is not None:
                cache, self._cache = self._cache, None
                cache.forget()  # it describes the spool just replaced
        else:
            put_back(self._spool, self._fd, self._index, drop, self._xuidl, status)
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
                    put_back(self._spool, self._fd, self._index, set(), {}, set())
                    self._returned = True
                except MaildropError as exc:
                    log.error("cannot put back %s: %s; it is kept for the next login", self.temp_drop, exc)
            if self._cache is not None and self._fd is not None and self._cache.needs_saving(self._index):
                self._cache.save(self._index)
        finally:
            self._close_fd()
            if self._session is not None:
                session, self._session = self._session, None
                session.release()

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

