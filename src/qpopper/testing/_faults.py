"""Scripted faults: what a test asks the server to get wrong, and for whom.

A `Fault` names one misbehaviour (`kind`), optionally for one user only,
and for how many sessions (None: every session until cleared). A
`FaultPlan` holds the faults of one test server; the parts that act on
them (the store's login and listing, the stream proxy) ask it with
`take`, which counts a session off the fault that applies. Everything is
decided by the order of sessions and bytes, never by chance or by time
(except `throttle`, whose whole point is time).

Where each kind acts:

==================== =========================================================
kind                 what the client sees
==================== =========================================================
login                its login answered ``-ERR [code]`` (code: IN-USE,
                     LOGIN-DELAY, SYS/TEMP or AUTH); the maildrop is untouched
drop-retr            the connection closed after `bytes` octets of a RETR reply
drop-multiline       the same after `bytes` octets of any multi-line reply
                     (LIST, UIDL, TOP, RETR, CAPA)
throttle             every reply at no more than `bytes` octets per second
list-size            LIST (and STAT) sizes off by `delta` from what RETR sends
uidl-changes         UIDs that differ in each session
tls-fail             the TLS handshake fails (implicit TLS, and after STLS's +OK)
no-apop-stamp        a greeting without the APOP <stamp>
drop-before-update   QUIT never reaches the server: the connection closes,
                     no +OK, nothing deleted
==================== =========================================================

Stream faults (drop-*, throttle, tls-fail, no-apop-stamp, drop-before-update)
are done by a proxy in front of the server, so the production stream
carries no fault code; a per-user stream fault applies from the client's
USER or APOP line on (a SASL login's user is not seen by the proxy).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ResponseCode

KINDS = (
    "login",
    "drop-retr",
    "drop-multiline",
    "throttle",
    "list-size",
    "uidl-changes",
    "tls-fail",
    "no-apop-stamp",
    "drop-before-update",
)
# Faults that act before any user is known (the greeting, a TLS handshake).
_BEFORE_LOGIN = ("tls-fail", "no-apop-stamp")
FAULT_KINDS = KINDS  # the name qpopper.testing exports
LOGIN_CODES = tuple(code.value for code in ResponseCode if code is not ResponseCode.SYS_PERM)


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour (see the module's table for the kinds).

    `user`: only that user's sessions (None: anyone's). `sessions`: how
    many sessions it spoils before it is used up (None: all). `code`: the
    response code of a login fault. `bytes`: the octets a drop lets
    through, or a throttle's rate per second. `delta`: a list-size fault's
    error in octets."""

    kind: str
    user: str | None = None
    sessions: int | None = None
    code: str = "IN-USE"
    bytes: int = 0
    delta: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; known: {', '.join(KINDS)}")
        if self.kind == "login" and self.code not in LOGIN_CODES:
            raise ValueError(f"a login fault's code is one of {', '.join(LOGIN_CODES)}, not {self.code!r}")
        if self.user is not None and self.kind in _BEFORE_LOGIN:
            raise ValueError(f"a {self.kind} fault acts before the client names a user: give no user")
        if self.sessions is not None and self.sessions < 1:
            raise ValueError("sessions is at least 1 (or None for every session)")
        if self.bytes < 0 or (self.kind == "throttle" and self.bytes < 1):
            raise ValueError("bytes must be positive for a throttle and not negative otherwise")

    def to_json(self) -> dict[str, Any]:
        """The fault as the standalone API shows it."""
        return asdict(self)


class FaultPlan:
    """The faults of one server, consulted as sessions run; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[list[Any]] = []  # [fault, sessions left or None]

    def add(self, fault: Fault) -> Fault:
        """Schedule `fault`; returns it."""
        with self._lock:
            self._faults.append([fault, fault.sessions])
        return fault

    def clear(self) -> None:
        """Remove every fault."""
        with self._lock:
            self._faults.clear()

    def active(self) -> list[Fault]:
        """The faults not used up yet."""
        with self._lock:
            return [entry[0] for entry in self._faults]

    def __bool__(self) -> bool:
        return bool(self._faults)

    def take(self, kind: str, user: str | None, codes: tuple[str, ...] | None = None) -> Fault | None:
        """The first fault of `kind` for `user` (a fault without a user
        applies to anyone, one with a user only once that user is known),
        of one of `codes` if given, counted as used by one session; None
        if none applies."""
        if not self._faults:
            return None
        with self._lock:
            for entry in self._faults:
                fault: Fault = entry[0]
                if (
                    fault.kind == kind
                    and (fault.user is None or fault.user == user)
                    and (codes is None or fault.code in codes)
                ):
                    if entry[1] is not None:
                        entry[1] -= 1
                        if entry[1] <= 0:
                            self._faults.remove(entry)
                    return fault
        return None
