"""Users given in code: the embedding and test-suite authenticator.

Secrets are held in clear (they come from the caller's own code), which
also makes APOP work for every user.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..maildrop.location import DEFAULT_LOCATION, expand_location
from . import Authenticator, Principal, QuickAuthenticator, ScramSecretSource
from .credentials import Credentials, ScramSecret, Verified
from .sasl import scram_secret_from_password
from .secrets import matches_secret


class StaticAuthenticator(Authenticator, QuickAuthenticator, ScramSecretSource):
    """Users and clear passwords given as a mapping; each user's maildrop is
    `mail_location` expanded for them (and `home`, where %u is the name)."""

    def __init__(
        self, users: Mapping[str, str], mail_location: str = DEFAULT_LOCATION, home: str | None = None
    ) -> None:
        self._users = {name: secret.encode("utf-8") for name, secret in users.items()}
        self.mail_location = mail_location
        self.home = home

    def authenticate(self, credentials: Credentials) -> Principal | None:
        secret = self._users.get(credentials.user)
        if secret is None:
            return None
        if not (isinstance(credentials, Verified) or matches_secret(secret, credentials)):
            return None
        home = self.home.replace("%u", credentials.user) if self.home else None
        return Principal(credentials.user, expand_location(self.mail_location, credentials.user, home), home)

    def authenticate_quickly(self, credentials: Credentials) -> Principal | None:
        # Everything is in memory; clear secrets cost no hashing.
        return self.authenticate(credentials)

    def scram_secret(self, user: str, mechanism: str) -> ScramSecret | None:
        secret = self._users.get(user)
        return scram_secret_from_password(secret, mechanism) if secret is not None else None
