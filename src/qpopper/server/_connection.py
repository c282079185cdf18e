"""One client connection: the asyncio adapter around a protocol Session.

It reads bytes into the session, carries out the session's effects and
writes the replies. Replies accumulate in one buffer and go out in a single
write when the session needs input or before any slow step, so a pipelined
burst of commands costs one packet, not one per reply. Slow or blocking
steps (password checks, opening and committing a maildrop) run in the
server's thread pool so that no session stalls another.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..auth import Authenticator, Principal
from ..auth.credentials import Rejected
from ..errors import AuthUnavailable, MaildropError, ResponseCode
from ..maildrop import Maildrop
from ..maildrop.location import open_maildrop
from ..options import Options
from ..policy import plaintext_allowed
from ..protocol import (
    Authenticate,
    Close,
    Commit,
    ConnectionSecurity,
    LookupScramSecret,
    OpenMaildrop,
    Send,
    SendMessage,
    Session,
    SessionConfig,
    StartTls,
    StuffingEncoder,
)
from ._tls import certificate_identity

log = logging.getLogger("qpopper.session")

T = TypeVar("T")
READ_SIZE = 65536
# Messages are written in chunks of about this size, waiting for the
# client to take each before reading the next from disk.
WRITE_CHUNK = 256 * 1024


@dataclass(frozen=True, slots=True)
class Peer:
    """The client's address, from the one place each connection gets it."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def session_config(options: Options) -> SessionConfig:
    return SessionConfig(
        hostname=options.hostname,
        shy=options.shy,
        allow_user_pass=options.allow_user_pass,
        apop=options.apop,
        login_delay=options.announce_login_delay,
        expire=options.announce_expire,
        sasl_mechanisms=options.sasl_mechanisms,
    )


def new_timestamp(hostname: str) -> str:
    """An APOP challenge `<pid.clock@host>` that no greeting repeats.

    The clock part mixes the time with 40 random bits, so two greetings in
    the same microsecond of the same process still differ; it stays a plain
    `<digits.digits@host>` msg-id, which strict clients require.
    """
    clock = time.time_ns() // 1000 * (1 << 40) + secrets.randbits(40)
    return f"<{os.getpid()}.{clock}@{hostname}>"


class _Abort(Exception):
    """End the connection at once, without a reply."""


@dataclass(slots=True)
class TlsState:
    """The server's live TLS context and channel binding (reloaded on HUP)."""

    context: ssl.SSLContext | None = None
    channel_binding: bytes | None = None


