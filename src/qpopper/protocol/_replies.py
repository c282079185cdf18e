"""How replies look on the wire: status lines, response codes, listings.

Every byte the core sends is built here or from these helpers, so the
rules hold everywhere: a status line is ASCII (anything else becomes "?")
unless the session may carry UTF-8 (RFC 6856: after UTF8 or LANG; the
callers that can show a UTF-8 user name say so with `utf8`),
an RFC 2449/3206 response code goes in brackets right after "-ERR", and a
multi-line reply ends with the lone dot. None of them is given raw client
input: callers pass values that have already passed validation.
"""

from __future__ import annotations

from .._version import __version__
from ..errors import ResponseCode

# The end of a multi-line reply (RFC 1939 section 3).
END = b".\r\n"


def ok(text: str, utf8: bool = False) -> bytes:
    """A "+OK" status line; `utf8`: the session may get UTF-8 text."""
    return b"+OK " + text.encode("utf-8" if utf8 else "ascii", "replace") + b"\r\n"


def err(text: str, code: ResponseCode | None = None) -> bytes:
    """A "-ERR" status line, with the response code if there is one."""
    prefix = f"[{code.value}] " if code is not None else ""
    return b"-ERR " + (prefix + text).encode("ascii", "replace") + b"\r\n"


def listing(status: bytes, body: str) -> bytes:
    """A multi-line reply: the status line, `body` (CRLF-ended lines of
    ASCII, none starting with a dot), then the terminating dot."""
    return status + body.encode("ascii") + END


def greeting(hostname: str, shy: bool, timestamp: str | None) -> bytes:
    """The first line of a session; `timestamp` is the APOP stamp when APOP
    is on. A shy server (the `shy` option) names neither itself nor its version."""
    text = "ready" if shy else f"Qpopper (version {__version__}-py) at {hostname} starting."
    if timestamp is not None:
        text += "  " + timestamp
    return ok(text)


def drop_summary(user: str | None, count: int, octets: int) -> str:
    """qpopper's maildrop summary, the text of the login and RSET replies."""
    return f"{user} has {count} visible messages (0 hidden) in {octets} octets."
