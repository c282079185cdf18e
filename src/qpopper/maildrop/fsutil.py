"""File-system durability shared by every writer of mail."""

from __future__ import annotations

import errno
import os

from ..errors import MaildropError


def fsync_dir(directory: str) -> None:
    """Make a rename or unlink durable: the name must survive a power cut.
    File systems that cannot sync a directory (EINVAL) are taken as they are."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise MaildropError(f"cannot open {directory} to fsync it: {exc}") from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise MaildropError(f"fsync of {directory} failed: {exc}") from exc
    finally:
        os.close(fd)


def give_owner(target: int | str, uid: int, gid: int) -> None:
    """chown a file (descriptor) or directory (path) to uid:gid as far as
    we may: without root only the group can change, to one of ours, and
    that is all a session running as the user needs."""
    change = os.fchown if isinstance(target, int) else os.chown
    try:
        change(target, uid, gid)  # type: ignore[arg-type]
    except PermissionError:
        try:
            change(target, -1, gid)  # type: ignore[arg-type]
        except PermissionError:
            pass
