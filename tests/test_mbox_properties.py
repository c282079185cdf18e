"""Property: whatever bytes are delivered come back from read() as stored.

"As stored" is the message with mboxo quoting applied by the delivering
agent (">From " for a line starting "From ") and a newline added if it
lacked a final one; sizes are the RFC 1939 sizes of exactly those bytes.
"""

from __future__ import annotations

import os
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from mbox_helpers import mbox, stored
from qpopper.maildrop.mbox import MboxMaildrop
from qpopper.protocol import wire_size

TOKENS = [
    b"\n", b"\r\n", b"\r", b"\n\n", b".", b"From ", b">From ", b"From x@y Wed Dec  2 05:53:22 1992",
    b"From x@y Wed Dec  2 05:53:22 1992\n", b"\n\nFrom - Wed Dec  2 05:53 1992\n", b"Subject: s",
    b"X-UIDL: 0123456789abcdef", b"Status: RO", b"Content-Length: 3", b": ", b"\x00", b"\xff",
]
message = st.lists(st.sampled_from(TOKENS) | st.binary(max_size=12), max_size=20).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(message, min_size=1, max_size=5))
def test_delivered_bytes_come_back_as_stored(messages: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as d:
        spool = os.path.join(d, "alice")
        with open(spool, "wb") as f:
            f.write(mbox(messages))
        md = MboxMaildrop(spool)
        try:
            infos = md.messages()
            assert len(infos) == len(messages)
            for i, m in enumerate(messages):
                got = b"".join(md.read(i, chunk_size=7))
                assert got == stored(m)
                assert infos[i].size == wire_size(got)
            assert len({info.uid for info in infos}) == len(infos)
        finally:
            md.close()


@settings(max_examples=100, deadline=None)
@given(st.lists(message, min_size=1, max_size=6), st.data())
def test_update_keeps_exactly_the_kept_messages(messages: list[bytes], data: st.DataObject) -> None:
    deleted = data.draw(st.sets(st.integers(0, len(messages) - 1)))
    with tempfile.TemporaryDirectory() as d:
        spool = os.path.join(d, "alice")
        with open(spool, "wb") as f:
            f.write(mbox(messages))
        md = MboxMaildrop(spool)
        uids = [i.uid for i in md.messages()]
        md.commit(deleted, set())
        md.close()
        md = MboxMaildrop(spool)
        try:
            kept = [i for i in range(len(messages)) if i not in deleted]
            assert [b"".join(md.read(k)) for k in range(len(md.messages()))] == [stored(messages[i]) for i in kept]
            # Duplicate-suffixed UIDs may shift when an earlier twin goes;
            # every other UID stays.
            now = [i.uid for i in md.messages()]
            twins = {u for u in uids if any(v.startswith(u + "-") for v in uids)}
            unique = [not any(u == t or u.startswith(t + "-") for t in twins) for u in uids]
            assert all(now[k] == uids[i] for k, i in enumerate(kept) if unique[i])
        finally:
            md.close()


HEADER_TOKENS = [
    b"\n", b"\r\n", b"Received: a", b"received:b", b"DATE: d", b"Message-ID: <m>", b"subject: s",
    b"Subject:", b"X-UIDL: 0123456789abcdef", b"x-uidl: short", b"Status: RO", b"Content-Length: 3",
    b"From: f", b" folded", b"\tfolded", b"Dates: no", b":", b"\r",
]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(HEADER_TOKENS) | st.binary(max_size=8), max_size=24).map(b"".join))
def test_fast_header_scan_agrees_with_the_full_parse(block: bytes) -> None:
    from qpopper.maildrop.mboxindex import header_facts, parse_headers

    fast, full = header_facts(block), parse_headers(block)
    assert (fast.xuidl, fast.seen, fast.content_length) == (full.xuidl, full.seen, full.content_length)
    assert b"".join(fast.hashed_lines) == b"".join(full.hashed_lines)


SPOOL_TOKENS = TOKENS + [b"status: R", b"x-uidl: 0123456789abcdef", b"\r\n\r\n", b"\n\r\n"]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(SPOOL_TOKENS) | st.binary(max_size=6), max_size=40).map(b"".join))
def test_one_scan_per_header_block_agrees_with_the_full_parse(spool: bytes) -> None:
    """The index finds each body and the headers that matter (Status, X-UIDL)
    with one search per message; parsing every header block must agree, and
    each message ends where `_message_end` says."""
    from qpopper.maildrop.mboxindex import MAX_HEADER_PARSE, _body_start, _message_end, index_buffer, parse_headers

    index = index_buffer(spool, use_content_length=False)
    for i in range(len(index)):
        start, end = index.starts[i], index.ends[i]
        assert end == _message_end(spool, start, index.seg_ends[i])
        body = _body_start(spool, start, end)
        facts = parse_headers(spool[start : min(body, start + MAX_HEADER_PARSE)])
        assert index.body_starts[i] == body
        assert bool(index.seen[i]) == facts.seen
        assert index.xuidls.get(i) == facts.xuidl


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(SPOOL_TOKENS) | st.binary(max_size=6), max_size=40).map(b"".join))
def test_a_mapped_spool_indexes_like_bytes(spool: bytes) -> None:
    """Big spools are mapped (no count() on a mapping: sizes from copies),
    small ones read whole; both roads give one index."""
    import mmap

    from qpopper.maildrop.mboxindex import index_buffer

    if not spool:
        return
    with tempfile.TemporaryFile() as f:
        f.write(spool)
        f.flush()
        with mmap.mmap(f.fileno(), len(spool), access=mmap.ACCESS_READ) as mapped:
            a, b = index_buffer(spool), index_buffer(mapped)
    for name in ("from_starts", "starts", "body_starts", "ends", "seg_ends", "sizes", "seen", "crlf"):
        assert list(getattr(a, name)) == list(getattr(b, name)), name
    assert (a.xuidls, a.uids, a.fingerprint) == (b.xuidls, b.uids, b.fingerprint)


