"""Users in an LDAP directory, configured as Dovecot's passdb/userdb ldap.

`auth-backend = ldap` with `auth-backend-args` naming a file written as
Dovecot's dovecot-ldap.conf.ext: `uris` (or `hosts`), `dn`/`dnpass` for the
service account, `base`, `scope`, `user_filter`, `pass_filter`, `user_attrs`
and `pass_attrs` (`attr=field`, `attr=field=template` with %$ the value, or
`=field=template` with %{ldap:attr}), `auth_bind` and `auth_bind_userdn`,
`tls` (StartTLS) and `tls_ca_cert_file`, `tls_ca_cert_dir`,
`tls_cert_file`, `tls_key_file`, `tls_require_cert`, `ldap_version`,
`default_pass_scheme`; and two of ours, `timeout` (seconds a directory
has to answer, 5 by default) and `max_connections`. Two modes, as in Dovecot:

- the service account (or an anonymous bind) reads the password attribute
  and the server checks the hash (`LdapUserDatabase`);
- `auth_bind = yes`: the directory checks the password by a bind as the
  user, the DN found with `pass_filter` or built from `auth_bind_userdn`
  (`LdapBindDatabase`).

The client is bonsai, over OpenLDAP's libldap (the library Dovecot links,
so URIs, TLS options and certificate checks behave as there). It is
asynchronous: requests go out at once and the event loop watches the
connection's socket, so a login that waits for the directory holds a
coroutine, no thread. Lookups take turns on a few connections bound as
the service account (`max_connections`, 4 by default, ours); an auth bind
takes a connection of its own, since a bind changes who the connection is.

Every value a user controls goes into a filter escaped as RFC 4515 says
and into a DN as RFC 4514 says, so `*)(uid=*` is a name, not a filter.
A directory that is down, slow or refuses us raises AuthUnavailable
(-ERR [SYS/TEMP]) within `timeout`; the next attempts back off from 0.5 s
to 30 s and the first one that connects ends the outage. No password,
the service account's included, reaches a log line: `describe()` names
the URIs, the base and the service DN only.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import bonsai
import bonsai.errors
from bonsai.asyncio import AIOLDAPConnection
from bonsai.ldapconnection import BaseLDAPConnection

from ..errors import AuthUnavailable
from .userdb import BindingUserDatabase, UserDatabase, UserRecord

if TYPE_CHECKING:
    from .backendargs import BackendArgs

log = logging.getLogger("qpopper.auth")

# ---- escaping (RFC 4515 filters, RFC 4514 DNs) ----------------------------------------

_FILTER_SPECIAL = {"\\": r"\5c", "*": r"\2a", "(": r"\28", ")": r"\29", "\0": r"\00"}


def escape_filter_value(value: str) -> str:
    """A value for an LDAP filter: the characters RFC 4515 reserves as \\XX."""
    return "".join(_FILTER_SPECIAL.get(ch, ch) for ch in value)


def escape_dn_value(value: str) -> str:
    """An attribute value for a DN (RFC 4514 section 2.4)."""
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;=':
            out.append("\\" + ch)
        elif ch == "\0":
            out.append("\\00")
        elif (ch == " " and (i == 0 or i == len(value) - 1)) or (ch == "#" and i == 0):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


# ---- %-templates --------------------------------------------------------------------

_VARIABLE = re.compile(r"%(?:\{([^}]*)\}|([LU]?)([a-zA-Z%$]))")
_SHORT = {"u": "user", "n": "username", "d": "domain", "r": "rip", "l": "lip"}


def _user_values(user: str, client: str | None, local: str | None = None) -> dict[str, str]:
    """The variables' values; an address not known (a Unix socket) is empty."""
    name, _, domain = user.partition("@")
    return {"user": user, "username": name, "domain": domain, "rip": client or "", "lip": local or ""}


