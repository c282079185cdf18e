"""The stream faults: a small POP3-aware proxy in front of the test server.

The client connects to the proxy, the proxy to the real server on
loopback. While the session is in clear text the proxy reads it line by
line, pairs replies with the commands they answer, and acts out the
plan's stream faults (see _faults); after STLS, or on an implicit-TLS
port, it only copies bytes (a throttle still applies). Putting the faults
here keeps every line of fault code out of the server's own stream.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import re
import threading

from ._faults import Fault, FaultPlan

_MULTILINE_ALWAYS = {b"RETR", b"TOP", b"CAPA"}
_MULTILINE_WITHOUT_ARGUMENT = {b"LIST", b"UIDL", b"AUTH"}
_STAMP = re.compile(rb" ?<[^<>]*@[^<>]*>")
_NOT_TLS = b"-ERR scripted fault: this is not a TLS handshake\r\n"
_LINE_LIMIT = 1 << 20


class _Session:
    """One proxied connection."""

    def __init__(self, plan: FaultPlan, client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 server: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.plan = plan
        self.creader, self.cwriter = client
        self.sreader, self.swriter = server
        self.user: str | None = None
        self.commands: collections.deque[bytes] = collections.deque()
        self.raw = False  # after STLS: bytes only
        self.greeted = False
        self.auth_exchange = False
        self.throttle: Fault | None = plan.take("throttle", None)
        self.reply_left: int | None = None  # octets a drop lets through, while one is armed
        self.closed = asyncio.Event()

    def close(self) -> None:
        for writer in (self.cwriter, self.swriter):
            writer.close()
        self.closed.set()

    async def to_client(self, data: bytes) -> None:
        if self.throttle is None:
            self.cwriter.write(data)
            await self.cwriter.drain()
            return
        rate = self.throttle.bytes
        piece = max(1, rate // 10)
        for start in range(0, len(data), piece):
            chunk = data[start : start + piece]
            self.cwriter.write(chunk)
            await self.cwriter.drain()
            await asyncio.sleep(len(chunk) / rate)

    def _learn_user(self, line: bytes) -> None:
        words = line.split()
        if len(words) >= 2 and words[0].upper() in (b"USER", b"APOP"):
            self.user = words[1].decode("utf-8", "replace")
            if self.throttle is None:
                self.throttle = self.plan.take("throttle", self.user)

    async def client_to_server(self) -> None:
        try:
            await self._client_to_server()
        except (OSError, ValueError, asyncio.IncompleteReadError):
            pass  # a peer gone, or a line past the limit: the session ends
        finally:
            self.close()

    async def server_to_client(self) -> None:
        try:
            await self._server_to_client()
        except (OSError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            self.close()

    async def _client_to_server(self) -> None:
        while not self.closed.is_set():
            if self.raw:
                data = await self.creader.read(65536)
            else:
                data = await self.creader.readline()
            if not data:
                break
            if not self.raw and not self.auth_exchange:
                word, _, rest = data.strip().partition(b" ")
                word = word.upper()
                self._learn_user(data)
                if word == b"QUIT" and self.plan.take("drop-before-update", self.user) is not None:
                    break
                if word == b"AUTH" and rest:
                    self.auth_exchange = True
                self.commands.append(word + (b" " if rest else b""))
            self.swriter.write(data)
            await self.swriter.drain()

    def _is_multiline(self, command: bytes) -> bool:
        word = command.strip()
        return word in _MULTILINE_ALWAYS or (word in _MULTILINE_WITHOUT_ARGUMENT and not command.endswith(b" "))

    def _reply_starts(self, data: bytes) -> bool:
        """A status line answering the oldest command: arm a drop if one
        applies; True if a multi-line body follows."""
        command = self.commands.popleft()
        self.auth_exchange = False
        if not (data.startswith(b"+OK") and self._is_multiline(command)):
            return False
        kind = "drop-retr" if command.strip() == b"RETR" else "drop-multiline"
        fault = self.plan.take(kind, self.user)
        if fault is None and kind == "drop-retr":
            fault = self.plan.take("drop-multiline", self.user)
        if fault is not None:
            self.reply_left = fault.bytes
        return True

    async def _server_to_client(self) -> None:
        in_multiline = False
        while not self.closed.is_set():
            data = await (self.sreader.read(65536) if self.raw else self.sreader.readline())
            if not data:
                break
            if self.raw:
                pass
            elif not self.greeted:
                self.greeted = True
                if self.plan.take("no-apop-stamp", None) is not None:
                    data = _STAMP.sub(b"", data)
            elif in_multiline:
                in_multiline = data != b".\r\n"
            elif data.startswith(b"+ ") or data == b"+\r\n" or not self.commands:
                pass  # a SASL challenge: the AUTH command still waits for its answer
            elif self.commands[0].strip() == b"STLS" and data.startswith(b"+OK"):
                self.commands.popleft()
                await self.to_client(data)
                if self.plan.take("tls-fail", self.user) is not None:
                    await self.to_client(_NOT_TLS)
                    break
                self.raw = True
                continue
            else:
                in_multiline = self._reply_starts(data)
            if self.reply_left is not None:
                if len(data) >= self.reply_left:
                    await self.to_client(data[: self.reply_left])
                    break
                self.reply_left -= len(data)
            await self.to_client(data)


class FaultProxy:
    """Listens on loopback for each of the server's ports and forwards to
    it; runs its own event loop in a daemon thread."""

    def __init__(self, plan: FaultPlan, host: str, targets: list[tuple[int, bool]], first_port: int = 0) -> None:
        self.plan = plan
        self._first_port = first_port
        self.host = host
        self._targets = targets
        self.listeners: list[tuple[str, int, bool]] = []
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._sessions: set[_Session] = set()
        # The proxy's own ports towards the server: the server's trace names
        # them as the peer, which tells this server's sessions from others'.
        self.upstream_ports: set[int] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qpopper-fault-proxy", daemon=True)

    def start(self) -> None:
        """Bind every listener (errors raised here), then serve."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._bind(), self._loop).result(10)

    async def _bind(self) -> None:
        for n, (port, tls) in enumerate(self._targets):
            server = await asyncio.start_server(
                functools.partial(self._serve, port=port, tls=tls),
                self.host,
                self._first_port if n == 0 else 0,
                limit=_LINE_LIMIT,
            )
            self._servers.append(server)
            name = server.sockets[0].getsockname()
            self.listeners.append((str(name[0]), int(name[1]), tls))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int, tls: bool) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if tls and self.plan.take("tls-fail", None) is not None:
                writer.write(_NOT_TLS)
                await writer.drain()
                writer.close()
                return
            upstream = await asyncio.open_connection(self.host, port, limit=_LINE_LIMIT)
            self.upstream_ports.add(int(upstream[1].get_extra_info("sockname")[1]))
            session = _Session(self.plan, (reader, writer), upstream)
            session.raw = tls
            self._sessions.add(session)
            pumps = [
                asyncio.ensure_future(session.client_to_server()),
                asyncio.ensure_future(session.server_to_client()),
            ]
            try:
                await session.closed.wait()
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
                self._sessions.discard(session)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            writer.close()
        finally:
            self._tasks.discard(task)

    async def _close(self) -> None:
        for server in self._servers:
            server.close()
        # Closing the sockets ends each session's pumps; cancelling the
        # handler tasks instead would trip asyncio 3.11's connection callback.
        for session in list(self._sessions):
            session.close()
        if self._tasks:
            _, late = await asyncio.wait(list(self._tasks), timeout=5)
            for task in late:
                task.cancel()

    def stop(self) -> None:
        """Close the listeners and every proxied connection."""
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
