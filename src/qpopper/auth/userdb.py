"""The seam every user database plugs into: SQL, LDAP, and what comes next.

A database backend only answers "who is this user, and what is stored
for them" (`UserDatabase.lookup`), or, for a directory that checks
passwords itself, "does this password bind" (`BindingUserDatabase.bind`).
Everything a login needs on top of that is done once, here, by
`DatabaseAuthenticator`: the auth cache, the password check in a bounded
pool of threads off the event loop, the dummy check for unknown users (so
timing does not tell who exists), the per-user fields Dovecot's passdb
knows (`nopassword`, `nologin`, `deny`, `allow_nets`), and the Principal.

Backends are asynchronous: a lookup waits on the network, not on a
thread, so a thousand logins in flight need a thousand coroutines, not a
thousand workers. The server finds `authenticate_async` once (see
`qpopper.auth.AsyncAuthenticator`) and awaits it on the event loop; the
blocking `authenticate` is there for callers that run in a worker thread
(the APOP database in front, SCRAM secret lookups) and hands the work to
the loop the database lives on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from ..errors import AuthUnavailable, ConfigError, LoginRefused
from ..maildrop.location import DEFAULT_LOCATION, expand_location
from . import AsyncAuthenticator, Authenticator, AuthTuning, Principal, ScramSecretSource
from .credentials import Credentials, Rejected, ScramSecret, UserPass, Verified
from .secrets import matches_secret

if TYPE_CHECKING:
    from .authcache import AuthCache

log = logging.getLogger("qpopper.auth")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class UserRecord:
    """What a database holds for one user.

    `password` is stored as a passwd-file holds it, "{SCHEME}hash" (a hash
    without a scheme is read with the backend's default scheme), or None
    when the database checked the password itself (an LDAP bind). `mail`
    is a maildrop location (a template: %u, %n, %d, %h are expanded);
    None takes the server's mail-location. `extra` holds the per-user
    fields Dovecot's passdb and userdb return beyond those.
    """

    user: str
    password: str | None = field(default=None, repr=False)
    uid: int | None = None
    gid: int | None = None
    home: str | None = None
    mail: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class UserDatabase(Protocol):
    """A store of users the server can look up without blocking.

    A database whose answers cannot depend on the client's address (its
    queries do not use %r) may say so with a `uses_client = False`
    attribute, and one whose answers cannot depend on the local address
    (no %l) with `uses_local = False`: the auth cache then keeps one entry
    per user, not one per user and address.
    """

    async def lookup(self, user: str, client: str | None, local: str | None = None) -> UserRecord | None:
        """The user's record, or None when there is no such user.

        `client` is the client's address (Dovecot's %r), `local` the address
        it connected to (Dovecot's %l; a PROXY header's destination behind a
        balancer), None where there is none (a Unix socket). A database that is
        down, slow or refusing raises `AuthUnavailable`, within a bounded
        time: the user is told to try later, never that the password is wrong.
        """
        ...

    async def close(self) -> None:
        """Release connections; the database is not used after this."""
        ...

    def describe(self) -> str:
        """One line for logs and --show-config; never a secret."""
        ...


@runtime_checkable
class BindingUserDatabase(UserDatabase, Protocol):
    """A database that checks passwords itself (LDAP `auth_bind`)."""

    async def bind(self, user: str, password: str, client: str | None, local: str | None = None) -> UserRecord | None:
        """The user's record if `password` is theirs, None if it is not or
        there is no such user (the two are not told apart); AuthUnavailable
        as `lookup` raises it."""
        ...


# ---- password checks ---------------------------------------------------------

# Schemes cheap enough to check on the event loop: a trip to a thread
# costs more than they do.
_CHEAP_SCHEMES = frozenset({
    "PLAIN", "CLEARTEXT", "CLEAR", "SSHA", "SSHA256", "SSHA512", "SHA", "SHA1", "SHA256", "SHA512", "PLAIN-MD5",
})
_PLAINTEXT_SCHEMES = frozenset({"PLAIN", "CLEARTEXT", "CLEAR"})


def default_hash_workers() -> int:
    """Hashes verified at once: one per core, so a login burst keeps the
    other cores' share (and the event loop's) for the running sessions."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


# How much lower than the event loop a hash thread runs (nice levels).
HASH_NICENESS = 10


