"""The Maildrop contract, run against mbox spools written like postfix/procmail."""

from __future__ import annotations

from pathlib import Path

import pytest

from maildrop_contract import Deliver, MaildropContract, MakeLocation
from mbox_helpers import deliver as deliver_locked
from mbox_helpers import mbox


class TestMboxContract(MaildropContract):
    @pytest.fixture
    def make_location(self, tmp_path: Path) -> MakeLocation:
        def make(messages: list[bytes]) -> str:
            spool = tmp_path / "mail" / "alice"
            spool.parent.mkdir(parents=True, exist_ok=True)
            spool.write_bytes(mbox(messages))
            return f"mbox:{spool}"

        return make

    @pytest.fixture
    def deliver(self) -> Deliver:
        counter = iter(range(1000, 10**6))

        def deliver(location: str, message: bytes) -> None:
            deliver_locked(location.partition(":")[2], message, next(counter))

        return deliver


class TestMboxTempDropContract(TestMboxContract):
    """The same contract in qpopper's temp-drop mode (with fast_update off and on)."""

    @pytest.fixture(autouse=True, params=[False, True], ids=["copy", "fast"])
    def temp_drop_mode(self, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
        import maildrop_contract
        from qpopper.maildrop import MaildropSettings
        from qpopper.maildrop.location import open_maildrop

        settings = MaildropSettings(server_mode=False, fast_update=request.param)
        monkeypatch.setattr(maildrop_contract, "open_maildrop", lambda location: open_maildrop(location, settings))
