"""System-users mode: one process per session, as qpopper and inetd ran it.

The parent, running as root, only binds, accepts and forks; it never
reads a user's files and runs no threads (so forking is safe). Each child
serves one connection with its own event loop: it authenticates through
PAM as root, then drops to the user (see `_privileges`) before it opens
anything of the user's, and exits when the session ends.

Signals to the parent: SIGTERM stops accepting and passes SIGTERM on, so
each child finishes an UPDATE already under way and closes otherwise;
SIGINT does the same without waiting; SIGHUP reloads the user and APOP
databases and the certificates for sessions yet to come.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import selectors
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable

from ..config.options import Options
from ..server._privileges import preload_session_modules
from ..server._server import Server, bind_socket
from .operations import process_book
from .systemd import notify

log = logging.getLogger("qpopper.server")

_BUSY_REPLY = b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"


class ForkingServer:
    def __init__(
        self,
        server: Server,
        sockets: list[tuple[socket.socket, bool]] | None = None,
        reload: Callable[[], None] | None = None,
    ) -> None:
        # Load once here what every session needs, so that forked children
        # share it instead of each importing it again.
        preload_session_modules()
        self.server = server
        self.options: Options = server.options
        self._given = sockets or []
        self._listeners: list[tuple[socket.socket, bool]] = []
        self._children: dict[int, str] = {}  # pid -> client address
        self._per_ip: Counter[str] = Counter()
        self._stopping: str | None = None
        self._reload = False
        self._reloader = reload or server.reload
        # Set when metrics or the control socket are on: what is tidied when a session process ends.
        self.book = process_book(self.options)

    # ---- parent ---------------------------------------------------------------

    def bind(self) -> None:
        alternate = self.options.effective_tls_support == "alternate-port"
        if self._given:
            self._listeners = list(self._given)
        else:
            self._listeners = [(bind_socket(a), a.tls or alternate) for a in self.options.listen]
        for sock, _ in self._listeners:
            sock.setblocking(False)
        for sock, tls in self._listeners:
            name = sock.getsockname()
            log.info("listening on %s:%s%s (a process per session)", name[0], name[1], " (TLS)" if tls else "")

    @property
    def listeners(self) -> list[tuple[str, int, bool]]:
        return [(str(s.getsockname()[0]), int(s.getsockname()[1]), tls) for s, tls in self._listeners]

    def serve_forever(self) -> None:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        handlers = {
            signal.SIGTERM: lambda *_: self._stop("drain"),
            signal.SIGINT: lambda *_: self._stop("fast"),
            signal.SIGHUP: lambda *_: setattr(self, "_reload", True),
            signal.SIGCHLD: lambda *_: None,  # wakes the selector; reaped below
        }
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        selector = selectors.DefaultSelector()
        try:
            selector.register(wake_r, selectors.EVENT_READ, None)
            for sock, tls in self._listeners:
                selector.register(sock, selectors.EVENT_READ, tls)
            notify("READY=1")
            while self._stopping is None:
                for key, _ in selector.select(timeout=1.0):
                    if key.data is None:
                        try:
                            os.read(wake_r, 512)
                        except BlockingIOError:
                            pass
                    elif self._stopping is None:
                        self._accept(key.fileobj, bool(key.data))  # type: ignore[arg-type]
                self._reap()
                if self.book is not None:
                    self.book.restart_if_due()  # the exporter, if it died (within a second of its pause)
                if self._reload:
                    self._reload = False
                    self._reloader()
            notify("STOPPING=1")
            for sock, _ in self._listeners:
                selector.unregister(sock)
                sock.close()
            self._wait_for_children(selector)
        finally:
            selector.close()
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(wake_r)
            os.close(wake_w)

    def _stop(self, how: str) -> None:
        if self._stopping is None:
            self._stopping = how

    def _wait_for_children(self, selector: selectors.BaseSelector) -> None:
        log.info("stopping: %d sessions to end (%s)", len(self._children), self._stopping)
        for pid in list(self._children):
            self._signal(pid, signal.SIGTERM if self._stopping == "drain" else signal.SIGINT)
        deadline = time.monotonic() + (self.options.drain_timeout if self._stopping == "drain" else 5)
        while self._children and time.monotonic() < deadline:
            selector.select(timeout=0.2)
            self._reap()
        for pid in list(self._children):
            log.warning("session process %d did not end in time; killing it", pid)
            self._signal(pid, signal.SIGKILL)
        while self._children:
            self._reap(block=True)

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def _reap(self, block: bool = False) -> None:
        # Not only while sessions run: the exporter is a child too.
        while self._children or not block:
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                self._children.clear()
                self._per_ip.clear()
                return
            if pid == 0:
                return
            address = self._children.pop(pid, None)
            if self.book is not None:
                self.book.ended(pid, status)
            if address is not None:
                self._per_ip[address] -= 1
                if self._per_ip[address] <= 0:
                    del self._per_ip[address]
            if block:
                return

    def _accept(self, listener: socket.socket, implicit_tls: bool) -> None:
        try:
            conn, address = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.error("cannot accept: %s", exc.strerror)
                return
            raise
        host = str(address[0]) if isinstance(address, tuple) else "local"
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        if (
            len(self._children) >= self.options.max_connections
            or self._per_ip[host] >= self.options.max_connections_per_ip
        ):
            log.warning("%s: connection refused, limit reached", host)
            if self.server.services.tally is not None:
                full = len(self._children) >= self.options.max_connections
                self.server.services.tally.refused("max-connections" if full else "max-connections-per-ip")
            try:
                conn.setblocking(True)
                conn.settimeout(2)
                conn.sendall(_BUSY_REPLY)
            except OSError:
                pass
            conn.close()
            return
        if self.book is not None:
            self.book.before_fork()
        pid = os.fork()
        if pid == 0:
            # What the child inherited is never its garbage: left in the
            # collector's generations, a collection would walk it and write
            # to each object's header, copying the parent's pages one by one.
            gc.freeze()
            code = 1
            try:
                for sock, _ in self._listeners:
                    sock.close()
                if self.book is not None:
                    self.book.in_session_child()
                code = self._child(conn, implicit_tls)
            except BaseException:  # the child must never return into the parent's loop
                log.exception("session process failed")
            finally:
                os._exit(code)
        conn.close()
        if self.book is not None:
            self.book.forked(pid)
        self._children[pid] = host
        self._per_ip[host] += 1

    # ---- child ----------------------------------------------------------------

    def _child(self, conn: socket.socket, implicit_tls: bool) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        conn.setblocking(False)
        asyncio.run(self._serve_child(conn, implicit_tls))
        return 0

    async def _serve_child(self, conn: socket.socket, implicit_tls: bool) -> None:
        loop = asyncio.get_running_loop()
        if self.server.control is not None:
            await self.server.control.start()  # before the session becomes its user
        task = loop.create_task(self.server.serve_socket(conn, implicit_tls, self.server.behind_balancer(conn)))
        stopping: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks

        def stop(drain: bool) -> None:
            # A session in UPDATE finishes it; any other ends without deleting.
            stopper = loop.create_task(self.server.stop(drain=drain))
            stopping.add(stopper)
            stopper.add_done_callback(stopping.discard)

        loop.add_signal_handler(signal.SIGTERM, stop, True)
        loop.add_signal_handler(signal.SIGINT, stop, False)
        try:
            await task
        except asyncio.CancelledError:
            pass
        finally:
            # The session is over: a late SIGTERM may simply end the process.
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
