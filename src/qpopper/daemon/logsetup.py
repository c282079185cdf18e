"""Logging as qpopper did it: syslog (facility from -y / log-facility,
normal records at notice), -d for debug records, -t for a trace file;
and, when the server runs in the foreground or under systemd, the same
records on stderr.

Only the command line calls `configure_logging`; a program embedding the
server keeps its own logging set-up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import sys
import threading
import time
from typing import TextIO

from ..config.options import Options
from ..errors import ConfigError
from ..logtext import TRACE_LOGGER

RECORD_FORMAT = "%(name)s: %(message)s"

# syslog(3) facility numbers (RFC 5424 section 6.2.1).
_FACILITIES = {"user": 1, "mail": 2, "daemon": 3, **{f"local{i}": 16 + i for i in range(8)}}
# Severities; INFO records go out at notice, qpopper's priority for its
# normal records.
_SEVERITIES = {logging.DEBUG: 7, logging.INFO: 5, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class RecordFormatter(logging.Formatter):
    """RECORD_FORMAT, optionally after "date time,ms qpopper[pid] LEVEL", as
    logging.Formatter writes it, in a third of the time: a session writes two
    records or more, and the generic formatter builds a dict, interprets the
    format and formats the time anew for each. The time stamp is made once a
    second. Records with a traceback or a stack go the generic way."""

    def __init__(self, stamped: bool) -> None:
        prefix = "%(asctime)s qpopper[%(process)d] %(levelname)s " if stamped else ""
        super().__init__(prefix + RECORD_FORMAT)
        self.stamped = stamped
        self._second = -1
        self._date_time = ""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        if not self.stamped:
            return f"{record.name}: {record.getMessage()}"
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._date_time = time.strftime(self.default_time_format, self.converter(second))
        return (f"{self._date_time},{int(record.msecs):03d} qpopper[{record.process}] {record.levelname} "
                f"{record.name}: {record.getMessage()}")


class SyslogHandler(logging.Handler):
    """Records to the local syslog daemon's socket as syslog(3) sends them:
    "<PRI>ident[pid]: message", one datagram each.

    The stdlib's SysLogHandler would do, but its module also loads pickle
    and friends, about 0.7 MB that a daemon holding thousands of sessions
    keeps for its whole life.

    The socket is non-blocking: a syslogd that stops reading fills its
    queue, and a blocking send would then freeze the event loop and every
    session with it. Records that find the queue full are dropped and
    counted; the next record that gets through says how many.
    """

    def __init__(self, address: str, facility: int, ident: str) -> None:
        super().__init__()
        self.address = address
        self.facility = facility
        self.ident = ident
        self.dropped = 0
        self._socket = self._connect()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.connect(self.address)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    def emit(self, record: logging.LogRecord) -> None:
        try:
            severity = _SEVERITIES.get(record.levelno, 4)
            text = self.format(record)
            if self.dropped:
                text += f" ({self.dropped} earlier records dropped: syslogd was not reading)"
            data = f"<{self.facility * 8 + severity}>{self.ident}{text}".encode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - as Handler.emit does: a bad record goes to handleError
            self.handleError(record)
            return
        try:
            self._socket.send(data)
            self.dropped = 0
        except BlockingIOError:  # syslogd's queue is full: drop rather than stall every session
            self.dropped += 1
        except OSError:  # syslogd restarted: its socket is a new one
            try:
                self._socket.close()
                self._socket = self._connect()
                self._socket.send(data)
                self.dropped = 0
            except BlockingIOError:
                self.dropped += 1
            except OSError:
                pass  # no syslogd: the record is lost, as with syslog(3)

    def close(self) -> None:
        self._socket.close()
        super().close()


class TurnBufferedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr's records, written once per event-loop turn.

    A session writes two records; each was a write system call of its own,
    and at a few thousand logins a second those were a tenth of the
    server's system calls. While a loop is attached (`attach`), a record
    emitted on its thread is kept and the records of one turn go out in one
    write, from a callback the first of them schedules. Nothing is dropped:
    a record from another thread first writes what is kept, then itself; a
    burst is written when it reaches `MAX_PENDING`; `detach` (the daemon's
    loop ends), `flush` (logging.shutdown at exit, and before a worker's
    os._exit) write what is left. A forked child starts with nothing kept and
    no loop, so no record is written twice. Only a process killed outright
    loses the records of its last turn (microseconds of them).
    """

    MAX_PENDING = 256

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._scheduled = False
        os.register_at_fork(after_in_child=self._forget)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Keep the records emitted on `loop`'s thread (the calling one) for the end of its turn."""
        self._loop, self._thread, self._scheduled = loop, threading.get_ident(), False

    def detach(self) -> None:
        self._loop = None
        self.flush()

    def _forget(self) -> None:
        self._pending, self._loop, self._scheduled = [], None, False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + self.terminator
        except Exception:  # noqa: BLE001 - as StreamHandler.emit does: a bad record goes to handleError
            self.handleError(record)
            return
        loop = self._loop
        if loop is None or threading.get_ident() != self._thread:
            self._pending.append(text)
            self._write_pending()
            return
        self._pending.append(text)
        if len(self._pending) >= self.MAX_PENDING:
            self._write_pending()
        elif not self._scheduled:
            try:
                loop.call_soon(self._end_of_turn)
            except RuntimeError:  # the loop is closed (not detached yet): no turn will end
                self._write_pending()
            else:
                self._scheduled = True

    def _end_of_turn(self) -> None:
        self.acquire()
        try:
            self._scheduled = False
            self._write_pending()
        finally:
            self.release()

    def _write_pending(self) -> None:
        """Under the handler's lock."""
        if not self._pending:
            return
        text, self._pending = "".join(self._pending), []
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_pending()
            super().flush()
        finally:
            self.release()


