"""Reading body and header bytes as text, whatever their label claims.

The rules (which label is trusted, what is guessed, what the output is
labelled) are in `condense`'s docstring, under "Charsets".  Nothing here
raises on bad bytes: decoding always ends with some text.
"""

from __future__ import annotations

import re

from .spec import codec_name

_TOKEN_LABEL = re.compile(r"[a-z0-9][a-z0-9._+-]{0,39}")
_MIME_NAMES = {"utf-8": "utf-8", "ascii": "us-ascii", "cp932": "shift_jis", "gb18030": "gb18030"}
_C1_BYTES = re.compile(rb"[\x80-\x9f]")

# Control characters that decoding may produce and that must not reach a
# header line or a link (an encoded CR/LF would start a new header field).
CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")


def mime_name(label: str, codec: str) -> str:
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
    """Latin-1 unless C1 bytes say windows-1252 (what browsers do)."""
    if _C1_BYTES.search(data) is None:
        return data.decode("latin-1"), "iso-8859-1", "iso8859-1"
    try:
        return data.decode("cp1252"), "windows-1252", "cp1252"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "iso-8859-1", "iso8859-1"


def _guess(data: bytes) -> tuple[str, str, str]:
    """No usable label: US-ASCII, else UTF-8, else an 8-bit guess."""
    if data.isascii():
        return data.decode("ascii"), "us-ascii", "ascii"
    try:
        return data.decode("utf-8"), "utf-8", "utf-8"
    except UnicodeDecodeError:
        return _guess_8bit(data)


def _decode_failed(data: bytes, label: str, codec: str) -> tuple[str, str, str]:
    """The declared codec refused the bytes: the usual mislabellings first,
    then the declared codec with U+FFFD for what it cannot read."""
    if codec.startswith("utf"):
        return _guess_8bit(data)
    try:
        return data.decode("utf-8"), "utf-8", "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        return data.decode(codec, "replace"), mime_name(label, codec), codec
    except UnicodeError:
        return _guess_8bit(data)


def decode_text(data: bytes, label: str | None) -> tuple[str, str, str]:
    """Decode body bytes: (text, MIME label, codec).  Never raises."""
    codec = codec_name(label) if label else None
    if codec is None or codec == "ascii":
        return _guess(data)
    assert label is not None
    if codec == "iso8859-1":
        if _C1_BYTES.search(data) is None:
            return data.decode("latin-1"), mime_name(label, codec), codec
        return _guess_8bit(data)
    try:
        return data.decode(codec), mime_name(label, codec), codec
    except UnicodeError:
        return _decode_failed(data, label, codec)


def as_text(value: str) -> str:
    """A header or parameter value from compat32 (raw 8-bit bytes kept as
    surrogate escapes) as proper text."""
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeError:
        return value.encode("utf-8", "replace").decode("utf-8")
    return decode_text(raw, None)[0]
