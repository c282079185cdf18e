"""The index of a big spool, kept between sessions: a poll pays for what arrived since.

A session that indexed a spool of at least `spool.CACHED_SPOOL_BYTES` (server mode)
writes what it learned, when it ends, to `.<name>.qpopper-index` beside the spool (see
`paths`): every message's offsets, size, flags and, once a UIDL asked for
them, UIDs, with the spool's identity. The next session loads it and, when
the spool only grew, indexes only from the last known message on
(`mboxindex.extend_index`); when it did not change, indexes nothing.

The file is untrusted input. It sits where the spool's owner can write it
(and, in a world-writable spool directory, where anyone can create the
name), so it is used only if every check below passes; any failure costs a
full index, as without a cache, and the next session writes a new one:

* the file itself: opened without following links, a regular file with one
  name, owned by the spool's owner and writable by no one else, of a
  plausible size; its SHA-256 (a torn or corrupt file), its format, the
  machine's byte order, the version of qpopper and the index settings
  (Content-Length trust) are those of this server;
* its structure: every offset inside the indexed length, in order (From_
  line, message, body, end, next segment), segments tiling the length;
* the spool's identity: the same device and inode, not shorter than the
  indexed length; if not longer, the same modification and change times
  (ctime cannot be set back by a user), trusted only when the last change
  was older than a clock tick when the index was made, the locks still held
  (a file system with coarse timestamps gives a write in the same tick the
  same times);
* the content, sampled: `SAMPLES` messages chosen at random at each load
  (so a planted file cannot know which), and the first and last, are
  indexed again from their bytes in the spool, and every cached field of
  them (offsets, size, flags, X-UIDL) must come out the same, and so
  must the UIDs of others at the first UIDL (`mboxindex.work_out_uids`); a
  rewrite by another program that moves any message moves all that follow
  it, so one sampled message after it is enough to catch it;
* new mail: what follows the indexed length starts with a From_ line after
  optional empty lines, as delivery agents write it.

A session that extended the index it loaded appends what it learned to
the file as one record (the messages from the last known one on, the new
parts of the fingerprint, the spool's new length and times) instead of
writing the whole index again (3 MB at 50,000 messages); each record ends
with the SHA-256 of the digest before it and the record, a chain from the
base's digest, so a record torn by a crash, altered, repeated or out of
order fails the chain and the whole file is refused (a full index). A
record is appended only to the file that session loaded (same device,
inode and size, still the owner's alone); the file is written whole when
UIDs were worked out in the session, after `MAX_RECORDS` records, or when
the records reach half the base's size.

A same-length rewrite of From_ lines before a delivery moves no boundary,
so the samples pass; at the first UIDL the From_ lines then disagree with
the kept fingerprint, and the session confirms its index by a full one
(every boundary and flag as it has them) and takes that one's fingerprint,
or, if they differ, answers -ERR [SYS/TEMP] and removes the cache.

What a sample cannot see is a same-length rewrite inside messages that
moves no boundary (an IMAP server flipping a flag in place) followed by a
delivery: the cached flags and UIDs of those messages stay, but every
message's bytes are still read from the spool at RETR, boundaries are
right, and UPDATE checks the spool against the fingerprint first, as
within any session. A cache forged by the spool's owner gains them nothing
their write access to the spool does not already give.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import operator
import os
import random
import stat
import struct
import sys
import time
from array import array
from typing import NamedTuple

from ..._version import __version__
from ..fsutil import DIGEST_BYTES, open_kept, read_at, unlink_quietly, write_all, write_kept
from ..mboxindex import (
    MAX_FROM_LINE,
    PART_DIGEST,
    MboxIndex,
    extend_index,
    index_buffer,
    index_file,
    is_from_line,
    read_exact,
)
from .paths import index_cache_path

log = logging.getLogger("qpopper.maildrop.mbox")

# Messages indexed again at each load, besides the first and the last.
SAMPLES = 48
# A sampled message longer than this is checked by its From_ line and its end only.
SAMPLE_MAX_BYTES = 256 * 1024
# New mail read in one piece to extend an index; more than this is indexed whole.
REGION_MAX_BYTES = 64 << 20
# The spool's times are trusted only if its last change was this much older
# than the index (timestamps are taken from a coarse clock: a write in the
# same tick leaves them as they were).
SETTLED_NS = 10_000_000
# No spool needs a bigger file (about 70 octets per message).
MAX_FILE_BYTES = 512 << 20

_MAGIC = b"QPMBXIX" + (b"L" if sys.byteorder == "little" else b"B")
_FORMAT = 1
_VERSION = __version__.encode("ascii")[:32].ljust(32, b"\0")
# magic, format, flags; device, inode, length, mtime, ctime; messages, parts,
# X-UIDL count, X-UIDL text and UID text lengths; Content-Length reaches;
# fingerprint; qpopper's version.
_HEAD = struct.Struct("<8sII QQQqq QQQQQ qq 20s 32s")
_DIGEST = DIGEST_BYTES
# A record appended for mail that arrived (see `save`): flags; the spool's
# length, mtime and ctime; messages kept before it, messages it holds; parts
# of the fingerprint, X-UIDL count, X-UIDL text and UID text lengths;
# Content-Length reaches; fingerprint. Then the messages' offsets, sizes and
# flags, the parts, X-UIDLs (message numbers, text), UIDs, and the SHA-256
# of the digest before it and the record.
_RECORD = struct.Struct("<8sI Qqq QQ QQQQ qq 20s")
_RECORD_MAGIC = b"QPMBXRC" + (b"L" if sys.byteorder == "little" else b"B")
# Records appended before the file is written whole again (each costs a
# little at every load; the bytes they may add are bounded too, see `save`).
MAX_RECORDS = 64
_CONTENT_LENGTH = 1
_SETTLED = 2
_HAS_UIDS = 4
_UID_BYTES = bytes(range(0x21, 0x7F))


class SpoolState(NamedTuple):
    """The spool as it was indexed (fstat under the locks)."""

    dev: int
    ino: int
    mtime_ns: int
    ctime_ns: int
    settled: bool  # its last change was older than a clock tick

    @classmethod
    def of(cls, st: os.stat_result) -> SpoolState:
        settled = time.time_ns() - st.st_ctime_ns >= SETTLED_NS
        return cls(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, settled)


class _File(NamedTuple):
    """The cache file as a session loaded it: appended to at the end of the
    session only if it is still exactly this file."""

    dev: int
    ino: int
    size: int
    records: int  # records appended to its base
    record_bytes: int
    digest: bytes  # the last link of its chain of digests
    has_uids: bool


class KeptIndex:
    """A session's link to the cache of its spool: the spool as indexed,
    and whether the cache holds the index as the session has it."""

    __slots__ = ("extended_from", "file", "from_cache", "owner", "path", "pending", "state", "uids_kept",
                 "use_content_length")

    def __init__(self, path: str, st: os.stat_result, use_content_length: bool) -> None:
        self.path = path
        self.owner = st
        self.state = SpoolState.of(st)
        self.use_content_length = use_content_length
        self.uids_kept = False
        self.from_cache = False  # the session's index came from the cache
        # The session's index differs from the cache: written when the session
        # ends (off the login's path; a session that dies first costs the
        # next one a full index, nothing else).
        self.pending = False
        self.file: _File | None = None  # the cache file the index came from
        # The index is the cache's extended by mail that arrived since: the
        # messages it had (the last one is indexed again by the extension).
        self.extended_from = 0

    def load(self, fd: int) -> tuple[MboxIndex, bool] | None:
        """The index of the spool open on `fd`, from the cache, and whether it
        was extended (so differs from the cache); None: index whole."""
        path = index_cache_path(self.path)
        opened = open_kept(path, self.owner.st_uid, _HEAD.size + _DIGEST, MAX_FILE_BYTES)
        if opened is None:
            return None
        cache_fd, size = opened
        try:
            cache_st = os.fstat(cache_fd)
            data = read_at(cache_fd, 0, size)
        except (OSError, EOFError):
            return None
        finally:
            os.close(cache_fd)
        try:
            index, file, spool_state = _parse(data, cache_st, self.use_content_length)
            count = len(index)
            loaded = _check_and_extend(index, spool_state, fd, self.owner, self.use_content_length)
        except (ValueError, IndexError, struct.error, UnicodeDecodeError, OSError, EOFError) as exc:
            log.info("%s: index cache not used (%s)", self.path, exc)
            return None
        if loaded is None:
            return None
        self.uids_kept = bool(loaded[0].raw_uid_text) and not loaded[1]
        self.from_cache = True
        self.file = file
        self.extended_from = count if loaded[1] else 0
        return loaded

    def confirm(self, index: MboxIndex, fd: int) -> bool:
        """Whether `index` may be written from (see `confirm`)."""
        return not self.from_cache or confirm(index, fd, self.use_content_length)

    def refresh(self, index: MboxIndex, fd: int) -> bool:
        """After the From_ lines disagreed with a cached index's fingerprint:
        whether a full index of the same length gives every message where
        `index` has it, with the same flags (then `index` takes its
        fingerprint, its kept UIDs are dropped, and the cache is written
        whole at the end); if not, the session cannot go on with it."""
        if not self.from_cache or self.file is None:
            return False  # not from the cache, or refreshed once already
        full = index_file(fd, index.length, use_content_length=self.use_content_length)
        if any(getattr(full, name) != getattr(index, name) for name in _CONFIRMED):
            return False
        index.fingerprint, index.fp_parts, index.fp_digests = full.fingerprint, full.fp_parts, full.fp_digests
        index.cl_reach_before_last, index.cl_reach_last = full.cl_reach_before_last, full.cl_reach_last
        index.raw_uids, index.raw_uid_text, index.raw_renamed = None, b"", None
        # Still from_cache: that full index was made without the locks, so
        # UPDATE confirms the index again under them before it writes.
        self.file = None
        self.pending = True
        return True

    def forget(self) -> None:
        """Remove the cache: it describes a spool that is no more."""
        unlink_quietly(index_cache_path(self.path))
        self.uids_kept = True  # nothing more to write in this session
        self.pending = False

    def indexed(self) -> None:
        """Called once the spool is indexed, the locks still held: whether
        its times can be trusted next time is judged now (a writer waiting
        for the locks writes after this instant)."""
        self.state = SpoolState.of(self.owner)

    def needs_saving(self, index: MboxIndex) -> bool:
        """The index changed, or UIDs were worked out, since the cache was written."""
        return self.pending or (index.uids is not None and not self.uids_kept)

    def save(self, index: MboxIndex) -> None:
        """Keep `index`: what an extension added as a record appended to the
        file it was loaded from, where that may be; else the whole file anew."""
        self.pending = False
        if not len(index):
            return  # nothing to keep
        record = self._record(index)
        if record is not None and self.file is not None and _append(index_cache_path(self.path), record,
                                                                    self.file, self.owner):
            self.uids_kept = self.file.has_uids
            return
        if _save(self.path, index, self.state, self.use_content_length, self.owner):
            self.uids_kept = index.uids is not None or index.raw_uids is not None
        else:
            self.uids_kept = True  # no second try in this session

    def _record(self, index: MboxIndex) -> bytes | None:
        """The record that takes the loaded file to `index`, if appending one pays."""
        file = self.file
        if file is None or not self.extended_from or file.records >= MAX_RECORDS:
            return None
        raw = _raw_uids(index)
        if file.has_uids != (raw is not None):
            return None  # UIDs worked out in this session (or lost): the whole file keeps them
        try:
            record = _encode_record(index, self.extended_from - 1, raw, self.state)
        except ValueError:
            return None
        if file.record_bytes + len(record) > max(file.size // 2, 1 << 16):
            return None  # the records would outgrow a rewrite
        return record


def _save(spool: str, index: MboxIndex, state: SpoolState, use_content_length: bool, owner: os.stat_result) -> bool:
    """Write the cache for `index` of the spool in `state`, replacing any;
    False if it could not be written (the next session indexes whole)."""
    try:
        write_kept(index_cache_path(spool), _encode(index, state, use_content_length), owner)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            log.warning("%s: cannot write the index cache: %s", spool, exc)
        return False
    return True


def _append(path: str, record: bytes, file: _File, owner: os.stat_result) -> bool:
    """Append `record` (and the next link of the digest chain) to the cache
    file, if it is still the one loaded (same file, same size, ours); False
    if not, or if the write failed (then cut back to what it was)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != owner.st_uid
                or st.st_mode & 0o022 or (st.st_dev, st.st_ino, st.st_size) != (file.dev, file.ino, file.size)):
            return False
        try:
            write_all(fd, record + hashlib.sha256(file.digest + record).digest())
        except OSError:
            os.ftruncate(fd, file.size)  # a torn record would fail its digest anyway; this saves a full index
            return False
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


