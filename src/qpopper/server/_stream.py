"""A client connection's byte stream: one protocol object for reading and writing.

asyncio's StreamReader, StreamReaderProtocol and StreamWriter are three
objects (with a deque, two futures and a weak reference set) per connection,
and every command passes through all of them. A POP session needs much
less: read what has arrived, write a reply, wait while the client's window
is full, upgrade to TLS. Hundreds of idle sessions each hold one of these,
and a download passes through `read` and `write` once per message, so both
the memory and the per-command path are kept small.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, cast


def _give_up(closed: asyncio.Future[None]) -> None:
    if not closed.done():
        closed.set_result(None)


class PopStream(asyncio.Protocol):
    """Both halves of one client connection, as a protocol of its transport.

    `on_connected` runs when the (plain or TLS) transport is ready; it
    starts the session task.
    """

    __slots__ = ("_buffer", "_closed", "_drain_waiter", "_eof", "_error", "_loop", "_lost", "_on_connected",
                 "_over_ssl", "_paused", "_read_waiter", "read_transport", "transport")

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 on_connected: Callable[[PopStream], None] | None = None) -> None:
        self._loop = loop
        self.transport: asyncio.WriteTransport | None = None
        # The read side when it is a different transport (inetd on pipes).
        self.read_transport: asyncio.BaseTransport | None = None
        self._buffer = bytearray()
        self._eof = False
        self._lost = False
        self._error: BaseException | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] | None = None
        self._on_connected = on_connected
        self._over_ssl = False

    # ---- protocol callbacks ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:
            return  # the second half of a pipe pair: wired up by the caller
        self.transport = cast(asyncio.WriteTransport, transport)  # uvloop's are not subclasses
        self._over_ssl = transport.get_extra_info("sslcontext") is not None
        on_connected, self._on_connected = self._on_connected, None
        if on_connected is not None:
            on_connected(self)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        # Keep the sending half open: a client may half-close after QUIT
        # and still read the answer (TLS cannot do that).
        return not self._over_ssl

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._eof = True
        if exc is not None:
            self._error = exc
        self._wake_reader()
        self._paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("Connection lost"))
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_reader(self) -> None:
        waiter, self._read_waiter = self._read_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---- reading -------------------------------------------------------------

    async def read(self, limit: int) -> bytes:
        """Up to `limit` bytes as soon as any are there; b"" at end of input."""
        while (waiter := self.input_waiter()) is not None:
            await waiter
        return self.take(limit)

    def input_waiter(self) -> asyncio.Future[None] | None:
        """None when `take` has something to return (input, its end or the
        connection's error); else a future done when it has. A session
        awaits this future itself after every reply, so that a read costs
        no coroutine and an idle session holds no frame for it."""
        if self._buffer or self._eof or self._error is not None:
            return None
        waiter = self._read_waiter = self._loop.create_future()
        return waiter

    def take(self, limit: int) -> bytes:
        """Up to `limit` bytes of what has arrived, b"" at end of input; the
        connection's error if it broke."""
        if self._error is not None:
            raise self._error
        if len(self._buffer) <= limit:
            data = bytes(self._buffer)
            self._buffer.clear()
        else:
            data = bytes(self._buffer[:limit])
            del self._buffer[:limit]
        return data

    def feed_eof(self) -> None:
        """End the input as if the client had (a timeout wakes the reader)."""
        self._eof = True
        self._wake_reader()

    def unread(self, data: bytes) -> None:
        """Put bytes back in front of the input (what followed a PROXY header)."""
        self._buffer[:0] = data
        self._wake_reader()

    def discard_buffered(self) -> int:
        """Drop what arrived and was not read yet (plaintext after STLS)."""
        n = len(self._buffer)
        self._buffer.clear()
        return n

    # ---- writing -------------------------------------------------------------

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            self.transport.write(data)
        except RuntimeError:  # uvloop's word for a transport the peer's reset closed
            raise ConnectionResetError("connection closed by the peer") from None

    async def drain(self) -> None:
        """Wait while the client's receive window is full."""
        if self._error is not None:
            raise self._error
        if self._lost:
            raise ConnectionResetError("Connection lost")
        if self.transport is not None and self.transport.is_closing():
            await asyncio.sleep(0)  # let connection_lost arrive
        if self._paused:
            waiter = self._drain_waiter = self._loop.create_future()
            await waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.read_transport is not None:
            self.read_transport.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the stream runs on. Python 3.11's asyncio.get_running_loop
        makes a getpid system call each time; a session asks this instead."""
        return self._loop

    async def wait_closed(self, timeout: float | None = None) -> None:
        """Until the transport has closed, or `timeout` seconds have passed
        (then the stream is given up: later calls return at once too)."""
        if self._lost or self._closes_at_once():
            return
        if self._closed is None:
            self._closed = self._loop.create_future()
        if timeout is None:
            await self._closed
            return
        timer = self._loop.call_later(timeout, _give_up, self._closed)
        try:
            await self._closed
        finally:
            timer.cancel()

    def _closes_at_once(self) -> bool:
        """A closed plain socket with nothing left to send: every byte is
        the kernel's already and the loop closes the socket on its next
        turn, so waiting for that would cost a session a future, a timer
        and a turn. TLS (its close_notify) and pipes (two transports) are
        waited for."""
        transport = self.transport
        return (
            transport is not None
            and not self._over_ssl
            and self.read_transport is None
            and transport.is_closing()
            and transport.get_write_buffer_size() == 0
        )

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if self.transport is None:
            return default
        return self.transport.get_extra_info(name, default)

    async def start_tls(self, context: ssl.SSLContext, ssl_handshake_timeout: float | None = None) -> None:
        """STLS: shake hands as the server over the current transport."""
        assert self.transport is not None
        new = await self._loop.start_tls(
            self.transport, self, context, server_side=True, ssl_handshake_timeout=ssl_handshake_timeout
        )
        assert new is not None
        self.transport = new
        self._over_ssl = True
