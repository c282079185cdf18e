"""The user files' stat, asked at most once per interval (auth/filestamp.py),
and what the passwd-file, the APOP database and the access lists make of it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from qpopper import PasswdFileAuthenticator
from qpopper.auth.access import UserList
from qpopper.auth.apopdb import ApopDatabase
from qpopper.auth.credentials import UserPass
from qpopper.auth.filestamp import StatCache, recheck_all


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _edit(path: Path, text: str, mtime_s: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(mtime_s * 10**9, mtime_s * 10**9))  # a stamp no earlier write had


def test_an_edit_is_seen_once_the_interval_has_passed(tmp_path: Path) -> None:
    path = tmp_path / "f"
    _edit(path, "one", 1_000)
    clock = Clock()
    cache = StatCache(str(path), interval=1.0, clock=clock)
    assert cache.stat().st_mtime_ns == 1_000 * 10**9
    _edit(path, "two!", 2_000)
    clock.now += 0.5
    assert cache.stat().st_mtime_ns == 1_000 * 10**9  # within the second: the last stat
    clock.now += 0.5
    assert cache.stat().st_mtime_ns == 2_000 * 10**9  # a second after it: the file system
    _edit(path, "three", 3_000)
    recheck_all()  # SIGHUP: at once
    assert cache.stat().st_mtime_ns == 3_000 * 10**9


def test_a_missing_file_is_remembered_as_missing_and_raised_afresh(tmp_path: Path) -> None:
    path = tmp_path / "gone"
    clock = Clock()
    cache = StatCache(str(path), interval=1.0, clock=clock)
    with pytest.raises(FileNotFoundError) as first:
        cache.stat()
    path.write_text("here now")
    with pytest.raises(FileNotFoundError) as second:
        cache.stat()
    # A new exception each time: one object raised at every login would grow its traceback.
    assert second.value is not first.value and second.value.filename == str(path)
    clock.now += 1.0
    assert cache.stat().st_size == len("here now")


def test_the_login_path_gets_a_missing_file_as_its_errno_without_an_exception(tmp_path: Path) -> None:
    path = tmp_path / "gone"
    clock = Clock()
    cache = StatCache(str(path), interval=1.0, clock=clock)
    assert cache.stat_or_errno() == errno.ENOENT
    path.write_text("here now")
    assert cache.stat_or_errno() == errno.ENOENT  # within the interval: still the remembered answer
    clock.now += 1.0
    found = cache.stat_or_errno()
    assert not isinstance(found, int) and found.st_size == len("here now")
    path.unlink()
    clock.now += 1.0
    assert cache.stat_or_errno() == errno.ENOENT


def test_a_missing_apop_database_or_access_list_answers_from_memory(tmp_path: Path) -> None:
    database = ApopDatabase(str(tmp_path / "pop.auth"), recheck_interval=3600)
    assert database.secret_if_current("u1") == (True, None)  # no file: no secret, known without a read
    assert UserList(str(tmp_path / "ftpusers"), recheck_interval=3600).names() is None


def test_the_passwd_file_is_trusted_from_memory_until_its_stat_is_due(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    _edit(path, "u1:{PLAIN}old::::/h::\n", 1_000)
    auth = PasswdFileAuthenticator(str(path), "maildir:/m/%u", recheck_interval=3600)
    _edit(path, "u1:{PLAIN}new::::/h::\n", 2_000)
    assert auth.authenticate_quickly(UserPass("u1", b"old")) is not None  # the copy of this interval
    recheck_all()  # what the interval's end does, and SIGHUP at once
    assert auth.authenticate_quickly(UserPass("u1", b"old")) is None  # changed: the worker rereads
    assert auth.authenticate(UserPass("u1", b"old")) is None
    assert auth.authenticate_quickly(UserPass("u1", b"new")) is not None


def test_the_apop_database_server_side_waits_but_popauth_never_does(tmp_path: Path) -> None:
    path = tmp_path / "pop.auth"
    _edit(path, "alice:{PLAIN}one\n", 1_000)
    db = ApopDatabase(str(path), recheck_interval=3600)
    assert db.secret("alice") == "one"
    _edit(path, "alice:{PLAIN}two\nbob:{PLAIN}b\n", 2_000)
    assert db.secret("alice") == "one"
    assert db.secret_if_current("bob") == (True, None)
    # popauth changes the file from load(): it always reads what is there,
    # or a second change within the interval would undo the first.
    assert db.load() == {"alice": "two", "bob": "b"}
    db.set_secret("carol", "c")
    db.set_secret("dave", "d")
    assert set(db.load()) == {"alice", "bob", "carol", "dave"}


def test_an_access_list_is_read_again_after_a_sighup(tmp_path: Path) -> None:
    path = tmp_path / "ftpusers"
    _edit(path, "root\n", 1_000)
    users = UserList(str(path), recheck_interval=3600)
    assert users.names() == frozenset({"root"})
    _edit(path, "root\nmallory  # abuse\n", 2_000)
    assert users.names() == frozenset({"root"})
    recheck_all()
    assert users.names() == frozenset({"root", "mallory"})
