"""Undoing Content-Transfer-Encoding, leniently.

Mail in the wild has base64 with junk and lost padding, and uuencoded
bodies; a part whose encoding cannot be undone is taken as it is.
"""

from __future__ import annotations

import binascii
from typing import TYPE_CHECKING

from .parts import header, raw_payload

if TYPE_CHECKING:
    from email.message import Message

_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_JUNK = bytes(b for b in range(256) if b not in _B64_ALPHABET)
_UUENCODE = frozenset({"x-uuencode", "uuencode", "uue", "x-uue"})


def b64decode(raw: bytes) -> bytes:
    """Base64 with every non-alphabet byte skipped and padding repaired."""
    clean = raw.translate(None, _B64_JUNK)
    rest = len(clean) % 4
    if rest == 1:
        clean = clean[:-1]
    elif rest:
        clean += b"=" * (4 - rest)
    try:
        return binascii.a2b_base64(clean)
    except binascii.Error:  # pragma: no cover - cleaned input always decodes
        return b""


def transfer_decode(part: Message) -> bytes:
    """The part's body with its transfer encoding undone."""
    raw = raw_payload(part)
    cte = header(part, "content-transfer-encoding").strip().lower()
    if cte == "base64":
        return b64decode(raw)
    if cte == "quoted-printable":
        return binascii.a2b_qp(raw)
    if cte in _UUENCODE:
        try:
            decoded = part.get_payload(decode=True)
        except ValueError:  # the email package's uu decoder on a broken body
            return raw
        return decoded if isinstance(decoded, bytes) else raw
    return raw
