"""A real server in a background thread, for tests and embedding.

    with Controller(passwd_file="users", mail_location="maildir:/tmp/%u") as pop:
        client = poplib.POP3(pop.host, pop.port)

The server binds port 0 on loopback unless told otherwise and reports the
port it got. `start` returns only once the server listens, and any start-up
error (a bad passwd-file, a port in use) is raised in the caller's thread.
Callers that own an event loop use `qpopper.Server` directly instead
(`async with Server(options) as server`).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from .auth import Authenticator
from .config.options import ListenAddress, Options
from .server import Server


class Controller:
    def __init__(
        self,
        options: Options | None = None,
        *,
        authenticator: Authenticator | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        ready_timeout: float = 10.0,
        **settings: Any,
    ) -> None:
        base = options or Options(
            hostname="localhost",
            auth_fail_delay=0.0,
            listen=(ListenAddress(host, port),),
        )
        if options is None or settings:
            base = base.replace(**settings)
        self.options = base
        self._authenticator = authenticator
        self._ready_timeout = ready_timeout
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Server | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def server(self) -> Server:
        if self._server is None:
            raise RuntimeError("the controller is not started")
        return self._server

    @property
    def host(self) -> str:
        return self.server.addresses[0][0]

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> Controller:
        if self._thread is not None:
            return self
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="qpopper-controller", daemon=True)
        self._thread.start()
        if not self._ready.wait(self._ready_timeout):
            raise TimeoutError("qpopper server did not start in time")
        if self._error is not None:
            self._thread.join()
            self._thread = None
            error, self._error = self._error, None
            raise error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        try:
            self._server = Server(self.options, self._authenticator)
            await self._server.start()
        except BaseException as exc:  # noqa: BLE001 - handed to start(), which re-raises it in the caller's thread
            self._error = exc
            self._server = None
            self._ready.set()
            return
        self._ready.set()
        await self._server.serve_forever()

    def stop(self) -> None:
        thread, loop, server = self._thread, self._loop, self._server
        if thread is None or loop is None or server is None:
            return
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(self.options.drain_timeout + 10)
        thread.join()
        self._thread = None
        self._server = None

    def __enter__(self) -> Controller:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