# ---- reading ---------------------------------------------------------------------


class _Reader:
    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data, self.pos, self.end = data, pos, end

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > self.end:
            raise ValueError("truncated")
        out = memoryview(self.data)[self.pos : self.pos + n]
        self.pos += n
        return out

    def array(self, n: int) -> array[int]:
        out = array("q")
        out.frombytes(self.take(8 * n))
        return out

    def digest(self, prev: bytes, start: int) -> bytes:
        """The next link of the chain: the SHA-256 of `prev` and the octets from `start` to here."""
        h = hashlib.sha256(prev)
        h.update(memoryview(self.data)[start : self.pos])
        if self.pos + _DIGEST > len(self.data) or h.digest() != self.data[self.pos : self.pos + _DIGEST]:
            raise ValueError("torn or corrupt")
        self.pos += _DIGEST
        return h.digest()


def _parse(
    data: bytes, cache_st: os.stat_result, use_content_length: bool
) -> tuple[MboxIndex, _File, tuple[int, int, int, int, bool]]:
    """The index a cache file holds (its base, then each record applied in
    turn), each part's digest checked; not yet checked against the spool."""
    (magic, fmt, flags, dev, ino, length, mtime_ns, ctime_ns, n, nparts, nx, xlen, ulen,
     cl_before, cl_last, fp, version) = _HEAD.unpack_from(data)
    if magic != _MAGIC or fmt != _FORMAT or version != _VERSION:
        raise ValueError("written by another version")
    if bool(flags & _CONTENT_LENGTH) != use_content_length:
        raise ValueError("made with another Content-Length setting")
    if not 1 <= n <= length or not 1 <= nparts <= n:
        raise ValueError("implausible counts")
    r = _Reader(data, _HEAD.size, len(data) - _DIGEST)
    index = MboxIndex(length=length)
    index.from_starts, index.starts, index.body_starts, index.ends, index.sizes = (r.array(n) for _ in range(5))
    index.seen, index.crlf = bytearray(r.take(n)), bytearray(r.take(n))
    index.fp_parts = tuple(r.array(nparts))
    index.fp_digests = bytes(r.take(PART_DIGEST * nparts))
    xidx = r.array(nx)
    xtext = bytes(r.take(xlen))
    utext = bytes(r.take(ulen))
    index.fingerprint, index.cl_reach_before_last, index.cl_reach_last = fp, cl_before, cl_last
    _add_xuidls(index, xidx, xtext, 0)
    has_uids = bool(flags & _HAS_UIDS)
    digest = r.digest(b"", 0)
    base_end = r.pos
    records = 0
    settled = bool(flags & _SETTLED)
    while r.pos < len(data):
        start = r.pos
        r.end = len(data) - _DIGEST
        (magic, rflags, length, mtime_ns, ctime_ns, keep, added, nparts, nx, xlen, ulen,
         cl_before, cl_last, fp) = _RECORD.unpack(r.take(_RECORD.size))
        if magic != _RECORD_MAGIC or keep != len(index) - 1 or index.fp_parts[-1:] != (1,) or added < 1 \
                or not 1 <= nparts <= added or length <= index.length:
            raise ValueError("a record that does not follow")
        _apply(index, r, keep, added, nparts, length)
        _add_xuidls(index, r.array(nx), bytes(r.take(xlen)), keep)
        new_uids = bytes(r.take(ulen))
        if has_uids and rflags & _HAS_UIDS:
            utext = (utext[: utext.rfind(b"\n") + 1] if keep else b"") + new_uids
        else:
            has_uids, utext = False, b""
        index.fingerprint, index.cl_reach_before_last, index.cl_reach_last = fp, cl_before, cl_last
        settled = bool(rflags & _SETTLED)
        digest = r.digest(digest, start)
        records += 1
    index.seg_ends = index.from_starts[1:]
    index.seg_ends.append(index.length)
    _check_structure(index, index.fp_parts)
    if has_uids:
        _check_uid_text(utext, len(index))
        index.raw_uid_text = utext  # split at the first UIDL
    file = _File(cache_st.st_dev, cache_st.st_ino, len(data), records, len(data) - base_end, digest, has_uids)
    return index, file, (dev, ino, mtime_ns, ctime_ns, settled)


