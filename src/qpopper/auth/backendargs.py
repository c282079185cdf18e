"""The user database's own settings file, in Dovecot's format.

`auth-backend-args` names a file written as Dovecot's dovecot-sql.conf.ext
or dovecot-ldap.conf.ext are, so an administrator moving from Dovecot
copies theirs:

    # comment
    driver = pgsql
    connect = host=/run/postgresql dbname=mail user=qpopper
    password_query = SELECT username AS user, password \\
        FROM users WHERE username = '%u'

One `key = value` a line; a line ending in a backslash continues on the
next; a value in double quotes loses them. Each backend says which keys
it knows (an unknown key is an error, as a misspelt one would otherwise
be silently ignored) and reads the values through `BackendArgs`, whose
errors name the file and line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import ConfigError

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class BackendArgs:
    """The settings of one args file: values by key, and where each was set."""

    path: str
    values: dict[str, str] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)

    def where(self, key: str | None = None) -> str:
        line = self.lines.get(key) if key is not None else None
        return f"{self.path}:{line}" if line else self.path

    def error(self, key: str | None, text: str) -> ConfigError:
        where = self.where(key)
        return ConfigError(f"{where}: {text}", where)

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.values.get(key, default)

    def required(self, key: str) -> str:
        value = self.values.get(key)
        if not value:
            raise self.error(None, f"{key} is not set")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.values.get(key)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise self.error(key, f"{key} must be a number, not {value!r}") from None
        if number < 0:
            raise self.error(key, f"{key} must not be negative")
        return number

    def check_keys(self, known: Iterable[str], what: str) -> None:
        """Refuse a key this backend does not know (most often a typo)."""
        allowed = set(known)
        for key in self.values:
            if key not in allowed:
                raise self.error(key, f"{what} has no setting {key!r} (known: {', '.join(sorted(allowed))})")


def parse_backend_args(text: str, path: str) -> BackendArgs:
    args = BackendArgs(path)
    pending = ""
    start = 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if not pending:
            start = lineno
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        line, pending = pending + line, ""
        key, equals, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not equals or not _KEY.match(key):
            raise ConfigError(f"{path}:{start}: expected key = value", f"{path}:{start}")
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if key in args.values:
            where = f"{path}:{start}"
            raise ConfigError(f"{where}: {key} is set twice (first at line {args.lines[key]})", where)
        args.values[key] = value
        args.lines[key] = start
    if pending:
        raise ConfigError(f"{path}:{start}: the file ends inside a continued line", f"{path}:{start}")
    return args


def read_backend_args(path: str) -> BackendArgs:
    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text", path) from None
    except OSError as exc:
        raise ConfigError(f"cannot read auth-backend-args {path}: {exc.strerror}", path) from None
    return parse_backend_args(text, path)
