"""Users in a SQL database, as Dovecot's passdb and userdb sql have them.

The settings file (`auth-backend-args`) is Dovecot's dovecot-sql.conf.ext:

    driver = pgsql                      # or sqlite
    connect = host=/run/postgresql dbname=mail user=qpopper password=...
    password_query = SELECT username AS user, password FROM users WHERE username = '%u'
    user_query = SELECT home, uid, gid, maildir AS mail FROM users WHERE username = '%u'
    default_pass_scheme = SHA512-CRYPT

The queries' variables (%u the user, %n its local part, %d its domain,
%r the client's address, %l the local address it connected to, %s the
service, and their %{user}, %{username}, %{domain}, %{rip}, %{lip},
%{service} forms, with Dovecot's L and U modifiers)
become bound parameters: a quoted '%u' is replaced by a placeholder, a
literal that mixes text and variables by a concatenation, so no value a
client sends is ever part of the SQL text.

The password query's columns: `user` (the canonical name; or `username`
and `domain`), `password` (or `password_noscheme`), `userdb_home`,
`userdb_uid`, `userdb_gid`, `userdb_mail` (Dovecot's prefetch), and any
other field (nopassword, nologin with its reason, deny, allow_nets, ...) as an extra; a
NULL is no value. The user query, when there is one, adds home, uid, gid
and mail; a user it does not find cannot log in.

PostgreSQL goes through psycopg 3's asyncio connections in a
psycopg_pool pool (which reconnects with backoff on its own); SQLite
through the standard sqlite3 module in a few threads, read-only. Our own
settings beyond Dovecot's: query_timeout (seconds, a lookup's whole
bound: waiting for a connection, then the queries), connect_timeout and
pool_size (connections, or SQLite threads).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import pwd
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import AuthUnavailable, ConfigError
from .backendargs import BackendArgs
from .userdb import UserDatabase, UserRecord

log = logging.getLogger("qpopper.auth")

KNOWN_KEYS = (
    "driver", "connect", "password_query", "user_query", "iterate_query", "default_pass_scheme",
    "query_timeout", "connect_timeout", "pool_size",
)
DRIVERS = ("pgsql", "sqlite")

# Dovecot's variables: one letter, or a long name in braces.
_SHORT = {"u": "user", "n": "username", "d": "domain", "r": "rip", "l": "lip", "s": "service"}
_LONG = {"user": "user", "username": "username", "domain": "domain", "rip": "rip", "lip": "lip", "service": "service"}
# Known to Dovecot, never given to a query here (and why).
_NO_PASSWORD = "is the password, which is never sent to the database"
_REFUSED = {"w": _NO_PASSWORD, "password": _NO_PASSWORD}
_VARIABLE = re.compile(r"%(?:([LU]?)([A-Za-z])|\{([A-Za-z_]+)\}|%)")


@dataclass(frozen=True, slots=True)
class Variable:
    """One placeholder's value: which variable, and its case modifier."""

    name: str
    case: str = ""  # "", "L" (lower) or "U" (upper)

    def value(self, values: Mapping[str, str | None]) -> str | None:
        value = values[self.name]
        if value is None:
            return None
        return value.lower() if self.case == "L" else value.upper() if self.case == "U" else value


@dataclass(frozen=True, slots=True)
class BoundQuery:
    """A query with placeholders (`%s` for psycopg, `?` for sqlite) and the
    variables they take, in order."""

    text: str
    variables: tuple[Variable, ...]

    def params(self, values: Mapping[str, str | None]) -> tuple[str | None, ...]:
        return tuple(v.value(values) for v in self.variables)

    @property
    def uses_client(self) -> bool:
        return any(v.name == "rip" for v in self.variables)

    @property
    def uses_local(self) -> bool:
        return any(v.name == "lip" for v in self.variables)


