"""UIDs worked out on first use: the listing a session gets at PASS holds
sizes only, and UIDL, EUIDL and XTND XLST ask the server for the UIDs once.

What must hold: the UIDs are the ones the full index gives, a session that
never lists them never reads for them, and a maildrop that cannot be read
any more gives a clear -ERR, not a traceback or a wrong UID.
"""

from __future__ import annotations

import gc
import os
import poplib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import write_maildir_message
from mbox_helpers import entry, mbox
from qpopper import Controller, StaticAuthenticator
from qpopper.errors import MaildropError, ResponseCode
from qpopper.maildrop import MessageInfo, MessageList
from qpopper.maildrop.maildir import MaildirMaildrop
from qpopper.maildrop.mbox import MboxMaildrop
from qpopper.maildrop.mboxindex import index_buffer
from qpopper.protocol import ResolveUids, Session
from test_protocol import logged_in, run

MESSAGES = [
    b"Subject: one\nMessage-Id: <1@x>\n\nfirst\n",
    b"Subject: two\n\nsecond\n",
    b"Subject: one\nMessage-Id: <1@x>\n\nfirst\n",
]


def _lazy(sizes: list[int], uids: list[str], seen: list[int] | None = None) -> tuple[MessageList, list[int]]:
    calls: list[int] = []

    def work_out() -> list[str]:
        calls.append(1)
        return uids

    return MessageList(sizes, work_out, seen), calls


# ---- MessageList ---------------------------------------------------------------


def test_message_list_defers_uids_until_asked_and_works_them_out_once() -> None:
    table, calls = _lazy([10, 20], ["a", "b"], [0, 1])
    assert len(table) == 2 and list(table.sizes) == [10, 20] and not table.uids_ready
    assert table.last_seen() == 2 and calls == []
    assert table[1] == MessageInfo(20, "b", True) and calls == [1]
    assert list(table) == [MessageInfo(10, "a", False), MessageInfo(20, "b", True)]
    assert table[::-1] == [MessageInfo(20, "b", True), MessageInfo(10, "a", False)]
    table.resolve_uids()
    assert calls == [1] and table.uids_ready


def test_message_list_of_a_plain_list_keeps_everything() -> None:
    infos = [MessageInfo(5, "x"), MessageInfo(6, "y", seen=True), MessageInfo(7, "z")]
    table = MessageList.of(infos)
    assert list(table) == infos and table.last_seen() == 2 and MessageList.of(table) is table
    assert MessageList([1], ["u"]).last_seen() == 0  # a backend without flags


# ---- the protocol core -----------------------------------------------------------


def _session_with(table: MessageList) -> Session:
    return logged_in(table)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (b"UIDL\r\n", b"+OK uidl command accepted.\r\n1 a\r\n2 b\r\n.\r\n"),
        (b"UIDL 2\r\n", b"+OK 2 b\r\n"),
    ],
)
def test_uidl_asks_for_the_uids_then_answers(command: bytes, expected: bytes) -> None:
    table, calls = _lazy([10, 20], ["a", "b"])
    session = _session_with(table)
    session.receive_data(b"STAT\r\nLIST\r\nLAST\r\n")
    out, others = run(session)
    assert out == (
        b"+OK 2 30\r\n+OK 2 visible messages (30 octets)\r\n1 10\r\n2 20\r\n.\r\n"
        b"+OK 0 is the last read message.\r\n"
    )
    assert others == [] and calls == []
    session.receive_data(command + b"NOOP\r\n")
    out, others = run(session)
    assert out == b"" and others == [ResolveUids(table)]
    table.resolve_uids()
    session.uids_resolved()
    out, others = run(session)
    assert out == expected + b"+OK no big woop\r\n" and calls == [1]
    session.receive_data(b"UIDL 1\r\n")
    assert run(session) == (b"+OK 1 a\r\n", [])  # asked once only


def test_uids_that_cannot_be_worked_out_get_a_clear_error() -> None:
    table, _ = _lazy([10], ["a"])
    session = _session_with(table)
    session.receive_data(b"UIDL\r\n")
    assert run(session)[1] == [ResolveUids(table)]
    session.uids_resolved(ok=False)
    out, _ = run(session)
    assert out.startswith(b"-ERR [SYS/TEMP] ")
    session.receive_data(b"NOOP\r\n")
    assert run(session)[0] == b"+OK no big woop\r\n"


def test_a_bad_message_number_is_refused_before_any_uid_is_worked_out() -> None:
    table, calls = _lazy([10], ["a"])
    session = _session_with(table)
    session.receive_data(b"UIDL 9\r\n")
    out, others = run(session)
    assert out.startswith(b"-ERR") and others == [] and calls == []


# ---- mbox ---------------------------------------------------------------------------


def _spool_drop(spool: Path, data: bytes) -> MboxMaildrop:
    spool.write_bytes(data)
    return MboxMaildrop(str(spool))


def test_mbox_open_reads_no_uid_and_the_uids_match_the_full_index(tmp_path: Path) -> None:
    data = mbox(MESSAGES)
    drop = _spool_drop(tmp_path / "alice", data)
    try:
        table = drop.messages()
        assert not table.uids_ready
        assert list(table.uids) == index_buffer(data).uids
        assert len(set(table.uids)) == 3  # the twin got a suffix
    finally:
        drop.close()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([*MESSAGES, b"X-UIDL: 0123456789abcdef0123\n\nkept\n", b"no header\n"]), max_size=8))
