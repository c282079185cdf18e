"""XMANGLE and -no-mime on a real server: sizes in STAT and LIST are what
RETR then sends, TOP cuts the mangled message, bad modifiers get -ERR."""

from __future__ import annotations

import poplib
from collections.abc import Callable
from pathlib import Path

import pytest

import rawpop
from conftest import PASSWORD
from qpopper import Controller
from qpopper.extensions.xmangle.condense import NO_MIME, mangle, parse_xmangle
from qpopper.protocol import ComputeSizes, SendMessage, wire_size
from test_protocol import logged_in, run

Fill = Callable[[str, list[bytes]], Path]

ALTERNATIVE = (
    b"From: a@example.org\nTo: b@example.org\nCc: c@example.org\nSubject: alt\nMIME-Version: 1.0\n"
    b'Content-Type: multipart/alternative; boundary="XX"\n\n'
    b"--XX\nContent-Type: text/plain; charset=utf-8\n\nplain text body\n"
    b"--XX\nContent-Type: text/html; charset=utf-8\n\n<html><body><p>html <b>body</b></p></body></html>\n--XX--\n"
)
WITH_ATTACHMENT = (
    b"From: a@example.org\nSubject: report\nMIME-Version: 1.0\n"
    b'Content-Type: multipart/mixed; boundary="YY"\n\n'
    b"--YY\nContent-Type: text/plain\n\nsee attached\n.\n"
    b'--YY\nContent-Type: application/pdf; name="r.pdf"\nContent-Transfer-Encoding: base64\n'
    b'Content-Disposition: attachment; filename="r.pdf"\n\n' + b"QUJD" * 2000 + b"\n--YY--\n"
)


def client(server: Controller, user: str = "alice") -> poplib.POP3:
    c = poplib.POP3(server.host, server.port, timeout=10)
    c.user(user)
    c.pass_(PASSWORD)
    return c


def retr(c: poplib.POP3, command: str) -> tuple[int, bytes]:
    resp, lines, _ = rawpop.longcmd(c, command)
    body = b"\r\n".join(lines) + b"\r\n"
    return int(resp.split()[1]), body


def test_core_asks_for_sizes_once_and_reruns_the_command() -> None:
    s = logged_in()
    _, effects = run(s, b"LIST 2 XMANGLE(text=html; headers=to:,cc:)\r\nNOOP\r\n")
    spec = parse_xmangle("text=html;headers=to:,cc:")
    assert effects == [ComputeSizes(spec, (1,))]
    s.sizes_computed(spec, {1: 77})
    out, effects = run(s, b"RETR 2 XMANGLE(text=html; headers=to:,cc:)\r\n")
    assert out == b"+OK 2 77\r\n+OK no big woop\r\n"
    assert effects == [SendMessage(1, None, b"+OK 77 octets\r\n", spec)]


@pytest.mark.parametrize(
    "modifier", [b"XMANGLE(text=pdf)", b"XMANGLE(bogus=1)", b"XMANGLE(text=html", b"XMANGLE(" + b"a" * 300 + b")"]
)
def test_bad_modifiers(modifier: bytes) -> None:
    s = logged_in()
    out, effects = run(s, b"RETR 1 " + modifier[:200] + b"\r\n")
    assert out.startswith(b"-ERR ") and effects == []


def test_xmangle_retr_list_top_agree(pop_server: Controller, fill: Fill) -> None:
    fill("alice", [ALTERNATIVE, WITH_ATTACHMENT])
    c = client(pop_server)
    assert "X-MANGLE" in c.capa()
    command = "XMANGLE(text=html;headers=to:,cc:)"
    listed = int(rawpop.shortcmd(c, f"LIST 1 {command}").split()[2])
    size, body = retr(c, f"RETR 1 {command}")
    assert listed == size == len(body)
    assert b"Content-Type: text/html" in body and b"<b>body</b>" in body
    assert b"To: b@example.org" in body and b"Cc: c@example.org" in body
    assert b"From: a@example.org" not in body and b"Subject:" not in body
    expected = mangle(ALTERNATIVE, parse_xmangle("text=html;headers=to:,cc:"))
    assert body == expected.replace(b"\n", b"\r\n")
    _resp, lines, _ = rawpop.longcmd(c, f"TOP 1 0 {command}")
    assert lines[-1] == b"" and b"<b>body</b>" not in b"\n".join(lines)
    # Without the modifier the message is as stored.
    assert retr(c, "RETR 1")[1] == ALTERNATIVE.replace(b"\n", b"\r\n")
    c.quit()


def test_no_mime_suffix_mangles_everything_consistently(pop_server: Controller, fill: Fill) -> None:
    fill("alice", [ALTERNATIVE, WITH_ATTACHMENT])
    c = client(pop_server, "alice-no-mime")
    count, total = c.stat()
    sizes = [int(line.split()[1]) for line in c.list()[1]]
    assert count == 2 and total == sum(sizes)
    for number, size in enumerate(sizes, 1):
        resp, lines, _octets = c.retr(number)
        body = b"\r\n".join(lines) + b"\r\n"
        # poplib removes the stuffing dot; the size counts the unstuffed message.
        assert resp == b"+OK %d octets" % size and len(body) == size
    attachment_body = b"\r\n".join(c.retr(2)[1])
    assert b"see attached" in attachment_body and b"[attachment removed: r.pdf" in attachment_body
    assert b"QUJD" not in attachment_body
    assert sizes[1] == wire_size(mangle(WITH_ATTACHMENT, NO_MIME)) < wire_size(WITH_ATTACHMENT)
    c.quit()


def test_malformed_message_is_sent_unmangled(pop_server: Controller, fill: Fill) -> None:
    broken = b"Subject: broken\nMIME-Version: 1.0\nContent-Type: multipart/mixed\n\nno boundary at all\n"
    fill("alice", [broken])
    c = client(pop_server)
    size, body = retr(c, "RETR 1 XMANGLE")
    assert body == broken.replace(b"\n", b"\r\n") and size == len(body)
    c.quit()
