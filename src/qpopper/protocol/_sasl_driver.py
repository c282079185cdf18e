"""AUTH (RFC 5034): runs a SASL mechanism over POP3's base64 lines.

The mechanisms themselves (auth.sasl) know nothing of POP3. This module
starts one, feeds it the client's decoded responses, sends its challenges
as "+ base64" lines, and turns its outcome into the same Authenticate
effect USER/PASS ends in. Steps that do I/O (GSSAPI) and the look-up of a
SCRAM secret go to the server as effects; the session passes the answers
on to the running `SaslExchange`.
"""

from __future__ import annotations

import base64
import binascii

from ..auth import sasl
from ..auth.credentials import ScramSecret
from ._capa import sasl_mechanisms
from ._config import SASL_LINE_MAX
from ._context import CommandContext
from ._effects import Authenticate, LookupScramSecret, SaslStep
from ._framing import Line, OverlongLine
from ._replies import END, err, ok
from ._state import Awaiting


def b64decode(data: bytes, *, initial: bool) -> bytes | None:
    """Strict base64; "=" alone is the empty initial response (RFC 5034)."""
    if initial and data == b"=":
        return b""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


def cmd_auth(ctx: CommandContext, args: list[bytes], _line: bytes) -> None:
    """AUTH alone lists the mechanisms; AUTH name [initial] starts one."""
    ctx.user = None
    if not ctx.need_args(args, 0, 2):
        return
    offered = sasl_mechanisms(ctx.config, ctx.security, ctx.kerberos)
    if not args:
        listing = "".join(m + "\r\n" for m in offered)
        ctx.reply(ok("List of supported mechanisms follows") + listing.encode("ascii") + END)
        return
    name = args[0].decode("ascii").upper()
    mechanism = None
    if name in offered:
        # The channel is offered for binding only where a -PLUS mechanism was
        # listed: a client that saw none rightly answers SCRAM with "y"
        # (RFC 5802 section 6), which is a downgrade only if we had listed one.
        binding = ctx.security.channel_binding if any(m.endswith("-PLUS") for m in offered) else None
        mechanism = sasl.make_mechanism(
            name,
            ctx.config.hostname,
            binding,
            ctx.security.certificate_user,
            ctx.kerberos,
            # From the session's sources, so a session replays byte for byte.
            cram_challenge=lambda: ctx.config.entropy.cram_challenge(ctx.config.hostname),
        )
    if mechanism is None:
        ctx.bad("Unsupported authentication mechanism.")
        return
    initial: bytes | None = None
    if len(args) == 2:
        if mechanism.server_first:
            ctx.bad("This mechanism takes no initial response.")
            return
        initial = b64decode(args[1], initial=True)
        if initial is None:
            ctx.bad("Invalid base64 in initial response.")
            return
    exchange = SaslExchange(mechanism)
    ctx.divert_input(exchange, SASL_LINE_MAX)
    if mechanism.offload:
        ctx.ask(SaslStep(mechanism, initial, initial=True), Awaiting.SASL_STEP)
        return
    exchange.step(ctx, mechanism.start(initial))


class SaslExchange:
    """One running AUTH: takes the client's lines until the mechanism ends."""

    __slots__ = ("mechanism",)

    def __init__(self, mechanism: sasl.Mechanism) -> None:
        self.mechanism = mechanism

    def masked(self, item: Line | OverlongLine) -> str | None:
        if isinstance(item, OverlongLine):
            return f"<over-long line of {item.discarded} octets>"
        return "*" if item.data == b"*" else "<SASL response>"

    def line(self, ctx: CommandContext, item: Line | OverlongLine) -> None:
        if isinstance(item, OverlongLine):
            ctx.restore_input()
            ctx.bad("Authentication response too long.")
            return
        if item.data == b"*":
            ctx.restore_input()
            ctx.reply(err("Authentication cancelled."))
            return
        decoded = b64decode(item.data, initial=False)
        if decoded is None:
            ctx.restore_input()
            ctx.bad("Invalid base64 in authentication response.")
            return
        if self.mechanism.offload:
            ctx.ask(SaslStep(self.mechanism, decoded, initial=False), Awaiting.SASL_STEP)
            return
        self.step(ctx, self.mechanism.step(decoded))

    def secret(self, ctx: CommandContext, secret: ScramSecret | None) -> None:
        """The server's answer to LookupScramSecret."""
        self.step(ctx, self.mechanism.secret(secret))

    def step(self, ctx: CommandContext, step: sasl.Step) -> None:
        """Act on what the mechanism decided."""
        if isinstance(step, sasl.Challenge):
            ctx.reply(b"+ " + base64.b64encode(step.data) + b"\r\n")
        elif isinstance(step, sasl.NeedScramSecret):
            ctx.ask(LookupScramSecret(step.user, step.mechanism), Awaiting.SCRAM_SECRET)
        elif isinstance(step, sasl.Finish):
            ctx.restore_input()
            ctx.user = step.credentials.user
            ctx.ask(Authenticate(step.credentials), Awaiting.AUTH)
        else:
            ctx.restore_input()
            ctx.bad("Authentication exchange failed.")
