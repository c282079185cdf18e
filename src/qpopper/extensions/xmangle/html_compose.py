"""Building the HTML output: text and notes as HTML fragments, and the
message's own HTML document with the other pieces put inside its body.

The regular expressions bound what they scan (a tag's attributes to a few
kB), so a crafted document costs linear time.
"""

from __future__ import annotations

import html
import re

_URL = re.compile(r"\b(?:https?|ftp)://[^\s<>\"'()\[\]{}]+|\bmailto:[^\s<>\"'()\[\]{}]+", re.IGNORECASE)
_BODY_OPEN = re.compile(r"<body\b[^>]{0,4096}>", re.IGNORECASE)
_BODY_CLOSE = re.compile(r"</body\s*>", re.IGNORECASE)
_META = re.compile(r"<meta\b[^>]{0,2048}>", re.IGNORECASE)
_META_CHARSET = re.compile(r"""(charset\s*=\s*["']?)([^"'\s;>/]*)""", re.IGNORECASE)


def text_to_html(text: str) -> str:
    """Plain text escaped, its URLs linked, line breaks kept."""
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


def note_to_html(text: str) -> str:
    """A note (attachment removed, forwarded-message summary) as a paragraph."""
    return "<p>" + "<br>\n".join(html.escape(line, quote=False) for line in text.split("\n")) + "</p>"


def _last_body_close(doc: str, start: int) -> int:
    last = -1
    for m in _BODY_CLOSE.finditer(doc, start):
        last = m.start()
    return last


def html_inner(doc: str) -> str:
    """What is inside a document's <body> (all of it when there is none)."""
    m = _BODY_OPEN.search(doc)
    start = m.end() if m else 0
    end = _last_body_close(doc, start)
    return doc[start : end if end >= 0 else len(doc)].strip("\n")


def html_insert(doc: str, before: list[str], after: list[str]) -> str:
    """``doc`` with fragments put at the start and the end of its body."""
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


def rewrite_meta_charset(doc: str, label: str) -> str:
    """Every ``<meta ... charset=...>`` made to say ``label``."""

    def meta(m: re.Match[str]) -> str:
        return _META_CHARSET.sub(lambda c: c.group(1) + label, m.group(0))

    return _META.sub(meta, doc)
