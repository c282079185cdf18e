"""Where a system user's mbox spool is: qpopper's genpath rules.

* Plain: `<spool-dir>/<user>` (spool-dir is normally /var/mail).
* `home-dir-mail`: `<home>/<value>` (qpopper's sample uses `.mail`); the
  value must stay inside the home directory.
* `hash-spool 1`: one directory letter, 'a' + (sum of the first five or
  fewer bytes of the name, mod 26): `spool/q/user`, as qpopper 4 spreads
  large spools over 26 directories.
* `hash-spool 2`: first character / second character (the first repeated
  for a one-character name): `spool/u/s/user`.

Missing hash directories are created, as qpopper's `check-hash-dir` does,
with the spool directory's mode and (when we may) its owner and group, so
delivery agents can make their dotlocks in them.

The name is validated before it touches a path, and the result is checked
to lie inside the spool (or home) directory, so no caller has to be
trusted to have done either.
"""

from __future__ import annotations

import os
import stat

from ..errors import MaildropError, ResponseCode
from ..usernames import is_valid_username
from .fsutil import give_owner


def hash_dirs(user: str, method: int) -> list[str]:
    """The hash directory components for `user` under `method` (0, 1 or 2)."""
    if method == 0:
        return []
    if method == 1:
        total = sum(user.encode("utf-8")[:5])
        return [chr(ord("a") + total % 26)]
    if method == 2:
        first = user[0]
        second = user[1] if len(user) > 1 else first
        return [first, second]
    raise MaildropError(f"unknown hash-spool method {method!r}", ResponseCode.SYS_PERM)


def _inside(path: str, directory: str) -> bool:
    directory = directory.rstrip("/") or "/"
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def spool_path(
    user: str,
    *,
    spool_dir: str,
    hash_spool: int = 0,
    home_dir_mail: str | None = None,
    home: str | None = None,
    check_hash_dir: bool = True,
) -> str:
    """The absolute path of `user`'s mbox spool, per qpopper's genpath.

    Raises MaildropError (SYS/PERM) for a name or setting that cannot give
    a safe path, and (SYS/TEMP) when a hash directory cannot be created.
    """
    if not is_valid_username(user):
        raise MaildropError(f"refusing to build a spool path for user name {user!r}", ResponseCode.SYS_PERM)
    if home_dir_mail:
        if not home or not os.path.isabs(home):
            raise MaildropError(f"home-dir-mail needs an absolute home directory for {user!r}", ResponseCode.SYS_PERM)
        if os.path.isabs(home_dir_mail):
            raise MaildropError(
                f"home-dir-mail {home_dir_mail!r} must be relative to the home directory", ResponseCode.SYS_PERM
            )
        home_n = os.path.normpath(home)
        path = os.path.normpath(os.path.join(home_n, home_dir_mail))
        if not _inside(path, home_n) or path == home_n:
            raise MaildropError(f"home-dir-mail {home_dir_mail!r} leaves the home directory", ResponseCode.SYS_PERM)
        return path
    if not os.path.isabs(spool_dir):
        raise MaildropError(f"spool directory {spool_dir!r} is not absolute", ResponseCode.SYS_PERM)
    base = os.path.normpath(spool_dir)
    parts = hash_dirs(user, hash_spool)
    directory = os.path.normpath(os.path.join(base, *parts))
    path = os.path.normpath(os.path.join(directory, user))
    if not _inside(path, base) or path == base or os.path.basename(path) != user:
        raise MaildropError(f"spool path for {user!r} leaves {base}", ResponseCode.SYS_PERM)
    if parts and check_hash_dir:
        make_hash_dirs(base, parts)
    return path


def make_hash_dirs(base: str, parts: list[str]) -> None:
    """Create missing hash directories like the spool directory itself."""
    try:
        st = os.stat(base)
    except OSError as exc:
        raise MaildropError(f"cannot stat spool directory {base}: {exc}") from exc
    mode = stat.S_IMODE(st.st_mode)
    current = base
    for part in parts:
        current = os.path.join(current, part)
        if part in (".", ""):
            continue
        try:
            os.mkdir(current, 0o700)
        except FileExistsError:
            if not os.path.isdir(current) or os.path.islink(current):
                raise MaildropError(f"hash directory {current} is not a directory", ResponseCode.SYS_PERM) from None
            continue
        except OSError as exc:
            raise MaildropError(f"cannot create hash directory {current}: {exc}") from exc
        give_owner(current, st.st_uid, st.st_gid)
        os.chmod(current, mode)  # after chown, which clears set-id bits
