"""Authentication: who may log in, and where their maildrop is.

An `Authenticator` turns `Credentials` into a `Principal` or None. The
server runs it off the event loop (hash checks are slow on purpose), so
implementations are plain blocking code. Backends: Unix accounts through
PAM (system.py), a Dovecot-style passwd-file (passwdfile.py), users given
in code (static.py), and the APOP database in front of either (apopdb.py).

What a backend can do beyond `authenticate` is said by the protocols
below, each checked one way, `isinstance(auth, ScramSecretSource)`, and
declared by the classes that implement them (so mypy checks them too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .credentials import ApopDigest, Credentials, ScramSecret, UserPass

if TYPE_CHECKING:
    import asyncio


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


@runtime_checkable
class AsyncAuthenticator(Protocol):
    """An authenticator whose database answers over the network (SQL, LDAP).

    The server awaits `authenticate_async` on the event loop instead of
    running `authenticate` in a worker thread: a login waiting for the
    database holds a coroutine, not a thread. `client` is the client's
    address and `local` the one it connected to (%r and %l), which
    queries may use. `attach` names the loop the database
    serves on (for the blocking entry points, called from worker threads);
    `aclose` releases the connections when the server stops.
    """

    async def authenticate_async(
        self, credentials: Credentials, client: str | None, local: str | None = None
    ) -> Principal | None: ...

    def attach(self, loop: asyncio.AbstractEventLoop) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class AuthTuning:
    """The sizes of the auth cache and of the hash pool (auth-cache-size,
    -ttl, -negative-ttl, auth-hash-workers): SIGHUP may change them."""

    cache_size: int = 0  # bytes; 0: no cache
    cache_ttl: float = 3600.0
    cache_negative_ttl: float = 3600.0
    hash_workers: int = 0  # 0: one per CPU


@runtime_checkable
class Reloadable(Protocol):
    """An authenticator whose backend settings SIGHUP reads again (the
    sql and ldap backends' args file, and `tuning` from the reloaded
    settings when given; a broken file is logged and the running settings
    kept), or, for PAM, whose modules it loads afresh."""

    def reload(self, tuning: AuthTuning | None = None) -> None: ...


@runtime_checkable
class ScramSecretSource(Protocol):
    """An authenticator that can hand out a user's stored SCRAM secret.

    Without one SCRAM still runs, against a made-up secret, and fails at
    the proof as a wrong password does.
    """

    def scram_secret(self, user: str, mechanism: str) -> ScramSecret | None:
        """The secret for `mechanism` ("SCRAM-SHA-256", never -PLUS), or
        None for an unknown user; AuthUnavailable if the store is broken."""
        ...


@runtime_checkable
class UserLookup(Protocol):
    """An authenticator over a user database it can look a user up in.

    `lookup` re-reads the database first when it changed on disk, so a
    SIGHUP calls it (after `filestamp.recheck_all`) to pick up an edited
    database at once (a broken edit is logged and the last good copy kept).
    """

    def lookup(self, user: str) -> object | None:
        """The user's entry, or None; AuthUnavailable if there is no copy."""
        ...


__all__ = [
    "ApopDigest",
    "AsyncAuthenticator",
    "Authenticator",
    "Credentials",
    "Principal",
    "QuickAuthenticator",
    "Reloadable",
    "ScramSecretSource",
    "UserLookup",
    "UserPass",
]
