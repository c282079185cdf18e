"""Dropping from root to the user before anything of theirs is opened.

In system-users mode each session runs in its own process. Once the user
is authenticated that process takes the user's uid, primary group and
supplementary groups for good (initgroups, setresgid, setresuid), so it
can reach nothing the user could not.

An mbox spool directory such as Debian's /var/mail (root:mail 2775) only
lets the `mail` group create the lock files and the replacement spool
that safe spool handling needs. Like Dovecot's mail_privileged_group, the
session keeps that group as its *saved* group id only, and makes it the
effective group just while it opens (indexes and locks) and commits the
spool. While it answers the client's commands it holds no group the user
does not have, so it cannot open another user's spool.
"""

from __future__ import annotations

import grp
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from ..auth import Principal
from ..errors import MaildropError, ResponseCode
from ..maildrop.location import MaildropLocation

log = logging.getLogger("qpopper.session")

# qpopper's umask: files it creates are never world-accessible.
SESSION_UMASK = 0o007


def _spool_group(mail_location: str) -> int | None:
    """The group that grants write access to an mbox spool's directory,
    if the directory is group-writable."""
    fmt, path = MaildropLocation.parse(mail_location)
    if fmt != "mbox":
        return None
    try:
        st = os.stat(os.path.dirname(path))
    except OSError:
        return None
    if st.st_mode & stat.S_IWGRP and st.st_gid != 0:
        return st.st_gid
    return None


class SpoolPrivilege:
    """The spool directory's group, made effective only on request."""

    def __init__(self, user_gid: int, spool_gid: int | None) -> None:
        self.user_gid = user_gid
        self.spool_gid = spool_gid

    @contextmanager
    def effective(self) -> Iterator[None]:
        if self.spool_gid is None:
            yield
            return
        os.setegid(self.spool_gid)
        try:
            yield
        finally:
            os.setegid(self.user_gid)


# Modules a session may import lazily, loaded while the process can still
# read every file of the installation (a Python under /root, say).
_PRELOAD = (
    "qpopper.maildrop.mbox",
    "qpopper.maildrop.maildir",
    "qpopper.auth.sasl",
    "encodings.unicode_escape",
    "encodings.idna",
    "encodings.ascii",
    "pam",
)


def preload_session_modules() -> None:
    _preload()
    # The name-service modules initgroups will use (nsswitch's group sources, such as
    # libnss_systemd): loaded once here rather than dlopened by every session process.
    try:
        os.getgrouplist("root", 0)
    except OSError:
        pass


def _preload() -> None:
    import importlib

    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # optional (pam without libpam): the session says so later
            pass


def drop_to_user(principal: Principal) -> SpoolPrivilege:
    """Become the user for the rest of this process. Raises MaildropError
    (SYS/PERM) if the switch cannot be completed: never serve as root."""
    _preload()
    if principal.uid is None or principal.gid is None:
        raise MaildropError(f"no uid/gid for {principal.user}", ResponseCode.SYS_PERM)
    uid, gid = principal.uid, principal.gid
    mail_gid = _spool_group(principal.mail)
    try:
        os.initgroups(principal.user, gid)
        if mail_gid is not None and (mail_gid == gid or mail_gid in os.getgroups()):
            mail_gid = None  # the user has the group anyway
        os.setresgid(gid, gid, gid if mail_gid is None else mail_gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise MaildropError(f"cannot switch to {principal.user}: {exc}", ResponseCode.SYS_PERM) from exc
    if os.geteuid() != uid or os.getuid() != uid or os.getegid() != gid or 0 in os.getresgid()[:2]:
        raise MaildropError(f"switching to {principal.user} did not take", ResponseCode.SYS_PERM)
    os.umask(SESSION_UMASK)
    if mail_gid is not None:
        log.debug("%s may use group %s for spool locking", principal.user, _group_name(mail_gid))
    return SpoolPrivilege(gid, mail_gid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def check_spool(principal: Principal) -> None:
    """Refuse an mbox spool that is not plainly the user's own file: a
    symlink, a hard link (a second name for someone else's file), or a file
    of another owner. A missing spool is fine (nothing has arrived yet)."""
    fmt, path = MaildropLocation.parse(principal.mail)
    if fmt != "mbox":
        return
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise MaildropError(f"cannot check {path}: {exc.strerror}", ResponseCode.SYS_TEMP) from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise MaildropError(f"{path} is not a regular file", ResponseCode.SYS_PERM)
    if st.st_nlink != 1:
        raise MaildropError(f"{path} has {st.st_nlink} links", ResponseCode.SYS_PERM)
    if principal.uid is not None and st.st_uid != principal.uid:
        raise MaildropError(f"{path} belongs to uid {st.st_uid}, not {principal.user}", ResponseCode.SYS_PERM)
