"""Reading a stored message whole for XMANGLE, within a bound.

Condensing MIME needs the whole message in memory; messages larger than
MANGLE_MAX_SIZE are sent as stored instead, which keeps memory bounded
and, being decided by the stored size, keeps LIST and RETR consistent.
"""

from __future__ import annotations

from ...maildrop import Maildrop
from ...maildrop._base import size_of
from .spec import MangleSpec

MANGLE_MAX_SIZE = 32 * 1024 * 1024


def too_big_to_mangle(maildrop: Maildrop, index: int) -> bool:
    return size_of(maildrop.messages(), index) > MANGLE_MAX_SIZE


def mangle_message(maildrop: Maildrop, index: int, spec: MangleSpec) -> bytes:
    from .condense import mangle  # loaded by the first session that mangles

    return mangle(b"".join(maildrop.read(index)), spec)
