"""The daemon's share of operations: the metrics exporter process, the
control directory, and the bookkeeping when a serving process ends.

The exporter is a process of its own, forked before anything serves: the
parents of the worker and process-per-session models run no threads (they
fork), and a scrape should never wait for a busy event loop. It answers
HTTP on `metrics-listen` with the sum of every serving process's metric
files (prometheus-client's MultiProcessCollector), in OpenMetrics when the
scraper asks for it, and ends when the daemon does.

The daemon binds the listener and keeps it; the exporter, forked with it,
drops root for `nobody` (it only reads the metric files and speaks HTTP to
whoever reaches the port). If the exporter dies, the process that forked it
(the only server process, or the parent of the workers or of the session
processes) logs it and forks another on the same socket, after a pause that
doubles while the new ones keep dying young.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import glob
import logging
import os
import pwd
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from typing import Any

from ..config.options import Options, parse_listen_address
from ..errors import ConfigError
from ..server._control import socket_path
from ..server._server import bind_socket

log = logging.getLogger("qpopper.server")

DEFAULT_METRICS_PORT = 9110
# How often the exporter looks whether the daemon is still there.
_PARENT_CHECK = 1.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# The account a root daemon's exporter runs as.
EXPORTER_ACCOUNT = "nobody"
# An exporter that lived this long was healthy: the next restart waits the shortest pause again.
_HEALTHY = 60.0
_FIRST_PAUSE = 1.0
_LONGEST_PAUSE = 60.0
# A scrape that meets a metric file being made or removed reads the files again, this often at most.
_SCRAPE_ATTEMPTS = 5

# The exporter of this daemon, in the process that forked it (None elsewhere and when metrics are off).
_current: list[Exporter] = []


class Exporter:
    """The metric files' directory and the process that serves them."""

    def __init__(self, options: Options) -> None:
        assert options.metrics_listen is not None
        try:
            address = parse_listen_address(options.metrics_listen, DEFAULT_METRICS_PORT)
        except ConfigError as exc:
            raise ConfigError(f"metrics-listen: {exc}") from None
        # Root's exporter becomes nobody: (uid, gid); otherwise it stays the daemon's account.
        self.account: tuple[int, int] | None = None
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam(EXPORTER_ACCOUNT)
            except KeyError:
                raise ConfigError(f"metrics-listen: no account {EXPORTER_ACCOUNT!r} for the exporter") from None
            self.account = (entry.pw_uid, entry.pw_gid)
        self._own_directory = options.metrics_dir is None
        if options.metrics_dir is None:
            self.directory = tempfile.mkdtemp(prefix="qpopper-metrics-")
        else:
            self.directory = options.metrics_dir
            os.makedirs(self.directory, mode=0o755, exist_ok=True)
            for old in glob.glob(os.path.join(self.directory, "*.db")):
                os.unlink(old)  # counts of an earlier run: the counters start again at 0
        if self.account is not None:
            # Readable by the exporter's group alone; files made in it take that group (setgid).
            os.chown(self.directory, 0, self.account[1])
            os.chmod(self.directory, 0o2750)
        self.socket = bind_socket(address)
        self.pid = 0
        self._parent = os.getpid()
        self._started = 0.0
        self._pause = 0.0  # before the next restart; grows while exporters die young
        self._restart_at: float | None = None

    def options(self, options: Options) -> Options:
        """The options the server runs with: the directory filled in."""
        return options.replace(metrics_dir=self.directory)

    @property
    def address(self) -> tuple[str, int]:
        name = self.socket.getsockname()
        return str(name[0]), int(name[1])

    def start(self) -> None:
        """Fork the exporter on the listener (which this process keeps, for a restart)."""
        import http.server  # noqa: F401 - imported here: the child of a threaded server imports nothing

        import prometheus_client.multiprocess  # noqa: F401

        if not self._started:
            host, port = self.address
            log.info("metrics on http://%s:%d/metrics", f"[{host}]" if ":" in host else host, port)
        self._parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _serve(self.socket, self.directory, self._parent, self.account)
                code = 0
            except BaseException:
                log.exception("metrics exporter failed")
            finally:
                os._exit(code)
        self.pid = pid
        self._started = time.monotonic()

    # ---- supervision, in the process that forked it ---------------------------

    def reaped(self, pid: int, status: int) -> bool:
        """Whether `pid`, just reaped, was the exporter; if so its restart is due after a pause."""
        if not pid or pid != self.pid or os.getpid() != self._parent:
            return False
        self.pid = 0
        young = time.monotonic() - self._started < _HEALTHY
        self._pause = min(_LONGEST_PAUSE, self._pause * 2) if young and self._pause else _FIRST_PAUSE
        self._restart_at = time.monotonic() + self._pause
        code = os.waitstatus_to_exitcode(status)
        log.error("metrics exporter %d ended unexpectedly (%s); restarting it in %.0f s", pid,
                  f"exit {code}" if code >= 0 else f"signal {-code}", self._pause)
        return True

    def restart_due(self) -> float | None:
        """Seconds until the pending restart (0: now), or None when none is pending."""
        if self._restart_at is None:
            return None
        return max(0.0, self._restart_at - time.monotonic())

    def restart_if_due(self) -> None:
        if self._restart_at is not None and time.monotonic() >= self._restart_at:
            self._restart_at = None
            self.start()
            log.info("metrics exporter restarted (pid %d)", self.pid)

    def supervise_in(self, loop: asyncio.AbstractEventLoop) -> None:
        """Supervise from an event loop (the single-process server): a pidfd
        says when the exporter ends, without a SIGCHLD handler."""
        if os.getpid() != self._parent or not self.pid:
            return
        try:
            fd = os.pidfd_open(self.pid)
        except OSError as exc:  # pragma: no cover - Linux before 5.3
            log.warning("metrics exporter not supervised: %s", exc)
            return

        def ended() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if self.reaped(pid, status):
                    loop.call_later(self.restart_due() or 0.0, restart)

        def restart() -> None:
            due = self.restart_due()
            if due:  # a timer may fire a little early
                loop.call_later(due, restart)
                return
            self.restart_if_due()
            self.supervise_in(loop)

        loop.add_reader(fd, ended)

    def in_serving_child(self) -> None:
        """A worker or session process: the listener is not its to hold."""
        self.socket.close()
        _current.clear()

    def stop(self) -> None:
        if os.getpid() != self._parent:
            return
        self._restart_at = None
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.pid = 0
        self.socket.close()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


