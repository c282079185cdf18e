"""The connection's stream (server/_stream.py) at its edges, over real sockets:
a client that half-closes, one that stops reading in the middle of a
download, one that resets the connection while the server writes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from conftest import PASSWORD
from qpopper import Controller
from qpopper.server._stream import PopStream
from qpopper.server._tally import CountingStream, Tally

Fill = Callable[[str, list[bytes]], Path]

BIG = b"Subject: big\n\n" + b"".join(b"line %07d of a big message\n" % i for i in range(300_000))


def _connect(server: Controller, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(20)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)  # before connect: sets the window
    sock.connect((server.host, server.port))
    assert sock.recv(512).startswith(b"+OK")
    return sock


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(1 << 20):
        data += chunk
    return data


def test_a_client_that_half_closes_after_quit_still_gets_every_reply(pop_server: Controller, fill: Fill) -> None:
    maildir = fill("alice", [b"Subject: one\n\nbody\n"])
    sock = _connect(pop_server)
    sock.sendall(b"USER alice\r\nPASS %s\r\nSTAT\r\nDELE 1\r\nQUIT\r\n" % PASSWORD.encode())
    sock.shutdown(socket.SHUT_WR)
    replies = _read_all(sock).split(b"\r\n")
    sock.close()
    assert replies[2] == b"+OK 1 22" and replies[3].startswith(b"+OK") and b"signing off" in replies[4]
    assert not any((maildir / "new").iterdir()) and not any((maildir / "cur").iterdir())


def test_a_client_that_stops_reading_holds_up_only_itself(
    pop_server: Controller, fill: Fill, monkeypatch: pytest.MonkeyPatch
) -> None:
    paused = threading.Event()
    pause = PopStream.pause_writing

    def counting_pause(stream: PopStream) -> None:
        paused.set()
        pause(stream)

    monkeypatch.setattr(PopStream, "pause_writing", counting_pause)
    fill("alice", [BIG])
    fill("bob", [b"Subject: small\n\nhi\n"])
    slow = _connect(pop_server, receive_buffer=65536)
    slow.sendall(b"USER alice\r\nPASS %s\r\nRETR 1\r\n" % PASSWORD.encode())
    assert paused.wait(10)  # the server filled the window and waits for this client's to drain
    other = _connect(pop_server)
    other.sendall(b"USER bob\r\nPASS %s\r\nSTAT\r\nQUIT\r\n" % PASSWORD.encode())
    assert b"+OK 1 " in _read_all(other)
    other.close()
    slow.sendall(b"QUIT\r\n")
    data = _read_all(slow)
    slow.close()
    _user_ok, _pass_ok, retr_ok, body = data.split(b"\r\n", 3)
    assert retr_ok.startswith(b"+OK ")
    assert body.startswith(BIG.replace(b"\n", b"\r\n") + b".\r\n")
    assert body.endswith(b"signing off (1 messages left).\r\n")


def test_a_reset_in_the_middle_of_a_download_loses_nothing_and_frees_the_maildrop(
    pop_server: Controller, fill: Fill
) -> None:
    fill("alice", [BIG, b"Subject: two\n\nsecond\n"])
    sock = _connect(pop_server)
    sock.sendall(b"USER alice\r\nPASS %s\r\nDELE 2\r\nRETR 1\r\n" % PASSWORD.encode())
    sock.recv(65536)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST while the server is writing
    deadline = time.monotonic() + 10
    while True:  # the session ends and releases the lock, deleting nothing
        again = _connect(pop_server)
        again.sendall(b"USER alice\r\nPASS %s\r\nSTAT\r\nQUIT\r\n" % PASSWORD.encode())
        replies = _read_all(again)
        again.close()
        if b"[IN-USE]" not in replies or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert b"+OK 2 " in replies


MakeStream = Callable[[asyncio.AbstractEventLoop, Callable[[PopStream], None]], PopStream]


@contextlib.asynccontextmanager
async def _served_stream(make: MakeStream = PopStream) -> AsyncIterator[tuple[PopStream, socket.socket]]:
    """A stream (`make(loop, on_connected)`) serving one real loopback
    connection, and the client's socket; both closed after."""
    loop = asyncio.get_running_loop()
    made: asyncio.Future[PopStream] = loop.create_future()
    server = await loop.create_server(lambda: make(loop, made.set_result), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = await loop.run_in_executor(None, lambda: socket.create_connection(("127.0.0.1", port), timeout=10))
    stream = None
    try:
        stream = await asyncio.wait_for(made, 10)
        yield stream, client
    finally:
        client.close()
        if stream is not None:
            stream.close()
        server.close()


def _run(main: Callable[[], Coroutine[Any, Any, None]], loop_name: str) -> None:
    factory = asyncio.new_event_loop if loop_name == "asyncio" else pytest.importorskip("uvloop").new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())


