"""The login step of one connection: from credentials to an open maildrop.

The protocol session says what to check (an `Authenticate` effect) and when
to open the maildrop (`OpenMaildrop`); this module decides the rest, and
reports back to the session:

- authentication: the event-loop quick path where the authenticator has
  one, a worker thread otherwise; a refused, unknown or wrong login all
  answer alike after the client address's failure delay;
- the allow and deny lists (`AccessPolicy`);
- for system users, the drop to the user's uid (`drop_to_user`) with the
  spool group kept aside (`SpoolPrivilege`);
- the user's option files, LOGIN-DELAY enforcement, the post-login hook;
- opening the maildrop (on the loop when it is small and unlocked) and
  delivering new bulletins into it.

Nothing here touches the stream: tests drive it with a Session and a fake
runner, no sockets.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..auth import Principal
from ..auth.access import LoginClaim
from ..auth.credentials import Credentials, Rejected, UserPass, Verified
from ..auth.sasl import Fail
from ..config.configfile import Context, read_config
from ..config.options import Options, apply_settings
from ..errors import AuthUnavailable, ConfigError, LoginRefused, MaildropError, ResponseCode, WouldBlock
from ..extensions.postlogin import after_login
from ..logtext import printable
from ..maildrop import Maildrop, MaildropSettings
from ..maildrop.location import open_maildrop
from ..protocol import Authenticate, LookupScramSecret, SaslStep, Session
from ..usernames import is_valid_username
from . import _update
from ._privileges import SpoolPrivilege, check_spool, drop_to_user
from ._records import SessionRecords, expand_login_template
from ._services import Peer, Services, session_config
from ._spool import maildrop_settings, resolve_spool

if TYPE_CHECKING:
    from ..auth.kpop import KpopIdentity

log = logging.getLogger("qpopper.session")

T = TypeVar("T")


def user_option_files(options: Options, principal: Principal) -> list[tuple[str, Context]]:
    """qpopper's -u and -U files, home first so the spool file wins."""
    files = []
    if options.user_options and principal.home:
        files.append((os.path.join(principal.home, ".qpopper-options"), Context.USER))
    if options.spool_options and is_valid_username(principal.user):  # a UTF-8 name builds no path
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


def _debug_command(peer: Peer, user: str, line: str) -> None:
    """A command of a session whose user's option file turned debug on
    (passwords are masked by the session before this sees the line)."""
    log.info("debug: %s %s < %s", peer, printable(user), printable(line))


