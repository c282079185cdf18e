"""The Maildrop contract, run against the in-memory maildrop of qpopper.testing."""

from __future__ import annotations

import pytest

from maildrop_contract import Deliver, MaildropContract, MakeLocation
from qpopper.maildrop.memory import MemoryStore


class TestMemoryContract(MaildropContract):
    @pytest.fixture
    def store(self) -> MemoryStore:
        return MemoryStore()

    @pytest.fixture
    def make_location(self, store: MemoryStore) -> MakeLocation:
        def make(messages: list[bytes]) -> str:
            store.mailbox("user")
            for m in messages:
                store.deliver("user", m)
            return store.location("user")

        return make

    @pytest.fixture
    def deliver(self, store: MemoryStore) -> Deliver:
        def deliver(location: str, message: bytes) -> None:
            store.deliver(location.rpartition("/")[2], message)

        return deliver


def test_a_location_of_a_store_that_is_gone_is_refused() -> None:
    from qpopper.errors import MaildropError
    from qpopper.maildrop.location import open_maildrop

    location = MemoryStore().location("user")  # the store is dropped at once
    with pytest.raises(MaildropError):
        open_maildrop(location)