def _apply(index: MboxIndex, r: _Reader, keep: int, added: int, nparts: int, length: int) -> None:
    """A record's messages in place of the last one and after it (as
    `extend_index` made them), and its parts of the fingerprint."""
    for name in ("from_starts", "starts", "body_starts", "ends", "sizes"):
        values: array[int] = getattr(index, name)
        del values[keep:]
        values.extend(r.array(added))
    del index.seen[keep:], index.crlf[keep:]
    index.seen += r.take(added)
    index.crlf += r.take(added)
    index.fp_parts = index.fp_parts[:-1] + tuple(r.array(nparts))
    index.fp_digests = index.fp_digests[:-PART_DIGEST] + bytes(r.take(PART_DIGEST * nparts))
    for old in [i for i in index.xuidls if i >= keep]:
        del index.xuidls[old]
    index.length = length


def _add_xuidls(index: MboxIndex, xidx: array[int], xtext: bytes, first: int) -> None:
    """The X-UIDLs of messages `first` on (one per line of `xtext`)."""
    if not xidx:
        if xtext:
            raise ValueError("X-UIDL of no message")
        return
    xuids = _uid_list(xtext, len(xidx))
    if min(xidx) < first or max(xidx) >= len(index) or len(set(xidx)) != len(xidx):
        raise ValueError("X-UIDL of no message")
    index.xuidls.update(zip(xidx, xuids, strict=True))