def expand(
    template: str,
    values: Mapping[str, str],
    escape: Callable[[str], str] = str,
    entry: Mapping[str, str] | None = None,
    keep: frozenset[str] = frozenset(),
) -> str:
    """Dovecot's %u %n %d %r %l (%L/%U lower or upper case them), %{user},
    %{ldap:attr} (from `entry`), %$ (entry's "$") and %%; each value passed
    through `escape`. Variables named in `keep` are left as written."""

    def one(match: re.Match[str]) -> str:
        long_name, case, short = match.group(1), match.group(2), match.group(3)
        if long_name is not None:
            name = long_name
        elif short == "%":
            return "%%" if "%" in keep else "%"
        else:
            name = "$" if short == "$" else _SHORT.get(short, short)
        if name in keep or (short is not None and short in keep):
            return match.group(0)
        if name.startswith("ldap:"):
            attr, _, default = name[5:].partition(":")
            value = (entry or {}).get(attr.lower(), default)
        elif name == "$":
            value = (entry or {}).get("$", "")
        elif name in values:
            value = values[name]
        else:  # not ours to fill (refused at start-up where it matters)
            return match.group(0)
        value = value.lower() if case == "L" else value.upper() if case == "U" else value
        return escape(value)

    return _VARIABLE.sub(one, template)


def _check_template(args: BackendArgs, key: str, template: str, ldap_refs: bool = False) -> None:
    """Refuse a variable this backend cannot fill at start-up, not at a login."""
    probe = {**_user_values("u@d", "127.0.0.1", "127.0.0.1")}
    for match in _VARIABLE.finditer(template):
        name = match.group(1)
        if name is not None and (name in probe or (ldap_refs and name.startswith("ldap:"))):
            continue
        short = match.group(3)
        if short == "%" or (short in _SHORT) or (ldap_refs and short in "$h"):
            continue
        raise args.error(key, f"{key}: unknown variable {match.group(0)} (known: %u %n %d %r %l %%)")


# ---- attribute maps -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AttributeMap:
    """One item of user_attrs/pass_attrs: LDAP attribute -> Dovecot field.

    `attribute` None is a constant or template field (`=field=template`);
    `template` None copies the attribute's value as it is."""

    attribute: str | None
    field: str
    template: str | None = None

    def referenced(self) -> set[str]:
        """The LDAP attributes this item reads."""
        names = {self.attribute} if self.attribute else set()
        if self.template:
            for match in _VARIABLE.finditer(self.template):
                if match.group(1) and match.group(1).startswith("ldap:"):
                    names.add(match.group(1)[5:].partition(":")[0])
        return names


def parse_attribute_maps(args: BackendArgs, key: str, default: str) -> tuple[AttributeMap, ...]:
    text = args.get(key) or default
    maps = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        attribute, equals, rest = item.partition("=")
        attribute = attribute.strip()
        if not equals:  # "attr": Dovecot takes the attribute's own name as the field
            maps.append(AttributeMap(attribute, attribute))
            continue
        name, has_template, template = rest.partition("=")
        name = name.strip()
        if name.startswith("userdb_"):  # prefetch-style names: the same fields here
            name = name[len("userdb_"):]
        if not name:
            raise args.error(key, f"{key}: {item!r} names no field")
        if not attribute and not has_template:
            raise args.error(key, f"{key}: {item!r}: a field without an attribute needs =field=value")
        if has_template:
            _check_template(args, key, template, ldap_refs=True)
        maps.append(AttributeMap(attribute or None, name, template if has_template else None))
    return tuple(maps)


# ---- settings -----------------------------------------------------------------------

_KEYS = {
    "uris", "hosts", "dn", "dnpass", "auth_bind", "auth_bind_userdn", "ldap_version", "base", "scope", "deref",
    "user_filter", "pass_filter", "user_attrs", "pass_attrs", "iterate_attrs", "iterate_filter", "tls",
    "tls_ca_cert_file", "tls_ca_cert_dir", "tls_cert_file", "tls_key_file", "tls_require_cert",
    "default_pass_scheme", "blocking", "debug_level", "sasl_bind", "timeout", "max_connections", "driver",
}
_SCOPES = {"base": bonsai.LDAPSearchScope.BASE, "onelevel": bonsai.LDAPSearchScope.ONELEVEL,
           "subtree": bonsai.LDAPSearchScope.SUBTREE}
