"""The event-loop fast paths: a quick open, an UPDATE that writes nothing,
and a password check without a worker thread.

Each fast path must either do exactly what the slow one does or decline
having changed nothing; these tests hold both halves, and that a refusal
never takes the fast road.
"""

from __future__ import annotations

import os
import poplib
from pathlib import Path

import pytest

from helpers import write_maildir_message
from mbox_helpers import mbox
from qpopper import Controller, StaticAuthenticator
from qpopper.auth.apopdb import ApopAuthenticator, ApopDatabase
from qpopper.auth.credentials import ApopDigest, UserPass
from qpopper.auth.passwdfile import PasswdFileAuthenticator
from qpopper.errors import MaildropBusy, WouldBlock
from qpopper.maildrop import MaildropSettings
from qpopper.maildrop.location import open_maildrop
from qpopper.maildrop.maildir import QUICK_DIR_BYTES
from qpopper.maildrop.mbox import QUICK_SPOOL_BYTES, new_spool_path
from qpopper.protocol import wire_size

MSG = b"Subject: hi\n\nbody\n"


def _hinted(n: int) -> str:
    return f"{1700000000 + n}.M{n}P1.host,S={len(MSG)},W={wire_size(MSG)}"


def _listing(location: str, quick: bool, settings: MaildropSettings | None = None) -> list[tuple[int, str]]:
    drop = open_maildrop(location, settings, quick=quick)
    try:
        return [(m.size, m.uid) for m in drop.messages()]
    finally:
        drop.close()


def _assert_unlocked(location: str) -> None:
    """A declined quick open left no lock behind: a normal open works."""
    open_maildrop(location).close()


# ---- Maildir ---------------------------------------------------------------


