"""UPDATE of mbox spools: copy and rename, new mail kept, refusals that save mail."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from mbox_helpers import deliver, entry, mbox, number_of, numbered, stored
from qpopper.errors import MaildropError, ResponseCode
from qpopper.maildrop.mbox import MboxMaildrop, new_spool_path, session_lock_path


def spool_with(tmp_path: Path, messages: list[bytes], mode: int = 0o600) -> str:
    spool = tmp_path / "alice"
    spool.write_bytes(mbox(messages))
    os.chmod(spool, mode)
    return str(spool)


def contents(spool: str) -> list[bytes]:
    md = MboxMaildrop(spool)
    try:
        return [b"".join(md.read(i)) for i in range(len(md.messages()))]
    finally:
        md.close()


def test_nothing_deleted_writes_nothing(tmp_path: Path) -> None:
    spool = spool_with(tmp_path, [numbered(1), numbered(2)])
    before = os.stat(spool)
    md = MboxMaildrop(spool)
    md.commit(set(), {0, 1})
    md.close()
    after = os.stat(spool)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)


def test_update_replaces_by_rename_and_keeps_mode_and_owner(tmp_path: Path) -> None:
    spool = spool_with(tmp_path, [numbered(i) for i in range(1, 5)], mode=0o660)
    before = os.stat(spool)
    md = MboxMaildrop(spool)
    md.commit({0, 2}, set())
    md.close()
    after = os.stat(spool)
    assert after.st_ino != before.st_ino
    assert (after.st_mode, after.st_uid, after.st_gid) == (before.st_mode, before.st_uid, before.st_gid)
    assert [number_of(m) for m in contents(spool)] == [2, 4]
    assert Path(spool).read_bytes() == entry(numbered(2), 1) + entry(numbered(4), 3)
    assert not os.path.exists(new_spool_path(spool))
    assert not os.path.exists(spool + ".lock")


def test_deleting_everything_leaves_an_empty_spool(tmp_path: Path) -> None:
    spool = spool_with(tmp_path, [numbered(1), numbered(2)], mode=0o640)
    md = MboxMaildrop(spool)
    md.commit({0, 1}, set())
    md.close()
    assert Path(spool).read_bytes() == b""
    assert os.stat(spool).st_mode & 0o777 == 0o640


@pytest.mark.parametrize("delete_last", [False, True])
def test_mail_arriving_during_session_is_kept(tmp_path: Path, delete_last: bool) -> None:
    spool = spool_with(tmp_path, [numbered(1), numbered(2), numbered(3)])
    md = MboxMaildrop(spool)
    deliver(spool, numbered(4), 4)
    deliver(spool, numbered(5), 5)
    assert len(md.messages()) == 3
    md.commit({2} if delete_last else {0}, set())
    md.close()
    expected = [1, 2, 4, 5] if delete_last else [2, 3, 4, 5]
    assert [number_of(m) for m in contents(spool)] == expected


def test_new_mail_after_message_lacking_the_empty_line(tmp_path: Path) -> None:
    # The last message has no final newline; an appender that did not fix
    # that up wrote its From_ line right after it. UPDATE separates them.
    spool = tmp_path / "alice"
    spool.write_bytes(entry(numbered(1), 1) + entry(numbered(2), 2)[:-2])
    md = MboxMaildrop(str(spool))
    with open(spool, "ab") as f:
        f.write(b"\n" + entry(numbered(3), 3))
    md.commit({0}, set())
    md.close()
    assert [number_of(m) for m in contents(str(spool))] == [2, 3]


def test_uids_survive_update_and_restart(tmp_path: Path) -> None:
    spool = spool_with(
        tmp_path, [numbered(i) for i in range(1, 7)] + [b"X-UIDL: 0123456789abcdef0123\nSubject: message 7\n\n7\n"]
    )
    md = MboxMaildrop(spool)
    uids = [m.uid for m in md.messages()]
    md.commit({0, 3}, set())
    md.close()
    md = MboxMaildrop(spool)
    assert [m.uid for m in md.messages()] == [u for i, u in enumerate(uids) if i not in (0, 3)]
    assert md.messages()[-1].uid == "0123456789abcdef0123"
    md.close()


def test_replaced_spool_is_not_updated(tmp_path: Path) -> None:
    spool = spool_with(tmp_path, [numbered(1), numbered(2)])
    md = MboxMaildrop(spool)
    other = tmp_path / "other"
    other.write_bytes(mbox([numbered(7)]))
    os.rename(other, spool)
    with pytest.raises(MaildropError) as err:
        md.commit({0}, set())
    assert err.value.code is ResponseCode.SYS_TEMP
    md.close()
    assert [number_of(m) for m in contents(spool)] == [7]


@pytest.mark.parametrize("change", ["shrink", "rewrite_same_length"])
def test_spool_rewritten_in_place_is_not_updated(tmp_path: Path, change: str) -> None:
    spool = spool_with(tmp_path, [numbered(1), numbered(22), numbered(3)])
    md = MboxMaildrop(spool)
    data = Path(spool).read_bytes()
    if change == "shrink":
        new = mbox([numbered(1), numbered(3)])
    else:  # an MUA moved a message boundary (same length)
        new = mbox([numbered(1) + b"xx\n", numbered(2), numbered(3)])
        assert len(new) == len(data)
    with open(spool, "r+b") as f:
        f.write(new)
        f.truncate()
    with pytest.raises(MaildropError):
        md.commit({0}, set())
    md.close()
    assert Path(spool).read_bytes() == new


def test_not_enough_space_refuses_and_keeps_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = spool_with(tmp_path, [numbered(1), numbered(2)])
    data = Path(spool).read_bytes()

    class Full:
        f_bavail = 1
        f_frsize = 4096

    monkeypatch.setattr(os, "statvfs", lambda _: Full())
    md = MboxMaildrop(spool)
    with pytest.raises(MaildropError) as err:
        md.commit({0}, set())
    assert err.value.code is ResponseCode.SYS_TEMP
    md.close()
    assert Path(spool).read_bytes() == data
    assert not os.path.exists(spool + ".lock")


@pytest.mark.parametrize("failing", ["fsync", "copy_file_range", "rename"])
def test_write_errors_keep_old_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    spool = spool_with(tmp_path, [numbered(1), numbered(2)])
    data = Path(spool).read_bytes()
    md = MboxMaildrop(spool)

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EDQUOT if failing == "fsync" else errno.EIO, "injected")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(MaildropError) as err:
        md.commit({0}, set())
    monkeypatch.undo()
    assert err.value.code is ResponseCode.SYS_TEMP
    md.close()
    assert Path(spool).read_bytes() == data
    assert not os.path.exists(new_spool_path(spool))
    assert not os.path.exists(spool + ".lock")


def test_copy_without_copy_file_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = spool_with(tmp_path, [numbered(i) for i in range(1, 4)])

    def unsupported(*args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    md = MboxMaildrop(spool)
    md.commit({1}, set())
    md.close()
    assert [number_of(m) for m in contents(spool)] == [1, 3]


def test_leftover_of_killed_update_is_removed(tmp_path: Path) -> None:
    spool = spool_with(tmp_path, [numbered(1)])
    Path(new_spool_path(spool)).write_bytes(b"half a spool")
    MboxMaildrop(spool).close()
    assert not os.path.exists(new_spool_path(spool))


def test_missing_spool_is_empty_and_new_mail_survives(tmp_path: Path) -> None:
    spool = str(tmp_path / "nobody")
    md = MboxMaildrop(spool)
    assert list(md.messages()) == []
    deliver(spool, numbered(1))
    md.commit(set(), set())
    md.close()
    assert [number_of(m) for m in contents(spool)] == [1]
    assert not os.path.exists(session_lock_path(spool))  # the session lock file goes with the session (issue 21)


def test_symlinked_spool_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(mbox([numbered(1)]))
    (tmp_path / "alice").symlink_to(target)
    with pytest.raises(MaildropError) as err:
        MboxMaildrop(str(tmp_path / "alice"))
    assert err.value.code is ResponseCode.SYS_PERM


def test_read_gives_stored_bytes_in_chunks(tmp_path: Path) -> None:
    big = b"Subject: big\n\n" + b"".join(b"line %d\n" % i for i in range(20000))
    spool = spool_with(tmp_path, [numbered(1), big])
    md = MboxMaildrop(spool)
    chunks = list(md.read(1, chunk_size=1000))
    assert all(len(c) <= 1000 for c in chunks) and b"".join(chunks) == stored(big)
    md.close()
