"""The contract every Maildrop backend passes.

A backend's test module subclasses `MaildropContract` and provides two
fixtures:

* `make_location(messages: list[bytes]) -> str`: a fresh maildrop holding
  these messages (stored form, LF line ends unless the test says otherwise),
  returned as an expanded location such as "maildir:/tmp/x/Maildir".
* `deliver(location: str, message: bytes) -> None`: a delivery agent adding
  one message while sessions may be open.

The backend's own delivery (`qpopper.maildrop.delivery.deliver`, used by
bulletins) passes the same checks as that outside agent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from qpopper.errors import MaildropBusy, MaildropError
from qpopper.maildrop import is_valid_uid
from qpopper.maildrop.delivery import deliver as deliver_into
from qpopper.maildrop.location import open_maildrop
from qpopper.protocol import wire_size

MakeLocation = Callable[[list[bytes]], str]
Deliver = Callable[[str, bytes], None]


def msg(n: int, body: bytes = b"") -> bytes:
    return (
        b"From: sender%d@example.org\nTo: user@example.org\nSubject: message %d\n"
        b"Message-ID: <m%d@example.org>\n\nbody of message %d\n" % (n, n, n, n)
    ) + body


def read_all(maildrop: object, index: int) -> bytes:
    return b"".join(maildrop.read(index))  # type: ignore[attr-defined]


class MaildropContract:
    def test_lists_messages_in_order_with_rfc1939_sizes(self, make_location: MakeLocation) -> None:
        messages = [msg(1), msg(2, b".dot line\n..two dots\n.\n"), msg(3)]
        md = open_maildrop(make_location(messages))
        try:
            infos = md.messages()
            assert len(infos) == 3
            for index, (stored, info) in enumerate(zip(messages, infos, strict=True)):
                assert info.size == wire_size(stored)
                assert read_all(md, index).replace(b"\r\n", b"\n") == stored
        finally:
            md.close()

    def test_empty_maildrop(self, make_location: MakeLocation) -> None:
        md = open_maildrop(make_location([]))
        try:
            assert list(md.messages()) == []
            md.commit(set(), set())
        finally:
            md.close()

    def test_uids_are_valid_unique_and_stable(self, make_location: MakeLocation) -> None:
        location = make_location([msg(i) for i in range(1, 6)])
        md = open_maildrop(location)
        first = [i.uid for i in md.messages()]
        md.close()
        assert all(is_valid_uid(u) for u in first)
        assert len(set(first)) == 5
        md = open_maildrop(location)  # a session that ended without QUIT
        assert [i.uid for i in md.messages()] == first
        md.commit({1, 3}, set())
        md.close()
        md = open_maildrop(location)
        try:
            assert [i.uid for i in md.messages()] == [first[0], first[2], first[4]]
        finally:
            md.close()

    def test_commit_removes_exactly_the_deleted(self, make_location: MakeLocation) -> None:
        messages = [msg(i) for i in range(1, 5)]
        location = make_location(messages)
        md = open_maildrop(location)
        md.commit({0, 2}, {1})
        md.close()
        md = open_maildrop(location)
        try:
            kept = [read_all(md, i).replace(b"\r\n", b"\n") for i in range(len(md.messages()))]
            assert kept == [messages[1], messages[3]]
        finally:
            md.close()

    def test_close_without_commit_changes_nothing(self, make_location: MakeLocation) -> None:
        messages = [msg(1), msg(2)]
        location = make_location(messages)
        md = open_maildrop(location)
        md.close()
        md.close()  # idempotent
        md = open_maildrop(location)
        try:
            assert len(md.messages()) == 2
        finally:
            md.close()

    def test_second_session_is_refused_in_use(self, make_location: MakeLocation) -> None:
        location = make_location([msg(1)])
        md = open_maildrop(location)
        try:
            with pytest.raises(MaildropBusy):
                open_maildrop(location)
            errors: list[BaseException] = []

            def other_thread() -> None:
                try:
                    open_maildrop(location).close()
                except BaseException as exc:  # noqa: BLE001 - collected for the assert
                    errors.append(exc)

            t = threading.Thread(target=other_thread)
            t.start()
            t.join()
            assert len(errors) == 1 and isinstance(errors[0], MaildropBusy)
        finally:
            md.close()
        open_maildrop(location).close()  # released

    def test_mail_delivered_during_session_waits_for_next(
        self, make_location: MakeLocation, deliver: Deliver
    ) -> None:
        location = make_location([msg(1), msg(2)])
        md = open_maildrop(location)
        deliver(location, msg(3))
        assert len(md.messages()) == 2
        md.commit({0}, set())
        md.close()
        md = open_maildrop(location)
        try:
            got = [read_all(md, i).replace(b"\r\n", b"\n") for i in range(len(md.messages()))]
            assert got == [msg(2), msg(3)]
        finally:
            md.close()

    def test_crlf_stored_and_unterminated_messages(self, make_location: MakeLocation) -> None:
        crlf = msg(1).replace(b"\n", b"\r\n")
        unterminated = msg(2).rstrip(b"\n")
        md = open_maildrop(make_location([crlf, unterminated, msg(3)]))
        try:
            infos = md.messages()
            assert infos[0].size == wire_size(crlf) == wire_size(msg(1))
            assert infos[1].size == wire_size(unterminated)
            assert read_all(md, 2).replace(b"\r\n", b"\n") == msg(3)
        finally:
            md.close()

    def test_large_message_streams_in_chunks(self, make_location: MakeLocation) -> None:
        big = msg(1, b"x" * 100 + b"\n") + b"".join(b"line %d of a long body\n" % i for i in range(60000))
        md = open_maildrop(make_location([big]))
        try:
            chunks = list(md.read(0, chunk_size=65536))
            assert len(chunks) > 1 and max(len(c) for c in chunks) <= 65536
            assert b"".join(chunks).replace(b"\r\n", b"\n") == big
            assert md.messages()[0].size == wire_size(big)
        finally:
            md.close()

    def test_delivered_message_is_listed_with_its_size_and_read_back(self, make_location: MakeLocation) -> None:
        location = make_location([msg(1)])
        deliver_into(location, msg(2, b"From here on, quoted in mbox\n"))
        deliver_into(location, msg(3).replace(b"\n", b"\r\n"))
        md = open_maildrop(location)
        try:
            infos = md.messages()
            assert len(infos) == 3
            got = [read_all(md, i) for i in range(3)]
            assert got[0].replace(b"\r\n", b"\n") == msg(1)
            assert got[1].replace(b">From here", b"From here") == msg(2, b"From here on, quoted in mbox\n")
            assert got[2].replace(b"\r\n", b"\n") == msg(3)
            assert [i.size for i in infos] == [wire_size(g) for g in got]
            assert len({i.uid for i in infos}) == 3 and all(is_valid_uid(i.uid) for i in infos)
        finally:
            md.close()

    def test_delivered_with_a_uid_is_listed_under_it(self, make_location: MakeLocation) -> None:
        location = make_location([])
        deliver_into(location, msg(1), uid="1764630000.000.7")
        deliver_into(location, msg(2), uid="1764630000.001.8")
        md = open_maildrop(location)
        try:
            assert [i.uid for i in md.messages()] == ["1764630000.000.7", "1764630000.001.8"]
            assert [i.size for i in md.messages()] == [wire_size(read_all(md, i)) for i in range(2)]
        finally:
            md.close()
        md = open_maildrop(location)  # and it stays so
        try:
            assert [i.uid for i in md.messages()] == ["1764630000.000.7", "1764630000.001.8"]
        finally:
            md.close()

    def test_delivered_during_a_session_is_seen_at_the_next_login(self, make_location: MakeLocation) -> None:
        location = make_location([msg(1), msg(2)])
        md = open_maildrop(location)
        deliver_into(location, msg(3))
        assert len(md.messages()) == 2
        md.commit({0}, {1})
        md.close()
        md = open_maildrop(location)
        try:
            got = [read_all(md, i).replace(b"\r\n", b"\n") for i in range(len(md.messages()))]
            assert got == [msg(2), msg(3)]
        finally:
            md.close()

    def test_delivery_refuses_an_unknown_kind_and_an_unfit_uid(self, make_location: MakeLocation) -> None:
        location = make_location([msg(1)])
        _kind, _, path = location.partition(":")
        with pytest.raises(MaildropError):
            deliver_into(f"mh:{path}", msg(2))
        for uid in ("has space here", "", "x" * 71, "tab\there", "\u00e9t\u00e9-2026-12-01"):
            with pytest.raises(MaildropError):
                deliver_into(location, msg(2), uid=uid)
        md = open_maildrop(location)
        try:
            assert len(md.messages()) == 1
        finally:
            md.close()
