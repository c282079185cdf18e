"""qpopper's own commands: XTND XMIT and XLST, EUIDL, and MDEF macros.

Kept apart from the RFC 1939 commands as functions of the session that
the command table of `_session` names. Each one
was the scene of a qpopper CVE, so each has a hard bound: XMIT messages a
size limit, MDEF at most 10 macros of at most 100-character names that
never expand recursively, and header values from mail never reach a
format string.

MDEF, whose 4.x syntax is not confirmed by any source at hand, works as a
client of the manual would expect: `MDEF name(command line)` defines a
macro, and `name` alone, or followed by arguments that are appended, runs
that command line.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ._effects import ListHeaders, Send, SubmitMessage

if TYPE_CHECKING:
    from ._session import Session

MAX_MACROS = 10
MAX_MACRO_NAME = 100
_MACRO = re.compile(rb"([A-Za-z][A-Za-z0-9_-]*)\((.*)\)")
# XLST header names: a header field name (RFC 5322 ftext), maybe with ':'.
_HEADER_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]{1,76}:?")
# Lines in an XMIT message; RFC 5322 allows 998 octets plus CRLF.
XMIT_LINE_MAX = 4096


def cmd_xtnd(session: Session, args: list[bytes], line: bytes) -> None:
    if not args:
        session._bad("XTND needs a sub-command: XMIT or XLST.")
        return
    sub = args[0].upper()
    if sub == b"XMIT":
        if not session.config.xmit:
            session._bad("XTND XMIT is disabled.")
            return
        if not session._need_args(args, 1, 1):
            return
        session._xmit = bytearray()
        session._xmit_overflow = False
        session._buffer.max_line = XMIT_LINE_MAX
        session._emit(Send(b"+OK Start sending message.\r\n"))
        return
    if sub in (b"XLST", b"XLIST"):
        xlst(session, args[1:], line)
        return
    session._bad("Unknown XTND sub-command.")


def xlst(session: Session, args: list[bytes], line: bytes) -> None:
    if not 1 <= len(args) <= 2:
        session._bad("Usage: XTND XLST header [message].")
        return
    if not _HEADER_NAME.fullmatch(args[0]):
        session._bad("Invalid header name.")
        return
    header = args[0].decode("ascii").rstrip(":")
    if len(args) == 2:
        index = session._message_index(args[1])
        if index is None:
            return
        indices = [index]
    else:
        indices = session._visible()
    uids = session._uids(line)
    if uids is None:
        return
    sizes = session._messages.sizes
    entries = tuple((i, sizes[i], uids[i]) for i in indices)
    session._emit(ListHeaders(b"+OK xlst command accepted; headers coming.\r\n", entries, header, "xlst"))


def cmd_euidl(session: Session, args: list[bytes], line: bytes) -> None:
    request = session._uid_request(args, line)
    if request is None:
        return
    index, uids = request
    sizes = session._messages.sizes
    if index is not None:
        session._emit(ListHeaders(b"+OK ", ((index, sizes[index], uids[index]),), "From", "euidl", single=True))
        return
    entries = tuple((i, sizes[i], uids[i]) for i in session._visible())
    session._emit(ListHeaders(b"+OK uidl command accepted.\r\n", entries, "From", "euidl"))


def cmd_mdef(session: Session, args: list[bytes], line: bytes) -> None:
    text = args[0] if args else b""
    match = _MACRO.fullmatch(text)
    if match is None:
        session._bad("Usage: MDEF name(command).")
        return
    name, body = match.group(1).upper(), match.group(2)
    if len(name) > MAX_MACRO_NAME:
        session._bad(f"Macro names are at most {MAX_MACRO_NAME} characters.")
        return
    if body.translate(None, bytes(range(0x20, 0x7F))) or not body.strip():
        session._bad("A macro must be a command line of printable characters.")
        return
    if name not in session._macros and len(session._macros) >= MAX_MACROS:
        session._bad(f"At most {MAX_MACROS} macros.")
        return
    session._macros[name] = body
    session._emit(Send(b"+OK Macro " + name + b" defined.\r\n"))


def run_macro(session: Session, name: bytes, rest: bytes) -> bool:
    """Expand a macro once (never recursively); False if none."""
    body = session._macros.get(name)
    if body is None:
        return False
    from ._framing import Line

    expanded = body + (b" " + rest if rest else b"")
    keyword = expanded.partition(b" ")[0].upper()
    if keyword in session._macros or keyword == b"MDEF":
        session._bad("A macro may not run a macro.")
        return True
    if len(expanded) + 2 > session.config.max_line:
        session._bad("Expanded command line too long.")
        return True
    session._dispatch(Line(expanded), macros=False)
    return True


def xmit_line(session: Session, data: bytes | None) -> None:
    """One line of an XMIT message; None for an over-long line."""
    assert session._xmit is not None
    if data == b".":
        message, overflow = bytes(session._xmit), session._xmit_overflow
        session._xmit = None
        session._buffer.max_line = session.config.max_line
        if overflow:
            session._emit(Send(b"-ERR Message too large or with over-long lines; not sent.\r\n"))
            return
        assert session.user is not None
        session._waiting_xmit()
        session._emit(SubmitMessage(message, session.user))
        return
    if data is None:
        session._xmit_overflow = True
        return
    if data.startswith(b"."):
        data = data[1:]  # undo the client's dot-stuffing
    if len(session._xmit) + len(data) + 1 > session.config.xmit_max_size:
        session._xmit_overflow = True
        return
    if not session._xmit_overflow:
        session._xmit += data + b"\n"