def _yield_to_the_loop() -> None:
    """Lower this hash thread's CPU priority (Linux schedules threads one
    by one), so that a login burst takes the CPU the running sessions do
    not want, not the CPU they need. Where that cannot be done the thread
    runs as it is."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASH_NICENESS)
    except (AttributeError, OSError):
        pass


class HashPool:
    """Slow password hashes, checked in a few threads of their own.

    The pool is bounded so a burst of ARGON2ID logins queues here instead
    of taking every core from the sessions already running, and its
    threads run at a lower priority than the event loop. argon2-cffi and
    bcrypt release the GIL while they work; libpass's SHA512-CRYPT and
    SHA256-CRYPT are Python loops over hashlib and hold it in turns.
    """

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or default_hash_workers()
        self.last_real: tuple[str, str] | None = None  # see verify_dummy
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None  # made at the first slow hash

    async def verify(self, scheme: str, hashed: str, password: bytes) -> bool:
        """Check `password` against "{SCHEME}hash"; ValueError for an unknown scheme."""
        from .passwdfile import verify_password

        if scheme.partition(".")[0] in _CHEAP_SCHEMES:
            return verify_password(scheme, hashed, password)
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self.workers, thread_name_prefix="qpopper-hash", initializer=_yield_to_the_loop
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, verify_password, scheme, hashed, password)

    async def verify_dummy(self, password: bytes) -> None:
        """What an unknown user costs: a check against the last stored hash
        checked for a real user (so its scheme and cost are the
        database's), or one of the default strength before there is one.
        The answer is thrown away."""
        if self.last_real is not None:
            scheme, hashed = self.last_real
        else:
            from .passwdfile import _dummy_hash

            scheme, hashed = "SHA512-CRYPT", _dummy_hash()
        try:
            await self.verify(scheme, hashed, password)
        except ValueError:
            pass

    def remember(self, scheme: str, hashed: str) -> None:
        """A real user's stored hash was just checked: the next dummy check
        costs the same."""
        if scheme.partition(".")[0] not in _CHEAP_SCHEMES:
            self.last_real = (scheme, hashed)

    def close(self, finish_queued: bool = False) -> None:
        """Stop the threads; `finish_queued` lets the checks already asked
        for finish (a pool replaced at SIGHUP still has logins waiting)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=not finish_queued)
            self._executor = None


def split_password(stored: str, default_scheme: str) -> tuple[str, str]:
    from .passwdfile import split_scheme

    return split_scheme(stored, default_scheme)


def bind_cache_hash(password: bytes) -> str:
    """What the cache keeps for a user a directory bound: a salted SHA-512
    ("{SSHA512}", as Dovecot caches auth_bind logins), never the password."""
    import base64

    salt = os.urandom(16)
    return "{SSHA512}" + base64.b64encode(hashlib.sha512(password + salt).digest() + salt).decode("ascii")


def client_reason(text: str | None) -> str:
    """A database's reason= text as one reply line: printable characters,
    runs of white space as one space, at most 200 characters (a POP3
    reply line has 512 in all)."""
    if not text:
        return ""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())[:200]


def _client_allowed(allow_nets: str, client: str | None) -> bool:
    """Dovecot's allow_nets: a comma or space separated list of networks."""
    if client is None:
        return False
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for item in allow_nets.replace(",", " ").split():
        try:
            if address in ipaddress.ip_network(item, strict=False):
                return True
        except ValueError:
            log.error("allow_nets: %r is not a network", item)
    return False


def _flag(extra: Mapping[str, str], name: str) -> bool:
    """A Dovecot boolean field: present and not "n"/"no"/"0"/"false"."""
    value = extra.get(name)
    return value is not None and value.strip().lower() not in ("n", "no", "0", "false")


# ---- the authenticator ---------------------------------------------------------


