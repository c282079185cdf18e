"""The one storage interface every maildrop backend implements.

The protocol core only ever sees the `MessageInfo` list taken when the
maildrop was opened; message numbers are positions in that list and never
change during a session. Everything else (opening, streaming, committing) is
blocking work the server runs off its event loop, so these methods are plain
synchronous calls.
"""

from __future__ import annotations

import re

from collections.abc import Iterator, Sequence, Set
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

# Unique-ids are 1 to 70 characters of 0x21..0x7E (RFC 1939 section 7).
UID_MAX_LEN = 70


_UID = re.compile(r"[\x21-\x7e]{1,%d}" % UID_MAX_LEN)


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


@runtime_checkable
class Maildrop(Protocol):
    """An open, POP-locked maildrop. Obtained from a backend's `open`."""

    def messages(self) -> Sequence[MessageInfo]:
        """The messages as they were when the maildrop was opened."""
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
    mail_lock_check: int = 5000
