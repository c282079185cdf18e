"""qpopper's own commands: XTND XMIT and XLST, EUIDL, and MDEF macros.

Handlers of the protocol core's command table, written against its
`CommandContext`. Each command was the scene of a qpopper CVE, so each has
a hard bound: XMIT messages a size limit, MDEF at most 10 macros of at most
100-character names that never expand recursively, and header values from
mail never reach a format string (the server's half, `execute`, reads them).

MDEF, whose 4.x syntax is not confirmed by any source at hand, works as a
client of the manual would expect: `MDEF name(command line)` defines a
macro, and `name` alone, or followed by arguments that are appended, runs
that command line.
"""

from __future__ import annotations

import re

from ...protocol import Awaiting, CommandContext, Line, ListHeaders, OverlongLine, SubmitMessage

MAX_MACROS = 10
MAX_MACRO_NAME = 100
_MACRO = re.compile(rb"([A-Za-z][A-Za-z0-9_-]*)\((.*)\)")
# XLST header names: a header field name (RFC 5322 ftext), maybe with ':'.
_HEADER_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]{1,76}:?")
# Lines in an XMIT message; RFC 5322 allows 998 octets plus CRLF.
XMIT_LINE_MAX = 4096
_PRINTABLE = bytes(range(0x20, 0x7F))


# ---- XTND ---------------------------------------------------------------------


def cmd_xtnd(ctx: CommandContext, args: list[bytes], line: bytes) -> None:
    if not args:
        ctx.bad("XTND needs a sub-command: XMIT or XLST.")
        return
    sub = args[0].upper()
    if sub == b"XMIT":
        if not ctx.config.xmit:
            ctx.bad("XTND XMIT is disabled.")
            return
        if not ctx.need_args(args, 1, 1):
            return
        ctx.divert_input(XmitReceiver(), XMIT_LINE_MAX)
        ctx.reply(b"+OK Start sending message.\r\n")
        return
    if sub in (b"XLST", b"XLIST"):
        xlst(ctx, args[1:], line)
        return
    ctx.bad("Unknown XTND sub-command.")


def xlst(ctx: CommandContext, args: list[bytes], line: bytes) -> None:
    if not 1 <= len(args) <= 2:
        ctx.bad("Usage: XTND XLST header [message].")
        return
    if not _HEADER_NAME.fullmatch(args[0]):
        ctx.bad("Invalid header name.")
        return
    header = args[0].decode("ascii").rstrip(":")
    if len(args) == 2:
        index = ctx.message_index(args[1])
        if index is None:
            return
        indices = [index]
    else:
        indices = ctx.visible()
    uids = ctx.uids(line)
    if uids is None:
        return
    sizes = ctx.messages.sizes
    entries = tuple((i, sizes[i], uids[i]) for i in indices)
    ctx.emit(ListHeaders(b"+OK xlst command accepted; headers coming.\r\n", entries, header, "xlst"))


class XmitReceiver:
    """Takes the lines of an XTND XMIT message up to the lone dot."""

    __slots__ = ("data", "overflow")

    def __init__(self) -> None:
        self.data = bytearray()
        # Too big, or a line too long: read to the end, then refuse.
        self.overflow = False

    def masked(self, item: Line | OverlongLine) -> str | None:
        return None  # a message's text is not traced

    def line(self, ctx: CommandContext, item: Line | OverlongLine) -> None:
        if isinstance(item, OverlongLine):
            self.overflow = True
            return
        data = item.data
        if data == b".":
            ctx.restore_input()
            if self.overflow:
                ctx.reply(b"-ERR Message too large or with over-long lines; not sent.\r\n")
                return
            assert ctx.user is not None
            ctx.ask(SubmitMessage(bytes(self.data), ctx.user), Awaiting.SUBMIT)
            return
        if data.startswith(b"."):
            data = data[1:]  # undo the client's dot-stuffing
        if len(self.data) + len(data) + 1 > ctx.config.xmit_max_size:
            self.overflow = True
            return
        if not self.overflow:
            self.data += data + b"\n"


# ---- EUIDL --------------------------------------------------------------------


def cmd_euidl(ctx: CommandContext, args: list[bytes], line: bytes) -> None:
    """UIDL with each message's size and From header (qpopper 4)."""
    request = ctx.uid_request(args, line)
    if request is None:
        return
    index, uids = request
    sizes = ctx.messages.sizes
    if index is not None:
        ctx.emit(ListHeaders(b"+OK ", ((index, sizes[index], uids[index]),), "From", "euidl", single=True))
        return
    entries = tuple((i, sizes[i], uids[i]) for i in ctx.visible())
    ctx.emit(ListHeaders(b"+OK uidl command accepted.\r\n", entries, "From", "euidl"))


# ---- MDEF ---------------------------------------------------------------------


def cmd_mdef(ctx: CommandContext, args: list[bytes], line: bytes) -> None:
    text = args[0] if args else b""
    match = _MACRO.fullmatch(text)
    if match is None:
        ctx.bad("Usage: MDEF name(command).")
        return
    name, body = match.group(1).upper(), match.group(2)
    if len(name) > MAX_MACRO_NAME:
        ctx.bad(f"Macro names are at most {MAX_MACRO_NAME} characters.")
        return
    if body.translate(None, _PRINTABLE) or not body.strip():
        ctx.bad("A macro must be a command line of printable characters.")
        return
    macros = ctx.macros
    if macros is None:
        macros = ctx.macros = {}
    if name not in macros and len(macros) >= MAX_MACROS:
        ctx.bad(f"At most {MAX_MACROS} macros.")
        return
    macros[name] = body
    ctx.reply(b"+OK Macro " + name + b" defined.\r\n")


def run_macro(ctx: CommandContext, name: bytes, rest: bytes) -> bool:
    """Expand a macro once (never recursively); False if there is none."""
    macros = ctx.macros
    body = macros.get(name) if macros else None
    if body is None or macros is None:
        return False
    expanded = body + (b" " + rest if rest else b"")
    keyword = expanded.partition(b" ")[0].upper()
    if keyword in macros or keyword == b"MDEF":
        ctx.bad("A macro may not run a macro.")
        return True
    if len(expanded) + 2 > ctx.config.max_line:
        ctx.bad("Expanded command line too long.")
        return True
    ctx.run_command(expanded)
    return True