def _variables_in(text: str, where: str) -> list[tuple[int, int, Variable | None]]:
    """(start, end, variable) of each %-sequence in `text`; None for %%."""
    found: list[tuple[int, int, Variable | None]] = []
    for match in _VARIABLE.finditer(text):
        case, short, long = match.groups()
        if match.group(0) == "%%":
            found.append((match.start(), match.end(), None))
            continue
        key = short if short is not None else long
        assert key is not None
        name = _SHORT.get(key) if short is not None else _LONG.get(key.lower())
        if name is None:
            reason = _REFUSED.get(key) or _REFUSED.get(key.lower())
            raise ConfigError(f"{where}: %{key if short else '{' + key + '}'} " + (reason or "is not a known variable"),
                              where)  # fmt: skip
        found.append((match.start(), match.end(), Variable(name, case or "")))
    stray = re.sub(_VARIABLE, "", text)
    if "%" in stray:
        raise ConfigError(f"{where}: a '%' that starts no variable (write %% for a percent sign)", where)
    return found


# The pieces of a query's text: a quoted literal, a quoted name, a
# variable, a run of anything else, or one character that starts none.
_TOKEN = re.compile(r"'(?:[^']|'')*'|\"[^\"]*\"|%(?:[LU]?[A-Za-z]|\{[A-Za-z_]+\}|%)|[^'\"%]+|.", re.S)


def bind_query(query: str, placeholder: str, where: str) -> BoundQuery:
    """Turn Dovecot's query text into one with placeholders.

    A variable outside quotes becomes a placeholder; a quoted literal that
    is exactly one variable becomes a placeholder in its place (quotes and
    all); a literal that mixes text and variables becomes a concatenation
    of literals and placeholders cast to text. `placeholder` is "%s"
    (psycopg, which then needs every other '%' doubled) or "?" (sqlite).
    """
    out: list[str] = []
    variables: list[Variable] = []

    def plain(text: str) -> str:
        return text.replace("%", "%%") if placeholder == "%s" else text

    for token in _TOKEN.findall(query):
        if token.startswith("'"):
            if len(token) == 1:
                raise ConfigError(f"{where}: a quoted string is not closed", where)
            out.append(_bind_literal(token[1:-1], placeholder, plain, variables, where))
        elif token.startswith('"'):
            if len(token) == 1:
                raise ConfigError(f"{where}: a quoted name is not closed", where)
            if "%" in token:
                raise ConfigError(f"{where}: a variable inside a quoted name", where)
            out.append(plain(token))
        elif token.startswith("%"):
            variable = _variables_in(token, where)[0][2]
            if variable is None:
                out.append(plain("%"))
            else:
                out.append(placeholder)
                variables.append(variable)
        else:
            out.append(token)
    return BoundQuery("".join(out), tuple(variables))


def _bind_literal(
    body: str, placeholder: str, plain: Callable[[str], str], variables: list[Variable], where: str
) -> str:
    found = [(start, end, v) for start, end, v in _variables_in(body, where) if v is not None]

    def text(part: str) -> str:
        return plain("'" + part.replace("%%", "%") + "'")

    if not found:
        return text(body)
    if len(found) == 1 and found[0][0] == 0 and found[0][1] == len(body):
        variables.append(found[0][2])
        return placeholder
    pieces: list[str] = []
    last = 0
    for start, end, variable in found:
        if start > last:
            pieces.append(text(body[last:start]))
        pieces.append(f"CAST({placeholder} AS TEXT)")
        variables.append(variable)
        last = end
    if last < len(body):
        pieces.append(text(body[last:]))
    return "(" + " || ".join(pieces) + ")"


def query_values(user: str, client: str | None, local: str | None = None) -> dict[str, str | None]:
    """The variables' values for one lookup; an address not known (a Unix
    socket) is NULL."""
    name, _, domain = user.partition("@")
    return {"user": user, "username": name, "domain": domain, "rip": client, "lip": local, "service": "pop3"}


# ---- rows to records --------------------------------------------------------------


def _number(value: str, what: str, user: str) -> int | None:
    if value.isdigit():
        return int(value)
    if what == "uid":
        try:
            return pwd.getpwnam(value).pw_uid
        except KeyError:
            pass
    log.error("user database: %s of %s is %r, not a number", what, user, value)
    return None


