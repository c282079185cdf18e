"""Writing mbox spools the way delivery agents do, for the mbox tests.

`append_locked` is an independent re-implementation of what procmail and
postfix do when they deliver to /var/mail/USER (dotlock by O_EXCL, then a
classic POSIX fcntl write lock, append, unlock), deliberately not using
qpopper's own locking code, so the tests check that the two exclude each
other.
"""

from __future__ import annotations

import fcntl
import os
import re
import sys
import time

FROM_LINE = b"From sender@example.org  Wed Dec  2 05:53:22 1992\n"
_LINE_START_FROM = re.compile(rb"^From ", re.MULTILINE)


def from_line(n: int = 0) -> bytes:
    """A valid From_ line; `n` varies the sender so UIDs differ."""
    return b"From sender%d@example.org  Wed Dec  2 05:53:22 1992\n" % n


def quote(message: bytes) -> bytes:
    """mboxo quoting, as postfix and procmail apply it."""
    return _LINE_START_FROM.sub(b">From ", message)


def stored(message: bytes) -> bytes:
    """What read() gives back for a message delivered by `entry`."""
    body = quote(message)
    if body and not body.endswith(b"\n"):
        body += b"\n"
    return body


def entry(message: bytes, n: int = 0) -> bytes:
    """One message as postfix appends it: From_ line, quoted text, empty line."""
    return from_line(n) + stored(message) + b"\n"


def mbox(messages: list[bytes]) -> bytes:
    return b"".join(entry(m, n) for n, m in enumerate(messages))


def append_locked(spool: str, data: bytes, timeout: float = 30.0) -> None:
    """Append raw mbox `data` under dotlock + fcntl, like procmail."""
    lock = spool + ".lock"
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, b"%d\n" % os.getpid())
            os.close(fd)
            break
        except FileExistsError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{lock} held too long") from None
            time.sleep(0.001)
    try:
        fd = os.open(spool, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)  # classic POSIX lock, blocking
            try:
                size = os.fstat(fd).st_size
                if size:
                    last = _tail(spool, size)
                    if not last.endswith(b"\n\n"):
                        data = (b"\n" if last.endswith(b"\n") else b"\n\n") + data
                os.write(fd, data)
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    finally:
        os.unlink(lock)


def _tail(path: str, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, size - 2))
        return f.read(2)


def deliver(spool: str, message: bytes, n: int = 0) -> None:
    append_locked(spool, entry(message, n))


def appender_main(spool: str, count: int, first: int) -> None:
    """Deliver `count` numbered messages as fast as possible (a child process)."""
    for k in range(first, first + count):
        deliver(spool, numbered(k), k)


def numbered(k: int) -> bytes:
    return b"From: a@example.org\nSubject: message %d\nMessage-ID: <%d@example.org>\n\nbody %d\n" % (k, k, k)


def number_of(message: bytes) -> int:
    m = re.search(rb"^Subject: message (\d+)$", message, re.MULTILINE)
    assert m, message[:200]
    return int(m.group(1))


if __name__ == "__main__":  # python mbox_helpers.py append SPOOL COUNT FIRST
    if sys.argv[1] == "append":
        appender_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
