"""The two small files that make temp-drop mode's two-file steps recoverable.

Moving mail between two files cannot be one atomic step, so each step has
a journal the next login reads (see `recovery`) to finish or undo it:

* the gather journal `.<temp>.qpopper-gather`, beside the temp drop, for
  the move of the spool into the temp drop at login: "L" (the temp drop's
  length before), then "L N DIGEST" once the N appended spool bytes are
  durable (DIGEST: BLAKE2b of them, hex);
* the put-back flag `.<name>.qpopper-putback`, beside the spool, present
  while the new spool written from the temp drop is renamed into place.

Each is written whole or not at all (a temporary file renamed into place).
"""

from __future__ import annotations

import os
from typing import NamedTuple

from ...errors import MaildropError
from ..fsutil import unlink_quietly, write_all


class GatherRecord(NamedTuple):
    """What the gather journal says; `moved` and `digest` are None until
    the append to the temp drop was durable."""

    length: int
    moved: int | None
    digest: bytes | None


def write_gather_journal(path: str, length: int, moved: int | None = None, digest: str | None = None) -> None:
    if moved is None or digest is None:
        write_journal(path, b"%d\n" % length)
    else:
        write_journal(path, b"%d %d %s\n" % (length, moved, digest.encode()))


def read_gather_journal(path: str) -> GatherRecord | None:
    """The journal's record, None if there is none; MaildropError if it is
    damaged (then nothing may be touched)."""
    try:
        with open(path, "rb") as f:
            text = f.read(4096)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MaildropError(f"cannot read {path}: {exc}") from exc
    fields = text.split()
    try:
        length = int(fields[0])
        moved = int(fields[1]) if len(fields) > 1 else None
        digest = bytes.fromhex(fields[2].decode()) if len(fields) > 2 else None
    except (IndexError, ValueError) as exc:
        raise MaildropError(f"{path} is damaged") from exc
    return GatherRecord(length, moved, digest)


def write_journal(path: str, content: bytes) -> None:
    """Write a small journal file whole or not at all (temp file + rename)."""
    tmp = path + ".tmp"
    try:
        unlink_quietly(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as exc:
        unlink_quietly(tmp)
        raise MaildropError(f"cannot write {path}: {exc}") from exc


def write_flag(path: str) -> None:
    """Create an empty flag file, durably (the caller fsyncs the directory)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise MaildropError(f"cannot create {path}: {exc}") from exc
