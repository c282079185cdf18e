"""The commands of RFC 1939 and 2449, and the table that names every command.

Each handler is a function `handler(ctx, args, line)` over the session's
`CommandContext`: `args` are the arguments split at single spaces (or the
rest of the line whole, for the commands that take it so) and `line` is the
command line, which a handler hands back when it must run again after the
server answered (deferred UIDs, mangled sizes). qpopper's own commands live
in `qpopper.extensions` and are named here beside the standard ones.
"""

from __future__ import annotations

from ..auth.credentials import ApopDigest, UserPass
from ..auth.i18n import prepare_password, prepare_username
from ..extensions.xmangle.commands import sizes_as_sent, split_modifier
from ..extensions.xmangle.spec import NO_MIME
from ..extensions.xtnd import commands as xtnd
from ..usernames import is_valid_login_name
from ._args import PASSWORD_BYTES, parse_number
from ._capa import cmd_capa
from ._context import CommandContext, Handler
from ._effects import Authenticate, Close, Commit, SendMessage, StartTls
from ._lang import cmd_lang, cmd_utf8, utf8_name, utf8_replies
from ._replies import drop_summary, err, listing, ok
from ._sasl_driver import cmd_auth
from ._state import Awaiting, Event, State

# ---- AUTHORIZATION --------------------------------------------------------------


def login_name(ctx: CommandContext, raw: bytes) -> str | None:
    """qpopper's user-name processing, then validation. A UTF-8 name
    (RFC 6856) is prepared as RFC 8265 says (`auth.i18n`) and checked by
    `is_valid_login_name`, which keeps it out of every path."""
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if name.lower().endswith("-no-mime"):
        name = name[: -len("-no-mime")]
        ctx.mangle = True
    if ctx.config.trim_domain:
        name = name.partition("@")[0]
    if not name.isascii():
        prepared = prepare_username(name, casefold=ctx.config.downcase_user)
        if prepared is None:
            return None
        name = prepared
    elif ctx.config.downcase_user:
        name = name.lower()
    return name if is_valid_login_name(name) else None


def cmd_user(ctx: CommandContext, args: list[bytes], _line: bytes) -> None:
    if not ctx.security.plaintext_allowed:
        ctx.bad("USER/PASS is not allowed on this connection.")
        return
    if not ctx.need_args(args, 1, 1):
        return
    name = login_name(ctx, args[0])
    if name is None:
        ctx.user = None
        ctx.bad("Invalid user name.")
        return
    ctx.user = name
    ctx.reply(ok(f"Password required for {name}.", not name.isascii() and utf8_replies(ctx)))


def cmd_pass(ctx: CommandContext, args: list[bytes], _line: bytes) -> None:
    # PASS takes the rest of the line whole: passwords may hold spaces.
    user, ctx.user = ctx.user, None
    if user is None or not ctx.security.plaintext_allowed:
        ctx.bad("USER first.")
        return
    if not args:
        ctx.bad("Wrong number of arguments.")
        return
    password = args[0]
    if password.translate(None, PASSWORD_BYTES):
        ctx.bad("Invalid characters in password.")
        return
    if not password.isascii():
        # RFC 6856: a UTF-8 password is prepared (OpaqueString). Other 8-bit
        # bytes (a legacy Latin-1 password) pass as sent, unless the client
        # said UTF8 and so promised UTF-8.
        prepared = prepare_password(password)
        if prepared is None and ctx.utf8:
            ctx.bad("Password is not valid UTF-8.")
            return
        password = prepared or password
    ctx.user = user
    ctx.ask(Authenticate(UserPass(user, password)), Awaiting.AUTH)


def cmd_apop(ctx: CommandContext, args: list[bytes], _line: bytes) -> None:
    ctx.user = None
    if not ctx.config.apop:
        ctx.bad("APOP is not enabled.")
        return
    if not ctx.need_args(args, 2, 2):
        return
    name = login_name(ctx, args[0])
    if not args[1].isascii():
        ctx.bad("APOP digest must be 32 hexadecimal digits.")
        return
    digest = args[1].decode("ascii").lower()
    if name is None:
        ctx.bad("Invalid user name.")
        return
    if len(digest) != 32 or any(c not in "0123456789abcdef" for c in digest):
        ctx.bad("APOP digest must be 32 hexadecimal digits.")
        return
    ctx.user = name
    ctx.ask(Authenticate(ApopDigest(name, ctx.timestamp, digest)), Awaiting.AUTH)


