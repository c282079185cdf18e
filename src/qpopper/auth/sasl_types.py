"""The shapes every SASL mechanism shares: the mechanism interface and the
steps it answers with.

They live apart from the mechanisms themselves (auth/sasl.py, and
auth/gssapi_mech.py for Kerberos) so that each mechanism module imports
this one and none imports another. auth/sasl.py re-exports every name.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from .credentials import Credentials, ScramSecret


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send this (before base64) to the client and wait for its answer."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Finish:
    """The exchange is over: check these credentials like a password."""

    credentials: Credentials = field(repr=False)


@dataclass(frozen=True, slots=True)
class NeedScramSecret:
    """Look up the user's stored SCRAM secret and hand it to `Mechanism.secret`."""

    user: str
    mechanism: str


@dataclass(frozen=True, slots=True)
class Fail:
    """The exchange is malformed (not a credential failure)."""

    reason: str


Step = Challenge | Finish | NeedScramSecret | Fail


class Mechanism(abc.ABC):
    """One exchange of one mechanism, fed the client's decoded responses."""

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


__all__ = ["Challenge", "Fail", "Finish", "Mechanism", "NeedScramSecret", "Step"]
