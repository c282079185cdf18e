"""Several serving processes on one set of listening sockets.

An asyncio server runs Python on one core; a host with more cores serves
more sessions with more processes. The parent binds the listeners (or takes
systemd's), forks `workers` children that each run the ordinary event-loop
server on the inherited sockets (the kernel gives each new connection to
one process waiting in accept), and then only supervises: it passes
SIGTERM, SIGINT and SIGHUP on, starts a new child for one that dies, and
exits when all have stopped. It imports everything before forking and
freezes the garbage collector's view of it, so the children share those
pages instead of each holding a copy.

What lives in files holds across workers (the POP session locks, spool
locks). What lives in memory is per worker: each gets its share of the
connection caps, and LOGIN-DELAY enforcement and failure delays count the
logins that worker saw.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Callable

from ..config.options import Options
from ..server._privileges import preload_session_modules
from ..server._server import bind_socket
from .operations import process_book
from .systemd import notify

log = logging.getLogger("qpopper.server")

Listeners = list[tuple[socket.socket, bool]]

_WATCHED = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
# A child that dies sooner than this after it started is restarted only
# after a pause, so a broken set-up does not spin.
_MIN_LIFETIME = 1.0


def worker_options(options: Options, workers: int) -> Options:
    """The options one worker runs with: its share of the connection caps."""
    return options.replace(
        max_connections=max(1, math.ceil(options.max_connections / workers)),
        max_connections_per_ip=max(1, math.ceil(options.max_connections_per_ip / workers)),
    )


class WorkerPool:
    """Binds the listeners, then runs `serve` in each worker until told to stop."""

    def __init__(self, options: Options, listeners: Listeners) -> None:
        self.options = options
        self.count = options.effective_workers
        self._given = listeners
        self.listeners: Listeners = []
        self._serve: Callable[[], None] = lambda: None
        self._old_mask: set[int | signal.Signals] = set()
        self._children: dict[int, float] = {}  # pid -> start time
        self._stopping = False
        self.book = process_book(options)  # metrics or the control socket: tidied when a worker ends

    def bind(self) -> None:
        """Bind every listener now, so that errors stop the start-up.

        From here on the signals wait for `run` (a SIGHUP's default action
        would end the parent)."""
        self._old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
        if self._given:
            self.listeners = list(self._given)
            return
        alternate_port = self.options.effective_tls_support == "alternate-port"
        try:
            for address in self.options.listen:
                self.listeners.append((bind_socket(address), address.tls or alternate_port))
        except BaseException:
            self._close()
            raise
        for sock, tls in self.listeners:
            host, port = sock.getsockname()[:2]
            log.info("listening on %s:%d%s (%d workers)", host, port, " (TLS)" if tls else "", self.count)

    def run(self, serve: Callable[[], None], reload: Callable[[], None]) -> None:
        """`serve` runs in each worker; `reload` runs here on SIGHUP, so a
        worker started later begins with the new configuration too."""
        self._serve = serve
        preload_session_modules()
        old_mask = self._old_mask
        try:
            gc.collect()
            gc.freeze()  # the children's collector leaves these pages untouched
            for _ in range(self.count):
                self._spawn(old_mask)
            notify("READY=1")
            while self._children:
                # Stopping, an exporter that died stays down: the daemon is about to end.
                due = self.book.restart_due() if self.book is not None and not self._stopping else None
                if due is None:
                    info = signal.sigwaitinfo(_WATCHED)
                else:  # the exporter died: wait for a signal no longer than its restart
                    waited = signal.sigtimedwait(_WATCHED, due) if due > 0 else None
                    if waited is None:
                        assert self.book is not None
                        self.book.restart_if_due()
                        continue
                    info = waited
                if info.si_signo == signal.SIGCHLD:
                    self._reap(old_mask)
                elif info.si_signo == signal.SIGHUP:
                    reload()
                    self._signal_children(signal.SIGHUP)
                elif not self._stopping:
                    self._stopping = True
                    notify("STOPPING=1")
                    log.info("stopping %d workers (%s)", len(self._children),
                             "draining" if info.si_signo == signal.SIGTERM else "fast")
                    self._signal_children(info.si_signo)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            self._close()

    def _spawn(self, old_mask: set[int | signal.Signals]) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                # A reload passed on before the worker's loop listens for it
                # stays pending until then (the loop unblocks SIGHUP).
                signal.pthread_sigmask(signal.SIG_SETMASK, set(old_mask) | {signal.SIGHUP})
                os.environ.pop("NOTIFY_SOCKET", None)  # the parent speaks to systemd
                if self.book is not None:
                    self.book.in_child()
                self._serve()
                code = 0
            except BaseException:
                log.exception("worker %d failed", os.getpid())
            finally:
                logging.shutdown()
                os._exit(code)
        self._children[pid] = time.monotonic()

    def _reap(self, old_mask: set[int | signal.Signals]) -> None:
        while self._children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self._children.clear()
                return
            if pid == 0:
                return
            started = self._children.pop(pid, None)
            if self.book is not None:
                self.book.ended(pid, status)
            if started is None or self._stopping:
                continue
            code = os.waitstatus_to_exitcode(status)
            log.error("worker %d ended unexpectedly (%s); starting another", pid,
                      f"exit {code}" if code >= 0 else f"signal {-code}")
            if time.monotonic() - started < _MIN_LIFETIME:
                time.sleep(_MIN_LIFETIME)
            self._spawn(old_mask)

    def _signal_children(self, signo: int) -> None:
        for pid in list(self._children):
            try:
                os.kill(pid, signo)
            except ProcessLookupError:
                pass

    def _close(self) -> None:
        for sock, _ in self.listeners:
            sock.close()
        self.listeners = []
