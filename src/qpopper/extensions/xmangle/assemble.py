"""Putting the condensed message together: the pieces joined into one text
in the requested subtype, encoded in the output charset, under the kept
header fields and a new Content-Type.
"""

from __future__ import annotations

import binascii
from email.message import Message

from .charsets import decode_text, mime_name
from .headers import MAX_LINE_OCTETS, header_lines
from .html_compose import (
    html_inner,
    html_insert,
    note_to_html,
    rewrite_meta_charset,
    text_to_html,
)
from .html_to_text import html_to_text
from .parts import raw_payload
from .pieces import Piece
from .spec import MangleSpec, ascii_compatible, codec_name


def _plain_text(pieces: list[Piece]) -> str:
    """Pieces as plain text: a blank line between them, one between notes."""
    out: list[str] = []
    previous = ""
    for piece in pieces:
        text = html_to_text(piece.text) if piece.kind == "html" else piece.text
        text = text.rstrip("\n")
        if not text.strip():
            continue
        if out:
            out.append("\n" if previous == "note" and piece.kind == "note" else "\n\n")
        out.append(text)
        previous = piece.kind
    return "".join(out) + "\n" if out else ""


def _fragment(piece: Piece) -> str:
    if piece.kind == "html":
        return html_inner(piece.text)
    if piece.kind == "note":
        return note_to_html(piece.text)
    return text_to_html(piece.text.rstrip("\n"))


def _html_text(pieces: list[Piece]) -> str:
    """Pieces as one HTML document: the first HTML part's own document with
    the others inside its body, else a new document."""
    pieces = [p for p in pieces if p.text.strip()]
    main = next((i for i, p in enumerate(pieces) if p.kind == "html"), None)
    if main is None:
        body = "\n".join(_fragment(p) for p in pieces)
        return "<html><body>\n" + (body + "\n" if body else "") + "</body></html>\n"
    before = [_fragment(p) for p in pieces[:main]]
    after = [_fragment(p) for p in pieces[main + 1 :]]
    doc = html_insert(pieces[main].text, before, after)
    return doc.rstrip("\n") + "\n"


def _requested_charset(text: str, spec: MangleSpec) -> tuple[bytes, str, str] | None:
    """The text in the charset the client asked for, or None."""
    if spec.charset is None:
        return None
    codec = codec_name(spec.charset)
    if codec is None or not ascii_compatible(codec):
        return None
    errors = "xmlcharrefreplace" if spec.text == "html" else "replace"
    label = mime_name(spec.charset, codec)
    if spec.text == "html":
        text = rewrite_meta_charset(text, label)
    try:
        return text.encode(codec, errors), label, codec
    except UnicodeError:
        return None


def _encode_output(text: str, pieces: list[Piece], spec: MangleSpec) -> tuple[bytes, str, str]:
    """(body bytes, MIME label, codec) in the output charset."""
    requested = _requested_charset(text, spec)
    if requested is not None:
        return requested
    text_pieces = [p for p in pieces if p.kind != "note"]
    candidates = {p.codec for p in text_pieces}
    if len(candidates) == 1 and ascii_compatible(text_pieces[0].codec):
        label, codec = text_pieces[0].label, text_pieces[0].codec
    elif not text_pieces and text.isascii():
        label, codec = "us-ascii", "ascii"
    else:
        label, codec = "utf-8", "utf-8"
    if spec.text == "html":
        text = rewrite_meta_charset(text, label)
    if codec != "utf-8":
        try:
            return text.encode(codec), label, codec
        except UnicodeError:  # the notes or another part need more
            label, codec = "utf-8", "utf-8"
            if spec.text == "html":
                text = rewrite_meta_charset(text, label)
    return text.encode("utf-8", "replace"), label, codec


def _content_type_params(label: str, pieces: list[Piece], spec: MangleSpec) -> str:
    """charset, and format=flowed when every text piece is flowed alike."""
    params = f"charset={label}"
    texts = [p for p in pieces if p.kind != "note"]
    if spec.text == "plain" and texts and all(p.kind == "plain" for p in texts):
        flowed = {p.flowed for p in texts}
        if len(flowed) == 1 and None not in flowed:
            params += "; format=flowed"
            if flowed == {"yes"}:
                params += "; delsp=yes"
    return params


def _max_line(data: bytes) -> int:
    return max(map(len, data.split(b"\n")), default=0)


def _join(lines: list[bytes], body: bytes) -> bytes:
    head = b"\n".join(lines) + b"\n" if lines else b""
    return head + b"\n" + body


def passthrough(msg: Message, spec: MangleSpec) -> bytes | None:
    """A message that is not MIME: its body untouched, its headers
    filtered; None when it needs the normal path after all."""
    body = raw_payload(msg)
    if b"\x00" in body or _max_line(body) > MAX_LINE_OCTETS:
        return None
    _, label, codec = decode_text(body, None)
    if spec.charset is not None and codec != "ascii" and codec_name(spec.charset) != codec:
        return None
    lines = header_lines(msg, spec, codec)
    if codec != "ascii":
        lines += [
            b"MIME-Version: 1.0",
            f"Content-Type: text/plain; charset={label}".encode("ascii"),
            b"Content-Transfer-Encoding: 8bit",
        ]
    return _join(lines, body)


def single_part(msg: Message, pieces: list[Piece], spec: MangleSpec) -> bytes:
    """The condensed message: ``msg``'s kept fields over ``pieces`` as one
    text part of the subtype and charset ``spec`` asks for."""
    text = _plain_text(pieces) if spec.text == "plain" else _html_text(pieces)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    body, label, codec = _encode_output(text, pieces, spec)
    params = _content_type_params(label, pieces, spec)
    if b"\x00" in body or _max_line(body) > MAX_LINE_OCTETS:
        # Wrapping would change the text; quoted-printable keeps it exactly.
        body = binascii.b2a_qp(body, istext=True)
        cte = "quoted-printable"
    else:
        cte = "7bit" if body.isascii() else "8bit"
    lines = header_lines(msg, spec, codec)
    lines += [
        b"MIME-Version: 1.0",
        f"Content-Type: text/{spec.text}; {params}".encode("ascii"),
        f"Content-Transfer-Encoding: {cte}".encode("ascii"),
    ]
    return _join(lines, body)
