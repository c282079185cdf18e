"""inetd mode: one session on stdin/stdout, as inetd, xinetd and systemd
`Accept=yes` units run it. stdin is normally the connected socket; plain
pipes (a test harness, ssh) work too."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import sys

from ._server import Server, accepted_socket_streams


async def _pipe_streams() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=65536)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(0), "rb", 0))
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(os.dup(1), "wb", 0)
    )
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


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
        reader, writer = await accepted_socket_streams(sock)
    else:
        reader, writer = await _pipe_streams()
    await server.serve_stream(reader, writer)
