"""Virtual users from a passwd-file in Dovecot's format.

    user:{SCHEME}hash:uid:gid:gecos:home:shell:extra fields

Empty fields are allowed; the extra fields are space-separated key=value
pairs, of which `userdb_mail` (or `mail`) overrides the maildrop location.
The file is re-read when its modification time changes, so an administrator
edits it in place and the running server follows (within a second: its stat
is asked at most once a second, see filestamp).

Unknown users are checked against a dummy hash of the same cost as the
default scheme, so that timing does not tell who exists.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from ..errors import AuthUnavailable, ConfigError
from ..maildrop.location import DEFAULT_LOCATION, expand_location
from ..usernames import is_valid_login_name
from . import Authenticator, AuthTuning, Principal, QuickAuthenticator, Reloadable, ScramSecretSource, UserLookup
from .credentials import Credentials, ScramSecret, UserPass, Verified
from .filestamp import RECHECK_INTERVAL, StatCache
from .i18n import prepare_password, prepare_username
from .sasl import scram_secret_from_password
from .secrets import matches_secret

log = logging.getLogger("qpopper.auth")

# Scheme -> passlib handler name; passlib is imported on first use (it is
# a few MB that a server with only plain or SCRAM secrets need not load).
_CRYPT_HANDLERS = {
    "SHA512-CRYPT": "sha512_crypt",
    "SHA256-CRYPT": "sha256_crypt",
    "BLF-CRYPT": "bcrypt",
    "BCRYPT": "bcrypt",
    "MD5-CRYPT": "md5_crypt",
    "ARGON2ID": "argon2",
    "ARGON2I": "argon2",
}


def _handler(name: str) -> Any:
    import passlib.hash

    return getattr(passlib.hash, name)
# Salted and plain digests: scheme -> (hashlib name, digest length).
_DIGESTS = {
    "SSHA": ("sha1", 20),
    "SSHA256": ("sha256", 32),
    "SSHA512": ("sha512", 64),
    "SHA": ("sha1", 20),
    "SHA1": ("sha1", 20),
    "SHA256": ("sha256", 32),
    "SHA512": ("sha512", 64),
    "PLAIN-MD5": ("md5", 16),
}
_PLAINTEXT = {"PLAIN", "CLEARTEXT", "CLEAR"}
# Stored SCRAM keys (Dovecot's format): iterations,salt,storedkey,serverkey in base64.
_SCRAM = {"SCRAM-SHA-1": "SCRAM-SHA-1", "SCRAM-SHA-256": "SCRAM-SHA-256"}
SCHEMES = sorted(set(_CRYPT_HANDLERS) | set(_DIGESTS) | _PLAINTEXT | set(_SCRAM) | {"CRYPT"})

@functools.cache
def _dummy_hash() -> str:
    """Made at the first unknown user, then kept: hashing it costs a real check."""
    hashed: str = _handler("sha512_crypt").using(rounds=5000).hash("qpopper dummy password")
    return hashed


def _verify_dummy(password: bytes) -> None:
    """Unknown users cost what a real check of the default strength costs."""
    verify_password("SHA512-CRYPT", _dummy_hash(), password)


@dataclass(frozen=True, slots=True)
class PasswdEntry:
    user: str
    scheme: str
    hashed: str = field(repr=False)
    uid: int | None
    gid: int | None
    home: str | None
    extra: dict[str, str]

    @property
    def plaintext(self) -> bytes | None:
        """The clear secret, for APOP and CRAM-MD5, when stored as one."""
        if self.scheme in _PLAINTEXT:
            return self.hashed.encode("utf-8")
        return None

    def scram_secret(self, mechanism: str) -> ScramSecret | None:
        if self.scheme == mechanism and mechanism in _SCRAM:
            return parse_scram_secret(self.hashed)
        plain = self.plaintext
        if plain is not None:
            return scram_secret_from_password(plain, mechanism)
        return None


def parse_scram_secret(value: str) -> ScramSecret:
    """Dovecot's stored SCRAM form: iterations,salt,stored-key,server-key."""
    fields = value.split(",")
    if len(fields) != 4 or not fields[0].isdigit():
        raise ValueError("SCRAM secret must be iterations,salt,stored-key,server-key")
    salt, stored, server = (base64.b64decode(f, validate=True) for f in fields[1:])
    return ScramSecret(salt, stored, server, int(fields[0]))


