"""The auth cache (auth-cache-size, -ttl, -negative-ttl): what it keeps,
for how long, within what size, and the figures it reports.

The clock is the test's (a cache TTL of an hour is not waited for); the
logins through a real server and database are in test_userdb.py and
test_sql_users.py.
"""

from __future__ import annotations

import logging

import pytest

from qpopper.auth.authcache import AuthCache, record_size
from qpopper.auth.userdb import UserRecord
from qpopper.config.options import Options, apply_settings
from qpopper.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_entries_expire_after_their_ttl() -> None:
    clock = Clock()
    cache = AuthCache[UserRecord](1 << 20, ttl=60, negative_ttl=10, clock=clock)
    alice = UserRecord("alice", "{PLAIN}pw")
    cache.put("alice", None, alice)
    cache.put("ghost", None, None)
    assert cache.get("alice", None) == (True, alice)
    assert cache.get("ghost", None) == (True, None)  # a negative entry
    clock.now += 11
    assert cache.get("ghost", None) == (False, None)  # the negative TTL is its own
    assert cache.get("alice", None) == (True, alice)
    clock.now += 50
    assert cache.get("alice", None) == (False, None)
    assert cache.entries == 0 and cache.bytes == 0
    assert cache.counters() == {
        "auth_cache_hits": 3, "auth_cache_negative_hits": 1, "auth_cache_misses": 2,
        "auth_cache_entries": 0, "auth_cache_bytes": 0,
    }  # fmt: skip


def test_the_size_bound_drops_the_least_recently_used() -> None:
    one = UserRecord("u0", "{PLAIN}" + "x" * 100)
    cache = AuthCache[UserRecord](size=3 * record_size(one), ttl=60, negative_ttl=60)
    for i in range(3):
        cache.put(f"u{i}", None, UserRecord(f"u{i}", "{PLAIN}" + "x" * 100))
    assert cache.get("u0", None)[0]  # u0 is now the most recently used
    cache.put("u3", None, UserRecord("u3", "{PLAIN}" + "x" * 100))
    assert [cache.get(f"u{i}", None)[0] for i in range(4)] == [True, False, True, True]
    assert cache.bytes <= cache.size


def test_zero_ttls_and_size_keep_nothing() -> None:
    cache = AuthCache[UserRecord](1 << 20, ttl=60, negative_ttl=0)
    cache.put("ghost", None, None)
    assert cache.entries == 0
    off = AuthCache[UserRecord](0, ttl=60, negative_ttl=60)
    off.put("alice", None, UserRecord("alice"))
    assert off.entries == 0


def test_keyed_by_client_only_when_the_queries_use_it() -> None:
    record = UserRecord("alice", "{PLAIN}pw")
    by_client = AuthCache[UserRecord](1 << 20, 60, 60, keyed_by_client=True)
    by_client.put("alice", "192.0.2.1", record)
    assert by_client.get("alice", "192.0.2.2") == (False, None)
    assert by_client.get("alice", "192.0.2.1") == (True, record)
    per_user = AuthCache[UserRecord](1 << 20, 60, 60, keyed_by_client=False)
    per_user.put("alice", "192.0.2.1", record)
    assert per_user.get("alice", "192.0.2.2") == (True, record)


def test_keyed_by_local_address_only_when_the_queries_use_it() -> None:
    """%l: one local address's answer is never served for another's."""
    one, two = UserRecord("dave@one.example", "{PLAIN}a"), UserRecord("dave@two.example", "{PLAIN}b")
    by_local = AuthCache[UserRecord](1 << 20, 60, 60, keyed_by_local=True)
    by_local.put("dave", "192.0.2.1", one, local="127.0.0.1")
    assert by_local.get("dave", "192.0.2.1", "127.0.0.2") == (False, None)
    assert by_local.get("dave", "192.0.2.9", "127.0.0.1") == (True, one)  # not keyed by the client
    by_local.put("dave", "192.0.2.1", two, local="127.0.0.2")
    by_local.forget("dave", None, "127.0.0.1")
    assert by_local.get("dave", None, "127.0.0.2") == (True, two)
    assert by_local.get("dave", None, "127.0.0.1") == (False, None)
    both = AuthCache[UserRecord](1 << 20, 60, 60, keyed_by_client=True, keyed_by_local=True)
    both.put("dave", "192.0.2.1", one, local="127.0.0.1")
    assert both.get("dave", "192.0.2.2", "127.0.0.1") == (False, None)
    assert both.get("dave", "192.0.2.1", "127.0.0.1") == (True, one)
    per_user = AuthCache[UserRecord](1 << 20, 60, 60)
    per_user.put("dave", None, one, local="127.0.0.1")
    assert per_user.get("dave", None, "127.0.0.2") == (True, one)


def test_stats_line_names_hit_rate_and_entries(caplog: pytest.LogCaptureFixture) -> None:
    cache = AuthCache[UserRecord](1 << 20, 60, 60)
    cache.put("alice", None, UserRecord("alice", "{PLAIN}hunter2"))
    cache.get("alice", None)
    cache.get("bob", None)
    with caplog.at_level(logging.INFO, logger="qpopper.auth"):
        cache.log_stats()
    assert "auth cache: 1 entries" in caplog.text and "hit rate 50.0%" in caplog.text
    assert "hunter2" not in caplog.text
    cache.clear()
    assert cache.entries == 0 and cache.bytes == 0


def test_settings_take_dovecots_units() -> None:
    options = apply_settings(Options(), [
        ("auth-cache-size", "10M", "test"), ("auth-cache-ttl", "1 hour", "test"),
        ("auth-cache-negative-ttl", "90 secs", "test"),
    ])  # fmt: skip
    assert (options.auth_cache_size, options.auth_cache_ttl, options.auth_cache_negative_ttl) == (10 << 20, 3600, 90)
    with pytest.raises(ConfigError, match="auth-cache-size must be a size"):
        apply_settings(Options(), [("auth-cache-size", "lots", "test")])
    with pytest.raises(ConfigError, match="auth-cache-ttl must be a time"):
        apply_settings(Options(), [("auth-cache-ttl", "1 fortnight", "test")])
