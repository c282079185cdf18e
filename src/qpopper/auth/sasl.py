"""SASL mechanisms (RFC 4422) as small state machines without I/O.

Each mechanism turns the client's decoded responses into the next step:
a challenge to send, a request for the user's stored SCRAM secret, or the
credentials to check through the one authentication path that USER/PASS
uses as well. The protocol core does the base64 and the POP3 framing
(RFC 5034); nothing here knows about sockets or the event loop.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..usernames import is_valid_login_name, is_valid_username
from .credentials import CramMD5, Rejected, ScramSecret, UserPass, Verified
from .i18n import prepare_password, prepare_username
from .sasl_types import Challenge, Fail, Finish, Mechanism, NeedScramSecret, Step

if TYPE_CHECKING:
    import scramp

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


def offered_mechanisms(
    configured: Iterable[str],
    *,
    plaintext_allowed: bool,
    channel_binding: bool,
    client_certificate: bool,
    kerberos: bool,
) -> list[str]:
    """The configured mechanisms a connection can use, in the configured order.

    The one rule for CAPA, AUTH and `--show-config`: PLAIN and LOGIN need
    the clear-text policy's consent, the -PLUS variants a TLS channel to
    bind to, EXTERNAL a client certificate (so a tls-client-ca-file), and
    GSSAPI a Kerberos set-up.
    """
    out = []
    for name in configured:
        if name in CLEARTEXT_MECHANISMS and not plaintext_allowed:
            continue
        if name.endswith("-PLUS") and not channel_binding:
            continue
        if name == "EXTERNAL" and not client_certificate:
            continue
        if name == "GSSAPI" and not kerberos:
            continue
        out.append(name)
    return out


def _user(raw: bytes) -> str | None:
    """A SASL user name (UTF-8 by RFC 4422), prepared as RFC 8265 says, or
    None if it is no name a login may carry (is_valid_login_name keeps a
    UTF-8 name out of every path)."""
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    prepared = prepare_username(name)
    return prepared if prepared is not None and is_valid_login_name(prepared) else None


def _password(raw: bytes) -> bytes:
    """A SASL password prepared (OpaqueString) when it is UTF-8, as RFC 4616
    asks; other bytes as sent, as USER/PASS takes them (a Latin-1 password
    for PAM)."""
    prepared = prepare_password(raw)
    return raw if prepared is None else prepared


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
        if authzid and authzid != authcid and _user(authzid) != user:
            # Logging in as somebody else needs a proxy right nobody has here.
            return Finish(Rejected(user, self.name))
        return Finish(UserPass(user, _password(password)))


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
        return Finish(UserPass(self._user, _password(response)))


class CramMd5(Mechanism):
    name = "CRAM-MD5"
    server_first = True

    def __init__(self, challenge: bytes) -> None:
        self.challenge = challenge

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


def _scram_name(escaped: str) -> str | None:
    """A SCRAM saslname unescaped (RFC 5802: "=2C" is ",", "=3D" is "=")."""
    if "=" in escaped.replace("=2C", "").replace("=3D", ""):
        return None
    return escaped.replace("=2C", ",").replace("=3D", "=")


def _scram_user(escaped: str) -> str | None:
    """The account a SCRAM saslname names: unescaped, then prepared as every
    other login name is (RFC 8265 UsernameCasePreserved, `_user`), so that
    one account has one name whatever the mechanism; that prepared name is
    what the stored secret is looked up by. RFC 5802 asks clients to send
    the name SASLprep'ed; for the names people use the two preparations
    agree, and a client that sends the raw form is prepared here."""
    name = _scram_name(escaped)
    return None if name is None else _user(name.encode("utf-8"))


def _scram_attributes(message: str) -> list[tuple[str, str]] | None:
    """`k=v,k=v` as pairs, or None if malformed (RFC 5802 section 7)."""
    pairs = []
    for item in message.split(","):
        if len(item) < 3 or item[1] != "=" or not (item[0].isascii() and item[0].isalpha()) or "\0" in item:
            return None
        pairs.append((item[0], item[2:]))
    if len({k for k, _ in pairs}) != len(pairs) or any(k == "m" for k, _ in pairs):
        return None  # duplicates; "m" is a mandatory extension nobody defines
    return pairs


class Scram(Mechanism):
    """SCRAM-SHA-1/-256 (RFC 5802, 7677), with -PLUS channel binding.

    scramp parses the client-first message and writes the server-first;
    the client-final proof is checked here, because the GS2 header may
    carry an authorisation identity (`n,a=user,`) that scramp refuses.
    One equal to the user is allowed, as for PLAIN; any other is refused
    as a failed login. scramp sees the header without it, while the
    channel-binding check (`c=`) uses the header exactly as the client
    sent it, which is what the client encoded.

    Unknown users get a made-up secret, so the exchange runs to the proof
    and fails there exactly as a wrong password does.
    """

    def __init__(self, name: str, channel_binding: bytes | None) -> None:
        import scramp  # loaded on first use: it weighs ~15 MB per process

        self._scramp = scramp
        self.name = name
        base = name.removesuffix("-PLUS")
        self._hash = hashlib.sha256 if base == "SCRAM-SHA-256" else hashlib.sha1
        self._mechanism = scramp.ScramMechanism(name)
        self._base = scramp.ScramMechanism(base)
        # Passed even to the non-PLUS variant, so that a client claiming we
        # lack channel binding ("y" flag) is caught as a downgrade.
        self._cb = (CHANNEL_BINDING, channel_binding) if channel_binding is not None else None
        self._cb_data = channel_binding or b""
        self._server: scramp.ScramServer | None = None
        self._gs2_header = ""  # as the client sent it, authzid included
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self._secret: ScramSecret | None = None
        self._user = ""
        self._stage = 0

    def step(self, response: bytes) -> Step:
        try:
            text = response.decode("utf-8")
        except UnicodeDecodeError:
            return Fail("SCRAM message is not UTF-8")
        if self._stage == 0:
            return self._client_first(text)
        if self._stage == 2:
            signature = self._verify_client_final(text)
            if signature is None:
                self._stage = 4
                return Finish(Rejected(self._user, self.name))
            self._stage = 3
            return Challenge(b"v=" + base64.b64encode(signature))
        if self._stage == 3:
            if response:
                return Fail("SCRAM expects an empty response after server-final")
            return Finish(Verified(self._user, self.name))
        return Fail("SCRAM exchange out of order")

    def _client_first(self, text: str) -> Step:
        flag, comma1, rest = text.partition(",")
        authzid, comma2, bare = rest.partition(",")
        name = bare[2:].partition(",")[0] if bare.startswith("n=") else ""
        user = _scram_user(name)
        if not (comma1 and comma2) or user is None:
            return Fail("malformed SCRAM client-first message")
        if authzid:
            if not authzid.startswith("a=") or not _scram_name(authzid[2:]):
                return Fail("malformed SCRAM authorisation identity")
            if _scram_user(authzid[2:]) != user:
                # Logging in as somebody else needs a proxy right nobody has here.
                self._stage = 4
                return Finish(Rejected(user, self.name))
        self._gs2_header = f"{flag},{authzid},"
        self._client_first_bare, self._user, self._stage = bare, user, 1
        return NeedScramSecret(user, self._base.name)

    def secret(self, secret: ScramSecret | None) -> Step:
        if self._stage != 1:
            return Fail("unexpected secret")
        if secret is None:
            secret = ScramSecret(secrets.token_bytes(16), secrets.token_bytes(32), secrets.token_bytes(32), 4096)
        info = (secret.salt, secret.stored_key, secret.server_key, secret.iterations)
        flag = self._gs2_header.partition(",")[0]
        try:
            self._server = self._mechanism.make_server(lambda _user: info, channel_binding=self._cb)
            self._server.set_client_first(f"{flag},,{self._client_first_bare}")
            server_first = self._server.get_server_first()
        except self._scramp.ScramException as exc:
            return Fail(f"SCRAM client-first refused: {exc}")
        self._secret, self._server_first = secret, server_first
        self._nonce = server_first.partition(",")[0].removeprefix("r=")
        self._stage = 2
        return Challenge(server_first.encode("utf-8"))

    def _verify_client_final(self, text: str) -> bytes | None:
        """The server signature if the proof holds (RFC 5802 section 3), else None."""
        without_proof, _, proof_text = text.rpartition(",p=")
        attributes = _scram_attributes(text)
        if attributes is None or [k for k, _ in attributes[:2]] != ["c", "r"] or attributes[-1][0] != "p":
            return None
        assert self._secret is not None
        try:
            cbind = base64.b64decode(attributes[0][1], validate=True)
            proof = base64.b64decode(proof_text, validate=True)
        except binascii.Error:
            return None
        expected = self._gs2_header.encode("utf-8")
        if self._gs2_header.startswith("p="):
            expected += self._cb_data
        if not hmac.compare_digest(cbind, expected) or attributes[1][1] != self._nonce:
            return None
        message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        signature = hmac.new(self._secret.stored_key, message, self._hash).digest()
        if len(proof) != len(signature):
            return None
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(self._hash(client_key).digest(), self._secret.stored_key):
            return None
        return hmac.new(self._secret.server_key, message, self._hash).digest()


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
    cram_challenge: Callable[[], bytes] | None = None,
) -> Mechanism | None:
    """The mechanism `name` for one exchange, or None where it cannot run.
    `cram_challenge` makes CRAM-MD5's challenge (the protocol core passes
    its configured sources, so a session replays byte for byte); without
    it the challenge is `<pid.random@hostname>`."""
    if name == "GSSAPI":
        if kerberos is None:
            return None
        from .gssapi_mech import Gssapi, KerberosAcceptor  # Kerberos sites only

        assert isinstance(kerberos, KerberosAcceptor)
        return Gssapi(kerberos)
    if name == "EXTERNAL":
        return External(certificate_user) if certificate_user is not None else None
    if name == "PLAIN":
        return Plain()
    if name == "LOGIN":
        return Login()
    if name == "CRAM-MD5":
        if cram_challenge is not None:
            return CramMd5(cram_challenge())
        return CramMd5(f"<{os.getpid()}.{secrets.randbits(64)}@{hostname}>".encode("ascii"))
    if name in SCRAM_MECHANISMS:
        if name.endswith("-PLUS") and channel_binding is None:
            return None
        return Scram(name, channel_binding)
    return None


def scram_secret_from_password(
    password: bytes, mechanism: str, salt: bytes | None = None, iterations: int = 4096
) -> ScramSecret:
    """Derive a SCRAM secret from a clear one (PLAIN passwd-file entries)."""
    import scramp

    m = scramp.ScramMechanism(mechanism)
    salt_, stored, server, i = m.make_auth_info(password.decode("utf-8"), iteration_count=iterations, salt=salt)
    return ScramSecret(salt_, stored, server, i)


def cram_md5_digest(secret: bytes, challenge: bytes) -> str:
    return hmac.new(secret, challenge, hashlib.md5).hexdigest()


__all__ = [
    "ALL_MECHANISMS", "CHANNEL_BINDING", "CLEARTEXT_MECHANISMS", "DEFAULT_MECHANISMS", "SCRAM_MECHANISMS",
    "Challenge", "CramMd5", "External", "Fail", "Finish", "Login", "Mechanism", "NeedScramSecret", "Plain",
    "Scram", "Step", "cram_md5_digest", "make_mechanism", "offered_mechanisms", "scram_secret_from_password",
]