def _check_and_extend(
    index: MboxIndex, spool_state: tuple[int, int, int, int, bool], fd: int, st: os.stat_result,
    use_content_length: bool,
) -> tuple[MboxIndex, bool] | None:
    """`index` checked against the spool open on `fd` (`st`) and extended to
    its end, and whether it was; None: index whole (ValueError: refused)."""
    dev, ino, mtime_ns, ctime_ns, settled = spool_state
    if (dev, ino) != (st.st_dev, st.st_ino):
        raise ValueError("the spool was replaced")
    if st.st_size < index.length:
        raise ValueError("the spool shrank")
    if st.st_size == index.length and not (settled and (mtime_ns, ctime_ns) == (st.st_mtime_ns, st.st_ctime_ns)):
        raise ValueError("the spool was written to without growing")
    _check_samples(index, fd, use_content_length)
    if st.st_size == index.length:
        return index, False
    extended = _extended(index, fd, st.st_size, use_content_length)
    return None if extended is None else (extended, True)
def _check_structure(index: MboxIndex, parts: tuple[int, ...]) -> None:
    """Cheap checks, in C: messages in order, apart and inside the indexed
    length, sizes and flags plausible. The offsets inside a message are
    not checked here: a read outside the spool fails (SYS/TEMP), never
    reads another file, and UPDATE, which writes, confirms the whole
    index first (`confirm`)."""
    fs = index.from_starts
    if fs[0] < 0 or fs[-1] >= index.length or not all(map(operator.lt, fs, fs[1:])):
        raise ValueError("messages out of order")
    if min(index.sizes) < 0 or max(index.seen) > 1 or max(index.crlf) > 1:
        raise ValueError("implausible sizes or flags")
    if min(parts) < 1 or sum(parts) != len(fs):
        raise ValueError("fingerprint parts do not cover the messages")


