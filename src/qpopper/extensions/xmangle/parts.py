"""Reading a parsed MIME part the way mangling needs it.

The email package's own accessors decode on the way (``get_payload()``
turns 8-bit bodies into text with the declared charset, and raises on odd
charset parameters), so the raw payload is read directly.  Each accessor
here answers something sensible for any part the compat32 parser produces.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from email.message import Message

# What a broken parameter (a bad RFC 2231 continuation, say) raises in the
# email package's parameter parsing.
_BAD_PARAMETER = (ValueError, LookupError)


def header(part: Message, name: str) -> str:
    """A field's value as a string; "" when absent."""
    value = part.get(name)
    return "" if value is None else str(value)


def param(part: Message, name: str, field: str = "content-type") -> str | None:
    """A parameter of a structured field, RFC 2231 decoded; None when absent
    or unreadable."""
    from email.utils import collapse_rfc2231_value

    try:
        value = part.get_param(name, header=field)
    except _BAD_PARAMETER:
        return None
    if value is None:
        return None
    if isinstance(value, tuple):
        value = collapse_rfc2231_value(value)
    return str(value)


def filename(part: Message) -> str:
    """The part's file name, "" when it has none or it cannot be read."""
    try:
        return part.get_filename() or ""
    except _BAD_PARAMETER:
        return ""


def children(part: Message) -> list[Message] | None:
    """The parsed sub-parts of a multipart or message/* part, else None."""
    from email.message import Message

    payload = getattr(part, "_payload", None)
    if not isinstance(payload, list):
        return None
    return [child for child in payload if isinstance(child, Message)]


def is_attachment(part: Message) -> bool:
    disposition = header(part, "content-disposition").split(";", 1)[0].strip().lower()
    return disposition == "attachment"


def raw_payload(part: Message) -> bytes:
    """The body as the bytes the parser saw (before transfer decoding)."""
    payload = getattr(part, "_payload", None)
    if not isinstance(payload, str):
        return b""
    try:
        return payload.encode("utf-8", "surrogateescape")
    except UnicodeError:
        return payload.encode("utf-8", "replace")