def test_small_maildir_opens_quickly_with_the_same_listing(tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    for n in range(5):
        write_maildir_message(md, MSG, name=_hinted(n))
    write_maildir_message(md, MSG, name=_hinted(9) + ":2,S", sub="cur")
    location = f"maildir:{md}"
    assert _listing(location, quick=True) == _listing(location, quick=False)


def test_maildir_that_needs_reading_is_declined_and_left_unlocked(tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    write_maildir_message(md, MSG, name=_hinted(1))
    write_maildir_message(md, MSG, name="2.no-hints")  # must be read to size it
    location = f"maildir:{md}"
    with pytest.raises(WouldBlock):
        open_maildrop(location, quick=True)
    _assert_unlocked(location)
    assert [size for size, _ in _listing(location, quick=False)] == [wire_size(MSG)] * 2


def test_big_maildir_is_declined(tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    write_maildir_message(md, MSG, name=_hinted(0))
    names = 0
    while os.stat(md / "new").st_size <= QUICK_DIR_BYTES:
        for _ in range(200):
            names += 1
            (md / "new" / _hinted(names)).write_bytes(MSG)
    with pytest.raises(WouldBlock):
        open_maildrop(f"maildir:{md}", quick=True)
    assert len(_listing(f"maildir:{md}", quick=False)) == names + 1


def test_busy_maildir_is_in_use_either_way(tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    write_maildir_message(md, MSG, name=_hinted(0))
    held = open_maildrop(f"maildir:{md}")
    try:
        with pytest.raises(MaildropBusy):
            open_maildrop(f"maildir:{md}", quick=True)
    finally:
        held.close()


def test_maildir_writes_nothing_until_mail_moves_or_goes(tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    write_maildir_message(md, MSG, name=_hinted(0))  # new/
    write_maildir_message(md, MSG, name=_hinted(1) + ":2,S", sub="cur")
    drop = open_maildrop(f"maildir:{md}")
    try:
        assert drop.writes_nothing(set(), set())  # type: ignore[attr-defined]
        assert drop.writes_nothing(set(), {1})  # type: ignore[attr-defined]  # already in cur/
        assert not drop.writes_nothing(set(), {0})  # type: ignore[attr-defined]  # moves to cur/
        assert not drop.writes_nothing({1}, set())  # type: ignore[attr-defined]
        drop.commit(set(), {1})
    finally:
        drop.close()
    assert sorted(os.listdir(md / "new")) == [_hinted(0)]


def test_a_session_over_a_packed_listing_reads_deletes_and_flags_the_right_files(tmp_path: Path) -> None:
    """Names in the common form are held packed (maildrop/packednames.py): a
    whole session through a real server, in cur/ and new/ at once and with a
    file an IMAP server renamed mid-session, still finds every message by
    its number, and UPDATE removes and flags exactly the ones asked for."""
    md = tmp_path / "Maildir"
    bodies = [b"Subject: %d\n\nbody %d\n" % (n, n) for n in range(6)]
    names = [f"{1700000000 + n}.M{n}P1.host,S={len(b)},W={wire_size(b)}" for n, b in enumerate(bodies)]
    for n, (name, body) in enumerate(zip(names, bodies, strict=True)):
        write_maildir_message(md, body, name=name + (":2,S" if n % 2 else ""), sub="cur" if n % 2 else "new")
    auth = StaticAuthenticator({"alice": "secret"}, mail_location=f"maildir:{md}")
    with Controller(authenticator=auth) as server:
        client = poplib.POP3(server.host, server.port, timeout=30)
        client.user("alice")
        client.pass_("secret")
        assert [int(line.split()[1]) for line in client.list()[1]] == [wire_size(b) for b in bodies]
        assert [line.split()[1].decode() for line in client.uidl()[1]] == [name.split(",")[0] for name in names]
        os.rename(md / "new" / names[4], md / "cur" / (names[4] + ":2,F"))  # flagged by an IMAP server
        for n, body in enumerate(bodies):
            assert b"\r\n".join(client.retr(n + 1)[1]) + b"\r\n" == body.replace(b"\n", b"\r\n")
        client.dele(2)
        client.dele(5)
        client.quit()
    # 2 and 5 (the renamed one) are gone; the others were read whole, so all are seen, in cur/.
    assert sorted(os.listdir(md / "cur")) == [names[n] + ":2,S" for n in (0, 2, 3, 5)]
    assert os.listdir(md / "new") == []


# ---- mbox ------------------------------------------------------------------


@pytest.fixture
def spool(tmp_path: Path) -> str:
    path = tmp_path / "spool" / "alice"
    path.parent.mkdir()
    path.write_bytes(mbox([MSG, b"Subject: two\n\n.dot\n"]))
    return str(path)


def test_small_mbox_opens_quickly_with_the_same_listing(spool: str) -> None:
    location = f"mbox:{spool}"
    assert _listing(location, quick=True) == _listing(location, quick=False)
    assert not os.path.exists(spool + ".lock")


def test_big_mbox_is_declined(spool: str) -> None:
    with open(spool, "ab") as f:
        f.write(mbox([b"Subject: big\n\n" + b"x" * 100 + b"\n"] * (QUICK_SPOOL_BYTES // 100)))
    with pytest.raises(WouldBlock):
        open_maildrop(f"mbox:{spool}", quick=True)
    _assert_unlocked(f"mbox:{spool}")


def test_dotlocked_mbox_is_declined_and_the_lock_kept(spool: str) -> None:
    lock = spool + ".lock"
    with open(lock, "w") as f:
        f.write(f"{os.getpid()}\n")  # a live MDA's lock
    with pytest.raises(WouldBlock):
        open_maildrop(f"mbox:{spool}", quick=True)
    assert Path(lock).read_text() == f"{os.getpid()}\n"
    os.unlink(lock)
    _assert_unlocked(f"mbox:{spool}")


def test_mbox_with_work_left_by_a_crash_is_declined(spool: str) -> None:
    leftover = new_spool_path(spool)
    with open(leftover, "wb") as f:
        f.write(b"half a copy")
    with pytest.raises(WouldBlock):
        open_maildrop(f"mbox:{spool}", quick=True)
    assert os.path.exists(leftover)  # untouched: recovery is the slow road's
    assert len(_listing(f"mbox:{spool}", quick=False)) == 2
    assert not os.path.exists(leftover)


def test_temp_drop_mode_is_never_quick(spool: str) -> None:
    with pytest.raises(WouldBlock):
        open_maildrop(f"mbox:{spool}", MaildropSettings(server_mode=False), quick=True)
    assert os.listdir(os.path.dirname(spool)) == ["alice"]


def test_shared_storage_is_never_quick(spool: str, tmp_path: Path) -> None:
    # On NFS a system call can wait for the server: never on the event loop.
    maildir = tmp_path / "Maildir"
    write_maildir_message(maildir, MSG)
    before = sorted(os.listdir(maildir))
    with pytest.raises(WouldBlock):
        open_maildrop(f"maildir:{maildir}", MaildropSettings(shared_storage=True), quick=True)
    with pytest.raises(WouldBlock):
        open_maildrop(f"mbox:{spool}", MaildropSettings(shared_storage=True), quick=True)
    assert sorted(os.listdir(maildir)) == before and os.listdir(os.path.dirname(spool)) == ["alice"]
    drop = open_maildrop(f"maildir:{maildir}", MaildropSettings(shared_storage=True))  # the worker's road
    assert len(drop.messages()) == 1
    drop.close()


def test_mbox_writes_nothing_unless_deleting_or_marking(spool: str) -> None:
    drop = open_maildrop(f"mbox:{spool}")
    try:
        assert drop.writes_nothing(set(), {0, 1})  # type: ignore[attr-defined]
        assert not drop.writes_nothing({0}, set())  # type: ignore[attr-defined]
    finally:
        drop.close()
    drop = open_maildrop(f"mbox:{spool}", MaildropSettings(update_status_headers=True))
    try:
        assert drop.writes_nothing(set(), set())  # type: ignore[attr-defined]
        assert not drop.writes_nothing(set(), {0})  # type: ignore[attr-defined]  # gets Status: RO
    finally:
        drop.close()
    drop = open_maildrop(f"mbox:{spool}", MaildropSettings(server_mode=False))
    try:
        assert not drop.writes_nothing(set(), set())  # type: ignore[attr-defined]  # the temp drop goes back
    finally:
        drop.close()


# ---- passwords -------------------------------------------------------------


def _passwd(tmp_path: Path, lines: str, recheck_interval: float = 1.0) -> PasswdFileAuthenticator:
    path = tmp_path / "passwd"
    path.write_text(lines)
    return PasswdFileAuthenticator(str(path), f"maildir:{tmp_path}/%u", recheck_interval=recheck_interval)


def test_cheap_schemes_are_checked_quickly_and_agree(tmp_path: Path) -> None:
    auth = _passwd(
        tmp_path,
        "plain:{PLAIN}secret\n"
        "digest:{SHA256}K7gNU3sdo+OL0wNhqoVWhr3g6s1xYv72ol/pe/Unols=\n",  # sha256("secret")
    )
    for user in ("plain", "digest"):
        quick = auth.authenticate_quickly(UserPass(user, b"secret"))
        assert quick is not None and quick == auth.authenticate(UserPass(user, b"secret"))


def test_refusals_and_slow_hashes_take_the_worker(tmp_path: Path) -> None:
    from passlib.hash import sha512_crypt

    auth = _passwd(tmp_path, "plain:{PLAIN}secret\n" f"slow:{{SHA512-CRYPT}}{sha512_crypt.hash('secret')}\n")
    assert auth.authenticate_quickly(UserPass("plain", b"wrong")) is None
    assert auth.authenticate_quickly(UserPass("nobody", b"secret")) is None
    assert auth.authenticate_quickly(UserPass("slow", b"secret")) is None
    assert auth.authenticate(UserPass("slow", b"secret")) is not None


def test_an_edited_passwd_file_is_never_trusted_from_memory(tmp_path: Path) -> None:
    auth = _passwd(tmp_path, "plain:{PLAIN}secret\n", recheck_interval=0)
    (tmp_path / "passwd").write_text("plain:{PLAIN}changed-password\n")
    assert auth.authenticate_quickly(UserPass("plain", b"secret")) is None  # not reloaded here
    assert auth.authenticate(UserPass("plain", b"secret")) is None
    assert auth.authenticate_quickly(UserPass("plain", b"changed-password")) is not None


def test_apop_database_in_front_keeps_its_rules(tmp_path: Path) -> None:
    inner = _passwd(tmp_path, "alice:{PLAIN}unix-pass\nbob:{PLAIN}bob-pass\n")
    db_path = tmp_path / "pop.auth"
    db_path.write_text("alice:{PLAIN}apop-secret\n")
    db = ApopDatabase(str(db_path), recheck_interval=0)
    strict = ApopAuthenticator(inner, db, None)
    assert strict.authenticate_quickly(UserPass("alice", b"unix-pass")) is None  # -p 0: no clear text
    assert strict.authenticate(UserPass("alice", b"unix-pass")) is None
    db.load()
    import hashlib

    stamp = "<1.2@host>"
    digest = hashlib.md5((stamp + "apop-secret").encode()).hexdigest()
    assert strict.authenticate_quickly(ApopDigest("alice", stamp, digest)) is not None
    assert strict.authenticate_quickly(ApopDigest("alice", stamp, "0" * 32)) is None
    assert strict.authenticate_quickly(UserPass("bob", b"bob-pass")) is not None
    db_path.write_text("alice:{PLAIN}other\nbob:{PLAIN}x\n")
    assert strict.authenticate_quickly(UserPass("bob", b"bob-pass")) is None  # database changed: reread first
