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
