"""update-status-headers (Status: RO and X-UIDL write-back) and the UW-IMAP kluge, in both modes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mbox_helpers import entry, mbox, number_of, numbered
from qpopper.maildrop import MaildropSettings
from qpopper.maildrop.mbox import MboxMaildrop
from qpopper.protocol import wire_size

MODES = pytest.mark.parametrize("server_mode", [True, False], ids=["server", "tempdrop"])


def ush(server_mode: bool, **kw: object) -> MaildropSettings:
    return MaildropSettings(server_mode=server_mode, update_status_headers=True, **kw)  # type: ignore[arg-type]


def listing(spool: str, s: MaildropSettings) -> list[tuple[int, str, bool, bytes]]:
    md = MboxMaildrop(spool, s)
    try:
        return [(m.size, m.uid, m.seen, b"".join(md.read(i))) for i, m in enumerate(md.messages())]
    finally:
        md.close()


@MODES
def test_sizes_count_the_x_uidl_that_retr_sends(tmp_path: Path, server_mode: bool) -> None:
    spool = str(tmp_path / "alice")
    Path(spool).write_bytes(mbox([numbered(1), numbered(2)]))
    plain = listing(spool, MaildropSettings(server_mode=server_mode))
    with_ush = listing(spool, ush(server_mode))
    for (size0, uid0, _, body0), (size, uid, _, body) in zip(plain, with_ush, strict=True):
        assert uid == uid0  # the UID does not depend on the option
        assert body == b"X-UIDL: " + uid.encode() + b"\n" + body0
        assert size == wire_size(body) == size0 + len(b"X-UIDL: ") + len(uid) + 2


@MODES
def test_write_back_at_update(tmp_path: Path, server_mode: bool) -> None:
    spool = str(tmp_path / "alice")
    Path(spool).write_bytes(mbox([numbered(1), numbered(2), numbered(3)]))
    s = ush(server_mode)
    before = listing(spool, s)
    md = MboxMaildrop(spool, s)
    md.commit({1}, {0})
    md.close()
    data = Path(spool).read_bytes()
    uid1, uid3 = before[0][1], before[2][1]
    assert data == (
        entry(b"X-UIDL: %s\n" % uid1.encode() + numbered(1).replace(b"\n\n", b"\nStatus: RO\n\n", 1), 0)
        + entry(b"X-UIDL: %s\n" % uid3.encode() + numbered(3), 2)
    )
    after = listing(spool, s)
    assert [(u, seen) for _, u, seen, _ in after] == [(uid1, True), (uid3, False)]
    assert after[1][0] == before[2][0]  # the X-UIDL was counted before it was written
    assert after[0][0] == before[0][0] + len(b"Status: RO\r\n")
    assert [wire_size(b) for _, _, _, b in after] == [size for size, _, _, _ in after]


def test_server_mode_writes_for_first_retrieval_only(tmp_path: Path) -> None:
    spool = str(tmp_path / "alice")
    Path(spool).write_bytes(mbox([numbered(1), numbered(2)]))
    s = ush(True)
    md = MboxMaildrop(spool, s)
    md.commit(set(), set())  # nothing changed
    md.close()
    ino = os.stat(spool).st_ino
    md = MboxMaildrop(spool, s)
    md.commit(set(), {0})  # first retrieval: Status must be recorded
    md.close()
    assert os.stat(spool).st_ino != ino
    assert b"Status: RO" in Path(spool).read_bytes()
    ino = os.stat(spool).st_ino
    md = MboxMaildrop(spool, s)
    assert md.messages()[0].seen
    md.commit(set(), {0})  # already seen: nothing to write
    md.close()
    assert os.stat(spool).st_ino == ino


def test_option_off_writes_nothing_new(tmp_path: Path) -> None:
    spool = str(tmp_path / "alice")
    Path(spool).write_bytes(mbox([numbered(1), numbered(2)]))
    md = MboxMaildrop(spool, MaildropSettings(server_mode=True))
    md.commit({1}, {0})
    md.close()
    assert Path(spool).read_bytes() == entry(numbered(1), 0)


@MODES
def test_status_lines_are_replaced(tmp_path: Path, server_mode: bool) -> None:
    spool = str(tmp_path / "alice")
    msg = b"Subject: s\nStatus: O\n  continued\nX-Status: A\nstatus: U\n\nbody\n"
    Path(spool).write_bytes(mbox([msg, numbered(2)]))
    md = MboxMaildrop(spool, ush(server_mode))
    uid = md.messages()[0].uid
    md.commit({1}, {0})
    md.close()
    assert Path(spool).read_bytes() == entry(
        b"X-UIDL: %s\nSubject: s\nX-Status: A\nStatus: RO\n\nbody\n" % uid.encode(), 0
    )


@MODES
def test_crlf_mail_and_odd_headers(tmp_path: Path, server_mode: bool) -> None:
    spool = str(tmp_path / "alice")
    crlf = b"From a@b Wed Dec  2 05:53:22 1992\r\nSubject: crlf\r\n\r\nbody\r\n\r\n"
    headers_only = b"From c@d Wed Dec  2 05:53:22 1992\nSubject: no body, no newline"
    Path(spool).write_bytes(crlf + entry(numbered(9), 9) + headers_only)
    s = ush(server_mode)
    before = listing(spool, s)
    assert before[0][3].startswith(b"X-UIDL: " + before[0][1].encode() + b"\r\nSubject: crlf\r\n")
    md = MboxMaildrop(spool, s)
    md.commit({1}, {0, 2})
    md.close()
    after = listing(spool, s)
    assert [u for _, u, _, _ in after] == [before[0][1], before[2][1]]
    assert after[0][3] == b"X-UIDL: " + before[0][1].encode() + b"\r\nSubject: crlf\r\nStatus: RO\r\n\r\nbody\r\n"
    assert after[1][3].endswith(b"Subject: no body, no newline\nStatus: RO\n")
    assert all(size == wire_size(body) for size, _, _, body in after)


@MODES
def test_existing_x_uidl_is_kept_and_not_added(tmp_path: Path, server_mode: bool) -> None:
    spool = str(tmp_path / "alice")
    qp = b"X-UIDL: 0123456789abcdef0123\nSubject: from qpopper\n\nx\n"
    Path(spool).write_bytes(mbox([qp, numbered(2)]))
    got = listing(spool, ush(server_mode))
    assert got[0][1] == "0123456789abcdef0123" and got[0][3] == qp and got[0][0] == wire_size(qp)


@MODES
def test_twins_keep_their_uids_once_written(tmp_path: Path, server_mode: bool) -> None:
    # Two byte-identical messages share a computed UID; the second gets a
    # suffix. Written back, that suffix survives the first one's deletion.
    spool = str(tmp_path / "alice")
    twin = entry(numbered(1), 1)
    Path(spool).write_bytes(twin + twin + entry(numbered(3), 3))
    s = ush(server_mode)
    uids = [u for _, u, _, _ in listing(spool, s)]
    assert uids[1] == uids[0] + "-2"
    md = MboxMaildrop(spool, s)
    md.commit({2}, set())
    md.close()
    md = MboxMaildrop(spool, s)
    md.commit({0}, set())
    md.close()
    assert [u for _, u, _, _ in listing(spool, s)] == [uids[1]]


@MODES
def test_uids_stable_when_other_programs_change_hashed_headers(tmp_path: Path, server_mode: bool) -> None:
    spool = str(tmp_path / "alice")
    Path(spool).write_bytes(mbox([numbered(1), numbered(2)]))
    s = ush(server_mode)
    md = MboxMaildrop(spool, s)
    uid = md.messages()[0].uid
    md.commit({1}, set())
    md.close()
    # An MUA edits the Subject (one of the hashed headers) of the kept message.
    data = Path(spool).read_bytes().replace(b"Subject: message 1", b"Subject: MESSAGE 1")
    Path(spool).write_bytes(data)
    assert [u for _, u, _, _ in listing(spool, s)] == [uid]


UW = (
    b"Date: Wed, 2 Dec 1992 05:53:22 +0000\nFrom: Mail System Internal Data <MAILER-DAEMON@host>\n"
    b"Subject: DON'T DELETE THIS MESSAGE -- FOLDER INTERNAL DATA\nX-IMAP: 1234567890 0000000005\n\n"
    b"This text is part of the internal format of your mail folder.\n"
)


@MODES
def test_uw_kluge_hides_the_internal_message_and_keeps_it(tmp_path: Path, server_mode: bool) -> None:
    spool = str(tmp_path / "alice")
    Path(spool).write_bytes(mbox([UW, numbered(1), numbered(2)]))
    s = MaildropSettings(server_mode=server_mode, uw_kluge=True)
    md = MboxMaildrop(spool, s)
    assert len(md.messages()) == 2
    assert number_of(b"".join(md.read(0))) == 1
    md.commit({0, 1}, {0})
    md.close()
    assert Path(spool).read_bytes() == entry(UW, 0)
    md = MboxMaildrop(spool, MaildropSettings(server_mode=server_mode))
    assert len(md.messages()) == 1  # without the kluge it is listed
    md.close()


def test_uw_kluge_needs_two_signs_and_the_first_place(tmp_path: Path) -> None:
    spool = str(tmp_path / "alice")
    one_sign = b"Subject: FOLDER INTERNAL DATA\n\nnot really\n"
    Path(spool).write_bytes(mbox([one_sign, numbered(1)]))
    assert len(listing(spool, MaildropSettings(uw_kluge=True))) == 2
    Path(spool).write_bytes(mbox([numbered(1), UW]))
    assert len(listing(spool, MaildropSettings(uw_kluge=True))) == 2


TOKENS = [b"\n", b"\r\n", b"\r", b"\n\n", b"From ", b"Subject: s", b"X-UIDL: 0123456789abcdef", b"X-UIDL: x",
          b"Status: RO", b"Status: O", b" cont", b": ", b"\xff"]
message = st.lists(st.sampled_from(TOKENS) | st.binary(max_size=8), max_size=14).map(b"".join)


@settings(max_examples=120, deadline=None)
@given(st.lists(message, min_size=1, max_size=4), st.data())
def test_sizes_match_sent_octets_before_and_after_write_back(messages: list[bytes], data: st.DataObject) -> None:
    server_mode = data.draw(st.booleans())
    with tempfile.TemporaryDirectory() as d:
        spool = os.path.join(d, "alice")
        with open(spool, "wb") as f:
            f.write(mbox(messages))
        s = ush(server_mode)
        first = listing(spool, s)
        assert all(size == wire_size(body) for size, _, _, body in first)
        n = len(first)
        deleted = set(data.draw(st.lists(st.integers(0, n - 1), max_size=n)))
        retrieved = set(data.draw(st.lists(st.integers(0, n - 1), max_size=n)))
        md = MboxMaildrop(spool, s)
        md.commit(deleted, retrieved)
        md.close()
        second = listing(spool, s)
        kept = [m for i, m in enumerate(first) if i not in deleted]
        assert [u for _, u, _, _ in second] == [u for _, u, _, _ in kept]
        assert all(size == wire_size(body) for size, _, _, body in second)
        for old, new in zip(kept, second, strict=True):
            if new[2] == old[2]:  # status unchanged: same size as listed before
                assert new[0] == old[0]
