"""Kerberos 5 logins: the SASL GSSAPI mechanism (RFC 4752), qpopper's -k.

The exchange: GSS-API context tokens until the acceptor's context is
complete; then the server sends a wrapped 4-octet offer (we offer "no
security layer", bitmask 1, maximum size 0) and the client answers with a
wrapped choice plus an optional authorisation identity. The Kerberos
principal maps to a local user: `user@REALM` becomes `user` when REALM is
one of the configured realms (by default the default realm), and any
other principal is refused. An authorisation identity, if given, must be
that same user.

Accepting a context reads the keytab, so the server runs these steps in a
worker thread (the mechanism says so with `offload`) rather than in the
protocol core.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from ..usernames import is_valid_username
from .credentials import Rejected, Verified
from .sasl_types import Challenge, Fail, Finish, Mechanism, Step

log = logging.getLogger("qpopper.auth")

NO_SECURITY_LAYER = 1


@dataclass
class KerberosAcceptor:
    """The server's Kerberos identity: service name, keytab, realms."""

    service: str = "pop"
    hostname: str = "localhost"
    keytab: str | None = None
    realms: tuple[str, ...] = ()
    _creds: Any = field(default=None, repr=False)

    def credentials(self) -> Any:
        """Acceptor credentials, made once (fails early on a bad keytab)."""
        if self._creds is None:
            import gssapi

            name = gssapi.Name(f"{self.service}@{self.hostname}", gssapi.NameType.hostbased_service)
            store: dict[bytes | str, bytes | str] | None = {"keytab": self.keytab} if self.keytab else None
            self._creds = gssapi.Credentials(usage="accept", name=name, store=store)
        return self._creds

    def local_user(self, principal: str) -> str | None:
        """`user@REALM` -> `user` for the realms we serve, else None."""
        name, sep, realm = principal.rpartition("@")
        if not sep or "/" in name:
            return None
        realms = self.realms or (default_realm(),)
        if realm not in realms:
            return None
        return name if is_valid_username(name) else None


def default_realm() -> str:
    """libdefaults' default_realm from the Kerberos configuration."""
    return _realm_from_config()


def _realm_from_config() -> str:
    path = os.environ.get("KRB5_CONFIG", "/etc/krb5.conf").split(":")[0]
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition("=")
                if key.strip() == "default_realm":
                    return value.strip()
    except OSError:
        pass
    return ""


class Gssapi(Mechanism):
    name = "GSSAPI"
    offload = True  # context steps read the keytab: not in the protocol core

    def __init__(self, acceptor: KerberosAcceptor) -> None:
        self._acceptor = acceptor
        self._context: Any = None
        self._user: str | None = None
        self._stage = "context"

    def start(self, initial: bytes | None) -> Step:
        if initial is None or initial == b"":
            return Challenge(b"")
        return self.step(initial)

    def step(self, response: bytes) -> Step:
        import gssapi
        import gssapi.raw.misc

        try:
            if self._stage == "context":
                if self._context is None:
                    self._context = gssapi.SecurityContext(creds=self._acceptor.credentials(), usage="accept")
                token = self._context.step(response)
                if not self._context.complete:
                    return Challenge(token or b"")
                principal = str(self._context.initiator_name)
                self._user = self._acceptor.local_user(principal)
                if self._user is None:
                    log.info("GSSAPI: principal %s maps to no local user", principal)
                    return Finish(Rejected(principal.partition("@")[0][:64] or "unknown", self.name))
                if token:
                    self._stage = "token-sent"
                    return Challenge(token)
                return self._offer()
            if self._stage == "token-sent":
                return self._offer()
            if self._stage == "offered":
                choice = self._context.unwrap(response).message
                if len(choice) < 4 or not choice[0] & NO_SECURITY_LAYER:
                    return Fail("GSSAPI: the client asked for a security layer")
                authzid = choice[4:].decode("utf-8", "replace")
                assert self._user is not None
                if authzid and authzid != self._user:
                    return Finish(Rejected(self._user, self.name))
                return Finish(Verified(self._user, self.name))
        except gssapi.raw.misc.GSSError as exc:
            log.info("GSSAPI exchange failed: %s", exc)
            return Fail("GSSAPI exchange failed")
        return Fail("GSSAPI exchange out of order")

    def _offer(self) -> Step:
        self._stage = "offered"
        return Challenge(self._context.wrap(bytes([NO_SECURITY_LAYER, 0, 0, 0]), False).message)
