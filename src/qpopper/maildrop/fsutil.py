"""File-system steps shared by every writer of mail: durable renames,
owners and modes of replacement files, removal, safe opening, free space."""

from __future__ import annotations

import errno
import os
import stat

from ..errors import MaildropError, ResponseCode


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


def copy_owner_and_mode(fd: int, st: os.stat_result) -> None:
    """Give a replacement file the old one's owner, group and permissions.

    Without root only the group can change (to one we belong to); that is
    all a user-run session needs, since the file is already its own. The
    mode is set after the owner because chown clears set-id bits.
    """
    give_owner(fd, st.st_uid, st.st_gid)
    os.fchmod(fd, stat.S_IMODE(st.st_mode))


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def unlink(path: str) -> None:
    """Remove a file; a missing one is fine, any other failure is MaildropError."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise MaildropError(f"cannot remove {path}: {exc}") from exc


def unlink_quietly(path: str) -> None:
    """Remove a file we can do without (a leftover the next session removes)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def open_regular(path: str) -> int | None:
    """A read-only descriptor of a plain file with one name, None if missing.

    Never through a symbolic link; a special file or a second name for a
    file (maybe someone else's, planted here) is refused with SYS/PERM."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        code = ResponseCode.SYS_PERM if exc.errno == errno.ELOOP else ResponseCode.SYS_TEMP
        raise MaildropError(f"cannot open {path}: {exc}", code) from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise MaildropError(f"{path} is not a regular file", ResponseCode.SYS_PERM)
    if st.st_nlink != 1:
        os.close(fd)
        raise MaildropError(f"{path} has {st.st_nlink} links", ResponseCode.SYS_PERM)
    return fd


def check_space(directory: str, needed: int, margin: int) -> None:
    """Refuse (MaildropError) unless `needed` bytes plus `margin` are free."""
    try:
        vfs = os.statvfs(directory)
    except OSError as exc:
        raise MaildropError(f"cannot statvfs {directory}: {exc}") from exc
    available = vfs.f_bavail * vfs.f_frsize
    if available < needed + margin:
        raise MaildropError(f"not enough space in {directory}: need {needed}, have {available}")
