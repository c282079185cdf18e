"""The server's side of qpopper's XTND and EUIDL: reading header lines
from stored messages, and handing XMIT messages to the mail system.

Header text comes from mail anyone can send, so it is cleaned of control
characters before it is sent and never used as a format string (qpopper's
EUIDL was a format-string hole, CVE-2000-0442).
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Iterator

from ...errors import ResponseCode
from ...logtext import printable
from ...maildrop import Maildrop

log = logging.getLogger("qpopper.xtnd")

# Only the header block is read, and at most this much of it.
HEADER_READ_MAX = 64 * 1024
EUIDL_VALUE_MAX = 128
SENDMAIL_TIMEOUT = 120
# sysexits.h: temporary failure.
EX_TEMPFAIL = 75

_CONTROLS = bytes(range(0x09)) + bytes(range(0x0A, 0x20)) + b"\x7f"
_SPACES = b" " * len(_CONTROLS)
_CLEAN = bytes.maketrans(_CONTROLS, _SPACES)


def header_lines(maildrop: Maildrop, index: int) -> list[bytes]:
    """The message's header lines (without line ends), read in chunks."""
    data = b""
    for chunk in maildrop.read(index, chunk_size=8192):
        data += chunk
        if b"\n\n" in data or b"\r\n\r\n" in data or len(data) >= HEADER_READ_MAX:
            break
    data = data[:HEADER_READ_MAX].replace(b"\r\n", b"\n")
    head = data.split(b"\n\n", 1)[0] if not data.startswith(b"\n") else b""
    return head.split(b"\n")


def find_header(lines: list[bytes], prefix: str) -> list[bytes]:
    """The first field whose name starts with `prefix` (case-insensitive),
    with its continuation lines, cleaned of control characters."""
    wanted = prefix.lower().encode("ascii")
    for i, line in enumerate(lines):
        if line[:1] in (b" ", b"\t") or b":" not in line:
            continue
        name = line.split(b":", 1)[0].strip().lower()
        if name.startswith(wanted):
            field = [line]
            for more in lines[i + 1 :]:
                if more[:1] not in (b" ", b"\t"):
                    break
                field.append(more)
            return [f.translate(_CLEAN) for f in field]
    return []


def xlst_lines(number: int, field: list[bytes]) -> Iterator[bytes]:
    if not field:
        return
    yield b"%d " % number + field[0] + b"\r\n"
    for more in field[1:]:
        yield more + b"\r\n"


def euidl_value(field: list[bytes]) -> bytes:
    if not field:
        return b""
    joined = b" ".join(f.strip() for f in field)
    value = joined.split(b":", 1)[1].strip() if b":" in joined else b""
    return value[:EUIDL_VALUE_MAX]


def submit(command: str, sender: str, message: bytes) -> tuple[ResponseCode | None, str]:
    """Run the mail command (no shell) with the message on its input.

    The recipients come from the message's headers (-t); the envelope
    sender is the logged-in user."""
    argv = shlex.split(command) + ["-oi", "-t", "-f", sender]
    try:
        proc = subprocess.run(argv, input=message, capture_output=True, timeout=SENDMAIL_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.error("XTND XMIT: cannot run %s: %s", printable(argv[0]), exc)
        return ResponseCode.SYS_TEMP, "The mail system is unavailable."
    if proc.returncode == 0:
        log.info("XTND XMIT: message from %s (%d octets) handed to %s", sender, len(message), argv[0])
        return None, ""
    log.warning("XTND XMIT: %s exited %d: %s", argv[0], proc.returncode, printable(proc.stderr, 300))
    if proc.returncode == EX_TEMPFAIL:
        return ResponseCode.SYS_TEMP, "The mail system cannot take the message now."
    return ResponseCode.SYS_PERM, f"The mail system refused the message (status {proc.returncode})."
