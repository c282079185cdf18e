"""The Maildrop contract, run against Maildir."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import write_maildir_message
from maildrop_contract import Deliver, MaildropContract, MakeLocation


class TestMaildirContract(MaildropContract):
    @pytest.fixture
    def make_location(self, tmp_path: Path) -> MakeLocation:
        def make(messages: list[bytes]) -> str:
            maildir = tmp_path / "Maildir"
            for m in messages:
                write_maildir_message(maildir, m)
            for d in ("cur", "new", "tmp"):
                (maildir / d).mkdir(parents=True, exist_ok=True)
            return f"maildir:{maildir}"

        return make

    @pytest.fixture
    def deliver(self) -> Deliver:
        def deliver(location: str, message: bytes) -> None:
            write_maildir_message(Path(location.partition(":")[2]), message)

        return deliver
