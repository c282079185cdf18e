"""XMANGLE and ``-no-mime``: condense a MIME message into one text part.

qpopper 4.1's manual says only that ``RETR``, ``TOP`` and ``LIST`` take an
``XMANGLE(...)`` modifier which "condenses a MIME message into one part of the
requested type" with only the listed headers, and that a ``-no-mime`` suffix on
the user name turns all MIME into plain text for the session.  The mangler's
source was never found, so everything below that is not in that sentence is a
design decision, written down here.  The module is pure: bytes in, bytes out,
no I/O, no clock, no randomness -- the same input and spec always give the
same bytes, so a LIST size computed from :func:`mangle` is exactly what RETR
then sends.

API
---
``MangleSpec(text="plain"|"html", charset=None|label, headers=None|names)``,
``parse_xmangle("text=html;charset=utf-8;headers=to:,cc:")``,
``parse_modifier("XMANGLE(...)")`` (None when the word is not XMANGLE),
``NO_MIME`` (the ``-no-mime`` spec: ``MangleSpec()``), ``mangle(message, spec)``
and ``CAPABILITY`` (``"X-MANGLE"``, the CAPA name Eudora looks for).

Argument grammar (``parse_xmangle``)
------------------------------------
``key=value`` items separated by ``;``; keys ``text``, ``charset``, ``headers``
(case-insensitive); blanks around items and empty items are ignored;
``XMANGLE()`` is the default spec.  ``text`` is ``plain`` or ``html`` (``text/``
prefix allowed).  ``charset`` must name a Python text codec that is
ASCII-compatible (so ``utf-16``, ``utf-7`` and codec tricks such as
``punycode`` or ``rot13`` are refused).  ``headers`` is a comma list of field
names, the trailing ``:`` optional, compared case-insensitively, duplicates
folded, at most 50; ``headers=`` (empty) keeps no ordinary header.  Anything
else -- an unknown key, a repeated key, an item without ``=``, a bad value, an
argument over 200 characters -- raises ``ValueError`` with a readable message.

What the output looks like
--------------------------
* One part: the kept header fields in their original order and form, then
  ``MIME-Version: 1.0``, ``Content-Type: text/plain|text/html; charset=...``
  and ``Content-Transfer-Encoding: 7bit|8bit|quoted-printable``, a blank line,
  the body.  Line ends are LF; the body ends with a newline.
* Headers: with ``headers`` given only the named fields are kept.  Always
  dropped from the original (they describe the old body): MIME-Version,
  Content-Type, Content-Transfer-Encoding, Content-Disposition, Content-ID,
  Content-Location, Content-Base, Content-Length, Content-MD5 and Lines.  A
  leading mbox ``From `` line, if the store left one, is kept as it is.
* RFC 2047 encoded-words in kept fields are decoded (adjacent words joined,
  even when a multibyte character is split across them) when the result can
  be written in the output charset and fits in 998 octets; otherwise the field
  is left exactly as it was.  Control characters produced by decoding (an
  encoded CR/LF would otherwise inject a header) become spaces.  In address
  fields a decoded display name that contains specials (``,`` ``;`` ``<`` ...)
  is quoted so the address list keeps its meaning.
* Transfer encodings are decoded (base64 leniently: junk characters skipped,
  padding repaired; quoted-printable; uuencode).  The body is written as 8bit
  text (7bit when pure ASCII).  When a line would exceed 998 octets, or the
  text contains NUL, the whole body is sent quoted-printable instead: wrapping
  would change the text (and break HTML attributes or ``<pre>``), QP is
  lossless and every client decodes it.

Which text
----------
* The requested subtype is searched depth-first.  In ``multipart/alternative``
  the first alternative that is the requested subtype wins, then the first
  that contains it (for instance ``multipart/related`` around the HTML), then
  the first holding the other text subtype (converted); the other
  alternatives are dropped silently -- they are the same content.
* ``multipart/related``: the root (the ``start`` parameter, else the first
  part) is the content; the other parts (inline images, style sheets) are
  dropped with a note each.
* ``multipart/mixed`` and every other multipart: *all* inline ``text/plain``
  and ``text/html`` parts are kept, in order, each converted to the requested
  subtype (mailing-list footers and multi-part bodies are text a reader
  expects to see); everything else becomes a note at its place.
* A part is an attachment when its Content-Disposition is ``attachment`` or
  its type is neither text/plain nor text/html (text/calendar, text/csv,
  images, applications, ...).  Each becomes one line:
  ``[attachment removed: report.pdf, application/pdf, 12345 bytes]`` (name
  omitted when there is none; the size is the decoded size).
* An inline ``message/rfc822`` part (a forwarded message) is shown: a
  ``---------- Forwarded message ----------`` line, its From/Date/Subject/To/Cc
  and its own text, mangled the same way.  As an attachment it is a note.
* HTML to text: a small linear tokenizer (CPython 3.11's html.parser is
  quadratic on crafted input -- 800 KB of ``<!--`` takes minutes -- so it is
  not used on untrusted mail): script, style, head, title and template are
  dropped; paragraphs, headings, lists, tables and ``<br>`` become line
  breaks; list items get ``* ``; links become ``text <url>`` (the URL omitted
  when it is the text, ``#`` anchors and ``javascript:`` never shown); images
  with alt text become ``[image: alt]``; entities are decoded; ``&nbsp;`` is a
  space.
* Text to HTML: escaped, URLs linked, wrapped in
  ``<pre style="white-space: pre-wrap">``; a document that had no HTML part is
  ``<html><body>...</body></html>``.  When the output is HTML and the message
  has an HTML part, that document is kept as it is and the other pieces are
  put inside its ``<body>`` before or after it; ``<meta ... charset=...>``
  declarations are rewritten to the output charset.
* ``format=flowed`` is kept when the output is only flowed text/plain parts.

Charsets
--------
* Output charset: the one asked for; otherwise the charset of the text parts
  when they all share one and it can write the whole result (notes included);
  otherwise UTF-8.  Characters the asked-for charset cannot hold become ``?``
  in plain text and character references in HTML.
* Decoding never raises.  The declared charset is tried strictly; a
  declared ISO-8859-1 part with bytes 0x80-0x9F is read as windows-1252
  (what browsers do); a declared UTF-8 part that is not UTF-8 is guessed as
  below; any other charset that fails is tried as UTF-8, then decoded with
  U+FFFD for the bad bytes.  Unknown or absent charset (the guess): US-ASCII
  if it is, else UTF-8 if it decodes, else ISO-8859-1 when there are no bytes
  0x80-0x9F, else windows-1252, else ISO-8859-1 (which takes any byte); the
  output is labelled with what was actually used.  A few common aliases Python lacks are mapped (``windows-874``,
  ``x-mac-roman``, ``iso-8859-8-i``, ``gb2312`` as GB18030, ``shift_jis`` as
  cp932, ...).

Messages that are not MIME, and broken ones
-------------------------------------------
* No Content-Type (and no transfer encoding) with text/plain asked for: the
  body is passed through byte for byte (not even a final newline added) with
  only the header filtering applied; if it is 8-bit, MIME-Version,
  Content-Type (charset guessed as above) and ``Content-Transfer-Encoding:
  8bit`` are added.  Asked for another charset, or with lines over 998
  octets, it goes through the normal path.
* A top-level multipart without a boundary, or whose boundary never occurs,
  cannot be condensed: the message is returned unmangled (LF line ends).  So
  is any message on which anything unexpected goes wrong: :func:`mangle`
  never raises.  The same fault in a nested multipart only turns that part
  into a note.  A missing close boundary, bad base64, an unknown charset or a
  header-less part are tolerated and mangled.  Nesting deeper than 32 levels
  is noted, not followed.

Parsing uses :class:`email.parser.BytesParser` with ``policy=compat32``, which
records defects instead of raising on malformed headers (``policy.default``
can raise on some) and is linear: a 10 MB message with a base64 attachment
mangles in about 0.2 s.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .spec import (
    CAPABILITY,
    MAX_ARGUMENT_LENGTH,
    MAX_HEADERS,
    NO_MIME,
    MangleSpec,
    ascii_compatible as _ascii_compatible,
    codec_name as _codec,
    parse_modifier,
    parse_xmangle,
)

# The email package and html's entity table (2 MB of a server's memory)
# are imported by the functions that mangle, on first use; the protocol
# core does not import this module at all, only `manglespec`.
if TYPE_CHECKING:
    from email.message import Message

__all__ = [
    "CAPABILITY",
    "MAX_ARGUMENT_LENGTH",
    "MAX_HEADERS",
    "MangleSpec",
    "NO_MIME",
    "mangle",
    "parse_modifier",
    "parse_xmangle",
]

MAX_DEPTH = 32
MAX_LINE_OCTETS = 998

_TOKEN_LABEL = re.compile(r"[a-z0-9][a-z0-9._+-]{0,39}")

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


# --------------------------------------------------------------------------
# Charsets
# --------------------------------------------------------------------------

_MIME_NAMES = {"utf-8": "utf-8", "ascii": "us-ascii", "cp932": "shift_jis", "gb18030": "gb18030"}
_C1_BYTES = re.compile(rb"[\x80-\x9f]")


def _mime_name(label: str, codec: str) -> str:
    """The label to write in Content-Type for text encoded with ``codec``."""
    if codec in _MIME_NAMES:
        return _MIME_NAMES[codec]
    m = re.fullmatch(r"iso8859-(\d+)", codec)
    if m:
        return f"iso-8859-{m.group(1)}"
    m = re.fullmatch(r"cp(125\d)", codec)
    if m:
        return f"windows-{m.group(1)}"
    label = label.strip().strip("\"'").lower()
    return label if _TOKEN_LABEL.fullmatch(label) else codec


def _guess_8bit(data: bytes) -> tuple[str, str, str]:
    if _C1_BYTES.search(data) is None:
        return data.decode("latin-1"), "iso-8859-1", "iso8859-1"
    try:
        return data.decode("cp1252"), "windows-1252", "cp1252"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "iso-8859-1", "iso8859-1"


def _decode_text(data: bytes, label: str | None) -> tuple[str, str, str]:
    """Decode body bytes: (text, MIME label, codec).  Never raises."""
    codec = _codec(label) if label else None
    if codec is None or codec == "ascii":
        if data.isascii():
            return data.decode("ascii"), "us-ascii", "ascii"
        try:
            return data.decode("utf-8"), "utf-8", "utf-8"
        except UnicodeDecodeError:
            return _guess_8bit(data)
    assert label is not None
    if codec == "iso8859-1":
        if _C1_BYTES.search(data) is None:
            return data.decode("latin-1"), _mime_name(label, codec), codec
        return _guess_8bit(data)
    try:
        return data.decode(codec), _mime_name(label, codec), codec
    except Exception:
        pass
    if codec == "utf-8" or codec.startswith("utf"):
        return _guess_8bit(data)
    try:
        return data.decode("utf-8"), "utf-8", "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        return data.decode(codec, "replace"), _mime_name(label, codec), codec
    except Exception:
        return _guess_8bit(data)


def _as_text(value: str) -> str:
    """A header or parameter value from compat32 (raw 8-bit bytes kept as
    surrogate escapes) as proper text."""
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeError:
        return value.encode("utf-8", "replace").decode("utf-8")
    return _decode_text(raw, None)[0]


# --------------------------------------------------------------------------
# Transfer encodings
# --------------------------------------------------------------------------

_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_JUNK = bytes(b for b in range(256) if b not in _B64_ALPHABET)


def _b64decode(raw: bytes) -> bytes:
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


def _raw_payload(part: Message) -> bytes:
    # Not get_payload(): for a body holding 8-bit bytes it returns the text
    # already decoded with the declared charset (and U+FFFD for errors).
    payload = getattr(part, "_payload", None)
    if not isinstance(payload, str):
        return b""
    try:
        return payload.encode("utf-8", "surrogateescape")
    except UnicodeError:
        return payload.encode("utf-8", "replace")


def _header(part: Message, name: str) -> str:
    value = part.get(name)
    return "" if value is None else str(value)


def _transfer_decode(part: Message) -> bytes:
    raw = _raw_payload(part)
    cte = _header(part, "content-transfer-encoding").strip().lower()
    if cte == "base64":
        return _b64decode(raw)
    if cte == "quoted-printable":
        return binascii.a2b_qp(raw)
    if cte in ("x-uuencode", "uuencode", "uue", "x-uue"):
        try:
            decoded = part.get_payload(decode=True)
        except Exception:
            return raw
        return decoded if isinstance(decoded, bytes) else raw
    return raw


# --------------------------------------------------------------------------
# RFC 2047
# --------------------------------------------------------------------------

_ENCODED_WORD = re.compile(r"=\?([^?\s*]{1,75})(?:\*[^?\s]{0,75})?\?([QqBb])\?([^?\s]*)\?=")
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")
_SPECIALS = frozenset('()<>@,;:"[]\\')


def _decode_word(encoding: str, text: str) -> bytes:
    data = text.encode("utf-8", "surrogateescape")
    if encoding in "Bb":
        return _b64decode(data)
    return binascii.a2b_qp(data, header=True)


def _decode_encoded_words(value: str, address: bool) -> str | None:
    """Decode RFC 2047 words in an unfolded value; None when there are none."""
    out: list[str] = []
    run: list[tuple[str, bytes]] = []
    pos = 0

    def flush() -> None:
        if not run:
            return
        pieces: list[str] = []
        charset, data = run[0][0], bytearray()
        for cs, chunk in run:
            if cs != charset:
                pieces.append(_decode_text(bytes(data), charset)[0])
                charset, data = cs, bytearray()
            data += chunk
        pieces.append(_decode_text(bytes(data), charset)[0])
        text = _CONTROLS.sub(" ", "".join(pieces))
        if address and any(c in _SPECIALS for c in text):
            text = text.replace("\\", "\\\\").replace('"', '\\"')
            if not (out and out[-1].endswith('"')):
                text = f'"{text}"'
        out.append(text)
        run.clear()

    for m in _ENCODED_WORD.finditer(value):
        gap = value[pos : m.start()]
        if not (run and not gap.strip()):
            flush()
            out.append(gap)
        run.append((m.group(1).lower(), _decode_word(m.group(2), m.group(3))))
        pos = m.end()
    if pos == 0:
        return None
    flush()
    out.append(value[pos:])
    return "".join(out)


def _display(value: str) -> str:
    """A header value as one line of readable text (for notes and the
    forwarded-message summary)."""
    text = _as_text(value.replace("\r", "").replace("\n", ""))
    decoded = _decode_encoded_words(text, address=False)
    if decoded is not None:
        text = decoded
    return _CONTROLS.sub(" ", text).strip()


# --------------------------------------------------------------------------
# HTML <-> text
# --------------------------------------------------------------------------

_WS = re.compile(r"[ \t\n\r\f\v]+")
_TAG_NAME = re.compile(r"(/?)([A-Za-z][A-Za-z0-9:-]{0,40})")
# Every alternative consumes what it looks at, so finditer stays linear even
# on unterminated quotes.
_ATTR = re.compile(r"""([^\s"'>/=]+)(?:\s*=\s*(?:"([^"]*)"?|'([^']*)'?|([^\s"'>]*)))?""")
_RAW_END = {
    name: re.compile(rf"</{name}\s*>", re.I) for name in ("script", "style", "title", "template")
}
_BLOCK2 = frozenset(
    {"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "ul", "ol", "dl", "table", "pre",
     "form", "fieldset", "address", "figure"}
)
_BLOCK1 = frozenset(
    {"div", "tr", "li", "dt", "dd", "section", "article", "header", "footer", "nav", "aside",
     "main", "center", "caption", "figcaption", "details", "summary", "body", "html"}
)


def _attrs(tag: str) -> dict[str, str]:
    import html
    attrs: dict[str, str] = {}
    for m in _ATTR.finditer(tag[:4096]):
        name = m.group(1).lower()
        if name in attrs:
            continue
        value = m.group(2) if m.group(2) is not None else m.group(3)
        if value is None:
            value = m.group(4) or ""
        attrs[name] = html.unescape(value)
    return attrs


class _TextWriter:
    def __init__(self) -> None:
        self.out: list[str] = []
        self.pending = 0
        self.last = "\n"

    def block(self, n: int) -> None:
        self.pending = max(self.pending, n)

    def br(self) -> None:
        if self.out and not self.pending:
            self.out.append("\n")
            self.last = "\n"

    def text(self, s: str, pre: bool = False) -> None:
        if not pre:
            s = _WS.sub(" ", s)
            if self.pending or self.last in " \n":
                s = s.lstrip(" ")
        if not s:
            return
        if self.pending and self.out:
            self.out.append("\n" * self.pending)
        self.pending = 0
        self.out.append(s)
        self.last = s[-1]


def _html_to_text(doc: str) -> str:
    import html
    w = _TextWriter()
    pos, n = 0, len(doc)
    pre = 0
    in_head = False
    link: tuple[str, int] | None = None
    next_gt = -2  # cached position of the next '>' (n: there is none)

    def end_link() -> None:
        nonlocal link
        if link is None:
            return
        href, start = link
        link = None
        label = "".join(w.out[start:]).strip() if len(w.out) - start < 200 else ""
        shown = href[7:] if href.lower().startswith("mailto:") else href
        if shown and shown != label and href != label:
            w.text(f" <{shown}>")

    while pos < n:
        lt = doc.find("<", pos)
        if lt < 0:
            lt = n
        if lt > pos and not in_head:
            w.text(html.unescape(doc[pos:lt]), pre > 0)
        if lt >= n:
            break
        if doc.startswith("<!--", lt):
            end = doc.find("-->", lt + 4)
            if end < 0:
                break
            pos = end + 3
            continue
        if next_gt != n and next_gt <= lt:
            next_gt = doc.find(">", lt + 1)
            if next_gt < 0:
                next_gt = n
        gt = next_gt
        m = _TAG_NAME.match(doc, lt + 1, gt) if gt < n else None
        if doc[lt + 1 : lt + 2] in ("!", "?") and gt < n:
            pos = gt + 1
            continue
        if m is None:
            if not in_head:
                w.text("<", pre > 0)
            pos = lt + 1
            continue
        closing = m.group(1) == "/"
        name = m.group(2).lower()
        tag = doc[m.end() : gt]
        pos = gt + 1
        if in_head:
            if name == "body" or (closing and name == "head"):
                in_head = False
            if name != "body":
                continue
        if closing:
            if name in _BLOCK2:
                w.block(2)
                if name == "pre":
                    pre = max(0, pre - 1)
            elif name in _BLOCK1:
                w.block(1)
            elif name == "a":
                end_link()
            continue
        if name in _RAW_END:
            end_match = _RAW_END[name].search(doc, pos)
            if end_match is None:
                break
            pos = end_match.end()
        elif name == "head":
            in_head = True
        elif name == "br":
            w.br()
        elif name == "hr":
            w.block(1)
            w.text("-" * 40)
            w.block(1)
        elif name == "li":
            w.block(1)
            w.text("* ")
        elif name in _BLOCK2:
            w.block(2)
            if name == "pre":
                pre += 1
        elif name in _BLOCK1:
            w.block(1)
        elif name in ("td", "th"):
            w.text(" ")
        elif name == "a":
            end_link()
            href = _CONTROLS.sub("", _attrs(tag).get("href", "")).strip()
            if href.startswith("#") or href.lower().startswith("javascript:") or len(href) > 2048:
                href = ""
            link = (href, len(w.out))
        elif name == "img":
            alt = _WS.sub(" ", _attrs(tag).get("alt", "")).strip()
            if alt:
                w.text(f"[image: {alt}]")
    end_link()
    text = "".join(w.out).replace("\xa0", " ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


_URL = re.compile(r"\b(?:https?|ftp)://[^\s<>\"'()\[\]{}]+|\bmailto:[^\s<>\"'()\[\]{}]+", re.I)


def _text_to_html(text: str) -> str:
    import html
    out: list[str] = []
    pos = 0
    for m in _URL.finditer(text):
        url = m.group(0).rstrip(".,;:!?")
        end = m.start() + len(url)
        out.append(html.escape(text[pos : m.start()], quote=False))
        out.append(f'<a href="{html.escape(url)}">{html.escape(url, quote=False)}</a>')
        pos = end
    out.append(html.escape(text[pos:], quote=False))
    return '<pre style="white-space: pre-wrap">' + "".join(out) + "</pre>"


def _note_to_html(text: str) -> str:
    import html
    return "<p>" + "<br>\n".join(html.escape(line, quote=False) for line in text.split("\n")) + "</p>"


_BODY_OPEN = re.compile(r"<body\b[^>]{0,4096}>", re.I)
_BODY_CLOSE = re.compile(r"</body\s*>", re.I)
_META = re.compile(r"<meta\b[^>]{0,2048}>", re.I)
_META_CHARSET = re.compile(r"""(charset\s*=\s*["']?)([^"'\s;>/]*)""", re.I)
_META_SNIFF = re.compile(rb"""<meta\b[^>]{0,512}?charset\s*=\s*["']?([A-Za-z0-9._:-]{1,40})""", re.I)


def _last_body_close(doc: str, start: int) -> int:
    last = -1
    for m in _BODY_CLOSE.finditer(doc, start):
        last = m.start()
    return last


def _html_inner(doc: str) -> str:
    m = _BODY_OPEN.search(doc)
    start = m.end() if m else 0
    end = _last_body_close(doc, start)
    return doc[start : end if end >= 0 else len(doc)].strip("\n")


def _html_insert(doc: str, before: list[str], after: list[str]) -> str:
    if after:
        end = _last_body_close(doc, 0)
        chunk = "\n".join(after) + "\n"
        if end >= 0:
            lead = "" if doc[:end].endswith("\n") else "\n"
            doc = doc[:end] + lead + chunk + doc[end:]
        else:
            doc = doc.rstrip("\n") + "\n" + chunk
    if before:
        chunk = "\n".join(before) + "\n"
        m = _BODY_OPEN.search(doc)
        if m:
            doc = doc[: m.end()] + "\n" + chunk + doc[m.end() :]
        else:
            doc = chunk + doc
    return doc


def _rewrite_meta_charset(doc: str, label: str) -> str:
    def meta(m: re.Match[str]) -> str:
        return _META_CHARSET.sub(lambda c: c.group(1) + label, m.group(0))

    return _META.sub(meta, doc)


# --------------------------------------------------------------------------
# Walking the MIME tree
# --------------------------------------------------------------------------


@dataclass
class _Piece:
    kind: str  # "plain", "html" or "note"
    text: str
    label: str = ""
    codec: str = ""
    flowed: str | None = None  # delsp value when format=flowed


class _Unmangleable(Exception):
    """The message cannot be condensed; it goes out as it is."""


def _param(part: Message, name: str, header: str = "content-type") -> str | None:
    from email.utils import collapse_rfc2231_value
    try:
        value = part.get_param(name, header=header)
    except Exception:
        return None
    if value is None:
        return None
    if isinstance(value, tuple):
        value = collapse_rfc2231_value(value)
    return str(value)


def _children(part: Message) -> list[Message] | None:
    """The parsed sub-parts of a multipart or message/* part, else None."""
    from email.message import Message
    # Read directly: get_payload() decodes 8-bit bodies with the declared
    # charset and raises on odd charset parameters.
    payload = getattr(part, "_payload", None)
    if not isinstance(payload, list):
        return None
    return [child for child in payload if isinstance(child, Message)]


def _content_type(part: Message) -> str:
    try:
        return part.get_content_type()
    except Exception:
        return "text/plain"


def _is_attachment(part: Message) -> bool:
    disposition = _header(part, "content-disposition").split(";", 1)[0].strip().lower()
    return disposition == "attachment"


class _Collector:
    def __init__(self, want: str) -> None:
        self.want = want
        self.pieces: list[_Piece] = []

    # What a part offers to an alternative: 3 the wanted text, 2 a container
    # with it, 1 the other text (directly or inside), 0 nothing readable.
    def score(self, part: Message, depth: int) -> int:
        ctype = _content_type(part)
        if ctype in ("text/plain", "text/html") and not _is_attachment(part):
            return 3 if ctype == f"text/{self.want}" else 1
        payload = _children(part)
        if ctype.startswith("multipart/") and payload is not None and depth < MAX_DEPTH:
            best = max((self.score(c, depth + 1) for c in payload), default=0)
            return 2 if best >= 2 else best
        return 0

    def collect(self, part: Message, depth: int) -> None:
        if depth > MAX_DEPTH:
            self.note(part)
            return
        ctype = _content_type(part)
        maintype, _, subtype = ctype.partition("/")
        if maintype == "multipart":
            children = _children(part)
            if children is None:
                self.note(part)
                return
            if subtype == "alternative":
                if children:
                    scores = [self.score(c, depth + 1) for c in children]
                    self.collect(children[scores.index(max(scores))], depth + 1)
            elif subtype == "related":
                root = self.related_root(part, children)
                if root is not None:
                    self.collect(root, depth + 1)
                for child in children:
                    if child is not root:
                        self.note_all(child, depth + 1)
            else:
                for child in children:
                    self.collect(child, depth + 1)
        elif ctype in ("text/plain", "text/html") and not _is_attachment(part):
            self.text(part, subtype)
        elif ctype == "message/rfc822" and not _is_attachment(part):
            self.forwarded(part, depth)
        else:
            self.note(part)

    @staticmethod
    def related_root(part: Message, children: list[Message]) -> Message | None:
        if not children:
            return None
        start = _param(part, "start")
        if start:
            want = start.strip().strip("<>")
            for child in children:
                if _header(child, "content-id").strip().strip("<>") == want:
                    return child
        return children[0]

    def note_all(self, part: Message, depth: int) -> None:
        payload = _children(part)
        if _content_type(part).startswith("multipart/") and payload is not None and depth < MAX_DEPTH:
            for child in payload:
                self.note_all(child, depth + 1)
        else:
            self.note(part)

    def note(self, part: Message) -> None:
        ctype = _content_type(part)
        payload = _children(part)
        name = ""
        try:
            name = part.get_filename() or ""
        except Exception:
            name = ""
        if payload is not None:
            size = 0
            if ctype.startswith("message/") and payload:
                try:
                    size = len(payload[0].as_bytes())
                except Exception:
                    size = 0
                if not name:
                    name = _header(payload[0], "subject")
        else:
            size = len(_transfer_decode(part))
        name = _display(name)
        if len(name) > 100:
            name = name[:97] + "..."
        unit = "byte" if size == 1 else "bytes"
        what = f"{name}, {ctype}" if name else ctype
        self.pieces.append(_Piece("note", f"[attachment removed: {what}, {size} {unit}]"))

    def text(self, part: Message, subtype: str) -> None:
        data = _transfer_decode(part)
        label = _param(part, "charset")
        if subtype == "html" and not label:
            m = _META_SNIFF.search(data[:4096])
            if m:
                label = m.group(1).decode("ascii")
        text, mime, codec = _decode_text(data, label)
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        flowed = None
        if subtype == "plain" and (_param(part, "format") or "").lower() == "flowed":
            flowed = "yes" if (_param(part, "delsp") or "").lower() == "yes" else "no"
        self.pieces.append(_Piece(subtype, text, mime, codec, flowed))

    def forwarded(self, part: Message, depth: int) -> None:
        from email.parser import BytesParser
        from email.policy import compat32
        payload = _children(part)
        if payload:
            inner = payload[0]
        else:
            inner = BytesParser(policy=compat32).parsebytes(_transfer_decode(part))
        lines = ["---------- Forwarded message ----------"]
        for field in ("From", "Date", "Subject", "To", "Cc"):
            value = inner.get(field)
            if value is not None:
                lines.append(f"{field}: {_display(str(value))}")
        self.pieces.append(_Piece("note", "\n".join(lines)))
        self.collect(inner, depth + 1)


# --------------------------------------------------------------------------
# Putting the message together
# --------------------------------------------------------------------------


def _assemble_plain(pieces: list[_Piece]) -> str:
    out: list[str] = []
    previous = ""
    for piece in pieces:
        text = _html_to_text(piece.text) if piece.kind == "html" else piece.text
        text = text.rstrip("\n")
        if not text.strip():
            continue
        if out:
            out.append("\n" if previous == "note" and piece.kind == "note" else "\n\n")
        out.append(text)
        previous = piece.kind
    return "".join(out) + "\n" if out else ""


def _fragment(piece: _Piece) -> str:
    if piece.kind == "html":
        return _html_inner(piece.text)
    if piece.kind == "note":
        return _note_to_html(piece.text)
    return _text_to_html(piece.text.rstrip("\n"))


def _assemble_html(pieces: list[_Piece]) -> str:
    pieces = [p for p in pieces if p.text.strip()]
    main = next((i for i, p in enumerate(pieces) if p.kind == "html"), None)
    if main is None:
        body = "\n".join(_fragment(p) for p in pieces)
        return "<html><body>\n" + (body + "\n" if body else "") + "</body></html>\n"
    before = [_fragment(p) for p in pieces[:main]]
    after = [_fragment(p) for p in pieces[main + 1 :]]
    doc = _html_insert(pieces[main].text, before, after)
    return doc.rstrip("\n") + "\n"


def _max_line(data: bytes) -> int:
    return max(map(len, data.split(b"\n")), default=0)


def _field_bytes(name: str, value: str) -> bytes:
    sep = ":" if value.startswith("\n") or not value else ": "
    return (name + sep + value).encode("utf-8", "surrogateescape")


def _header_lines(msg: Message, spec: MangleSpec, codec: str) -> list[bytes]:
    keep = None if spec.headers is None else frozenset(spec.headers)
    lines: list[bytes] = []
    unixfrom = msg.get_unixfrom()
    if unixfrom:
        lines.append(unixfrom.encode("utf-8", "surrogateescape"))
    for name, value in msg.raw_items():
        key = name.strip().lower()
        if key in _DROPPED_FIELDS or (keep is not None and key not in keep):
            continue
        value = str(value)
        line = _field_bytes(name, value)
        if "=?" in value and codec and _ascii_compatible(codec):
            decoded = _decode_encoded_words(
                value.replace("\n", "").strip(), address=key in _ADDRESS_FIELDS
            )
            if decoded is not None:
                try:
                    candidate = f"{name}: {decoded}".encode(codec)
                except Exception:
                    candidate = b""
                if candidate and len(candidate) <= MAX_LINE_OCTETS:
                    line = candidate
        lines.append(line)
    return lines


def _join(header_lines: list[bytes], body: bytes) -> bytes:
    head = b"\n".join(header_lines) + b"\n" if header_lines else b""
    return head + b"\n" + body


def _passthrough(msg: Message, spec: MangleSpec) -> bytes | None:
    """The non-MIME case: body untouched, headers filtered."""
    body = _raw_payload(msg)
    if b"\x00" in body or _max_line(body) > MAX_LINE_OCTETS:
        return None
    text, label, codec = _decode_text(body, None)
    if spec.charset is not None and codec != "ascii" and _codec(spec.charset) != codec:
        return None
    lines = _header_lines(msg, spec, codec)
    if codec != "ascii":
        lines += [
            b"MIME-Version: 1.0",
            f"Content-Type: text/plain; charset={label}".encode("ascii"),
            b"Content-Transfer-Encoding: 8bit",
        ]
    return _join(lines, body)


def _encode_output(text: str, pieces: list[_Piece], spec: MangleSpec) -> tuple[bytes, str, str]:
    """(body bytes, MIME label, codec) in the output charset."""
    if spec.charset is not None:
        codec = _codec(spec.charset)
        if codec is not None and _ascii_compatible(codec):
            errors = "xmlcharrefreplace" if spec.text == "html" else "replace"
            label = _mime_name(spec.charset, codec)
            if spec.text == "html":
                text = _rewrite_meta_charset(text, label)
            try:
                return text.encode(codec, errors), label, codec
            except Exception:
                pass
    text_pieces = [p for p in pieces if p.kind != "note"]
    candidates = {p.codec for p in text_pieces}
    if len(candidates) == 1 and _ascii_compatible(text_pieces[0].codec):
        label, codec = text_pieces[0].label, text_pieces[0].codec
    elif not text_pieces and text.isascii():
        label, codec = "us-ascii", "ascii"
    else:
        label, codec = "utf-8", "utf-8"
    if spec.text == "html":
        text = _rewrite_meta_charset(text, label)
    if codec != "utf-8":
        try:
            return text.encode(codec), label, codec
        except Exception:
            label, codec = "utf-8", "utf-8"
            if spec.text == "html":
                text = _rewrite_meta_charset(text, label)
    return text.encode("utf-8", "replace"), label, codec


def _mangle(data: bytes, spec: MangleSpec) -> bytes:
    from email.parser import BytesParser
    from email.policy import compat32
    msg = BytesParser(policy=compat32).parsebytes(data)
    ctype = _content_type(msg)
    if ctype.startswith("multipart/") and _children(msg) is None:
        raise _Unmangleable("top-level multipart without usable boundary")
    cte = _header(msg, "content-transfer-encoding").strip().lower()
    if (
        spec.text == "plain"
        and msg.get("content-type") is None
        and cte in ("", "7bit", "8bit", "binary")
    ):
        passed = _passthrough(msg, spec)
        if passed is not None:
            return passed
    collector = _Collector(spec.text)
    collector.collect(msg, 0)
    pieces = collector.pieces
    if spec.text == "plain":
        text = _assemble_plain(pieces)
    else:
        text = _assemble_html(pieces)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    body, label, codec = _encode_output(text, pieces, spec)
    params = f"charset={label}"
    plain = [p for p in pieces if p.kind != "note"]
    if spec.text == "plain" and plain and all(p.kind == "plain" for p in plain):
        flowed = {p.flowed for p in plain}
        if len(flowed) == 1 and None not in flowed:
            params += "; format=flowed"
            if flowed == {"yes"}:
                params += "; delsp=yes"
    if b"\x00" in body or _max_line(body) > MAX_LINE_OCTETS:
        body = binascii.b2a_qp(body, istext=True)
        cte_out = "quoted-printable"
    else:
        cte_out = "7bit" if body.isascii() else "8bit"
    lines = _header_lines(msg, spec, codec)
    lines += [
        b"MIME-Version: 1.0",
        f"Content-Type: text/{spec.text}; {params}".encode("ascii"),
        f"Content-Transfer-Encoding: {cte_out}".encode("ascii"),
    ]
    return _join(lines, body)


def mangle(message: bytes, spec: MangleSpec = NO_MIME) -> bytes:
    """Condense a stored message (LF or CRLF line ends) into one text part.

    Returns the new message with LF line ends.  Never raises: a message that
    cannot be condensed comes back unmangled (with LF line ends).
    """
    data = bytes(message).replace(b"\r\n", b"\n")
    try:
        return _mangle(data, spec)
    except Exception:
        return data
