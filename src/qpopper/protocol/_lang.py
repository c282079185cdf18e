"""LANG (RFC 6856 section 3): the languages of response texts.

Each language is a table from the English text of a status line to its
text in that language; English is the source, so its table is empty, and
a text a table lacks is sent in English. A text with variable parts (a
message number, a user name) is a key with "{}" for each part, and its
translation names them "{0}", "{1}"... in the order they come in the
English, so a language may move them. Adding a language is writing its
table as a module (`_lang_de.py` is one) and naming it in `LANGUAGES`:
the module is read when a client first chooses the language, and the
session translates every status line it sends through the chosen table
(`translate`).

Texts are matched whole, after the "+OK " or "-ERR [CODE] " prefix. The
status line of RETR and TOP and the listings of the XTND extensions are
not translated (their texts are built as effects, not replies).

UTF-8 in replies: a session that has sent neither UTF8 nor LANG gets
ASCII status lines (a UTF-8 user name shows as "?"); after either, the
user names in replies are sent in UTF-8, as RFC 6856 allows
(`utf8_replies`).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ._context import CommandContext
from ._replies import END, err, ok


@dataclass(frozen=True, slots=True)
class Language:
    tag: str  # an RFC 5646 tag
    description: str  # the language's name, in that language (UTF-8 on the wire)
    texts: Mapping[str, str] = field(default_factory=dict)
    # The texts with "{}" parts, as (pattern, translation), longest first.
    patterns: tuple[tuple[re.Pattern[str], str], ...] = ()
    # The module holding TEXTS, read at the first choice of this language.
    module: str | None = None


def language(tag: str, description: str, texts: Mapping[str, str]) -> Language:
    """A Language from a table whose keys may hold "{}" parts."""
    exact = {k: v for k, v in texts.items() if "{}" not in k}
    patterns = tuple(
        (re.compile(re.escape(k).replace(r"\{\}", "(.+?)")), v)
        for k, v in sorted(texts.items(), key=lambda kv: -len(kv[0]))
        if "{}" in k
    )
    # `texts` keeps the whole table: the session asks only whether it is
    # empty, and a key with "{}" never equals a text as sent.
    return Language(tag, description, {**texts, **exact}, patterns)


# The language of a session that has not sent LANG: English, in ASCII.
ENGLISH = Language("en", "English")
# RFC 2277's tag for the server's default, which here is English.
DEFAULT = Language("i-default", "Default language")

LANGUAGES: dict[str, Language] = {
    lang.tag: lang
    for lang in (
        Language("en", "English"),  # chosen with LANG: English, and UTF-8 may follow
        DEFAULT,
        Language("de", "Deutsch", module="qpopper.protocol._lang_de"),
    )
}

# The text of LANG's own success reply, after the tag; translated like any other.
CHANGED = "Language changed."


def _loaded(lang: Language) -> Language:
    """`lang` with its table read (once; the entry is replaced)."""
    if lang.module is None:
        return lang
    table: Mapping[str, str] = importlib.import_module(lang.module).TEXTS
    loaded = language(lang.tag, lang.description, table)
    LANGUAGES[lang.tag] = loaded
    return loaded


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
                return _loaded(lang)
        wanted = wanted.rpartition("-")[0]
    return None


def utf8_replies(ctx: CommandContext) -> bool:
    """Whether this session's status lines may carry UTF-8 (a user name):
    after UTF8 or LANG (RFC 6856 sections 2 and 3)."""
    return ctx.utf8 or ctx.language is not ENGLISH


def utf8_name(ctx: CommandContext) -> bool:
    """Whether the session's user name goes into a reply in UTF-8: a
    non-ASCII name in a session where `utf8_replies` holds."""
    user = ctx.user
    return user is not None and not user.isascii() and utf8_replies(ctx)


def _translated(lang: Language, text: str) -> str | None:
    found = lang.texts.get(text)
    if found is not None:
        return found
    for pattern, translation in lang.patterns:
        match = pattern.fullmatch(text)
        if match is not None:
            return translation.format(*match.groups())
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
    translated = _translated(lang, text.decode("utf-8", "replace"))
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
