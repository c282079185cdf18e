"""Command-line framing: bytes in, complete lines out, with a hard bound.

RFC 2449 caps a command at 255 octets including CRLF. A longer line costs the
client exactly one error and is skipped up to its line end, so a stray long
line never splits into several commands (a mistake seen in other servers).
The buffer never holds more than the limit of an unfinished line, so an
endless line without CRLF cannot grow memory.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Line:
    """One complete input line without its line end."""

    data: bytes


@dataclass(frozen=True, slots=True)
class OverlongLine:
    """A line exceeded the limit; its bytes were discarded."""

    discarded: int


class LineBuffer:
    """Splits a byte stream into lines ended by CRLF (or a bare LF).

    Searching resumes where the previous search stopped, so feeding a long
    line a byte at a time stays linear.
    """

    # Every session holds one for its whole life: slots, not a dict of values.
    __slots__ = ("_buf", "_discarded", "_discarding", "_searched", "long_max", "long_prefix", "max_line")

    def __init__(self, max_line: int = 255, long_prefix: bytes | None = None, long_max: int = 0) -> None:
        self.max_line = max_line
        # Lines starting with `long_prefix` (case-insensitive) may reach
        # `long_max`: AUTH with a large initial response (GSSAPI tickets).
        self.long_prefix = long_prefix
        self.long_max = long_max
        self._buf = bytearray()
        self._searched = 0
        self._discarding = False
        self._discarded = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    def clear(self) -> None:
        """Forget everything buffered (STLS: pipelined plaintext is dropped)."""
        self._buf.clear()
        self._searched = 0
        self._discarding = False
        self._discarded = 0

    def __len__(self) -> int:
        return len(self._buf)

    def _limit(self) -> int:
        prefix = self.long_prefix
        if prefix is not None and self._buf[: len(prefix)].upper() == prefix:
            return max(self.max_line, self.long_max)
        return self.max_line

    def next_line(self) -> Line | OverlongLine | None:
        """Return the next complete line, an overlong marker, or None."""
        while True:
            end = self._buf.find(b"\n", self._searched)
            if end < 0:
                if self._discarding:
                    self._discarded += len(self._buf)
                    self._buf.clear()
                    self._searched = 0
                    return None
                if len(self._buf) >= self._limit():
                    # The line is already too long; drop what we hold and
                    # keep dropping until its end arrives.
                    self._discarding = True
                    self._discarded = len(self._buf)
                    self._buf.clear()
                    self._searched = 0
                    return None
                self._searched = len(self._buf)
                return None
            limit = self._limit()
            raw = bytes(self._buf[:end])
            del self._buf[: end + 1]
            self._searched = 0
            if self._discarding:
                self._discarding = False
                discarded = self._discarded + end + 1
                self._discarded = 0
                return OverlongLine(discarded)
            if end + 1 > limit:
                return OverlongLine(end + 1)
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            return Line(raw)
