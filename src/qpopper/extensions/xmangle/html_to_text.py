"""HTML to plain text: a linear tokenizer and a table of tag handlers.

CPython 3.11's html.parser is quadratic on crafted input (800 KB of
``<!--`` takes minutes), so it is not used on untrusted mail.  The reader
below looks at each ``<`` once, remembers where the next ``>`` is, and
hands every tag it recognises to the handler `_START_TAGS` or `_END_TAGS`
names for it; tags with no handler (``<b>``, ``<span>`` ...) leave only
their text.  What each element becomes is in `condense`'s docstring
("HTML to text").
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable

from .charsets import CONTROLS

_WS = re.compile(r"[ \t\n\r\f\v]+")
_TAG_NAME = re.compile(r"(/?)([A-Za-z][A-Za-z0-9:-]{0,40})")
# Every alternative consumes what it looks at, so finditer stays linear even
# on unterminated quotes.
_ATTR = re.compile(r"""([^\s"'>/=]+)(?:\s*=\s*(?:"([^"]*)"?|'([^']*)'?|([^\s"'>]*)))?""")
_BLANK_LINES = re.compile(r"\n{3,}")

# Elements whose content is not text: skipped up to their end tag.
_RAW_END = {
    name: re.compile(rf"</{name}\s*>", re.IGNORECASE) for name in ("script", "style", "title", "template")
}
# Blocks set off by a blank line, and by a line break.
_PARAGRAPHS = frozenset(
    {"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "ul", "ol", "dl", "table", "pre",
     "form", "fieldset", "address", "figure"}
)
_LINES = frozenset(
    {"div", "tr", "li", "dt", "dd", "section", "article", "header", "footer", "nav", "aside",
     "main", "center", "caption", "figcaption", "details", "summary", "body", "html"}
)
_MAX_HREF = 2048
_MAX_LABEL_PIECES = 200  # a link label longer than this is never compared with its URL


def attributes(tag: str) -> dict[str, str]:
    """A start tag's attributes (the text after its name), first one of a
    name wins, values unescaped."""
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
    """Collapses white space and turns block boundaries into line breaks:
    a boundary only counts once text follows it."""

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

    def result(self) -> str:
        text = "".join(self.out).replace("\xa0", " ")
        text = "\n".join(line.rstrip() for line in text.split("\n"))
        return _BLANK_LINES.sub("\n\n", text).strip("\n")


class _Reader:
    """The tokenizer's state while it walks one document."""

    def __init__(self, doc: str) -> None:
        self.doc = doc
        self.pos = 0
        self.writer = _TextWriter()
        self.pre = 0  # open <pre> elements: white space is kept inside
        self.in_head = False
        self.link: tuple[str, int] | None = None  # href, where its label starts in the output
        self.next_gt = -2  # cached position of the next '>' (len(doc): there is none)

    def run(self) -> str:
        doc, n = self.doc, len(self.doc)
        while self.pos < n:
            lt = doc.find("<", self.pos)
            if lt < 0:
                lt = n
            if lt > self.pos and not self.in_head:
                self.writer.text(html.unescape(doc[self.pos : lt]), self.pre > 0)
            if lt >= n:
                break
            self.pos = self.markup(lt)
        self.end_link()
        return self.writer.result()

    def markup(self, lt: int) -> int:
        """Handle what starts with the '<' at ``lt``; where reading goes on."""
        doc, n = self.doc, len(self.doc)
        if doc.startswith("<!--", lt):
            end = doc.find("-->", lt + 4)
            return n if end < 0 else end + 3  # an open comment hides the rest
        if self.next_gt != n and self.next_gt <= lt:
            gt = doc.find(">", lt + 1)
            self.next_gt = n if gt < 0 else gt
        gt = self.next_gt
        if gt >= n:
            m = None
        else:
            if doc[lt + 1 : lt + 2] in ("!", "?"):
                return gt + 1  # a declaration or processing instruction
            m = _TAG_NAME.match(doc, lt + 1, gt)
        if m is None:
            if not self.in_head:
                self.writer.text("<", self.pre > 0)
            return lt + 1
        closing = m.group(1) == "/"
        name = m.group(2).lower()
        self.pos = gt + 1
        if self.in_head:
            # Only <body> or </head> ends a head; nothing in it is shown.
            if name == "body" or (closing and name == "head"):
                self.in_head = False
            if name != "body":
                return self.pos
        handler = (_END_TAGS if closing else _START_TAGS).get(name)
        if handler is not None:
            handler(self, name, doc[m.end() : gt])
        return self.pos

    def end_link(self) -> None:
        """After a link's label: its URL, unless the label already shows it."""
        if self.link is None:
            return
        href, start = self.link
        self.link = None
        out = self.writer.out
        label = "".join(out[start:]).strip() if len(out) - start < _MAX_LABEL_PIECES else ""
        shown = href[7:] if href.lower().startswith("mailto:") else href
        if shown and shown != label and href != label:
            self.writer.text(f" <{shown}>")