def _end_with_parent() -> None:
    """Have the kernel end this process (SIGTERM) the moment the daemon dies
    (Linux's PR_SET_PDEATHSIG). The once-a-second look at the parent alone
    left an exporter of a daemon killed with -9 holding metrics-listen for
    up to a second, and a daemon restarted at once could not bind it."""
    if not sys.platform.startswith("linux"):
        return  # pragma: no cover - the parent check below still ends it
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:  # pragma: no cover - cannot fail on Linux
        log.warning("metrics exporter: prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))


def current_exporter() -> Exporter | None:
    """This daemon's exporter, in the process that supervises it."""
    return _current[0] if _current else None


def _serve(sock: socket.socket, directory: str, parent: int, account: tuple[int, int] | None) -> None:
    """The exporter's life: answer scrapes until the daemon is gone."""
    from http.server import HTTPServer

    from prometheus_client import CollectorRegistry, MetricsHandler
    from prometheus_client.multiprocess import MultiProcessCollector

    signal.set_wakeup_fd(-1)  # a forking parent's, whose handlers go too
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    _release_inherited(sock)
    # The files by their names in the directory: the account needs no way through its parents.
    os.chdir(directory)
    if account is not None:
        os.setgroups([])
        os.setgid(account[1])
        os.setuid(account[0])
    # After the change of account, which clears the parent-death signal.
    _end_with_parent()
    if os.getppid() != parent:  # the daemon died before the request could be made
        return

    class Collector(MultiProcessCollector):
        """The files as a scrape finds them, while serving processes make and remove theirs."""

        def collect(self) -> Any:
            # A session process's file is empty for a moment after it is made, and an ended
            # one's gauge file goes: read again, without what is not a whole file yet.
            for attempt in range(_SCRAPE_ATTEMPTS):
                files = [name for name in glob.glob("*.db") if _whole(name)]
                try:
                    return self.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
                except (FileNotFoundError, struct.error):
                    if attempt == _SCRAPE_ATTEMPTS - 1:
                        raise
                    time.sleep(0.01)
            return []  # pragma: no cover - the loop returns or raises

    class Server(HTTPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            # One line for the log, never a traceback on the daemon's stderr.
            log.error("metrics: a scrape failed: %s", sys.exc_info()[1])

    registry = CollectorRegistry()
    Collector(registry, path=".")  # type: ignore[no-untyped-call]
    # A scraper that stalls is dropped after `timeout` seconds.
    handler = type("Handler", (MetricsHandler,), {"registry": registry, "timeout": 10})
    http = Server(sock.getsockname()[:2], handler, bind_and_activate=False)
    http.socket.close()
    sock.setblocking(True)
    http.socket = sock
    http.timeout = _PARENT_CHECK
    while os.getppid() == parent:
        http.handle_request()


def _whole(name: str) -> bool:
    """Whether a metric file has at least its header (a file just made is empty)."""
    try:
        return os.stat(name).st_size >= 8
    except FileNotFoundError:
        return False


def _release_inherited(keep: socket.socket) -> None:
    """Let go of every descriptor the exporter inherited but its own socket,
    stdio and the log's: a restarted exporter is forked from a serving
    process, and a client's connection it held would stay open after the
    server closed it, a maildrop's flock stay taken, a listener stay bound.

    Each is pointed at /dev/null rather than closed, so that no stale
    object of the parent's can later close a number the exporter reuses."""
    needed = {keep.fileno(), *_logging_descriptors()}
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd <= 2 or fd == null or fd in needed:
                continue
            try:
                os.fstat(fd)  # the listing's own descriptor is closed by now: leave that number free
                os.dup2(null, fd)
            except OSError:
                continue
    finally:
        os.close(null)


def _logging_descriptors() -> set[int]:
    """The descriptors the log handlers write to (syslog's socket, stderr, a trace file)."""
    found: set[int] = set()
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            for attribute in ("_socket", "socket", "stream"):
                target = getattr(handler, attribute, None)
                with contextlib.suppress(AttributeError, OSError, ValueError, TypeError):
                    fd = target.fileno()  # type: ignore[union-attr]
                    if isinstance(fd, int) and fd >= 0:
                        found.add(fd)
    return found


def start_operations(options: Options) -> Options:
    """The control directory and the exporter, as configured; returns the
    options the server runs with. The exporter is stopped when the daemon
    exits (its serving children leave by os._exit and so never stop it)."""
    if options.control_dir:
        prepare_control_dir(options.control_dir)
    if options.metrics_listen:
        try:
            import prometheus_client  # noqa: F401 - present, or one clear line now
        except ImportError:
            raise ConfigError("metrics-listen needs prometheus-client: pip install 'qpopper[metrics]'") from None
        exporter = Exporter(options)
        options = exporter.options(options)
        exporter.start()
        _current[:] = [exporter]
        atexit.register(exporter.stop)
    return options


def prepare_control_dir(directory: str) -> None:
    """The control sockets' directory: mode 0700, owned by whoever runs the
    daemon (root, or the service account); sockets of an earlier run removed."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    for old in glob.glob(os.path.join(directory, "*.sock")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(old)


def process_book(options: Options) -> ProcessBook | None:
    """The book a parent of serving processes keeps, if metrics or the control socket are on."""
    return ProcessBook(options) if options.metrics_listen or options.control_dir else None


class ProcessBook:
    """What the parent of serving processes tidies when one ends: its
    sessions gauge (its counters stay) and its control socket; and, when it
    is the exporter that ended, its restart. Session processes get the
    lowest free slot as their metric files' name."""

    def __init__(self, options: Options) -> None:
        self.metrics_dir = options.metrics_dir if options.metrics_listen else None
        self.control_dir = options.control_dir
        self._slots: dict[int, int] = {}  # pid -> slot
        self._pending = -1

    def before_fork(self) -> None:
        taken = set(self._slots.values())
        self._pending = next(i for i in range(len(taken) + 1) if i not in taken)

    def in_child(self) -> None:
        """In a worker or session process, first: the exporter is not its to supervise."""
        exporter = current_exporter()
        if exporter is not None:
            exporter.in_serving_child()

    def in_session_child(self) -> None:
        self.in_child()
        if self.metrics_dir is not None:
            from ..server._metrics import set_process_identity

            set_process_identity(f"s{self._pending}")

    def forked(self, pid: int) -> None:
        self._slots[pid] = self._pending

    def ended(self, pid: int, status: int = 0) -> None:
        exporter = current_exporter()
        if exporter is not None and exporter.reaped(pid, status):
            return
        slot = self._slots.pop(pid, None)
        if self.metrics_dir is not None:
            from ..server._metrics import process_ended

            process_ended(f"s{slot}" if slot is not None else str(pid), self.metrics_dir)
        if self.control_dir is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_path(self.control_dir, pid))

    def restart_due(self) -> float | None:
        """Seconds until the exporter is to be restarted (None: it runs, or there is none)."""
        exporter = current_exporter()
        return exporter.restart_due() if exporter is not None else None

    def restart_if_due(self) -> None:
        exporter = current_exporter()
        if exporter is not None:
            exporter.restart_if_due()
