"""Logging as qpopper did it: syslog (facility from -y / log-facility,
normal records at notice), -d for debug records, -t for a trace file;
and, when the server runs in the foreground or under systemd, the same
records on stderr.

Only the command line calls `configure_logging`; a program embedding the
server keeps its own logging set-up.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import stat
import sys

from .errors import ConfigError
from .options import Options

TRACE_LOGGER = "qpopper.trace"
RECORD_FORMAT = "%(name)s: %(message)s"

_FACILITIES = {
    "mail": logging.handlers.SysLogHandler.LOG_MAIL,
    "daemon": logging.handlers.SysLogHandler.LOG_DAEMON,
    "user": logging.handlers.SysLogHandler.LOG_USER,
    **{f"local{i}": getattr(logging.handlers.SysLogHandler, f"LOG_LOCAL{i}") for i in range(8)},
}


class QpopperSyslogHandler(logging.handlers.SysLogHandler):
    """INFO records go out at LOG_NOTICE, qpopper's priority for its
    normal records; the others map as usual."""

    def mapPriority(self, levelName: str) -> str:  # noqa: N802 - the stdlib's name
        if levelName == "INFO":
            return "notice"
        return super().mapPriority(levelName)


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


def _reachable(address: str) -> bool:
    """Whether a syslog daemon listens there; without one, every record
    would cost a failed send and a printed error."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(address)
        except OSError:
            return False
    return True


def configure_logging(options: Options, *, foreground: bool) -> None:
    root = logging.getLogger("qpopper")
    root.setLevel(logging.DEBUG if options.debug else logging.INFO)
    root.propagate = False
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(RECORD_FORMAT)
    address = options.syslog_socket
    if address and _reachable(address):
        try:
            syslog = QpopperSyslogHandler(address=address, facility=_FACILITIES[options.log_facility])
        except OSError:
            syslog = None  # the daemon went away between the probe and now
        if syslog is not None:
            syslog.ident = "qpopper[%d]: " % os.getpid()
            syslog.setFormatter(formatter)
            root.addHandler(syslog)
    # In inetd mode stderr is usually the client's socket: never write there.
    if (foreground and not _stderr_is_socket()) or _stderr_is_journal():
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("%(asctime)s qpopper[%(process)d] %(levelname)s " + RECORD_FORMAT))
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


def printable(data: bytes | str, limit: int = 512) -> str:
    """Client data made safe for a log line: no CR, LF, ESC or other
    control characters, no unbounded length."""
    if isinstance(data, bytes):
        data = data.decode("utf-8", "backslashreplace")
    out = []
    for ch in data[:limit]:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    if len(data) > limit:
        out.append(f"...({len(data) - limit} more)")
    return "".join(out)
