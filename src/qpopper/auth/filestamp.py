"""The stat of a file the server reads users from, asked at most once a second.

A login asks the passwd-file, the APOP database and the access lists whether
they changed since they were read; a stat of each at every login was a tenth
of a login's system calls. `StatCache.stat` answers from the last stat when
it is less than `interval` seconds old, so an edited file is seen by the
logins that start within a second of the edit, never later: the same bound
qpopper's and Dovecot's own caches put on an administrator's edits (Dovecot's
auth cache, when on, keeps an answer for an hour). A SIGHUP (`recheck_all`)
makes every cache ask the file system again at its next use.

Writers (popauth) never go through a cache: they stat the file themselves.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import ClassVar

RECHECK_INTERVAL = 1.0  # seconds


def recheck_all() -> None:
    """Every cache asks the file system at its next use (SIGHUP)."""
    StatCache.generation += 1


class StatCache:
    """`os.stat(path)`, from memory for `interval` seconds after each real one.

    An error is remembered as its errno and raised anew (a fresh exception
    each time: re-raising one object would grow its traceback at every login).
    Callers hold their own lock; two threads racing here at worst both stat."""

    __slots__ = ("_checked", "_clock", "_errno", "_generation", "_result", "interval", "path")

    # Bumped by recheck_all; a cache that saw an older one asks the file system.
    generation: ClassVar[int] = 0

    def __init__(self, path: str, interval: float = RECHECK_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.interval = interval
        self._clock = clock
        self._checked: float | None = None
        self._generation = StatCache.generation
        self._result: os.stat_result | None = None
        self._errno = 0

    def stat(self) -> os.stat_result:
        result = self.stat_or_errno()
        if isinstance(result, int):
            raise OSError(result, os.strerror(result), self.path)
        return result

    def stat_or_errno(self) -> os.stat_result | int:
        """The stat, or the errno it failed with. For the checks at every
        login, where a missing file (no APOP database, no access list) is the
        usual case: an OSError raised and caught there cost a login more than
        the stat the cache saves (its message comes from the C library's
        message catalogues)."""
        now = self._clock()
        checked = self._checked
        if checked is None or now - checked >= self.interval or self._generation != StatCache.generation:
            self._checked, self._generation = now, StatCache.generation
            try:
                self._result = os.stat(self.path)
            except OSError as exc:
                self._result, self._errno = None, exc.errno or 0
        return self._errno if self._result is None else self._result
