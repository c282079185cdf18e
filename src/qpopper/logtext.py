"""What every layer needs to write a log line about client data: the
trace logger's name and `printable`, which makes client bytes safe to log.
The daemon's handler set-up is in `qpopper.daemon.logsetup`; these live
apart so that the protocol side never imports it."""

from __future__ import annotations

TRACE_LOGGER = "qpopper.trace"


def printable(data: bytes | str, limit: int = 512) -> str:
    """Client data made safe for a log line: no CR, LF, ESC or other
    control characters, no unbounded length."""
    if isinstance(data, bytes):
        data = data.decode("utf-8", "backslashreplace")
    out = []
    for ch in data[:limit]:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    if len(data) > limit:
        out.append(f"...({len(data) - limit} more)")
    return "".join(out)
