"""What a running server counts for its operators, in plain Python.

`Tally` is the one interface the server's rooms report to (a login, a
refusal, a handshake, a session's end); it only adds to integers and
dicts, so a report costs a few tens of nanoseconds. The metrics
(`_metrics.Metrics`, a subclass) publish what accumulated here about once
a second, in one batch, because each of prometheus-client's multiprocess
writes costs about a microsecond: one per event would be a tenth of a
RETR's budget.

`CountingStream` is the stream a server uses when metrics or the control
socket are on: it counts each connection's bytes sent (for `who`) and,
with a tally, times each command from its arrival to the first byte of
its reply and notes the response code of each -ERR. A server with both
off uses the plain `PopStream`, and nothing here runs.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import time
from collections.abc import Callable

from ..auth.credentials import ApopDigest, CramMD5, Credentials, UserPass
from ._stream import PopStream

# Upper bounds of the command-latency buckets, in seconds (the last, +Inf, is implied).
COMMAND_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)
# Upper bounds of the maildrop-open buckets, in seconds.
MAILDROP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The command label's values: POP3's keywords and qpopper's; anything else is "other", so a client
# cannot grow the number of series (and a password, sent as an AUTH line, never becomes a label).
COMMANDS = frozenset({
    "USER", "PASS", "APOP", "AUTH", "CAPA", "STLS", "STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "NOOP",
    "RSET", "QUIT", "LAST", "XTND", "XMANGLE", "XSENDER", "UTF8", "LANG", "EUIDL",
})  # fmt: skip
_COMMAND_NAMES = {name.encode(): name for name in COMMANDS}
# The RFC 2449/3206/6856 response codes this server sends; another bracketed word is "other".
RESPONSE_CODES = frozenset({"SYS/TEMP", "SYS/PERM", "AUTH", "IN-USE", "LOGIN-DELAY", "UTF8"})
_CODE_NAMES = {name.encode(): name for name in RESPONSE_CODES}


class Tally:
    """The process's counts since the metrics last published them.

    Keys are tuples of label values; `take` hands the whole batch over and
    starts a new one. The hooks' names say what happened, not which metric
    moves, so the rooms of the server know nothing about the metrics."""

    __slots__ = ("commands", "counts", "errors", "opens", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.counts: collections.Counter[tuple[str, ...]] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        # Histograms: [count per bucket..., count above the last bound, sum of seconds]
        self.commands: dict[str, list[float]] = {}  # per command
        self.opens: list[float] = [0.0] * (len(MAILDROP_BUCKETS) + 2)

    def take(self) -> Tally:
        """This batch; the tally starts a new one."""
        batch = Tally()
        batch.sent, self.sent = self.sent, 0
        batch.counts, self.counts = self.counts, collections.Counter()
        batch.errors, self.errors = self.errors, collections.Counter()
        batch.commands, self.commands = self.commands, {}
        batch.opens, self.opens = self.opens, batch.opens
        return batch

    def changed(self) -> None:
        """Something was added (the metrics arm their publishing here)."""

    def publish(self) -> None:
        """Hand what was counted on now (the metrics write it to their files)."""

    # ---- the rooms' reports ---------------------------------------------------

    def connected(self, stream: PopStream) -> None:
        """A session starts on `stream`: counted by its listening port and whether it began in TLS."""
        name = stream.get_extra_info("sockname")
        port = str(name[1]) if isinstance(name, tuple) and len(name) >= 2 else "none"  # inetd's pipes: none
        tls = "false" if stream.get_extra_info("ssl_object") is None else "true"
        self.counts[("connection", port, tls)] += 1
        self.changed()

    def refused(self, reason: str) -> None:
        """A connection turned away: max-connections, max-connections-per-ip."""
        self.counts[("refused", reason)] += 1
        self.changed()

    def tls_handshake(self, kind: str, ok: bool) -> None:
        """kind: implicit (a TLS listener) or stls."""
        self.counts[("handshake", kind, "ok" if ok else "failed")] += 1
        self.changed()

    def login(self, credentials: Credentials, result: str) -> None:
        """result: ok, failed (wrong or unknown), refused (allow/deny lists), error (the backend)."""
        self.counts[("login", mechanism_of(credentials), result)] += 1
        self.changed()

    def failure_delay(self, seconds: float) -> None:
        self.counts[("delays",)] += 1
        self.counts[("delay_seconds",)] += seconds  # type: ignore[assignment]  # a Counter adds floats alike
        self.changed()

    def maildrop_opened(self, seconds: float) -> None:
        opens = self.opens
        opens[bisect.bisect_left(MAILDROP_BUCKETS, seconds)] += 1
        opens[-1] += seconds
        self.changed()

    def session_ended(self, retrieved: int, deleted: int) -> None:
        """At a session's end: distinct messages it retrieved, and deleted ones actually removed."""
        counts = self.counts
        counts[("session",)] += 1
        if retrieved:
            counts[("retrieved",)] += retrieved
        if deleted:
            counts[("deleted",)] += deleted
        self.changed()

    # ---- the stream's reports -------------------------------------------------

    def command(self, word: bytes, seconds: float) -> None:
        name = _COMMAND_NAMES.get(word.upper(), "other")
        buckets = self.commands.get(name)
        if buckets is None:
            buckets = self.commands[name] = [0.0] * (len(COMMAND_BUCKETS) + 2)
        buckets[bisect.bisect_left(COMMAND_BUCKETS, seconds)] += 1
        buckets[-1] += seconds
        self.changed()

    def error_reply(self, reply: bytes) -> None:
        """An -ERR went out: count it by its response code ("none" without one)."""
        code = "none"
        if reply[5:6] == b"[":
            end = reply.find(b"]", 6, 40)
            code = _CODE_NAMES.get(reply[6:end], "other") if end > 0 else "other"
        self.errors[code] += 1


class CountingStream(PopStream):
    """A PopStream that counts its bytes sent and, given a tally, times
    each command and notes each -ERR's response code."""

    __slots__ = ("_command", "_since", "_tally", "sent")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_connected: Callable[[PopStream], None] | None = None,
                 tally: Tally | None = None) -> None:
        super().__init__(loop, on_connected)
        self.sent = 0
        self._tally = tally
        self._since = 0.0  # when the command waiting for its reply arrived; 0: none waits
        self._command = b""

    def data_received(self, data: bytes) -> None:
        if self._tally is not None and not self._since:
            self._since = time.perf_counter()
            self._command = data[:8].split(None, 1)[0] if data[:1].isalpha() else b""
        self._buffer += data  # PopStream.data_received's body: no second call per command
        self._wake_reader()

    def write(self, data: bytes) -> None:
        self.sent += len(data)
        tally = self._tally
        if tally is not None:
            tally.sent += len(data)
            if self._since:
                tally.command(self._command, time.perf_counter() - self._since)
                self._since = 0.0
            if data[:4] == b"-ERR":
                tally.error_reply(data)
        transport = self.transport
        assert transport is not None
        try:
            transport.write(data)
        except RuntimeError:  # uvloop's word for a transport the peer's reset closed
            raise ConnectionResetError("connection closed by the peer") from None


def mechanism_of(credentials: Credentials) -> str:
    """The mechanism label of a login: `password` for USER/PASS and SASL
    PLAIN and LOGIN (they reach the server alike), else the mechanism's name."""
    if isinstance(credentials, UserPass):
        return "password"
    if isinstance(credentials, ApopDigest):
        return "APOP"
    if isinstance(credentials, CramMD5):
        return "CRAM-MD5"
    return credentials.mechanism
