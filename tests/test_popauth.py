"""`popauth` and the APOP database, and how the server uses them."""

from __future__ import annotations

import poplib
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from qpopper import Controller, StaticAuthenticator

POPAUTH = [sys.executable, "-m", "qpopper.daemon.popauth"]
Fill = Callable[[str, list[bytes]], Path]


def popauth(db: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(POPAUTH + ["-file", str(db), *args], input=stdin, capture_output=True, text=True, timeout=30)


def test_init_add_list_change_delete(tmp_path: Path) -> None:
    db = tmp_path / "etc" / "pop.auth"
    out = popauth(db, "-init")
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert popauth(db, "-init").returncode == 1  # not twice by accident
    assert popauth(db, "-user", "alice", "s3cret").returncode == 0
    assert popauth(db, "-user", "bob", stdin="from stdin\n").returncode == 0
    listing = popauth(db, "-list")
    assert listing.stdout.split() == ["alice", "bob"] and "s3cret" not in listing.stdout
    assert popauth(db, "-list", "alice").stdout.strip() == "alice"
    assert popauth(db, "-user", "alice", "changed").returncode == 0
    assert "alice:{PLAIN}changed" in db.read_text() and "bob:{PLAIN}from stdin" in db.read_text()
    assert popauth(db, "-delete", "bob").returncode == 0
    assert popauth(db, "-list").stdout.split() == ["alice"]
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["-bogus"], 2, "unknown command -bogus"),
        (["-user"], 2, "-user takes a name"),
        (["-delete"], 2, "-delete takes one user name"),
        (["-delete", "nobody"], 1, "nobody is not in"),
        (["-list", "nobody"], 1, "nobody is not in"),
        (["-user", "../evil", "x"], 1, "invalid user name"),
        (["-user", "carol", ""], 1, "a secret must be 1 to 255 bytes"),
        (["-user", "carol", "a\x01b"], 1, "control characters"),
    ],
)
def test_errors_are_clear(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    db = tmp_path / "pop.auth"
    popauth(db, "-init")
    out = popauth(db, *args)
    assert out.returncode == code and message in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_database_is_reported(tmp_path: Path) -> None:
    out = popauth(tmp_path / "none", "-user", "alice", "x")
    assert out.returncode == 1 and "does not exist (run popauth -init first)" in out.stderr


def test_ordinary_user_may_only_change_their_own_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from qpopper.daemon import popauth as tool

    db = tmp_path / "pop.auth"
    popauth(db, "-init")
    # What a non-root caller sees (qpopper installed popauth setuid).
    monkeypatch.setattr(tool, "_caller", lambda: ("carol", False))
    assert tool.main(["-file", str(db), "-user", "alice", "x"]) == 1
    assert "you may only change your own secret" in capsys.readouterr().err
    assert tool.main(["-file", str(db), "-list"]) == 1
    assert tool.main(["-file", str(db), "-delete", "carol"]) == 1
    assert tool.main(["-file", str(db), "-init", "-force"]) == 1
    assert tool.main(["-file", str(db), "own-secret"]) == 0
    assert tool.main(["-file", str(db), "-user", "carol", "again"]) == 0
    assert "carol:{PLAIN}again" in db.read_text() and "alice" not in db.read_text()


def test_server_uses_the_database_and_the_default_policy(tmp_path: Path, mailroot: Path, fill: Fill) -> None:
    db = tmp_path / "pop.auth"
    popauth(db, "-init")
    popauth(db, "-user", "alice", "apop-secret")
    fill("alice", [b"Subject: x\n\nbody\n"])
    auth = StaticAuthenticator({"alice": "login-pw", "bob": "bob-pw"}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    with Controller(authenticator=auth, apop_file=str(db)) as server:
        c = poplib.POP3(server.host, server.port, timeout=10)
        assert c.apop("alice", "apop-secret").startswith(b"+OK")  # the database's secret
        c.quit()
        c = poplib.POP3(server.host, server.port, timeout=10)
        c.user("alice")
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):  # -p 0: APOP users never use PASS
            c.pass_("login-pw")
        c.user("bob")
        assert c.pass_("bob-pw").startswith(b"+OK")  # users without an APOP secret still may
        c.quit()
    with Controller(authenticator=auth, apop_file=str(db), clear_text_password="always") as server:
        c = poplib.POP3(server.host, server.port, timeout=10)
        c.user("alice")
        assert c.pass_("login-pw").startswith(b"+OK")  # -p 2
        c.quit()