def confirm(index: MboxIndex, fd: int, use_content_length: bool) -> bool:
    """Whether a full index of the spool open on `fd` (locked) gives
    `index`, message for message: UPDATE writes only from an index that
    agrees, never from a kept one taken on trust."""
    full = index_file(fd, index.length, use_content_length=use_content_length)
    return all(getattr(full, name) == getattr(index, name) for name in _CONFIRMED)


_CONFIRMED = ("from_starts", "starts", "body_starts", "ends", "seg_ends", "sizes", "seen", "crlf", "xuidls")


def _uid_list(text: bytes, count: int) -> list[str]:
    """`count` UIDs, one per line, each fit for UIDL."""
    _check_uid_text(text, count)
    return text.decode("ascii").split("\n")


def _check_uid_text(text: bytes, count: int) -> None:
    """`text` holds `count` lines of characters UIDL may carry (checked in C:
    a 50,000-message spool has a megabyte of them; their lengths are
    checked when the first UIDL splits them, `mboxindex.work_out_uids`)."""
    rest = text.translate(None, _UID_BYTES)
    if rest != b"\n" * (count - 1):
        raise ValueError("UIDs unfit for UIDL, or not one per message")


def _check_samples(index: MboxIndex, fd: int, use_content_length: bool) -> None:
    """Index some messages again from the spool; each must agree with the cache."""
    n = len(index)
    picks = {0, n - 1}
    if n > 2:
        picks.update(random.SystemRandom().sample(range(1, n - 1), min(SAMPLES, n - 2)))
    for i in sorted(picks):
        a, seg_end = index.from_starts[i], index.seg_ends[i]
        if seg_end - a > SAMPLE_MAX_BYTES:
            _check_big_message(index, fd, i)
            continue
        seg = read_exact(fd, a, seg_end - a)
        one = index_buffer(seg, len(seg), use_content_length=use_content_length,
                           with_uids=False)
        if len(one) != 1 or (
            one.from_starts[0] + a, one.starts[0] + a, one.body_starts[0] + a, one.ends[0] + a, one.sizes[0],
            one.seen[0], one.crlf[0], one.xuidls.get(0),
        ) != (
            a, index.starts[i], index.body_starts[i], index.ends[i], index.sizes[i],
            index.seen[i], index.crlf[i], index.xuidls.get(i),
        ):
            raise ValueError(f"message {i + 1} is not where the cache says")
        if a > 0 and not _follows_empty_line(fd, a):
            raise ValueError(f"message {i + 1} does not follow an empty line")
    first = index.from_starts[0]
    if first > 0 and (first > SAMPLE_MAX_BYTES or read_exact(fd, 0, first).strip(b"\r\n\t \0")):
        raise ValueError("text before the first message")


