"""Wire encoding of stored messages: CRLF, dot-stuffing, TOP, sizes.

The property tests compare the streaming encoder, fed at every kind of
chunk split, with a plain line-by-line reference written for clarity.
"""

from __future__ import annotations

import mmap

from hypothesis import given, settings
from hypothesis import strategies as st

import qpopper.wiresize
from qpopper.maildrop import mboxindex
from qpopper.protocol import LineBuffer, SizeCounter, StuffingEncoder, wire_size
from qpopper.protocol._framing import Line, OverlongLine


def reference_lines(stored: bytes) -> list[bytes]:
    """Stored bytes split into lines, each without its line end."""
    if not stored:
        return []
    parts = stored.split(b"\n")
    if parts[-1] == b"":
        parts.pop()
    return [p[:-1] if p.endswith(b"\r") else p for p in parts]


def reference_wire(stored: bytes, top: int | None = None) -> bytes:
    lines = reference_lines(stored)
    if top is not None:
        try:
            end = lines.index(b"")
        except ValueError:
            end = len(lines)
        lines = lines[: end + 1 + top]
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


def encode(stored: bytes, cuts: list[int], top: int | None = None) -> bytes:
    enc = StuffingEncoder(top)
    out = b""
    start = 0
    for cut in sorted({c % (len(stored) + 1) for c in cuts}) + [len(stored)]:
        out += enc.encode(stored[start:cut])
        start = cut
    return out + enc.finish()


def unstuff(wire: bytes) -> bytes:
    return b"".join(
        line[1:] + b"\r\n" if line.startswith(b".") else line + b"\r\n" for line in wire.split(b"\r\n")[:-1]
    )


# Bytes that make line ends and stuffing interesting.
message_bytes = st.lists(
    st.sampled_from([b"\n", b"\r\n", b"\r", b".", b"..", b"a", b"From ", b" ", b"\x00", b"\xff"]), max_size=60
).map(b"".join)


@settings(max_examples=400)
@given(stored=message_bytes, cuts=st.lists(st.integers(0, 200), max_size=8))
def test_retr_matches_reference_at_any_chunk_split(stored: bytes, cuts: list[int]) -> None:
    if b"\r" in stored.replace(b"\r\n", b""):
        stored = stored.replace(b"\r", b"")  # bare CR is checked separately
    wire = encode(stored, cuts)
    assert wire == reference_wire(stored)
    # RFC 1939 size: octets of the message as sent, before stuffing.
    assert len(unstuff(wire)) == wire_size(stored)
    counter = SizeCounter()
    start = 0
    for cut in sorted({c % (len(stored) + 1) for c in cuts}) + [len(stored)]:
        counter.feed(stored[start:cut])
        start = cut
    assert counter.result() == wire_size(stored)


def test_the_protocol_exports_the_one_size_rule() -> None:
    assert wire_size is qpopper.wiresize.wire_size and SizeCounter is qpopper.wiresize.SizeCounter


@settings(max_examples=300)
@given(before=message_bytes, stored=message_bytes, after=message_bytes)
def test_a_range_is_sized_as_the_message_alone(before: bytes, stored: bytes, after: bytes) -> None:
    """wire_size over a range, and the mbox indexer's sizes over bytes and
    over a mapping cut into pieces (a CRLF split between two), agree."""
    buf = before + stored + after
    start, end = len(before), len(before) + len(stored)
    assert wire_size(buf, start, end) == wire_size(stored)
    assert mboxindex.wire_size_of(buf, start, end) == wire_size(stored)
    if not buf:
        return
    with mmap.mmap(-1, len(buf)) as mapped:
        mapped[:] = buf
        for chunk in (1, 2, 3, 1 << 20):
            old, mboxindex.COUNT_CHUNK = mboxindex.COUNT_CHUNK, chunk
            try:
                assert mboxindex.wire_size_of(mapped, start, end) == wire_size(stored)
            finally:
                mboxindex.COUNT_CHUNK = old


@settings(max_examples=400)
@given(stored=message_bytes, cuts=st.lists(st.integers(0, 200), max_size=8), top=st.integers(0, 6))
def test_top_matches_reference_at_any_chunk_split(stored: bytes, cuts: list[int], top: int) -> None:
    stored = stored.replace(b"\r", b"")
    assert encode(stored, cuts, top) == reference_wire(stored, top)


def test_examples() -> None:
    assert encode(b"Hello\n.\n.x\n", []) == b"Hello\r\n..\r\n..x\r\n"
    assert wire_size(b"Hello\n.\n.x\n") == 14
    assert encode(b"no final newline", []) == b"no final newline\r\n"
    assert wire_size(b"no final newline") == len(b"no final newline\r\n")
    assert encode(b"a\r\nb\r\n", [2]) == b"a\r\nb\r\n"  # CR and LF in different chunks
    assert encode(b"bare\rcr\n", [5]) == b"bare\rcr\r\n"
    assert wire_size(b"bare\rcr\n") == 9
    assert encode(b"S: x\n\nl1\nl2\n", [], 0) == b"S: x\r\n\r\n"
    assert encode(b"S: x\n\nl1\nl2\n", [], 1) == b"S: x\r\n\r\nl1\r\n"
    assert encode(b"\nbody\n", [], 0) == b"\r\n"
    assert encode(b"only: headers\n", [], 0) == b"only: headers\r\n"


@settings(max_examples=300)
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=6))
def test_line_buffer_never_holds_more_than_the_limit(data: bytes, cuts: list[int]) -> None:
    buf = LineBuffer(max_line=40)
    start = 0
    got: list[Line | OverlongLine] = []
    for cut in sorted({c % (len(data) + 1) for c in cuts}) + [len(data)]:
        buf.feed(data[start:cut])
        start = cut
        while (item := buf.next_line()) is not None:
            got.append(item)
        assert len(buf) < 40
    # Every complete line comes out once: short ones whole, long ones as one marker.
    complete = data.split(b"\n")[:-1]
    assert len(got) == len(complete)
    for raw, item in zip(complete, got, strict=True):
        if len(raw) + 1 > 40:
            assert isinstance(item, OverlongLine)
        else:
            assert isinstance(item, Line) and item.data == raw.removesuffix(b"\r")


@settings(max_examples=400)
@given(stored=message_bytes)
def test_whole_message_encoding_equals_the_streaming_encoder(stored: bytes) -> None:
    from qpopper.protocol import encode_whole

    assert encode_whole(stored) == encode(stored, [])
    if b"\r" not in stored.replace(b"\r\n", b""):
        assert encode_whole(stored) == reference_wire(stored)
