"""Property: a session's view of a spool with a kept index is the view an index from scratch gives.

Steps are drawn and interleaved: deliveries (as MDAs append), sessions
(with or without UIDL, with or without deletions and UPDATE), rewrites by
another program (a same-size byte change, a message cut out in place, a
truncation, a restore of an older copy in place or by rename), a cache torn
or corrupted as a crash or a disk would leave it, a half-written
replacement left behind, and pauses that let the spool's times settle.
After every session the count, the sizes, the UIDs (when asked) and the
bytes of every RETR must be those of the spool indexed from scratch.

The size from which spools keep their index is lowered to nothing here, so
spools of a few messages use the cache. With that few messages the
sampled checks (`indexcache.SAMPLES`, `mboxindex.UID_SAMPLES`) look at every
message: what they cannot see in a big spool is the subject of
test_mbox_cache.py's test of the one change they may miss.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mbox_helpers import deliver, mbox
from qpopper.maildrop.mbox import MboxMaildrop
from qpopper.maildrop.mbox.paths import index_cache_path
from qpopper.maildrop.mboxindex import extend_index, fingerprint, index_buffer, work_out_uids

TOKENS = [
    b"\n", b"\r\n", b".", b"From ", b">From ", b"From x@y Wed Dec  2 05:53:22 1992\n", b"Subject: s",
    b"X-UIDL: 0123456789abcdef", b"Status: RO", b"Content-Length: 3", b"Message-Id: <m>", b": ", b"\x00",
]
message = st.lists(st.sampled_from(TOKENS) | st.binary(max_size=8), max_size=14).map(b"".join)

# Weighted so that most sessions find a kept index to use or to refuse.
STEPS = ("deliver",) * 4 + ("session", "uidl", "settle") * 3 + (
    "delete", "no-quit", "same-size", "cut-out", "truncate", "restore", "replace", "tear", "corrupt",
    "half-written")


@contextmanager
def every_spool_cached() -> Iterator[None]:
    with mock.patch("qpopper.maildrop.mbox.spool.CACHED_SPOOL_BYTES", 0):
        yield


def scratch(data: bytes) -> list[tuple[int, str, bytes]]:
    """(size, UID, bytes) of each message, from an index made from nothing."""
    idx = index_buffer(data)
    assert idx.uids is not None
    return [(idx.sizes[i], idx.uids[i], data[idx.starts[i] : idx.ends[i]]) for i in range(len(idx))]


def session(path: str, uidl: bool, data: st.DataObject, delete: bool) -> None:
    with open(path, "rb") as f:
        before = f.read()
    want = scratch(before)
    md = MboxMaildrop(path)
    try:
        infos = md.messages()
        assert len(infos) == len(want)
        assert list(infos.sizes) == [w[0] for w in want]
        assert [b"".join(md.read(i, chunk_size=5)) for i in range(len(infos))] == [w[2] for w in want]
        if uidl:
            assert list(infos.uids) == [w[1] for w in want]
        if delete and want:
            drop = data.draw(st.sets(st.integers(0, len(want) - 1), max_size=2))
            md.commit(drop, set())
    finally:
        md.close()


def rewrite_in_place(path: str, content: bytes) -> None:
    """Another program writing the spool's file itself (same inode)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, content, 0)
    finally:
        os.close(fd)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(message, min_size=1, max_size=5), st.data())