def record_from_rows(
    asked: str, password_row: Mapping[str, str], user_row: Mapping[str, str] | None, default_scheme: str
) -> UserRecord:
    """The record of one user from the password query's row and the user
    query's (None when there is no user query)."""
    fields = dict(password_row)
    user = fields.pop("user", None)
    username, domain = fields.pop("username", None), fields.pop("domain", None)
    if user is None and username is not None:
        user = f"{username}@{domain}" if domain else username
    user = user or asked
    password = fields.pop("password", None)
    noscheme = fields.pop("password_noscheme", None)
    if password is None and noscheme is not None:
        password = "{" + default_scheme + "}" + noscheme
    userdb = {k[len("userdb_"):]: fields.pop(k) for k in list(fields) if k.startswith("userdb_")}
    if user_row is not None:
        userdb.update(user_row)
        userdb.pop("user", None)
    home, mail = userdb.pop("home", None), userdb.pop("mail", None)
    uid_text, gid_text = userdb.pop("uid", None), userdb.pop("gid", None)
    fields.update(userdb)
    return UserRecord(
        user=user,
        password=password,
        uid=_number(uid_text, "uid", user) if uid_text else None,
        gid=_number(gid_text, "gid", user) if gid_text else None,
        home=home or None,
        mail=mail or None,
        extra=fields,
    )


def _row_dict(names: Sequence[str], row: Sequence[Any]) -> dict[str, str]:
    """A row as text by column name; NULL columns are left out."""
    return {name.lower(): _text(value) for name, value in zip(names, row, strict=True) if value is not None}


def _text(value: object) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, bool):
        return "y" if value else "n"
    return str(value)


# ---- the settings -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SqlSettings:
    driver: str
    connect: str = ""
    password_query: BoundQuery | None = None
    user_query: BoundQuery | None = None
    default_scheme: str = "CRYPT"
    query_timeout: float = 5.0
    connect_timeout: float = 5.0
    pool_size: int = 10
    source: str = ""


_MAXCONNS = re.compile(r"(?:^|\s)maxconns=(\d+)(?=\s|$)")


def _dovecot_connect_options(connect: str) -> tuple[str, int | None]:
    """Dovecot's own word in a connect string, `maxconns=N` (which libpq
    would refuse), taken out: it sizes the pool unless pool_size does."""
    match = _MAXCONNS.search(connect)
    if match is None:
        return connect, None
    return (connect[: match.start()] + connect[match.end() :]).strip(), int(match.group(1)) or None


def settings_from_args(args: BackendArgs) -> SqlSettings:
    args.check_keys(KNOWN_KEYS, "the sql backend")
    driver = args.required("driver")
    if driver not in DRIVERS:
        raise args.error("driver", f"driver {driver!r} is not supported here (use {' or '.join(DRIVERS)})")
    connect, maxconns = _dovecot_connect_options(args.required("connect"))
    placeholder = "%s" if driver == "pgsql" else "?"
    password_query = bind_query(args.required("password_query"), placeholder, args.where("password_query"))
    user_text = args.get("user_query")
    user_query = bind_query(user_text, placeholder, args.where("user_query")) if user_text else None
    pool_size = args.number("pool_size", maxconns or 10)
    if pool_size < 1 or pool_size != int(pool_size):
        raise args.error("pool_size", "pool_size must be a whole number, at least 1")
    query_timeout = args.number("query_timeout", 5.0)
    if query_timeout <= 0:
        raise args.error("query_timeout", "query_timeout must be more than 0 seconds")
    if driver == "pgsql":
        try:
            from psycopg.conninfo import conninfo_to_dict
        except ImportError as exc:
            raise ConfigError(f"driver pgsql needs psycopg: install qpopper[sql] ({exc})") from None
        try:
            conninfo_to_dict(connect)
        except Exception as exc:  # noqa: BLE001 - psycopg.ProgrammingError; its text names no secret
            raise args.error("connect", f"connect is not a libpq connection string: {exc}") from None
    return SqlSettings(
        driver=driver,
        connect=connect,
        password_query=password_query,
        user_query=user_query,
        default_scheme=args.get("default_pass_scheme") or "CRYPT",
        query_timeout=query_timeout,
        connect_timeout=args.number("connect_timeout", 5.0),
        pool_size=int(pool_size),
        source=args.path,
    )


