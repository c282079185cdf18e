"""What a client presented to log in, as plain values.

The protocol core builds these and the authenticators consume them; neither
side needs the other's code. `repr` never shows a secret, so a credential can
appear in a log record or a traceback without leaking.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class UserPass:
    """USER/PASS (and later SASL PLAIN/LOGIN): a name and a clear password."""

    user: str
    password: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class ApopDigest:
    """APOP: MD5 over the greeting's timestamp followed by the shared secret."""

    user: str
    timestamp: str
    digest: str = field(repr=False)  # 32 lower-case hex digits


@dataclass(frozen=True, slots=True)
class CramMD5:
    """SASL CRAM-MD5 (RFC 2195): HMAC-MD5 of the challenge keyed by the secret."""

    user: str
    challenge: bytes
    digest: str = field(repr=False)  # 32 lower-case hex digits


@dataclass(frozen=True, slots=True)
class Verified:
    """A SASL mechanism (SCRAM) proved the user's identity itself; the
    authenticator only has to say whether the user may log in and where
    their maildrop is."""

    user: str
    mechanism: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """A SASL exchange failed on the user's credentials. It goes through the
    same path as a wrong password, so it costs the same delay and logging."""

    user: str
    mechanism: str


Credentials = UserPass | ApopDigest | CramMD5 | Verified | Rejected


@dataclass(frozen=True, slots=True)
class ScramSecret:
    """What a server stores for SCRAM (RFC 5802): enough to check a proof,
    not enough to log in elsewhere with."""

    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)
    iterations: int
