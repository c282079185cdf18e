"""The test server's users and mailboxes, and the faults they act out.

`TestStore` is the in-memory store with the faults that belong to the
mail (a login refused with a response code, misstated sizes, UIDs that
change); `StoreUsers` is its authenticator: users with clear passwords,
so USER/PASS, APOP, CRAM-MD5 and SCRAM all work from one password.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..auth import Authenticator, Principal, QuickAuthenticator, ScramSecretSource
from ..auth.credentials import Credentials, ScramSecret, Verified
from ..auth.sasl import scram_secret_from_password
from ..auth.secrets import matches_secret
from ..errors import MaildropError, ResponseCode
from ..maildrop.memory import MemoryMaildrop, MemoryStore
from ._faults import LOGIN_CODES, FaultPlan

# The login faults the maildrop's opening answers (AUTH is the authenticator's).
_OPEN_CODES = tuple(code for code in LOGIN_CODES if code != ResponseCode.AUTH.value)


@dataclass(frozen=True)
class MailboxState:
    """What a user's mailbox holds now and what sessions did to it.

    `messages`: the stored bytes left (after the last UPDATE, plus any
    delivered since); `retrieved` and `deleted`: every message sent whole
    by RETR in a session that reached UPDATE, and every one UPDATE
    removed, in order. `sessions`: maildrops opened; `updates`: QUITs
    that reached UPDATE."""

    messages: list[bytes]
    uids: list[str]
    retrieved: list[bytes]
    deleted: list[bytes]
    sessions: int
    updates: int


class TestStore(MemoryStore):
    """A MemoryStore whose `open` acts out the plan's mail faults."""

    __test__ = False  # not a pytest test class

    def __init__(self, faults: FaultPlan) -> None:
        super().__init__()
        self.faults = faults
        self._opened: dict[str, int] = {}

    def open(self, user: str, size_delta: int = 0, uid_suffix: str = "") -> MemoryMaildrop:
        """Open `user`'s mailbox, or refuse it as a login fault says."""
        faults = self.faults
        if faults:
            login = faults.take("login", user, _OPEN_CODES)
            if login is not None:
                raise MaildropError(f"scripted fault: {login.code}", ResponseCode(login.code))
            size = faults.take("list-size", user)
            if size is not None:
                size_delta = size.delta
            if faults.take("uidl-changes", user) is not None:
                with self.condition:
                    self._opened[user] = self._opened.get(user, 0) + 1
                    uid_suffix = f".s{self._opened[user]}"
        return super().open(user, size_delta, uid_suffix)

    def state(self, user: str) -> MailboxState:
        """A copy of `user`'s mailbox and its record."""
        with self.condition:
            box = self.mailbox(user)
            return MailboxState(
                [m.data for m in box.messages],
                [m.uid for m in box.messages],
                list(box.retrieved),
                list(box.deleted),
                box.sessions,
                box.updates,
            )


class StoreUsers(Authenticator, QuickAuthenticator, ScramSecretSource):
    """Users with clear passwords whose maildrops are in a TestStore."""

    def __init__(self, store: TestStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._passwords: dict[str, bytes] = {}

    def add(self, user: str, password: str) -> None:
        """Create (or re-password) `user`, with an empty mailbox."""
        with self._lock:
            self._passwords[user] = password.encode("utf-8")
        self.store.mailbox(user)

    def remove(self, user: str) -> None:
        """Remove `user` and their mailbox."""
        with self._lock:
            self._passwords.pop(user, None)
        self.store.remove(user)

    def clear(self) -> None:
        """Remove every user."""
        with self._lock:
            self._passwords.clear()

    def names(self) -> list[str]:
        """The users, in creation order."""
        with self._lock:
            return list(self._passwords)

    def authenticate(self, credentials: Credentials) -> Principal | None:
        """The principal for right credentials; None (-ERR [AUTH]) otherwise
        or where a login fault with code AUTH applies."""
        with self._lock:
            secret = self._passwords.get(credentials.user)
        if secret is None:
            return None
        if not (isinstance(credentials, Verified) or matches_secret(secret, credentials)):
            return None
        faults = self.store.faults
        if faults and faults.take("login", credentials.user, (ResponseCode.AUTH.value,)) is not None:
            return None
        return Principal(credentials.user, self.store.location(credentials.user))

    def authenticate_quickly(self, credentials: Credentials) -> Principal | None:
        """All in memory: answered on the event loop, unless faults are
        scheduled (then `authenticate` decides, and counts them)."""
        if self.store.faults:
            return None
        return self.authenticate(credentials)

    def scram_secret(self, user: str, mechanism: str) -> ScramSecret | None:
        """The SCRAM secret derived from `user`'s password."""
        with self._lock:
            secret = self._passwords.get(user)
        return scram_secret_from_password(secret, mechanism) if secret is not None else None
