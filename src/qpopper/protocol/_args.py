"""Strict reading of command arguments.

One server took `DELE 1x` as `DELE 1`; here a number is ASCII digits and
nothing else, short enough that it cannot overflow anything downstream.
"""

from __future__ import annotations

# A message number or TOP line count has at most this many digits.
MAX_NUMBER_DIGITS = 10

# Bytes allowed in a command line other than PASS: SP and visible ASCII.
PRINTABLE = bytes(range(0x20, 0x7F))

# PASS may carry 8-bit bytes (UTF-8 passwords) but no control characters.
PASSWORD_BYTES = bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))


def parse_number(arg: bytes) -> int | None:
    """A strict decimal: ASCII digits only, no sign, no blanks, bounded."""
    if not arg or len(arg) > MAX_NUMBER_DIGITS or not arg.isdigit():
        return None
    return int(arg)
