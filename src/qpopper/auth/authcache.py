"""The auth cache, as Dovecot's auth_cache_size, _ttl and _negative_ttl.

It keeps what the database answered for a user: the whole record with
its stored password hash (so a wrong password is refused on a hit as it
is on a miss), or "no such user" for the negative TTL. It never keeps a
bare "this login was good". Entries are kept in least-recently-used
order and bounded by the memory they take, as Dovecot bounds its cache.

The counters (`hits`, `misses`, `entries`, `bytes`, `negative_hits`)
are plain attributes, read by the log line `log_stats` writes and by
whatever exports metrics.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Mapping
from typing import Generic, Protocol, TypeVar

log = logging.getLogger("qpopper.auth")

_Key = tuple[str, str | None, str | None]  # user, client (%r), local address (%l)


class CachedRecord(Protocol):
    """What the cache reads of a record (userdb.UserRecord has it): the
    fields that count against its size."""

    @property
    def user(self) -> str: ...
    @property
    def password(self) -> str | None: ...
    @property
    def home(self) -> str | None: ...
    @property
    def mail(self) -> str | None: ...
    @property
    def extra(self) -> Mapping[str, str]: ...


R = TypeVar("R", bound=CachedRecord)


def record_size(record: CachedRecord | None) -> int:
    """Bytes an entry takes, roughly: what counts against the size bound."""
    if record is None:
        return 64
    size = 200 + len(record.user) + len(record.password or "") + len(record.home or "") + len(record.mail or "")
    return size + sum(len(k) + len(v) + 16 for k, v in record.extra.items())


class AuthCache(Generic[R]):
    """Records by (user, client, local address): each address only when
    the queries use it (%r, %l), else one answer would be served for
    another address's question.

    `size` bounds the entries' bytes (auth-cache-size); `ttl` and
    `negative_ttl` are seconds (auth-cache-ttl, auth-cache-negative-ttl;
    a negative TTL of 0 keeps no negative entries).
    """

    def __init__(
        self,
        size: int,
        ttl: float,
        negative_ttl: float,
        keyed_by_client: bool = False,
        keyed_by_local: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.size = size
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.keyed_by_client = keyed_by_client
        self.keyed_by_local = keyed_by_local
        self._clock = clock
        # key -> (expires, record, size), oldest use first
        self._entries: collections.OrderedDict[_Key, tuple[float, R | None, int]] = collections.OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.negative_hits = 0
        self.misses = 0

    @property
    def entries(self) -> int:
        return len(self._entries)

    def _key(self, user: str, client: str | None, local: str | None) -> _Key:
        return (user, client if self.keyed_by_client else None, local if self.keyed_by_local else None)

    def get(self, user: str, client: str | None, local: str | None = None) -> tuple[bool, R | None]:
        """(True, record) on a hit, the record None for a negative entry;
        (False, None) on a miss or an expired entry."""
        key = self._key(user, client, local)
        entry = self._entries.get(key)
        if entry is None or entry[0] <= self._clock():
            if entry is not None:
                self._drop(key)
            self.misses += 1
            return False, None
        self._entries.move_to_end(key)
        self.hits += 1
        if entry[1] is None:
            self.negative_hits += 1
        return True, entry[1]

    def put(self, user: str, client: str | None, record: R | None, *, local: str | None = None) -> None:
        ttl = self.ttl if record is not None else self.negative_ttl
        if ttl <= 0 or self.size <= 0:
            return
        key = self._key(user, client, local)
        if key in self._entries:
            self._drop(key)
        size = record_size(record)
        self._entries[key] = (self._clock() + ttl, record, size)
        self.bytes += size
        while self.bytes > self.size and self._entries:
            self._drop(next(iter(self._entries)))

    def forget(self, user: str, client: str | None, local: str | None = None) -> None:
        key = self._key(user, client, local)
        if key in self._entries:
            self._drop(key)

    def clear(self) -> None:
        """Drop every entry (SIGHUP: the queries may have changed)."""
        self._entries.clear()
        self.bytes = 0

    def _drop(self, key: _Key) -> None:
        self.bytes -= self._entries.pop(key)[2]

    @property
    def hit_rate(self) -> float:
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0

    def counters(self) -> dict[str, int]:
        """The numbers a metrics exporter reads, by their metric names."""
        return {
            "auth_cache_hits": self.hits,
            "auth_cache_negative_hits": self.negative_hits,
            "auth_cache_misses": self.misses,
            "auth_cache_entries": self.entries,
            "auth_cache_bytes": self.bytes,
        }

    def log_stats(self) -> None:
        log.info(
            "auth cache: %d entries (%d bytes), %d hits (%d negative), %d misses, hit rate %.1f%%",
            self.entries, self.bytes, self.hits, self.negative_hits, self.misses, 100 * self.hit_rate,
        )
