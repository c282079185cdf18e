"""UTF-8 user names beyond USER/PASS (RFC 6856 section 2.2), over the wire on
a real daemon: SCRAM with a name sent decomposed, the APOP database written
by popauth (names and secrets kept prepared, the digest over the prepared
secret), replies that show the name in UTF-8 after UTF8 or LANG and not
before, and LANG switching to German and back mid-session."""

from __future__ import annotations

import base64
import hashlib
import socket
import subprocess
import sys
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import QpopperProcess, write_maildir_message
from qpopper.auth.apopdb import ApopDatabase, secret_forms
from qpopper.protocol import _lang
from qpopper.protocol._lang_de import TEXTS as GERMAN
from test_scram_authzid import Client as ScramClient
from test_utf8_lang import Wire

NAME = "jürgen"
PASSWORD = "pässwörd geheim"
SECRET = "äpop-geheimnis"  # the APOP database's secret, not the password
MESSAGE = b"Subject: hallo\n\nx\n"


def nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


def popauth(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qpopper.daemon.popauth", "-file", str(db), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "pop.auth"
    assert popauth(path, "-init").returncode == 0
    # The name and the secret given decomposed, as a decomposing keyboard or file system gives them.
    out = popauth(path, "-user", nfd(NAME), nfd(SECRET))
    assert out.returncode == 0, out.stderr
    return path


@pytest.fixture
def daemon(tmp_path: Path, db: Path) -> Iterator[QpopperProcess]:
    maildir = tmp_path / "mail" / "juergen" / "Maildir"
    write_maildir_message(maildir, MESSAGE)
    passwd = tmp_path / "passwd"
    passwd.write_text(
        f"{NAME}:{{PLAIN}}{PASSWORD}::::{maildir.parent}::userdb_mail=maildir:{maildir}\n", encoding="utf-8"
    )
    d = QpopperProcess(tmp_path, [f"--passwd-file={passwd}", f"--apop-file={db}", "--clear-text-password=always"])
    yield d
    log = d.stop()
    assert "Traceback" not in log, log


def test_popauth_keeps_names_and_secrets_prepared(db: Path) -> None:
    assert ApopDatabase(str(db)).load() == {NAME: SECRET}  # composed, whatever was typed
    assert popauth(db, "-list", nfd(NAME)).stdout == f"{NAME}\n"  # found in either form
    assert popauth(db, "-list", NAME).stdout == f"{NAME}\n"
    assert popauth(db, "-user", "jü/rgen", "x").returncode == 1  # never a name that could reach a path
    assert popauth(db, "-user", "bob", "geheim\u200b").returncode == 1  # RFC 8265 disallows it in passwords
    assert popauth(db, "-delete", nfd(NAME)).returncode == 0
    assert ApopDatabase(str(db)).load() == {}


class ApopWire(Wire):
    """A connection that keeps the greeting's APOP stamp."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.stream = self.sock.makefile("rb")
        greeting = self.readline()
        assert greeting.startswith(b"+OK") and b"<" in greeting
        self.stamp = greeting[greeting.index(b"<") : greeting.index(b">") + 1]

    def apop(self, name: str, secret: bytes) -> bytes:
        digest = hashlib.md5(self.stamp + secret).hexdigest()
        return self.cmd(b"APOP " + name.encode() + b" " + digest.encode())


def test_apop_with_a_utf8_name_digests_the_prepared_secret(daemon: QpopperProcess) -> None:
    wire = ApopWire(daemon.port)
    assert wire.apop(nfd(NAME), SECRET.encode()).startswith(b"+OK")  # the name in the other form: one user
    wire.close()
    wire = ApopWire(daemon.port)
    # Stored prepared, so a digest over the decomposed bytes is a wrong secret.
    assert wire.apop(NAME, nfd(SECRET).encode()).startswith(b"-ERR [AUTH]")
    wire.close()


def test_an_unprepared_entry_written_by_hand_takes_both_forms(tmp_path: Path, db: Path) -> None:
    db.write_text(f"{nfd(NAME)}:{{PLAIN}}{nfd(SECRET)}\n", encoding="utf-8")
    assert secret_forms(nfd(SECRET)) == (SECRET.encode(), nfd(SECRET).encode())
    maildir = tmp_path / "mail" / "juergen" / "Maildir"
    write_maildir_message(maildir, MESSAGE)
    passwd = tmp_path / "passwd"
    passwd.write_text(f"{NAME}:{{PLAIN}}x::::::userdb_mail=maildir:{maildir}\n", encoding="utf-8")
    d = QpopperProcess(tmp_path, [f"--passwd-file={passwd}", f"--apop-file={db}"])
    try:
        for secret in (SECRET, nfd(SECRET)):
            wire = ApopWire(d.port)
            assert wire.apop(NAME, secret.encode()).startswith(b"+OK"), secret
            assert wire.cmd(b"QUIT").startswith(b"+OK")
            wire.close()
    finally:
        d.stop()


@pytest.mark.parametrize("secret_from", ["passwd-file", "APOP database"])
def test_scram_with_a_decomposed_utf8_name(tmp_path: Path, db: Path, secret_from: str) -> None:
    """The saslname is prepared as USER's name is, and the secret looked up
    by that form; the client's password is SASLprep'ed (RFC 5802 Normalize),
    as the stored secret was made."""
    maildir = tmp_path / "mail" / "juergen" / "Maildir"
    write_maildir_message(maildir, MESSAGE)
    passwd = tmp_path / "passwd"
    passwd.write_text(f"{NAME}:{{PLAIN}}{PASSWORD}::::::userdb_mail=maildir:{maildir}\n", encoding="utf-8")
    args = [f"--passwd-file={passwd}"] + ([f"--apop-file={db}"] if secret_from == "APOP database" else [])
    password = SECRET if secret_from == "APOP database" else PASSWORD
    d = QpopperProcess(tmp_path, args)
    try:
        client = ScramClient("SCRAM-SHA-256", password.encode(), "n,,")
        client.bare = f"n={nfd(NAME)},r=fyko+d2lbbFgONRv9qkxdawL"
        wire = Wire(d.port)
        reply = wire.cmd(b"AUTH SCRAM-SHA-256 " + base64.b64encode(client.first()))
        assert reply.startswith(b"+ "), reply
        reply = wire.cmd(base64.b64encode(client.final(base64.b64decode(reply[2:]).decode())))
        assert base64.b64decode(reply[2:]) == b"v=" + base64.b64encode(client.server_signature), reply
        assert wire.cmd(b"").startswith(b"+OK")
        assert wire.cmd(b"STAT").startswith(b"+OK 1 ")
        wire.close()
        client = ScramClient("SCRAM-SHA-256", b"not it", "n,,")
        client.bare = f"n={NAME},r=fyko+d2lbbFgONRv9qkxdawL"
        wire = Wire(d.port)
        reply = wire.cmd(b"AUTH SCRAM-SHA-256 " + base64.b64encode(client.first()))
        assert wire.cmd(base64.b64encode(client.final(base64.b64decode(reply[2:]).decode()))).startswith(b"-ERR")
        wire.close()
    finally:
        log = d.stop()
    assert "Traceback" not in log


def test_replies_show_the_name_in_utf8_only_after_utf8_or_lang(daemon: QpopperProcess) -> None:
    wire = Wire(daemon.port)  # before UTF8 or LANG: ASCII status lines
    assert wire.cmd(b"USER " + NAME.encode()) == b"+OK Password required for j?rgen.\r\n"
    wire.close()
    wire = Wire(daemon.port)
    assert wire.cmd(b"LANG en").startswith(b"+OK en ")
    assert wire.cmd(b"USER " + nfd(NAME).encode()) == f"+OK Password required for {NAME}.\r\n".encode()
    assert wire.cmd(b"PASS " + PASSWORD.encode()).startswith(f"+OK {NAME} has 1 visible".encode())
    assert wire.cmd(b"RSET").startswith(f"+OK {NAME} has 1 visible".encode())
    wire.close()


def test_lang_de_translates_mid_session_and_back(daemon: QpopperProcess) -> None:
    wire = Wire(daemon.port)
    _, body = wire.multi(b"LANG")
    assert b"de Deutsch\r\n" in body
    assert wire.cmd(b"LANG de-AT") == "+OK de Sprache geändert.\r\n".encode()  # lookup: de-AT falls back to de
    assert wire.cmd(b"USER " + NAME.encode()) == f"+OK Passwort für {NAME} erforderlich.\r\n".encode()
    assert wire.cmd(b"PASS " + PASSWORD.encode()) == (
        f"+OK {NAME} hat sichtbare Nachrichten: 1 (0 verborgen), ".encode() + wire_size_text(MESSAGE) + b" Oktette.\r\n"
    )
    assert wire.cmd(b"DELE 1") == b"+OK Nachricht 1 wurde gel\xc3\xb6scht.\r\n"
    assert wire.cmd(b"RETR 1") == b"-ERR Nachricht 1 ist zum L\xc3\xb6schen vorgemerkt.\r\n"
    assert wire.cmd(b"RETR 7") == b"-ERR Nachricht 7 existiert nicht.\r\n"
    assert wire.cmd(b"XYZZY") == b"-ERR Unbekannter Befehl.\r\n"
    assert wire.cmd(b"LANG en") == b"+OK en Language changed.\r\n"
    assert wire.cmd(b"RSET").startswith(f"+OK {NAME} has 1 visible".encode())
    assert wire.cmd(b"LANG de") == "+OK de Sprache geändert.\r\n".encode()
    quit_reply = wire.cmd(b"QUIT")  # the deletion was undone by RSET: one message stays
    assert quit_reply.startswith(b"+OK POP-Server ")
    assert quit_reply.endswith(" verabschiedet sich (Nachrichten übrig: 1).\r\n".encode())
    wire.close()


def wire_size_text(message: bytes) -> bytes:
    return str(len(message.replace(b"\n", b"\r\n"))).encode()


def test_the_german_table_names_every_part_it_is_given() -> None:
    """Each "{}" of an English text is used once in the German, and the
    table translates what the session really sends (a number, a name)."""
    for english, german in GERMAN.items():
        parts = english.count("{}")
        assert sorted(german.count(f"{{{i}}}") for i in range(parts)) == [1] * parts, english
        assert "{}" not in german
    lang = _lang.choose("de")
    assert lang is not None
    assert _lang.translate(lang, b"-ERR Message 12 has already been deleted.\r\n") == (
        "-ERR Nachricht 12 wurde bereits gelöscht.\r\n".encode()
    )
    assert _lang.translate(lang, b"-ERR [SYS/TEMP] Internal server error.\r\n") == (
        b"-ERR [SYS/TEMP] Interner Serverfehler.\r\n"
    )
    assert _lang.translate(lang, b"+OK 2 320\r\n") == b"+OK 2 320\r\n"  # no text: as sent
