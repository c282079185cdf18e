"""XMANGLE and ``-no-mime``: condense a MIME message into one text part.

qpopper 4.1's manual says only that ``RETR``, ``TOP`` and ``LIST`` take an
``XMANGLE(...)`` modifier which "condenses a MIME message into one part of the
requested type" with only the listed headers, and that a ``-no-mime`` suffix on
the user name turns all MIME into plain text for the session.  The mangler's
source was never found, so everything below that is not in that sentence is a
design decision, written down here.  The package is pure: bytes in, bytes out,
no I/O, no clock, no randomness -- the same input and spec always give the
same bytes, so a LIST size computed from :func:`mangle` is exactly what RETR
then sends.

API
---
``MangleSpec(text="plain"|"html", charset=None|label, headers=None|names)``,
``parse_xmangle("text=html;charset=utf-8;headers=to:,cc:")``,
``parse_modifier("XMANGLE(...)")`` (None when the word is not XMANGLE),
``NO_MIME`` (the ``-no-mime`` spec: ``MangleSpec()``), ``mangle(message, spec)``
and ``CAPABILITY`` (``"X-MANGLE"``, the CAPA name Eudora looks for).  The
grammar and the spec live in `spec` (the protocol core needs only them);
``mangle`` is here, and the work is done by the package's other modules:

``parts``         reading a parsed part (raw payload, parameters, sub-parts)
``transfer``      undoing base64, quoted-printable and uuencode, leniently
``charsets``      decoding text whatever its label claims; output labels
``headers``       which fields survive; RFC 2047 encoded-words decoded
``pieces``        walking the MIME tree: the text parts chosen, notes for the rest
``html_to_text``  HTML to plain text (a linear tokenizer, a table of tag handlers)
``html_compose``  text and notes as HTML; the message's HTML document extended
``assemble``      the pieces joined, encoded and put under the new header

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
  is a message on which the parser, a codec or the email package fails the
  way malformed mail makes them fail (`MALFORMED_MAIL_ERRORS`, and nesting
  beyond the parser's recursion limit).  Any other exception is a bug here
  and propagates: the server reports it as an internal error rather than
  sending a message that only looks condensed.  The same fault in a nested
  multipart only turns that part into a note.  A missing close boundary, bad base64, an unknown charset or a
  header-less part are tolerated and mangled.  Nesting deeper than 32 levels
  is noted, not followed.

Parsing uses :class:`email.parser.BytesParser` with ``policy=compat32``, which
records defects instead of raising on malformed headers (``policy.default``
can raise on some) and is linear: a 10 MB message with a base64 attachment
mangles in about 0.2 s.
"""

from __future__ import annotations

from email.errors import MessageError
from email.parser import BytesParser
from email.policy import compat32

from .assemble import passthrough, single_part
from .parts import children, header
from .pieces import collect_pieces
from .spec import (
    CAPABILITY,
    MAX_ARGUMENT_LENGTH,
    MAX_HEADERS,
    NO_MIME,
    MangleSpec,
    parse_modifier,
    parse_xmangle,
)

__all__ = [
    "CAPABILITY",
    "MALFORMED_MAIL_ERRORS",
    "MAX_ARGUMENT_LENGTH",
    "MAX_HEADERS",
    "NO_MIME",
    "MangleSpec",
    "mangle",
    "parse_modifier",
    "parse_xmangle",
]


class _Unmangleable(Exception):
    """The message cannot be condensed; it goes out as it is."""


# What malformed mail makes the parser, the codecs and the email package's
# accessors raise: UnicodeError and binascii.Error are ValueErrors, an
# unknown charset is a LookupError, a header the email package cannot
# handle a MessageError, nesting beyond the parser's recursion limit a
# RecursionError.  KeyError and IndexError, although LookupErrors, are not
# among them: they are bugs here and propagate like every other exception.
MALFORMED_MAIL_ERRORS: tuple[type[BaseException], ...] = (
    _Unmangleable,
    ValueError,
    LookupError,
    MessageError,
    RecursionError,
)
_BUGS_THAT_LOOK_MALFORMED = (KeyError, IndexError)

_PASSED_THROUGH_ENCODINGS = frozenset({"", "7bit", "8bit", "binary"})


def _mangle(data: bytes, spec: MangleSpec) -> bytes:
    """`mangle` without the fallback: raises what it meets."""
    msg = BytesParser(policy=compat32).parsebytes(data)
    if msg.get_content_type().startswith("multipart/") and children(msg) is None:
        raise _Unmangleable("top-level multipart without usable boundary")
    if (
        spec.text == "plain"
        and msg.get("content-type") is None
        and header(msg, "content-transfer-encoding").strip().lower() in _PASSED_THROUGH_ENCODINGS
    ):
        passed = passthrough(msg, spec)
        if passed is not None:
            return passed
    return single_part(msg, collect_pieces(msg, spec.text), spec)


def mangle(message: bytes, spec: MangleSpec = NO_MIME) -> bytes:
    """Condense a stored message (LF or CRLF line ends) into one text part.

    Returns the new message with LF line ends.  A message that cannot be
    condensed, or that fails in one of the ways malformed mail does, comes
    back unmangled (with LF line ends); any other exception propagates.
    """
    data = bytes(message).replace(b"\r\n", b"\n")
    try:
        return _mangle(data, spec)
    except _BUGS_THAT_LOOK_MALFORMED:
        raise
    except MALFORMED_MAIL_ERRORS:
        return data