def cmd_quit(ctx: CommandContext, args: list[bytes], _line: bytes) -> None:
    if not ctx.need_args(args, 0, 0):
        return
    if ctx.state is State.TRANSACTION:
        ctx.fire(Event.QUIT)  # to UPDATE
        ctx.ask(Commit(frozenset(ctx.effective_deletions()), ctx.retrieved), Awaiting.COMMIT)
        return
    ctx.reply(ok(f"Pop server at {ctx.config.hostname} signing off."))
    ctx.emit(Close("quit"))
    ctx.fire(Event.QUIT)


def cmd_stls(ctx: CommandContext, args: list[bytes], _line: bytes) -> None:
    ctx.user = None
    if not ctx.need_args(args, 0, 0):
        return
    if ctx.security.tls:
        ctx.reply(err("TLS is already active."))
        return
    if ctx.utf8:  # RFC 6856 section 2.1: no STLS after UTF8
        ctx.reply(err("STLS is not allowed after UTF8."))
        return
    if not ctx.security.stls_available:
        ctx.bad("STLS is not available.")
        return
    # Whatever the client pipelined after STLS came in clear text and
    # must never run as a command (the STARTTLS injection attacks).
    ctx.clear_input()
    ctx.reply(ok("Begin TLS negotiation now."))
    ctx.ask(StartTls(), Awaiting.TLS)


# ---- TRANSACTION ----------------------------------------------------------------


def cmd_stat(ctx: CommandContext, args: list[bytes], line: bytes) -> None:
    if not ctx.need_args(args, 0, 0):
        return
    if not ctx.mangle:  # stored sizes: two sums, no list of 50,000 numbers
        count, octets = ctx.visible_totals()
        ctx.reply(ok(f"{count} {octets}"))
        return
    visible = ctx.visible()
    sizes = sizes_as_sent(ctx, visible, NO_MIME, line)
    if sizes is not None:
        ctx.reply(ok(f"{len(visible)} {sum(sizes.values())}"))


def cmd_list(ctx: CommandContext, args: list[bytes], line: bytes) -> None:
    split = split_modifier(ctx, args)
    if split is None:
        return
    args, spec = split
    if not ctx.need_args(args, 0, 1):
        return
    if args:
        index = ctx.message_index(args[0])
        if index is not None:
            sizes = sizes_as_sent(ctx, [index], spec, line)
            if sizes is not None:
                ctx.reply(ok(f"{index + 1} {sizes[index]}"))
        return
    visible = ctx.visible()
    sizes = sizes_as_sent(ctx, visible, spec, line)
    if sizes is None:
        return
    head = ok(f"{len(visible)} visible messages ({sum(sizes.values())} octets)")
    ctx.reply(listing(head, "".join(f"{i + 1} {sizes[i]}\r\n" for i in visible)))


def cmd_uidl(ctx: CommandContext, args: list[bytes], line: bytes) -> None:
    request = ctx.uid_request(args, line)
    if request is None:
        return
    index, uids = request
    if index is not None:
        ctx.reply(ok(f"{index + 1} {uids[index]}"))
        return
    body = "".join(f"{i + 1} {uids[i]}\r\n" for i in ctx.visible())
    ctx.reply(listing(b"+OK uidl command accepted.\r\n", body))


def cmd_retr(ctx: CommandContext, args: list[bytes], line: bytes) -> None:
    split = split_modifier(ctx, args)
    if split is None:
        return
    args, spec = split
    if not ctx.need_args(args, 1, 1):
        return
    index = ctx.message_index(args[0])
    if index is None:
        return
    sizes = sizes_as_sent(ctx, [index], spec, line)
    if sizes is None:
        return
    ctx.mark_retrieved(index)
    ctx.note_read(index)
    ctx.emit(SendMessage(index, None, ok(f"{sizes[index]} octets"), spec))


