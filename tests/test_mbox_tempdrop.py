"""Temp-drop mode (qpopper's `.USER.pop`): move at login, put back at UPDATE, crash recovery."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from mbox_helpers import deliver, entry, mbox, number_of, numbered
from qpopper.errors import MaildropError
from qpopper.maildrop import MaildropSettings
from qpopper.maildrop.mbox import (
    MboxMaildrop,
    gather_journal_path,
    new_spool_path,
    putback_flag_path,
    temp_drop_path,
)

TEMP = MaildropSettings(server_mode=False)
FAST = MaildropSettings(server_mode=False, fast_update=True)
SERVER = MaildropSettings(server_mode=True)


def make(tmp_path: Path, numbers: list[int], mode: int = 0o600) -> str:
    spool = tmp_path / "alice"
    spool.write_bytes(b"".join(entry(numbered(k), k) for k in numbers))
    os.chmod(spool, mode)
    return str(spool)


def numbers(spool: str, s: MaildropSettings = TEMP) -> list[int]:
    md = MboxMaildrop(spool, s)
    try:
        return [number_of(b"".join(md.read(i))) for i in range(len(md.messages()))]
    finally:
        md.close()


def tdrop(spool: str, s: MaildropSettings = TEMP) -> str:
    return temp_drop_path(spool, s)


@pytest.mark.parametrize("s", [TEMP, FAST], ids=["copy", "fast"])
def test_login_moves_the_spool_and_update_puts_back(tmp_path: Path, s: MaildropSettings) -> None:
    spool = make(tmp_path, [1, 2, 3, 4], mode=0o640)
    original = Path(spool).read_bytes()
    server_view = MboxMaildrop(spool, SERVER)
    expected = [(m.size, m.uid) for m in server_view.messages()]
    server_view.close()
    md = MboxMaildrop(spool, s)
    assert [(m.size, m.uid) for m in md.messages()] == expected
    assert Path(spool).read_bytes() == b""  # the spool is free for new mail
    assert Path(tdrop(spool)).read_bytes() == original
    deliver(spool, numbered(5), 5)
    assert len(md.messages()) == 4
    md.commit({0, 2}, set())
    md.close()
    assert numbers(spool, SERVER) == [2, 4, 5]
    assert not os.path.exists(tdrop(spool))
    assert os.stat(spool).st_mode & 0o777 == 0o640
    for leftover in (new_spool_path(spool), putback_flag_path(spool), gather_journal_path(tdrop(spool))):
        assert not os.path.exists(leftover)


def test_session_without_update_puts_everything_back_unchanged(tmp_path: Path) -> None:
    spool = make(tmp_path, [1, 2, 3])
    original = Path(spool).read_bytes()
    md = MboxMaildrop(spool, TEMP)
    md.close()  # no QUIT: qpopper's restore
    assert Path(spool).read_bytes() == original
    assert not os.path.exists(tdrop(spool))


def test_nothing_deleted_still_returns_mail_and_new_mail_follows(tmp_path: Path) -> None:
    spool = make(tmp_path, [1, 2])
    md = MboxMaildrop(spool, TEMP)
    deliver(spool, numbered(3), 3)
    md.commit(set(), set())
    md.close()
    assert Path(spool).read_bytes() == entry(numbered(1), 1) + entry(numbered(2), 2) + entry(numbered(3), 3)


def test_all_deleted_leaves_the_spool_alone(tmp_path: Path) -> None:
    spool = make(tmp_path, [1, 2])
    md = MboxMaildrop(spool, TEMP)
    ino = os.stat(spool).st_ino
    md.commit({0, 1}, set())
    md.close()
    assert os.stat(spool).st_ino == ino and Path(spool).read_bytes() == b""
    assert not os.path.exists(tdrop(spool))


def test_fast_update_renames_both_ways(tmp_path: Path) -> None:
    spool = make(tmp_path, [1, 2], mode=0o660)
    ino = os.stat(spool).st_ino
    md = MboxMaildrop(spool, FAST)
    assert os.stat(tdrop(spool)).st_ino == ino  # moved, not copied
    assert Path(spool).read_bytes() == b"" and os.stat(spool).st_mode & 0o777 == 0o660
    md.commit(set(), set())
    md.close()
    assert os.stat(spool).st_ino == ino  # and back again
    assert os.stat(spool).st_mode & 0o777 == 0o660
    assert numbers(spool, SERVER) == [1, 2]


def test_keep_temp_drop_leaves_it_empty(tmp_path: Path) -> None:
    spool = make(tmp_path, [1, 2])
    s = MaildropSettings(server_mode=False, keep_temp_drop=True)
    md = MboxMaildrop(spool, s)
    md.commit({0}, set())
    md.close()
    assert os.path.getsize(tdrop(spool)) == 0
    assert numbers(spool, s) == [2]
    assert numbers(spool, SERVER) == [2]


def test_temp_dir_elsewhere(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    (tmp_path / "tmp").mkdir()
    spool = make(tmp_path / "spool", [1, 2, 3])
    for s in (
        MaildropSettings(server_mode=False, temp_dir=str(tmp_path / "tmp"), temp_name="%s.pop"),
        MaildropSettings(server_mode=False, temp_dir=str(tmp_path / "tmp"), temp_name="%s.pop", fast_update=True),
    ):
        md = MboxMaildrop(spool, s)
        assert os.path.exists(tmp_path / "tmp" / "alice.pop")
        md.commit({0}, set())
        md.close()
        assert not os.path.exists(tmp_path / "tmp" / "alice.pop")
    assert numbers(spool, SERVER) == [3]


def test_missing_temp_dir_is_an_error_that_keeps_mail(tmp_path: Path) -> None:
    spool = make(tmp_path, [1])
    with pytest.raises(MaildropError):
        MboxMaildrop(spool, MaildropSettings(server_mode=False, temp_dir=str(tmp_path / "nope")))
    assert numbers(spool, SERVER) == [1]


def test_temp_drop_of_a_dead_session_comes_first(tmp_path: Path) -> None:
    spool = make(tmp_path, [3, 4])
    Path(tdrop(spool)).write_bytes(mbox([numbered(1), numbered(2)])[:-1])  # no final empty line
    assert numbers(spool) == [1, 2, 3, 4]
    assert numbers(spool, SERVER) == [1, 2, 3, 4]
    assert not os.path.exists(tdrop(spool))


def test_server_mode_puts_a_leftover_temp_drop_back(tmp_path: Path) -> None:
    spool = make(tmp_path, [3])
    Path(tdrop(spool)).write_bytes(mbox([numbered(1), numbered(2)]))
    md = MboxMaildrop(spool, SERVER)
    assert [number_of(b"".join(md.read(i))) for i in range(3)] == [1, 2, 3]
    md.close()
    assert not os.path.exists(tdrop(spool))


def test_missing_spool_and_empty_maildrop(tmp_path: Path) -> None:
    spool = str(tmp_path / "nobody")
    md = MboxMaildrop(spool, TEMP)
    assert list(md.messages()) == []
    deliver(spool, numbered(1), 1)
    md.commit(set(), set())
    md.close()
    assert numbers(spool, SERVER) == [1]


@pytest.mark.parametrize("failing", ["fsync", "copy_file_range", "rename"])
def test_write_errors_at_update_keep_every_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    spool = make(tmp_path, [1, 2, 3])
    md = MboxMaildrop(spool, TEMP)
    deliver(spool, numbered(4), 4)

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EDQUOT if failing == "fsync" else errno.EIO, "injected")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(MaildropError):
        md.commit({0}, set())
    md.close()  # the restore fails too while the fault lasts
    monkeypatch.undo()
    assert not os.path.exists(new_spool_path(spool))
    assert numbers(spool) == [1, 2, 3, 4]  # the next login takes the temp drop back
    assert numbers(spool, SERVER) == [1, 2, 3, 4]


def test_copy_error_at_login_keeps_mail_in_the_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = make(tmp_path, [1, 2])
    original = Path(spool).read_bytes()

    def boom(*args: object) -> None:
        raise OSError(errno.ENOSPC, "injected")

    monkeypatch.setattr(os, "pwrite", boom)
    with pytest.raises(MaildropError):
        MboxMaildrop(spool, TEMP)
    monkeypatch.undo()
    assert Path(spool).read_bytes() == original
    assert os.path.getsize(tdrop(spool)) == 0
    assert numbers(spool) == [1, 2]


# ---- recovery from each crash point (the states a kill -9 can leave) -----------------


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=32).hexdigest()


@pytest.mark.parametrize("appended", ["nothing", "half", "all"])
def test_killed_while_appending_to_temp_drop(tmp_path: Path, appended: str) -> None:
    spool = make(tmp_path, [3, 4])
    old = mbox([numbered(1), numbered(2)])
    data = Path(spool).read_bytes()
    part = {"nothing": b"", "half": data[: len(data) // 2], "all": data}[appended]
    Path(tdrop(spool)).write_bytes(old + part)
    Path(gather_journal_path(tdrop(spool))).write_bytes(b"%d\n" % len(old))
    assert numbers(spool) == [1, 2, 3, 4]


@pytest.mark.parametrize("spool_emptied", [False, True])
def test_killed_around_the_spool_truncation(tmp_path: Path, spool_emptied: bool) -> None:
    spool = make(tmp_path, [1, 2])
    data = Path(spool).read_bytes()
    Path(tdrop(spool)).write_bytes(data)
    Path(gather_journal_path(tdrop(spool))).write_bytes(b"0 %d %s\n" % (len(data), digest(data).encode()))
    if spool_emptied:
        Path(spool).write_bytes(b"")
        deliver(spool, numbered(3), 3)  # and mail came in before the next login
    assert numbers(spool) == ([1, 2, 3] if spool_emptied else [1, 2])
    assert not os.path.exists(gather_journal_path(tdrop(spool)))


@pytest.mark.parametrize("renamed", [False, True])
def test_killed_around_the_put_back_rename(tmp_path: Path, renamed: bool) -> None:
    spool = make(tmp_path, [5])  # new mail that arrived during the session
    kept = mbox([numbered(1), numbered(2)])
    Path(tdrop(spool)).write_bytes(kept)
    new = kept + Path(spool).read_bytes()
    Path(new_spool_path(spool)).write_bytes(new)
    Path(putback_flag_path(spool)).write_bytes(b"")
    if renamed:
        os.rename(new_spool_path(spool), spool)
    for s in (SERVER, TEMP):
        # Either mode finishes or undoes it, with every message exactly once.
        assert numbers(spool, s) == [1, 2, 5]
    assert not os.path.exists(putback_flag_path(spool)) and not os.path.exists(new_spool_path(spool))


def test_damaged_journal_refuses_rather_than_guesses(tmp_path: Path) -> None:
    spool = make(tmp_path, [1])
    Path(tdrop(spool)).write_bytes(mbox([numbered(2)]))
    Path(gather_journal_path(tdrop(spool))).write_bytes(b"garbage")
    with pytest.raises(MaildropError):
        MboxMaildrop(spool, TEMP)
