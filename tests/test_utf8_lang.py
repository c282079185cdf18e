"""RFC 6856 over the wire: UTF8 (UTF-8 user names and passwords, prepared
as RFC 8265 says, through a real passwd-file) and LANG (listing, choosing,
switching mid-session), on a real daemon; 8-bit headers come back as stored."""

from __future__ import annotations

import base64
import socket
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import QpopperProcess, write_maildir_message
from qpopper.protocol import _lang
from test_protocol import logged_in, new_session, run

NAME = "jürgen"
PASSWORD = "pässwörd geheim"  # a space inside, as passwords may have
EIGHT_BIT = "From: Jürgen <j@example.org>\nSubject: Grüße aus Köln\n\nBody ü\n".encode()


def nfd(text: str) -> bytes:
    """What a client on a decomposing system sends: the same text, other code points."""
    return unicodedata.normalize("NFD", text).encode("utf-8")


class Wire:
    """One raw connection, line by line."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.stream = self.sock.makefile("rb")
        assert self.readline().startswith(b"+OK")

    def readline(self) -> bytes:
        return self.stream.readline()

    def cmd(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.readline()

    def multi(self, line: bytes) -> tuple[bytes, list[bytes]]:
        status = self.cmd(line)
        body = []
        while (item := self.readline()) != b".\r\n":
            assert item, "connection closed inside a multi-line reply"
            body.append(item)
        return status, body

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[QpopperProcess]:
    maildir = tmp_path / "mail" / "juergen" / "Maildir"
    write_maildir_message(maildir, EIGHT_BIT)
    other = tmp_path / "mail" / "carol" / "Maildir"
    write_maildir_message(other, b"Subject: x\n\nx\n")
    passwd = tmp_path / "passwd"
    lines = [
        # The file holds the composed (NFC) forms; the mailbox is named without the name.
        f"{NAME}:{{PLAIN}}{PASSWORD}::::{maildir.parent}::userdb_mail=maildir:{maildir}",
        # A UTF-8 name whose mailbox would be built from the name: refused, never made.
        f"zoë:{{PLAIN}}pw::::::userdb_mail=maildir:{tmp_path}/mail/%u/Maildir",
        f"carol:{{PLAIN}}pw::::{other.parent}::userdb_mail=maildir:{other}",
    ]
    passwd.write_text("\n".join(lines) + "\n", encoding="utf-8")
    d = QpopperProcess(tmp_path, [f"--passwd-file={passwd}"])
    yield d
    log = d.stop()
    assert "Traceback" not in log, log


def test_capa_announces_utf8_user_and_lang(daemon: QpopperProcess) -> None:
    wire = Wire(daemon.port)
    _, caps = wire.multi(b"CAPA")
    assert b"UTF8 USER\r\n" in caps and b"LANG\r\n" in caps
    wire.close()


def test_a_utf8_name_and_password_log_in_through_the_passwd_file(daemon: QpopperProcess) -> None:
    wire = Wire(daemon.port)
    assert wire.cmd(b"UTF8") == b"+OK UTF8 enabled.\r\n"
    # After UTF8 the replies carry the name in UTF-8, in its prepared (composed) form.
    assert wire.cmd(b"USER " + nfd(NAME)) == f"+OK Password required for {NAME}.\r\n".encode()
    assert wire.cmd(b"PASS " + nfd(PASSWORD)).startswith(f"+OK {NAME} has 1 visible messages".encode())
    status, body = wire.multi(b"RETR 1")
    assert status.startswith(b"+OK")
    assert b"".join(body) == EIGHT_BIT.replace(b"\n", b"\r\n")  # 8-bit headers as stored
    assert wire.cmd(b"QUIT").startswith(b"+OK")
    wire.close()


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_a_utf8_name_and_password_log_in_through_sasl(daemon: QpopperProcess, mechanism: str) -> None:
    wire = Wire(daemon.port)
    if mechanism == "PLAIN":  # authzid equal to the user, sent in the other normal form
        token = base64.b64encode(NAME.encode() + b"\0" + nfd(NAME) + b"\0" + nfd(PASSWORD))
        reply = wire.cmd(b"AUTH PLAIN " + token)
    else:
        assert wire.cmd(b"AUTH LOGIN").startswith(b"+ ")
        assert wire.cmd(base64.b64encode(nfd(NAME))).startswith(b"+ ")
        reply = wire.cmd(base64.b64encode(nfd(PASSWORD)))
    assert reply.startswith(b"+OK"), reply
    status, body = wire.multi(b"RETR 1")
    assert status.startswith(b"+OK") and b"".join(body) == EIGHT_BIT.replace(b"\n", b"\r\n")
    assert wire.cmd(b"QUIT").startswith(b"+OK")
    wire.close()
    wire = Wire(daemon.port)  # and a wrong password still fails
    token = base64.b64encode(b"\0" + nfd(NAME) + b"\0" + "passwörd".encode())
    assert wire.cmd(b"AUTH PLAIN " + token).startswith(b"-ERR [AUTH]")
    wire.close()


def test_utf8_names_work_before_utf8_too_but_a_wrong_password_fails(daemon: QpopperProcess) -> None:
    wire = Wire(daemon.port)
    assert wire.cmd(b"USER " + NAME.encode()).startswith(b"+OK")
    assert wire.cmd(b"PASS " + "passwörd".encode()).startswith(b"-ERR [AUTH]")
    assert wire.cmd(b"USER " + NAME.encode()).startswith(b"+OK")
    assert wire.cmd(b"PASS " + PASSWORD.encode()).startswith(b"+OK")
    wire.close()


@pytest.mark.parametrize(
    "name", [b"j\xfcrgen", "ju\u200brgen".encode(), "../jürgen".encode(), "jür/gen".encode(), "jür gen".encode()]
)
def test_malformed_or_disallowed_utf8_names_are_refused(daemon: QpopperProcess, name: bytes) -> None:
    wire = Wire(daemon.port)
    assert wire.cmd(b"USER " + name).startswith(b"-ERR")
    wire.close()


def test_a_utf8_name_never_becomes_part_of_a_path(daemon: QpopperProcess, tmp_path: Path) -> None:
    wire = Wire(daemon.port)
    assert wire.cmd("USER zoë".encode()).startswith(b"+OK")
    assert wire.cmd(b"PASS pw").startswith(b"-ERR [SYS/PERM]")
    wire.close()
    assert sorted(p.name for p in (tmp_path / "mail").iterdir()) == ["carol", "juergen"]


def test_after_utf8_a_password_must_be_utf8_and_stls_is_refused(daemon: QpopperProcess) -> None:
    wire = Wire(daemon.port)
    assert wire.cmd(b"UTF8").startswith(b"+OK")
    assert wire.cmd(b"STLS").startswith(b"-ERR")
    assert wire.cmd(b"USER carol").startswith(b"+OK")
    assert wire.cmd(b"PASS p\xe4ss").startswith(b"-ERR Password is not valid UTF-8")
    wire.close()


def test_lang_lists_and_switches_mid_session(daemon: QpopperProcess) -> None:
    wire = Wire(daemon.port)
    status, body = wire.multi(b"LANG")
    assert status == b"+OK Language listing follows:\r\n"
    assert body == [b"en English\r\n", b"i-default Default language\r\n", b"de Deutsch\r\n"]
    assert wire.cmd(b"LANG i-default") == b"+OK i-default Language changed.\r\n"
    assert wire.cmd(b"USER carol").startswith(b"+OK")
    assert wire.cmd(b"PASS pw").startswith(b"+OK carol has 1 visible")
    assert wire.cmd(b"LANG fr") == b"-ERR Unknown language; LANG without argument lists them.\r\n"
    assert wire.cmd(b"LANG EN-us") == b"+OK en Language changed.\r\n"  # lookup: en-us falls back to en
    assert wire.cmd(b"LANG *") == b"+OK i-default Language changed.\r\n"
    assert wire.cmd(b"STAT").startswith(b"+OK 1 ")
    assert wire.cmd(b"QUIT").startswith(b"+OK")
    wire.close()


def test_a_language_with_a_table_translates_every_status_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # The mechanism for more languages: a table of texts, chosen by LANG.
    german = _lang.Language("de", "Deutsch", {_lang.CHANGED: "Sprache geändert.", "no big woop": "nichts zu tun"})
    monkeypatch.setitem(_lang.LANGUAGES, "de", german)
    session = logged_in()
    out, _ = run(session, b"LANG\r\n")
    assert b"de Deutsch\r\n" in out
    out, _ = run(session, b"LANG de-DE\r\nNOOP\r\nSTAT\r\n")
    assert out == "+OK de Sprache geändert.\r\n+OK nichts zu tun\r\n+OK 3 370\r\n".encode()
    session2, _ = new_session()
    assert run(session2, b"LANG de\r\nXYZZY\r\n")[0].endswith(b"-ERR Unknown command.\r\n")  # untranslated text stays
