"""The OpenMetrics side of the tally: prometheus-client's metrics, written
to per-process files so that one scrape sees the whole server.

Imported only when `metrics-listen` is set (a plain server never loads
prometheus_client). Every serving process (the only one, each worker,
each session process) writes its counts into its own files in the metrics
directory (prometheus-client's multiprocess mode); the exporter process
(`qpopper.daemon.exporter`) sums them at each scrape.

A process is named by `process_identity`: its pid, except a session process,
which takes a slot number from its parent that the next session process
reuses once it has ended. Counters live on in their slot's files, so a
server that forks a process per session for weeks keeps as many files as
it ever had sessions at once, not one per session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram, values
from prometheus_client.multiprocess import mark_process_dead

from ._tally import COMMAND_BUCKETS, MAILDROP_BUCKETS, RESPONSE_CODES, Tally

if TYPE_CHECKING:
    from ._connection import Connection

log = logging.getLogger("qpopper.server")

# Counts reach the files at most this long after they happened.
PUBLISH_INTERVAL = 1.0
STATES = ("authorization", "transaction", "update")
MECHANISMS = ("password", "APOP", "CRAM-MD5")  # the first: USER/PASS and SASL PLAIN and LOGIN
LOGIN_RESULTS = ("ok", "failed", "refused", "error")

_identity: list[str | None] = [None]
_opened_by: list[Any] = []  # a metric without labels, touched to open the files


def process_identity() -> str:
    """This process's name in the metric files' names."""
    return _identity[0] or str(os.getpid())


def set_process_identity(name: str) -> None:
    """A session process's slot (`s3`), set in the child before it counts
    anything; its files are opened now, while it may (before it becomes its user)."""
    _identity[0] = name
    with _readable_by_group():
        for metric in _opened_by:
            metric.inc(0)  # prometheus-client opens a process's files when it sees a new identity


@contextlib.contextmanager
def _readable_by_group() -> Iterator[None]:
    """Metric files made in here are readable by their group whatever the
    daemon's umask: a root daemon's exporter runs as nobody, and reads them
    as the directory's group (which the files take from it)."""
    old = os.umask(0)
    os.umask(old & ~0o040)
    try:
        yield
    finally:
        os.umask(old)


