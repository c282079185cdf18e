"""LANG (RFC 6856 section 3): the languages of response texts.

Each language is a table from the English text of a status line to its
text in that language; English is the source, so its table is empty, and
a text a table lacks is sent in English. Adding a language is adding a
`Language` to `LANGUAGES` with its table: the session translates every
status line it sends through the chosen table (`translate`), and LANG
lists and chooses from `LANGUAGES`.

Texts are matched whole, after the "+OK " or "-ERR [CODE] " prefix; a
table may hold the texts with numbers in them as they are sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ._context import CommandContext
from ._replies import END, err, ok


@dataclass(frozen=True, slots=True)
class Language:
    tag: str  # an RFC 5646 tag
    description: str  # the language's name, in that language (UTF-8 on the wire)
    texts: Mapping[str, str] = field(default_factory=dict)


ENGLISH = Language("en", "English")
# RFC 2277's tag for the server's default, which here is English.
DEFAULT = Language("i-default", "Default language")

LANGUAGES: dict[str, Language] = {lang.tag: lang for lang in (ENGLISH, DEFAULT)}

# The text of LANG's own success reply, after the tag; translated like any other.
CHANGED = "Language changed."


def choose(requested: str) -> Language | None:
    """The language for an RFC 4647 basic range: "*" is the default; a
    tag matches itself or a longer tag it prefixes; failing that, the
    range loses subtags from the end (lookup, RFC 4647 section 3.4)."""
    wanted = requested.lower()
    if wanted == "*":
        return DEFAULT
    while wanted:
        for tag, lang in LANGUAGES.items():
            if tag.lower() == wanted or tag.lower().startswith(wanted + "-"):
                return lang
        wanted = wanted.rpartition("-")[0]
    return None


def translate(lang: Language, reply: bytes) -> bytes:
    """`reply` with its status text in `lang`, if its table has that text."""
    if not lang.texts:
        return reply
    head, sep, rest = reply.partition(b"\r\n")
    status, _, text = head.partition(b" ")
    prefix = b""
    if text.startswith(b"[") and b"] " in text:
        code, _, text = text.partition(b"] ")
        prefix = code + b"] "
    translated = lang.texts.get(text.decode("utf-8", "replace"))
    if translated is None:
        return reply
    return status + b" " + prefix + translated.encode("utf-8") + sep + rest


def cmd_lang(ctx: CommandContext, args: list[bytes], _line: bytes) -> None:
    if not ctx.need_args(args, 0, 1):
        return
    if not args:
        body = "".join(f"{lang.tag} {lang.description}\r\n" for lang in LANGUAGES.values())
        ctx.reply(b"+OK Language listing follows:\r\n" + body.encode("utf-8") + END)
        return
    lang = choose(args[0].decode("ascii"))
    if lang is None:
        ctx.reply(err("Unknown language; LANG without argument lists them."))
        return
    ctx.language = lang
    text = lang.texts.get(CHANGED, CHANGED)
    ctx.reply(b"+OK " + f"{lang.tag} {text}".encode() + b"\r\n")


def cmd_utf8(ctx: CommandContext, args: list[bytes], _line: bytes) -> None:
    """RFC 6856 section 2: UTF-8 mode. Maildrop content is sent as stored
    either way (see docs/migration.md); what changes is that user names and
    passwords must be well-formed UTF-8 and STLS is refused."""
    if not ctx.need_args(args, 0, 0):
        return
    ctx.utf8 = True
    ctx.reply(ok("UTF8 enabled."))