class Login:
    """One connection's login, and the user's side of the session after it:
    their principal, their options, the privilege that reaches their spool."""

    __slots__ = (
        "_background", "kpop", "options", "peer", "principal", "records", "services", "session", "session_debug",
        "spool_privilege",
    )

    def __init__(self, services: Services, peer: Peer, session: Session, records: SessionRecords) -> None:
        self.services = services
        self.peer = peer
        self.session = session
        self.records = records
        self.options = services.options  # per session: user option files may change it
        self.principal: Principal | None = None
        self.spool_privilege: SpoolPrivilege | None = None
        self._background: set[asyncio.Task[Any]] | None = None  # made by the first one
        self.session_debug = False  # the user's option file asked for debug records
        # Who a KPOP exchange proved the client to be (qpopper -k on port 1109).
        self.kpop: KpopIdentity | None = None

    async def blocking(self, func: Callable[..., T], *args: Any) -> T:
        """`func(*args)` in the server's thread pool."""
        result: T = await self.services.run_blocking(func, *args)
        return result

    def privileged(self, func: Callable[..., T], *args: Any) -> T:
        """Run `func` with the spool directory's group effective (system
        users on a group-writable spool directory); plainly otherwise."""
        if self.spool_privilege is None:
            return func(*args)
        with self.spool_privilege.effective():
            return func(*args)

    # ---- authentication -------------------------------------------------------

    async def authenticate(self, effect: Authenticate) -> None:
        """Check the credentials and tell the session: auth_succeeded or
        auth_failed, the latter only after the failure delay."""
        started = time.monotonic()
        user = effect.credentials.user
        tally = self.services.tally
        refusal: str | None = None
        reason: str | None = None  # the user database's text for a refused user
        try:
            principal = await self._check(effect.credentials)
        except LoginRefused as exc:
            principal, refusal, reason = None, "the user database says nologin", exc.reason
        except (AuthUnavailable, MaildropError) as exc:
            log.error("%s: authentication backend failed: %s", self.peer, exc)
            # A maildrop that cannot be named for this account (SYS/PERM) is
            # no passing outage: say so rather than "try again later".
            permanent = isinstance(exc, MaildropError) and exc.code is ResponseCode.SYS_PERM
            if tally is not None:
                tally.login(effect.credentials, "error")
            self.session.auth_failed(ResponseCode.SYS_PERM if permanent else ResponseCode.SYS_TEMP)
            return
        if principal is not None:
            assert self.services.access is not None
            refusal = self.services.access.refusal(principal.user)
            if refusal is not None:
                log.warning("%s: login of %s refused: %s", self.peer, printable(principal.user), refusal)
                principal = None
        if principal is None:
            # Unknown user, wrong password, refused user: one answer, at one time.
            shared = self.services.shared
            if shared is None:
                wanted = self.services.failures.delay(self.peer.host)
                self.services.failures.record_failure(self.peer.host)
            else:  # the delay this address earned on every instance
                wanted = await shared.failed_login(self.peer.host)
            delay = wanted - (time.monotonic() - started)
            if delay > 0:
                await asyncio.sleep(delay)
            if tally is not None:
                tally.failure_delay(max(0.0, time.monotonic() - started))
                tally.login(effect.credentials, "failed" if refusal is None else "refused")
            log.info("%s: authentication failed for %s", self.peer, printable(user))
            if self.options.log_auth_failures:
                log.warning("authentication failure; rhost=%s user=%s", self.peer.host, printable(user))
            self.session.auth_failed(ResponseCode.AUTH, reason)
            return
        self.principal = principal
        self.records.authenticated = time.monotonic()
        if tally is not None:
            tally.login(effect.credentials, "ok")
        self._after_login(principal.user)
        log.debug("%s: authenticated %s (%s)", self.peer, principal.user, type(effect.credentials).__name__)
        self.session.auth_succeeded(principal.user)

    async def _check(self, credentials: Credentials) -> Principal | None:
        """The principal these credentials name, or None: the cheap check on
        the loop first, then the database's own coroutine or a thread."""
        if self.kpop is not None and isinstance(credentials, UserPass):
            credentials = await self.blocking(self._kpop_credentials, self.kpop, credentials.user)
        if isinstance(credentials, Rejected):
            return None
        quick = self.services.authenticate_quickly
        principal = quick(credentials) if quick is not None else None
        if principal is None:
            on_loop = self.services.authenticate_async
            if on_loop is not None:
                principal = await on_loop(credentials, self.peer.host, self.peer.local)
            else:
                principal = await self.blocking(self.services.authenticator.authenticate, credentials)
        return principal

    def _kpop_credentials(self, kpop: KpopIdentity, user: str) -> Verified | Rejected:
        """After KPOP, a password login names the user and the principal
        decides, as qpopper's PASS did; the password is ignored."""
        from ..auth.kpop import KpopError, may_log_in

        realms = tuple((self.options.kerberos_realms or "").split())
        try:
            allowed = may_log_in(kpop.principal, user, realms, unix_accounts=self.options.system_users)
        except KpopError as exc:
            log.error("%s: KPOP: %s", self.peer, exc)
            allowed = False
        if not allowed:
            log.info("%s: KPOP principal %s may not log in as %s", self.peer, kpop.principal, printable(user))
            return Rejected(user, "KPOP")
        return Verified(user, "KPOP")

    async def lookup_scram_secret(self, effect: LookupScramSecret) -> None:
        lookup = self.services.scram_secret
        secret = None
        if lookup is not None:
            try:
                secret = await self.blocking(lookup, effect.user, effect.mechanism)
            except AuthUnavailable as exc:
                log.error("%s: SCRAM secret lookup failed: %s", self.peer, exc)
        self.session.scram_secret(secret)

    async def sasl_step(self, effect: SaslStep) -> None:
        """One step of a SASL mechanism, off the loop (some hash on purpose)."""
        run = effect.mechanism.start if effect.initial else effect.mechanism.step
        try:
            step = await self.blocking(run, effect.data)
        except Exception:
            log.exception("%s: SASL %s step failed", self.peer, effect.mechanism.name)
            step = Fail("mechanism failed")
        self.session.sasl_step_done(step)

    def _after_login(self, user: str) -> None:
        """DRAC and the post-login hook, beside the session: never a delay,
        never a failed login. Runs before any privilege drop, so the hook
        file and command need not be the user's."""
        options = self.options
        if not (options.drac_host or options.post_login_command or options.post_login_file):
            return
        self._beside(
            functools.partial(
                after_login,
                drac_host=options.drac_host,
                command=options.post_login_command,
                file=options.post_login_file,
            ),
            user,
        )

    def _beside(self, work: Callable[[str, str], None], user: str) -> None:
        """`work(user, client address)` in a worker thread beside the session."""
        task = asyncio.get_running_loop().create_task(self.blocking(work, user, self.peer.host))
        if self._background is None:
            self._background = set()
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _apply_user_options(self, before: Options, user: str) -> None:
        """What a user's option file switched on that acts at login, which
        has passed by the time the file is read: DRAC (`drac-host`), debug
        records for this session (`debug`), and the reverse lookup the
        records need (`statistics`, `timing`)."""
        options = self.options
        if options.drac_host and options.drac_host != before.drac_host:
            self._beside(functools.partial(after_login, drac_host=options.drac_host, command=None, file=None), user)
        if options.debug and not before.debug:
            self.session_debug = True
            self.session.trace = functools.partial(_debug_command, self.peer, user)
            self.debug("%s: debug records on for %s by their option file", self.peer, user)
        self.records.want_host_name(options)

    def debug(self, text: str, *args: object) -> None:
        """A debug record of this session: at the normal level when only the
        user's option file asked for debugging (the daemon logs no debug
        records then), so the administrator sees that session's and no other."""
        if self.session_debug and not log.isEnabledFor(logging.DEBUG):
            log.info("debug: " + text, *args)
        else:
            log.debug(text, *args)

    async def wait_background(self, timeout: float) -> None:
        """Let post-login work finish (a session process exits after this)."""
        if self._background:
            await asyncio.wait(self._background, timeout=timeout)

    # ---- the maildrop ---------------------------------------------------------

    async def open_maildrop(self) -> Maildrop | None:
        """Become the user if this server switches, apply their options,
        enforce LOGIN-DELAY, open the maildrop and deliver bulletins into
        it. Tells the session maildrop_opened or maildrop_failed; returns
        the open maildrop, or None (and forgets the principal) if it failed."""
        assert self.principal is not None
        principal: Principal = self.principal
        if self.services.drop_privileges:
            try:
                # In this process's own thread: the switch is for the whole
                # process, and no worker thread may still run as root.
                self.spool_privilege = drop_to_user(principal)
                resolved: Principal = await self.blocking(self.privileged, resolve_spool, self.options, principal)
                principal = self.principal = resolved
                check_spool(principal)
            except MaildropError as exc:
                log.error("%s: %s", self.peer, exc)
                self._failed(exc.code)
                return None
            log.debug("%s: now running as uid %d gid %d", self.peer, os.getuid(), os.getgid())
        if self.options.user_options or self.options.spool_options:
            before = self.options
            self.options = await self.blocking(read_user_options, before, principal)
            if self.options is not before:
                self.session.config = session_config(self.options)
                self._apply_user_options(before, principal.user)
        claim = None
        if self.options.enforce_login_delay:
            # Checked and recorded at once, here, so that two sessions of one
            # user (on any instance) cannot both pass; undone if the open fails.
            delay = self.options.announce_login_delay or 0
            shared = self.services.shared
            claim = (self.services.login_delays.claim(principal.user, delay) if shared is None
                     else await shared.claim_login(principal.user, delay))
            if claim is None:
                log.info("%s: %s logged in again within %d s", self.peer, principal.user, delay)
                self._failed(ResponseCode.LOGIN_DELAY)
                return None
        maildrop = await self._open_claimed(principal, claim)
        if maildrop is None:
            return None
        records = self.records
        records.opened = time.monotonic()
        if self.services.tally is not None:
            self.services.tally.maildrop_opened(records.opened - (records.authenticated or records.opened))
        self.debug("%s: opened %s in %.3f s", self.peer, principal.mail, records.opened - (records.authenticated or 0))
        messages = maildrop.messages()
        log.info("%s: %s logged in, %d messages", self.peer, principal.user, len(messages))
        if self.options.log_login:
            host = await self.records.host_name()
            log.info("%s", expand_login_template(self.options.log_login, principal.user, host, self.peer.host))
        self.session.maildrop_opened(messages)
        return maildrop

    async def _open_claimed(self, principal: Principal, claim: LoginClaim | None) -> Maildrop | None:
        """The maildrop opened (and bulletins delivered), or None (told to the
        session) with the LOGIN-DELAY claim handed back."""
        opened = False
        try:
            maildrop = await self._open_with_bulletins(principal)
            opened = maildrop is not None
            return maildrop
        finally:
            if claim is not None and not opened:
                await self._release_claim(claim)

    async def _release_claim(self, claim: LoginClaim) -> None:
        shared = self.services.shared
        if shared is None:
            self.services.login_delays.release(claim)
            return
        # Shielded: a session stopped meanwhile still hands its claim back.
        await asyncio.shield(shared.release_login(claim))

    async def _open_with_bulletins(self, principal: Principal) -> Maildrop | None:
        try:
            settings = maildrop_settings(self.options, principal)
            quick = self._open_quickly(principal.mail, settings)
            if quick is not None:
                maildrop: Maildrop = quick
            else:
                maildrop = await self.blocking(self.privileged, open_maildrop, principal.mail, settings)
        except OSError as exc:  # a backend that let one through: still the system's fault
            log.error("%s: cannot open maildrop of %s: %s", self.peer, principal.user, exc)
            self._failed(ResponseCode.SYS_TEMP)
            return None
        except MaildropError as exc:
            log.warning("%s: cannot open maildrop of %s: %s", self.peer, principal.user, exc)
            self._failed(exc.code)
            return None
        if self.options.bulldir:
            try:
                maildrop = await self._deliver_bulletins(principal, maildrop, settings)
            except MaildropError as exc:
                await _update.close(self, maildrop)
                self._failed(exc.code)
                return None
        return maildrop

    def _failed(self, code: ResponseCode) -> None:
        self.principal = None
        self.session.maildrop_failed(code)

    def _open_quickly(self, location: str, settings: MaildropSettings) -> Maildrop | None:
        """Open a small, unlocked maildrop right here on the event loop.

        Most maildrops are small, and for them the hand-over to a worker
        thread and back costs more CPU than the open itself (each system
        call in a thread is a fight for the GIL). Anything that could
        take long or wait comes back None, changed nothing, and goes to
        a worker. A process that switches groups for the spool always
        uses the worker, which holds the switch."""
        if self.spool_privilege is not None:
            return None
        try:
            return open_maildrop(location, settings, quick=True)
        except WouldBlock:
            return None

    async def _deliver_bulletins(
        self, principal: Principal, maildrop: Maildrop, settings: MaildropSettings
    ) -> Maildrop:
        """New bulletins go in while the POP lock is held; if any arrived,
        the maildrop is listed again so they are in this session."""
        from ..extensions.bulletins import deliver_new_bulletins  # only where bulletins are on

        deliver = functools.partial(deliver_new_bulletins, peer=self.peer)
        delivered = await self.blocking(deliver, self.options, principal, self.privileged)
        if not delivered:
            return maildrop
        await _update.close(self, maildrop)
        reopened: Maildrop = await self.blocking(self.privileged, open_maildrop, principal.mail, settings)
        return reopened