class DatabaseAuthenticator(Authenticator, AsyncAuthenticator, ScramSecretSource):
    """The one authenticator over any `UserDatabase`.

    Lookups go through the auth cache when there is one; passwords are
    checked in `HashPool`; unknown users cost a dummy check; a database
    failure is AuthUnavailable ([SYS/TEMP] to the client). Which record
    fields refuse a login: `nologin` and `deny` (always; a `reason` beside
    `nologin` is what the client is told once its password matched),
    `allow_nets` (when the client is not in one). `nopassword` lets any
    password pass, as in Dovecot.
    """

    def __init__(
        self,
        database: UserDatabase,
        mail_location: str = DEFAULT_LOCATION,
        default_scheme: str = "CRYPT",
        tuning: AuthTuning | None = None,
        timeout: float = 30.0,
        reopen: Callable[[], tuple[UserDatabase, str]] | None = None,
    ) -> None:
        """`tuning` sizes the auth cache (none by default) and the hash
        pool; `reopen` reads the backend's settings again (SIGHUP): a new
        database and its default scheme, or ConfigError."""
        self.database = database
        self.mail_location = mail_location
        self.default_scheme = default_scheme
        self.tuning = tuning or AuthTuning()
        self.cache = self._new_cache()
        self.hashes = HashPool(self.tuning.hash_workers or None)
        self.timeout = timeout  # for callers in worker threads, beyond the database's own
        self._reopen = reopen
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retired: set[asyncio.Task[None]] = set()  # old databases closing after a reload
        self.lookups = 0  # questions sent to the database
        self.failures = 0  # of which it could not answer (AuthUnavailable)
        self._next_stats = 0.0

    def describe(self) -> str:
        return self.database.describe()

    def counters(self) -> dict[str, int]:
        """What a metrics exporter reads, by metric name: the database's
        lookups and failures, and the cache's figures when there is one."""
        figures = {"auth_db_lookups": self.lookups, "auth_db_failures": self.failures}
        if self.cache is not None:
            figures.update(self.cache.counters())
        return figures

    # ---- on the event loop

    async def authenticate_async(
        self, credentials: Credentials, client: str | None, local: str | None = None
    ) -> Principal | None:
        """Check credentials; None for bad ones (alike whatever the reason),
        AuthUnavailable when the database cannot answer. `client` and
        `local` are the connection's two ends, for %r and %l."""
        self._loop = asyncio.get_running_loop()
        if isinstance(credentials, Rejected):
            return None
        if isinstance(credentials, UserPass):
            record = await self._check_password(credentials.user, credentials.password, client, local)
        else:
            record = await self._lookup(credentials.user, client, local)
            if record is not None and not isinstance(credentials, Verified):
                secret = self._plaintext(record)
                if secret is None or not matches_secret(secret, credentials):
                    record = None
        if record is None or not self._may_log_in(record, client):
            return None
        return self._principal(record)

    async def _lookup(self, user: str, client: str | None, local: str | None = None) -> UserRecord | None:
        cache = self.cache
        if cache is not None:
            found, record = self._cached(cache, user, client, local)
            if found:
                return record
        record = await self._ask(user, client, local)
        if cache is not None:
            cache.put(user, client, record, local=local)
        return record

    async def _ask(self, user: str, client: str | None, local: str | None) -> UserRecord | None:
        self.lookups += 1
        try:
            return await self.database.lookup(user, client, local)
        except AuthUnavailable:
            self.failures += 1
            raise

    async def _check_password(
        self, user: str, password: bytes, client: str | None, local: str | None
    ) -> UserRecord | None:
        cache = self.cache
        if cache is not None:
            found, record = self._cached(cache, user, client, local)
            if found:
                if record is None:  # a negative entry: a wrong password's cost and answer
                    await self.hashes.verify_dummy(password)
                    return None
                if await self._verify(record, password):
                    return record
                # The password may have changed since the entry was made: ask
                # the database again, as Dovecot does on a mismatch.
                cache.forget(user, client, local)
                return await self._fresh_check(user, password, client, local, refused=record.password)
        return await self._fresh_check(user, password, client, local)

    def _cached(
        self, cache: AuthCache[UserRecord], user: str, client: str | None, local: str | None
    ) -> tuple[bool, UserRecord | None]:
        """The cache's answer; its figures go to the log every few minutes
        while it is used."""
        now = time.monotonic()
        if now >= self._next_stats:
            if self._next_stats:
                cache.log_stats()
            self._next_stats = now + STATS_INTERVAL
        return cache.get(user, client, local)

    async def _fresh_check(
        self, user: str, password: bytes, client: str | None, local: str | None, refused: str | None = None
    ) -> UserRecord | None:
        """The database's answer, cached; `refused` is a stored password
        this one was just checked against in vain (not checked twice)."""
        database = self.database
        cache = self.cache
        if isinstance(database, BindingUserDatabase):
            self.lookups += 1
            try:
                record = await database.bind(user, password.decode("utf-8", "replace"), client, local)
            except AuthUnavailable:
                self.failures += 1
                raise
            if record is None:
                await self.hashes.verify_dummy(password)  # a bind's refusal costs what a hash check costs
                return None
            if cache is not None:
                cache.put(user, client, _with_password(record, bind_cache_hash(password)), local=local)
            return record
        record = await self._ask(user, client, local)
        if cache is not None:
            cache.put(user, client, record, local=local)
        if record is None:
            await self.hashes.verify_dummy(password)
            return None
        if refused is not None and record.password == refused and not _flag(record.extra, "nopassword"):
            return None
        return record if await self._verify(record, password) else None

    async def _verify(self, record: UserRecord, password: bytes) -> bool:
        if _flag(record.extra, "nopassword"):
            return True
        if record.password is None:
            return False
        scheme, hashed = split_password(record.password, self.default_scheme)
        self.hashes.remember(scheme, hashed)
        try:
            return await self.hashes.verify(scheme, hashed, password)
        except ValueError as exc:
            log.error("cannot verify password of %s: %s", record.user, exc)
            return False

    def _plaintext(self, record: UserRecord) -> bytes | None:
        """The clear secret for APOP and CRAM-MD5, when stored as one."""
        if record.password is None:
            return None
        scheme, hashed = split_password(record.password, self.default_scheme)
        return hashed.encode("utf-8") if scheme in _PLAINTEXT_SCHEMES else None

    def _may_log_in(self, record: UserRecord, client: str | None) -> bool:
        """Whether a user whose credentials were right may log in; raises
        LoginRefused for nologin with a reason, which the client is shown."""
        extra = record.extra
        if _flag(extra, "nologin") or _flag(extra, "deny"):
            log.info("login of %s refused by the user database (%s)", record.user,
                     "nologin" if _flag(extra, "nologin") else "deny")
            reason = client_reason(extra.get("reason"))
            if reason and _flag(extra, "nologin"):
                raise LoginRefused(reason)
            return False
        nets = extra.get("allow_nets")
        if nets and not _client_allowed(nets, client):
            log.info("login of %s from %s refused: not in allow_nets", record.user, client)
            return False
        return True

    def _principal(self, record: UserRecord) -> Principal:
        template = record.mail or self.mail_location
        return Principal(
            user=record.user,
            mail=expand_location(template, record.user, record.home),
            home=record.home,
            uid=record.uid,
            gid=record.gid,
        )

    async def scram_secret_async(self, user: str, mechanism: str) -> ScramSecret | None:
        from .passwdfile import parse_scram_secret
        from .sasl import scram_secret_from_password

        record = await self._lookup(user, None)
        if record is None or record.password is None:
            return None
        scheme, hashed = split_password(record.password, self.default_scheme)
        try:
            if scheme == mechanism:
                return parse_scram_secret(hashed)
            if scheme in _PLAINTEXT_SCHEMES:
                return scram_secret_from_password(hashed.encode("utf-8"), mechanism)
        except ValueError as exc:
            log.error("bad SCRAM secret for %s: %s", user, exc)
        return None

    async def aclose(self) -> None:
        if self.cache is not None:
            self.cache.log_stats()
        for task in list(self._retired):  # stopping: no login is in flight any more
            task.cancel()
        if self._retired:
            await asyncio.wait(self._retired, timeout=self.timeout)
        await self.database.close()
        self.hashes.close()

    def _new_cache(self) -> AuthCache[UserRecord] | None:
        from .authcache import AuthCache

        tuning = self.tuning
        if tuning.cache_size <= 0:
            return None
        # Keyed by %r and %l only where a query uses them (a database that
        # does not say is assumed to).
        by_client = bool(getattr(self.database, "uses_client", True))
        by_local = bool(getattr(self.database, "uses_local", True))
        return AuthCache[UserRecord](tuning.cache_size, tuning.cache_ttl, tuning.cache_negative_ttl,
                                     keyed_by_client=by_client, keyed_by_local=by_local)  # fmt: skip

    def reload(self, tuning: AuthTuning | None = None) -> None:
        """SIGHUP: read the backend's settings file again and serve new
        logins from a new database; the old one closes once the logins
        in flight on it are done. A broken file is logged and the running
        database kept. `tuning` (from the reloaded settings) resizes the
        cache and the hash pool. The cache starts empty either way: the
        queries, and so whether it is keyed by the addresses, may have changed."""
        if self._reopen is not None:
            try:
                database, scheme = self._reopen()
            except ConfigError as exc:
                log.error("user database settings not reloaded, keeping the running ones: %s", exc)
            else:
                old, self.database, self.default_scheme = self.database, database, scheme
                log.info("user database reloaded: %s", database.describe())
                loop = self._loop
                if loop is not None and not loop.is_closed():
                    task = loop.create_task(self._retire(old))
                    self._retired.add(task)
                    task.add_done_callback(self._retired.discard)
        if tuning is not None and tuning.hash_workers != self.tuning.hash_workers:
            old_pool, self.hashes = self.hashes, HashPool(tuning.hash_workers or None)
            self.hashes.last_real = old_pool.last_real
            old_pool.close(finish_queued=True)
            log.info("password hashes: %d checked at once", self.hashes.workers)
        if tuning is not None:
            self.tuning = tuning
        if self.cache is not None:
            self.cache.log_stats()
        self.cache = self._new_cache()

    async def _retire(self, database: UserDatabase) -> None:
        try:
            await asyncio.sleep(self.timeout)  # longer than any lookup may take
        finally:
            await database.close()

    # ---- from a worker thread

    def _on_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        loop = self._loop
        if loop is None or loop.is_closed():
            coroutine.close()
            raise AuthUnavailable(f"{self.describe()}: not started on an event loop yet")
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        try:
            return future.result(self.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise AuthUnavailable(f"{self.describe()}: no answer within {self.timeout:g} s") from None

    def authenticate(self, credentials: Credentials) -> Principal | None:
        return self._on_loop(self.authenticate_async(credentials, None))

    def scram_secret(self, user: str, mechanism: str) -> ScramSecret | None:
        return self._on_loop(self.scram_secret_async(user, mechanism))

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the database serves on (the server's), for the
        blocking entry points called from worker threads."""
        self._loop = loop


def _with_password(record: UserRecord, password: str) -> UserRecord:
    from dataclasses import replace

    return replace(record, password=password)



# ---- building one from the settings --------------------------------------------

# auth-backend -> the module that reads its args file (`database_from_args`).
BACKENDS = {"sql": "qpopper.auth.sql", "ldap": "qpopper.auth.ldap"}
STATS_INTERVAL = 300.0  # seconds between the cache's log lines while it is used


def open_user_database(backend: str, args_path: str) -> tuple[UserDatabase, str | None]:
    """Read `args_path` and build the backend's database (it connects at
    its first lookup, so this also serves --check-config): the database
    and the file's default_pass_scheme, if it sets one. ConfigError,
    naming file and line, for a bad file."""
    import importlib

    from .backendargs import read_backend_args

    try:
        module = importlib.import_module(BACKENDS[backend])
    except KeyError:
        raise ConfigError(f"no user database backend {backend!r}") from None
    except ImportError as exc:  # the backend's optional library is missing
        raise ConfigError(f"auth-backend {backend} needs {exc.name or exc}: install qpopper[{backend}]") from None
    args = read_backend_args(args_path)
    database: UserDatabase = module.database_from_args(args)
    return database, args.get("default_pass_scheme")


def database_authenticator(
    backend: str,
    args_path: str | None,
    *,
    mail_location: str = DEFAULT_LOCATION,
    default_scheme: str = "CRYPT",
    tuning: AuthTuning | None = None,
) -> DatabaseAuthenticator:
    """The authenticator the server runs for auth-backend sql or ldap."""
    if not args_path:
        raise ConfigError(f"auth-backend {backend} needs auth-backend-args (its settings file)")

    def reopen() -> tuple[UserDatabase, str]:
        database, scheme = open_user_database(backend, args_path)
        return database, scheme or default_scheme

    database, scheme = reopen()
    return DatabaseAuthenticator(database, mail_location, scheme, tuning=tuning, reopen=reopen)