def test_deferred_uids_equal_the_indexed_ones(tmp_path_factory: pytest.TempPathFactory, messages: list[bytes]) -> None:
    spool = tmp_path_factory.mktemp("d") / "bob"
    data = b"".join(entry(m, n) for n, m in enumerate(messages))
    drop = _spool_drop(spool, data)
    try:
        assert list(drop.messages().uids) == index_buffer(data).uids
    finally:
        drop.close()


def test_a_spool_cut_short_after_login_gives_sys_temp_not_wrong_uids(tmp_path: Path) -> None:
    spool = tmp_path / "carol"
    drop = _spool_drop(spool, mbox(MESSAGES))
    try:
        os.truncate(spool, 10)  # another program rewrote the spool behind every lock
        with pytest.raises(MaildropError) as caught:
            drop.messages().resolve_uids()
        assert caught.value.code is ResponseCode.SYS_TEMP
    finally:
        drop.close()


def test_uidl_over_a_real_socket_for_a_big_mbox_in_a_worker(tmp_path: Path) -> None:
    """More messages than the loop works out itself: the worker road."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    count = 1500
    messages = [b"Subject: m%d\nMessage-Id: <%d@x>\n\nbody %d\n" % (n, n, n) for n in range(count)]
    data = mbox(messages)
    (spool_dir / "dave").write_bytes(data)
    auth = StaticAuthenticator({"dave": "pw"}, mail_location=f"mbox:{spool_dir}/%u")
    with Controller(authenticator=auth) as server:
        client = poplib.POP3(server.host, server.port, timeout=30)
        try:
            client.user("dave")
            client.pass_("pw")
            assert client.stat()[0] == count
            _resp, listing, _octets = client.uidl()
            uids = [line.split()[1].decode() for line in listing]
            assert uids == index_buffer(data).uids
            assert client.uidl(count).split()[-1].decode() == uids[-1]
        finally:
            client.quit()


# ---- Maildir ----------------------------------------------------------------------


def test_maildir_uids_and_flags_come_from_the_names_when_asked(tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    write_maildir_message(md, b"a\n", name="1.a,S=2,W=3")
    write_maildir_message(md, b"b\n", name="2.b,S=2,W=3:2,RS", sub="cur")
    write_maildir_message(md, b"c\n", name="3.c,S=2,W=3:2,", sub="cur")
    drop = MaildirMaildrop(str(md))
    try:
        table = drop.messages()
        assert not table.uids_ready and list(table.sizes) == [3, 3, 3]
        assert table.last_seen() == 2
        assert list(table.uids) == ["1.a", "2.b", "3.c"]
    finally:
        drop.close()


@pytest.mark.parametrize(
    "names", [["5.dup,S=2,W=3", "5.dup,S=2,W=3:2,S"], ["caf\u00e9.x,S=2,W=3", "ok,S=2,W=3"], ["x" * 71 + ",S=2,W=3"]]
)
def test_maildir_names_unfit_for_uidl_get_digests_when_asked(tmp_path: Path, names: list[str]) -> None:
    md = tmp_path / "Maildir"
    for name in names:
        write_maildir_message(md, b"a\n", name=name, sub="cur" if ":2," in name else "new")
    drop = MaildirMaildrop(str(md))
    try:
        uids = list(drop.messages().uids)
    finally:
        drop.close()
    assert len(set(uids)) == len(names)
    assert all(0 < len(u) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in u) for u in uids)


# ---- no reference cycles ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["maildir", "mbox"])
def test_a_closed_maildrop_is_freed_without_the_cycle_collector(tmp_path: Path, backend: str) -> None:
    """A listing of 50,000 messages left to the garbage collector's next full
    pass is ~10 MB per session: the deferred-UID functions must not point
    back at their maildrop."""
    if backend == "maildir":
        md = tmp_path / "Maildir"
        for n in range(50):
            write_maildir_message(md, b"x\n", name=f"{n}.a,S=2,W=3")

        def open_drop() -> MaildirMaildrop | MboxMaildrop:
            return MaildirMaildrop(str(md))
    else:
        spool = tmp_path / "erin"
        spool.write_bytes(mbox(MESSAGES * 10))

        def open_drop() -> MaildirMaildrop | MboxMaildrop:
            return MboxMaildrop(str(spool))

    def one_session(resolve: bool) -> None:
        drop = open_drop()
        try:
            if resolve:
                drop.messages().resolve_uids()
        finally:
            drop.close()

    gc.collect()
    gc.disable()
    try:
        one_session(resolve=False)
        one_session(resolve=True)
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_a_spool_rewritten_in_place_after_login_gives_sys_temp_not_other_uids(tmp_path: Path) -> None:
    """Same length, other From_ line: the UIDs would belong to other mail."""
    spool = tmp_path / "frank"
    data = mbox(MESSAGES)
    drop = _spool_drop(spool, data)
    try:
        second = data.index(b"\n\nFrom ") + 2
        with open(spool, "r+b") as f:  # an MUA that ignores the session rewrites it
            f.seek(second + 5)
            f.write(b"z" if data[second + 5 : second + 6] != b"z" else b"y")
        with pytest.raises(MaildropError) as caught:
            drop.messages().resolve_uids()
        assert caught.value.code is ResponseCode.SYS_TEMP
    finally:
        drop.close()
