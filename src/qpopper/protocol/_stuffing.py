"""Turning stored message bytes into the octets RETR and TOP send.

Stored mail uses LF or CRLF line ends (both exist in the wild). On the wire
every line ends in CRLF, lines starting with "." get one more ".", and the
body ends in CRLF even when the stored message lacks a final newline. Every
transformation below is a bytes method running in C; the only state carried
between chunks is whether we stand at a line start and whether a CR was held
back, so a "." or a CRLF split across two chunks is handled exactly.

The size LIST/STAT report (`wire_size`, `SizeCounter`) is what this
conversion gives before dot-stuffing; the rule lives in `qpopper.wiresize`,
which the maildrops use too, and is re-exported here for the protocol's users.
"""

from __future__ import annotations

import re

from ..wiresize import SizeCounter, wire_size

__all__ = ["SizeCounter", "StuffingEncoder", "encode_whole", "to_crlf", "wire_size"]

# A "." that starts a line. Searching for the dot first and looking behind
# for the LF runs at the speed of a one-byte scan; dots are sparse in mail,
# line-leading dots rarer still, so most messages need no copy at all.
# (bytes.replace with a three-byte pattern scans about twice as slowly.)
_DOT_AFTER_LF = re.compile(rb"\.(?<=\n\.)")


def to_crlf(data: bytes) -> bytes:
    """LF and CRLF line ends both become CRLF; a bare CR is kept."""
    if b"\r" not in data:
        return data.replace(b"\n", b"\r\n")
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _stuff_line_starts(text: bytes) -> bytes:
    """One more "." on every line after the first that starts with one
    (CRLF text)."""
    return text.replace(b"\r\n.", b"\r\n..") if _DOT_AFTER_LF.search(text) else text


def encode_whole(data: bytes) -> bytes:
    """A whole stored message as RETR sends it, before the final ".":
    what StuffingEncoder gives for one chunk, without its bookkeeping
    (most messages are read in one piece)."""
    text = _stuff_line_starts(to_crlf(data))
    if text[:1] == b".":
        text = b"." + text
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    return text


class StuffingEncoder:
    """Streams one message: CRLF conversion, dot-stuffing, optional TOP cut.

    `body_lines` None sends everything; an integer n sends the headers, the
    blank line after them and the first n body lines (TOP n).
    """

    def __init__(self, body_lines: int | None = None) -> None:
        self._held_cr = False  # a chunk ended in CR; its LF may follow
        self._at_line_start = True
        self._wrote_any = False
        self._limit = body_lines
        self._in_headers = body_lines is not None
        self._tail = b""  # last output bytes, to spot a header end across chunks
        self._done = False

    @property
    def done(self) -> bool:
        """True once a TOP cut has been reached; later input is ignored."""
        return self._done

    def encode(self, chunk: bytes) -> bytes:
        if self._done or not chunk:
            return b""
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._held_cr = True
            if not chunk:
                return b""
        text = to_crlf(chunk)
        if self._limit is not None:
            text = self._cut(text)
        return self._stuff(text)

    def finish(self) -> bytes:
        """The rest of the body plus a final CRLF if the message lacked one."""
        out = b""
        if self._held_cr and not self._done:
            self._held_cr = False
            out = self._stuff(b"\r")
        if self._wrote_any and not self._at_line_start:
            out += b"\r\n"
        self._done = True
        return out

    def _cut(self, text: bytes) -> bytes:
        """Apply the TOP limit to CRLF-normalised text."""
        if self._in_headers:
            probe = self._tail + text
            if not self._wrote_any and probe.startswith(b"\r\n"):
                end = 2 - len(self._tail)  # message starts with the blank line
            else:
                found = probe.find(b"\r\n\r\n")
                end = -1 if found < 0 else found + 4 - len(self._tail)
            if end < 0:
                self._tail = probe[-3:]
                return text
            self._in_headers = False
            head, text = text[:end], text[end:]
            return head + self._cut_body(text)
        return self._cut_body(text)

    def _cut_body(self, text: bytes) -> bytes:
        assert self._limit is not None
        if not text:
            return text
        if self._limit == 0:
            self._done = True
            return b""
        lines = text.count(b"\r\n")
        if lines < self._limit:
            self._limit -= lines
            return text
        rest = text.split(b"\r\n", self._limit)[-1]
        self._done = True
        return text[: len(text) - len(rest)]

    def _stuff(self, text: bytes) -> bytes:
        if not text:
            return text
        out = _stuff_line_starts(text)
        if self._at_line_start and out.startswith(b"."):
            out = b"." + out
        self._at_line_start = out.endswith(b"\r\n")
        self._wrote_any = True
        return out
