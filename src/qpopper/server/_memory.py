"""Keeping the daemon's C heap small: one malloc arena, given back after bursts.

A burst of logins or downloads leaves free holes in the C heap that glibc
keeps for later use, so a server that then idles with hundreds of sessions
would go on carrying the burst's peak. glibc's malloc_trim returns free
pages (at the top of the heap and inside it) to the kernel; it walks the
heap, so the server calls it only every few seconds and only when
sessions have ended since the last call. Where there is no glibc, nothing
happens.

glibc also gives every thread that allocates its own arena (up to eight
per core), and each keeps its own high-water mark: the worker threads that
open big maildrops left about 3 MB behind after a download burst. The GIL
serialises nearly all of their allocations anyway, so the daemon asks for
one arena, unless the administrator set MALLOC_ARENA_MAX.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

# Seconds between checks for ended sessions.
TRIM_INTERVAL = 2.0
# glibc's mallopt parameter for the number of arenas.
M_ARENA_MAX = -8


def _libc_function(name: str) -> Callable[..., int] | None:
    try:
        function: Callable[..., int] = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    return function


_malloc_trim = _libc_function("malloc_trim")
_mallopt = _libc_function("mallopt")


def limit_malloc_arenas(count: int = 1) -> bool:
    """Have every thread allocate from `count` arenas; call before threads
    start. False where that is not possible or MALLOC_ARENA_MAX decides."""
    if _mallopt is None or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    return bool(_mallopt(M_ARENA_MAX, count))


def release_free_memory() -> bool:
    """Hand the heap's free pages back; False where that is not possible."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True