# libldap's names (ldap.conf TLS_REQCERT) -> bonsai's; "hard" is libldap's alias of "demand".
_CERT_POLICIES = {"never": "never", "allow": "allow", "try": "try", "demand": "demand", "hard": "demand"}
DEFAULT_FILTER = "(&(objectClass=posixAccount)(uid=%u))"
DEFAULT_USER_ATTRS = "homeDirectory=home,uidNumber=uid,gidNumber=gid"
DEFAULT_PASS_ATTRS = "uid=user,userPassword=password"
DEFAULT_TIMEOUT = 5.0
DEFAULT_CONNECTIONS = 4


def _yes(args: BackendArgs, key: str) -> bool:
    value = (args.get(key) or "no").strip().lower()
    if value in ("yes", "y", "true", "1"):
        return True
    if value in ("no", "n", "false", "0"):
        return False
    raise args.error(key, f"{key} must be yes or no, not {value!r}")


@dataclass(frozen=True)
class LdapSettings:
    """dovecot-ldap.conf.ext, read and checked."""

    uris: tuple[str, ...]
    base: str
    bind_dn: str | None = None
    bind_password: str | None = field(default=None, repr=False)
    auth_bind: bool = False
    auth_bind_userdn: str | None = None
    scope: bonsai.LDAPSearchScope = bonsai.LDAPSearchScope.SUBTREE
    user_filter: str = DEFAULT_FILTER
    pass_filter: str = DEFAULT_FILTER
    user_attrs: tuple[AttributeMap, ...] = ()
    pass_attrs: tuple[AttributeMap, ...] = ()
    starttls: bool = False
    ca_file: str | None = None
    ca_dir: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    require_cert: str = "demand"
    default_pass_scheme: str = "CRYPT"
    timeout: float = DEFAULT_TIMEOUT
    max_connections: int = DEFAULT_CONNECTIONS

    @classmethod
    def from_args(cls, args: BackendArgs) -> LdapSettings:
        args.check_keys(_KEYS, "the ldap backend")
        if args.get("driver") not in (None, "ldap"):
            raise args.error("driver", "driver must be ldap for auth-backend = ldap")
        uris = tuple((args.get("uris") or "").split())
        if not uris:
            uris = tuple(f"ldap://{host}" for host in (args.get("hosts") or "").split())
        if not uris:
            raise args.error(None, "give uris (or hosts): where the directory is")
        for uri in uris:
            if not uri.startswith(("ldap://", "ldaps://", "ldapi://")):
                raise args.error("uris", f"{uri!r} is not an ldap://, ldaps:// or ldapi:// URI")
        version = args.get("ldap_version") or "3"
        if version != "3":
            raise args.error("ldap_version", "only LDAP version 3 is spoken (ldap_version = 3)")
        if _yes(args, "sasl_bind"):
            raise args.error("sasl_bind", "sasl_bind is not supported: bind with dn and dnpass")
        scope = (args.get("scope") or "subtree").lower()
        if scope not in _SCOPES:
            raise args.error("scope", f"scope must be base, onelevel or subtree, not {scope!r}")
        deref = (args.get("deref") or "never").lower()
        if deref != "never":
            raise args.error("deref", "only deref = never is supported")
        policy = (args.get("tls_require_cert") or "demand").lower()
        if policy not in _CERT_POLICIES:
            raise args.error("tls_require_cert", f"tls_require_cert must be one of {', '.join(_CERT_POLICIES)}")
        starttls = _yes(args, "tls")
        if starttls and any(uri.startswith("ldaps://") for uri in uris):
            raise args.error("tls", "tls = yes (StartTLS) and an ldaps:// URI: choose one")
        bind_dn = args.get("dn") or None
        if args.get("dnpass") and not bind_dn:
            raise args.error("dnpass", "dnpass without dn")
        userdn = args.get("auth_bind_userdn") or None
        for key in ("user_filter", "pass_filter", "auth_bind_userdn"):
            if args.get(key):
                _check_template(args, key, args.required(key))
        return cls(
            uris=uris,
            base=args.required("base"),
            bind_dn=bind_dn,
            bind_password=args.get("dnpass") or None,
            auth_bind=_yes(args, "auth_bind"),
            auth_bind_userdn=userdn,
            scope=_SCOPES[scope],
            user_filter=args.get("user_filter") or DEFAULT_FILTER,
            pass_filter=args.get("pass_filter") or DEFAULT_FILTER,
            user_attrs=parse_attribute_maps(args, "user_attrs", DEFAULT_USER_ATTRS),
            pass_attrs=parse_attribute_maps(args, "pass_attrs", DEFAULT_PASS_ATTRS),
            starttls=starttls,
            ca_file=args.get("tls_ca_cert_file") or None,
            ca_dir=args.get("tls_ca_cert_dir") or None,
            cert_file=args.get("tls_cert_file") or None,
            key_file=args.get("tls_key_file") or None,
            require_cert=_CERT_POLICIES[policy],
            default_pass_scheme=(args.get("default_pass_scheme") or "CRYPT").upper(),
            timeout=args.number("timeout", DEFAULT_TIMEOUT) or DEFAULT_TIMEOUT,
            max_connections=max(1, int(args.number("max_connections", DEFAULT_CONNECTIONS))),
        )

    def describe(self) -> str:
        parts = ["ldap", " ".join(self.uris), f"base {self.base}"]
        if self.starttls:
            parts.append("starttls")
        if self.bind_dn:
            parts.append(f"as {self.bind_dn}")
        if self.auth_bind:
            parts.append("auth_bind")
        return " ".join(parts)


