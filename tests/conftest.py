"""Shared fixtures: Maildirs on disk and a running server with real clients."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import write_maildir_message
from qpopper import Controller, StaticAuthenticator

PASSWORD = "secret"

@pytest.fixture
def mailroot(tmp_path: Path) -> Path:
    root = tmp_path / "mail"
    root.mkdir()
    return root


@pytest.fixture
def fill(mailroot: Path) -> Callable[[str, list[bytes]], Path]:
    def fill(user: str, messages: list[bytes]) -> Path:
        maildir = mailroot / user / "Maildir"
        for d in ("cur", "new", "tmp"):
            (maildir / d).mkdir(parents=True, exist_ok=True)
        for m in messages:
            write_maildir_message(maildir, m)
        return maildir

    return fill


@pytest.fixture
def pop_server(mailroot: Path) -> Iterator[Controller]:
    """A server with users alice and bob (password 'secret') on port 0."""
    auth = StaticAuthenticator({"alice": PASSWORD, "bob": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    with Controller(authenticator=auth) as controller:
        yield controller
