"""The control socket: `who` lists this process's sessions, `kick USER` ends a user's.

Each serving process (the only one, each worker, each session process)
listens on its own Unix socket, `<control-dir>/<pid>.sock`, mode 0600 in a
directory of mode 0700; `qpopper-admin` asks every socket there and joins the
answers, so it works alike with workers and with a process per session.
A connection from anyone but root or the account the server started as
(checked with SO_PEERCRED, whatever the file's mode) gets one refusal.

The protocol is one request line (`who`, `kick NAME`) and one JSON object
in answer, then the connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from ..logtext import printable

if TYPE_CHECKING:
    from ._connection import Connection
    from ._server import Server

log = logging.getLogger("qpopper.server")

REQUEST_TIMEOUT = 5.0
MAX_REQUEST = 1024
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


def socket_path(directory: str, pid: int) -> str:
    return os.path.join(directory, f"{pid}.sock")


def peer_uid(sock: Any) -> int:
    """The uid of the process at the other end of a Unix socket."""
    _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return int(uid)


def describe(conn: Connection) -> dict[str, object]:
    """One line of `who`."""
    age = time.monotonic() - conn.connected_at
    return {
        "pid": os.getpid(),
        "user": conn.session.user or "",
        "address": conn.peer.host,
        "port": conn.peer.port,
        "since": round(time.time() - age, 3),
        "state": conn.state,
        "sent": getattr(conn.stream, "sent", 0),
    }


class ControlListener:
    """This process's control socket."""

    def __init__(self, server: Server, directory: str) -> None:
        self.server = server
        self.directory = directory
        # The service account: the uid this server started as (a session
        # process later runs as its user, who is not let in).
        self.allowed = {0, os.geteuid()}
        self.path: str | None = None
        self._listener: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen (in a session process: before it becomes the user)."""
        path = socket_path(self.directory, os.getpid())
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a pid's socket left by a process killed before
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(16)
            sock.setblocking(False)
            self._listener = await asyncio.start_unix_server(self._serve, sock=sock, limit=4 * MAX_REQUEST)
        except BaseException:
            sock.close()
            raise
        self.path = path

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self.path is not None:
            # A session process that became its user cannot: its parent removes it.
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            uid = peer_uid(writer.get_extra_info("socket"))
            # The request is read (bounded) even from a caller who is refused, so
            # that the refusal reaches them instead of a broken pipe.
            line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
            if uid not in self.allowed:
                log.warning("control socket: refused a request from uid %d", uid)
                answer: dict[str, object] = {"error": "permission denied: only root and the service account"}
            else:
                answer = self.answer(line[:MAX_REQUEST])
            writer.write(json.dumps(answer).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as exc:
            log.info("control socket: request dropped: %s", exc)
        except asyncio.CancelledError:
            # This process is ending (a session process whose session is over) while a request
            # is read: dropped, and not raised, or Python 3.11's stream callback logs a traceback.
            pass
        finally:
            writer.close()

    def answer(self, line: bytes) -> dict[str, object]:
        """The answer to one request line."""
        try:
            words = line.decode("utf-8").split()
        except UnicodeDecodeError:
            return {"error": "the request is not UTF-8"}
        if words == ["who"]:
            return {"sessions": [describe(conn) for conn in self.server.sessions()]}
        if len(words) == 2 and words[0] == "kick":
            user = words[1]
            kicked = busy = 0
            for conn in self.server.sessions():
                if conn.session.user == user and conn.session.authenticated:
                    if conn.kick():
                        kicked += 1
                    else:
                        busy += 1
            if kicked or busy:
                log.info("control socket: kick %s: %d ended, %d already in UPDATE", printable(user), kicked, busy)
            return {"kicked": kicked, "updating": busy}
        return {"error": "unknown request; the requests are: who, kick USER"}