def database_from_args(args: BackendArgs) -> UserDatabase:
    """The backend's entry point (see userdb.BACKENDS): nothing connects yet."""
    settings = settings_from_args(args)
    if settings.driver == "pgsql":
        return PostgresDatabase(settings)
    return SqliteDatabase(settings)


# ---- the two drivers -------------------------------------------------------------------


class _SqlDatabase:
    """What both drivers share: running the two queries for one lookup."""

    def __init__(self, settings: SqlSettings) -> None:
        self.settings = settings
        queries = [q for q in (settings.password_query, settings.user_query) if q is not None]
        self.uses_client = any(q.uses_client for q in queries)
        self.uses_local = any(q.uses_local for q in queries)

    def _record(
        self, user: str, rows: list[dict[str, str]], user_rows: list[dict[str, str]] | None
    ) -> UserRecord | None:
        if not rows:
            return None
        if len(rows) > 1:
            raise AuthUnavailable(f"{self.describe()}: password_query returned {len(rows)} rows for one user")
        if user_rows is not None:
            if not user_rows:
                log.info("%s: user_query found no row for a user the password_query found", self.describe())
                return None
            if len(user_rows) > 1:
                raise AuthUnavailable(f"{self.describe()}: user_query returned {len(user_rows)} rows for one user")
        return record_from_rows(user, rows[0], user_rows[0] if user_rows else None, self.settings.default_scheme)

    def describe(self) -> str:
        return f"sql {self.settings.driver} ({self.settings.source})"


