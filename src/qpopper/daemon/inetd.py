"""inetd mode: one session on stdin/stdout, as inetd, xinetd and systemd
`Accept=yes` units run it. stdin is normally the connected socket; plain
pipes (a test harness, ssh) and a terminal work too.

qpopper chose inetd or standalone when it was built, so inetd.conf lines
written for it carry no `-i`: `started_by_inetd` recognises that start
(a connected socket on stdin) so those lines keep working.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import sys

from ..errors import ConfigError
from ..server._server import Server, accepted_socket_stream
from ..server._stream import PopStream


def _is_connected_stream(fd: int) -> bool:
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return False
        with socket.socket(fileno=os.dup(fd)) as sock:
            if sock.type != socket.SOCK_STREAM:
                return False
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                return False
            sock.getpeername()
    except OSError:  # closed, not a socket, or not connected
        return False
    return True


def started_by_inetd() -> bool:
    """stdin is a connected stream socket (TCP, or a Unix socket inetd or
    systemd Accept=yes handed over): one connection, with or without -i.
    A listening socket (systemd Accept=no passes those as LISTEN_FDS) is not."""
    return _is_connected_stream(0)


def _kind(fd: int) -> str:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return "closed"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode):
        return "a character device"
    return "not a socket or pipe"


def _usable(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode) or os.isatty(fd)


def check_inetd_streams() -> None:
    """One clear line for stdin/stdout that cannot carry a session (a
    regular file, /dev/null), before the event loop fails on them."""
    for fd, name in ((0, "standard input"), (1, "standard output")):
        if not _usable(fd):
            raise ConfigError(
                f"inetd mode needs a connected socket or a pipe on {name}, which is {_kind(fd)}; "
                "to listen on a port, give an address (e.g. :110) instead of -i"
            )


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
        if server.speaks_kpop(sock):  # inetd's "kpop" line: qpopper -k on port 1109
            await server.serve_kpop_socket(sock)
            return
        stream = await accepted_socket_stream(sock)
    else:
        stream = await _pipe_stream()
    await server.serve_stream(stream)
