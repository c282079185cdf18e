"""A NUL inside a password, which only AUTH LOGIN can carry (PASS refuses
control bytes, PLAIN splits on NUL): it must get a plain -ERR [AUTH] for a
known and an unknown user alike, keep the session, and leave no traceback.
crypt(3) and PAM hash C strings, so "secret\\0junk" must never pass as
"secret"."""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator

import pytest

from helpers import QpopperProcess, write_maildir_message
from qpopper.auth.passwdfile import verify_password


def auth_login(port: int, user: bytes, password: bytes) -> tuple[bytes, bytes]:
    """AUTH LOGIN on a fresh connection: the reply to the password, and to a QUIT after it."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        wire = sock.makefile("rwb")
        wire.readline()
        for line in (b"AUTH LOGIN", base64.b64encode(user), base64.b64encode(password)):
            wire.write(line + b"\r\n")
            wire.flush()
            reply = wire.readline()
        wire.write(b"QUIT\r\n")
        wire.flush()
        return reply, wire.readline()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QpopperProcess]:
    from passlib.hash import sha512_crypt

    tmp = tmp_path_factory.mktemp("nul")
    lines = []
    for user, stored in (("hashed", "{SHA512-CRYPT}" + sha512_crypt.using(rounds=5000).hash("secret")),
                         ("plain", "{PLAIN}secret")):  # fmt: skip
        maildir = tmp / user / "Maildir"
        write_maildir_message(maildir, b"Subject: x\n\nbody\n")
        lines.append(f"{user}:{stored}::::{tmp / user}::userdb_mail=maildir:{maildir}\n")
    passwd = tmp / "passwd"
    passwd.write_text("".join(lines))
    server = QpopperProcess(tmp, [f"--passwd-file={passwd}", ])
    yield server
    log = server.stop()
    assert "Traceback" not in log and "internal error" not in log and "cannot verify" not in log, log


@pytest.mark.parametrize("user", [b"hashed", b"plain", b"nosuchuser"])
def test_nul_in_password_is_a_plain_auth_failure(daemon: QpopperProcess, user: bytes) -> None:
    reply, bye = auth_login(daemon.port, user, b"secret\0junk")
    assert reply.startswith(b"-ERR [AUTH]"), reply
    assert bye.startswith(b"+OK"), bye


def test_the_same_daemon_still_takes_the_right_password(daemon: QpopperProcess) -> None:
    for user in (b"hashed", b"plain"):
        reply, _ = auth_login(daemon.port, user, b"secret")
        assert reply.startswith(b"+OK"), reply


@pytest.mark.parametrize("scheme", ["SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT", "MD5-CRYPT", "CRYPT"])
def test_crypt_schemes_refuse_a_nul_without_raising(scheme: str) -> None:
    import passlib.hash

    handler = {"SHA512-CRYPT": passlib.hash.sha512_crypt, "SHA256-CRYPT": passlib.hash.sha256_crypt,
               "BLF-CRYPT": passlib.hash.bcrypt, "MD5-CRYPT": passlib.hash.md5_crypt,
               "CRYPT": passlib.hash.sha512_crypt}[scheme]  # fmt: skip
    hashed = handler.hash("secret")
    assert verify_password(scheme, hashed, b"secret")
    assert not verify_password(scheme, hashed, b"secret\0")
    assert not verify_password(scheme, hashed, b"secret\0junk")
