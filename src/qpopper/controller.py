"""A real server in a background thread, for tests and embedding.

    with Controller(passwd_file="users", mail_location="maildir:/tmp/%u") as pop:
        client = poplib.POP3(pop.host, pop.port)

The server binds port 0 on loopback unless told otherwise and reports the
port it got. `start` returns only once the server listens, and any start-up
error (a bad passwd-file, a port in use) is raised in the caller's thread.
Callers that own an event loop use `qpopper.Server` directly instead
(`async with Server(options) as server`).

A Controller is hermetic: unless told otherwise it reads no file under
/etc (no ftpusers deny list, no APOP database), never picks PAM, and never
changes the uid of the process it runs in; it needs an authenticator or a
passwd-file. Its waits (`wait_sessions_ended`, `wait_deleted`,
`wait_retrieved`) are woken by the server, never by polling.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from .auth import Authenticator
from .config.options import ListenAddress, Options
from .errors import ConfigError
from .server import Server


class Controller:
    """Runs a `Server` on its own event loop in a daemon thread.

    `options`: a complete `Options` (then `host`, `port` must stay at
    their defaults, or a ConfigError says they would be ignored);
    otherwise the server listens on `host`:`port` with `settings` (Options
    field names) applied. `ready_timeout`: how long `start` waits for the
    listener before raising TimeoutError.
    """

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
        if options is not None and (host != "127.0.0.1" or port != 0):
            raise ConfigError("give host and port in options.listen, not beside options (they would be ignored)")
        if options is None:
            # The site files a daemon reads by default (/etc/ftpusers, the
            # APOP database) are off unless the caller names them.
            base = Options(
                hostname="localhost",
                auth_fail_delay=0.0,
                listen=(ListenAddress(host, port),),
                nonauth_file=None,
                apop_file=None,
            )
            settings = {"auth_backend": "passwd-file", **settings}
        else:
            base = options
        if settings:
            base = base.replace(**settings)
        if authenticator is None and base.passwd_file is None:
            raise ConfigError("a Controller needs an authenticator or a passwd_file (it never uses PAM)")
        self.options = base
        self.ready_timeout = ready_timeout
        self._authenticator = authenticator
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Server | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        # Totals over every UPDATE since start, and who waits on them.
        self._commits = threading.Condition()
        self._deleted = 0
        self._retrieved = 0

    @property
    def server(self) -> Server:
        """The running Server (RuntimeError before `start`)."""
        if self._server is None:
            raise RuntimeError("the controller is not started")
        return self._server

    @property
    def host(self) -> str:
        """The address the first listener is bound to."""
        return self.server.addresses[0][0]

    @property
    def port(self) -> int:
        """The port of the first listener (the one bound when port 0 was asked)."""
        return self.server.port

    @property
    def url(self) -> str:
        """pop3://host:port of the first listener (pop3s:// for implicit TLS)."""
        host, port, tls = self.server.listeners[0]
        shown = f"[{host}]" if ":" in host else host
        return f"{'pop3s' if tls else 'pop3'}://{shown}:{port}"

    @property
    def deleted(self) -> int:
        """Messages deleted by every UPDATE since `start`."""
        with self._commits:
            return self._deleted

    @property
    def retrieved(self) -> int:
        """Messages retrieved whole in sessions that reached UPDATE since `start`."""
        with self._commits:
            return self._retrieved

    def start(self) -> Controller:
        """Start the server; returns once it listens. Start-up errors are
        raised here; TimeoutError after `ready_timeout` seconds."""
        if self._thread is not None:
            return self
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="qpopper-controller", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.ready_timeout):
            raise TimeoutError(f"qpopper server did not start within {self.ready_timeout} s")
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
            self._server.services.committed = self._committed
            await self._server.start()
        except BaseException as exc:  # noqa: BLE001 - handed to start(), which re-raises it in the caller's thread
            self._error = exc
            self._server = None
            self._ready.set()
            return
        self._ready.set()
        await self._server.serve_forever()

    def _committed(self, user: str, deleted: int, retrieved: int) -> None:
        with self._commits:
            self._deleted += deleted
            self._retrieved += retrieved
            self._commits.notify_all()

    def _wait_count(self, what: str, n: int, timeout: float) -> None:
        with self._commits:
            if not self._commits.wait_for(lambda: getattr(self, what) >= n, timeout):
                raise TimeoutError(f"{getattr(self, what)} messages {what.strip('_')} after {timeout} s, not {n}")

    def wait_deleted(self, n: int, timeout: float = 10.0) -> None:
        """Return once clients have deleted `n` messages in all (counted at
        UPDATE, before QUIT's +OK is sent); TimeoutError otherwise."""
        self._wait_count("_deleted", n, timeout)

    def wait_retrieved(self, n: int, timeout: float = 10.0) -> None:
        """Return once sessions that reached UPDATE have retrieved `n`
        messages whole in all; TimeoutError otherwise."""
        self._wait_count("_retrieved", n, timeout)

    def wait_sessions_ended(self, timeout: float = 10.0) -> None:
        """Return once no session runs (their maildrops released);
        TimeoutError otherwise."""
        loop, server = self._loop, self.server
        assert loop is not None
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(server.wait_idle(), timeout), loop)
        try:
            future.result(timeout + 1)
        except TimeoutError:
            raise TimeoutError(f"sessions still running after {timeout} s") from None

    def stop(self) -> None:
        """Stop the server: sessions end (one in UPDATE finishes first)."""
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