def split_scheme(value: str, default: str = "CRYPT") -> tuple[str, str]:
    if value.startswith("{") and "}" in value:
        scheme, _, rest = value[1:].partition("}")
        return scheme.upper(), rest
    return default, value


def verify_password(scheme: str, hashed: str, password: bytes) -> bool:
    """Check `password` against a stored hash of the given scheme."""
    base, _, encoding = scheme.partition(".")
    if base in _PLAINTEXT:
        # A stored UTF-8 password in its prepared form (RFC 8265), as the client's is.
        stored = hashed.encode("utf-8")
        return hmac.compare_digest(prepare_password(stored) or stored, password)
    if base in _SCRAM:
        secret = parse_scram_secret(hashed)
        derived = scram_secret_from_password(password, base, secret.salt, secret.iterations)
        return hmac.compare_digest(derived.stored_key, secret.stored_key)
    if (base in _CRYPT_HANDLERS or base == "CRYPT") and b"\0" in password:
        # crypt(3) hashes C strings: no stored hash can hold a NUL, and passlib
        # refuses one. Known and unknown users both answer at once here.
        return False
    if base in _CRYPT_HANDLERS:
        return bool(_handler(_CRYPT_HANDLERS[base]).verify(password, hashed))
    if base == "CRYPT":
        for name in ("sha512_crypt", "sha256_crypt", "bcrypt", "md5_crypt", "des_crypt"):
            handler = _handler(name)
            if handler.identify(hashed):
                return bool(handler.verify(password, hashed))
        return False
    if base in _DIGESTS:
        algorithm, length = _DIGESTS[base]
        try:
            raw = bytes.fromhex(hashed) if encoding.upper() == "HEX" or (
                base == "PLAIN-MD5" and len(hashed) == 32
            ) else base64.b64decode(hashed, validate=True)
        except ValueError:
            return False
        digest, salt = raw[:length], raw[length:]
        if not base.startswith("SSHA") and salt:
            return False
        return hmac.compare_digest(hashlib.new(algorithm, password + salt).digest(), digest)
    raise ValueError(f"unsupported password scheme {scheme}")


def parse_passwd_line(line: str, lineno: int, path: str, default_scheme: str) -> PasswdEntry | None:
    line = line.rstrip("\r\n")
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    fields = line.split(":", 7)
    # A UTF-8 name (RFC 6856) is kept in the prepared form the protocol
    # looks it up by; it reaches no path (see usernames.is_valid_login_name).
    user = prepare_username(fields[0]) or ""
    if not is_valid_login_name(user):
        raise ConfigError(f"{path}:{lineno}: invalid user name")
    fields += [""] * (8 - len(fields))
    scheme, hashed = split_scheme(fields[1], default_scheme)
    if scheme.partition(".")[0] not in SCHEMES:
        raise ConfigError(f"{path}:{lineno}: unsupported password scheme {{{scheme}}}")

    def number(text: str, what: str) -> int | None:
        if not text:
            return None
        if not text.isdigit():
            raise ConfigError(f"{path}:{lineno}: {what} must be a number")
        return int(text)

    extra: dict[str, str] = {}
    for item in fields[7].split():
        key, _, value = item.partition("=")
        extra[key] = value
    return PasswdEntry(
        user=user,
        scheme=scheme,
        hashed=hashed,
        uid=number(fields[2], "uid"),
        gid=number(fields[3], "gid"),
        home=fields[5] or None,
        extra=extra,
    )


def load_passwd_file(path: str, default_scheme: str = "CRYPT") -> dict[str, PasswdEntry]:
    entries: dict[str, PasswdEntry] = {}
    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            for lineno, line in enumerate(f, 1):
                entry = parse_passwd_line(line, lineno, path, default_scheme)
                if entry is not None:
                    entries.setdefault(entry.user, entry)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read passwd-file {path}: {exc.strerror}") from exc
    return entries