def use_directory(directory: str) -> None:
    """Write metrics into per-process files in `directory` (before any metric is built)."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = values.MultiProcessValue(process_identifier=process_identity)  # type: ignore[no-untyped-call]


def process_ended(name: str, directory: str) -> None:
    """A serving process ended: its sessions gauge goes (its counters stay)."""
    mark_process_dead(name, directory)  # type: ignore[no-untyped-call]


class Metrics(Tally):
    """The tally, published about once a second to the metric files."""

    __slots__ = ("_armed", "_children", "_live", "_m", "_pid", "_states", "publish_each_session")

    def __init__(self, directory: str, live: Callable[[], Iterable[Connection]]) -> None:
        super().__init__()
        use_directory(directory)
        self._live = live
        self._armed = False
        self._pid = os.getpid()  # the process whose files are open (a worker forked later opens its own)
        # A session process publishes at its session's end: it exits then.
        self.publish_each_session = False
        with _readable_by_group():
            self._m = _build()
        # Each series' value object, found once (`labels()` takes a lock and checks its arguments).
        self._children: dict[tuple[str, ...], Any] = {}
        self._states: dict[str, int] = {}  # the sessions gauge as last set

    def changed(self) -> None:
        if not self._armed:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # the parent of session processes runs no loop: at once, then
                self.publish()
                return
            self._armed = True
            loop.call_later(PUBLISH_INTERVAL, self.publish)

    def session_ended(self, retrieved: int, deleted: int) -> None:
        super().session_ended(retrieved, deleted)
        if self.publish_each_session:
            self.publish()

    def publish(self) -> None:
        """Everything counted since the last call, into the files (a
        failure costs the batch and a log line, never the session)."""
        self._armed = False
        batch = self.take()
        try:
            if self._pid != os.getpid():  # a worker's first: prometheus-client opens its files now
                self._pid = os.getpid()
                with _readable_by_group():
                    self._write(batch)
            else:
                self._write(batch)
        except OSError as exc:
            log.error("metrics: cannot write the metric files: %s", exc)

    def _series(self, key: tuple[str, ...]) -> Any:
        child = self._children.get(key)
        if child is None:
            metric = self._m[key[0]]
            child = self._children[key] = metric.labels(*key[1:]) if len(key) > 1 else metric
        return child

    def _write(self, batch: Tally) -> None:
        series = self._series
        for key, n in batch.counts.items():
            series(key).inc(n)
        for code, n in batch.errors.items():
            series(("error", code)).inc(n)
        if batch.sent:
            series(("sent",)).inc(batch.sent)
        for name, buckets in batch.commands.items():
            _add_to_histogram(series(("command", name)), buckets)
        if batch.opens[-1] or any(batch.opens):
            _add_to_histogram(series(("open",)), batch.opens)
        states = dict.fromkeys(STATES, 0)
        for conn in self._live():
            states[conn.state] += 1
        if states != self._states:
            for state, n in states.items():
                series(("sessions", state)).set(n)
            self._states = states


def _add_to_histogram(child: Histogram, buckets: list[float]) -> None:
    """Add a batch of observations, counted per bucket, to a histogram.

    prometheus-client has no call for this; its multiprocess histogram keeps
    one value per bucket (not cumulative) and one for the sum, which is
    what `observe` increments, one observation at a time."""
    for i, n in enumerate(buckets[:-1]):
        if n:
            child._buckets[i].inc(n)  # noqa: SLF001 - see the docstring
    child._sum.inc(buckets[-1])  # noqa: SLF001


def _build() -> dict[str, Any]:
    """The metrics, with every series of known labels present from the start at 0
    (and so every metric file opened now, before a session process drops privileges)."""
    kw: dict[str, Any] = {"registry": None}
    m: dict[str, Any] = {
        "connection": Counter("qpopper_connections", "Connections accepted, by listening port and implicit TLS",
                              ["port", "tls"], **kw),
        "refused": Counter("qpopper_connections_refused", "Connections refused by a cap", ["reason"], **kw),
        "handshake": Counter("qpopper_tls_handshakes", "TLS handshakes (implicit or STLS) by result",
                             ["kind", "result"], **kw),
        "login": Counter("qpopper_logins", "Login attempts by mechanism and result", ["mechanism", "result"], **kw),
        "delays": Counter("qpopper_failure_delays", "Failed logins answered after the failure delay", **kw),
        "delay_seconds": Counter("qpopper_failure_delay_seconds", "Seconds of failure delay served", **kw),
        "session": Counter("qpopper_sessions_ended", "Sessions ended (any way)", **kw),
        "sessions": Gauge("qpopper_sessions", "Sessions now, by POP3 state", ["state"],
                          multiprocess_mode="livesum", **kw),
        "sent": Counter("qpopper_sent_bytes", "Bytes sent to clients", **kw),
        "retrieved": Counter("qpopper_messages_retrieved", "Distinct messages sent by RETR, per session", **kw),
        "deleted": Counter("qpopper_messages_deleted", "Messages removed at UPDATE", **kw),
        "error": Counter("qpopper_error_replies", "-ERR replies by response code", ["code"], **kw),
        "command": Histogram("qpopper_command_duration_seconds",
                             "From a command's arrival to the first byte of its reply", ["command"],
                             buckets=COMMAND_BUCKETS, **kw),
        "open": Histogram("qpopper_maildrop_open_seconds", "Time to lock and list a maildrop",
                          buckets=MAILDROP_BUCKETS, **kw),
    }
    _opened_by[:] = [m["sent"]]
    for state in STATES:
        m["sessions"].labels(state)
    for mechanism in MECHANISMS:
        for result in LOGIN_RESULTS:
            m["login"].labels(mechanism, result)
    for reason in ("max-connections", "max-connections-per-ip"):
        m["refused"].labels(reason)
    for kind in ("implicit", "stls"):
        for result in ("ok", "failed"):
            m["handshake"].labels(kind, result)
    for code in (*RESPONSE_CODES, "none", "other"):
        m["error"].labels(code)
    for name in ("USER", "PASS", "APOP", "AUTH", "STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "QUIT"):
        m["command"].labels(name)
    return m


__all__ = ["Metrics", "process_ended", "process_identity", "set_process_identity", "use_directory"]
