"""Walking the MIME tree: which parts are the message's text, and a note
for each of the others.

The result is a list of `Piece`\\ s in reading order; the rules for
alternatives, related parts, mixed parts, attachments and forwarded
messages are in `condense`'s docstring ("Which text").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.errors import MessageError
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32

from .charsets import decode_text
from .headers import display
from .parts import children, filename, header, is_attachment, param
from .transfer import transfer_decode

MAX_DEPTH = 32
TEXT_TYPES = ("text/plain", "text/html")

_META_SNIFF = re.compile(rb"""<meta\b[^>]{0,512}?charset\s*=\s*["']?([A-Za-z0-9._:-]{1,40})""", re.IGNORECASE)
# What serialising a malformed part can raise in the email package (an odd
# charset, an unencodable header, nesting beyond the recursion limit).
_UNSERIALISABLE = (ValueError, LookupError, MessageError, RecursionError)


@dataclass
class Piece:
    kind: str  # "plain", "html" or "note"
    text: str
    label: str = ""  # the MIME charset label it was read with
    codec: str = ""
    flowed: str | None = None  # delsp value when format=flowed


def collect_pieces(msg: Message, want: str) -> list[Piece]:
    """The readable pieces of ``msg`` when ``want`` ("plain" or "html") is
    the text asked for."""
    collector = _Collector(want)
    collector.collect(msg, 0)
    return collector.pieces


def _is_text(part: Message, ctype: str) -> bool:
    return ctype in TEXT_TYPES and not is_attachment(part)


def _related_root(part: Message, parts: list[Message]) -> Message | None:
    """The part a multipart/related's ``start`` names, else its first."""
    if not parts:
        return None
    start = param(part, "start")
    if start:
        want = start.strip().strip("<>")
        for child in parts:
            if header(child, "content-id").strip().strip("<>") == want:
                return child
    return parts[0]


def _note_size(part: Message, ctype: str, parts: list[Message] | None) -> int:
    """The decoded size an attachment note shows."""
    if parts is None:
        return len(transfer_decode(part))
    if ctype.startswith("message/") and parts:
        try:
            return len(parts[0].as_bytes())
        except _UNSERIALISABLE:
            return 0
    return 0


class _Collector:
    def __init__(self, want: str) -> None:
        self.want = want
        self.pieces: list[Piece] = []

    def score(self, part: Message, depth: int) -> int:
        """What a part offers to an alternative: 3 the wanted text, 2 a
        container with it, 1 the other text (directly or inside), 0 nothing
        readable."""
        ctype = part.get_content_type()
        if _is_text(part, ctype):
            return 3 if ctype == f"text/{self.want}" else 1
        payload = children(part)
        if ctype.startswith("multipart/") and payload is not None and depth < MAX_DEPTH:
            best = max((self.score(c, depth + 1) for c in payload), default=0)
            return min(2, best)
        return 0

    def collect(self, part: Message, depth: int) -> None:
        if depth > MAX_DEPTH:
            self.note(part)
            return
        ctype = part.get_content_type()
        maintype, _, subtype = ctype.partition("/")
        if maintype == "multipart":
            self.multipart(part, subtype, depth)
        elif _is_text(part, ctype):
            self.text(part, subtype)
        elif ctype == "message/rfc822" and not is_attachment(part):
            self.forwarded(part, depth)
        else:
            self.note(part)

    def multipart(self, part: Message, subtype: str, depth: int) -> None:
        parts = children(part)
        if parts is None:  # no usable boundary: the part cannot be split
            self.note(part)
        elif subtype == "alternative":
            if parts:
                scores = [self.score(c, depth + 1) for c in parts]
                self.collect(parts[scores.index(max(scores))], depth + 1)
        elif subtype == "related":
            root = _related_root(part, parts)
            if root is not None:
                self.collect(root, depth + 1)
            for child in parts:
                if child is not root:
                    self.note_all(child, depth + 1)
        else:
            for child in parts:
                self.collect(child, depth + 1)

    def note_all(self, part: Message, depth: int) -> None:
        payload = children(part)
        if part.get_content_type().startswith("multipart/") and payload is not None and depth < MAX_DEPTH:
            for child in payload:
                self.note_all(child, depth + 1)
        else:
            self.note(part)

    def note(self, part: Message) -> None:
        ctype = part.get_content_type()
        parts = children(part)
        name = filename(part)
        if not name and parts and ctype.startswith("message/"):
            name = header(parts[0], "subject")
        size = _note_size(part, ctype, parts)
        name = display(name)
        if len(name) > 100:
            name = name[:97] + "..."
        unit = "byte" if size == 1 else "bytes"
        what = f"{name}, {ctype}" if name else ctype
        self.pieces.append(Piece("note", f"[attachment removed: {what}, {size} {unit}]"))

    def text(self, part: Message, subtype: str) -> None:
        data = transfer_decode(part)
        label = param(part, "charset")
        if subtype == "html" and not label:
            m = _META_SNIFF.search(data[:4096])
            if m:
                label = m.group(1).decode("ascii")
        text, mime, codec = decode_text(data, label)
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        flowed = None
        if subtype == "plain" and (param(part, "format") or "").lower() == "flowed":
            flowed = "yes" if (param(part, "delsp") or "").lower() == "yes" else "no"
        self.pieces.append(Piece(subtype, text, mime, codec, flowed))

    def forwarded(self, part: Message, depth: int) -> None:
        payload = children(part)
        if payload:
            inner = payload[0]
        else:
            inner = BytesParser(policy=compat32).parsebytes(transfer_decode(part))
        lines = ["---------- Forwarded message ----------"]
        for field in ("From", "Date", "Subject", "To", "Cc"):
            value = inner.get(field)
            if value is not None:
                lines.append(f"{field}: {display(str(value))}")
        self.pieces.append(Piece("note", "\n".join(lines)))
        self.collect(inner, depth + 1)
