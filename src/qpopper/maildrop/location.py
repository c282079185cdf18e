"""Maildrop locations: "KIND:PATH" strings built from a per-site template.

A location travels as text (in Options, in a Principal) and is parsed once
where it is used, into a `MaildropLocation`; the kinds are the backends
below, and an unknown one is refused, never taken for one of them.

The template takes Dovecot's variables, so a passwd-file or an SQL table can
name maildrops the way administrators already write them:
%u the login name, %n its local part, %d its domain, %h the home directory,
%% a percent sign, and a leading "~/" for the home directory. The name is
validated again here, before it touches a path, so no caller has to be
trusted to have done it.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import Literal, NamedTuple

from ..errors import MaildropError, ResponseCode, WouldBlock
from ..usernames import is_valid_login_name, is_valid_username
from ._base import Maildrop, MaildropSettings

DEFAULT_LOCATION = "maildir:~/Maildir"
MaildropKind = Literal["maildir", "mbox", "memory"]
KINDS: tuple[MaildropKind, ...] = ("maildir", "mbox", "memory")  # memory: tests (maildrop/memory.py)


class MaildropLocation(NamedTuple):
    """A parsed location: which backend (`kind`) and where (`path`).

    `str()` gives the "KIND:PATH" text back."""

    kind: MaildropKind
    path: str

    @classmethod
    def parse(cls, text: str) -> MaildropLocation:
        """Split "KIND:PATH"; MaildropError (SYS/PERM) for an unknown kind."""
        kind, sep, path = text.partition(":")
        if not sep or kind not in KINDS:
            raise MaildropError(f"unknown maildrop location {text!r}", ResponseCode.SYS_PERM)
        return cls(kind, path)

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}"


# Bounded: a user database may give each user a location of their own
# (a mail column, passwd-file's userdb_mail), and a daemon lives for weeks.
@functools.lru_cache(maxsize=256)
def _split_template(template: str) -> tuple[MaildropKind, tuple[tuple[str, str], ...]]:
    """A template's kind and its path as (literal, variable) pairs, the
    variable a letter or "" after the last literal: worked out once per
    template, not at every login. A "%" that ends the path is a literal."""
    kind, path = MaildropLocation.parse(template)
    parts: list[tuple[str, str]] = []
    literal: list[str] = []
    i = 0
    while i < len(path):
        if path[i] == "%" and i + 1 < len(path):
            parts.append(("".join(literal), path[i + 1]))
            literal = []
            i += 2
        else:
            literal.append(path[i])
            i += 1
    parts.append(("".join(literal), ""))
    return kind, tuple(parts)


def expand_location(template: str, user: str, home: str | None) -> str:
    """The template with %u (user), %n (its local part), %d (domain), %h
    (home) and %% replaced. A name that is not a valid *username* (a UTF-8
    login name, RFC 6856) is refused wherever it would become part of the
    path: only a location that names the mailbox without it takes one."""
    path_safe = is_valid_username(user)
    if not path_safe and not is_valid_login_name(user):
        raise MaildropError(f"refusing to build a path for user name {user!r}", ResponseCode.SYS_PERM)
    kind, parts = _split_template(template)
    local, _, domain = user.partition("@")
    values = {"u": user, "n": local, "d": domain, "%": "%"}
    if home:
        values["h"] = home
    out: list[str] = []
    for literal, key in parts:
        out.append(literal)
        if not key:
            continue
        if key not in values:
            raise MaildropError(f"location {template!r} needs %{key}, which {user!r} lacks", ResponseCode.SYS_PERM)
        if key in "und" and not path_safe:
            raise MaildropError(f"refusing to build a path for user name {user!r}", ResponseCode.SYS_PERM)
        out.append(values[key])
    expanded = "".join(out)
    if expanded.startswith("~/"):
        if not home:
            raise MaildropError(f"location {template!r} needs a home directory", ResponseCode.SYS_PERM)
        expanded = os.path.join(home, expanded[2:])
    if not os.path.isabs(expanded):
        raise MaildropError(f"maildrop path {expanded!r} is not absolute", ResponseCode.SYS_PERM)
    return f"{kind}:{os.path.normpath(expanded)}"


def open_maildrop(
    location: MaildropLocation | str, settings: MaildropSettings | None = None, quick: bool = False
) -> Maildrop:
    """Open and POP-lock the maildrop at an expanded location.

    `quick`: only if that takes a few system calls and no waiting, so it
    may run on the event loop; otherwise WouldBlock, with nothing changed.
    """
    kind, path = location if isinstance(location, MaildropLocation) else MaildropLocation.parse(location)
    if quick and settings is not None and settings.shared_storage and kind in ("maildir", "mbox"):
        # On shared storage (NFS) any system call can wait for the server:
        # that wait belongs in a worker, not on the loop every session shares.
        raise WouldBlock("maildrops on shared storage are opened in a worker")
    if kind == "maildir":
        maildrop: Maildrop = _backend("maildir").MaildirMaildrop(path, quick=quick, settings=settings)
    elif kind == "mbox":
        maildrop = _backend("mbox").MboxMaildrop(path, settings or MaildropSettings(), quick=quick)
    elif kind == "memory":
        maildrop = _backend("memory").open_memory(path)
    else:
        raise MaildropError(f"no backend for maildrop kind {kind!r}", ResponseCode.SYS_PERM)
    return maildrop


@functools.cache
def _backend(kind: MaildropKind) -> ModuleType:
    """The module of a kind's backend, imported when the first maildrop of
    that kind opens (a Maildir site never loads mbox's index and recovery
    code), and kept: an import statement run at every login cost one."""
    return importlib.import_module(f".{kind}", __package__)
