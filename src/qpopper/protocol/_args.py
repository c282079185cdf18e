"""Strict reading of command arguments.

One server took `DELE 1x` as `DELE 1`; here a number is ASCII digits and
nothing else, short enough that it cannot overflow anything downstream.
"""

from __future__ import annotations

# A message number or TOP line count has at most this many digits.
MAX_NUMBER_DIGITS = 10

# Bytes allowed in a command line other than PASS: SP, HT and visible ASCII.
# qpopper tokenised commands on white space, so runs of blanks (spaces and
# tabs) between and after arguments are accepted; numbers stay strict.
PRINTABLE = b"\t" + bytes(range(0x20, 0x7F))

# PASS may carry 8-bit bytes (UTF-8 passwords) but no control characters.
PASSWORD_BYTES = bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))


def split_keyword(line: bytes) -> tuple[bytes, bytes]:
    """(keyword, the rest after the one blank that ends it).

    The keyword ends at the first space or tab. The rest is kept as sent,
    because PASS takes it whole (RFC 1939: a password may hold spaces).
    """
    end = line.find(b" ")
    tab = line.find(b"\t")  # rare: one more C-level scan, no Python loop
    if tab >= 0 and (end < 0 or tab < end):
        end = tab
    if end < 0:
        return line, b""
    return line[:end], line[end + 1 :]


def split_arguments(rest: bytes) -> list[bytes]:
    """The arguments of `rest`, separated by runs of spaces and tabs;
    leading and trailing blanks are ignored as qpopper ignored them."""
    if not rest:
        return []
    args = rest.split(b" ")
    if b"" in args or b"\t" in rest:  # the rare case; the plain one costs one split
        args = rest.replace(b"\t", b" ").split()
    return args


def parse_number(arg: bytes) -> int | None:
    """A strict decimal: ASCII digits only, no sign, no blanks, bounded."""
    if not arg or len(arg) > MAX_NUMBER_DIGITS or not arg.isdigit():
        return None
    return int(arg)
