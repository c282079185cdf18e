"""The RFC 1939 size of a message: what LIST and STAT report.

It is the number of octets RETR sends before dot-stuffing: every stored
line end counted as CRLF (stored mail uses LF or CRLF), plus a CRLF for a
last line without a newline. The maildrops compute it when they list, the
protocol core when it sends, and they must agree to the octet, so the rule
lives here once, in a module that imports nothing of ours and that both
`protocol` and `maildrop` may use.

Counting runs in C (bytes.count and find); LF-only mail, the usual kind,
skips the CRLF count after one memchr finds no CR.
"""

from __future__ import annotations

__all__ = ["SizeCounter", "wire_size"]


def wire_size(data: bytes, start: int = 0, end: int | None = None) -> int:
    """RFC 1939 size of the whole stored message `data[start:end]`,
    counted in place (no copy of the range)."""
    if end is None:
        end = len(data)
    size = end - start + data.count(b"\n", start, end)
    if data.find(b"\r", start, end) >= 0:
        size -= data.count(b"\r\n", start, end)
    if end > start and data[end - 1] != 0x0A:
        size += 2
    return size


class SizeCounter:
    """`wire_size` over a message fed in consecutive chunks (a stream, or
    a big range read piece by piece); a CRLF split between two chunks is
    counted once."""

    __slots__ = ("_last", "_size")

    def __init__(self) -> None:
        self._size = 0
        self._last = b""

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        size = len(chunk) + chunk.count(b"\n")
        if chunk.find(b"\r") >= 0:
            size -= chunk.count(b"\r\n")
        if self._last == b"\r" and chunk[:1] == b"\n":
            size -= 1
        self._size += size
        self._last = chunk[-1:]

    def result(self) -> int:
        if self._last and self._last != b"\n":
            return self._size + 2
        return self._size
