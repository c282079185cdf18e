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


Credentials = UserPass | ApopDigest