def cmd_top(ctx: CommandContext, args: list[bytes], _line: bytes) -> None:
    split = split_modifier(ctx, args)
    if split is None:
        return
    args, spec = split
    if not ctx.need_args(args, 2, 2):
        return
    lines = parse_number(args[1])
    if lines is None:
        ctx.bad("Line count must be a non-negative number.")
        return
    index = ctx.message_index(args[0])
    if index is None:
        return
    ctx.note_read(index)
    ctx.emit(SendMessage(index, lines, ok("Message follows."), spec))


def cmd_dele(ctx: CommandContext, args: list[bytes], _line: bytes) -> None:
    if not ctx.need_args(args, 1, 1):
        return
    number = parse_number(args[0])
    if number is not None and 1 <= number <= len(ctx.messages) and ctx.is_deleted(number - 1):
        ctx.reply(err(f"Message {number} has already been deleted."))
        return
    index = ctx.message_index(args[0])
    if index is None:
        return
    ctx.mark_deleted(index)
    ctx.note_read(index)
    ctx.reply(ok(f"Message {index + 1} has been deleted."))


def cmd_noop(ctx: CommandContext, args: list[bytes], _line: bytes) -> None:
    if ctx.need_args(args, 0, 0):
        ctx.reply(ok("no big woop"))


def cmd_rset(ctx: CommandContext, args: list[bytes], _line: bytes) -> None:
    if not ctx.need_args(args, 0, 0):
        return
    ctx.reset_marks()
    count, octets = ctx.visible_totals()
    ctx.reply(ok(drop_summary(ctx.user, count, octets), utf8_name(ctx)))


def cmd_last(ctx: CommandContext, args: list[bytes], _line: bytes) -> None:
    if ctx.need_args(args, 0, 0):
        # Read before this session (Status/seen flags) or in it, whichever is later.
        last = max(ctx.messages.last_seen(), ctx.last_read)
        ctx.reply(ok(f"{last} is the last read message."))


# ---- the table ------------------------------------------------------------------

AUTH_ONLY = frozenset({State.AUTHORIZATION})
TRANSACTION_ONLY = frozenset({State.TRANSACTION})
BOTH = AUTH_ONLY | TRANSACTION_ONLY

# keyword -> (handler, states where it is valid, takes the rest of the line whole)
COMMANDS: dict[bytes, tuple[Handler, frozenset[State], bool]] = {
    b"USER": (cmd_user, AUTH_ONLY, False),
    b"PASS": (cmd_pass, AUTH_ONLY, True),
    b"APOP": (cmd_apop, AUTH_ONLY, False),
    b"QUIT": (cmd_quit, BOTH, False),
    b"STLS": (cmd_stls, AUTH_ONLY, False),
    b"AUTH": (cmd_auth, AUTH_ONLY, False),
    b"CAPA": (cmd_capa, BOTH, False),
    b"UTF8": (cmd_utf8, AUTH_ONLY, False),
    b"LANG": (cmd_lang, BOTH, False),
    b"STAT": (cmd_stat, TRANSACTION_ONLY, False),
    b"LIST": (cmd_list, TRANSACTION_ONLY, False),
    b"UIDL": (cmd_uidl, TRANSACTION_ONLY, False),
    b"RETR": (cmd_retr, TRANSACTION_ONLY, False),
    b"TOP": (cmd_top, TRANSACTION_ONLY, False),
    b"DELE": (cmd_dele, TRANSACTION_ONLY, False),
    b"NOOP": (cmd_noop, TRANSACTION_ONLY, False),
    b"RSET": (cmd_rset, TRANSACTION_ONLY, False),
    b"LAST": (cmd_last, TRANSACTION_ONLY, False),
    b"XTND": (xtnd.cmd_xtnd, TRANSACTION_ONLY, False),
    b"EUIDL": (xtnd.cmd_euidl, TRANSACTION_ONLY, False),
    b"MDEF": (xtnd.cmd_mdef, TRANSACTION_ONLY, True),
}

# Tried, in TRANSACTION, for a keyword not in the table (MDEF's macros).
run_macro = xtnd.run_macro
