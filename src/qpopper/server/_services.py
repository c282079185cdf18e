"""What the connections of one server share, and who a connection talks to.

`Services` is built once per server (the options, the authenticator, the
thread pool's runner, the live TLS context, the login policies); `Peer` is
the client's address, taken from one place per connection.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..auth import AsyncAuthenticator, Authenticator, Principal, QuickAuthenticator, ScramSecretSource
from ..auth.access import AccessPolicy, FailureDelays, LoginDelays
from ..auth.credentials import Credentials, ScramSecret
from ..config.options import Options
from ..protocol import SessionConfig

if TYPE_CHECKING:
    from ._shared_state import SharedState
    from ._tally import Tally


@dataclass(frozen=True, slots=True)
class Peer:
    """The client's address, from the one place each connection gets it,
    and the address it connected to (`local`: Dovecot's %l, which user
    database queries may use; a PROXY header's destination behind a
    balancer; None on a Unix socket or where it cannot be told)."""

    host: str
    port: int
    # The client reached the load balancer over TLS, and the server is
    # configured to trust it as such (haproxy-tls-is-secure).
    tls_at_balancer: bool = False
    # The balancer's own connection (a PROXY LOCAL header), not a client's:
    # HAProxy's health checks, which close without a command.
    balancer_check: bool = False
    local: str | None = None

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
    # Failure delays, LOGIN-DELAY and per-address caps shared through Redis
    # (redis-url); None: this process's own state only.
    shared: SharedState | None = None
    # The Kerberos acceptor when GSSAPI logins are on.
    kerberos: object | None = None
    # Called after each UPDATE that succeeded, with the user and how many
    # messages were deleted and retrieved: the embedding Controller's waits.
    committed: Callable[[str, int, int], None] | None = None
    # What the operator's metrics count (`_tally.Tally`); None when they are off.
    tally: Tally | None = None
    # The authenticator's optional abilities, found once here (a Protocol
    # isinstance check costs microseconds, too much per login): None where
    # it has not got them.
    authenticate_quickly: Callable[[Credentials], Principal | None] | None = field(init=False)
    scram_secret: Callable[[str, str], ScramSecret | None] | None = field(init=False)
    # A database served on the event loop (SQL, LDAP): awaited, no thread.
    authenticate_async: Callable[[Credentials, str | None, str | None], Awaitable[Principal | None]] | None = field(
        init=False
    )
    # One frozen SessionConfig shared by new sessions while `options` stays.
    _config: tuple[Options, SessionConfig] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.access is None:
            self.access = AccessPolicy(self.options.nonauth_file, self.options.auth_file)
        self.failures = FailureDelays(self.options.auth_fail_delay, self.options.auth_fail_delay_max)
        auth = self.authenticator
        self.authenticate_quickly = auth.authenticate_quickly if isinstance(auth, QuickAuthenticator) else None
        self.scram_secret = auth.scram_secret if isinstance(auth, ScramSecretSource) else None
        self.authenticate_async = auth.authenticate_async if isinstance(auth, AsyncAuthenticator) else None

    def session_config(self) -> SessionConfig:
        if self._config is None or self._config[0] is not self.options:
            self._config = (self.options, session_config(self.options))
        return self._config[1]


def session_config(options: Options) -> SessionConfig:
    """The protocol's share of the options (a user's option files make a
    session its own)."""
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