# ---- the connection ---------------------------------------------------------------------


class _Connection(AIOLDAPConnection):
    """A bonsai connection that waits for answers with a reader only.

    bonsai's own asyncio connection also puts a writer on the socket,
    which on a connected socket fires at every turn of the event loop, so
    each request in flight spins the loop until its answer comes. Here the
    socket's reader alone wakes the request, which asks libldap for its
    answer (one message per call, without blocking) until it is complete.
    One request at a time per connection: libldap loses answers that come
    in for another message id while one is being collected (found in
    testing), so the pool below hands each connection to one user at a
    time. Opening the connection (connect, StartTLS, bind) is left to
    bonsai's own code; `opened` switches to ours.
    """

    READS_PER_WAKE = 3
    RECHECK = 0.05  # seconds

    def __init__(self, client: bonsai.LDAPClient, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(client, loop)  # type: ignore[no-untyped-call]  # bonsai's asyncio module is untyped
        self.opened = False
        self._waiting: tuple[int, asyncio.Future[Any]] | None = None

    def _evaluate(self, msg_id: int, timeout: float | None = None) -> Any:
        if not self.opened:
            return super()._evaluate(msg_id, timeout)  # type: ignore[no-untyped-call]
        return self._wait(msg_id)

    async def _wait(self, msg_id: int) -> Any:
        if self._waiting is not None:
            raise RuntimeError("one request at a time on an LDAP connection")
        future: asyncio.Future[Any] = self._loop.create_future()
        self._waiting = (msg_id, future)
        fd = self.fileno()
        self._loop.add_reader(fd, self._readable)
        # TLS may hold a message already read off the socket, which then never
        # turns readable for it: looked at again after a while, just in case.
        check = self._loop.call_later(self.RECHECK, self._recheck)
        try:
            self._readable()  # the answer may be in already
            return await future
        finally:
            self._waiting = None
            check.cancel()
            if not self.closed:
                self._loop.remove_reader(fd)

    def _recheck(self) -> None:
        if self._waiting is not None and not self._waiting[1].done():
            self._readable()
            self._loop.call_later(self.RECHECK, self._recheck)

    def _readable(self) -> None:
        if self._waiting is None:
            return
        msg_id, future = self._waiting
        # libldap takes one message off the connection per call: an entry
        # and the result that ends the search, two calls for the usual answer.
        for _ in range(self.READS_PER_WAKE):
            if future.done():
                return
            try:
                result = BaseLDAPConnection.get_result(self, msg_id)  # libldap's, without waiting
            except bonsai.LDAPError as exc:
                future.set_exception(exc)
                return
            if result is not None:
                future.set_result(result)
                return

    def close(self) -> None:
        """Fail the request in flight, then close the socket."""
        if self._waiting is not None:
            _, future = self._waiting
            if not self.closed:
                self._loop.remove_reader(self.fileno())
            if not future.done():
                future.set_exception(bonsai.errors.ClosedConnection("connection closed"))
        if not self.closed:
            super().close()


# Errors that mean "the directory is unreachable or stuck", as opposed to an answer.
_CONNECTION_ERRORS = (bonsai.errors.ConnectionError, bonsai.errors.ClosedConnection, bonsai.errors.TimeoutError)


class LdapDirectory:
    """The directory as the lookups see it: a few connections bound as the
    service account, each lent to one request at a time, made again after
    a failure with backoff. A request that finds them all busy waits its
    turn, within the timeout."""

    BACKOFF_FIRST = 0.5
    BACKOFF_MAX = 30.0

    def __init__(self, settings: LdapSettings) -> None:
        self.settings = settings
        self._idle: list[_Connection] = []
        self._count = 0  # connections made or being made, idle or lent
        self._turns: collections.deque[asyncio.Future[None]] = collections.deque()
        self._retry_at = 0.0
        self._backoff = 0.0
        self._down = False
        self._closed = False

    def client(self, uri: str, dn: str | None, password: str | None) -> bonsai.LDAPClient:
        s = self.settings
        client = bonsai.LDAPClient(uri, tls=s.starttls)
        if dn is not None:
            client.set_credentials("SIMPLE", user=dn, password=password or "")
        client.set_cert_policy(s.require_cert)
        if s.ca_file:
            client.set_ca_cert(s.ca_file)
        if s.ca_dir:
            client.set_ca_cert_dir(s.ca_dir)
        if s.cert_file:
            client.set_client_cert(s.cert_file)
        if s.key_file:
            client.set_client_key(s.key_file)
        client.set_ignore_referrals(True)
        return client

    async def open(self, dn: str | None, password: str | None) -> _Connection:
        """A new connection bound as `dn`, to the first URI that takes it.

        A refused bind (a wrong password) raises BindRefused; the rest
        becomes AuthUnavailable. The attempt runs in a task of its
        own, so a login cancelled meanwhile (its client went away) does not
        interrupt bonsai half-way; it ends within its timeout."""
        task = asyncio.get_running_loop().create_task(self._open(dn, password))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_close_when_made)
            raise

    async def _open(self, dn: str | None, password: str | None) -> _Connection:
        reasons = []
        for uri in self.settings.uris:
            conn = _Connection(self.client(uri, dn, password), asyncio.get_running_loop())
            refused = False
            try:
                await conn.open(self.settings.timeout)  # type: ignore[no-untyped-call]  # bonsai.asyncio is untyped
            except (bonsai.errors.AuthenticationError, bonsai.errors.InvalidDN) as exc:
                refused = True
                _drop_traceback(exc)
            except (bonsai.LDAPError, OSError) as exc:
                reasons.append(f"{uri}: {_reason(exc)}")
                _drop_traceback(exc)
            else:
                conn.opened = True
                return conn
            # bonsai leaves the socket pair of a failed attempt to the garbage
            # collector, which warns that it was never closed: freed here, now
            # that no traceback holds it, and the warning (about bonsai) dropped.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                del conn
            if refused:
                raise BindRefused(dn or "")
        raise AuthUnavailable(f"{self.describe()}: cannot connect: {'; '.join(reasons)}")

    async def _acquire(self, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        while True:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn
                self._count -= 1
            if self._count < self.settings.max_connections:
                return await self._connect()
            turn = loop.create_future()
            self._turns.append(turn)
            try:
                await asyncio.wait_for(turn, max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise AuthUnavailable(
                    f"{self.describe()}: all {self.settings.max_connections} connections busy for "
                    f"{self.settings.timeout:g} s"
                ) from None
            finally:
                if turn in self._turns:
                    self._turns.remove(turn)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        if loop.time() < self._retry_at:
            raise AuthUnavailable(f"{self.describe()}: down, next attempt in {self._retry_at - loop.time():.1f} s")
        self._count += 1
        try:
            conn = await self.open(self.settings.bind_dn, self.settings.bind_password)
        except BindRefused:
            self._count -= 1
            self.failed()
            raise AuthUnavailable(f"{self.describe()}: the directory refused the service account's bind") from None
        except asyncio.CancelledError:
            self._count -= 1
            self._next_turn()
            raise
        except BaseException:
            self._count -= 1
            self.failed()
            self._next_turn()
            raise
        if self._down:
            log.warning("%s: connected again", self.describe())
        self._down = False
        self._backoff = 0.0
        return conn

    def _release(self, conn: _Connection, healthy: bool) -> None:
        if healthy and not conn.closed and not self._closed:
            self._idle.append(conn)
        else:
            conn.close()
            self._count -= 1
        self._next_turn()

    def _next_turn(self) -> None:
        while self._turns:
            turn = self._turns.popleft()
            if not turn.done():
                turn.set_result(None)
                return

    def failed(self) -> None:
        """The directory let us down: back off before the next connection."""
        self._down = True
        self._backoff = min(self.BACKOFF_MAX, max(self.BACKOFF_FIRST, self._backoff * 2))
        self._retry_at = asyncio.get_running_loop().time() + self._backoff
        for conn in self._idle:  # made before the failure: as suspect as the one that failed
            conn.close()
        self._count -= len(self._idle)
        self._idle.clear()

    async def search(self, base: str, scope: bonsai.LDAPSearchScope, filter_exp: str,
                     attributes: list[str]) -> list[bonsai.LDAPEntry]:
        """At most two entries (two means "ambiguous"); AuthUnavailable when
        the directory cannot answer within the timeout. A connection that
        died idle (the directory restarted) is replaced once at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.timeout
        for attempt in (1, 2):
            conn = await self._acquire(deadline)
            healthy = False
            try:
                entries: list[bonsai.LDAPEntry] = await asyncio.wait_for(
                    conn.search(base, scope, filter_exp, attributes, sizelimit=2), max(0.0, deadline - loop.time())
                )
                healthy = True
                return entries
            except bonsai.errors.SizeLimitError:
                healthy = True
                return [bonsai.LDAPEntry(base), bonsai.LDAPEntry(base)]  # more than two: as ambiguous
            except TimeoutError:
                self.failed()
                raise AuthUnavailable(f"{self.describe()}: no answer within {self.settings.timeout:g} s") from None
            except _CONNECTION_ERRORS as exc:
                if attempt == 2:
                    self.failed()
                    raise AuthUnavailable(f"{self.describe()}: {_reason(exc)}") from None
            except bonsai.LDAPError as exc:
                healthy = True
                raise AuthUnavailable(f"{self.describe()}: search failed: {_reason(exc)}") from None
            finally:
                self._release(conn, healthy)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Close the idle connections; those lent out close when they come back
        (a SIGHUP replaces the database while logins are in flight)."""
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._count -= len(self._idle)
        self._idle.clear()

    def describe(self) -> str:
        return self.settings.describe()


class BindRefused(Exception):
    """The directory refused a bind: wrong password (or no such DN)."""


def _drop_traceback(exc: BaseException) -> None:
    """Let go of the frames an exception (and those it chains) holds."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = None
        current = current.__context__ or current.__cause__


def _close_when_made(task: asyncio.Task[_Connection]) -> None:
    """A connection opened for a login that went away meanwhile: closed."""
    if not task.cancelled() and task.exception() is None:
        task.result().close()


def _reason(exc: BaseException) -> str:
    """An LDAP error for a log line: its message, which holds no credentials."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# ---- entries -> records ---------------------------------------------------------------


def _first_values(entry: bonsai.LDAPEntry, attributes: Iterable[str]) -> dict[str, str]:
    """Each attribute's first value (lower-cased names; bytes read as UTF-8)."""
    values: dict[str, str] = {}
    for name in attributes:
        found = entry.get(name)
        if not found:
            continue
        value = found[0]
        values[name.lower()] = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return values


def _number(field_name: str, value: str, user: str) -> int:
    if not value.isdigit():
        raise AuthUnavailable(f"ldap: {field_name} of {user} is {value!r}, not a number")
    return int(value)


def record_from_entry(
    entry: bonsai.LDAPEntry, maps: Iterable[AttributeMap], user: str, client: str | None, local: str | None = None
) -> UserRecord:
    """The Dovecot fields the attribute maps make of one entry."""
    maps = tuple(maps)
    values = _first_values(entry, {name for m in maps for name in m.referenced()})
    fields: dict[str, str] = {}
    user_values = _user_values(user, client, local)
    for item in maps:
        if item.attribute is not None and item.attribute.lower() not in values:
            continue
        if item.template is None:
            fields[item.field] = values[item.attribute.lower()] if item.attribute else ""
            continue
        own = {**values, "$": values.get(item.attribute.lower(), "") if item.attribute else ""}
        if item.field == "mail":
            # The location is expanded again by the maildrop layer, which fills %h:
            # every value put in here has its % doubled, and %h and %% stay.
            doubled = expand(item.template, user_values, lambda v: v.replace("%", "%%"), own, keep=frozenset("h%"))
            fields["mail"] = doubled
        else:
            fields[item.field] = expand(item.template, user_values, str, own)
    name = fields.pop("user", None) or user
    uid = fields.pop("uid", None)
    gid = fields.pop("gid", None)
    return UserRecord(
        user=name,
        password=fields.pop("password", None),
        uid=_number("uid", uid, name) if uid else None,
        gid=_number("gid", gid, name) if gid else None,
        home=fields.pop("home", None) or None,
        mail=fields.pop("mail", None) or None,
        extra=fields,
    )


def _attributes(maps: Iterable[AttributeMap]) -> list[str]:
    return sorted({name for m in maps for name in m.referenced()})


# ---- the two databases --------------------------------------------------------------------


class LdapUserDatabase(UserDatabase):
    """Dovecot's passdb/userdb ldap with the password read from the entry:
    one search by `pass_filter` for both the password and the user's
    fields (a second by `user_filter` only when the two filters differ)."""

    def __init__(self, settings: LdapSettings) -> None:
        self.settings = settings
        self.directory = LdapDirectory(settings)
        # Whether an answer may differ by client or local address (%r, %l in
        # a filter or template): the auth cache keys its entries by each only then.
        templates = [settings.user_filter, settings.pass_filter, settings.auth_bind_userdn or ""]
        templates += [m.template or "" for m in settings.user_attrs + settings.pass_attrs]
        self.uses_client = any(re.search(r"%(?:[LU]?r|\{rip\})", t) for t in templates)
        self.uses_local = any(re.search(r"%(?:[LU]?l|\{lip\})", t) for t in templates)

    @classmethod
    def from_args(cls, args: BackendArgs) -> LdapUserDatabase:
        settings = LdapSettings.from_args(args)
        return LdapBindDatabase(settings) if settings.auth_bind else LdapUserDatabase(settings)

    async def _find(self, template: str, maps: tuple[AttributeMap, ...], user: str,
                    client: str | None, local: str | None) -> bonsai.LDAPEntry | None:
        """The one entry the filter finds for `user`, or None; two is a
        broken directory (AuthUnavailable), not a login."""
        filter_exp = expand(template, _user_values(user, client, local), escape_filter_value)
        entries = await self.directory.search(self.settings.base, self.settings.scope, filter_exp, _attributes(maps))
        if len(entries) > 1:
            raise AuthUnavailable(f"{self.describe()}: more than one entry matches {filter_exp}")
        return entries[0] if entries else None

    async def lookup(self, user: str, client: str | None, local: str | None = None) -> UserRecord | None:
        s = self.settings
        if s.auth_bind or s.pass_filter == s.user_filter:
            maps = s.user_attrs if s.auth_bind else s.pass_attrs + s.user_attrs
            template = s.user_filter if s.auth_bind else s.pass_filter
            entry = await self._find(template, maps, user, client, local)
            return None if entry is None else record_from_entry(entry, maps, user, client, local)
        entry = await self._find(s.pass_filter, s.pass_attrs, user, client, local)
        if entry is None:
            return None
        user_entry = await self._find(s.user_filter, s.user_attrs, user, client, local)
        if user_entry is None:
            return None
        both = record_from_entry(entry, s.pass_attrs, user, client, local)
        fields = record_from_entry(user_entry, s.user_attrs, user, client, local)
        return UserRecord(user=both.user, password=both.password, uid=fields.uid, gid=fields.gid,
                          home=fields.home, mail=fields.mail, extra={**both.extra, **fields.extra})

    async def close(self) -> None:
        await self.directory.close()

    def describe(self) -> str:
        return self.settings.describe()


class LdapBindDatabase(LdapUserDatabase, BindingUserDatabase):
    """`auth_bind = yes`: the directory checks the password by a bind as
    the user. The DN is `auth_bind_userdn` expanded (no search), or the
    DN of the entry `pass_filter` finds; the user's fields come from that
    entry (read with the user's own bind when the DN was built)."""

    async def bind(
        self, user: str, password: str, client: str | None, local: str | None = None
    ) -> UserRecord | None:
        # An empty password is an "unauthenticated bind" (RFC 4513 5.1.2), which a
        # directory accepts as anonymous; a NUL would cut the password short in C.
        if not password or "\0" in password:
            return None
        s = self.settings
        values = _user_values(user, client, local)
        entry: bonsai.LDAPEntry | None = None
        maps = tuple(m for m in s.pass_attrs + s.user_attrs if m.field != "password")  # not read, not needed
        if s.auth_bind_userdn:
            dn = expand(s.auth_bind_userdn, values, escape_dn_value)
        else:
            entry = await self._find(s.pass_filter, maps, user, client, local)
            if entry is None:
                return None
            dn = str(entry.dn)
        try:
            conn = await self.directory.open(dn, password)
        except BindRefused:
            return None
        try:
            if entry is None:
                filter_exp = expand(s.user_filter, values, escape_filter_value)
                try:
                    found = await asyncio.wait_for(
                        conn.search(dn, bonsai.LDAPSearchScope.BASE, filter_exp, _attributes(maps)), s.timeout
                    )
                except TimeoutError:
                    raise AuthUnavailable(f"{self.describe()}: no answer within {s.timeout:g} s") from None
                except bonsai.errors.NoSuchObjectError:
                    found = []
                except bonsai.LDAPError as exc:
                    raise AuthUnavailable(f"{self.describe()}: search failed: {_reason(exc)}") from None
                if not found:
                    log.info("%s: %s bound but does not match user_filter (or may not read its entry)",
                             self.describe(), dn)
                    return None
                entry = found[0]
        finally:
            conn.close()
        record = record_from_entry(entry, maps, user, client, local)
        # The directory checked the password: the record carries none.
        return UserRecord(user=record.user, password=None, uid=record.uid, gid=record.gid, home=record.home,
                          mail=record.mail, extra=record.extra)


def database_from_args(args: BackendArgs) -> LdapUserDatabase:
    """auth-backend = ldap: the database its args file describes (see userdb.BACKENDS)."""
    return LdapUserDatabase.from_args(args)
