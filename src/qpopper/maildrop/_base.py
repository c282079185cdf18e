"""The one storage interface every maildrop backend implements.

The protocol core only ever sees the `MessageInfo` list taken when the
maildrop was opened; message numbers are positions in that list and never
change during a session. Everything else (opening, streaming, committing) is
blocking work the server runs off its event loop, so these methods are plain
synchronous calls.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence, Set
from dataclasses import dataclass
from typing import NamedTuple, Protocol, overload, runtime_checkable

# Unique-ids are 1 to 70 characters of 0x21..0x7E (RFC 1939 section 7).
UID_MAX_LEN = 70


_UID = re.compile(rf"[\x21-\x7e]{{1,{UID_MAX_LEN}}}")


def is_valid_uid(uid: str) -> bool:
    """True if `uid` may be sent in a UIDL listing as it is."""
    return _UID.fullmatch(uid) is not None


class MessageInfo(NamedTuple):
    """One message as listed at login.

    `size` is the RFC 1939 size: the octets RETR sends before dot-stuffing.
    `seen` marks a message retrieved in an earlier session (LAST starts there).
    A named tuple because a big drop makes tens of thousands at each login,
    and a tuple is the cheapest immutable record to build.
    """

    size: int
    uid: str
    seen: bool = False


class MessageList(Sequence[MessageInfo]):
    """The messages of an open maildrop, held column by column.

    PASS must say how many octets a maildrop holds, so sizes are known at
    login; UIDs and seen flags are wanted only by UIDL and LAST, and for a
    big mbox working them out costs more than the rest of the listing. A
    backend may therefore pass a function that produces them on first use
    (at most once). Indexing still yields `MessageInfo` records, for code
    written against a list of them.
    """

    __slots__ = ("_seen", "_uids", "sizes")

    def __init__(
        self,
        sizes: Sequence[int],
        uids: Sequence[str] | Callable[[], Sequence[str]],
        seen: Sequence[int] | Callable[[], Sequence[int]] | None = None,
    ) -> None:
        self.sizes = sizes
        self._uids = uids
        self._seen = seen

    @classmethod
    def of(cls, messages: Sequence[MessageInfo]) -> MessageList:
        """`messages` as a MessageList: for callers holding a plain list of
        records (tests, embedders); a MessageList is returned as it is."""
        if isinstance(messages, MessageList):
            return messages
        return cls([m.size for m in messages], [m.uid for m in messages], [m.seen for m in messages])

    @property
    def uids_ready(self) -> bool:
        """False while working the UIDs out is still to come (and may block)."""
        return not callable(self._uids)

    def resolve_uids(self) -> None:
        """Work the UIDs out now; the backend's errors (MaildropError) pass through."""
        if callable(self._uids):
            self._uids = self._uids()

    @property
    def uids(self) -> Sequence[str]:
        self.resolve_uids()
        assert not callable(self._uids)
        return self._uids

    @property
    def seen(self) -> Sequence[int]:
        """Per message, true if retrieved in an earlier session (empty: none was)."""
        if self._seen is None:
            return ()
        if callable(self._seen):
            self._seen = self._seen()
        return self._seen

    def last_seen(self) -> int:
        """Number of the last message retrieved before (0: none), for LAST."""
        seen = self.seen
        for i in range(len(seen) - 1, -1, -1):
            if seen[i]:
                return i + 1
        return 0

    def __len__(self) -> int:
        return len(self.sizes)

    @overload
    def __getitem__(self, i: int) -> MessageInfo: ...
    @overload
    def __getitem__(self, i: slice) -> list[MessageInfo]: ...
    def __getitem__(self, i: int | slice) -> MessageInfo | list[MessageInfo]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        seen = self.seen
        return MessageInfo(self.sizes[i], self.uids[i], bool(seen[i]) if seen else False)


def size_of(messages: MessageList, index: int) -> int:
    """One message's size without working out the UIDs it defers."""
    return messages.sizes[index]


@runtime_checkable
class Maildrop(Protocol):
    """An open, POP-locked maildrop. Obtained from a backend's `open`."""

    def messages(self) -> MessageList:
        """The messages as they were when the maildrop was opened (every
        backend returns this one shape)."""
        ...

    def read(self, index: int, chunk_size: int = 65536) -> Iterator[bytes]:
        """The stored bytes of message `index` (0-based), in chunks."""
        ...

    def commit(self, deleted: Set[int], retrieved: Set[int]) -> None:
        """UPDATE: remove exactly the `deleted` messages, durably.

        `retrieved` lists the messages sent whole by RETR, for backends that
        record a seen flag. Raises MaildropError when nothing may be assumed
        removed; a message not in `deleted` is never removed.
        """
        ...

    def close(self) -> None:
        """Release the session lock without changing anything. Idempotent."""
        ...


@runtime_checkable
class QuickUpdate(Protocol):
    """A maildrop that can tell when UPDATE and close would write nothing.

    Then the server runs them on its event loop: a trip to a worker thread
    costs more than releasing a lock."""

    def writes_nothing(self, deleted: Set[int], retrieved: Set[int]) -> bool: ...


@dataclass(frozen=True, slots=True)
class MaildropSettings:
    """Site settings the backends need, taken from Options by the server.

    mbox: lock timing, Content-Length trust, and qpopper's spool modes
    (server mode serves the spool in place; otherwise a temp drop
    `.<user>.pop` is used as qpopper did by default).
    """

    lock_timeout: float = 30.0
    stale_age: float = 300.0
    check_pid: bool = True
    use_content_length: bool = True
    server_mode: bool = True
    fast_update: bool = False
    keep_temp_drop: bool = False
    temp_dir: str | None = None  # None: beside the spool
    temp_name: str = ".%s.pop"  # %s is the spool's file name
    update_status_headers: bool = False
    uw_kluge: bool = False
    # Several hosts share the storage: the session lock takes an owner file
    # as well as its OFD lock (sessionlock.py), for mounts without NFS locking.
    shared_storage: bool = False
    # qpopper's mail-lock-check (-L) is accepted and ignored (config/settings.py):
    # the dotlock is refreshed by time while a spool is copied, not by count.