def _separators_line_by_line(spool: bytes) -> tuple[list[int], list[int], list[bytes]]:
    """The module docstring's rule, one line at a time: a valid From_ line
    that starts the file or follows an empty line (LF or CRLF)."""
    from qpopper.maildrop.mboxindex import MAX_FROM_LINE, is_from_line

    positions: list[int] = []
    line_ends: list[int] = []
    pos, previous_empty = 0, True
    while pos < len(spool):
        nl = spool.find(b"\n", pos)
        end = len(spool) if nl < 0 else nl + 1
        line = spool[pos:end]
        if previous_empty and len(line) <= MAX_FROM_LINE and is_from_line(line):
            positions.append(pos)
            line_ends.append(end)
        previous_empty = line in (b"\n", b"\r\n")
        pos = end
    return positions, line_ends, [spool[p:e] for p, e in zip(positions, line_ends, strict=True)]


FROM_TOKENS = SPOOL_TOKENS + [
    b"From a Wed Dec  2 05:53 1992\n", b"From a Wed Dec  2 05:53 1992\r\n", b"From b Wed Dec 12 05:53 PST 1992\n",
    b"From c Wed Dec  2 05:53:01 +0100 1992 remote from h\n", b"From d Wed Dec  2 05:53 1992 PST\n",
    b"From e Wed Dec  2 05:53 1992", b"From f Wed Dec  2 5:53 1992\n", b"From \n", b"\r\r\n",
]


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from(FROM_TOKENS) | st.binary(max_size=6), max_size=40).map(b"".join))
def test_separators_agree_with_a_line_by_line_reading(spool: bytes) -> None:
    """The From_ lines found by searching the whole spool at once are the
    ones a reader going line by line accepts, at the same offsets (and the
    lines handed on for the fingerprint are those lines)."""
    from qpopper.maildrop.mboxindex import _separators

    assert tuple(_separators(spool, len(spool)))[:3] == _separators_line_by_line(spool)


def test_separators_reject_an_overlong_from_line() -> None:
    from qpopper.maildrop.mboxindex import MAX_FROM_LINE, _separators

    tail = b" Wed Dec  2 05:53 1992\n"
    for pad, found in ((MAX_FROM_LINE - 5 - len(tail), True), (MAX_FROM_LINE - 4 - len(tail), False)):
        spool = b"From a Wed Dec  2 05:53 1992\nx\n\nFrom " + b"x" * pad + tail
        assert len(_separators(spool, len(spool))[0]) == (2 if found else 1)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(FROM_TOKENS + [b"Content-Length: 0\n", b"Content-Length: 12\n\n"])
                | st.binary(max_size=6), max_size=40).map(b"".join), st.booleans())
def test_the_index_fingerprint_is_the_one_update_recomputes(spool: bytes, use_content_length: bool) -> None:
    """UPDATE recomputes the fingerprint from the file and refuses to write
    on a mismatch: for an unchanged spool the two must always agree,
    whichever way the index hashed the From_ lines."""
    from qpopper.maildrop.mboxindex import fingerprint, index_buffer

    index = index_buffer(spool, use_content_length=use_content_length)
    assert index.fingerprint == fingerprint(lambda a, n: spool[a : a + n], index)


def test_the_fingerprint_after_a_content_length_jump() -> None:
    """A Content-Length that puts a From_ line inside a body: that line is
    not a boundary and is not hashed as one."""
    from qpopper.maildrop.mboxindex import fingerprint, index_buffer

    body = b"x\n\nFrom b Wed Dec  2 05:53 1992\nquoted, not a message\n"
    spool = (b"From a Wed Dec  2 05:53 1992\nContent-Length: %d\n\n" % len(body) + body
             + b"\nFrom c Wed Dec  2 05:53 1992\n\nbody\n")
    index = index_buffer(spool)
    assert len(index) == 2
    assert index.fingerprint == fingerprint(lambda a, n: spool[a : a + n], index)
