"""CAPA (RFC 2449 section 5): what this session may announce right now.

The list depends on the site policy, on what the connection offers (TLS,
channel binding, a client certificate, Kerberos) and on the state. The
SASL mechanisms are worked out by `sasl_mechanisms` alone, which AUTH uses
too, so CAPA and AUTH can never disagree about what is offered.
"""

from __future__ import annotations

from ..auth import sasl
from ..extensions.xmangle import spec as manglespec
from ._config import ConnectionSecurity, SessionConfig
from ._context import CommandContext
from ._replies import END
from ._state import State


def sasl_mechanisms(config: SessionConfig, security: ConnectionSecurity, kerberos: object | None) -> list[str]:
    """Mechanisms usable on this connection, in the configured order
    (strongest first): the one rule `--show-config` also prints."""
    return sasl.offered_mechanisms(
        config.sasl_mechanisms,
        plaintext_allowed=security.plaintext_allowed,
        channel_binding=security.channel_binding is not None,
        client_certificate=security.certificate_user is not None,
        kerberos=kerberos is not None,
    )


def capabilities(
    config: SessionConfig, security: ConnectionSecurity, state: State, kerberos: object | None
) -> list[str]:
    """The CAPA list for `state`.

    Everything listed before login is listed after it too; only
    IMPLEMENTATION is held back until login, so versions do not leak
    to unauthenticated peers.
    """
    caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
    if security.plaintext_allowed:
        caps.append("USER")
    mechanisms = sasl_mechanisms(config, security, kerberos)
    if mechanisms:
        caps.append("SASL " + " ".join(mechanisms))
    if security.stls_available and state is State.AUTHORIZATION:
        caps.append("STLS")
    if config.login_delay is not None:
        caps.append(f"LOGIN-DELAY {config.login_delay}")
    if config.auto_delete:
        caps.append("EXPIRE 0")
    elif config.expire is not None:
        caps.append(f"EXPIRE {config.expire}")
    # RFC 6856: UTF-8 user names and passwords are taken even before UTF8.
    caps.append("UTF8 USER" if security.plaintext_allowed or config.apop else "UTF8")
    caps.append("LANG")
    caps.append("XTND XMIT XLST" if config.xmit else "XTND XLST")
    caps.append("X-MACRO")
    caps.append(manglespec.CAPABILITY)
    caps.extend(config.extra_capabilities)
    if state is State.TRANSACTION and not config.shy:
        caps.append(f"IMPLEMENTATION {config.implementation}")
    return caps


def cmd_capa(ctx: CommandContext, args: list[bytes], _line: bytes) -> None:
    if not ctx.need_args(args, 0, 0):
        return
    lines = [b"+OK Capability list follows\r\n"]
    lines += [c.encode("ascii") + b"\r\n" for c in capabilities(ctx.config, ctx.security, ctx.state, ctx.kerberos)]
    lines.append(END)
    ctx.reply(b"".join(lines))