def _check_big_message(index: MboxIndex, fd: int, i: int) -> None:
    a, s = index.from_starts[i], index.starts[i]
    if a == s:
        raise ValueError("a long first message without a From_ line")
    line = read_exact(fd, a, s - a)
    if not line.endswith(b"\n") or not is_from_line(line) or not _follows_empty_line(fd, a):
        raise ValueError(f"message {i + 1} has no From_ line where the cache says")


def _follows_empty_line(fd: int, at: int) -> bool:
    if at == 0:
        return True
    before = read_exact(fd, max(0, at - 3), min(3, at))
    return before in (b"\n", b"\r\n") or before.endswith((b"\n\n", b"\n\r\n"))


def _extended(index: MboxIndex, fd: int, size: int, use_content_length: bool) -> MboxIndex | None:
    """`index` extended to the spool's `size`, or None: indexed whole."""
    head = read_exact(fd, index.length, min(size - index.length, MAX_FROM_LINE + 64))
    stripped = head.lstrip(b"\r\n")
    if not is_from_line(stripped.split(b"\n", 1)[0] + b"\n"):
        raise ValueError("what follows the indexed part is not new mail")
    at = index.from_starts[-1]
    if size - at > REGION_MAX_BYTES:
        return None
    region = read_exact(fd, at, size - at)
    if not extend_index(index, region, size, lambda a, m: read_exact(fd, a, m),
                        use_content_length=use_content_length):
        return None
    return index


