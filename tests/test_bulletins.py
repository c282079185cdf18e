"""Bulletins on a real server, for Maildir and mbox maildrops."""

from __future__ import annotations

import os
import poplib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import PASSWORD
from qpopper import Controller, StaticAuthenticator
from qpopper.extensions.bulletins import Bulletin, BulletinDatabase, pending, render

FROM_LINE = "From admin@example.org  Wed Nov 25 10:00:00 2026\n"


def bulletin(number: int, subject: str, extra_name: str = "") -> tuple[str, str]:
    text = (
        FROM_LINE
        + "From: The Admin <admin@example.org>\nTo: everyone@example.org\nStatus: RO\nX-UIDL: stale-uid-000\n"
        + f"Subject: {subject}\n\nPlease read bulletin {number}.\nFrom now on, this line is quoted in mbox.\n"
    )
    return f"{number}{extra_name}", text


@pytest.fixture
def bulldir(tmp_path: Path) -> Path:
    d = tmp_path / "bulls"
    d.mkdir()
    return d


def post(bulldir: Path, number: int, subject: str, extra_name: str = "") -> None:
    name, text = bulletin(number, subject, extra_name)
    (bulldir / name).write_text(text)


@pytest.fixture(params=["maildir", "mbox"])
def server_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Controller]]:
    started: list[Controller] = []
    mail = tmp_path / "mail"
    mail.mkdir()
    home = tmp_path / "home"
    location = f"maildir:{mail}/%u/Maildir" if request.param == "maildir" else f"mbox:{mail}/%u"

    def start(**settings: Any) -> Controller:
        auth = StaticAuthenticator({"alice": PASSWORD, "bob": PASSWORD}, mail_location=location, home=f"{home}/%u")
        for user in ("alice", "bob"):
            (home / user).mkdir(parents=True, exist_ok=True)
        c = Controller(authenticator=auth, hostname="pop.example.org", **settings).start()
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()


def fetch_subjects(server: Controller, user: str = "alice") -> list[bytes]:
    c = poplib.POP3(server.host, server.port, timeout=10)
    try:
        c.user(user)
        c.pass_(PASSWORD)
    except BaseException:
        c.close()
        raise
    out = []
    for i in range(1, c.stat()[0] + 1):
        lines = c.retr(i)[1]
        out += [line for line in lines if line.startswith(b"Subject: ")]
        if any(line.startswith(b"Subject: bulletin") for line in lines):
            assert b"To: alice@pop.example.org" in lines or b"To: bob@pop.example.org" in lines
            # The bulletin's own Status: and X-UIDL: are gone (an mbox spool
            # may carry a Status: RO the server wrote after a retrieval).
            assert not any(line.startswith(b"X-UIDL: stale") for line in lines)
    c.quit()
    return out


def test_new_user_gets_the_newest_then_each_new_one_once(
    server_factory: Callable[..., Controller], bulldir: Path, tmp_path: Path
) -> None:
    post(bulldir, 1, "bulletin one")
    post(bulldir, 2, "bulletin two")
    server = server_factory(bulldir=str(bulldir))
    assert fetch_subjects(server) == [b"Subject: bulletin two"]  # max-bulletins 1
    assert (tmp_path / "home" / "alice" / ".popbull").read_text() == "2\n"
    assert fetch_subjects(server) == [b"Subject: bulletin two"]  # not again
    post(bulldir, 3, "bulletin three")
    assert fetch_subjects(server) == [b"Subject: bulletin two", b"Subject: bulletin three"]
    assert (tmp_path / "home" / "alice" / ".popbull").stat().st_mode & 0o077 == 0


def test_max_bulletins_and_empty_popbull(
    server_factory: Callable[..., Controller], bulldir: Path, tmp_path: Path
) -> None:
    for n in (1, 2, 3):
        post(bulldir, n, f"bulletin {n}")
    server = server_factory(bulldir=str(bulldir), max_bulletins=2)
    assert fetch_subjects(server) == [b"Subject: bulletin 2", b"Subject: bulletin 3"]
    (tmp_path / "home" / "bob" / ".popbull").write_text("")  # qpopper: empty = all seen
    assert fetch_subjects(server, "bob") == []
    assert (tmp_path / "home" / "bob" / ".popbull").read_text() == "3\n"


def test_bad_bulletin_is_skipped_not_a_failed_login(server_factory: Callable[..., Controller], bulldir: Path) -> None:
    (bulldir / "1").write_text("Subject: no From_ line\n\nbroken\n")
    post(bulldir, 2, "bulletin good")
    server = server_factory(bulldir=str(bulldir), max_bulletins=5)
    assert fetch_subjects(server) == [b"Subject: bulletin good"]


def test_group_bulletins(server_factory: Callable[..., Controller], bulldir: Path) -> None:
    import grp

    root_group = grp.getgrgid(0).gr_name
    post(bulldir, 1, "bulletin all", ".ALL")
    post(bulldir, 2, "bulletin root group", f".{root_group}")
    post(bulldir, 3, "bulletin nogroup", ".no-such-group-xyz")
    post(bulldir, 4, "bulletin plain")
    server = server_factory(bulldir=str(bulldir), max_bulletins=10, group_bulletins=True)
    # StaticAuthenticator users have no gid and are in no group.
    assert fetch_subjects(server) == [b"Subject: bulletin all", b"Subject: bulletin plain"]


def test_bulldb_imports_popbull_and_racing_logins_never_duplicate(
    server_factory: Callable[..., Controller], bulldir: Path, tmp_path: Path
) -> None:
    for n in (1, 2, 3):
        post(bulldir, n, f"bulletin {n}")
    (tmp_path / "home" / "alice").mkdir(parents=True, exist_ok=True)
    (tmp_path / "home" / "alice" / ".popbull").write_text("2\n")
    server = server_factory(bulldir=str(bulldir), bulldb=True, max_bulletins=10)
    results: list[object] = []

    def login() -> None:
        try:
            results.append(fetch_subjects(server))
        except poplib.error_proto as exc:
            results.append(exc)  # [IN-USE]: the other login holds the maildrop

    threads = [threading.Thread(target=login) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = fetch_subjects(server)
    assert final == [b"Subject: bulletin 3"]  # imported mark 2: only 3 is new, delivered once
    assert "alice 3" in (bulldir / "bulldb").read_text()


def test_unit_rules() -> None:
    bulletins = [Bulletin(1, "1", None), Bulletin(5, "5", None), Bulletin(9, "9", None)]
    assert [b.number for b in pending(bulletins, None, 1)[0]] == [9]
    assert [b.number for b in pending(bulletins, None, 0)[0]] == []
    assert [b.number for b in pending(bulletins, 4, 1)[0]] == [5, 9]
    assert pending(bulletins, -1, 1) == ([], 9)
    assert render(b"not a from line\n\nx\n", "u", "h") is None
    from_line, message = render(bulletin(1, "x")[1].encode(), "u", "h")  # type: ignore[misc]
    assert from_line.startswith(b"From admin@example.org")
    assert b"To: u@h\n" in message and b"Status" not in message and b"stale" not in message


def test_bulldb_file_format(tmp_path: Path) -> None:
    db = BulletinDatabase(str(tmp_path))
    db.update("alice", lambda mark: 5)
    db.update("bob", lambda mark: 7)
    db.update("alice", lambda mark: (mark or 0) + 1)
    assert (tmp_path / "bulldb").read_text() == "alice 6\nbob 7\n"
    assert os.stat(tmp_path / "bulldb").st_mode & 0o007 == 0
