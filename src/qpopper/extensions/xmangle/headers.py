"""The header fields of the condensed message, and readable header text.

Fields that describe the original body are dropped, the rest are kept in
their order and form, with RFC 2047 encoded-words decoded when the result
fits the output charset and a header line (see "What the output looks
like" in `condense`).  `display` gives a value as one line of text for the
notes and the forwarded-message summary.
"""

from __future__ import annotations

import binascii
import re
from typing import TYPE_CHECKING

from .charsets import CONTROLS, as_text, decode_text
from .spec import MangleSpec, ascii_compatible
from .transfer import b64decode

if TYPE_CHECKING:
    from email.message import Message

MAX_LINE_OCTETS = 998

# Header fields that describe the original body and never survive.
_DROPPED_FIELDS = frozenset(
    {
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
        "content-id",
        "content-location",
        "content-base",
        "content-length",
        "content-md5",
        "lines",
    }
)
_ADDRESS_FIELDS = frozenset(
    {
        "from", "to", "cc", "bcc", "sender", "reply-to", "resent-from", "resent-to",
        "resent-cc", "resent-bcc", "resent-sender", "mail-followup-to", "mail-reply-to",
        "return-receipt-to", "disposition-notification-to", "errors-to",
    }
)

_ENCODED_WORD = re.compile(r"=\?([^?\s*]{1,75})(?:\*[^?\s]{0,75})?\?([QqBb])\?([^?\s]*)\?=")
_SPECIALS = frozenset('()<>@,;:"[]\\')


def _decode_word(encoding: str, text: str) -> bytes:
    data = text.encode("utf-8", "surrogateescape")
    if encoding in "Bb":
        return b64decode(data)
    return binascii.a2b_qp(data, header=True)


class _WordDecoder:
    """Joins adjacent encoded-words before decoding, so a multibyte
    character split across two words comes out whole."""

    def __init__(self, address: bool) -> None:
        self.address = address
        self.out: list[str] = []
        self.run: list[tuple[str, bytes]] = []

    def flush(self) -> None:
        if not self.run:
            return
        pieces: list[str] = []
        charset, data = self.run[0][0], bytearray()
        for cs, chunk in self.run:
            if cs != charset:
                pieces.append(decode_text(bytes(data), charset)[0])
                charset, data = cs, bytearray()
            data += chunk
        pieces.append(decode_text(bytes(data), charset)[0])
        text = CONTROLS.sub(" ", "".join(pieces))
        if self.address and any(c in _SPECIALS for c in text):
            # A display name with specials is quoted, or the address list
            # would change meaning; a run right after a quote joins it.
            text = text.replace("\\", "\\\\").replace('"', '\\"')
            if not (self.out and self.out[-1].endswith('"')):
                text = f'"{text}"'
        self.out.append(text)
        self.run.clear()

    def decode(self, value: str) -> str | None:
        pos = 0
        for m in _ENCODED_WORD.finditer(value):
            gap = value[pos : m.start()]
            if not (self.run and not gap.strip()):
                self.flush()
                self.out.append(gap)
            self.run.append((m.group(1).lower(), _decode_word(m.group(2), m.group(3))))
            pos = m.end()
        if pos == 0:
            return None
        self.flush()
        self.out.append(value[pos:])
        return "".join(self.out)


def decode_encoded_words(value: str, address: bool) -> str | None:
    """Decode RFC 2047 words in an unfolded value; None when there are none."""
    return _WordDecoder(address).decode(value)


def display(value: str) -> str:
    """A header value as one line of readable text."""
    text = as_text(value.replace("\r", "").replace("\n", ""))
    decoded = decode_encoded_words(text, address=False)
    if decoded is not None:
        text = decoded
    return CONTROLS.sub(" ", text).strip()


def _field_bytes(name: str, value: str) -> bytes:
    sep = ":" if value.startswith("\n") or not value else ": "
    return (name + sep + value).encode("utf-8", "surrogateescape")


def _decoded_line(name: str, key: str, value: str, codec: str) -> bytes | None:
    """The field with its encoded-words decoded, when that can be written
    in ``codec`` on one line; else None (the field is kept as it was)."""
    decoded = decode_encoded_words(value.replace("\n", "").strip(), address=key in _ADDRESS_FIELDS)
    if decoded is None:
        return None
    try:
        line = f"{name}: {decoded}".encode(codec)
    except UnicodeError:
        return None
    return line if line and len(line) <= MAX_LINE_OCTETS else None


def header_lines(msg: Message, spec: MangleSpec, codec: str) -> list[bytes]:
    """The kept fields of ``msg`` (and its mbox From line), as output lines."""
    keep = None if spec.headers is None else frozenset(spec.headers)
    decode = bool(codec) and ascii_compatible(codec)
    lines: list[bytes] = []
    unixfrom = msg.get_unixfrom()
    if unixfrom:
        lines.append(unixfrom.encode("utf-8", "surrogateescape"))
    for name, raw in msg.raw_items():
        key = name.strip().lower()
        if key in _DROPPED_FIELDS or (keep is not None and key not in keep):
            continue
        value = str(raw)
        line = _decoded_line(name, key, value, codec) if decode and "=?" in value else None
        lines.append(line if line is not None else _field_bytes(name, value))
    return lines
