"""Retrieval: a session's messages and listings from the maildrop to the
output buffer.

- RETR and TOP (`SendMessage`): a message that comes in one read is
  encoded whole; a longer one streams through a `StuffingEncoder`, the
  buffer flushed every WRITE_CHUNK bytes so a big message never sits in
  memory. A read error before any of the reply went out takes the reply
  back (the session answers as for an unreadable message); after, the
  only honest end is to close (`Abort`).
- XTND XLST and EUIDL header listings (`ListHeaders`).
- XMANGLE: the condensed message, and the sizes LIST reports for it
  (`ComputeSizes`), with the last result kept so LIST n then RETR n
  condenses once.
- The UIDs a backend deferred (`ResolveUids`).

It writes into its connection's buffer and calls its flush (the `Output`
it is given); nothing here knows the stream, so tests give it an object
with a bytearray and a fake flush.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from ..errors import MaildropError
from ..extensions.xmangle.messages import mangle_message, too_big_to_mangle
from ..extensions.xmangle.spec import MangleSpec
from ..extensions.xtnd import euidl_value, find_header, header_lines, xlst_lines
from ..maildrop import Maildrop
from ..maildrop._base import size_of
from ..protocol import (
    ComputeSizes,
    ListHeaders,
    ResolveUids,
    SendMessage,
    Session,
    StuffingEncoder,
    encode_whole,
    wire_size,
)

log = logging.getLogger("qpopper.session")

T = TypeVar("T")

# Messages are written in chunks of about this size, waiting for the
# client to take each before reading the next from disk.
WRITE_CHUNK = 256 * 1024
# Maildrops up to this many messages get their deferred UIDs on the event
# loop (about 5 µs each for mbox, read with pread from the page cache).
QUICK_UIDS = 1000


class Abort(Exception):
    """End the connection at once, without a reply: half a message is out."""


class Output(Protocol):
    """What retrieval needs of its connection (the Connection is one)."""

    @property
    def session(self) -> Session: ...
    @property
    def peer(self) -> object: ...
    out: bytearray  # the reply buffer; flush() sends it
    async def flush(self) -> None: ...
    def trace_out(self, data: bytes) -> None: ...
    async def blocking(self, func: Callable[..., T], *args: Any) -> T: ...


class Retrieval:
    """Serves one open maildrop's messages into its connection's buffer.

    Holds the connection, not copies of its parts: one of these lives as
    long as every logged-in session, and idle sessions are counted in bytes."""

    __slots__ = ("_conn", "_last_mangled", "maildrop")

    def __init__(self, maildrop: Maildrop, conn: Output) -> None:
        self.maildrop = maildrop
        self._conn = conn
        self._last_mangled: tuple[tuple[int, MangleSpec], bytes] | None = None

    async def send_message(self, effect: SendMessage) -> None:
        conn = self._conn
        if effect.mangle is not None and not too_big_to_mangle(self.maildrop, effect.index):
            await self._send_mangled(effect, effect.mangle)
            return
        chunks = self.maildrop.read(effect.index)
        try:
            first = next(chunks, b"")
        except (MaildropError, OSError) as exc:
            log.error("%s: cannot read message %d of %s: %s", conn.peer, effect.index + 1, conn.session.user, exc)
            conn.session.message_unavailable(effect.index)
            return
        out = conn.out
        start = len(out)  # this reply's first byte while nothing of it has been sent
        out += effect.status
        encoder: StuffingEncoder | None = None
        try:
            second = next(chunks, None)
            if second is None and effect.body_lines is None:
                out += encode_whole(first)  # the usual RETR: the message came in one read
            else:
                encoder = StuffingEncoder(effect.body_lines)
                out += encoder.encode(first)
                chunk = second
                while chunk is not None and not encoder.done:
                    out += encoder.encode(chunk)
                    if len(out) >= WRITE_CHUNK:
                        if start >= 0:  # the reply starts going out: trace it, once
                            conn.trace_out(effect.status)
                            start = -1
                        await conn.flush()
                    chunk = next(chunks, None)
        except (MaildropError, OSError) as exc:
            log.error("%s: reading message %d of %s failed: %s", conn.peer, effect.index + 1, conn.session.user, exc)
            if start < 0:
                raise Abort() from exc  # half a message is on the wire: the only honest end is a close
            del out[start:]  # none of it went out: take it back and answer like an unreadable message
            conn.session.message_unavailable(effect.index)
            return
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        if start >= 0:
            conn.trace_out(effect.status)
        if encoder is not None:
            out += encoder.finish()
        out += b".\r\n"

    async def _send_mangled(self, effect: SendMessage, spec: MangleSpec) -> None:
        conn = self._conn
        try:
            mangled = await self.mangled(effect.index, spec)
        except (MaildropError, OSError) as exc:
            log.error("%s: cannot read message %d of %s: %s", conn.peer, effect.index + 1, conn.session.user, exc)
            conn.session.message_unavailable(effect.index)
            return
        if effect.body_lines is None:
            body = encode_whole(mangled)
        else:
            top = StuffingEncoder(effect.body_lines)
            body = top.encode(mangled) + top.finish()
        conn.trace_out(effect.status)
        conn.out += effect.status + body + b".\r\n"

    async def mangled(self, index: int, spec: MangleSpec) -> bytes:
        """Message `index` condensed by XMANGLE; the last one is kept, so
        LIST n and RETR n in a row mangle once."""
        key = (index, spec)
        if self._last_mangled is not None and self._last_mangled[0] == key:
            return self._last_mangled[1]
        result = await self._conn.blocking(mangle_message, self.maildrop, index, spec)
        self._last_mangled = (key, result)
        return result

    async def compute_sizes(self, effect: ComputeSizes) -> None:
        """The sizes LIST shows under XMANGLE: those of the condensed form."""
        await self._conn.flush()
        sizes = {}
        for index in effect.indices:
            if too_big_to_mangle(self.maildrop, index):
                sizes[index] = size_of(self.maildrop.messages(), index)  # sent as stored
            else:
                sizes[index] = wire_size(await self.mangled(index, effect.spec))
        self._conn.session.sizes_computed(effect.spec, sizes)

    async def list_headers(self, effect: ListHeaders) -> None:
        """XTND XLST and EUIDL: one header field of each message listed."""
        out = bytearray() if effect.single else bytearray(effect.status)
        for index, size, uid in effect.entries:
            try:
                lines = await self._conn.blocking(header_lines, self.maildrop, index)
            except (MaildropError, OSError) as exc:
                log.error("%s: cannot read message %d: %s", self._conn.peer, index + 1, exc)
                lines = []
            field = find_header(lines, effect.header)
            if effect.style == "xlst":
                for line in xlst_lines(index + 1, field):
                    out += line
            else:
                out += b"%d %s %d " % (index + 1, uid.encode("ascii"), size) + euidl_value(field) + b"\r\n"
        if effect.single:
            self._conn.out += effect.status + bytes(out)
        else:
            self._conn.out += out + b".\r\n"

    async def resolve_uids(self, effect: ResolveUids) -> None:
        """UIDs a backend left for first use: worked out on the loop for a
        small maildrop, in a worker for a big one (a 50,000-message mbox
        takes a few tenths of a second to hash)."""
        conn = self._conn
        try:
            if len(effect.messages) <= QUICK_UIDS:
                effect.messages.resolve_uids()
            else:
                await conn.flush()
                await conn.blocking(effect.messages.resolve_uids)
        except (MaildropError, OSError) as exc:
            log.error("%s: cannot work out the UIDs of %s: %s", conn.peer, conn.session.user, exc)
            conn.session.uids_resolved(ok=False)
            return
        conn.session.uids_resolved()
