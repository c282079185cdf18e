"""SASL mechanisms (RFC 4422) as small state machines without I/O.

Each mechanism turns the client's decoded responses into the next step:
a challenge to send, a request for the user's stored SCRAM secret, or the
credentials to check through the one authentication path that USER/PASS
uses as well. The protocol core does the base64 and the POP3 framing
(RFC 5034); nothing here knows about sockets or the event loop.
"""

from __future__ import annotations

import abc
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import scramp

from ..usernames import is_valid_username
from .credentials import CramMD5, Credentials, Rejected, ScramSecret, UserPass, Verified

# RFC 4616: implementations must accept 255 octets for each PLAIN field.
PLAIN_FIELD_MAX = 255
SCRAM_MECHANISMS = ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-1")
ALL_MECHANISMS = ("GSSAPI", "EXTERNAL") + SCRAM_MECHANISMS + ("CRAM-MD5", "PLAIN", "LOGIN")
# Offered unless sasl-mechanisms says otherwise: all but the -PLUS variants.
# Clients pick the strongest listed mechanism they know, and some that know
# SCRAM-*-PLUS cannot bind to every channel (neomutt with GNU SASL over
# GnuTLS has no tls-server-end-point): they abort the exchange and lose
# step with the server. Listed only where the site asks for them, -PLUS is
# for clients known to bind.
DEFAULT_MECHANISMS = tuple(m for m in ALL_MECHANISMS if not m.endswith("-PLUS"))
# Mechanisms that send the password itself: subject to the clear-text policy.
CLEARTEXT_MECHANISMS = frozenset({"PLAIN", "LOGIN"})
# Channel binding type this server offers for the -PLUS variants.
CHANNEL_BINDING = "tls-server-end-point"


@dataclass(frozen=True, slots=True)
class Challenge:
    data: bytes


@dataclass(frozen=True, slots=True)
class Finish:
    credentials: Credentials = field(repr=False)


@dataclass(frozen=True, slots=True)
class NeedScramSecret:
    user: str
    mechanism: str


@dataclass(frozen=True, slots=True)
class Fail:
    """The exchange is malformed (not a credential failure)."""

    reason: str


Step = Challenge | Finish | NeedScramSecret | Fail


def _user(raw: bytes) -> str | None:
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return name if is_valid_username(name) else None


class Mechanism(abc.ABC):
    name = ""
    # Server-first mechanisms must not get an initial response (RFC 5034).
    server_first = False
    # Steps that do I/O (GSSAPI reads a keytab) run in the server's worker
    # threads, not inside the protocol core.
    offload = False

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"")
        return self.step(initial)

    @abc.abstractmethod
    def step(self, response: bytes) -> Step:
        """The next step after the client's decoded response."""

    def secret(self, secret: ScramSecret | None) -> Step:
        return Fail("unexpected secret")


class Plain(Mechanism):
    name = "PLAIN"

    def step(self, response: bytes) -> Step:
        parts = response.split(b"\0")
        if len(parts) != 3 or any(len(p) > PLAIN_FIELD_MAX for p in parts):
            return Fail("malformed PLAIN response")
        authzid, authcid, password = parts
        user = _user(authcid)
        if user is None or not password:
            return Fail("bad PLAIN user name or empty password")
        if authzid and authzid != authcid:
            # Logging in as somebody else needs a proxy right nobody has here.
            return Finish(Rejected(user, self.name))
        return Finish(UserPass(user, password))


class Login(Mechanism):
    """The de-facto LOGIN mechanism (draft-murchison-sasl-login)."""

    name = "LOGIN"

    def __init__(self) -> None:
        self._user: str | None = None

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"Username:")
        return self.step(initial)

    def step(self, response: bytes) -> Step:
        if self._user is None:
            user = _user(response)
            if user is None:
                return Fail("bad LOGIN user name")
            self._user = user
            return Challenge(b"Password:")
        if not response:
            return Fail("empty LOGIN password")
        return Finish(UserPass(self._user, response))


class CramMd5(Mechanism):
    name = "CRAM-MD5"
    server_first = True

    def __init__(self, hostname: str) -> None:
        self.challenge = f"<{os.getpid()}.{secrets.randbits(64)}@{hostname}>".encode("ascii")

    def start(self, initial: bytes | None) -> Step:
        if initial is not None:
            return Fail("CRAM-MD5 takes no initial response")
        return Challenge(self.challenge)

    def step(self, response: bytes) -> Step:
        name, _, digest = response.rpartition(b" ")
        user = _user(name)
        hexdigest = digest.decode("ascii", "replace").lower()
        if user is None or len(hexdigest) != 32 or any(c not in "0123456789abcdef" for c in hexdigest):
            return Fail("malformed CRAM-MD5 response")
        return Finish(CramMD5(user, self.challenge, hexdigest))


