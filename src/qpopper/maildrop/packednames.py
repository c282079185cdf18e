"""A Maildir listing's file names packed in one string until one is read.

Every logged-in session holds its listing until it ends, and most of a
held session's bytes are the names: as a list, each name is a str object
of its own (49 bytes of header beside its characters) plus the list's
pointer. Packed, the names are the one str the listing's size check joins
anyway: about half the bytes, and one object where there were as many as
messages, for the allocator and the collector to keep.

A session that only logs in and lists (STAT, LIST, UIDL: sizes and UIDs
come from elsewhere or from one pass over the names) keeps them packed.
The first lookup of a name by its number (RETR, TOP, UPDATE) splits them
into a list once, so that every later one is a plain list index: a
session that reads messages is busy, not one of the idle crowd.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

__all__ = ["PackedNames"]


class PackedNames(Sequence[str]):
    """The names of `text`, the names joined by newlines (no name may hold
    one: the Maildir's quick listing counts them), `count` of them."""

    __slots__ = ("_count", "_list", "_text")

    def __init__(self, text: str, count: int) -> None:
        self._text = text
        self._count = count
        self._list: list[str] | None = None

    def unpacked(self) -> list[str]:
        """The names as a list, which this object reads from then on: a name
        changed in it (a file another agent renamed) is seen through both."""
        if self._list is None:
            self._list = self._text.split("\n")
            self._text = ""
        return self._list

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        return self.unpacked()[index]

    def __setitem__(self, index: int, name: str) -> None:
        self.unpacked()[index] = name

    def __iter__(self) -> Iterator[str]:
        # A pass over all names (UIDL's UIDs, LAST's flags) leaves them packed.
        return iter(self._list if self._list is not None else self._text.split("\n"))