# ---- writing ---------------------------------------------------------------------


def _encode(index: MboxIndex, state: SpoolState, use_content_length: bool) -> bytes:
    n = len(index)
    flags = (_CONTENT_LENGTH if use_content_length else 0) | (_SETTLED if state.settled else 0)
    raw = _raw_uids(index)
    utext = b""
    if raw is not None:
        flags |= _HAS_UIDS
        utext = "\n".join(raw).encode("ascii")
    xidx = array("q", sorted(index.xuidls))
    xtext = "\n".join(index.xuidls[i] for i in xidx).encode("ascii")
    head = _HEAD.pack(
        _MAGIC, _FORMAT, flags, state.dev, state.ino, index.length, state.mtime_ns, state.ctime_ns,
        n, len(index.fp_parts), len(xidx), len(xtext), len(utext),
        index.cl_reach_before_last, index.cl_reach_last, index.fingerprint, _VERSION,
    )
    pieces = [
        head, index.from_starts.tobytes(), index.starts.tobytes(), index.body_starts.tobytes(),
        index.ends.tobytes(), index.sizes.tobytes(), bytes(index.seen), bytes(index.crlf),
        array("q", index.fp_parts).tobytes(), index.fp_digests, xidx.tobytes(), xtext, utext,
    ]
    return b"".join(pieces)  # (write_kept adds the digest)


def _encode_record(index: MboxIndex, keep: int, raw: list[str] | None, state: SpoolState) -> bytes:
    """The record that takes an index of `keep + 1` messages (whose last one
    an extension indexed again) to `index`."""
    added = len(index) - keep
    nparts = len(index.fp_parts) - keep_parts(index, keep)
    flags = (_SETTLED if state.settled else 0) | (_HAS_UIDS if raw is not None else 0)
    xidx = array("q", sorted(i for i in index.xuidls if i >= keep))
    xtext = "\n".join(index.xuidls[i] for i in xidx).encode("ascii")
    utext = "\n".join(raw[keep:]).encode("ascii") if raw is not None else b""
    head = _RECORD.pack(
        _RECORD_MAGIC, flags, index.length, state.mtime_ns, state.ctime_ns, keep, added,
        nparts, len(xidx), len(xtext), len(utext), index.cl_reach_before_last, index.cl_reach_last,
        index.fingerprint,
    )
    return b"".join([
        head, *(getattr(index, name)[keep:].tobytes() for name in ("from_starts", "starts", "body_starts", "ends",
                                                                    "sizes")),
        bytes(index.seen[keep:]), bytes(index.crlf[keep:]), array("q", index.fp_parts[-nparts:]).tobytes(),
        index.fp_digests[-PART_DIGEST * nparts :], xidx.tobytes(), xtext, utext,
    ])


def keep_parts(index: MboxIndex, keep: int) -> int:
    """How many of the fingerprint's parts cover only the first `keep`
    messages (an extension keeps them and adds its own after)."""
    total = 0
    for k, count in enumerate(index.fp_parts):
        if total == keep:
            return k
        total += count
        if total > keep:
            break
    raise ValueError("the fingerprint's parts do not end where the record starts")


def _raw_uids(index: MboxIndex) -> list[str] | None:
    """Every message's UID before it was made unique, if known."""
    if index.uids is None:
        if index.raw_uid_text:
            return None if not index.raw_uid_text else index.raw_uid_text.decode("ascii").split("\n")
        return index.raw_uids
    if not index.raw_renamed:
        return index.uids
    raw = list(index.uids)
    for i, uid in index.raw_renamed.items():
        raw[i] = uid
    return raw
