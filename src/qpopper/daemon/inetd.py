"""inetd mode: one session on stdin/stdout, as inetd, xinetd and systemd
`Accept=yes` units run it. stdin is normally the connected socket; plain
pipes (a test harness, ssh) work too."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import sys

from ..server._server import Server, accepted_socket_stream
from ..server._stream import PopStream


class _PipeReader(asyncio.Protocol):
    """The read half on a pipe: input goes to the stream; its end is only
    end of input, since replies still go out on the other pipe."""

    def __init__(self, stream: PopStream) -> None:
        self.stream = stream

    def data_received(self, data: bytes) -> None:
        self.stream.data_received(data)

    def eof_received(self) -> bool:
        self.stream.feed_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.stream.feed_eof()


async def _pipe_stream() -> PopStream:
    loop = asyncio.get_running_loop()
    stream = PopStream(loop)
    await loop.connect_write_pipe(lambda: stream, os.fdopen(os.dup(1), "wb", 0))
    read_transport, _ = await loop.connect_read_pipe(lambda: _PipeReader(stream), os.fdopen(os.dup(0), "rb", 0))
    stream.read_transport = read_transport
    return stream


async def serve_inetd(server: Server) -> None:
    """Serve the single connection on fd 0/1, then return."""
    if stat.S_ISSOCK(os.fstat(0).st_mode):
        sock = socket.socket(fileno=os.dup(0))
        # Keep the duplicate the only path to the peer: later output on
        # fd 1 (a stray print) must not reach the client.
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.close(devnull)
        sys.stdout = sys.stderr
        stream = await accepted_socket_stream(sock)
    else:
        stream = await _pipe_stream()
    await server.serve_stream(stream)
