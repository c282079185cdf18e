"""An in-memory maildrop, for tests: mail that never touches a disk.

A `MemoryStore` holds the mailboxes of one test server; its location
template is "memory:/<store id>/%u", so the store is found again from a
principal's expanded location as any backend's files are. Stores are
registered weakly by id: a store nobody holds any more is gone, and a
location naming it is refused like a missing path.

The store also keeps what each session did: the messages a client
retrieved whole and those it deleted at UPDATE, and wakes anyone waiting
for them (`wait_until`), so a test waits on an event instead of polling.
Everything happens under one lock; no call blocks but `wait_until`.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from ..errors import MaildropBusy, MaildropError, ResponseCode
from ..wiresize import wire_size
from ._base import MessageList, is_valid_uid

_stores: weakref.WeakValueDictionary[str, MemoryStore] = weakref.WeakValueDictionary()
_store_ids = itertools.count(1)


@dataclass(eq=False, slots=True)
class StoredMessage:
    """One message as stored: its bytes (LF or CRLF line ends), its UID and
    whether a session retrieved it whole."""

    data: bytes
    uid: str
    seen: bool = False


@dataclass(eq=False, slots=True)
class Mailbox:
    """One user's messages and the record of what sessions did to them."""

    messages: list[StoredMessage] = field(default_factory=list)
    locked: bool = False
    # In the order it happened, over every session since the last reset.
    retrieved: list[bytes] = field(default_factory=list)
    deleted: list[bytes] = field(default_factory=list)
    sessions: int = 0  # maildrops opened (logins that got as far as the mail)
    updates: int = 0  # UPDATE states completed (QUIT after a login)


class MemoryStore:
    """The mailboxes of one test server, addressed by user name."""

    def __init__(self) -> None:
        self.id = f"store{next(_store_ids)}"
        self.condition = threading.Condition()
        self._mailboxes: dict[str, Mailbox] = {}
        self._uids = itertools.count(1)
        _stores[self.id] = self

    @property
    def location_template(self) -> str:
        """The maildrop location template that names this store's mailboxes."""
        return f"memory:/{self.id}/%u"

    def location(self, user: str) -> str:
        """The expanded location of `user`'s mailbox."""
        return f"memory:/{self.id}/{user}"

    def mailbox(self, user: str) -> Mailbox:
        """`user`'s mailbox, created empty if it did not exist."""
        with self.condition:
            return self._mailboxes.setdefault(user, Mailbox())

    def users(self) -> list[str]:
        """The users that have a mailbox, in creation order."""
        with self.condition:
            return list(self._mailboxes)

    def remove(self, user: str) -> None:
        """Forget `user`'s mailbox (an open session keeps its snapshot)."""
        with self.condition:
            self._mailboxes.pop(user, None)
            self.condition.notify_all()

    def reset(self) -> None:
        """Forget every mailbox and record."""
        with self.condition:
            self._mailboxes.clear()
            self.condition.notify_all()

    def deliver(self, user: str, data: bytes, uid: str | None = None) -> str:
        """Append a message to `user`'s mailbox; returns its UID. `uid`
        must be fit for UIDL (1 to 70 printable characters)."""
        if uid is not None and not is_valid_uid(uid):
            raise MaildropError(f"unusable UID {uid!r}", ResponseCode.SYS_PERM)
        with self.condition:
            if uid is None:
                uid = f"{self.id}.{next(self._uids)}"
            self._mailboxes.setdefault(user, Mailbox()).messages.append(StoredMessage(bytes(data), uid))
            self.condition.notify_all()
        return uid

    def open(self, user: str, size_delta: int = 0, uid_suffix: str = "") -> MemoryMaildrop:
        """Open and POP-lock `user`'s mailbox (MaildropBusy if a session
        holds it); the other arguments are MemoryMaildrop's."""
        with self.condition:
            box = self._mailboxes.setdefault(user, Mailbox())
            if box.locked:
                raise MaildropBusy()
            box.locked = True
            box.sessions += 1
            self.condition.notify_all()
            return MemoryMaildrop(self, box, list(box.messages), size_delta, uid_suffix)

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until `predicate()` (called under the store's lock) is true;
        False if `timeout` seconds passed first. Woken by every change."""
        with self.condition:
            return self.condition.wait_for(predicate, timeout)


class MemoryMaildrop:
    """An open session on a `Mailbox`: the snapshot taken at login."""

    def __init__(
        self, store: MemoryStore, box: Mailbox, snapshot: list[StoredMessage], size_delta: int = 0, uid_suffix: str = ""
    ) -> None:
        """`size_delta` and `uid_suffix` misstate sizes and UIDs on purpose
        (qpopper.testing's faults); a store opens with neither."""
        self._store = store
        self._box = box
        self._snapshot = snapshot
        self._open = True
        self._list = MessageList(
            [max(0, wire_size(m.data) + size_delta) for m in snapshot],
            [(m.uid + uid_suffix)[-70:] for m in snapshot] if uid_suffix else [m.uid for m in snapshot],
            [m.seen for m in snapshot],
        )

    def messages(self) -> MessageList:
        """The messages as they were at login."""
        return self._list

    def read(self, index: int, chunk_size: int = 65536) -> Iterator[bytes]:
        """The stored bytes of message `index`, in chunks of `chunk_size`."""
        data = self._snapshot[index].data
        for start in range(0, len(data), chunk_size):
            yield data[start : start + chunk_size]

    def commit(self, deleted: AbstractSet[int], retrieved: AbstractSet[int]) -> None:
        """UPDATE: remove exactly the `deleted`, mark the `retrieved` seen,
        and record both for the test."""
        with self._store.condition:
            gone = {id(self._snapshot[i]) for i in deleted}
            for i in sorted(retrieved):
                self._snapshot[i].seen = True
                self._box.retrieved.append(self._snapshot[i].data)
            self._box.deleted.extend(self._snapshot[i].data for i in sorted(deleted))
            self._box.messages = [m for m in self._box.messages if id(m) not in gone]
            self._box.updates += 1
            self._store.condition.notify_all()

    def writes_nothing(self, deleted: AbstractSet[int], retrieved: AbstractSet[int]) -> bool:
        """Always: memory work is quick enough for the event loop."""
        return True

    def close(self) -> None:
        """Release the POP lock; idempotent."""
        with self._store.condition:
            if self._open:
                self._open = False
                self._box.locked = False
                self._store.condition.notify_all()


def _split(path: str) -> tuple[MemoryStore, str]:
    store_id, _, user = path.lstrip("/").partition("/")
    store = _stores.get(store_id)
    if store is None or not user:
        raise MaildropError(f"no in-memory store for {path!r}", ResponseCode.SYS_PERM)
    return store, user


def open_memory(path: str) -> MemoryMaildrop:
    """The maildrop at "memory:<path>" (path: /<store id>/<user>)."""
    store, user = _split(path)
    return store.open(user)


def deliver_to_memory(path: str, message: bytes, uid: str | None = None) -> str:
    """Deliver into the mailbox at "memory:<path>"; returns the location."""
    store, user = _split(path)
    store.deliver(user, message, uid)
    return f"memory:{path}"