def attach_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Batch the records emitted on `loop` (see TurnBufferedHandler)."""
    for handler in logging.getLogger("qpopper").handlers:
        if isinstance(handler, TurnBufferedHandler):
            handler.attach(loop)


def detach_loop() -> None:
    """The loop ends: write what it kept and write at once from now on."""
    for handler in logging.getLogger("qpopper").handlers:
        if isinstance(handler, TurnBufferedHandler):
            handler.detach()


def _stderr_is_journal() -> bool:
    """systemd says so in JOURNAL_STREAM (device:inode of our stderr)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def _stderr_is_socket() -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(2).st_mode)
    except OSError:
        return False


def configure_logging(options: Options, *, foreground: bool) -> None:
    """The handlers for `options`. A trace file (-t) turns debug logging on,
    as qpopper's manual says, and receives the debug records; syslog and
    stderr get them too only when -d asked for them there."""
    root = logging.getLogger("qpopper")
    root.setLevel(logging.DEBUG if options.debug or options.trace_file else logging.INFO)
    # Without -d, debug records brought on by -t go to the trace file only.
    shared_level = logging.DEBUG if options.debug else logging.INFO
    root.propagate = False
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    # No format of ours names the caller's file, function or thread: do not
    # look them up for every record (the logging HOWTO's "Optimization").
    logging._srcfile = None  # noqa: SLF001 - the documented switch
    logging.logThreads = False
    logging.logMultiprocessing = False
    formatter = RecordFormatter(stamped=False)
    address = options.syslog_socket
    if address:
        try:
            syslog = SyslogHandler(address, _FACILITIES[options.log_facility], f"qpopper[{os.getpid()}]: ")
        except OSError:
            pass  # no syslog daemon listens there: records go to the other handlers only
        else:
            syslog.setFormatter(formatter)
            syslog.setLevel(shared_level)
            root.addHandler(syslog)
    # In inetd mode stderr is usually the client's socket: never write there.
    if (foreground and not _stderr_is_socket()) or _stderr_is_journal():
        stream = TurnBufferedHandler(sys.stderr)
        stream.setFormatter(RecordFormatter(stamped=True))
        stream.setLevel(shared_level)
        root.addHandler(stream)
    trace = logging.getLogger(TRACE_LOGGER)
    for handler in list(trace.handlers):
        trace.removeHandler(handler)
        handler.close()
    trace.propagate = False
    if options.trace_file:
        try:
            fh = logging.FileHandler(options.trace_file, mode="a", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot open trace file {options.trace_file}: {exc.strerror}") from None
        fh.setFormatter(logging.Formatter("%(asctime)s [%(process)d] %(message)s"))
        trace.addHandler(fh)
        trace.setLevel(logging.DEBUG)
        # Every record of the server, debug ones included, goes there too.
        records = logging.FileHandler(options.trace_file, mode="a", encoding="utf-8")
        records.setFormatter(logging.Formatter("%(asctime)s [%(process)d] %(levelname)s " + RECORD_FORMAT))
        root.addHandler(records)