@pytest.mark.parametrize("counting", [False, True], ids=["PopStream", "CountingStream"])
def test_a_write_after_the_peers_reset_is_a_connection_error_under_uvloop(counting: bool) -> None:
    # uvloop raises RuntimeError for a write to a transport a reset closed (the
    # standard loop drops it): the session must see a lost connection, not an
    # internal error with a traceback (HAProxy's health checks reset this way).
    pytest.importorskip("uvloop")

    def counting_stream(loop: asyncio.AbstractEventLoop, made: Callable[[PopStream], None]) -> PopStream:
        return CountingStream(loop, made, Tally())

    async def main() -> None:
        async with _served_stream(counting_stream if counting else PopStream) as (stream, sock):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            try:  # the reset, as the session's read sees it: an error, or the end
                async with asyncio.timeout(10):
                    assert await stream.read(100) == b""
            except ConnectionError:
                pass
            assert stream.transport is not None
            async with asyncio.timeout(10):
                while not stream.transport.is_closing():
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)  # connection_lost has run: uvloop's handle is closed
            with pytest.raises(ConnectionResetError):
                stream.write(b"+OK greeting\r\n")

    _run(main, "uvloop")


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_a_read_waits_for_input_then_takes_it_and_reports_the_end(loop_name: str) -> None:
    async def main() -> None:
        async with _served_stream() as (stream, client):
            waiter = stream.input_waiter()
            assert waiter is not None and not waiter.done()  # nothing arrived yet
            client.sendall(b"USER alice\r\nPASS secret\r\n")
            await asyncio.wait_for(waiter, 10)
            assert stream.input_waiter() is None
            assert stream.take(12) == b"USER alice\r\n"  # at most the limit, the rest stays
            assert stream.take(100) == b"PASS secret\r\n"
            client.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(stream.read(100), 10) == b""  # the end of input

    _run(main, loop_name)


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_a_broken_connection_is_an_error_to_the_reader_not_an_end(loop_name: str) -> None:
    async def main() -> None:
        async with _served_stream() as (stream, _client):
            waiter = stream.input_waiter()
            assert waiter is not None
            stream.connection_lost(ConnectionResetError("reset by the test"))
            assert waiter.done() and stream.input_waiter() is None
            with pytest.raises(ConnectionResetError, match="reset by the test"):
                stream.take(100)

    _run(main, loop_name)


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_the_close_waits_for_unsent_bytes_and_only_for_them(loop_name: str) -> None:
    async def main() -> None:
        async with _served_stream() as (stream, client):
            stream.write(b"+OK bye\r\n")
            stream.close()
            await asyncio.wait_for(stream.wait_closed(timeout=5), 1)  # all of it is the kernel's: at once
            assert client.recv(100) == b"+OK bye\r\n"
        async with _served_stream() as (stream, client):
            stream.write(BIG * 4)  # 34 MB: far more than loopback's socket buffers hold (~10 MB)
            stream.close()
            closing = asyncio.ensure_future(stream.wait_closed(timeout=30))
            await asyncio.sleep(0.2)
            assert not closing.done()  # the session's end waits while its bytes are unsent
            received = await asyncio.get_running_loop().run_in_executor(None, _read_all, client)
            await asyncio.wait_for(closing, 10)
            assert received == BIG * 4  # every byte, then the end

    _run(main, loop_name)
