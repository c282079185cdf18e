"""Maildir maildrops (new/ and cur/), opened without reading every message.

Listing costs one directory scan and one stat per message. A Dovecot or
Courier `,W=` size in the file name is the exact RFC 1939 size, so it is
used as is when the `,S=` hint beside it matches the file's real size;
otherwise the file is read once to count its line ends (in C).

UIDs are the unique part of the file name (before ":" and ","), which the
delivery agent chose and which never changes when flags are added. A name
that is too long or holds characters UIDL may not carry is replaced by a
digest of itself, which is equally stable across sessions and restarts.

Deletions happen only at UPDATE, one unlink each; messages read whole move
from new/ to cur/ with the S flag so IMAP clients see them as seen. Mail
that arrives in new/ during a session is not listed; the next session sees
it.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Sequence, Set
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import MaildropError, ResponseCode
from ..protocol._stuffing import SizeCounter
from ._base import MessageInfo, is_valid_uid
from .fsutil import fsync_dir
from .sessionlock import SessionLock

LOCK_NAME = ".qpopper-pop3.lock"
_SIZE_HINTS = re.compile(r",S=(\d+)|,W=(\d+)")


@dataclass(slots=True)
class _Entry:
    path: str  # current full path
    subdir: str  # "new" or "cur"
    name: str
    mtime: float


def uid_from_name(name: str) -> str:
    """The stable UID of a Maildir file name."""
    base = name.split(":", 1)[0].split(",", 1)[0]
    if is_valid_uid(base):
        return base
    return hashlib.sha1(name.split(":", 1)[0].encode("utf-8", "surrogateescape")).hexdigest()


def _hinted_size(name: str, real_size: int) -> int | None:
    if "," not in name:
        return None
    base = name.split(":", 1)[0]
    s_hint = w_hint = None
    for match in _SIZE_HINTS.finditer(base):
        if match.group(1) is not None:
            s_hint = int(match.group(1))
        else:
            w_hint = int(match.group(2))
    if w_hint is not None and s_hint == real_size:
        return w_hint
    return None


def _counted_size(path: str) -> int:
    counter = SizeCounter()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            counter.feed(chunk)
    return counter.result()


class MaildirMaildrop:
    """An open Maildir; holds the POP session lock until closed."""

    def __init__(self, path: str, create: bool = False) -> None:
        self.path = path
        self._lock: SessionLock | None = None
        self._entries: list[_Entry] = []
        self._infos: list[MessageInfo] = []
        try:
            if create:
                for sub in ("cur", "new", "tmp"):
                    os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
            elif not os.path.isdir(os.path.join(path, "cur")):
                # A user who never received mail: an empty maildrop, and
                # nothing to lock because there is nothing to delete.
                return
        except OSError as exc:
            raise MaildropError(f"cannot create maildir {path}: {exc}") from exc
        lock = SessionLock(os.path.join(path, LOCK_NAME))
        lock.acquire()
        try:
            self._entries, self._infos = self._scan()
        except BaseException:
            lock.release()
            raise
        self._lock = lock

    def _scan(self) -> tuple[list[_Entry], list[MessageInfo]]:
        entries: list[_Entry] = []
        infos: list[MessageInfo] = []
        found: list[tuple[float, str, str, int]] = []
        for sub in ("cur", "new"):
            directory = os.path.join(self.path, sub)
            try:
                with os.scandir(directory) as it:
                    for de in it:
                        if de.name.startswith("."):
                            continue
                        try:
                            st = de.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        if not (st.st_mode & 0o170000) == 0o100000:
                            continue  # only regular files; symlinks are never served
                        found.append((st.st_mtime, de.name, sub, st.st_size))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise MaildropError(f"cannot list {directory}: {exc}") from exc
        # Delivery order: modification time, then name (names start with
        # the delivery time in seconds, then finer parts).
        found.sort()
        seen_uids: set[str] = set()
        prefixes = {sub: os.path.join(self.path, sub) + os.sep for sub in ("cur", "new")}
        for mtime, name, sub, file_size in found:
            path = prefixes[sub] + name
            size = _hinted_size(name, file_size)
            if size is None:
                try:
                    size = _counted_size(path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise MaildropError(f"cannot read {path}: {exc}") from exc
            uid = uid_from_name(name)
            if uid in seen_uids:
                # Two files with one unique part (a copy by hand): keep both,
                # tell them apart by a digest of the whole name.
                uid = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()
            seen_uids.add(uid)
            flags = name.split(":2,", 1)[1] if ":2," in name else ""
            entries.append(_Entry(path, sub, name, mtime))
            infos.append(MessageInfo(size=size, uid=uid, seen="S" in flags))
        return entries, infos

    def messages(self) -> Sequence[MessageInfo]:
        return self._infos

    def read(self, index: int, chunk_size: int = 65536) -> Iterator[bytes]:
        entry = self._entries[index]
        f: BinaryIO
        try:
            f = open(entry.path, "rb")
        except FileNotFoundError:
            f = self._reopen_moved(entry)
        except OSError as exc:
            raise MaildropError(f"cannot read {entry.path}: {exc}") from exc
        with f:
            while chunk := f.read(chunk_size):
                yield chunk

    def _reopen_moved(self, entry: _Entry) -> BinaryIO:
        """Another agent (an IMAP server) renamed the file: find it by UID."""
        base = entry.name.split(":", 1)[0]
        for sub in ("cur", "new"):
            directory = os.path.join(self.path, sub)
            try:
                names = os.listdir(directory)
            except OSError:
                continue
            for name in names:
                if name.split(":", 1)[0] == base:
                    entry.path, entry.subdir, entry.name = os.path.join(directory, name), sub, name
                    return open(entry.path, "rb")
        raise MaildropError(f"message {entry.name} vanished", ResponseCode.SYS_TEMP)

    def commit(self, deleted: Set[int], retrieved: Set[int]) -> None:
        errors = 0
        for index in sorted(deleted):
            entry = self._entries[index]
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                try:
                    self._reopen_moved(entry).close()
                    os.unlink(entry.path)
                except (MaildropError, OSError):
                    pass  # already gone: the goal of a deletion is reached
            except OSError:
                errors += 1
        for index in sorted(set(retrieved) - set(deleted)):
            entry = self._entries[index]
            if entry.subdir != "new":
                continue
            target = os.path.join(self.path, "cur", entry.name + ":2,S")
            try:
                os.rename(entry.path, target)
            except OSError:
                pass  # the seen flag is a courtesy; the message is intact
        if errors:
            raise MaildropError(f"{errors} deleted messages could not be removed")
        self._fsync_dirs()

    def _fsync_dirs(self) -> None:
        for sub in ("cur", "new"):
            directory = os.path.join(self.path, sub)
            if os.path.isdir(directory):
                fsync_dir(directory)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