def test_every_session_sees_what_an_index_from_scratch_sees(first: list[bytes], data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as d, every_spool_cached():
        path = os.path.join(d, "alice")
        cache = index_cache_path(path)
        with open(path, "wb") as f:
            f.write(mbox(first))
        snapshots = [mbox(first)]
        delivered = len(first)
        for step in data.draw(st.lists(st.sampled_from(STEPS), min_size=1, max_size=20)):
            with open(path, "rb") as f:
                now = f.read()
            if step == "deliver":
                deliver(path, data.draw(message), delivered)
                delivered += 1
            elif step in ("session", "uidl", "delete", "no-quit"):
                session(path, step in ("uidl", "delete"), data, step == "delete")
            elif step == "same-size" and now:
                at = data.draw(st.integers(0, len(now) - 1))
                byte = data.draw(st.integers(0, 255))
                rewrite_in_place(path, now[:at] + bytes([byte]) + now[at + 1 :])
            elif step == "cut-out" and now:
                a = data.draw(st.integers(0, len(now) - 1))
                b = data.draw(st.integers(a, len(now)))
                rewrite_in_place(path, now[:a] + now[b:])
            elif step == "truncate":
                os.truncate(path, data.draw(st.integers(0, len(now))))
            elif step == "restore":
                rewrite_in_place(path, data.draw(st.sampled_from(snapshots)))
            elif step == "replace":
                with open(path + ".tmp", "wb") as f:
                    f.write(data.draw(st.sampled_from(snapshots)))
                os.rename(path + ".tmp", path)
            elif step in ("tear", "corrupt"):
                # (drawn whether or not there is a cache, and apart from its
                # size: whether a session wrote one, whole or as a record
                # appended, may depend on the clock)
                where, flip = data.draw(st.integers(0, 1 << 24)), data.draw(st.integers(1, 255))
                size = os.path.getsize(cache) if os.path.exists(cache) else 0
                if step == "tear" and size:
                    os.truncate(cache, where % size)
                elif size:
                    with open(cache, "r+b") as f:
                        at = where % size
                        f.seek(at)
                        old = f.read(1)
                        f.seek(at)
                        f.write(bytes([old[0] ^ flip]))
            elif step == "half-written":
                with open(cache + ".new", "wb") as f:
                    f.write(b"QPMBXIX")
            elif step == "settle":
                time.sleep(0.025)  # past the tick within which the spool's times are not trusted
            with open(path, "rb") as f:
                snapshots.append(f.read())
        session(path, True, data, False)


SPOOL_TOKENS = TOKENS + [
    b"From a Wed Dec  2 05:53 1992\n", b"\n\nFrom b Wed Dec  2 05:53 1992\n", b"Content-Length: 0\n",
    b"Content-Length: 12\n\n", b"status: R", b"\r\n\r\n",
]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(SPOOL_TOKENS) | st.binary(max_size=6), max_size=30).map(b"".join),
       st.lists(st.sampled_from(SPOOL_TOKENS) | st.binary(max_size=6), max_size=30).map(b"".join),
       st.booleans(), st.booleans())
def test_an_extended_index_is_the_index_of_the_whole(old: bytes, appended: bytes, use_content_length: bool,
                                                     with_uids: bool) -> None:
    """Whatever was indexed and whatever follows it: extending the index
    gives the full index of the whole, or declines (then the caller indexes
    the whole); never another index."""
    whole = old + appended
    index = index_buffer(old, use_content_length=use_content_length, with_uids=with_uids)
    if with_uids:
        index.raw_uids, index.uids = index.uids, None
        if index.raw_renamed:
            for i, uid in index.raw_renamed.items():
                index.raw_uids[i] = uid  # type: ignore[index]
    if not len(index):
        return
    at = index.from_starts[-1]
    if not extend_index(index, whole[at:], len(whole), lambda a, n: whole[a : a + n],
                        use_content_length=use_content_length):
        return
    full = index_buffer(whole, use_content_length=use_content_length)
    for name in ("from_starts", "starts", "body_starts", "ends", "seg_ends", "sizes", "seen", "crlf"):
        assert list(getattr(index, name)) == list(getattr(full, name)), name
    assert index.xuidls == full.xuidls
    assert index.length == full.length
    assert index.fingerprint == fingerprint(lambda a, n: whole[a : a + n], index)
    assert work_out_uids(index, lambda a, n: whole[a : a + n]) == full.uids
