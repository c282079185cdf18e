"""A big Maildir's listing, kept between sessions: a directory that did not change is not read.

Listing 50,000 names costs the directory reads and the sort into delivery
order. A session that listed a big Maildir (cur/ and new/ together at
least `maildir.CACHED_DIR_BYTES` of directory) keeps, in `qpopper-listing` in the
Maildir, each subdirectory's names in order with the directory's identity
and times. The next session reads again only a subdirectory whose device,
inode, modification or change time differ (a delivery renames into new/,
an IMAP server renames within cur/: each changes that directory's times);
the names of an unchanged one come from the file.

The file is untrusted (it sits in the user's Maildir): it is used only if
it is a regular file with one name, owned by the Maildir's owner and
writable by no one else, its SHA-256, format and version are right, and
every name is one a listing could give (no "/", no NUL, no leading dot).
A subdirectory's times are recorded only if they were the same before and
after reading it and its last change was older than a clock tick (with
coarse timestamps a rename in the same tick leaves the times as they
were); otherwise it is read again next time. The worst a planted file can
do is what a user renaming files in their own Maildir can: list names
that are gone (RETR answers -ERR, DELE finds nothing to remove) or leave
some out (they are not removed either: UPDATE only removes listed names);
it never makes the server open anything outside the Maildir's cur/ and
new/, nor follow a link.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import time
from collections.abc import Callable
from typing import NamedTuple

from .._version import __version__
from .fsutil import give_owner, unlink_quietly

LISTING_NAME = "qpopper-listing"
SETTLED_NS = 10_000_000
MAX_FILE_BYTES = 256 << 20

_MAGIC = b"QPMDIRL1"
_VERSION = __version__.encode("ascii")[:32].ljust(32, b"\0")
# magic, version; per subdirectory (cur, new): device, inode, mtime, ctime, names' text length
_HEAD = struct.Struct("<8s32s QQqqQ QQqqQ")
_DIGEST = 32


class DirState(NamedTuple):
    dev: int
    ino: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> DirState:
        return cls(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


NO_STATE = DirState(0, 0, 0, 0)


def list_subdir(directory: str, scan: Callable[[str], list[str]]) -> tuple[list[str], DirState]:
    """`scan(directory)` sorted, and the directory's state if it held still
    while it was read (NO_STATE if not: it is read again next time)."""
    before = os.stat(directory)
    settled = time.time_ns() - before.st_ctime_ns >= SETTLED_NS
    names = scan(directory)
    names.sort()
    after = os.stat(directory)
    if not settled or DirState.of(before) != DirState.of(after):
        return names, NO_STATE
    return names, DirState.of(after)


def load(path: str, owner: os.stat_result) -> dict[str, tuple[DirState, list[str]]]:
    """The kept listing of each subdirectory, as far as it may be trusted ({} if none)."""
    data = _read_trusted(os.path.join(path, LISTING_NAME), owner)
    if data is None:
        return {}
    try:
        magic, version, *fields = _HEAD.unpack_from(data)
    except struct.error:
        return {}
    if magic != _MAGIC or version != _VERSION:
        return {}
    out: dict[str, tuple[DirState, list[str]]] = {}
    pos = _HEAD.size
    for k, sub in enumerate(("cur", "new")):
        dev, ino, mtime, ctime, length = fields[5 * k : 5 * k + 5]
        text = data[pos : pos + length]
        pos += length
        if len(text) != length or pos > len(data) - _DIGEST:
            return {}
        if (dev, ino) == (0, 0) or not _plausible(text):
            continue
        names = os.fsdecode(text).split("\n") if text else []
        out[sub] = (DirState(dev, ino, mtime, ctime), names)
    return out


def save(path: str, listing: dict[str, tuple[DirState, list[str]]], owner: os.stat_result) -> None:
    """Write the listing (a failure is ignored: the next session reads the directories)."""
    fields: list[int] = []
    texts: list[bytes] = []
    for sub in ("cur", "new"):
        state, names = listing.get(sub, (NO_STATE, []))
        joined = "\n".join(names)
        if state == NO_STATE or joined.count("\n") != max(0, len(names) - 1):
            state, text = NO_STATE, b""  # (a name with a newline: that directory is read each time)
        else:
            text = os.fsencode(joined)
        fields += [*state, len(text)]
        texts.append(text)
    body = _HEAD.pack(_MAGIC, _VERSION, *fields) + b"".join(texts)
    target = os.path.join(path, LISTING_NAME)
    tmp = target + ".new"
    try:
        unlink_quietly(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            give_owner(fd, owner.st_uid, owner.st_gid)
            os.fchmod(fd, 0o600)
            data = memoryview(body + hashlib.sha256(body).digest())
            while data:
                data = data[os.write(fd, data) :]
        finally:
            os.close(fd)
        os.rename(tmp, target)  # no fsync: a torn file fails its digest
    except OSError:
        unlink_quietly(tmp)


def _plausible(text: bytes) -> bool:
    """Names a listing could give: no "/" or NUL, none empty, none with a leading dot."""
    if not text:
        return True
    return (b"/" not in text and b"\0" not in text and b"\n\n" not in text and b"\n." not in text
            and text[:1] not in (b".", b"\n") and not text.endswith(b"\n"))


def _read_trusted(path: str, owner: os.stat_result) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != owner.st_uid
                or st.st_mode & 0o022 or not _HEAD.size + _DIGEST <= st.st_size <= MAX_FILE_BYTES):
            return None
        chunks = []
        left = st.st_size
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                return None
            chunks.append(chunk)
            left -= len(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if hashlib.sha256(memoryview(data)[:-_DIGEST]).digest() != data[-_DIGEST:]:
        return None
    return data
