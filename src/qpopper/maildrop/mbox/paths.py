"""The names of the files qpopper keeps around an mbox spool.

All of them sit in the spool's directory (the temp drop in `temp_dir` if
set), so that separate processes and hosts sharing the directory see the
same ones, and a rename between them stays on one file system.
"""

from __future__ import annotations

import os

from ...errors import MaildropError, ResponseCode
from .._base import MaildropSettings

SESSION_LOCK_SUFFIX = ".qpopper-pop3.lock"
NEW_SPOOL_SUFFIX = ".qpopper-new"
PUTBACK_SUFFIX = ".qpopper-putback"
GATHER_SUFFIX = ".qpopper-gather"
INDEX_SUFFIX = ".qpopper-index"


def session_lock_path(spool: str) -> str:
    """`/var/mail/.alice.qpopper-pop3.lock` for `/var/mail/alice`."""
    directory, name = os.path.split(spool)
    return os.path.join(directory, f".{name}{SESSION_LOCK_SUFFIX}")


def new_spool_path(spool: str) -> str:
    """Where UPDATE writes the replacement spool before renaming it.

    One fixed name per spool is unique among writers because only the
    holder of the session lock writes it; a crash leaves at most this one
    file, which the next session removes.
    """
    directory, name = os.path.split(spool)
    return os.path.join(directory, f".{name}{NEW_SPOOL_SUFFIX}")


def index_cache_path(spool: str) -> str:
    """Where the index of a big spool is kept between sessions (mbox/indexcache.py);
    its replacement is written beside it, with ".new" appended, and renamed over it."""
    directory, name = os.path.split(spool)
    return os.path.join(directory, f".{name}{INDEX_SUFFIX}")


def putback_flag_path(spool: str) -> str:
    """The flag that says a temp drop is being written back to `spool`."""
    directory, name = os.path.split(spool)
    return os.path.join(directory, f".{name}{PUTBACK_SUFFIX}")


def temp_drop_path(spool: str, settings: MaildropSettings) -> str:
    """qpopper's temp drop: `<temp_dir or spool dir>/<temp_name % name>`."""
    directory, name = os.path.split(os.path.abspath(spool))
    template = settings.temp_name
    if template.count("%s") != 1 or "/" in template or "\0" in template:
        raise MaildropError(f"temp-name {template!r} must hold one %s and no slash", ResponseCode.SYS_PERM)
    tname = template.replace("%s", name)
    if tname in (".", "..", name) and not settings.temp_dir:
        raise MaildropError(f"temp-name {template!r} names the spool itself", ResponseCode.SYS_PERM)
    tdir = settings.temp_dir or directory
    if not os.path.isabs(tdir):
        raise MaildropError(f"temp-dir {tdir!r} is not absolute", ResponseCode.SYS_PERM)
    path = os.path.join(os.path.normpath(tdir), tname)
    if path == os.path.abspath(spool):
        raise MaildropError(f"temp drop {path} would be the spool itself", ResponseCode.SYS_PERM)
    return path


def gather_journal_path(temp_drop: str) -> str:
    """The journal of a move from the spool into `temp_drop` (login)."""
    return temp_drop + GATHER_SUFFIX
