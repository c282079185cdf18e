"""Authentication: who may log in, and where their maildrop is.

An `Authenticator` turns `Credentials` into a `Principal` or None. The
server runs it off the event loop (hash checks are slow on purpose), so
implementations are plain blocking code. Backends: a Dovecot-style
passwd-file today; PAM and SQL in their own issues.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .credentials import ApopDigest, Credentials, UserPass


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated user and what the server needs to serve them.

    `mail` is a maildrop location such as "maildir:/srv/mail/bob/Maildir",
    already expanded; uid/gid are None for virtual users served by the
    service account.
    """

    user: str
    mail: str
    home: str | None = None
    uid: int | None = None
    gid: int | None = None


@runtime_checkable
class Authenticator(Protocol):
    def authenticate(self, credentials: Credentials) -> Principal | None:
        """Check credentials; None for bad ones, AuthUnavailable if broken."""
        ...


@runtime_checkable
class QuickAuthenticator(Protocol):
    """An authenticator that can often answer on the event loop itself.

    A trip to a worker thread costs more CPU than checking a plain or
    digest password, so where the answer is already in memory the server
    asks here first. `authenticate_quickly` returns a Principal only for
    credentials it verified without hashing work or waiting; None means
    "ask `authenticate`", never "no": refusals always take the slow road,
    so they look and last the same whatever the reason.
    """

    def authenticate_quickly(self, credentials: Credentials) -> Principal | None: ...


__all__ = ["ApopDigest", "Authenticator", "Credentials", "Principal", "QuickAuthenticator", "UserPass"]
