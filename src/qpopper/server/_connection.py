"""One client connection: the asyncio adapter around a protocol Session.

It reads bytes into the session, carries out the session's effects and
writes the replies. Replies accumulate in one buffer and go out in a single
write when the session needs input or before any slow step, so a pipelined
burst of commands costs one packet, not one per reply. Slow or blocking
steps (password checks, user option files, opening and committing a
maildrop) run in the server's thread pool so that no session stalls
another.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import ssl
import time
from collections.abc import Callable, Set
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..auth.access import AccessPolicy, FailureDelays, LoginDelays
from ..auth import Authenticator, Principal
from ..auth.credentials import Rejected
from ..auth.sasl import Fail
from ..config.configfile import Context, read_config
from ..errors import AuthUnavailable, ConfigError, MaildropError, ResponseCode, WouldBlock
from ..logtext import TRACE_LOGGER, printable
from ..maildrop import Maildrop, MaildropSettings
from ..maildrop._base import QuickUpdate, size_of
from ..maildrop.location import open_maildrop
from ..config.options import Options, apply_settings
from ..auth.cleartext import plaintext_allowed
from ..protocol import (
    Authenticate,
    Close,
    Commit,
    ComputeSizes,
    ConnectionSecurity,
    ListHeaders,
    LookupScramSecret,
    OpenMaildrop,
    ResolveUids,
    Send,
    SaslStep,
    SendMessage,
    Session,
    SessionConfig,
    StartTls,
    StuffingEncoder,
    SubmitMessage,
    encode_whole,
    wire_size,
)
from ._privileges import SpoolPrivilege, check_spool, drop_to_user
from ..extensions.xmangle.spec import MangleSpec
from ..extensions.postlogin import after_login
from ..extensions.xmangle.messages import mangle_message, too_big_to_mangle
from ._spool import maildrop_settings, resolve_spool
from ._stream import PopStream
from ._records import SessionTimes, expand_login_template, reverse_lookup, statistics_record
from ._tls import certificate_identity, tls_failure_reason
from ..extensions.xtnd import euidl_value, find_header, header_lines, submit, xlst_lines

log = logging.getLogger("qpopper.session")
trace_log = logging.getLogger(TRACE_LOGGER)

T = TypeVar("T")
READ_SIZE = 65536
# Messages are written in chunks of about this size, waiting for the
# client to take each before reading the next from disk.
WRITE_CHUNK = 256 * 1024
# Maildrops up to this many messages get their deferred UIDs on the event
# loop (about 5 µs each for mbox, read with pread from the page cache).
QUICK_UIDS = 1000
_CRLF = b"\r\n"


@dataclass(frozen=True, slots=True)
class Peer:
    """The client's address, from the one place each connection gets it."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(slots=True)
class TlsState:
    """The server's live TLS context and channel binding (reloaded on HUP)."""

    context: ssl.SSLContext | None = None
    channel_binding: bytes | None = None


@dataclass(slots=True)
class Services:
    """What every connection of one server shares."""

    options: Options
    authenticator: Authenticator
    run_blocking: Callable[..., Any]
    tls: TlsState = field(default_factory=TlsState)
    access: AccessPolicy | None = None
    login_delays: LoginDelays = field(default_factory=LoginDelays)
    failures: FailureDelays = field(init=False)
    # System users: become the user before opening anything of theirs.
    drop_privileges: bool = False
    # The Kerberos acceptor when GSSAPI logins are on.
    kerberos: object | None = None
    # One frozen SessionConfig shared by new sessions while `options` stays.
    _config: tuple[Options, SessionConfig] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.access is None:
            self.access = AccessPolicy(self.options.nonauth_file, self.options.auth_file)
        self.failures = FailureDelays(self.options.auth_fail_delay, self.options.auth_fail_delay_max)

    def session_config(self) -> SessionConfig:
        if self._config is None or self._config[0] is not self.options:
            self._config = (self.options, session_config(self.options))
        return self._config[1]


