"""XMANGLE's argument: what a client may ask a message to be condensed into.

Split from the mangler (`condense` and the modules it uses) because the protocol core parses the
modifier on every RETR, TOP and LIST argument and keeps the spec type,
while the mangler itself, with its MIME walking and HTML tables, is needed
only once a client actually asks for XMANGLE or logs in with -no-mime;
a daemon that never mangles does not load it (a few hundred kB per process).
The grammar is documented in `condense`.
"""

from __future__ import annotations

import codecs
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

CAPABILITY = "X-MANGLE"
MAX_ARGUMENT_LENGTH = 200
MAX_HEADERS = 50

_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]{1,76}")
_LABEL = re.compile(r"[a-z0-9][a-z0-9._:+()-]{0,39}")

_CODEC_ALIASES = {
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "cn-gb": "gb18030",
    "euc-cn": "gb18030",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "x-sjis": "cp932",
    "sjis": "cp932",
    "windows-874": "cp874",
    "tis-620": "cp874",
    "iso-8859-8-i": "iso8859-8",
    "iso-8859-6-i": "iso8859-6",
    "x-mac-roman": "mac-roman",
    "unicode-1-1-utf-8": "utf-8",
    "x-unicode20utf8": "utf-8",
}
# Codecs that are "text encodings" to Python but no charset a mail uses, or
# that are slow or surprising on hostile input.
_REFUSED_CODECS = frozenset(
    {
        "idna", "punycode", "raw-unicode-escape", "unicode-escape", "undefined",
        "charmap", "mbcs", "oem",
    }
)
_ASCII_PROBE = "Aa09 \t\n!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


@functools.lru_cache(maxsize=256)
def codec_name(label: str) -> str | None:
    """Python codec name for a charset label, or None when unusable."""
    label = label.strip().strip("\"'").lower()
    if _LABEL.fullmatch(label) is None:
        return None
    try:
        info = codecs.lookup(_CODEC_ALIASES.get(label, label))
    except (LookupError, ValueError, TypeError):
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name in _REFUSED_CODECS:
        return None
    return info.name


@functools.lru_cache(maxsize=256)
def ascii_compatible(codec: str) -> bool:
    """Whether ``codec`` writes ASCII text as ASCII bytes (so header lines
    and markup stay readable)."""
    try:
        return _ASCII_PROBE.encode(codec) == _ASCII_PROBE.encode("ascii")
    except (UnicodeError, LookupError):  # a codec that cannot write ASCII, or no codec
        return False


def check_output_charset(label: str) -> str:
    if not isinstance(label, str):
        raise ValueError("XMANGLE charset must be a string")
    codec = codec_name(label)
    if codec is None:
        raise ValueError(f"XMANGLE charset {label!r} is not a known charset")
    if not ascii_compatible(codec):
        raise ValueError(f"XMANGLE charset {label!r} is not ASCII-compatible")
    return label.strip().strip("\"'").lower()


# --------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------


def _normalise_header_names(names: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for raw in names:
        if not isinstance(raw, str):
            raise ValueError("XMANGLE header names must be strings")
        name = raw.strip()
        if name.endswith(":"):
            name = name[:-1].rstrip()
        if not name:
            continue
        if _FIELD_NAME.fullmatch(name) is None:
            raise ValueError(f"XMANGLE header name {raw!r} is not a valid field name")
        name = name.lower()
        if name not in out:
            out.append(name)
    if len(out) > MAX_HEADERS:
        raise ValueError(f"XMANGLE lists more than {MAX_HEADERS} header names")
    return tuple(out)


@dataclass(frozen=True)
class MangleSpec:
    """What to condense a message into.

    ``text``: ``"plain"`` or ``"html"``; ``charset``: output charset label, or
    None for the message's own (UTF-8 when its parts differ); ``headers``:
    lower-case field names to keep, or None to keep all.  Values are
    normalised on construction (``text="HTML"``, ``headers=("To:",)`` are
    accepted) and validated (``ValueError``), so equal specs compare and hash
    equal.
    """

    text: str = "plain"
    charset: str | None = None
    headers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise ValueError("XMANGLE text must be 'plain' or 'html'")
        text = self.text.strip().lower()
        text = text.removeprefix("text/")
        if text not in ("plain", "html"):
            raise ValueError(f"XMANGLE text must be 'plain' or 'html', not {self.text!r}")
        object.__setattr__(self, "text", text)
        if self.charset is not None:
            object.__setattr__(self, "charset", check_output_charset(self.charset))
        if self.headers is not None:
            object.__setattr__(self, "headers", _normalise_header_names(self.headers))


NO_MIME = MangleSpec()
"""What the ``-no-mime`` user-name suffix asks for: everything as text/plain,
every header kept, the message's own charset."""


def parse_xmangle(argument: str) -> MangleSpec:
    """Parse the text inside ``XMANGLE(...)``, e.g.
    ``"text=html;headers=to:,cc:,from:,date:"``."""
    if not isinstance(argument, str):
        raise ValueError("XMANGLE argument must be a string")
    if len(argument) > MAX_ARGUMENT_LENGTH:
        raise ValueError(f"XMANGLE argument is longer than {MAX_ARGUMENT_LENGTH} characters")
    if not argument.isascii() or not argument.isprintable():
        raise ValueError("XMANGLE argument must be printable ASCII")
    seen: set[str] = set()
    text = "plain"
    charset: str | None = None
    headers: tuple[str, ...] | None = None
    for item in argument.split(";"):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        value = value.strip()
        if not sep:
            raise ValueError(f"XMANGLE parameter {item!r} has no '=value'")
        if key in seen:
            raise ValueError(f"XMANGLE parameter {key!r} given twice")
        seen.add(key)
        if key == "text":
            text = value
        elif key == "charset":
            if not value:
                raise ValueError("XMANGLE charset is empty")
            charset = value
        elif key == "headers":
            names = value.split(",")
            if len(names) > MAX_HEADERS:
                raise ValueError(f"XMANGLE lists more than {MAX_HEADERS} header names")
            headers = _normalise_header_names(names)
        else:
            raise ValueError(
                f"unknown XMANGLE parameter {key!r} (expected text, charset or headers)"
            )
    return MangleSpec(text=text, charset=charset, headers=headers)


def parse_modifier(word: str) -> MangleSpec | None:
    """``"XMANGLE(text=html)"`` -> spec; a bare ``"XMANGLE"`` -> the default
    spec; a word that is not XMANGLE -> None.  A malformed XMANGLE word
    raises ``ValueError``."""
    if word[:7].upper() != "XMANGLE":
        return None
    rest = word[7:]
    if not rest:
        return MangleSpec()
    if not (rest.startswith("(") and rest.endswith(")")):
        raise ValueError("XMANGLE modifier must be XMANGLE(...)")
    return parse_xmangle(rest[1:-1])
