"""Maildir maildrops (new/ and cur/), opened without reading every message.

Listing is one directory scan. Names in the form Dovecot and most delivery
agents write (`unique,S=size,W=wire-size[:2,flags]`) are trusted as they
stand, as Dovecot trusts them: `,W=` is the exact RFC 1939 size, so a drop
of 50,000 such messages lists without a single stat. Any other name costs a
stat, and a file without a usable `,W=` is read once to count its line ends
(in C). A file that no longer matches its `,S=` hint is still sent whole
and as it is; the mismatch is logged.

UIDs are the unique part of the file name (before ":" and ","), which the
delivery agent chose and which never changes when flags are added. A name
that is too long or holds characters UIDL may not carry is replaced by a
digest of itself, which is equally stable across sessions and restarts.
A Maildir that Dovecot or Courier served keeps the UIDLs they gave
(uidimport.py), so clients that leave mail on the server fetch nothing
again after a migration; looking for their files costs a plain Maildir two
failed opens, made only when UIDs are first asked for.

Delivery order is name order: names start with the delivery time, and,
unlike a modification time, a name never changes behind our back.

Deletions happen only at UPDATE, one unlink each; messages read whole get
the S flag (moving from new/ to cur/ if they were new, other flags kept) so
IMAP clients see them as seen. Mail
that arrives in new/ during a session is not listed; the next session sees
it. Symbolic links are never listed and never followed.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import socket
import stat
import struct
import time
from array import array
from collections.abc import Iterator, Sequence, Set
from typing import TYPE_CHECKING

from ..errors import MaildropError, ResponseCode, WouldBlock
from ..wiresize import SizeCounter
from ._base import MaildropSettings, MessageList, is_valid_uid
from .fsutil import fsync_dir
from .fsutil import unlink_quietly as _unlink_quietly
from .packednames import PackedNames
from .sessionlock import SessionLock

if TYPE_CHECKING:
    from .maildirlisting import KeptListing

log = logging.getLogger(__name__)

LOCK_NAME = ".qpopper-pop3.lock"
# Sizes are ASCII digits: [0-9], not \d, which takes any script's digits
# (and int() would read them) and is slower to match.
_SIZE_HINTS = re.compile(r",S=([0-9]+)|,W=([0-9]+)")
# The common name, matched over all names at once (one line each): unique
# part, S=, W= (the group), flags. Names that all match list without a stat.
# A size of more than 18 digits is no file's (and would not fit the sizes'
# array): such a name is sized by reading the file.
_W_DIGITS = 18
_HINTED_NAME = re.compile(rf"^[^\n,:]{{1,70}},S=[0-9]+,W=([0-9]{{1,{_W_DIGITS}}})(?::2,[^\n,]*)?$", re.MULTILINE)
_UID_BYTES = bytes(range(0x21, 0x7F))
_SUBDIRS = ("cur", "new")
# A message's subdirectory as a session holds it: its index in _SUBDIRS, one
# byte a message where a list of the two strings takes eight.
_CUR, _NEW = 0, 1
# A quick open lists directories up to this size (st_size; a few hundred
# to a few thousand names, depending on the file system) and reads no file.
QUICK_DIR_BYTES = 64 * 1024
# From this size (cur/ and new/ together) the listing is kept between
# sessions (maildirlisting; the size is here so that a small Maildir never
# loads that module).
CACHED_DIR_BYTES = 256 * 1024


def _unique_part(name: str) -> str:
    """The part of a name before its size hints and flags."""
    base = name.partition(",")[0]
    # A ":" before the first "," is rare (flags come after the hints): the
    # test costs a sixth of a second partition (about 10 M instructions at 50,000).
    return base.partition(":")[0] if ":" in base else base


def uid_from_name(name: str) -> str:
    """The stable UID of a Maildir file name."""
    base = _unique_part(name)
    if is_valid_uid(base):
        return base
    return hashlib.sha1(name.split(":", 1)[0].encode("utf-8", "surrogateescape")).hexdigest()


def _hints(name: str) -> tuple[int | None, int | None]:
    """The `,S=` and `,W=` sizes a name carries, if any."""
    s_hint = w_hint = None
    for match in _SIZE_HINTS.finditer(name.split(":", 1)[0]):
        if match.group(1) is not None:
            s_hint = int(match.group(1))
        elif len(match.group(2)) <= _W_DIGITS:
            w_hint = int(match.group(2))
    return s_hint, w_hint


def _says_size(name: str, size: int) -> bool:
    """The name carries exactly `,S=size` (the common case, checked without a regex)."""
    hint = f",S={size}"
    at = name.find(hint)
    return at >= 0 and not name[at + len(hint) : at + len(hint) + 1].isdigit()


def _counted_size(path: str) -> int:
    counter = SizeCounter()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            counter.feed(chunk)
    return counter.result()


def _flags(name: str) -> str:
    return name.split(":2,", 1)[1] if ":2," in name else ""


def _with_seen_flag(name: str) -> str:
    """The name with S among its flags, the others kept, in ASCII order as
    Maildir wants them (`1.a` -> `1.a:2,S`, `1.a:2,RT` -> `1.a:2,RST`)."""
    base, info, flags = name.partition(":2,")
    if not info:
        return name + ":2,S"
    return base + ":2," + "".join(sorted(set(flags) | {"S"}))


def _uid_chars_only(text: str) -> bool:
    """Every character is one UIDL may carry (0x21..0x7E). Done as C scans
    of the bytes (deleting the fit ones leaves nothing): a regex search for
    an unfit character, or str.isprintable, costs 25 to 50 instructions a
    character (35 to 70 M at 50,000 names)."""
    return text.isascii() and not text.encode("ascii").translate(None, _UID_BYTES)


def _uids_of(names: Sequence[str]) -> list[str]:
    """UIDs for these names, in order: the unique parts, or digests where a
    unique part is unfit for UIDL or taken twice."""
    uids = [_unique_part(name) for name in names]
    if len(set(uids)) == len(uids) and _uid_chars_only("".join(uids)) and all(0 < len(uid) <= 70 for uid in uids):
        return uids
    uids = []
    taken: set[str] = set()
    for name in names:
        uid = uid_from_name(name)
        if uid in taken:
            # Two files with one unique part (a copy by hand): keep both,
            # tell them apart by a digest of the whole name.
            uid = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()
        taken.add(uid)
        uids.append(uid)
    return uids


def _names_in(directory: str) -> list[str]:
    """The regular files of one subdirectory, not hidden ones ([] if it is missing)."""
    try:
        with os.scandir(directory) as it:
            # is_file/is_symlink answer from the entry's type, no stat
            return [de.name for de in it if de.is_file(follow_symlinks=False) and de.name[0] != "."]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise MaildropError(f"cannot list {directory}: {exc}") from exc


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _list(path: str) -> tuple[list[str], bytearray]:
    """Regular files of cur/ and new/ in name order, and the subdirectory of each."""
    in_cur, in_new = (_names_in(os.path.join(path, sub)) for sub in _SUBDIRS)
    return _merged(in_cur, in_new)


def _merged(in_cur: list[str], in_new: list[str]) -> tuple[list[str], bytearray]:
    names = in_cur + in_new
    names.sort()  # stable: of two equal names, cur/'s (listed first) stays first
    return names, _subdirs_of(names, in_cur, in_new)


def _list_kept(path: str, kept: KeptListing) -> tuple[list[str], bytearray]:
    """`_list` for a big Maildir: a subdirectory unchanged since the kept
    listing (maildirlisting) is not read again; `kept` learns what was read,
    to keep the listing anew when the session ends."""
    from .maildirlisting import NO_STATE, DirState, list_subdir  # only for big Maildirs

    now: dict[str, DirState] = {}
    for sub in _SUBDIRS:
        directory = os.path.join(path, sub)
        try:
            now[sub] = DirState.of(os.stat(directory))
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise MaildropError(f"cannot list {directory}: {exc}") from exc
    listing = kept.load(now)
    read: set[str] = set()  # subdirectories read here (so sorted here)
    for sub in _SUBDIRS:
        if sub not in now:
            listing[sub] = []
            kept.listed(sub, NO_STATE)
        elif sub not in listing:
            listing[sub], state = list_subdir(os.path.join(path, sub), _names_in)
            kept.listed(sub, state)
            read.add(sub)
    in_cur, in_new = listing["cur"], listing["new"]
    in_use = [sub for sub in _SUBDIRS if listing[sub]]
    if len(in_use) < 2 and read.issuperset(in_use):
        # The usual Maildir: the one subdirectory in use was read, and sorted,
        # here (names from the kept file are sorted again: it is untrusted).
        names = in_cur or in_new
        return names, _subdirs_of(names, in_cur, in_new)
    return _merged(in_cur, in_new)


# Where Dovecot and courier-pop3d left the UIDLs they served (uidimport.py).
_IMPORT_FILES = ("dovecot-uidlist", "courierpop3dsizelist")


def _open_import_files(path: str) -> list[tuple[str, int]]:
    """The files of _IMPORT_FILES this Maildir has, opened (never through a
    link, never waiting on a FIFO)."""
    opened = []
    for name in _IMPORT_FILES:
        try:
            fd = os.open(f"{path}/{name}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        opened.append((name, fd))
    return opened


def uids_and_sources(path: str, names: Sequence[str]) -> tuple[list[str], list[str | None]]:
    """Per name, its UID and where an imported one came from (None: ours)."""
    ours = _uids_of(names)
    opened = _open_import_files(path)
    if not opened:
        return ours, [None] * len(names)
    from . import uidimport  # only for Maildirs another server left UIDLs in

    return uidimport.apply_imports(path, names, ours, uidimport.read_imports(path, opened, len(names)))


class _FromNames:
    """A listing's UIDs and seen flags, worked out from its names when first
    asked for. It holds the names, not the maildrop: a cycle through the
    maildrop would keep a big listing alive until the garbage collector's
    next full pass. (One of these and its two bound methods take half the
    bytes of two functools.partials, each of which has a keyword dict.)"""

    __slots__ = ("names", "path")

    def __init__(self, path: str, names: Sequence[str]) -> None:
        self.path = path
        self.names = names

    def uids(self) -> list[str]:
        return uids_and_sources(self.path, self.names)[0]

    def seen(self) -> bytearray:
        return _seen_of(self.names)


def list_maildir(path: str) -> list[str]:
    """The message file names of the Maildir at `path` in name order, without
    taking its lock (for tools that only read)."""
    return _list(path)[0]


def _subdirs_of(names: list[str], in_cur: list[str], in_new: list[str]) -> bytearray:
    """Per name of the sorted listing, _CUR or _NEW (of two equal names,
    cur/'s comes first: the sort is stable and cur/ is listed first)."""
    if not in_cur or not in_new:  # the usual Maildir: one subdirectory in use
        return bytearray((_CUR if in_cur else _NEW,)) * len(names)
    new = set(in_new)
    both = new.intersection(in_cur)
    if not both:
        return bytearray(_NEW if name in new else _CUR for name in names)
    subdirs = bytearray()
    seen_once: set[str] = set()
    for name in names:
        if name in both and name not in seen_once:
            seen_once.add(name)
            subdirs.append(_CUR)
        else:
            subdirs.append(_NEW if name in new else _CUR)
    return subdirs


def _size_array(sizes: list[str] | list[int]) -> array[int]:
    """The sizes in an array: 4 bytes a message where a list of ints takes 36,
    for as long as the session is held (8 if one message has 4 GB or more).
    Packed by struct and copied in whole: array's own constructor converts
    item by item through its argument parser (about 200 instructions each,
    10 M at 50,000)."""
    try:
        return array("I", struct.pack(f"{len(sizes)}I", *map(int, sizes)))
    except struct.error:  # a size of 4 GB or more
        return array("q", struct.pack(f"{len(sizes)}q", *map(int, sizes)))


def _seen_of(names: Sequence[str]) -> bytearray:
    return bytearray(1 if "S" in _flags(name) else 0 for name in names)


class MaildirMaildrop:
    """An open Maildir; holds the POP session lock until closed."""

    # A big Maildir's listing, kept between sessions: set on the instance only
    # for those, so that every other session's object stays as small as before.
    _kept: KeptListing | None = None

    def __init__(
        self, path: str, create: bool = False, quick: bool = False, settings: MaildropSettings | None = None
    ) -> None:
        self.path = path
        self._quick = quick
        self._lock: SessionLock | None = None
        # Per message: its file name and the subdirectory it is in now.
        self._names: list[str] | PackedNames = []
        self._subdirs = bytearray()
        self._infos = MessageList((), ())
        try:
            if create:
                for sub in ("cur", "new", "tmp"):
                    os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
        except OSError as exc:
            raise MaildropError(f"cannot create maildir {path}: {exc}") from exc
        # One stat of each subdirectory answers whether this is a Maildir and
        # how big its listing is (a directory's size grows with its entries).
        cur = _stat_or_none(os.path.join(path, "cur"))
        if not create and (cur is None or not stat.S_ISDIR(cur.st_mode)):
            # A user who never received mail: an empty maildrop, and
            # nothing to lock because there is nothing to delete.
            return
        new = _stat_or_none(os.path.join(path, "new"))
        if quick and (cur is None or new is None or cur.st_size + new.st_size > QUICK_DIR_BYTES):
            # Too big to list on the event loop, or a problem the slow road finds out and says.
            raise WouldBlock(f"{path} is too big to list on the event loop")
        dir_bytes = sum(st.st_size for st in (cur, new) if st is not None)
        # The lock file stays between sessions: made once, it costs an open per
        # login; made and removed each time, a journal transaction or two.
        s = settings or MaildropSettings()
        lock = SessionLock(os.path.join(path, LOCK_NAME), remove=False, shared=s.shared_storage,
                           stale_age=s.stale_age, check_pid=s.check_pid)
        lock.acquire()
        try:
            self._scan(dir_bytes)
        except BaseException:
            lock.release()
            raise
        self._lock = lock

    def _list(self, dir_bytes: int) -> tuple[list[str], bytearray]:
        if not self._quick and dir_bytes >= CACHED_DIR_BYTES:
            from .maildirlisting import KeptListing  # only for big Maildirs

            try:
                owner = os.stat(self.path)
            except OSError as exc:
                raise MaildropError(f"cannot list {self.path}: {exc}") from exc
            self._kept = KeptListing(self.path, owner)
            return _list_kept(self.path, self._kept)
        return _list(self.path)

    def _scan(self, dir_bytes: int) -> None:
        names, subdirs = self._list(dir_bytes)
        joined = "\n".join(names)
        # One line per name: a newline inside a name would make two lines, and
        # their sizes would be taken as those of the names after it.
        one_line_each = joined.count("\n") == len(names) - 1
        sizes = _HINTED_NAME.findall(joined) if one_line_each else []
        if one_line_each and len(sizes) == len(names):
            # Packed while the session only lists: about half the bytes of the list.
            # Only a listing small enough to list on the event loop, so that the
            # split at the first RETR costs the loop no more than that (50,000
            # names take 6 ms to split).
            small = dir_bytes <= QUICK_DIR_BYTES
            self._names, self._subdirs = PackedNames(joined, len(names)) if small else names, subdirs
        else:
            sizes = self._sizes_one_by_one(names, subdirs)
        # UIDs and seen flags come from the names when first asked for.
        deferred = _FromNames(self.path, self._names)
        self._infos = MessageList(_size_array(sizes), deferred.uids, deferred.seen)

    def _sizes_one_by_one(self, names: list[str], subdirs: bytearray) -> list[int]:
        """The general case: any name; a file without a `,W=` is read to size it.
        Sets the names (and subdirectories) of the files still there."""
        sizes: list[int] = []
        kept: list[int] = []
        for i, name in enumerate(names):
            sub = _SUBDIRS[subdirs[i]]
            path = os.path.join(self.path, sub, name)
            size = _hints(name)[1]
            if size is None:
                if self._quick:
                    raise WouldBlock(f"{path} must be read to know its size")
                try:
                    size = _counted_size(path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise MaildropError(f"cannot read {path}: {exc}") from exc
            kept.append(i)
            sizes.append(size)
        self._names = [names[i] for i in kept]
        self._subdirs = bytearray(subdirs[i] for i in kept)
        return sizes

    def messages(self) -> MessageList:
        return self._infos

    def read(self, index: int, chunk_size: int = 65536) -> Iterator[bytes]:
        # Plain descriptor reads: a file object would cost three more
        # system calls per message (fstat, ioctl, lseek) on every RETR.
        fd, size = self._open(index)
        try:
            name = self._names[index]
            if not _says_size(name, size) and (s_hint := _hints(name)[0]) is not None and s_hint != size:
                log.warning("%s: %s no longer has the size its name says; sent as it is", self.path, name)
            want = size + 1 if size < 4 * chunk_size else chunk_size  # small: whole in one read
            while chunk := os.read(fd, want):
                yield chunk
                if len(chunk) < want:
                    break  # a short read of a regular file is its end: no read to hear b""
                want = chunk_size
        finally:
            os.close(fd)

    def _path(self, index: int) -> str:
        return f"{self.path}/{_SUBDIRS[self._subdirs[index]]}/{self._names[index]}"

    def _open(self, index: int) -> tuple[int, int]:
        """The message's file descriptor and size, never through a link nor
        for anything but a regular file."""
        if type(self._names) is PackedNames:
            # The session reads messages: from now on names go by number, from a list.
            self._names = self._names.unpacked()
        path = self._path(index)
        try:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                self._find_moved(index)
                path = self._path(index)
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except MaildropError:
            raise
        except OSError as exc:
            raise MaildropError(f"cannot read {path}: {exc}", ResponseCode.SYS_TEMP) from exc
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise MaildropError(f"{path} is not a regular file", ResponseCode.SYS_TEMP)
        return fd, st.st_size

    def _find_moved(self, index: int) -> None:
        """Another agent (an IMAP server) renamed the file: find it by its unique part."""
        base = self._names[index].split(":", 1)[0]
        for code, sub in enumerate(_SUBDIRS):
            try:
                names = os.listdir(os.path.join(self.path, sub))
            except OSError:
                continue
            for name in names:
                if name.split(":", 1)[0] == base:
                    self._names[index], self._subdirs[index] = name, code
                    return
        raise MaildropError(f"message {self._names[index]} vanished", ResponseCode.SYS_TEMP)

    def _lacks_seen(self, index: int) -> bool:
        """In new/, or in cur/ without the S flag: UPDATE marks it seen."""
        return self._subdirs[index] == _NEW or "S" not in _flags(self._names[index])

    def writes_nothing(self, deleted: Set[int], retrieved: Set[int]) -> bool:
        if self._kept is not None and self._kept.fresh:
            return False  # close may keep the listing (in a worker thread)
        return not deleted and not any(self._lacks_seen(i) for i in retrieved)

    def commit(self, deleted: Set[int], retrieved: Set[int]) -> None:
        if not deleted and not any(self._lacks_seen(i) for i in retrieved):
            return
        errors = 0
        for index in sorted(deleted):
            try:
                os.unlink(self._path(index))
            except FileNotFoundError:
                try:
                    self._find_moved(index)
                    os.unlink(self._path(index))
                except (MaildropError, OSError):
                    pass  # already gone: the goal of a deletion is reached
            except OSError:
                errors += 1
        for index in sorted(set(retrieved) - set(deleted)):
            if not self._lacks_seen(index):
                continue
            target = os.path.join(self.path, "cur", _with_seen_flag(self._names[index]))
            try:
                os.rename(self._path(index), target)
            except OSError:
                pass  # the seen flag is a courtesy; the message is intact
        if errors:
            raise MaildropError(f"{errors} deleted messages could not be removed")
        self._fsync_dirs()

    def _fsync_dirs(self) -> None:
        for sub in _SUBDIRS:
            directory = os.path.join(self.path, sub)
            if os.path.isdir(directory):
                fsync_dir(directory)

    def close(self) -> None:
        """Release the session lock, after keeping the listing of a big Maildir
        (under the lock, so that two sessions never write it at once; at the
        end, so that it is off the login's path and the session's own UPDATE
        is seen: a directory it changed is not kept)."""
        try:
            kept = self._kept
            if kept is not None:
                del self._kept
                kept.close(self._names, [_SUBDIRS[code] for code in self._subdirs])
        finally:
            if self._lock is not None:
                lock, self._lock = self._lock, None
                lock.release()


# ---- delivery ----------------------------------------------------------------------

class _DeliveryClock:
    """The last delivery's time stamp (ns), to keep names in order."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = 0

    def next(self) -> int:
        """Now, or 1000 ns after the last stamp if the clock has not moved on."""
        self.last = max(time.time_ns(), self.last + 1000)
        return self.last


_delivery_clock = _DeliveryClock()


def _unique_name() -> str:
    """`<seconds>.M<microseconds>P<pid>.<host>`, the usual Maildir name,
    later than any this process gave before (names sort in delivery order)."""
    now = _delivery_clock.next()
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    return f"{now // 10**9}.M{now // 1000 % 10**6:06d}P{os.getpid()}.{host}"


def deliver_to_maildir(path: str, message: bytes, *, uid: str | None = None) -> str:
    """Deliver as Maildir MDAs do: write and fsync in tmp/, rename into new/
    (creating the Maildir if missing), fsync new/; a name already in new/ is
    refused, never replaced. The file is named `uid`
    (its UID, so it must be fit for UIDL and hold no "/", "," or ":") or a
    fresh unique name. Returns the new file's path. File-system failures
    raise OSError."""
    if uid is None:
        name = _unique_name()
    elif is_valid_uid(uid) and not set(uid) & set("/,:") and uid[0] != ".":
        name = uid
    else:
        raise MaildropError(f"{uid!r} cannot name a Maildir message", ResponseCode.SYS_PERM)
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
    tmp = os.path.join(path, "tmp", name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(message)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    target = os.path.join(path, "new", name)
    try:
        os.link(tmp, target)  # unlike rename, never replaces a message of that name
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP) or os.path.lexists(target):
            _unlink_quietly(tmp)
            raise
        os.rename(tmp, target)  # a file system without hard links
    else:
        os.unlink(tmp)
    fsync_dir(os.path.join(path, "new"))
    return target
