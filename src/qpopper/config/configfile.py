"""qpopper's configuration file grammar, for -f files and user option files.

    # comment
    set debug                    # a Boolean alone means true
    reset update-on-abort        # false
    set timeout = 600
    set spool-dir = "/var/mail"  # "...", '...' or `...`; \\" escapes a quote
    set config-file = /etc/qpopper/more.conf

Deliberate differences from qpopper, each a fix of a trap: a last line
without a newline is accepted; an error names file:line and what was
expected, and a start-up file with an error stops the server instead of
silently skipping the rest of the file. In the per-user option files a
refused or broken line is logged and skipped, and the rest still applies,
because a user's file must never cost them their login.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError
from .settings import Kind, Restriction, Setting, lookup

log = logging.getLogger("qpopper.config")

# qpopper reads lines into a 1024-byte buffer.
MAX_LINE = 1024
MAX_DEPTH = 100
_QUOTES = "\"'`"


class Context(enum.Enum):
    INIT = "start-up file"
    USER = "user option file"  # ~/.qpopper-options (-u)
    SPOOL = "spool option file"  # <spool-dir>/.<user>.qpopper-options (-U)


@dataclass(frozen=True, slots=True)
class Assignment:
    setting: Setting
    value: object
    source: str  # "file:line"


def _tokens(line: str) -> list[str]:
    """qpopper's tokens: runs of alphanumerics and '-'; any other
    non-blank character alone; quoted strings whole (with their quotes)."""
    out: list[str] = []
    i = 0
    n = len(line)
    while i < n:
        ch = line[i]
        if ch in " \t\r":
            i += 1
        elif ch == "#":
            out.append(line[i:])  # the comment, kept whole
            break
        elif ch in _QUOTES:
            j = i + 1
            text = []
            while j < n and line[j] != ch:
                if line[j] == "\\" and j + 1 < n and line[j + 1] in _QUOTES + "\\":
                    j += 1
                text.append(line[j])
                j += 1
            if j >= n:
                raise ValueError("unterminated quoted string")
            out.append(ch + "".join(text) + ch)
            i = j + 1
        elif ch.isalnum() or ch == "-":
            j = i
            while j < n and (line[j].isalnum() or line[j] == "-"):
                j += 1
            out.append(line[i:j])
            i = j
        else:
            out.append(ch)
            i += 1
    return out


def _value_text(line: str) -> tuple[str, str]:
    """Split `line` (what follows '=') into the value and the rest."""
    stripped = line.lstrip(" \t")
    if not stripped:
        raise ValueError("expected a value after '='")
    quote = stripped[0]
    if quote in _QUOTES:
        chars: list[str] = []
        j = 1
        while j < len(stripped) and stripped[j] != quote:
            if stripped[j] == "\\" and j + 1 < len(stripped) and stripped[j + 1] in _QUOTES + "\\":
                j += 1
            chars.append(stripped[j])
            j += 1
        if j >= len(stripped):
            raise ValueError("unterminated quoted string")
        return "".join(chars), stripped[j + 1 :]
    end = 0
    while end < len(stripped) and stripped[end] not in " \t\r#":
        end += 1
    return stripped[:end], stripped[end:]


def parse_line(line: str) -> tuple[str, str, str | None] | None:
    """One line -> (verb, option name, value text or None); None if blank.

    Raises ValueError with a message saying what was expected.
    """
    body = line.lstrip(" \t").rstrip("\r\n")
    if not body or body.startswith("#"):
        return None
    tokens = _tokens(body)
    verb = tokens[0].lower()
    if verb not in ("set", "reset"):
        raise ValueError(f"expected 'set' or 'reset', found {tokens[0]!r}")
    if len(tokens) < 2 or not (tokens[1][0].isalnum() or tokens[1][0] == "-"):
        raise ValueError(f"expected an option name after '{verb}'")
    name = tokens[1]
    rest_tokens = tokens[2:]
    if not rest_tokens or rest_tokens[0].startswith("#"):
        return verb, name, None
    if verb == "reset" or rest_tokens[0] != "=":
        raise ValueError("expected '=' and a value, a comment or the end of the line")
    after_equals = body.split("=", 1)[1]
    value, rest = _value_text(after_equals)
    rest = rest.strip(" \t\r")
    if rest and not rest.startswith("#"):
        raise ValueError("expected a comment or the end of the line after the value")
    return verb, name, value


def _allowed(setting: Setting, context: Context) -> bool:
    if context is Context.INIT:
        return True
    return setting.restriction is Restriction.NONE


def read_config(
    path: str,
    context: Context = Context.INIT,
    *,
    opener: Callable[[str], str] | None = None,
    problems: list[ConfigError] | None = None,
    _depth: int = 0,
    _seen: tuple[str, ...] = (),
) -> list[Assignment]:
    """Parse one file (and the files it includes) into assignments.

    In INIT context the first error raises ConfigError naming file:line,
    unless `problems` is given: then every error is appended to it and the
    parse goes on (`--check-config` reports them all). In the user contexts
    errors and refused options are logged and skipped. `opener` reads a
    file's text (the server passes one that opens user files as the user);
    by default the file is read directly.
    """
    if _depth >= MAX_DEPTH:
        raise ConfigError(f"{path}: config-file includes nested more than {MAX_DEPTH} deep")
    real = os.path.realpath(path)
    if real in _seen:
        raise ConfigError(f"{path}: config-file includes itself")
    try:
        text = opener(path) if opener is not None else _read_text(path)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    out: list[Assignment] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        where = f"{path}:{lineno}"
        try:
            out.extend(_line(line, where, context, opener, problems, _depth, (*_seen, real)))
        except ConfigError as exc:
            if context is Context.INIT and problems is None:
                raise
            if problems is not None:
                problems.append(exc)
            else:
                log.warning("%s: ignored: %s", context.value, exc)
    return out


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _line(
    line: str,
    where: str,
    context: Context,
    opener: Callable[[str], str] | None,
    problems: list[ConfigError] | None,
    depth: int,
    seen: tuple[str, ...],
) -> list[Assignment]:
    if len(line.encode("utf-8", "surrogateescape")) >= MAX_LINE:
        raise ConfigError(f"{where}: line too long (at most {MAX_LINE - 1} characters)")
    try:
        parsed = parse_line(line)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if parsed is None:
        return []
    verb, name, value = parsed
    setting = lookup(name)
    if setting is None:
        raise ConfigError(f"{where}: unknown option {name!r}")
    if not _allowed(setting, context):
        raise ConfigError(f"{where}: option {setting.name} is not allowed in a {context.value}")
    if setting.name == "config-file":
        if value is None:
            raise ConfigError(f"{where}: config-file needs '= path'")
        return read_config(value, context, opener=opener, problems=problems, _depth=depth + 1, _seen=seen)
    if value is None:
        if setting.kind is not Kind.BOOL:
            raise ConfigError(f"{where}: option {setting.name} needs '= value'")
        return [Assignment(setting, verb == "set", where)]
    return [Assignment(setting, setting.parse(value, where), where)]
