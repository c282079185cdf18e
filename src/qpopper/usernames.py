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
