"""The spool file itself, and qpopper's server mode, which serves it in place.

`Spool` knows where a spool and its temp drop are and how to open and lock
the spool the way delivery agents do (dotlock + fcntl, see `dotlock`), only
for the moments that need it: reading it at login and replacing it at
UPDATE. Between the two, MDAs append freely.

Server mode (`server_mode`, qpopper's `-S`) indexes the spool where it is
(mapped, under the locks). UPDATE writes only when something changed (a
deletion, or with `update_status_headers` a message retrieved for the first
time); before writing it checks that the spool is the file it indexed and
was only appended to (same inode, not shorter, every From_ line where it
was), otherwise it refuses rather than cut messages at stale offsets. Then
the kept messages and the new mail go to a new file renamed over the spool.
I/O: login reads the spool once; UPDATE with changes writes the whole kept
spool once (in-kernel copy_file_range where available) plus two fsyncs; a
session that changed nothing writes nothing.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ...errors import MaildropError, ResponseCode, WouldBlock
from .._base import MaildropSettings
from ..dotlock import SpoolLock
from ..fsutil import check_space, fsync_dir, unlink_quietly
from ..mboxindex import MboxIndex, fingerprint, index_file, read_exact
from .paths import temp_drop_path

if TYPE_CHECKING:
    from .indexcache import KeptIndex
from .update import (
    FREE_SPACE_MARGIN,
    append_new_mail,
    plan_kept,
    total_size,
    write_new_spool,
)

# A quick open (on the event loop) indexes spools up to this size: about a
# millisecond of work.
QUICK_SPOOL_BYTES = 512 * 1024
# Server mode keeps the index of spools from this size between sessions
# (indexcache); a smaller one is indexed whole in a millisecond or two.
CACHED_SPOOL_BYTES = 1 << 20


class Spool:
    """Where an mbox spool and its temp drop are, with the site's settings."""

    __slots__ = ("dir", "path", "settings", "tdir", "temp_drop")

    def __init__(self, path: str, settings: MaildropSettings) -> None:
        self.settings = settings
        self.path = os.path.abspath(path)
        self.dir = os.path.dirname(self.path)
        self.temp_drop = temp_drop_path(self.path, settings)
        self.tdir = os.path.dirname(self.temp_drop)

    def open(self, *, create: bool = False, writable: bool = False) -> int | None:
        """A descriptor of the spool (never through a link), None if missing."""
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
            return self.open(create=create, writable=False)
        except OSError as exc:
            code = ResponseCode.SYS_PERM if exc.errno == errno.ELOOP else ResponseCode.SYS_TEMP
            raise MaildropError(f"cannot open spool {self.path}: {exc}", code) from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise MaildropError(f"spool {self.path} is not a regular file", ResponseCode.SYS_PERM)
        return fd

    def lock(self, fd: int, wait: bool = True) -> SpoolLock:
        """Dotlock + fcntl on the spool, for indexing or UPDATE only."""
        s = self.settings
        return SpoolLock(self.path, fd, timeout=s.lock_timeout, stale_age=s.stale_age, check_pid=s.check_pid, wait=wait)

    @contextmanager
    def locked(self, *, create: bool, writable: bool = False) -> Iterator[tuple[int | None, SpoolLock | None]]:
        """The spool opened and locked (dotlock + fcntl), or None if missing."""
        for _ in range(5):
            fd = self.open(create=create, writable=writable)
            if fd is None:
                yield None, None
                return
            try:
                with self.lock(fd) as lock:
                    if not self.is_at_path(os.fstat(fd)):
                        continue  # replaced between open and lock: start over
                    yield fd, lock
                    return
            finally:
                os.close(fd)
        raise MaildropError(f"spool {self.path} kept being replaced while opening it")

    def is_at_path(self, st: os.stat_result) -> bool:
        """Whether the file `st` describes is (still) the one at the spool's path."""
        try:
            now = os.lstat(self.path)
        except FileNotFoundError:
            return False
        return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)

    def same_fs(self) -> bool:
        """Spool and temp drop on one file system (so a rename can move one)."""
        try:
            return os.stat(self.dir).st_dev == os.stat(self.tdir).st_dev
        except OSError:
            return False


