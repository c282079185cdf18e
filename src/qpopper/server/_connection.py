"""One client connection: the asyncio adapter around a protocol Session.

It reads bytes into the session, carries out the session's effects and
writes the replies. Replies accumulate in one buffer and go out in a single
write when the session needs input or before any slow step, so a pipelined
burst of commands costs one packet, not one per reply.

The adapter owns only the stream, the read deadlines and the output
buffer. Each effect goes to its handler through one table (`_HANDLERS`):
the login step (`_login.Login`), retrieval (`_retrieval.Retrieval`),
UPDATE (`_update`) and the records (`_records.SessionRecords`) do the
work, and slow or blocking steps run in the server's thread pool so that
no session stalls another.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from ..auth.cleartext import plaintext_allowed
from ..config.options import Options
from ..errors import MaildropError, ResponseCode
from ..extensions.xtnd import submit
from ..logtext import TRACE_LOGGER, printable
from ..maildrop import Maildrop
from ..protocol import (
    Authenticate,
    Close,
    Commit,
    ComputeSizes,
    ConnectionSecurity,
    Effect,
    ListHeaders,
    LookupScramSecret,
    OpenMaildrop,
    ResolveUids,
    SaslStep,
    Send,
    SendMessage,
    Session,
    StartTls,
    SubmitMessage,
)
from . import _update
from ._login import Login
from ._records import SessionRecords
from ._retrieval import Abort as _Abort  # raised by retrieval, ends run() without a reply
from ._retrieval import Retrieval
from ._services import Peer, Services, TlsState
from ._stream import PopStream
from ._tls import certificate_identity, tls_failure_reason

if TYPE_CHECKING:
    from ..auth.kpop import KpopIdentity

__all__ = ["Connection", "Peer", "Services", "TlsState", "new_timestamp"]

log = logging.getLogger("qpopper.session")
trace_log = logging.getLogger(TRACE_LOGGER)

T = TypeVar("T")
READ_SIZE = 65536
_CRLF = b"\r\n"


def new_timestamp(hostname: str) -> str:
    """An APOP challenge `<pid.clock@host>` that no greeting repeats.

    The clock part mixes the time with 40 random bits, so two greetings in
    the same microsecond of the same process still differ; it stays a plain
    `<digits.digits@host>` msg-id, which strict clients require.
    """
    clock = time.time_ns() // 1000 * (1 << 40) + secrets.randbits(40)
    return f"<{os.getpid()}.{clock}@{hostname}>"


# An effect's handler: a coroutine that is true when the session is over.
_Handler = Callable[["Connection", Any], Awaitable[bool | None]]


class Connection:
    """Serves one session over a client's stream."""

    __slots__ = (
        "_committed", "_deadline", "_heard", "_idle", "_login_deadline", "_loop_ref", "_timed_out", "_watchdog",
        "_watchdog_at", "kicked", "login", "out", "peer", "records", "retrieval", "services", "session", "stream",
        "updating",
    )  # fmt: skip


    def __init__(self, stream: PopStream, peer: Peer, services: Services, kpop: KpopIdentity | None = None) -> None:
        """`kpop`: who a KPOP exchange before the greeting proved the client
        to be; the login's password then proves nothing and is not asked
        for by the clear-text policy (see Login.authenticate)."""
        self.stream = stream
        self.peer = peer
        self.services = services
        options = services.options
        security = self._security(tls_active=stream.get_extra_info("ssl_object") is not None)
        if kpop is not None:
            security = dataclasses.replace(security, plaintext_allowed=True)
        self.session = Session(
            services.session_config(), timestamp=new_timestamp(options.hostname), security=security
        )
        self.records = SessionRecords(options, peer.host, services.run_blocking)
        self.login = Login(services, peer, self.session, self.records)
        self.login.kpop = kpop
        # The open maildrop and what serves it, from its opening to UPDATE.
        self.retrieval: Retrieval | None = None
        self.out = bytearray()
        # True while UPDATE runs: a draining server waits for it.
        self.updating = False
        self._committed = False
        self.kicked = False  # ended by the administrator (kick): nothing of it is committed
        self._idle = False  # waiting for the client's next command
        self._heard = False  # the client sent something (a health check sends nothing)
        # The read deadline: one timer per connection, moved only when it
        # fires early (a timer per read cost more than parsing the command).
        self._loop_ref = stream.loop
        self._deadline = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_at = 0.0
        self._timed_out = False
        self._login_deadline = time.monotonic() + options.login_timeout
        self.session.kerberos = services.kerberos
        if trace_log.isEnabledFor(logging.DEBUG) and trace_log.handlers:
            self.session.trace = self._trace_in
        if services.tally is not None:
            services.tally.connected(stream)

    @property
    def connected_at(self) -> float:
        return self.records.connected

    @property
    def state(self) -> str:
        """The POP3 state, as `who` and the metrics name it."""
        if self.updating:
            return "update"
        return "transaction" if self.retrieval is not None else "authorization"

    def kick(self) -> bool:
        """End this session now without applying its deletions; False if
        its UPDATE is already under way (it finishes, as a QUIT would)."""
        if self.updating:
            return False
        self.kicked = True
        log.info("%s: session of %s ended by the administrator", self.peer, self.session.user or "-")
        self.shutdown(b"-ERR [SYS/TEMP] Session ended by the administrator.\r\n")
        return True

    @property
    def options(self) -> Options:
        """This session's options (the user's option files may change them)."""
        return self.login.options

    # ---- helpers ------------------------------------------------------------

    def _security(self, tls_active: bool) -> ConnectionSecurity:
        tls = self.services.tls
        options = self.services.options
        can_upgrade = self.stream.get_extra_info("socket") is not None
        return ConnectionSecurity(
            tls=tls_active,
            plaintext_allowed=plaintext_allowed(
                options.clear_text_password,
                tls_active=tls_active or self.peer.tls_at_balancer,
                peer=self.peer.host,
                tls_configured=tls.context is not None,
            ),
            stls_available=(
                not tls_active
                and can_upgrade
                and tls.context is not None
                and options.effective_tls_support == "stls"
            ),
            channel_binding=tls.channel_binding if tls_active else None,
            certificate_user=certificate_identity(self.stream.get_extra_info("ssl_object")) if tls_active else None,
        )

    async def blocking(self, func: Callable[..., T], *args: Any) -> T:
        """`func(*args)` in the server's thread pool."""
        result: T = await self.services.run_blocking(func, *args)
        return result

    async def flush(self) -> None:
        if self.out:
            self.stream.write(bytes(self.out))
            self.out.clear()
        await self.stream.drain()

    @property
    def evictable(self) -> bool:
        """Not logged in and waiting for the client: first to go when full."""
        return self._idle and not self.session.authenticated

    def shutdown(self, reply: bytes = b"-ERR [SYS/TEMP] Server shutting down.\r\n") -> None:
        """The server is stopping: tell an idle client and close."""
        if self._idle:
            try:
                self.stream.write(reply)
            except (OSError, RuntimeError):  # the peer may be gone already (uvloop: RuntimeError)
                pass
        self.stream.close()

    def _watch_idle(self, timeout: float) -> None:
        """Give the coming read `timeout` seconds."""
        self._deadline = time.monotonic() + timeout
        if self._watchdog is not None and self._watchdog_at <= self._deadline:
            return  # fires early and moves itself
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog_at = self._deadline
        self._watchdog = self._loop_ref.call_later(timeout, self._check_idle)

    def _check_idle(self) -> None:
        self._watchdog = None
        if not self._idle:
            return  # busy: the next read arms it again
        left = self._deadline - time.monotonic()
        if left > 0:
            self._watchdog_at = self._deadline
            self._watchdog = self._loop_ref.call_later(left, self._check_idle)
            return
        self._timed_out = True
        self.stream.feed_eof()  # wakes the read; the loop sees _timed_out

    def _trace_in(self, line: str) -> None:
        trace_log.debug("%s %s < %s", self.peer, self.session.user or "-", printable(line))

    def trace_out(self, data: bytes) -> None:
        if self.session.trace is None:
            return
        first, _, rest = data.partition(b"\r\n")
        more = f" (+{rest.count(_CRLF)} lines)" if rest else ""
        trace_log.debug("%s %s > %s%s", self.peer, self.session.user or "-", printable(first), more)

    # ---- the session --------------------------------------------------------

    async def run(self) -> None:
        """Serve the session to its end: take the session's effects, carry
        them out, read the client's commands while it has none. The loop is
        written out here, not in a coroutine of its own that each waiting
        session would hold (300 bytes) beside this one."""
        log.debug("%s: connected (%s)", self.peer, "TLS" if self.session.security.tls else "plain")
        try:
            session = self.session
            stream = self.stream
            handlers = self._HANDLERS
            while True:
                effect = session.next_effect()
                if effect is None:
                    await self.flush()
                    self._idle = True
                    timeout = self.options.timeout
                    if not session.authenticated:
                        timeout = min(timeout, max(0.0, self._login_deadline - time.monotonic()))
                    self._watch_idle(timeout)
                    try:
                        while (waiter := stream.input_waiter()) is not None:
                            await waiter
                        data = stream.take(READ_SIZE)
                    finally:
                        self._idle = False
                    if self._timed_out or not data:
                        self._log_input_end(timeout)
                        return
                    self._heard = True
                    session.receive_data(data)
                elif type(effect) is Send:  # most effects are replies: no table, no call
                    self.trace_out(effect.data)
                    self.out += effect.data
                elif await handlers[type(effect)](self, effect):
                    return
        except ssl.SSLError as exc:
            # An alert from the client or a broken record: the peer's doing,
            # an ordinary disconnect; nothing is committed.
            log.info("%s: TLS error, connection closed: %s", self.peer, tls_failure_reason(exc))
        except (ConnectionError, asyncio.IncompleteReadError):
            self._log_end("connection lost")
        except _Abort:
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: internal error in session of %s", self.peer, self.session.user)
            await self._report_internal_error()
        finally:
            await self._finish()

    def _log_input_end(self, timeout: float) -> None:
        """The client's input ended: the read deadline passed (RFC 1939's
        autologout: the session closes without a reply and commits
        nothing) or the client closed."""
        if self._timed_out:
            session = self.session
            who = f"for {session.user}" if session.authenticated else "before login"
            log.info("%s: timeout (%.0f s) %s", self.peer, timeout, who)
        else:
            self._log_end("connection closed")

    def _log_end(self, how: str) -> None:
        """How the peer went: at debug level for a balancer's health check
        that said nothing (one line per check would bury the clients'),
        at info for everything else, a client's disconnect above all."""
        if self.peer.balancer_check and not self._heard:
            log.debug("%s: %s (the balancer's health check)", self.peer, how)
        else:
            log.info("%s: %s", self.peer, how)

    async def _report_internal_error(self) -> None:
        self.session.internal_error()
        self.out.clear()
        try:
            while (effect := self.session.next_effect()) is not None:
                if isinstance(effect, Send):
                    self.out += effect.data
            await asyncio.wait_for(self.flush(), 5)
        except Exception:  # noqa: BLE001, S110 - last word of a broken session; the peer may be gone
            pass

    async def _finish(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        try:
            retrieval, self.retrieval = self.retrieval, None
            if retrieval is not None:
                maildrop = retrieval.maildrop
                try:
                    if self.options.update_on_abort and self.session.in_transaction and not self.kicked:
                        # qpopper's update-on-abort: commit marks on a lost connection.
                        self.updating = True
                        marks = Commit(frozenset(self.session.marked_deleted), self.session.retrieved)
                        await asyncio.shield(self._commit_maildrop(maildrop, marks))
                except Exception:
                    log.exception("%s: update on abort failed for %s", self.peer, self.session.user)
                finally:
                    self.updating = False
                    await _update.close(self.login, maildrop)
            try:
                await self.records.write(self.options, self.login.principal, self.session, self._committed)
            except Exception:  # records are a courtesy; never fail the close on them
                log.exception("%s: cannot write the session records", self.peer)
        finally:
            # Whatever happened above, even a cancellation: the socket closes.
            self.stream.close()
            self.records.cancel_lookup()
            if self.services.tally is not None:
                deleted = len(self.session.marked_deleted) if self._committed else 0
                self.services.tally.session_ended(len(self.session.retrieved), deleted)
        await self.login.wait_background(timeout=10)
        await self.stream.wait_closed(timeout=5)

    # ---- effect handlers (see _HANDLERS) -------------------------------------

    async def _authenticate(self, effect: Authenticate) -> None:
        await self.flush()
        await self.login.authenticate(effect)

    async def _lookup_scram_secret(self, effect: LookupScramSecret) -> None:
        await self.flush()
        await self.login.lookup_scram_secret(effect)

    async def _sasl_step(self, effect: SaslStep) -> None:
        await self.flush()
        await self.login.sasl_step(effect)

    async def _open_maildrop(self, effect: OpenMaildrop) -> None:
        maildrop = await self.login.open_maildrop()
        if maildrop is not None:
            self.retrieval = Retrieval(maildrop, self)

    # Retrieval's effects come only while the maildrop is open. These hand
    # over the coroutine itself (no frame of their own on every RETR).

    def _send_message(self, effect: SendMessage) -> Awaitable[None]:
        retrieval = self.retrieval
        assert retrieval is not None
        return retrieval.send_message(effect)

    def _list_headers(self, effect: ListHeaders) -> Awaitable[None]:
        retrieval = self.retrieval
        assert retrieval is not None
        return retrieval.list_headers(effect)

    def _compute_sizes(self, effect: ComputeSizes) -> Awaitable[None]:
        retrieval = self.retrieval
        assert retrieval is not None
        return retrieval.compute_sizes(effect)

    def _resolve_uids(self, effect: ResolveUids) -> Awaitable[None]:
        retrieval = self.retrieval
        assert retrieval is not None
        return retrieval.resolve_uids(effect)

    async def _submit(self, effect: SubmitMessage) -> None:
        await self.flush()
        error, text = await self.blocking(submit, self.options.mail_command, effect.sender, effect.data)
        self.session.submit_done(error, text)

    async def _start_tls(self, effect: StartTls) -> bool:
        """STLS: flush "+OK", drop buffered plaintext, shake hands; a failed
        handshake ends the session."""
        context = self.services.tls.context
        assert context is not None
        await self.flush()
        discarded = self.stream.discard_buffered()
        if discarded:
            log.warning("%s: discarding %d bytes sent in clear after STLS", self.peer, discarded)
        try:
            await self.stream.start_tls(context, ssl_handshake_timeout=self.options.tls_handshake_timeout)
        except (ssl.SSLError, ConnectionError, TimeoutError, OSError) as exc:
            log.info("%s: STLS handshake failed: %s", self.peer, exc)
            if self.services.tally is not None:
                self.services.tally.tls_handshake("stls", ok=False)
            return True
        if self.services.tally is not None:
            self.services.tally.tls_handshake("stls", ok=True)
        self.session.tls_started(self._security(tls_active=True))
        return False

    async def _commit(self, effect: Commit) -> None:
        assert self.retrieval is not None
        if self.kicked:  # a QUIT that was read before the kick: its deletions are not applied
            raise _Abort()
        maildrop = self.retrieval.maildrop
        self.updating = True
        try:
            commit = self._commit_maildrop(maildrop, effect)
            if _update.runs_on_loop(self.login, maildrop, effect.deleted, effect.retrieved):
                await commit  # never suspends, so no cancellation can stop it halfway: nothing to shield
            else:
                # A task of our own: shield(coroutine) would ask for the running loop (a getpid on 3.11).
                await asyncio.shield(self._loop_ref.create_task(commit))
        except MaildropError as exc:
            log.error("%s: update failed for %s: %s", self.peer, self.session.user, exc)
            self.session.commit_done(exc.code)
        except OSError as exc:
            log.error("%s: update failed for %s: %s", self.peer, self.session.user, exc)
            self.session.commit_done(ResponseCode.SYS_TEMP)
        else:
            log.info("%s: %s quit, %d deleted", self.peer, self.session.user, len(effect.deleted))
            if self.services.committed is not None:
                self.services.committed(self.session.user or "", len(effect.deleted), len(effect.retrieved))
            self.session.commit_done()
        finally:
            self.updating = False
            self.retrieval = None  # its maildrop is closed by the commit

    async def _commit_maildrop(self, maildrop: Maildrop, effect: Commit) -> None:
        await _update.commit(self.login, maildrop, effect.deleted, effect.retrieved)
        self._committed = True

    async def _close(self, effect: Close) -> bool:
        await self.flush()
        return True

    # Each effect's handler, looked up once per effect by _loop.
    _HANDLERS: ClassVar[dict[type[Effect], _Handler]] = {
        SendMessage: _send_message,
        Authenticate: _authenticate,
        OpenMaildrop: _open_maildrop,
        Commit: _commit,
        StartTls: _start_tls,
        LookupScramSecret: _lookup_scram_secret,
        ListHeaders: _list_headers,
        SaslStep: _sasl_step,
        ComputeSizes: _compute_sizes,
        ResolveUids: _resolve_uids,
        SubmitMessage: _submit,
        Close: _close,
    }