class PasswdFileAuthenticator(Authenticator, QuickAuthenticator, Reloadable, ScramSecretSource, UserLookup):
    """Authenticator over one passwd-file, reloaded when it changes."""

    def __init__(
        self,
        path: str,
        mail_location: str = DEFAULT_LOCATION,
        default_scheme: str = "CRYPT",
        hash_workers: int = 0,
        recheck_interval: float = RECHECK_INTERVAL,
    ) -> None:
        """`hash_workers`: slow hashes checked at once (0: one per CPU); the
        server's worker threads are many, and a burst of ARGON2ID logins
        on all of them at once would take the CPU from running sessions.
        `recheck_interval`: seconds between two stats of the file."""
        self.path = path
        self.mail_location = mail_location
        self.default_scheme = default_scheme
        self.hash_workers = hash_workers or len(os.sched_getaffinity(0))
        self._hashing = threading.BoundedSemaphore(self.hash_workers)
        self._lock = threading.Lock()
        self._mtime: tuple[int, int] | None = None
        self._stat = StatCache(path, recheck_interval)
        self._entries: dict[str, PasswdEntry] = {}
        self._reload()  # a broken file is a start-up error, not a login error

    def reload(self, tuning: AuthTuning | None = None) -> None:
        """SIGHUP: a new auth-hash-workers. (The file itself is read again
        whenever it changes.) A check under way keeps the semaphore it took."""
        if tuning is None:
            return
        workers = tuning.hash_workers or len(os.sched_getaffinity(0))
        if workers != self.hash_workers:
            self.hash_workers, self._hashing = workers, threading.BoundedSemaphore(workers)
            log.info("password hashes: %d checked at once", workers)

    def _reload(self) -> None:
        try:
            st = self._stat.stat()
        except OSError as exc:
            raise ConfigError(f"cannot read passwd-file {self.path}: {exc.strerror}") from exc
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._mtime:
            self._entries = load_passwd_file(self.path, self.default_scheme)
            self._mtime = stamp

    def lookup(self, user: str) -> PasswdEntry | None:
        with self._lock:
            try:
                self._reload()
            except ConfigError as exc:
                # Keep serving with the last good copy; say why in the log.
                if not self._entries:
                    raise AuthUnavailable(str(exc)) from exc
                log.error("passwd-file reload failed, keeping the previous copy: %s", exc)
            return self._entries.get(user)

    def _entry_if_current(self, user: str) -> PasswdEntry | None:
        """The user's entry if the copy in memory is current, without waiting."""
        if not self._lock.acquire(blocking=False):
            return None  # a worker is reloading
        try:
            st = self._stat.stat_or_errno()
            if isinstance(st, int) or (st.st_mtime_ns, st.st_size) != self._mtime:
                return None
            return self._entries.get(user)
        finally:
            self._lock.release()

    def authenticate_quickly(self, credentials: Credentials) -> Principal | None:
        entry = self._entry_if_current(credentials.user)
        if entry is None:
            return None
        if isinstance(credentials, UserPass):
            base = entry.scheme.partition(".")[0]
            if base not in _PLAINTEXT and base not in _DIGESTS:
                return None  # a deliberately slow hash: a worker's job
            try:
                ok = verify_password(entry.scheme, entry.hashed, credentials.password)
            except ValueError:
                return None
        elif isinstance(credentials, Verified):
            ok = True
        else:
            ok = entry.plaintext is not None and matches_secret(entry.plaintext, credentials)
        return self._principal(entry) if ok else None

    def authenticate(self, credentials: Credentials) -> Principal | None:
        entry = self.lookup(credentials.user)
        if isinstance(credentials, UserPass):
            if entry is None:
                with self._hashing:
                    _verify_dummy(credentials.password)
                return None
            try:
                with self._hashing:
                    ok = verify_password(entry.scheme, entry.hashed, credentials.password)
            except ValueError as exc:
                log.error("cannot verify password of %s: %s", entry.user, exc)
                ok = False
            return self._principal(entry) if ok else None
        if entry is None:
            return None
        if isinstance(credentials, Verified):
            return self._principal(entry)
        secret = entry.plaintext
        if secret is not None and matches_secret(secret, credentials):
            return self._principal(entry)
        return None

    def scram_secret(self, user: str, mechanism: str) -> ScramSecret | None:
        entry = self.lookup(user)
        if entry is None:
            return None
        try:
            return entry.scram_secret(mechanism)
        except ValueError as exc:
            log.error("bad SCRAM secret for %s: %s", user, exc)
            return None

    def _principal(self, entry: PasswdEntry) -> Principal:
        template = entry.extra.get("userdb_mail") or entry.extra.get("mail") or self.mail_location
        return Principal(
            user=entry.user,
            mail=expand_location(template, entry.user, entry.home),
            home=entry.home,
            uid=entry.uid,
            gid=entry.gid,
        )
