"""Which login names may ever reach a path, a log line or a reply.

Checked by the protocol core before anything else sees a name, and again
wherever a path is built from one, so that no backend has to trust its
caller. The allow-list covers Unix account names and e-mail style virtual
user names; everything else (slashes, dots that climb, NUL, controls, shell
and format metacharacters) is refused.
"""

from __future__ import annotations

import re

# qpopper's MAXUSERNAMELEN is 64 characters.
USERNAME_MAX_LEN = 64

_USERNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@+=-]{0,63}")


def is_valid_username(name: str) -> bool:
    return _USERNAME.fullmatch(name) is not None and ".." not in name


# ASCII characters a UTF-8 login name may hold: the same as in ASCII names.
_NAME_ASCII = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._@+=-")


def is_valid_login_name(name: str) -> bool:
    """A name the protocol may accept (RFC 6856 UTF-8 names included).

    An ASCII name follows `is_valid_username`. A UTF-8 name (already
    prepared by `auth.i18n`) holds no ASCII beyond that allow-list and no
    "..", but it is still not a valid *username* for paths: every place
    that builds a path from a name checks `is_valid_username`, so a UTF-8
    name works only where the account's mailbox is named without it (a
    passwd-file's own userdb_mail or home), never as a path component.
    """
    if name.isascii():
        return is_valid_username(name)
    if not name or len(name) > USERNAME_MAX_LEN or ".." in name or name[0] in ".-+=@":
        return False
    return all(ch in _NAME_ASCII or (not ch.isascii() and ch.isprintable() and not ch.isspace()) for ch in name)