def session_config(options: Options) -> SessionConfig:
    return SessionConfig(
        hostname=options.hostname,
        shy=options.shy,
        allow_user_pass=options.allow_user_pass,
        apop=options.apop,
        login_delay=options.announce_login_delay,
        expire=options.announce_expire,
        downcase_user=options.downcase_user,
        trim_domain=options.trim_domain,
        auto_delete=options.auto_delete,
        xmit=not options.xmit_disable,
        xmit_max_size=options.xmit_max_size,
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


def user_option_files(options: Options, principal: Principal) -> list[tuple[str, Context]]:
    """qpopper's -u and -U files, home first so the spool file wins."""
    files = []
    if options.user_options and principal.home:
        files.append((os.path.join(principal.home, ".qpopper-options"), Context.USER))
    if options.spool_options:
        files.append((os.path.join(options.spool_dir, f".{principal.user}.qpopper-options"), Context.SPOOL))
    return files


def read_user_options(options: Options, principal: Principal) -> Options:
    """Apply the user's option files; unreadable or broken ones are logged
    and skipped, never a failed login."""
    assignments = []
    for path, context in user_option_files(options, principal):
        if not os.path.lexists(path):
            continue
        try:
            found = read_config(path, context)
        except ConfigError as exc:
            log.warning("%s: %s", context.value, exc)
            continue
        assignments += [(a.setting.name, a.value, a.source) for a in found]
    if not assignments:
        return options
    try:
        return apply_settings(options, assignments)
    except ConfigError as exc:
        log.warning("user options of %s ignored: %s", principal.user, exc)
        return options


class _Abort(Exception):
    """End the connection at once, without a reply."""


class Connection:
    """Serves one session over a client's stream."""

    def __init__(self, stream: PopStream, peer: Peer, services: Services) -> None:
        self.stream = stream
        self.peer = peer
        self.services = services
        self.options = services.options  # per session: user option files may change it
        self.session = Session(
            services.session_config(),
            timestamp=new_timestamp(self.options.hostname),
            security=self._security(tls_active=stream.get_extra_info("ssl_object") is not None),
        )
        self.maildrop: Maildrop | None = None
        self.principal: Principal | None = None
        self._out = bytearray()
        # True while UPDATE runs: a draining server waits for it.
        self.updating = False
        self._committed = False
        self._times = SessionTimes()
        self._spool_privilege: SpoolPrivilege | None = None
        self._background: set[asyncio.Task[Any]] | None = None  # made by the first one
        self._idle = False  # waiting for the client's next command
        # The read deadline: one timer per connection, moved only when it
        # fires early (a timer per read cost more than parsing the command).
        self._loop_ref = asyncio.get_running_loop()
        self._deadline = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_at = 0.0
        self._timed_out = False
        self._login_deadline = time.monotonic() + self.options.login_timeout
        self.connected_at = time.monotonic()
        self._last_mangled: tuple[tuple[int, MangleSpec], bytes] | None = None
        self._host_name: asyncio.Task[str] | None = None
        # The name only appears in the records that ask for it, so a server
        # that writes none of them asks the resolver nothing.
        wants_name = self.options.statistics or self.options.timing or bool(self.options.log_login)
        if self.options.reverse_lookup and wants_name and peer.host != "local":
            self._host_name = asyncio.get_running_loop().create_task(reverse_lookup(peer.host, services.run_blocking))
        self.session.kerberos = services.kerberos
        if trace_log.isEnabledFor(logging.DEBUG) and trace_log.handlers:
            self.session.trace = self._trace_in

    # ---- helpers ------------------------------------------------------------

    def _security(self, tls_active: bool) -> ConnectionSecurity:
        tls = self.services.tls
        can_upgrade = self.stream.get_extra_info("socket") is not None
        return ConnectionSecurity(
            tls=tls_active,
            plaintext_allowed=plaintext_allowed(
                self.options.clear_text_password,
                tls_active=tls_active,
                peer=self.peer.host,
                tls_configured=tls.context is not None,
            ),
            stls_available=(
                not tls_active
                and can_upgrade
                and tls.context is not None
                and self.options.effective_tls_support == "stls"
            ),
            channel_binding=tls.channel_binding if tls_active else None,
            certificate_user=certificate_identity(self.stream.get_extra_info("ssl_object")) if tls_active else None,
        )

    async def _blocking(self, func: Callable[..., T], *args: Any) -> T:
        result: T = await self.services.run_blocking(func, *args)
        return result

    async def _flush(self) -> None:
        if self._out:
            self.stream.write(bytes(self._out))
            self._out.clear()
        await self.stream.drain()

    @property
    def evictable(self) -> bool:
        """Not logged in and waiting for the client: first to go when full."""
        return self._idle and not self.session.authenticated

    def shutdown(self) -> None:
        """The server is stopping: tell an idle client and close."""
        if self._idle:
            try:
                self.stream.write(b"-ERR [SYS/TEMP] Server shutting down.\r\n")
            except Exception:  # the peer may be gone already
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

    def _trace_out(self, data: bytes) -> None:
        if self.session.trace is None:
            return
        first, _, rest = data.partition(b"\r\n")
        more = f" (+{rest.count(_CRLF)} lines)" if rest else ""
        trace_log.debug("%s %s > %s%s", self.peer, self.session.user or "-", printable(first), more)

    async def host_name(self) -> str:
        """The client's name if the reverse lookup confirmed one."""
        if self._host_name is None:
            return self.peer.host
        try:
            return await self._host_name
        except Exception:  # a resolver failure only costs us the name
            return self.peer.host

    # ---- the session --------------------------------------------------------

    async def run(self) -> None:
        log.debug("%s: connected (%s)", self.peer, "TLS" if self.session.security.tls else "plain")
        try:
            await self._loop()
        except ssl.SSLError as exc:
            # An alert from the client or a broken record: the peer's doing,
            # an ordinary disconnect; nothing is committed.
            log.info("%s: TLS error, connection closed: %s", self.peer, tls_failure_reason(exc))
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
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        try:
            maildrop, self.maildrop = self.maildrop, None
            if maildrop is not None:
                try:
                    if self.options.update_on_abort and self.session.in_transaction:
                        # qpopper's update-on-abort: commit marks on a lost connection.
                        self.updating = True
                        marks = Commit(frozenset(self.session.marked_deleted), self.session.retrieved)
                        await asyncio.shield(self._commit_maildrop(maildrop, marks))
                except Exception:
                    log.exception("%s: update on abort failed for %s", self.peer, self.session.user)
                finally:
                    self.updating = False
                    await self._close_maildrop(maildrop)
            try:
                await self._session_records()
            except Exception:  # records are a courtesy; never fail the close on them
                log.exception("%s: cannot write the session records", self.peer)
        finally:
            # Whatever happened above, even a cancellation: the socket closes.
            self.stream.close()
            if self._host_name is not None and not self._host_name.done():
                self._host_name.cancel()
        if self._background:
            # Let post-login work finish (a session process exits after this).
            await asyncio.wait(self._background, timeout=10)
        try:
            async with asyncio.timeout(5):
                await self.stream.wait_closed()
        except Exception:
            pass

    async def _session_records(self) -> None:
        if self.principal is None or not (self.options.statistics or self.options.timing):
            return
        self._times.finished = time.monotonic()
        host = await self.host_name()
        if self.options.statistics:
            deleted, octets, left, left_octets = self.session.drop_stats()
            if not self._committed:  # nothing was removed after all
                left, left_octets, deleted, octets = left + deleted, left_octets + octets, 0, 0
            log.info("%s", statistics_record(self.principal.user, (deleted, octets, left, left_octets), host, self.peer.host))
        if self.options.timing:
            log.info("%s", self._times.record(self.principal.user, host, self._committed))

    async def _loop(self) -> None:
        session = self.session
        while True:
            effect = session.next_effect()
            if effect is None:
                await self._flush()
                self._idle = True
                timeout = self.options.timeout
                if not session.authenticated:
                    timeout = min(timeout, max(0.0, self._login_deadline - time.monotonic()))
                self._watch_idle(timeout)
                try:
                    data = await self.stream.read(READ_SIZE)
                finally:
                    self._idle = False
                if self._timed_out:
                    # RFC 1939 autologout: close without a reply, commit nothing.
                    log.info("%s: timeout (%.0f s) for %s", self.peer, timeout, session.user)
                    return
                if not data:
                    log.info("%s: connection closed", self.peer)
                    return
                session.receive_data(data)
            elif isinstance(effect, Send):
                self._trace_out(effect.data)
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
            elif isinstance(effect, ListHeaders):
                await self._list_headers(effect)
            elif isinstance(effect, SaslStep):
                await self._flush()
                run = effect.mechanism.start if effect.initial else effect.mechanism.step
                try:
                    step = await self._blocking(run, effect.data)
                except Exception:
                    log.exception("%s: SASL %s step failed", self.peer, effect.mechanism.name)
                    step = Fail("mechanism failed")
                self.session.sasl_step_done(step)
            elif isinstance(effect, ComputeSizes):
                await self._flush()
                assert self.maildrop is not None
                sizes = {}
                for index in effect.indices:
                    if too_big_to_mangle(self.maildrop, index):
                        sizes[index] = size_of(self.maildrop.messages(), index)  # sent as stored
                    else:
                        sizes[index] = wire_size(await self._mangled(index, effect.spec))
                self.session.sizes_computed(effect.spec, sizes)
            elif isinstance(effect, ResolveUids):
                await self._resolve_uids(effect)
            elif isinstance(effect, SubmitMessage):
                await self._flush()
                error, text = await self._blocking(submit, self.options.mail_command, effect.sender, effect.data)
                self.session.submit_done(error, text)
            elif isinstance(effect, Close):
                await self._flush()
                return

    async def _resolve_uids(self, effect: ResolveUids) -> None:
        """UIDs a backend left for first use: worked out on the loop for a
        small maildrop, in a worker for a big one (a 50,000-message mbox
        takes a few tenths of a second to hash)."""
        try:
            if len(effect.messages) <= QUICK_UIDS:
                effect.messages.resolve_uids()
            else:
                await self._flush()
                await self._blocking(effect.messages.resolve_uids)
        except (MaildropError, OSError) as exc:
            log.error("%s: cannot work out the UIDs of %s: %s", self.peer, self.session.user, exc)
            self.session.uids_resolved(ok=False)
            return
        self.session.uids_resolved()

    async def _start_tls(self) -> bool:
        """STLS: flush "+OK", drop buffered plaintext, shake hands."""
        context = self.services.tls.context
        assert context is not None
        await self._flush()
        discarded = self.stream.discard_buffered()
        if discarded:
            log.warning("%s: discarding %d bytes sent in clear after STLS", self.peer, discarded)
        try:
            await self.stream.start_tls(context, ssl_handshake_timeout=self.options.tls_handshake_timeout)
        except (ssl.SSLError, ConnectionError, TimeoutError, OSError) as exc:
            log.info("%s: STLS handshake failed: %s", self.peer, exc)
            return False
        self.session.tls_started(self._security(tls_active=True))
        return True

    async def _lookup_scram_secret(self, effect: LookupScramSecret) -> None:
        lookup = getattr(self.services.authenticator, "scram_secret", None)
        secret = None
        if lookup is not None:
            try:
                secret = await self._blocking(lookup, effect.user, effect.mechanism)
            except AuthUnavailable as exc:
                log.error("%s: SCRAM secret lookup failed: %s", self.peer, exc)
        self.session.scram_secret(secret)

    async def _authenticate(self, effect: Authenticate) -> None:
        started = time.monotonic()
        user = effect.credentials.user
        try:
            if isinstance(effect.credentials, Rejected):
                principal = None
            else:
                quick = getattr(self.services.authenticator, "authenticate_quickly", None)
                principal = quick(effect.credentials) if quick is not None else None
                if principal is None:
                    principal = await self._blocking(self.services.authenticator.authenticate, effect.credentials)
        except (AuthUnavailable, MaildropError) as exc:
            log.error("%s: authentication backend failed: %s", self.peer, exc)
            self.session.auth_failed(ResponseCode.SYS_TEMP)
            return
        if principal is not None:
            assert self.services.access is not None
            refusal = self.services.access.refusal(principal.user)
            if refusal is not None:
                log.warning("%s: login of %s refused: %s", self.peer, printable(principal.user), refusal)
                principal = None
        if principal is None:
            # Unknown user, wrong password, refused user: one answer, at one time.
            wanted = self.services.failures.delay(self.peer.host)
            self.services.failures.record_failure(self.peer.host)
            delay = wanted - (time.monotonic() - started)
            if delay > 0:
                await asyncio.sleep(delay)
            log.info("%s: authentication failed for %s", self.peer, printable(user))
            if self.options.log_auth_failures:
                log.warning("authentication failure; rhost=%s user=%s", self.peer.host, printable(user))
            self.session.auth_failed(ResponseCode.AUTH)
            return
        self.principal = principal
        self._times.authenticated = time.monotonic()
        self._after_login(principal.user)
        log.debug("%s: authenticated %s (%s)", self.peer, principal.user, type(effect.credentials).__name__)
        self.session.auth_succeeded(principal.user)

    def _open_quickly(self, location: str, settings: MaildropSettings) -> Maildrop | None:
        """Open a small, unlocked maildrop right here on the event loop.

        Most maildrops are small, and for them the hand-over to a worker
        thread and back costs more CPU than the open itself (each system
        call in a thread is a fight for the GIL). Anything that could
        take long or wait comes back None, changed nothing, and goes to
        a worker. A process that switches groups for the spool always
        uses the worker, which holds the switch."""
        if self._spool_privilege is not None:
            return None
        try:
            return open_maildrop(location, settings, quick=True)
        except WouldBlock:
            return None

    def _after_login(self, user: str) -> None:
        """DRAC and the post-login hook, beside the session: never a delay,
        never a failed login. Runs before any privilege drop, so the hook
        file and command need not be the user's."""
        options = self.options
        if not (options.drac_host or options.post_login_command or options.post_login_file):
            return
        task = asyncio.get_running_loop().create_task(
            self._blocking(
                functools.partial(
                    after_login,
                    drac_host=options.drac_host,
                    command=options.post_login_command,
                    file=options.post_login_file,
                ),
                user,
                self.peer.host,
            )
        )
        if self._background is None:
            self._background = set()
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _open_maildrop(self) -> None:
        assert self.principal is not None
        principal: Principal = self.principal
        if self.services.drop_privileges:
            try:
                # In this process's own thread: the switch is for the whole
                # process, and no worker thread may still run as root.
                self._spool_privilege = drop_to_user(principal)
                resolved: Principal = await self._blocking(self._privileged, resolve_spool, self.options, principal)
                principal = self.principal = resolved
                check_spool(principal)
            except MaildropError as exc:
                log.error("%s: %s", self.peer, exc)
                self.principal = None
                self.session.maildrop_failed(exc.code)
                return
            log.debug("%s: now running as uid %d gid %d", self.peer, os.getuid(), os.getgid())
        if self.options.user_options or self.options.spool_options:
            self.options = await self._blocking(read_user_options, self.options, principal)
            self.session.config = session_config(self.options)
        delay = self.options.announce_login_delay
        if self.options.enforce_login_delay and delay and self.services.login_delays.too_soon(principal.user, delay):
            log.info("%s: %s logged in again within %d s", self.peer, principal.user, delay)
            self.principal = None
            self.session.maildrop_failed(ResponseCode.LOGIN_DELAY)
            return
        try:
            settings = maildrop_settings(self.options, principal)
            quick = self._open_quickly(principal.mail, settings)
            if quick is not None:
                maildrop: Maildrop = quick
            else:
                maildrop = await self._blocking(self._privileged, open_maildrop, principal.mail, settings)
        except OSError as exc:  # a backend that let one through: still the system's fault
            log.error("%s: cannot open maildrop of %s: %s", self.peer, principal.user, exc)
            self.principal = None
            self.session.maildrop_failed(ResponseCode.SYS_TEMP)
            return
        except MaildropError as exc:
            log.warning("%s: cannot open maildrop of %s: %s", self.peer, principal.user, exc)
            self.principal = None
            self.session.maildrop_failed(exc.code)
            return
        if self.options.bulldir:
            try:
                reopened = await self._deliver_bulletins(principal, maildrop, settings)
            except MaildropError as exc:
                await self._close_maildrop(maildrop)
                self.principal = None
                self.session.maildrop_failed(exc.code)
                return
            if reopened is not None:
                maildrop = reopened
        self.maildrop = maildrop
        self._times.opened = time.monotonic()
        log.debug("%s: opened %s in %.3f s", self.peer, principal.mail, self._times.opened - (self._times.authenticated or 0))
        if self.options.enforce_login_delay:  # a record per user otherwise kept for nothing
            self.services.login_delays.record(principal.user)
        messages = maildrop.messages()
        log.info("%s: %s logged in, %d messages", self.peer, principal.user, len(messages))
        if self.options.log_login:
            host = await self.host_name()
            log.info("%s", expand_login_template(self.options.log_login, principal.user, host, self.peer.host))
        self.session.maildrop_opened(messages)

    async def _list_headers(self, effect: ListHeaders) -> None:
        assert self.maildrop is not None
        out = bytearray() if effect.single else bytearray(effect.status)
        for index, size, uid in effect.entries:
            try:
                lines = await self._blocking(header_lines, self.maildrop, index)
            except (MaildropError, OSError) as exc:
                log.error("%s: cannot read message %d: %s", self.peer, index + 1, exc)
                lines = []
            field = find_header(lines, effect.header)
            if effect.style == "xlst":
                for line in xlst_lines(index + 1, field):
                    out += line
            else:
                out += b"%d %s %d " % (index + 1, uid.encode("ascii"), size) + euidl_value(field) + b"\r\n"
        if effect.single:
            self._out += effect.status + bytes(out)
        else:
            self._out += out + b".\r\n"

    async def _deliver_bulletins(
        self, principal: Principal, maildrop: Maildrop, settings: MaildropSettings
    ) -> Maildrop | None:
        """Deliver new bulletins while the POP lock is held; if any arrived,
        list the maildrop again so they are in this session. Returns the
        reopened maildrop, or None if nothing changed."""
        from ..extensions import bulletins

        options = self.options
        bulldir = options.bulldir
        assert bulldir is not None
        candidates = bulletins.for_user(bulletins.scan(bulldir), principal, options.group_bulletins)
        host = options.hostname
        delivered = 0
        if options.bulldb:
            db = bulletins.BulletinDatabase(bulldir, options.bulldb_max_tries)

            def change(mark: int | None) -> int | None:
                nonlocal delivered
                if mark is None:
                    mark = bulletins.read_popbull(principal.home)  # import the old file once
                todo, newest = bulletins.pending(candidates, mark, options.max_bulletins)
                delivered = len(todo)
                bulletins.deliver(principal.mail, todo, principal.user, host)
                return newest if candidates else mark

            try:
                await self._blocking(self._privileged, db.update, principal.user, change)
            except (OSError, TimeoutError) as exc:
                log.error("%s: bulletin database %s: %s", self.peer, db.path, exc)
                if not options.bulldb_nonfatal:
                    raise MaildropError("bulletin database unavailable", ResponseCode.SYS_TEMP) from exc
                return None
        else:
            if not principal.home:
                log.warning("%s: %s has no home for .popbull; bulletins need bulldb", self.peer, principal.user)
                return None
            mark = await self._blocking(bulletins.read_popbull, principal.home)
            todo, newest = bulletins.pending(candidates, mark, options.max_bulletins)
            try:
                await self._blocking(self._privileged, bulletins.deliver, principal.mail, todo, principal.user, host)
                if candidates and newest != mark:
                    await self._blocking(bulletins.write_popbull, principal.home, newest)
            except OSError as exc:
                log.error("%s: [SYS/TEMP] bulletins for %s not delivered: %s", self.peer, principal.user, exc)
                return None
            delivered = len(todo)
        if not delivered:
            return None
        await self._close_maildrop(maildrop)
        reopened: Maildrop = await self._blocking(self._privileged, open_maildrop, principal.mail, settings)
        return reopened

    async def _mangled(self, index: int, spec: MangleSpec) -> bytes:
        """Message `index` condensed by XMANGLE; the last one is kept, so
        LIST n and RETR n in a row mangle once."""
        key = (index, spec)
        if self._last_mangled is not None and self._last_mangled[0] == key:
            return self._last_mangled[1]
        assert self.maildrop is not None
        result: bytes = await self._blocking(mangle_message, self.maildrop, index, spec)
        self._last_mangled = (key, result)
        return result

    async def _send_message(self, effect: SendMessage) -> None:
        assert self.maildrop is not None
        if effect.mangle is not None and not too_big_to_mangle(self.maildrop, effect.index):
            try:
                mangled = await self._mangled(effect.index, effect.mangle)
            except (MaildropError, OSError) as exc:
                log.error("%s: cannot read message %d of %s: %s", self.peer, effect.index + 1, self.session.user, exc)
                self.session.message_unavailable(effect.index)
                return
            if effect.body_lines is None:
                body = encode_whole(mangled)
            else:
                top = StuffingEncoder(effect.body_lines)
                body = top.encode(mangled) + top.finish()
            self._trace_out(effect.status)
            self._out += effect.status + body + b".\r\n"
            return
        chunks = self.maildrop.read(effect.index)
        try:
            first = next(chunks, b"")
        except (MaildropError, OSError) as exc:
            log.error("%s: cannot read message %d of %s: %s", self.peer, effect.index + 1, self.session.user, exc)
            self.session.message_unavailable(effect.index)
            return
        out = self._out
        start = len(out)  # this reply's first byte while nothing of it has been sent
        out += effect.status
        encoder: StuffingEncoder | None = None
        try:
            second = next(chunks, None)
            if second is None and effect.body_lines is None:
                out += encode_whole(first)  # the usual RETR: the message came in one read
            else:
                encoder = StuffingEncoder(effect.body_lines)
                out += encoder.encode(first)
                chunk = second
                while chunk is not None and not encoder.done:
                    out += encoder.encode(chunk)
                    if len(out) >= WRITE_CHUNK:
                        if start >= 0:  # the reply starts going out: trace it, once
                            self._trace_out(effect.status)
                            start = -1
                        await self._flush()
                    chunk = next(chunks, None)
        except (MaildropError, OSError) as exc:
            log.error("%s: reading message %d of %s failed: %s", self.peer, effect.index + 1, self.session.user, exc)
            if start < 0:
                raise _Abort() from exc  # half a message is on the wire: the only honest end is a close
            del out[start:]  # none of it went out: take it back and answer like an unreadable message
            self.session.message_unavailable(effect.index)
            return
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        if start >= 0:
            self._trace_out(effect.status)
        if encoder is not None:
            out += encoder.finish()
        out += b".\r\n"

    def _privileged(self, func: Callable[..., T], *args: Any) -> T:
        """Run `func` with the spool directory's group effective (system
        users on a group-writable spool directory); plainly otherwise."""
        if self._spool_privilege is None:
            return func(*args)
        with self._spool_privilege.effective():
            return func(*args)

    def _commit_and_close(self, maildrop: Maildrop, deleted: Set[int], retrieved: Set[int]) -> None:
        """UPDATE, then release the maildrop whatever UPDATE did: one trip
        to a worker thread for both, since each trip costs more CPU than a
        small commit."""
        try:
            self._privileged(maildrop.commit, deleted, retrieved)
        finally:
            try:
                self._privileged(maildrop.close)
            except Exception:
                log.exception("%s: closing the maildrop of %s failed", self.peer, self.session.user)

    def _writes_nothing(self, maildrop: Maildrop, deleted: Set[int], retrieved: Set[int]) -> bool:
        """UPDATE and close would only release locks: done on the loop."""
        if self._spool_privilege is not None or not isinstance(maildrop, QuickUpdate):
            return False
        return maildrop.writes_nothing(deleted, retrieved)

    async def _commit_maildrop(self, maildrop: Maildrop, effect: Commit) -> None:
        if self._writes_nothing(maildrop, effect.deleted, effect.retrieved):
            self._commit_and_close(maildrop, effect.deleted, effect.retrieved)
        else:
            await self._blocking(self._commit_and_close, maildrop, effect.deleted, effect.retrieved)
        self._committed = True

    async def _commit(self, effect: Commit) -> None:
        maildrop = self.maildrop
        assert maildrop is not None
        self.updating = True
        try:
            await asyncio.shield(self._commit_maildrop(maildrop, effect))
        except MaildropError as exc:
            log.error("%s: update failed for %s: %s", self.peer, self.session.user, exc)
            self.session.commit_done(exc.code)
        except OSError as exc:
            log.error("%s: update failed for %s: %s", self.peer, self.session.user, exc)
            self.session.commit_done(ResponseCode.SYS_TEMP)
        else:
            log.info("%s: %s quit, %d deleted", self.peer, self.session.user, len(effect.deleted))
            self.session.commit_done()
        finally:
            self.updating = False
            self.maildrop = None  # closed by _commit_and_close

    async def _close_maildrop(self, maildrop: Maildrop) -> None:
        """Release it off the loop: in temp-drop mode a session that ends
        without QUIT copies its temp drop back, which takes time."""
        try:
            if self._writes_nothing(maildrop, frozenset(), frozenset()):
                maildrop.close()
            else:
                await asyncio.shield(self._blocking(self._privileged, maildrop.close))
        except Exception:
            log.exception("%s: closing the maildrop of %s failed", self.peer, self.session.user)
