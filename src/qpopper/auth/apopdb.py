"""The APOP database: per-user shared secrets, managed with `popauth`.

qpopper kept these in a dbm file; this server keeps a text file an
administrator can read and back up, one `user:{PLAIN}secret` line per user
(Dovecot's passwd-file syntax for the first two fields), mode 0600. Every
change is written to a temporary file in the same directory, synced and
renamed over the old one, under an exclusive lock, so a crash or two
`popauth` runs at once never leave a half-written database.

APOP, CRAM-MD5 and SCRAM are checked against this secret for users listed
here; under qpopper's default clear-text policy (`-p 0`) such users may not
log in with USER/PASS at all (RFC 1939 section 13: not both for one user).

UTF-8 (RFC 6856 section 2.2): names are kept in their prepared form
(RFC 8265 UsernameCasePreserved, as the session prepares what a client
sends), so a name typed composed or decomposed is one entry. Secrets are
stored prepared too (OpaqueString, as UTF-8), and the APOP and CRAM-MD5
digests are computed over the prepared secret, which RFC 6856 requires of
APOP; an entry written by hand or before this rule also matches a digest
over its bytes as stored, which is what a client that does not prepare
computes (both are the one secret, so nothing is weakened). An ASCII name
or secret is unchanged by all of this.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..usernames import is_valid_login_name
from . import (
    AsyncAuthenticator,
    Authenticator,
    AuthTuning,
    Principal,
    QuickAuthenticator,
    Reloadable,
    ScramSecretSource,
    UserLookup,
)
from .credentials import ApopDigest, CramMD5, Credentials, ScramSecret, UserPass, Verified
from .filestamp import RECHECK_INTERVAL, StatCache
from .i18n import prepare_password, prepare_username
from .sasl import scram_secret_from_password
from .secrets import matches_secret

if TYPE_CHECKING:
    import asyncio

DEFAULT_APOP_FILE = "/etc/qpopper/pop.auth"
SECRET_MAX = 255


def validate_secret(secret: str) -> None:
    if not secret or len(secret.encode("utf-8")) > SECRET_MAX:
        raise ConfigError(f"a secret must be 1 to {SECRET_MAX} bytes")
    if any(ord(c) < 0x20 or c == "\x7f" for c in secret):
        raise ConfigError("a secret may not contain control characters")


def prepared_name(user: str) -> str:
    """`user` as the database keeps it (and the session looks it up)."""
    prepared = prepare_username(user)
    if prepared is None or not is_valid_login_name(prepared):
        raise ConfigError(f"invalid user name {user!r}")
    return prepared


def prepared_secret(secret: str) -> str:
    """`secret` as stored: prepared (RFC 8265 OpaqueString) when not ASCII."""
    validate_secret(secret)
    prepared = prepare_password(secret.encode("utf-8"))
    if prepared is None:
        raise ConfigError("a secret may not contain characters RFC 8265 disallows in passwords")
    return prepared.decode("utf-8")


def secret_forms(stored: str) -> tuple[bytes, ...]:
    """The bytes a digest may be computed over: the prepared secret, and
    the stored bytes where an unprepared entry differs from it."""
    raw = stored.encode("utf-8")
    prepared = prepare_password(raw)
    if prepared is None or prepared == raw:
        return (raw,)
    return (prepared, raw)


def _matches(stored: str, credentials: ApopDigest | CramMD5) -> bool:
    return any(matches_secret(form, credentials) for form in secret_forms(stored))


class ApopDatabase:
    def __init__(self, path: str = DEFAULT_APOP_FILE, recheck_interval: float = RECHECK_INTERVAL) -> None:
        """`recheck_interval`: seconds between two stats of the file on the
        server's path (`secret`, `secret_if_current`); `load`, which popauth
        changes the file from, always asks the file system."""
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._secrets: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stat = StatCache(path, recheck_interval)

    # ---- reading ------------------------------------------------------------

    def _parse(self, text: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            user, sep, secret = line.partition(":")
            name = prepare_username(user) if sep else None
            if name is None or not is_valid_login_name(name) or not secret.startswith("{PLAIN}"):
                raise ConfigError(f"{self.path}:{lineno}: expected user:{{PLAIN}}secret")
            out[name] = secret[len("{PLAIN}") :]
        return out

    def _current(self, fresh: bool) -> dict[str, str]:
        """The secrets, re-read if the file changed; under the lock. `fresh`:
        ask the file system now, not the cached stat."""
        try:
            st = os.stat(self.path) if fresh else self._stat.stat()
        except FileNotFoundError:
            self._stamp, self._secrets = None, {}
            return self._secrets
        except OSError as exc:
            raise ConfigError(f"cannot read APOP database {self.path}: {exc.strerror}") from None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                with open(self.path, encoding="utf-8") as f:
                    self._secrets = self._parse(f.read())
            except OSError as exc:
                raise ConfigError(f"cannot read APOP database {self.path}: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise ConfigError(f"{self.path}: not UTF-8 text") from None
            self._stamp = stamp
        return self._secrets

    def load(self) -> dict[str, str]:
        """All secrets; re-read when the file changed. Missing file: none."""
        with self._lock:
            return dict(self._current(fresh=True))

    def secret(self, user: str) -> str | None:
        with self._lock:
            return self._current(fresh=False).get(user)

    def secret_if_current(self, user: str) -> tuple[bool, str | None]:
        """(True, secret or None) if the copy in memory is current; (False,
        None) when finding out would mean reading the file or waiting."""
        if not self._lock.acquire(blocking=False):
            return False, None
        try:
            st = self._stat.stat_or_errno()
            if isinstance(st, int):  # no file is no secrets: current if the copy is of no file too
                return (self._stamp is None and st == errno.ENOENT), None
            if (st.st_mtime_ns, st.st_size) != self._stamp:
                return False, None
            return True, self._secrets.get(user)
        finally:
            self._lock.release()

    # ---- writing (popauth) ----------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        directory = os.path.dirname(os.path.abspath(self.path))
        fd = os.open(
            os.path.join(directory, "." + os.path.basename(self.path) + ".lock"), os.O_RDWR | os.O_CREAT, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, secrets: dict[str, str]) -> None:
        import tempfile  # only popauth writes: the server need not load it (and shutil, bz2, lzma)

        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(self.path) + ".", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("# APOP secrets, managed with popauth(8)\n")
                for user in sorted(secrets):
                    f.write(f"{user}:{{PLAIN}}{secrets[user]}\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                st = os.stat(self.path)
                os.chown(tmp, st.st_uid, st.st_gid)
            except (FileNotFoundError, PermissionError):
                pass
            os.chmod(tmp, 0o600)
            os.rename(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def initialise(self, force: bool = False) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
        with self._locked():
            if os.path.exists(self.path) and not force:
                raise ConfigError(f"{self.path} exists already (use -force to empty it)")
            self._write({})

    def set_secret(self, user: str, secret: str) -> None:
        user, secret = prepared_name(user), prepared_secret(secret)
        with self._locked():
            if not os.path.exists(self.path):
                raise ConfigError(f"{self.path} does not exist (run popauth -init first)")
            secrets = self.load()
            secrets[user] = secret
            self._write(secrets)

    def delete(self, user: str) -> None:
        user = prepared_name(user)
        with self._locked():
            secrets = self.load()
            if user not in secrets:
                raise ConfigError(f"{user} is not in {self.path}")
            del secrets[user]
            self._write(secrets)


class ApopAuthenticator(Authenticator, QuickAuthenticator, ScramSecretSource, UserLookup):
    """Puts the APOP database in front of another authenticator.

    The inner authenticator still says who exists and where their mail is;
    the database supplies the shared secret for APOP-style checks. The
    abilities the inner one lacks answer "ask the slow road" (quick
    authentication) or "nothing known" (SCRAM secret, lookup).
    """

    def __init__(self, inner: Authenticator, database: ApopDatabase, clear_text_policy: str | None) -> None:
        self.inner = inner
        self.database = database
        self.policy = clear_text_policy
        # Asked once: a Protocol isinstance check costs microseconds, and
        # authenticate_quickly runs on the event loop at every login.
        self._inner_quick = inner.authenticate_quickly if isinstance(inner, QuickAuthenticator) else None
        if isinstance(inner, AsyncAuthenticator):  # a database on the event loop: stay on it
            self._inner_async = inner
            self.authenticate_async = self._authenticate_async
            self.attach = inner.attach
            self.aclose = inner.aclose
        if isinstance(inner, Reloadable):
            self.reload = inner.reload

    # Set by __init__ only over an AsyncAuthenticator, so that the server
    # finds the ability exactly when the inner database has it.
    authenticate_async: Callable[[Credentials, str | None, str | None], Awaitable[Principal | None]]
    attach: Callable[[asyncio.AbstractEventLoop], None]
    aclose: Callable[[], Awaitable[None]]
    reload: Callable[[AuthTuning | None], None]

    async def _authenticate_async(
        self, credentials: Credentials, client: str | None, local: str | None = None
    ) -> Principal | None:
        """`authenticate`, awaiting the inner database on the loop."""
        inner = self._inner_async.authenticate_async
        secret = self.database.secret(credentials.user)
        if secret is None:
            return await inner(credentials, client, local)
        if isinstance(credentials, UserPass):
            return await inner(credentials, client, local) if self.policy not in (None, "default") else None
        if isinstance(credentials, (ApopDigest, CramMD5)):
            if not matches_secret(secret.encode("utf-8"), credentials):
                return None
            return await inner(Verified(credentials.user, "APOP database"), client, local)
        return await inner(credentials, client, local)

    def authenticate(self, credentials: Credentials) -> Principal | None:
        secret = self.database.secret(credentials.user)
        if secret is None:
            return self.inner.authenticate(credentials)
        if isinstance(credentials, UserPass):
            if self.policy in (None, "default"):
                return None  # qpopper -p 0: APOP users never send clear passwords
            return self.inner.authenticate(credentials)
        if isinstance(credentials, (ApopDigest, CramMD5)):
            if not _matches(secret, credentials):
                return None
            return self.inner.authenticate(Verified(credentials.user, "APOP database"))
        return self.inner.authenticate(credentials)

    def authenticate_quickly(self, credentials: Credentials) -> Principal | None:
        quick = self._inner_quick
        if quick is None:
            return None
        current, secret = self.database.secret_if_current(credentials.user)
        if not current:
            return None
        if secret is None:
            return quick(credentials)  # not an APOP user: the inner database decides
        if isinstance(credentials, UserPass):
            return quick(credentials) if self.policy not in (None, "default") else None
        if isinstance(credentials, (ApopDigest, CramMD5)):
            if not _matches(secret, credentials):
                return None
            return quick(Verified(credentials.user, "APOP database"))
        return quick(credentials)

    def scram_secret(self, user: str, mechanism: str) -> ScramSecret | None:
        secret = self.database.secret(user)
        if secret is not None:
            return scram_secret_from_password(secret.encode("utf-8"), mechanism)
        return self.inner.scram_secret(user, mechanism) if isinstance(self.inner, ScramSecretSource) else None

    def lookup(self, user: str) -> object | None:
        """The inner database's entry (the APOP database reloads itself when
        it changed), so that a SIGHUP reaches the passwd-file behind it."""
        return self.inner.lookup(user) if isinstance(self.inner, UserLookup) else None
