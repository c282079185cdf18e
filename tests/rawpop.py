"""poplib's line-level calls, typed, for tests that speak POP3 beyond poplib's
public commands (AUTH exchanges, XTND, XMANGLE, a reply read by hand).

poplib's own `_shortcmd`, `_longcmd`, `_putline`, `_putcmd`, `_getline` and
`_getresp` do exactly what these tests need and have kept their shape since
Python 2, but typeshed does not declare them. Going through them here keeps
the private access, and its waivers, in this one module, and gives mypy
their signatures: each line below is waived for SLF001 (private member of
another module) and mypy's attr-defined for that reason.
"""

from __future__ import annotations

import poplib


def putline(client: poplib.POP3, line: bytes) -> None:
    """Send one raw line; CRLF is added."""
    client._putline(line)  # type: ignore[attr-defined]  # noqa: SLF001 - poplib's line-level API, see above


def putcmd(client: poplib.POP3, line: str) -> None:
    """Send one command line, encoded as poplib encodes commands."""
    client._putcmd(line)  # type: ignore[attr-defined]  # noqa: SLF001 - poplib's line-level API, see above


def getline(client: poplib.POP3) -> bytes:
    """One line of the server's reply, without its line end."""
    line: bytes = client._getline()[0]  # type: ignore[attr-defined]  # noqa: SLF001 - poplib's line-level API, see above
    return line


def getresp(client: poplib.POP3) -> bytes:
    """One status line; raises poplib.error_proto on -ERR."""
    reply: bytes = client._getresp()  # type: ignore[attr-defined]  # noqa: SLF001 - poplib's line-level API, see above
    return reply


def shortcmd(client: poplib.POP3, line: str) -> bytes:
    """Send a command and return its status line; raises poplib.error_proto on -ERR."""
    reply: bytes = client._shortcmd(line)  # type: ignore[attr-defined]  # noqa: SLF001 - poplib's line-level API, see above
    return reply


def longcmd(client: poplib.POP3, line: str) -> tuple[bytes, list[bytes], int]:
    """Send a command with a multi-line reply: (status line, lines unstuffed, octets)."""
    reply: tuple[bytes, list[bytes], int] = client._longcmd(line)  # type: ignore[attr-defined]  # noqa: SLF001 - poplib's line-level API, see above
    return reply
