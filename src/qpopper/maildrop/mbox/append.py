"""Appending one message to an mbox spool, the way delivery agents do.

Under the spool's locks (dotlock + fcntl, as Debian's MDAs take them): an
empty line before the new From_ line where the spool does not end in one,
the From_ line, the message with ">From " quoting (mboxrd: one more ">" on
every line that starts with ">"s and "From "), an empty line after it, fsync.
A session serving the spool meanwhile lists the message at its next login.
"""

from __future__ import annotations

import os
import re
import time

from ...errors import MaildropError, ResponseCode
from ..dotlock import SpoolLock
from ..fsutil import write_all
from ..mboxindex import XUIDL_MAX, XUIDL_MIN, is_from_line

_FROM_TO_QUOTE = re.compile(rb"(?m)^(>*From )")


def quote_from(message: bytes) -> bytes:
    """mboxrd quoting, as delivery agents do, so the body cannot split."""
    return _FROM_TO_QUOTE.sub(rb">\1", message)


def default_from_line() -> bytes:
    """`From MAILER-DAEMON  <asctime>` for a message without an envelope sender."""
    return b"From MAILER-DAEMON  " + time.asctime().encode("ascii") + b"\n"


def append_message(spool: str, message: bytes, *, from_line: bytes | None = None, uid: str | None = None) -> str:
    """Append `message` (stored form, LF line ends) to the spool, creating
    it (mode 0600) if missing. `uid` becomes an `X-UIDL:` first header line,
    which the indexer takes as the message's UID. Returns the spool's path.
    File-system failures raise OSError, a lock not obtained MaildropError."""
    if from_line is None:
        from_line = default_from_line()
    if not from_line.endswith(b"\n") or not is_from_line(from_line):
        raise MaildropError(f"not a valid From_ line: {from_line[:80]!r}", ResponseCode.SYS_PERM)
    if uid is not None:
        if not XUIDL_MIN <= len(uid) + 1 <= XUIDL_MAX or not uid.isascii() or not uid.isprintable() or " " in uid:
            raise MaildropError(f"{uid!r} cannot be an mbox message's X-UIDL", ResponseCode.SYS_PERM)
        message = b"X-UIDL: " + uid.encode("ascii") + b"\n" + message
    text = quote_from(message)
    if not text.endswith(b"\n"):
        text += b"\n"
    for _ in range(_REOPENS):
        fd = os.open(spool, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with SpoolLock(spool, fd, exclusive=True):
                if _still_the_spool(spool, fd):
                    _append_locked(fd, from_line, text)
                    return spool
        finally:
            os.close(fd)
        # A writer renamed a new spool over the one opened while we waited for the lock: again.
    raise MaildropError(f"{spool} kept being replaced while waiting to append", ResponseCode.SYS_TEMP)


# Reopens when the spool was replaced under a waiting appender (each is one UPDATE's rename).
_REOPENS = 20


def _still_the_spool(spool: str, fd: int) -> bool:
    """Whether the locked descriptor is still the file at the spool's name
    (MDAs check this: an UPDATE may have renamed a new spool over it)."""
    try:
        named = os.stat(spool, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _append_locked(fd: int, from_line: bytes, text: bytes) -> None:
    """The message at the end of the locked spool, after the empty line the last one may lack."""
    size = os.fstat(fd).st_size
    prefix = b""
    if size:
        tail = os.pread(fd, 2, size - 2) if size >= 2 else os.pread(fd, 1, 0)
        prefix = (
            b"" if tail.endswith(b"\n\n") or tail == b"\n" else (b"\n" if tail.endswith(b"\n") else b"\n\n")
        )
    write_all(fd, prefix + from_line + text + b"\n")
    os.fsync(fd)