def _scram_username(client_first: str) -> str | None:
    """The user name of a SCRAM client-first message, unescaped."""
    parts = client_first.split(",", 3)
    if len(parts) < 4 or not parts[2].startswith("n="):
        return None
    if parts[1] and parts[1] != "a=" + parts[2][2:]:
        return None  # an authzid naming another user
    name = parts[2][2:]
    if "=" in name.replace("=2C", "").replace("=3D", ""):
        return None
    return name.replace("=2C", ",").replace("=3D", "=")


class Scram(Mechanism):
    """SCRAM-SHA-1/-256 (RFC 5802, 7677), with -PLUS channel binding.

    Unknown users get a made-up secret, so the exchange runs to the proof
    and fails there exactly as a wrong password does.
    """

    def __init__(self, name: str, channel_binding: bytes | None) -> None:
        import scramp  # loaded on first use: it weighs ~15 MB per process

        self._scramp = scramp
        self.name = name
        base = name.removesuffix("-PLUS")
        self._mechanism = scramp.ScramMechanism(name)
        self._base = scramp.ScramMechanism(base)
        # Passed even to the non-PLUS variant, so that a client claiming we
        # lack channel binding ("y" flag) is caught as a downgrade.
        cb = (CHANNEL_BINDING, channel_binding) if channel_binding is not None else None
        self._cb = cb
        self._server: scramp.ScramServer | None = None
        self._client_first = ""
        self._user = ""
        self._stage = 0

    def step(self, response: bytes) -> Step:
        try:
            text = response.decode("utf-8")
        except UnicodeDecodeError:
            return Fail("SCRAM message is not UTF-8")
        if self._stage == 0:
            user = _scram_username(text)
            if user is None or not is_valid_username(user):
                return Fail("malformed SCRAM client-first message")
            self._client_first, self._user, self._stage = text, user, 1
            return NeedScramSecret(user, self._base.name)
        if self._stage == 2:
            assert self._server is not None
            try:
                self._server.set_client_final(text)
            except self._scramp.ScramException:
                self._stage = 4
                return Finish(Rejected(self._user, self.name))
            self._stage = 3
            return Challenge(self._server.get_server_final().encode("utf-8"))
        if self._stage == 3:
            if response:
                return Fail("SCRAM expects an empty response after server-final")
            return Finish(Verified(self._user, self.name))
        return Fail("SCRAM exchange out of order")

    def secret(self, secret: ScramSecret | None) -> Step:
        if self._stage != 1:
            return Fail("unexpected secret")
        if secret is None:
            secret = ScramSecret(secrets.token_bytes(16), secrets.token_bytes(32), secrets.token_bytes(32), 4096)
        info = (secret.salt, secret.stored_key, secret.server_key, secret.iterations)
        try:
            self._server = self._mechanism.make_server(lambda _user: info, channel_binding=self._cb)
            self._server.set_client_first(self._client_first)
            server_first = self._server.get_server_first()
        except self._scramp.ScramException as exc:
            return Fail(f"SCRAM client-first refused: {exc}")
        self._stage = 2
        return Challenge(server_first.encode("utf-8"))


class External(Mechanism):
    """EXTERNAL (RFC 4422 appendix A): the TLS client certificate is the
    credential. An authorisation identity, if sent, must be that same user."""

    name = "EXTERNAL"

    def __init__(self, certificate_user: str) -> None:
        self._user = certificate_user

    def step(self, response: bytes) -> Step:
        if not is_valid_username(self._user):
            return Fail("certificate name is not a valid user name")
        if response and response.decode("utf-8", "replace") != self._user:
            return Finish(Rejected(self._user, self.name))
        return Finish(Verified(self._user, self.name))


def make_mechanism(
    name: str,
    hostname: str,
    channel_binding: bytes | None,
    certificate_user: str | None = None,
    kerberos: object | None = None,
) -> Mechanism | None:
    if name == "GSSAPI":
        if kerberos is None:
            return None
        from .gssapi_mech import Gssapi, KerberosAcceptor

        assert isinstance(kerberos, KerberosAcceptor)
        return Gssapi(kerberos)
    if name == "EXTERNAL":
        return External(certificate_user) if certificate_user is not None else None
    if name == "PLAIN":
        return Plain()
    if name == "LOGIN":
        return Login()
    if name == "CRAM-MD5":
        return CramMd5(hostname)
    if name in SCRAM_MECHANISMS:
        if name.endswith("-PLUS") and channel_binding is None:
            return None
        return Scram(name, channel_binding)
    return None


def scram_secret_from_password(password: bytes, mechanism: str, salt: bytes | None = None, iterations: int = 4096) -> ScramSecret:
    """Derive a SCRAM secret from a clear one (PLAIN passwd-file entries)."""
    import scramp

    m = scramp.ScramMechanism(mechanism)
    salt_, stored, server, i = m.make_auth_info(password.decode("utf-8"), iteration_count=iterations, salt=salt)
    return ScramSecret(salt_, stored, server, i)


def cram_md5_digest(secret: bytes, challenge: bytes) -> str:
    return hmac.new(secret, challenge, hashlib.md5).hexdigest()
