"""Who may log in beyond their password: qpopper's nonauth-file (default
/etc/ftpusers) and auth-file, and the LOGIN-DELAY a site may enforce.

The lists are plain files of user names, one per line, `#` comments; they
are re-read when they change (seen within a second: see filestamp). A missing nonauth-file refuses nobody; a
missing auth-file (when one is configured) admits nobody, because an
allow-list that cannot be read must not open the door.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from .filestamp import RECHECK_INTERVAL, StatCache

log = logging.getLogger("qpopper.access")


class UserList:
    def __init__(self, path: str, recheck_interval: float = RECHECK_INTERVAL) -> None:
        self.path = path
        self._stat = StatCache(path, recheck_interval)
        self._stamp: tuple[int, int] | None = None
        self._names: frozenset[str] | None = None
        self._lock = threading.Lock()

    def names(self) -> frozenset[str] | None:
        """The names listed, or None if the file cannot be read."""
        with self._lock:
            st = self._stat.stat_or_errno()
            if isinstance(st, int):
                self._stamp, self._names = None, None
                return None
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                try:
                    with open(self.path, encoding="utf-8", errors="replace") as f:
                        lines = f.read().splitlines()
                except OSError as exc:
                    log.error("cannot read %s: %s", self.path, exc.strerror)
                    return None
                self._names = frozenset(
                    line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()
                )
                self._stamp = stamp
            return self._names


class AccessPolicy:
    def __init__(self, nonauth_file: str | None, auth_file: str | None) -> None:
        self._deny = UserList(nonauth_file) if nonauth_file else None
        self._allow = UserList(auth_file) if auth_file else None

    def refusal(self, user: str) -> str | None:
        """Why `user` may not log in, or None if they may."""
        if self._deny is not None:
            denied = self._deny.names()
            if denied is not None and user in denied:
                return f"listed in {self._deny.path}"
        if self._allow is not None:
            allowed = self._allow.names()
            if allowed is None:
                return f"{self._allow.path} cannot be read"
            if user not in allowed:
                return f"not listed in {self._allow.path}"
        return None


@dataclass(frozen=True, slots=True)
class LoginClaim:
    """A login counted for LOGIN-DELAY before its maildrop opened: handed
    back (`LoginDelays.release`) if the open fails, so a login that never
    got its maildrop does not hold the user off."""

    user: str
    at: float
    previous: float | None
    shared: bytes | None = None  # the value written in Redis, when it answered


class LoginDelays:
    """When each user last logged in, for LOGIN-DELAY enforcement.

    Kept in the serving process: several worker processes or hosts each
    enforce it for the logins they see. `claim` checks and records in one
    step (nothing runs between the two in an event loop), so two sessions
    of one user cannot both pass the check."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def claim(self, user: str, delay: int, now: float | None = None, force: bool = False) -> LoginClaim | None:
        """Record a login of `user` now, unless one was less than `delay`
        seconds ago (None then); `force`: record whatever the last was."""
        now = time.monotonic() if now is None else now
        if not force and self.too_soon(user, delay, now):
            return None
        previous = self._last.get(user)
        self.record(user, now)
        return LoginClaim(user, now, previous)

    def release(self, claim: LoginClaim) -> None:
        """Undo `claim` if it is still the last login recorded for its user."""
        if self._last.get(claim.user) != claim.at:
            return
        if claim.previous is None:
            del self._last[claim.user]
        else:
            self._last[claim.user] = claim.previous

    def too_soon(self, user: str, delay: int, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        last = self._last.get(user)
        return last is not None and now - last < delay

    def record(self, user: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._last[user] = now
        if len(self._last) > 100_000:  # forget the oldest half
            for name, _ in sorted(self._last.items(), key=lambda item: item[1])[:50_000]:
                del self._last[name]


class FailureDelays:
    """Failed logins per client address, for a delay that grows with them.

    Each recent failure from an address doubles the delay before the next
    failure is answered, up to `maximum`; an address quiet for `forget`
    seconds starts over. Nothing is ever locked out."""

    def __init__(self, base: float, maximum: float, forget: float = 600.0) -> None:
        self.base = base
        self.maximum = max(base, maximum)
        self.forget = forget
        self._recent: dict[str, tuple[int, float]] = {}

    def delay(self, address: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        count, last = self._recent.get(address, (0, now))
        if now - last > self.forget:
            count = 0
        if self.base <= 0:
            return 0.0
        return float(min(self.maximum, self.base * (2 ** min(count, 30))))

    def record_failure(self, address: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        count, last = self._recent.get(address, (0, now))
        if now - last > self.forget:
            count = 0
        self._recent[address] = (count + 1, now)
        if len(self._recent) > 100_000:
            for key, _ in sorted(self._recent.items(), key=lambda item: item[1][1])[:50_000]:
                del self._recent[key]
