"""Retrieval without sockets: a real Maildir, an output buffer, a flush
that moves the buffer onto a pretend wire."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

from helpers import write_maildir_message
from qpopper.errors import MaildropError
from qpopper.extensions.xmangle.spec import parse_xmangle
from qpopper.maildrop import Maildrop
from qpopper.maildrop.location import open_maildrop
from qpopper.protocol import ComputeSizes, ListHeaders, SendMessage, Session, encode_whole, wire_size
from qpopper.server._retrieval import WRITE_CHUNK, Abort, Retrieval

T = TypeVar("T")

SMALL = b"From: a@example.org\nSubject: small one\nX-Note: first\n  folded\n\n.dot line\nbody\n"
# Over WRITE_CHUNK and read in several chunks; dots at line starts everywhere.
BIG = b"Subject: big one\n\n" + b"".join(b".%06d line of the big message\n" % n for n in range(40000))


class FakeSession:
    """The two things retrieval tells a session."""

    user = "alice"

    def __init__(self) -> None:
        self.unavailable: list[int] = []
        self.sizes: dict[int, int] | None = None

    def message_unavailable(self, index: int) -> None:
        self.unavailable.append(index)

    def sizes_computed(self, spec: Any, sizes: dict[int, int]) -> None:
        self.sizes = sizes


class Wire:
    """The connection's side: a buffer, a flush onto `sent`, a runner that
    runs inline and counts."""

    peer = "peer"

    def __init__(self, session: FakeSession) -> None:
        self.session = cast(Session, session)
        self.out = bytearray()
        self.sent = bytearray()
        self.flushes = 0
        self.calls: list[str] = []

    def trace_out(self, data: bytes) -> None:
        pass

    async def blocking(self, func: Callable[..., T], *args: Any) -> T:
        self.calls.append(func.__name__)
        return func(*args)

    async def flush(self) -> None:
        self.sent += self.out
        self.out.clear()
        self.flushes += 1

    def everything(self) -> bytes:
        return bytes(self.sent + self.out)


class Breaking:
    """A maildrop whose reads fail after `good` chunks."""

    def __init__(self, inner: Maildrop, good: int) -> None:
        self._inner = inner
        self._good = good

    def messages(self) -> Any:
        return self._inner.messages()

    def read(self, index: int, chunk_size: int = 65536) -> Iterator[bytes]:
        for n, chunk in enumerate(self._inner.read(index, chunk_size)):
            if n >= self._good:
                raise MaildropError("the disk went away")
            yield chunk


@pytest.fixture
def maildrop(tmp_path: Path) -> Iterator[Maildrop]:
    md = tmp_path / "Maildir"
    write_maildir_message(md, SMALL, name="1000.a.host")
    write_maildir_message(md, BIG, name="1001.b.host")
    for sub in ("cur", "tmp"):
        (md / sub).mkdir(exist_ok=True)
    drop = open_maildrop(f"maildir:{md}")
    yield drop
    drop.close()


def make(maildrop: Any) -> tuple[Retrieval, Wire, FakeSession]:
    session = FakeSession()
    wire = Wire(session)
    return Retrieval(maildrop, wire), wire, session


def test_a_small_message_goes_whole_in_one_buffer(maildrop: Maildrop) -> None:
    retrieval, wire, _ = make(maildrop)
    asyncio.run(retrieval.send_message(SendMessage(0, None, b"+OK\r\n")))
    assert wire.flushes == 0
    assert wire.everything() == b"+OK\r\n" + encode_whole(SMALL) + b".\r\n"


def test_a_big_message_streams_with_flushes_and_the_same_bytes(maildrop: Maildrop) -> None:
    retrieval, wire, _ = make(maildrop)
    asyncio.run(retrieval.send_message(SendMessage(1, None, b"+OK\r\n")))
    assert wire.flushes >= len(BIG) // WRITE_CHUNK
    assert wire.everything() == b"+OK\r\n" + encode_whole(BIG) + b".\r\n"


def test_top_cuts_the_body(maildrop: Maildrop) -> None:
    retrieval, wire, _ = make(maildrop)
    asyncio.run(retrieval.send_message(SendMessage(1, 2, b"+OK\r\n")))
    assert wire.everything() == b"+OK\r\nSubject: big one\r\n\r\n..000000 line of the big message\r\n" \
        b"..000001 line of the big message\r\n.\r\n"


def test_an_error_before_anything_went_out_takes_the_reply_back(maildrop: Maildrop) -> None:
    retrieval, wire, session = make(Breaking(maildrop, good=1))
    wire.out += b"+OK earlier reply\r\n"
    asyncio.run(retrieval.send_message(SendMessage(1, None, b"+OK\r\n")))
    assert wire.everything() == b"+OK earlier reply\r\n" and session.unavailable == [1]


def test_an_unreadable_message_is_reported_to_the_session(maildrop: Maildrop) -> None:
    retrieval, wire, session = make(Breaking(maildrop, good=0))
    asyncio.run(retrieval.send_message(SendMessage(0, None, b"+OK\r\n")))
    assert wire.everything() == b"" and session.unavailable == [0]


def test_an_error_after_part_went_out_aborts(maildrop: Maildrop) -> None:
    retrieval, wire, session = make(Breaking(maildrop, good=6))
    with pytest.raises(Abort):
        asyncio.run(retrieval.send_message(SendMessage(1, None, b"+OK\r\n")))
    assert wire.flushes >= 1 and session.unavailable == []


def test_xlst_and_euidl_listings(maildrop: Maildrop) -> None:
    retrieval, wire, _ = make(maildrop)
    uids = [m.uid for m in maildrop.messages()]
    sizes = [m.size for m in maildrop.messages()]
    entries = ((0, sizes[0], uids[0]), (1, sizes[1], uids[1]))
    asyncio.run(retrieval.list_headers(ListHeaders(b"+OK\r\n", entries, "x-note", "xlst")))
    assert wire.everything() == b"+OK\r\n1 X-Note: first\r\n  folded\r\n.\r\n"
    wire.out.clear()
    asyncio.run(retrieval.list_headers(ListHeaders(b"+OK ", entries[1:], "subject", "euidl", single=True)))
    assert wire.everything() == b"+OK 2 %s %d big one\r\n" % (uids[1].encode(), sizes[1])


def test_mangling_is_done_once_for_list_then_retr(maildrop: Maildrop) -> None:
    retrieval, wire, session = make(maildrop)
    spec = parse_xmangle("text=plain")

    async def both() -> None:
        await retrieval.compute_sizes(ComputeSizes(spec, (0,)))
        await retrieval.send_message(SendMessage(0, None, b"+OK\r\n", mangle=spec))

    asyncio.run(both())
    assert wire.calls == ["mangle_message"]
    assert session.sizes is not None
    mangled = asyncio.run(retrieval.mangled(0, spec))  # the kept result: no second call
    assert wire.calls == ["mangle_message"]
    assert session.sizes == {0: wire_size(mangled)}
    assert wire.everything() == b"+OK\r\n" + encode_whole(mangled) + b".\r\n"
