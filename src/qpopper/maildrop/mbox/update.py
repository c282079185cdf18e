"""Planning and writing a replacement spool: the kept messages, then new mail.

UPDATE never edits a spool in place. It describes the new spool as a list
of pieces (ranges of an open file to copy, and short byte strings for the
lines it adds or changes), checks there is room, and writes them to
`.<name>.qpopper-new` (see `paths`), which the caller renames over the
spool. Both modes use this: server mode plans from the spool itself,
temp-drop mode from the temp drop.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from ...errors import MaildropError
from ..dotlock import SpoolLock
from ..fsutil import copy_owner_and_mode, unlink_quietly, write_all
from ..mboxindex import (
    MAX_FROM_LINE,
    MAX_HEADER_PARSE,
    MboxIndex,
    is_from_line,
    read_exact,
)
from .paths import new_spool_path

FREE_SPACE_MARGIN = 1 << 20  # keep a megabyte spare for the MDAs
COPY_CHUNK = 8 << 20


@dataclass(frozen=True, slots=True)
class Copy:
    """`length` bytes of the open file `fd` from `offset`."""

    fd: int
    offset: int
    length: int


Piece = Copy | bytes


def plan_kept(
    fd: int, idx: MboxIndex, drop: set[int], xuidl: dict[int, bytes], status: set[int]
) -> tuple[list[Piece], bytes]:
    """The kept messages of `fd` as pieces of the new spool.

    Adjacent unchanged segments become one copy. A From_ line is always
    written after an empty line, adding one where a writer left none
    (this changes no message: that line is the format's). Returns the
    pieces and the last (up to) three bytes they end with.
    """
    pieces: list[Piece] = []
    end_bytes = b""
    for i in range(len(idx)):
        if i in drop:
            continue
        a, s, b = idx.from_starts[i], idx.starts[i], idx.seg_ends[i]
        if a != s:  # a segment that starts with a From_ line
            _separate(pieces, end_bytes)
        line = xuidl.get(i)
        header: bytes | None = None
        if i in status and idx.body_starts[i] - s <= MAX_HEADER_PARSE:
            header = with_status_ro(pread(fd, s, idx.body_starts[i] - s), bool(idx.crlf[i]))
        if line is None and header is None:
            _add_copy(pieces, Copy(fd, a, b - a))
            end_bytes = pread(fd, max(a, b - 3), min(3, b - a))
            continue
        _add_copy(pieces, Copy(fd, a, s - a))
        if line is not None:
            pieces.append(line)
        rest = s
        if header is not None:
            pieces.append(header)
            rest = idx.body_starts[i]
        _add_copy(pieces, Copy(fd, rest, b - rest))
        end_bytes = _last_bytes(pieces, 3)
    return pieces, end_bytes


def append_new_mail(pieces: list[Piece], end_bytes: bytes, fd: int, start: int, current: int) -> None:
    """Add what was appended to `fd` from `start` to `current` (new mail)."""
    if current <= start:
        return
    new = Copy(fd, start, current - start)
    head = pread(fd, new.offset, min(new.length, MAX_FROM_LINE + 64))
    stripped = head.lstrip(b"\r\n")
    if is_from_line(stripped.split(b"\n", 1)[0] + b"\n"):
        skip = len(head) - len(stripped)
        new = Copy(fd, new.offset + skip, new.length - skip)
        _separate(pieces, end_bytes)
    pieces.append(new)


def total_size(pieces: list[Piece]) -> int:
    return sum(p.length if isinstance(p, Copy) else len(p) for p in pieces)


def write_new_spool(spool: str, pieces: list[Piece], st: os.stat_result, lock: SpoolLock) -> str:
    """Write and fsync `.<name>.qpopper-new` with the owner and mode of `st`;
    on failure remove it. Returns its path."""
    tmp = new_spool_path(spool)
    out: int | None = None
    try:
        unlink_quietly(tmp)
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        copy_owner_and_mode(out, st)
        for piece in pieces:
            if isinstance(piece, Copy):
                _copy_range(out, piece, lock)
            else:
                write_all(out, piece)
        os.fsync(out)
        os.close(out)
        out = None
    except (OSError, MaildropError) as exc:
        if out is not None:
            os.close(out)
        unlink_quietly(tmp)
        if isinstance(exc, MaildropError):
            raise
        what = "quota exceeded" if exc.errno == errno.EDQUOT else str(exc)
        raise MaildropError(f"cannot update {spool}: {what}") from exc
    except BaseException:
        if out is not None:
            os.close(out)
        raise
    return tmp


def with_status_ro(block: bytes, crlf: bool) -> bytes:
    """A header block (with its ending empty line, if any) marked `Status: RO`.

    Every Status line (with its continuation lines) is replaced by one
    `Status: RO` at the end of the header, as qpopper's update does.
    """
    if block in (b"\n", b"\r\n"):
        head, blank = b"", block
    elif block.endswith(b"\n\r\n"):
        head, blank = block[:-2], b"\r\n"
    elif block.endswith(b"\n\n"):
        head, blank = block[:-1], b"\n"
    else:
        head, blank = block, b""
    eol = b"\r\n" if (head.endswith(b"\r\n") if head else crlf) else b"\n"
    out: list[bytes] = []
    skipping = False
    pos = 0
    while pos < len(head):
        nl = head.find(b"\n", pos)
        stop = len(head) if nl < 0 else nl + 1
        line = head[pos:stop]
        pos = stop
        if skipping and line[:1] in (b" ", b"\t"):
            continue
        skipping = line[:7].lower() == b"status:"
        if not skipping:
            out.append(line)
    if out and not out[-1].endswith(b"\n"):
        out[-1] += eol
    out.append(b"Status: RO" + eol)
    return b"".join(out) + blank


def pread(fd: int, offset: int, n: int) -> bytes:
    """Exactly `n` bytes at `offset`, or MaildropError."""
    try:
        return read_exact(fd, offset, n)
    except (OSError, EOFError) as exc:
        raise MaildropError(f"cannot read at {offset}: {exc}") from exc


def _add_copy(pieces: list[Piece], piece: Copy) -> None:
    if piece.length <= 0:
        return
    last = pieces[-1] if pieces else None
    if isinstance(last, Copy) and last.fd == piece.fd and last.offset + last.length == piece.offset:
        pieces[-1] = Copy(piece.fd, last.offset, last.length + piece.length)
    else:
        pieces.append(piece)


def _last_bytes(pieces: list[Piece], n: int) -> bytes:
    out = b""
    for piece in reversed(pieces):
        if len(out) >= n:
            break
        if isinstance(piece, Copy):
            k = min(n - len(out), piece.length)
            out = pread(piece.fd, piece.offset + piece.length - k, k) + out
        else:
            out = piece[-(n - len(out)):] + out
    return out[-n:]


def _separate(pieces: list[Piece], end_bytes: bytes) -> None:
    """Add the empty line a From_ line must follow, if it is missing."""
    if not pieces or end_bytes.endswith((b"\n\n", b"\n\r\n")):
        return
    pieces.append(b"\n" if end_bytes.endswith(b"\n") else b"\n\n")


def _copy_range(out: int, piece: Copy, lock: SpoolLock) -> None:
    """Copy a range of a file, in the kernel where it can."""
    offset, left = piece.offset, piece.length
    use_kernel = hasattr(os, "copy_file_range")
    while left > 0:
        lock.refresh()
        n = min(left, COPY_CHUNK)
        if use_kernel:
            try:
                done = os.copy_file_range(piece.fd, out, n, offset)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                use_kernel = False
                continue
            if done == 0:
                raise MaildropError("a file shrank during update")
        else:
            data = pread(piece.fd, offset, n)
            write_all(out, data)
            done = len(data)
        offset += done
        left -= done
