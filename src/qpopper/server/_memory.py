"""Giving memory back to the system after a burst of sessions.

A burst of logins or downloads leaves free holes in the C heap that glibc
keeps for later use, so a server that then idles with hundreds of sessions
would go on carrying the burst's peak. glibc's malloc_trim returns free
pages (at the top of the heap and inside it) to the kernel; it walks the
heap, so the server calls it only every few seconds and only when
sessions have ended since the last call. Where there is no glibc, nothing
happens.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

# Seconds between checks for ended sessions.
TRIM_INTERVAL = 2.0


def _find_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None)
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_malloc_trim = _find_trim()


def release_free_memory() -> bool:
    """Hand the heap's free pages back; False where that is not possible."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True