def open_in_place(
    spool: Spool, quick: bool = False
) -> tuple[int, MboxIndex, tuple[int, int], KeptIndex | None] | None:
    """Server mode's login: the spool's descriptor (open for the session),
    its index made under the locks, its (device, inode) and, for a big
    spool, the link to its kept index; None if it does not exist (no mail
    ever delivered)."""
    for _ in range(5):
        fd = spool.open()
        if fd is None:
            return None
        try:
            if quick and os.fstat(fd).st_size > QUICK_SPOOL_BYTES:
                raise WouldBlock(f"{spool.path} is too big to index on the event loop")
            with spool.lock(fd, wait=not quick) as lock:
                st = os.fstat(fd)
                if not spool.is_at_path(st):
                    os.close(fd)  # replaced between open and lock: start over
                    continue
                try:
                    index, kept, changed = _index_spool(spool, fd, st, lock)
                except (OSError, ValueError) as exc:
                    raise MaildropError(f"cannot index {spool.path}: {exc}") from exc
            if kept is not None:
                kept.pending = changed  # written at the end of the session
        except BaseException:
            os.close(fd)
            raise
        return fd, index, (st.st_dev, st.st_ino), kept
    raise MaildropError(f"spool {spool.path} kept being replaced while opening it")


def _index_spool(
    spool: Spool, fd: int, st: os.stat_result, lock: SpoolLock
) -> tuple[MboxIndex, KeptIndex | None, bool]:
    """The spool's index, from the kept one where it is big and that one
    passes its checks; and whether the kept one must be written anew."""
    use_content_length = spool.settings.use_content_length
    if st.st_size < CACHED_SPOOL_BYTES:
        return index_file(fd, st.st_size, use_content_length=use_content_length, tick=lock.refresh), None, False
    from .indexcache import KeptIndex  # only for big spools

    kept = KeptIndex(spool.path, st, use_content_length)
    loaded = kept.load(fd)
    if loaded is None:
        loaded = index_file(fd, st.st_size, use_content_length=use_content_length, tick=lock.refresh), True
    kept.indexed()
    return loaded[0], kept, loaded[1]


def update_in_place(
    spool: Spool, fd: int, index: MboxIndex, ident: tuple[int, int],
    drop: set[int], xuidl: dict[int, bytes], status: set[int], kept: KeptIndex | None = None,
) -> None:
    """Server mode's UPDATE of the spool `open_in_place` gave: the kept
    messages plus the new mail, renamed over the spool. An index that came
    from the kept one (`kept`) is confirmed by a full index first."""
    with spool.lock(fd) as lock:
        current = _verify_unchanged(spool, fd, index, ident)
        if kept is not None and not kept.confirm(index, fd):
            kept.forget()
            raise MaildropError(f"{spool.path}: its kept index disagrees with the spool; not updating")
        pieces, end_bytes = plan_kept(fd, index, drop, xuidl, status)
        append_new_mail(pieces, end_bytes, fd, index.length, current)
        check_space(spool.dir, total_size(pieces), FREE_SPACE_MARGIN)
        st = os.fstat(fd)
        tmp = write_new_spool(spool.path, pieces, st, lock)
        try:
            os.rename(tmp, spool.path)
        except OSError as exc:
            unlink_quietly(tmp)
            raise MaildropError(f"cannot update {spool.path}: {exc}") from exc
    fsync_dir(spool.dir)


def _verify_unchanged(spool: Spool, fd: int, index: MboxIndex, ident: tuple[int, int]) -> int:
    """The spool's current length, after proving it was only appended to."""
    st = os.fstat(fd)
    if not spool.is_at_path(st) or (st.st_dev, st.st_ino) != ident:
        raise MaildropError(f"{spool.path} was replaced by another program during the session; not updating")
    if st.st_size < index.length:
        raise MaildropError(f"{spool.path} shrank during the session; not updating")
    try:
        now = fingerprint(lambda a, n: read_exact(fd, a, n), index)
    except (OSError, EOFError) as exc:
        raise MaildropError(f"cannot re-read {spool.path}: {exc}") from exc
    if now != index.fingerprint:
        raise MaildropError(f"{spool.path} was rewritten by another program during the session; not updating")
    return st.st_size
