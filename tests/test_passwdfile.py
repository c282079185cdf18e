"""Virtual users from a Dovecot-format passwd-file."""

from __future__ import annotations

import base64
import hashlib
import os
import poplib
import threading
from pathlib import Path

import pytest
from passlib.hash import argon2, bcrypt, md5_crypt, sha256_crypt, sha512_crypt

import rawpop
from qpopper import Controller, PasswdFileAuthenticator, Principal
from qpopper.auth.credentials import ApopDigest, Credentials, UserPass
from qpopper.errors import ConfigError
from qpopper.protocol import apop_digest

PW = "correct horse"


def ssha(algorithm: str, password: bytes, salt: bytes) -> str:
    return base64.b64encode(hashlib.new(algorithm, password + salt).digest() + salt).decode()


SCHEMES = {
    "PLAIN": PW,
    "CLEARTEXT": PW,
    "SHA512-CRYPT": sha512_crypt.using(rounds=5000).hash(PW),
    "SHA256-CRYPT": sha256_crypt.using(rounds=5000).hash(PW),
    "MD5-CRYPT": md5_crypt.hash(PW),
    "BLF-CRYPT": bcrypt.using(rounds=4).hash(PW),
    "ARGON2ID": argon2.using(type="ID", rounds=1, memory_cost=1024).hash(PW),
    "SSHA": ssha("sha1", PW.encode(), b"salt1234"),
    "SSHA256": ssha("sha256", PW.encode(), b"s"),
    "SSHA512": ssha("sha512", PW.encode(), b"longer salt value"),
    "SHA256": base64.b64encode(hashlib.sha256(PW.encode()).digest()).decode(),
    "PLAIN-MD5": hashlib.md5(PW.encode()).hexdigest(),
}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_each_scheme_verifies(tmp_path: Path, scheme: str) -> None:
    path = write(tmp_path / "passwd", f"u1:{{{scheme}}}{SCHEMES[scheme]}:1000:1000::/home/u1::\n")
    auth = PasswdFileAuthenticator(str(path))
    principal = auth.authenticate(UserPass("u1", PW.encode()))
    assert principal == Principal("u1", "maildir:/home/u1/Maildir", "/home/u1", 1000, 1000)
    assert auth.authenticate(UserPass("u1", b"wrong")) is None


def test_crypt_without_scheme_is_recognised_by_prefix(tmp_path: Path) -> None:
    path = write(tmp_path / "passwd", f"u1:{sha512_crypt.using(rounds=5000).hash(PW)}::::/h::\n")
    assert PasswdFileAuthenticator(str(path)).authenticate(UserPass("u1", PW.encode())) is not None


def test_unknown_user_is_none(tmp_path: Path) -> None:
    path = write(tmp_path / "passwd", "# comment\n\nu1:{PLAIN}x::::/h::\n")
    assert PasswdFileAuthenticator(str(path)).authenticate(UserPass("nobody", b"x")) is None


def test_apop_only_for_plaintext_secrets(tmp_path: Path) -> None:
    stamp = "<1.2@host>"
    path = write(
        tmp_path / "passwd",
        f"plain:{{PLAIN}}tanstaaf::::/h::\nhashed:{SCHEMES['SHA512-CRYPT']}::::/h::\n",
    )
    auth = PasswdFileAuthenticator(str(path))
    assert auth.authenticate(ApopDigest("plain", stamp, apop_digest(stamp, b"tanstaaf"))) is not None
    assert auth.authenticate(ApopDigest("plain", stamp, apop_digest(stamp, b"wrong"))) is None
    assert auth.authenticate(ApopDigest("hashed", stamp, apop_digest(stamp, PW.encode()))) is None


def test_mail_location_template_and_override(tmp_path: Path) -> None:
    path = write(
        tmp_path / "passwd",
        "a@example.org:{PLAIN}x::::::\nb:{PLAIN}x::::/home/b::userdb_mail=maildir:/srv/other/%u\n",
    )
    auth = PasswdFileAuthenticator(str(path), mail_location="maildir:/srv/vmail/%d/%n/Maildir")
    a = auth.authenticate(UserPass("a@example.org", b"x"))
    b = auth.authenticate(UserPass("b", b"x"))
    assert a is not None and a.mail == "maildir:/srv/vmail/example.org/a/Maildir"
    assert b is not None and b.mail == "maildir:/srv/other/b"


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("../x:{PLAIN}x::::/h::", ":1: invalid user name"),
        ("u:{ROT13}x::::/h::", ":1: unsupported password scheme {ROT13}"),
        ("u:{PLAIN}x:abc:::/h::", ":1: uid must be a number"),
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, line: str, error: str) -> None:
    path = write(tmp_path / "passwd", line + "\n")
    with pytest.raises(ConfigError, match=error.replace("{", r"\{").replace("}", r"\}")):
        PasswdFileAuthenticator(str(path))


def test_file_is_reloaded_when_it_changes(tmp_path: Path) -> None:
    path = write(tmp_path / "passwd", "u1:{PLAIN}old::::/h::\n")
    auth = PasswdFileAuthenticator(str(path), recheck_interval=0)
    assert auth.authenticate(UserPass("u1", b"old")) is not None
    write(path, "u1:{PLAIN}newer::::/h::\n")
    os.utime(path, ns=(1, 2_000_000_000_000_000_000))
    assert auth.authenticate(UserPass("u1", b"old")) is None
    assert auth.authenticate(UserPass("u1", b"newer")) is not None
    # A broken edit keeps the last good copy serving.
    write(path, "u1:{NOSUCH}x::::/h::\n")
    os.utime(path, ns=(1, 3_000_000_000_000_000_000))
    assert auth.authenticate(UserPass("u1", b"newer")) is not None


def test_a_slow_login_never_stalls_other_sessions(tmp_path: Path) -> None:
    """While one password check blocks, another client logs in and out."""
    release = threading.Event()
    entered = threading.Event()

    class GatedAuthenticator:
        def authenticate(self, credentials: Credentials) -> Principal | None:
            if credentials.user == "slow":
                entered.set()
                release.wait(30)
            return Principal(credentials.user, f"maildir:{tmp_path}/{credentials.user}")

    with Controller(authenticator=GatedAuthenticator()) as server:
        slow = poplib.POP3(server.host, server.port, timeout=30)
        slow.user("slow")
        slow.sock.sendall(b"PASS x\r\n")
        assert entered.wait(10)
        fast = poplib.POP3(server.host, server.port, timeout=10)
        fast.user("fast")
        fast.pass_("x")
        assert fast.stat() == (0, 0)
        fast.quit()
        assert not release.is_set()  # the slow check was still running
        release.set()
        assert rawpop.getresp(slow).startswith(b"+OK")
        slow.quit()


def test_sighup_tuning_sets_how_many_hashes_run_at_once(tmp_path: Path) -> None:
    from qpopper.auth import AuthTuning, Reloadable

    path = tmp_path / "passwd"
    path.write_text("alice:{PLAIN}secret::::::\n")
    auth = PasswdFileAuthenticator(str(path), hash_workers=2)
    assert isinstance(auth, Reloadable) and auth.hash_workers == 2
    auth.reload(None)  # a reload without settings keeps them
    assert auth.hash_workers == 2
    auth.reload(AuthTuning(hash_workers=5))
    assert auth.hash_workers == 5
    held = [auth._hashing.acquire(blocking=False) for _ in range(6)]  # noqa: SLF001 - the bound itself
    assert held == [True] * 5 + [False]  # the new semaphore admits exactly five