class Connection:
    """Serves one session over a (reader, writer) pair."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: Peer,
        options: Options,
        authenticator: Authenticator,
        run_blocking: Callable[..., Any],
        tls: TlsState | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.options = options
        self.authenticator = authenticator
        self._run_blocking = run_blocking
        self._tls = tls or TlsState()
        self.session = Session(
            session_config(options),
            timestamp=new_timestamp(options.hostname),
            security=self._security(tls_active=writer.get_extra_info("ssl_object") is not None),
        )
        self.maildrop: Maildrop | None = None
        self.principal: Principal | None = None
        self._out = bytearray()
        # True while UPDATE runs: a draining server waits for it.
        self.updating = False

    def _security(self, tls_active: bool) -> ConnectionSecurity:
        can_upgrade = self.writer.get_extra_info("socket") is not None
        return ConnectionSecurity(
            tls=tls_active,
            plaintext_allowed=plaintext_allowed(
                self.options.clear_text_password,
                tls_active=tls_active,
                peer=self.peer.host,
                tls_configured=self._tls.context is not None,
            ),
            stls_available=(
                not tls_active
                and can_upgrade
                and self._tls.context is not None
                and self.options.effective_tls_support == "stls"
            ),
            channel_binding=self._tls.channel_binding if tls_active else None,
            certificate_user=certificate_identity(self.writer.get_extra_info("ssl_object")) if tls_active else None,
        )

    async def _blocking(self, func: Callable[..., T], *args: Any) -> T:
        result: T = await self._run_blocking(func, *args)
        return result

    async def _flush(self) -> None:
        if self._out:
            self.writer.write(bytes(self._out))
            self._out.clear()
        await self.writer.drain()

    async def run(self) -> None:
        try:
            await self._loop()
        except (ConnectionError, asyncio.IncompleteReadError):
            log.info("%s: connection lost", self.peer)
        except _Abort:
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: internal error in session of %s", self.peer, self.session.user)
            await self._report_internal_error()
        finally:
            await self._finish()

    async def _report_internal_error(self) -> None:
        self.session.internal_error()
        self._out.clear()
        try:
            while (effect := self.session.next_effect()) is not None:
                if isinstance(effect, Send):
                    self._out += effect.data
            await asyncio.wait_for(self._flush(), 5)
        except Exception:  # the peer may be gone; nothing more to tell it
            pass

    async def _finish(self) -> None:
        maildrop, self.maildrop = self.maildrop, None
        if maildrop is not None:
            try:
                if self.options.update_on_abort and self.session.in_transaction:
                    # qpopper's update-on-abort: commit marks on a lost connection.
                    self.updating = True
                    await asyncio.shield(
                        self._blocking(maildrop.commit, self.session.marked_deleted, self.session.retrieved)
                    )
            except Exception:
                log.exception("%s: update on abort failed for %s", self.peer, self.session.user)
            finally:
                self.updating = False
                maildrop.close()
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        except Exception:
            pass

    async def _loop(self) -> None:
        session = self.session
        while True:
            effect = session.next_effect()
            if effect is None:
                await self._flush()
                try:
                    data = await asyncio.wait_for(self.reader.read(READ_SIZE), self.options.timeout)
                except TimeoutError:
                    # RFC 1939 autologout: close without a reply, commit nothing.
                    log.info("%s: timeout (%.0f s) for %s", self.peer, self.options.timeout, session.user)
                    return
                if not data:
                    log.info("%s: client closed the connection", self.peer)
                    return
                session.receive_data(data)
            elif isinstance(effect, Send):
                self._out += effect.data
            elif isinstance(effect, SendMessage):
                await self._send_message(effect)
            elif isinstance(effect, Authenticate):
                await self._flush()
                await self._authenticate(effect)
            elif isinstance(effect, OpenMaildrop):
                await self._open_maildrop()
            elif isinstance(effect, Commit):
                await self._flush()
                await self._commit(effect)
            elif isinstance(effect, StartTls):
                if not await self._start_tls():
                    return
            elif isinstance(effect, LookupScramSecret):
                await self._flush()
                await self._lookup_scram_secret(effect)
            elif isinstance(effect, Close):
                await self._flush()
                return

    async def _start_tls(self) -> bool:
        """STLS: flush "+OK", drop buffered plaintext, shake hands."""
        assert self._tls.context is not None
        await self._flush()
        buffered = getattr(self.reader, "_buffer", None)
        if buffered:
            log.warning("%s: discarding %d bytes sent in clear after STLS", self.peer, len(buffered))
            buffered.clear()
        try:
            await self.writer.start_tls(
                self._tls.context, ssl_handshake_timeout=self.options.tls_handshake_timeout
            )
        except (ssl.SSLError, ConnectionError, TimeoutError, OSError) as exc:
            log.info("%s: STLS handshake failed: %s", self.peer, exc)
            return False
        self.session.tls_started(self._security(tls_active=True))
        return True

    async def _lookup_scram_secret(self, effect: LookupScramSecret) -> None:
        lookup = getattr(self.authenticator, "scram_secret", None)
        secret = None
        if lookup is not None:
            try:
                secret = await self._blocking(lookup, effect.user, effect.mechanism)
            except AuthUnavailable as exc:
                log.error("%s: SCRAM secret lookup failed: %s", self.peer, exc)
        self.session.scram_secret(secret)

    async def _authenticate(self, effect: Authenticate) -> None:
        started = time.monotonic()
        try:
            if isinstance(effect.credentials, Rejected):
                principal = None
            else:
                principal = await self._blocking(self.authenticator.authenticate, effect.credentials)
        except (AuthUnavailable, MaildropError) as exc:
            log.error("%s: authentication backend failed: %s", self.peer, exc)
            self.session.auth_failed(ResponseCode.SYS_TEMP)
            return
        if principal is None:
            # Unknown user and wrong password: one answer, at one time.
            delay = self.options.auth_fail_delay - (time.monotonic() - started)
            if delay > 0:
                await asyncio.sleep(delay)
            log.info("%s: authentication failed for %s", self.peer, effect.credentials.user)
            self.session.auth_failed(ResponseCode.AUTH)
            return
        self.principal = principal
        self.session.auth_succeeded(principal.user)

    async def _open_maildrop(self) -> None:
        assert self.principal is not None
        try:
            maildrop = await self._blocking(open_maildrop, self.principal.mail)
        except MaildropError as exc:
            log.warning("%s: cannot open maildrop of %s: %s", self.peer, self.principal.user, exc)
            self.session.maildrop_failed(exc.code)
            return
        self.maildrop = maildrop
        messages = maildrop.messages()
        log.info("%s: %s logged in, %d messages", self.peer, self.principal.user, len(messages))
        self.session.maildrop_opened(messages)

    async def _send_message(self, effect: SendMessage) -> None:
        assert self.maildrop is not None
        chunks = self.maildrop.read(effect.index)
        try:
            first = next(chunks, b"")
        except (MaildropError, OSError) as exc:
            log.error("%s: cannot read message %d of %s: %s", self.peer, effect.index + 1, self.session.user, exc)
            self.session.message_unavailable()
            return
        encoder = StuffingEncoder(effect.body_lines)
        out = self._out
        out += effect.status
        out += encoder.encode(first)
        try:
            for chunk in chunks:
                if encoder.done:
                    break
                out += encoder.encode(chunk)
                if len(out) >= WRITE_CHUNK:
                    await self._flush()
        except (MaildropError, OSError) as exc:
            # Half a message is on the wire: the only honest end is a close.
            log.error("%s: reading message %d of %s failed: %s", self.peer, effect.index + 1, self.session.user, exc)
            raise _Abort() from exc
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        out += encoder.finish()
        out += b".\r\n"

    async def _commit(self, effect: Commit) -> None:
        assert self.maildrop is not None
        self.updating = True
        try:
            await asyncio.shield(self._blocking(self.maildrop.commit, effect.deleted, effect.retrieved))
        except MaildropError as exc:
            log.error("%s: update failed for %s: %s", self.peer, self.session.user, exc)
            self.session.commit_done(exc.code)
        else:
            log.info(
                "%s: %s quit, %d deleted",
                self.peer,
                self.session.user,
                len(effect.deleted),
            )
            self.session.commit_done()
        finally:
            self.updating = False
            maildrop, self.maildrop = self.maildrop, None
            maildrop.close()