def _safe_conninfo(connect: str) -> str:
    """The connection string without its password, for the log."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(connect)
    except Exception:  # noqa: BLE001 - checked when read; never echo it
        return "(connection string)"
    return " ".join(f"{k}={v}" for k, v in parts.items() if k != "password")


class PostgresDatabase(_SqlDatabase):
    """PostgreSQL through psycopg 3's asyncio connections, pooled.

    The pool opens at the first lookup and keeps reconnecting with
    backoff while the server is away; a lookup waits for a connection at
    most query_timeout (a full pool queues its lookups, each with that
    deadline), and the server ends a query at statement_timeout, the same
    bound.
    """

    def __init__(self, settings: SqlSettings) -> None:
        super().__init__(settings)
        self._pool: Any = None
        self._opening: asyncio.Lock | None = None

    def describe(self) -> str:
        return f"sql pgsql {_safe_conninfo(self.settings.connect)} ({self.settings.source})"

    async def _get_pool(self) -> Any:
        if self._pool is not None:
            return self._pool
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._pool is None:
                from psycopg_pool import AsyncConnectionPool

                timeout_ms = int(self.settings.query_timeout * 1000)

                async def configure(conn: Any) -> None:
                    await conn.execute(f"SET statement_timeout = {timeout_ms}")

                pool = AsyncConnectionPool(
                    self.settings.connect,
                    min_size=1,
                    max_size=self.settings.pool_size,
                    open=False,
                    configure=configure,
                    timeout=self.settings.query_timeout,
                    max_waiting=1000 * self.settings.pool_size,  # beyond that, refuse at once
                    reconnect_timeout=24 * 3600.0,  # keep trying (with backoff) while the server is down
                    kwargs={"autocommit": True, "connect_timeout": max(1, int(self.settings.connect_timeout))},
                    name="qpopper-userdb",
                )
                await pool.open(wait=False)
                self._pool = pool
        return self._pool

    async def lookup(self, user: str, client: str | None, local: str | None = None) -> UserRecord | None:
        import psycopg
        import psycopg_pool

        settings = self.settings
        values = query_values(user, client, local)
        try:
            async with asyncio.timeout(settings.query_timeout + 1):
                pool = await self._get_pool()
                for attempt in (1, 2):
                    async with pool.connection() as conn:
                        try:
                            rows = await self._query(conn, settings.password_query, values)
                            user_rows = None
                            if rows and settings.user_query is not None:
                                canonical = rows[0].get("user") or user
                                user_rows = await self._query(conn, settings.user_query,
                                                              query_values(canonical, client, local))  # fmt: skip
                        except psycopg.OperationalError:
                            # A connection the server closed (it restarted): the pool drops
                            # it; one more try on a fresh one, within the same deadline.
                            if attempt == 2 or not conn.closed:
                                raise
                            continue
                    return self._record(user, rows, user_rows)
        except TimeoutError:
            raise AuthUnavailable(f"{self.describe()}: no answer within {settings.query_timeout:g} s") from None
        except psycopg_pool.PoolTimeout:
            raise AuthUnavailable(f"{self.describe()}: no connection within {settings.query_timeout:g} s") from None
        except psycopg_pool.TooManyRequests:
            raise AuthUnavailable(f"{self.describe()}: too many lookups waiting for a connection") from None
        except psycopg.errors.QueryCanceled:
            raise AuthUnavailable(f"{self.describe()}: query ran past {settings.query_timeout:g} s") from None
        except psycopg.Error as exc:
            raise AuthUnavailable(f"{self.describe()}: {type(exc).__name__}: {_first_line(exc)}") from None
        raise AssertionError("unreachable")

    @staticmethod
    async def _query(conn: Any, query: BoundQuery | None, values: Mapping[str, str | None]) -> list[dict[str, str]]:
        assert query is not None
        cursor = await conn.execute(query.text, query.params(values), prepare=True)
        if cursor.description is None:
            return []
        names = [c.name for c in cursor.description]
        return [_row_dict(names, row) for row in await cursor.fetchall()]

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close(timeout=5)


class SqliteDatabase(_SqlDatabase):
    """SQLite, read-only, through the standard sqlite3 module in a few
    threads of its own (each with its connection): a query never runs on
    the event loop. A query past query_timeout is interrupted."""

    uses_client: bool
    uses_local: bool

    def __init__(self, settings: SqlSettings) -> None:
        super().__init__(settings)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._connections: list[Any] = []
        self._lock = threading.Lock()

    def _connection(self) -> Any:
        import sqlite3

        conn = getattr(self._local, "conn", None)
        if conn is None:
            path = self.settings.connect
            uri = path if path.startswith("file:") else "file:" + path.replace("?", "%3f") + "?mode=ro"
            try:
                conn = sqlite3.connect(uri, uri=True, timeout=self.settings.query_timeout, check_same_thread=False)
            except sqlite3.Error as exc:
                raise AuthUnavailable(f"{self.describe()}: cannot open the database: {exc}") from None
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _lookup_blocking(
        self, user: str, client: str | None, local: str | None, cell: list[Any]
    ) -> UserRecord | None:
        import sqlite3

        settings = self.settings
        conn = self._connection()
        cell.append(conn)  # for an interrupt from the loop on timeout
        try:
            rows = self._query(conn, settings.password_query, query_values(user, client, local))
            user_rows = None
            if rows and settings.user_query is not None:
                canonical = rows[0].get("user") or user
                user_rows = self._query(conn, settings.user_query, query_values(canonical, client, local))
        except sqlite3.Error as exc:
            raise AuthUnavailable(f"{self.describe()}: {type(exc).__name__}: {_first_line(exc)}") from None
        return self._record(user, rows, user_rows)

    @staticmethod
    def _query(conn: Any, query: BoundQuery | None, values: Mapping[str, str | None]) -> list[dict[str, str]]:
        assert query is not None
        cursor = conn.execute(query.text, query.params(values))
        if cursor.description is None:
            return []
        names = [c[0] for c in cursor.description]
        return [_row_dict(names, row) for row in cursor.fetchall()]

    async def lookup(self, user: str, client: str | None, local: str | None = None) -> UserRecord | None:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(self.settings.pool_size,
                                                                  thread_name_prefix="qpopper-sqlite")  # fmt: skip
        loop = asyncio.get_running_loop()
        cell: list[Any] = []
        future = loop.run_in_executor(self._executor, self._lookup_blocking, user, client, local, cell)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.settings.query_timeout)
        except TimeoutError:
            if cell:
                cell[0].interrupt()
            raise AuthUnavailable(f"{self.describe()}: no answer within {self.settings.query_timeout:g} s") from None

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.interrupt()
            conn.close()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


__all__ = ["PostgresDatabase", "SqliteDatabase", "bind_query", "database_from_args", "record_from_rows"]
