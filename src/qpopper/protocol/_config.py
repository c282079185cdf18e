"""What the core is told from outside: site policy and the connection.

`SessionConfig` is built once per set of options and shared by every
session; `ConnectionSecurity` describes one connection and is replaced when
STLS completes. Both are frozen values: a session never changes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .._version import __version__
from ..auth import sasl
from ._challenges import SYSTEM_ENTROPY, Entropy

# RFC 2449 section 4: commands up to 255 octets including CRLF.
COMMAND_LINE_MAX = 255
# SASL responses can be far longer than commands (RFC 5034 section 4).
SASL_LINE_MAX = 16384


@dataclass(frozen=True, slots=True)
class ConnectionSecurity:
    """What the transport offers right now; replaced when STLS completes.

    `plaintext_allowed` is the clear-text password policy's verdict for
    this connection (USER/PASS, SASL PLAIN and LOGIN). `channel_binding`
    is the tls-server-end-point data once TLS is up (SCRAM -PLUS).
    """

    tls: bool = False
    plaintext_allowed: bool = True
    stls_available: bool = False
    channel_binding: bytes | None = None
    # The verified client certificate's name (SASL EXTERNAL), if any.
    certificate_user: str | None = None


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Everything the protocol core needs to know about site policy."""

    hostname: str = "localhost"
    shy: bool = False
    # USER/PASS accepted and announced (the clear-text policy decides).
    allow_user_pass: bool = True
    apop: bool = True
    max_line: int = COMMAND_LINE_MAX
    # Announced in CAPA; None leaves the capability out.
    login_delay: int | None = None
    expire: str | None = "NEVER"
    # Bad commands tolerated before the session is closed.
    max_bad_commands_auth: int = 10
    max_bad_commands_trans: int = 20
    # qpopper's -c and -C: lower-case user names; drop an @domain part.
    downcase_user: bool = False
    trim_domain: bool = False
    # Messages retrieved whole are deleted at UPDATE (EXPIRE 0).
    auto_delete: bool = False
    # XTND XMIT (qpopper -x turns it off) and its size limit in octets.
    xmit: bool = True
    xmit_max_size: int = 10 * 1024 * 1024
    # SASL mechanisms offered (filtered per connection by the policy).
    sasl_mechanisms: tuple[str, ...] = sasl.DEFAULT_MECHANISMS
    implementation: str = f"qpopper-python-{__version__}"
    extra_capabilities: tuple[str, ...] = field(default=())
    # The pid, clock and random bits of the APOP stamp and CRAM-MD5
    # challenges; fixed ones make a session reproducible byte for byte.
    entropy: Entropy = field(default=SYSTEM_ENTROPY, compare=False)