# -- the tag handlers: (reader, tag name, the text after the name) --------------

_Handler = Callable[[_Reader, str, str], None]


def _skip_raw(r: _Reader, name: str, attrs: str) -> None:
    end = _RAW_END[name].search(r.doc, r.pos)
    r.pos = len(r.doc) if end is None else end.end()  # unclosed: the rest is hidden


def _head(r: _Reader, name: str, attrs: str) -> None:
    r.in_head = True


def _br(r: _Reader, name: str, attrs: str) -> None:
    r.writer.br()


def _hr(r: _Reader, name: str, attrs: str) -> None:
    r.writer.block(1)
    r.writer.text("-" * 40)
    r.writer.block(1)


def _li(r: _Reader, name: str, attrs: str) -> None:
    r.writer.block(1)
    r.writer.text("* ")


def _paragraph(r: _Reader, name: str, attrs: str) -> None:
    r.writer.block(2)


def _line(r: _Reader, name: str, attrs: str) -> None:
    r.writer.block(1)


def _pre(r: _Reader, name: str, attrs: str) -> None:
    r.writer.block(2)
    r.pre += 1


def _pre_end(r: _Reader, name: str, attrs: str) -> None:
    r.writer.block(2)
    r.pre = max(0, r.pre - 1)


def _cell(r: _Reader, name: str, attrs: str) -> None:
    r.writer.text(" ")


def _a(r: _Reader, name: str, attrs: str) -> None:
    r.end_link()
    href = CONTROLS.sub("", attributes(attrs).get("href", "")).strip()
    if href.startswith("#") or href.lower().startswith("javascript:") or len(href) > _MAX_HREF:
        href = ""
    r.link = (href, len(r.writer.out))


def _a_end(r: _Reader, name: str, attrs: str) -> None:
    r.end_link()


def _img(r: _Reader, name: str, attrs: str) -> None:
    alt = _WS.sub(" ", attributes(attrs).get("alt", "")).strip()
    if alt:
        r.writer.text(f"[image: {alt}]")


_START_TAGS: dict[str, _Handler] = {
    **dict.fromkeys(_LINES, _line),
    **dict.fromkeys(_PARAGRAPHS, _paragraph),
    **dict.fromkeys(_RAW_END, _skip_raw),
    "head": _head,
    "br": _br,
    "hr": _hr,
    "li": _li,
    "pre": _pre,
    "td": _cell,
    "th": _cell,
    "a": _a,
    "img": _img,
}
_END_TAGS: dict[str, _Handler] = {
    **dict.fromkeys(_LINES, _line),
    **dict.fromkeys(_PARAGRAPHS, _paragraph),
    "pre": _pre_end,
    "a": _a_end,
}


def html_to_text(doc: str) -> str:
    """The text a reader sees in an HTML document, as plain lines."""
    return _Reader(doc).run()
