"""The daemon's share of operations: the metrics exporter process, the
control directory, and the bookkeeping when a serving process ends.

The exporter is a process of its own, forked before anything serves: the
parents of the worker and process-per-session models run no threads (they
fork), and a scrape should never wait for a busy event loop. It answers
HTTP on `metrics-listen` with the sum of every serving process's metric
files (prometheus-client's MultiProcessCollector), in OpenMetrics when the
scraper asks for it, and ends when the daemon does.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import glob
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile

from ..config.options import Options, parse_listen_address
from ..errors import ConfigError
from ..server._control import socket_path
from ..server._server import bind_socket

log = logging.getLogger("qpopper.server")

DEFAULT_METRICS_PORT = 9110
# How often the exporter looks whether the daemon is still there.
_PARENT_CHECK = 1.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Exporter:
    """The metric files' directory and the process that serves them."""

    def __init__(self, options: Options) -> None:
        assert options.metrics_listen is not None
        try:
            address = parse_listen_address(options.metrics_listen, DEFAULT_METRICS_PORT)
        except ConfigError as exc:
            raise ConfigError(f"metrics-listen: {exc}") from None
        self._own_directory = options.metrics_dir is None
        if options.metrics_dir is None:
            self.directory = tempfile.mkdtemp(prefix="qpopper-metrics-")
        else:
            self.directory = options.metrics_dir
            os.makedirs(self.directory, mode=0o755, exist_ok=True)
            for old in glob.glob(os.path.join(self.directory, "*.db")):
                os.unlink(old)  # counts of an earlier run: the counters start again at 0
        self.socket = bind_socket(address)
        self.pid = 0

    def options(self, options: Options) -> Options:
        """The options the server runs with: the directory filled in."""
        return options.replace(metrics_dir=self.directory)

    @property
    def address(self) -> tuple[str, int]:
        name = self.socket.getsockname()
        return str(name[0]), int(name[1])

    def start(self) -> None:
        host, port = self.address
        log.info("metrics on http://%s:%d/metrics", f"[{host}]" if ":" in host else host, port)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _serve(self.socket, self.directory, parent)
                code = 0
            except BaseException:
                log.exception("metrics exporter failed")
            finally:
                os._exit(code)
        self.pid = pid
        self.socket.close()

    def stop(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.pid = 0
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


def _serve(sock: socket.socket, directory: str, parent: int) -> None:
    """The exporter's life: answer scrapes until the daemon is gone."""
    from http.server import HTTPServer

    from prometheus_client import CollectorRegistry, MetricsHandler
    from prometheus_client.multiprocess import MultiProcessCollector

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    _end_with_parent()
    if os.getppid() != parent:  # it died before the request could be made
        return
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    # A scraper that stalls is dropped after `timeout` seconds.
    handler = type("Handler", (MetricsHandler,), {"registry": registry, "timeout": 10})
    http = HTTPServer(sock.getsockname()[:2], handler, bind_and_activate=False)
    http.socket.close()
    sock.setblocking(True)
    http.socket = sock
    http.timeout = _PARENT_CHECK
    while os.getppid() == parent:
        http.handle_request()


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
    sessions gauge (its counters stay) and its control socket. Session
    processes get the lowest free slot as their metric files' name."""

    def __init__(self, options: Options) -> None:
        self.metrics_dir = options.metrics_dir if options.metrics_listen else None
        self.control_dir = options.control_dir
        self._slots: dict[int, int] = {}  # pid -> slot
        self._pending = -1

    def before_fork(self) -> None:
        taken = set(self._slots.values())
        self._pending = next(i for i in range(len(taken) + 1) if i not in taken)

    def in_session_child(self) -> None:
        if self.metrics_dir is not None:
            from ..server._metrics import set_process_identity

            set_process_identity(f"s{self._pending}")

    def forked(self, pid: int) -> None:
        self._slots[pid] = self._pending

    def ended(self, pid: int) -> None:
        slot = self._slots.pop(pid, None)
        if self.metrics_dir is not None:
            from ..server._metrics import process_ended

            process_ended(f"s{slot}" if slot is not None else str(pid), self.metrics_dir)
        if self.control_dir is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_path(self.control_dir, pid))
