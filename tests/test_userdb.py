"""The user-database seam: DatabaseAuthenticator over any UserDatabase,
driven through a real server and real POP3 clients.

The database here is a dict behind the UserDatabase protocol (the SQL
and LDAP backends have their own tests against real servers); what is
tested is everything the seam adds on top of a lookup.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import pop_login, pop_refusal
from qpopper import Controller
from qpopper.auth import AuthTuning
from qpopper.auth.userdb import BindingUserDatabase, DatabaseAuthenticator, UserDatabase, UserRecord
from qpopper.errors import AuthUnavailable


class DictDatabase:
    """Users in a dict; `down` makes every lookup fail as a dead database does."""

    def __init__(self, records: dict[str, UserRecord]) -> None:
        self.records = records
        self.down = False
        self.lookups: list[tuple[str, str | None]] = []
        self.closed = False

    async def lookup(self, user: str, client: str | None, local: str | None = None) -> UserRecord | None:
        self.lookups.append((user, client))
        if self.down:
            raise AuthUnavailable("dict database is down")
        await asyncio.sleep(0)
        return self.records.get(user)

    async def close(self) -> None:
        self.closed = True

    def describe(self) -> str:
        return "dict database"




@pytest.fixture
def database(fill: Callable[[str, list[bytes]], Path], mailroot: Path) -> DictDatabase:
    fill("alice", [b"Subject: hi\n\nhello\n"])
    fill("carol", [])
    argon = "{ARGON2ID}" + _argon2("wonderland")
    return DictDatabase({
        "alice": UserRecord("alice", "{PLAIN}secret", home=str(mailroot / "alice")),
        "bob": UserRecord("bob", argon, mail=f"maildir:{mailroot}/alice/Maildir"),
        "carol": UserRecord("carol", "{PLAIN}x", extra={"nologin": "y"}),
        "dave": UserRecord("dave", None, extra={"nopassword": "y"}, mail=f"maildir:{mailroot}/carol/Maildir"),
        "erin": UserRecord("erin", "{PLAIN}x", extra={"allow_nets": "192.0.2.0/24, 2001:db8::/32"}),
        "fred": UserRecord("fred", "{PLAIN}x", extra={"allow_nets": "192.0.2.0/24 127.0.0.0/8"},
                           mail=f"maildir:{mailroot}/carol/Maildir"),
    })


def _argon2(password: str) -> str:
    from passlib.hash import argon2

    hashed: str = argon2.using(rounds=2, memory_cost=1024).hash(password)
    return hashed


def test_record_repr_hides_the_password() -> None:
    record = UserRecord("alice", "{PLAIN}hunter2")
    assert "hunter2" not in repr(record)
    assert isinstance(DictDatabase({}), UserDatabase)
    assert not isinstance(DictDatabase({}), BindingUserDatabase)


def test_logins_through_the_seam(database: DictDatabase, mailroot: Path) -> None:
    auth = DatabaseAuthenticator(database, mail_location=f"maildir:{mailroot}/%u/Maildir")
    with Controller(authenticator=auth) as server:
        client = pop_login(server.port, "alice", "secret")
        assert client.stat()[0] == 1
        client.quit()
        client = pop_login(server.port, "bob", "wonderland")  # an ARGON2ID hash, checked in the hash pool
        assert client.stat()[0] == 1  # the record's own mail location
        client.quit()
        assert "[AUTH]" in pop_refusal(server.port, "bob", "wrong")
        assert "[AUTH]" in pop_refusal(server.port, "nobody", "secret")
        assert "[AUTH]" in pop_refusal(server.port, "carol", "x")  # nologin
        assert "[AUTH]" in pop_refusal(server.port, "erin", "x")  # 127.0.0.1 is not in allow_nets
        pop_login(server.port, "dave", "anything").quit()  # nopassword
        pop_login(server.port, "fred", "x").quit()  # 127.0.0.1 is in fred's allow_nets
        assert ("alice", "127.0.0.1") in database.lookups  # the client address reaches the database
        # An unknown user's dummy check now costs what bob's ARGON2ID check costs.
        assert auth.hashes.last_real is not None and auth.hashes.last_real[0] == "ARGON2ID"
        assert auth.counters() == {"auth_db_lookups": len(database.lookups), "auth_db_failures": 0}
    assert database.closed


def test_a_database_that_is_down_is_sys_temp(database: DictDatabase, mailroot: Path) -> None:
    auth = DatabaseAuthenticator(database, mail_location=f"maildir:{mailroot}/%u/Maildir")
    with Controller(authenticator=auth) as server:
        database.down = True
        reply = pop_refusal(server.port, "alice", "secret")
        assert "[SYS/TEMP]" in reply and "[AUTH]" not in reply
        assert auth.counters()["auth_db_failures"] == 1
        database.down = False
        pop_login(server.port, "alice", "secret").quit()


def test_apop_database_in_front_keeps_the_async_path(database: DictDatabase, mailroot: Path, tmp_path: Path) -> None:
    from qpopper.auth import AsyncAuthenticator
    from qpopper.auth.apopdb import ApopAuthenticator, ApopDatabase

    inner = DatabaseAuthenticator(database, mail_location=f"maildir:{mailroot}/%u/Maildir")
    wrapped = ApopAuthenticator(inner, ApopDatabase(str(tmp_path / "none.auth")), None)
    assert isinstance(wrapped, AsyncAuthenticator)
    with Controller(authenticator=wrapped) as server:
        pop_login(server.port, "alice", "secret").quit()


def test_blocking_entry_point_runs_on_the_servers_loop(database: DictDatabase, mailroot: Path) -> None:
    auth = DatabaseAuthenticator(database, mail_location=f"maildir:{mailroot}/%u/Maildir")
    from qpopper.auth import UserPass

    with pytest.raises(AuthUnavailable):  # no loop yet: a clear failure, not a hang
        auth.authenticate(UserPass("alice", b"secret"))
    with Controller(authenticator=auth):
        principal = auth.authenticate(UserPass("alice", b"secret"))
        assert principal is not None and principal.mail.endswith("/alice/Maildir")
        assert auth.authenticate(UserPass("alice", b"nope")) is None
        secret = auth.scram_secret("alice", "SCRAM-SHA-256")  # SCRAM from a {PLAIN} password, as SASL asks
        assert secret is not None and secret.iterations > 0
        assert auth.scram_secret("nobody", "SCRAM-SHA-256") is None


def test_cache_refuses_a_wrong_password_on_a_hit(database: DictDatabase, mailroot: Path) -> None:
    auth = DatabaseAuthenticator(database, mail_location=f"maildir:{mailroot}/%u/Maildir",
                                 tuning=AuthTuning(cache_size=1 << 20))  # fmt: skip
    cache = auth.cache
    assert cache is not None
    with Controller(authenticator=auth) as server:
        pop_login(server.port, "alice", "secret").quit()
        looked_up = len(database.lookups)
        pop_login(server.port, "alice", "secret").quit()
        assert len(database.lookups) == looked_up  # a hit
        assert "[AUTH]" in pop_refusal(server.port, "alice", "wrong")
        # A changed password works at once: the mismatch asks the database again.
        database.records["alice"] = UserRecord("alice", "{PLAIN}changed")
        pop_login(server.port, "alice", "changed").quit()
        assert "[AUTH]" in pop_refusal(server.port, "alice", "secret")
        # A negative entry answers as a wrong password does, without the database.
        assert "[AUTH]" in pop_refusal(server.port, "ghost", "pw")
        looked_up = len(database.lookups)
        assert "[AUTH]" in pop_refusal(server.port, "ghost", "pw")
        assert len(database.lookups) == looked_up
    assert cache.hits >= 3 and cache.negative_hits == 1 and cache.entries == 2
    assert auth.counters()["auth_cache_entries"] == 2


def test_sighup_tuning_resizes_the_cache_and_the_hash_pool(database: DictDatabase, mailroot: Path) -> None:
    """auth-cache-* and auth-hash-workers change at a reload: a new, empty
    cache of the new size (none for 0), a pool of the new width; logins
    go on across it."""
    auth = DatabaseAuthenticator(database, mail_location=f"maildir:{mailroot}/%u/Maildir")
    assert auth.cache is None
    with Controller(authenticator=auth) as server:
        pop_login(server.port, "alice", "secret").quit()
        auth.reload(AuthTuning(cache_size=1 << 20, cache_ttl=60, cache_negative_ttl=0, hash_workers=3))
        assert auth.cache is not None and (auth.cache.size, auth.cache.ttl, auth.cache.negative_ttl) == (1 << 20, 60, 0)
        assert auth.hashes.workers == 3
        looked_up = len(database.lookups)
        pop_login(server.port, "alice", "secret").quit()
        pop_login(server.port, "alice", "secret").quit()
        assert len(database.lookups) == looked_up + 1  # the second was a hit
        auth.reload(AuthTuning(cache_size=0, hash_workers=3))
        assert auth.cache is None and auth.hashes.workers == 3
        pop_login(server.port, "alice", "secret").quit()
        assert "[AUTH]" in pop_refusal(server.port, "alice", "wrong")
