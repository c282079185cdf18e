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
writable by no one else (`fsutil.open_kept`), the SHA-256 of its head and
of the names used, its format and version are right, and every name is
one a listing could give (no "/", no NUL, no leading dot).
A subdirectory's times are recorded only if they were the same before and
after reading it and its last change was older than a clock tick (with
coarse timestamps a rename in the same tick leaves the times as they
were); otherwise it is read again next time.

The file is written when the session ends (`KeptListing.close`), off the
login's path, and only when it pays: some subdirectory was read in this
session and its times are still those it had when it was read (nothing was
delivered, renamed or removed in it since, by anyone, this session's UPDATE
included); a listing the next session would find stale anyway is not
written. It is rewritten whole, not appended to: the names added and
removed since the file are known only by comparing the two listings, which
costs more than writing it again (at 50,000 names, about 20 ms of set
operations against 7 ms to join, encode and digest). A session reads the
fixed-size head first and a subdirectory's names only if its times match,
so the part of a kept listing that cannot help (new/ after a delivery)
costs nothing but the head's read. The worst a planted file can
do is what a user renaming files in their own Maildir can: list names
that are gone (RETR answers -ERR, DELE finds nothing to remove) or leave
some out (they are not removed either: UPDATE only removes listed names);
it never makes the server open anything outside the Maildir's cur/ and
new/, nor follow a link.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from .._version import __version__
from .fsutil import DIGEST_BYTES, digest_holds, open_kept, read_at, write_kept

LISTING_NAME = "qpopper-listing"
SETTLED_NS = 10_000_000
MAX_FILE_BYTES = 256 << 20
SUBDIRS = ("cur", "new")

_MAGIC = b"QPMDIRL3"
_VERSION = __version__.encode("ascii")[:32].ljust(32, b"\0")
# magic, version; per subdirectory (cur, new): device, inode, mtime, ctime,
# names' text length, the text's SHA-256. The head is followed by its own
# SHA-256, then each subdirectory's names (one per line): a session checks
# and reads only the names it can use.
_HEAD = struct.Struct("<8s32s QQqqQ32s QQqqQ32s")
_FIELDS = 6


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


class KeptListing:
    """A session's link to the kept listing of its Maildir: the state each
    subdirectory was listed in, and whether the file should be written when
    the session ends (held by the maildrop, the names are not: the maildrop
    has them, and a big listing held twice would cost every idle session)."""

    __slots__ = ("fresh", "owner", "path", "states")

    def __init__(self, path: str, owner: os.stat_result) -> None:
        self.path = path
        self.owner = owner
        self.states: dict[str, DirState] = {}  # as listed in this session (NO_STATE: not to be kept)
        self.fresh = False  # some subdirectory was read in this session, in a state worth keeping

    def load(self, now: dict[str, DirState]) -> dict[str, list[str]]:
        """The kept names of each subdirectory whose state is `now`'s ({} if none)."""
        opened = open_kept(os.path.join(self.path, LISTING_NAME), self.owner.st_uid,
                           _HEAD.size + DIGEST_BYTES, MAX_FILE_BYTES)
        if opened is None:
            return {}
        fd, size = opened
        out: dict[str, list[str]] = {}
        try:
            head = read_at(fd, 0, _HEAD.size + DIGEST_BYTES)
            if not digest_holds(head):
                return {}
            magic, version, *fields = _HEAD.unpack_from(head)
            if magic != _MAGIC or version != _VERSION:
                return {}
            pos = len(head)
            sections = []
            for k, sub in enumerate(SUBDIRS):
                state = DirState(*fields[_FIELDS * k : _FIELDS * k + 4])
                length, digest = fields[_FIELDS * k + 4 : _FIELDS * k + 6]
                sections.append((sub, state, pos, length, digest))
                pos += length
            if pos != size:
                return {}
            for sub, state, at, length, digest in sections:
                # Only a subdirectory as it was kept: the others' names are not even read.
                if state == NO_STATE or state != now.get(sub):
                    continue
                text = read_at(fd, at, length)
                if hashlib.sha256(text).digest() == digest and _plausible(text):
                    out[sub] = os.fsdecode(text).split("\n") if text else []
                    self.states[sub] = state
        except (OSError, EOFError, struct.error):
            return {}
        finally:
            os.close(fd)
        return out

    def listed(self, sub: str, state: DirState) -> None:
        """`sub` was read in this session, in `state` (NO_STATE: changing as it was read)."""
        self.states[sub] = state
        self.fresh = self.fresh or state != NO_STATE

    def close(self, names: Sequence[str], subdirs: list[str]) -> None:
        """Write the listing (`names` in order, each in `subdirs`' subdirectory)
        if it pays: some subdirectory read in this session is as it was
        then. A failure is ignored: the next session reads the directories."""
        if not self.fresh:
            return
        self.fresh = False
        states = dict(self.states)
        for sub in SUBDIRS:
            try:
                now = DirState.of(os.stat(os.path.join(self.path, sub)))
            except OSError:
                now = NO_STATE
            if states.get(sub) != now:
                states[sub] = NO_STATE  # changed in the session: the next one reads it again
        if all(state == NO_STATE for state in states.values()):
            return
        fields: list[int | bytes] = []
        texts: list[bytes] = []
        for sub in SUBDIRS:
            state = states.get(sub, NO_STATE)
            mine = [name for name, where in zip(names, subdirs, strict=True) if where == sub] \
                if state != NO_STATE else []
            joined = "\n".join(mine)
            if state == NO_STATE or joined.count("\n") != max(0, len(mine) - 1):
                state, text = NO_STATE, b""  # (a name with a newline: that directory is read each time)
            else:
                text = os.fsencode(joined)
            fields += [*state, len(text), hashlib.sha256(text).digest()]
            texts.append(text)
        head = _HEAD.pack(_MAGIC, _VERSION, *fields)
        body = head + hashlib.sha256(head).digest() + b"".join(texts)
        try:
            write_kept(os.path.join(self.path, LISTING_NAME), body, self.owner, digest=False)
        except OSError:
            pass


def _plausible(text: bytes) -> bool:
    """Names a listing could give: no "/" or NUL, none empty, none with a leading dot."""
    if not text:
        return True
    return (b"/" not in text and b"\0" not in text and b"\n\n" not in text and b"\n." not in text
            and text[:1] not in (b".", b"\n") and not text.endswith(b"\n"))
