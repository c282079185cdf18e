"""Lenient white space as qpopper had it: runs of spaces and tabs between and
after arguments are accepted, while numbers stay strict and PASS keeps the
rest of its line exactly as sent (issue 21)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from qpopper import Controller
from qpopper.auth.credentials import UserPass
from qpopper.protocol import Authenticate
from test_protocol import logged_in, new_session, run


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        (b"STAT ", b"+OK 3 370\r\n"),
        (b"STAT\t", b"+OK 3 370\r\n"),
        (b"LIST  1", b"+OK 1 120\r\n"),
        (b"LIST 1 ", b"+OK 1 120\r\n"),
        (b"LIST\t2\t", b"+OK 2 200\r\n"),
        (b"DELE \t 3  ", b"+OK Message 3 has been deleted.\r\n"),
        (b"NOOP   ", b"+OK no big woop\r\n"),
    ],
)
def test_runs_of_blanks_are_accepted(command: bytes, reply: bytes) -> None:
    session = logged_in()
    out, _ = run(session, command + b"\r\n")
    assert out == reply


def test_top_with_two_spaces_before_the_line_count() -> None:
    session = logged_in()
    _, effects = run(session, b"TOP 1  0\r\n")
    (send,) = effects
    assert getattr(send, "index", None) == 0 and getattr(send, "body_lines", None) == 0


@pytest.mark.parametrize("command", [b"DELE 1x", b"RETR +1", b"RETR 1 2", b"RETR  1  2", b"TOP 1 \t", b"LIST 1\x0b"])
def test_numbers_stay_strict(command: bytes) -> None:
    session = logged_in()
    out, effects = run(session, command + b"\r\n")
    assert out.startswith(b"-ERR ") and effects == []
    assert run(session, b"STAT\r\n")[0] == b"+OK 3 370\r\n"


def test_user_with_two_spaces_and_pass_as_sent() -> None:
    session, _ = new_session()
    out, _ = run(session, b"USER  alice \r\n")
    assert out == b"+OK Password required for alice.\r\n"
    _, effects = run(session, b"PASS\t two words \r\n")
    (auth,) = effects
    assert isinstance(auth, Authenticate)
    # The one blank after the keyword ends it; the rest is the password, untouched.
    assert auth.credentials == UserPass("alice", b" two words ")


def test_a_name_with_a_blank_inside_is_two_arguments() -> None:
    session, _ = new_session()
    out, _ = run(session, b"USER a\tb\r\n")
    assert out.startswith(b"-ERR ")


def test_a_tab_after_pass_or_apop_is_masked_in_the_trace() -> None:
    session, _ = new_session(apop=True)
    seen: list[str] = []
    session.trace = seen.append
    run(session, b"APOP alice\t" + b"0" * 32 + b"\r\n")
    session.auth_failed()
    run(session, b"USER alice\r\nPASS\tsecret\r\n")
    assert seen == ["APOP alice <digest>", "USER alice", "PASS <password>"]


def test_blanks_over_the_wire(pop_server: Controller, fill: Callable[[str, list[bytes]], Path]) -> None:
    fill("alice", [b"Subject: one\n\nbody one\n", b"Subject: two\n\nbody two\n"])
    with socket.create_connection((pop_server.host, pop_server.port), timeout=10) as sock:
        stream = sock.makefile("rb")
        assert stream.readline().startswith(b"+OK")
        sock.sendall(b"USER  alice\r\nPASS secret\r\nSTAT \r\nLIST  1\r\nTOP 1  0\r\nDELE 1x\r\nQUIT\r\n")
        assert stream.readline().startswith(b"+OK Password required")
        assert stream.readline().startswith(b"+OK alice has 2 visible")
        assert stream.readline().startswith(b"+OK 2 ")
        assert stream.readline().startswith(b"+OK 1 ")
        assert stream.readline().startswith(b"+OK")
        assert stream.readline() == b"Subject: one\r\n"
        assert stream.readline() == b"\r\n"
        assert stream.readline() == b".\r\n"
        assert stream.readline().startswith(b"-ERR ")
        assert stream.readline().startswith(b"+OK")
