"""UPDATE and release of a session's maildrop.

Either may run on the event loop when it would only release locks (the
backend says so through `QuickUpdate`), in a worker thread otherwise; both
run with the spool privilege of the login (`Login.privileged`). Kept apart
from the connection because the login step needs the same release (a
maildrop listed again after bulletins) and neither is about the stream.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, cast

from ..maildrop import Maildrop
from ..maildrop._base import QuickUpdate

if TYPE_CHECKING:
    from ._login import Login

log = logging.getLogger("qpopper.session")

_NOTHING: frozenset[int] = frozenset()


@functools.cache
def _can_tell(kind: type) -> bool:
    """A backend class has `writes_nothing`: asked once per class, since a
    Protocol's isinstance walks its members each time (~10 µs a session)."""
    return issubclass(kind, QuickUpdate)


def runs_on_loop(login: Login, maildrop: Maildrop, deleted: AbstractSet[int], retrieved: AbstractSet[int]) -> bool:
    """UPDATE and close would only release locks: done on the loop, without
    suspending (a QUIT then needs no task of its own to shield them)."""
    if login.spool_privilege is not None or not _can_tell(type(maildrop)):
        return False
    return cast(QuickUpdate, maildrop).writes_nothing(deleted, retrieved)


def _commit_and_close(login: Login, maildrop: Maildrop, deleted: AbstractSet[int], retrieved: AbstractSet[int]) -> None:
    """UPDATE, then release the maildrop whatever UPDATE did: one trip
    to a worker thread for both, since each trip costs more CPU than a
    small commit."""
    try:
        login.privileged(maildrop.commit, deleted, retrieved)
    finally:
        try:
            login.privileged(maildrop.close)
        except Exception:
            log.exception("%s: closing the maildrop of %s failed", login.peer, login.session.user)


async def commit(login: Login, maildrop: Maildrop, deleted: AbstractSet[int], retrieved: AbstractSet[int]) -> None:
    """UPDATE and close; raises what the commit raised (the maildrop is
    closed either way)."""
    if runs_on_loop(login, maildrop, deleted, retrieved):
        _commit_and_close(login, maildrop, deleted, retrieved)
    else:
        await login.blocking(_commit_and_close, login, maildrop, deleted, retrieved)


async def close(login: Login, maildrop: Maildrop) -> None:
    """Release it off the loop: in temp-drop mode a session that ends
    without QUIT copies its temp drop back, which takes time. Never raises
    (a failure is logged)."""
    try:
        if runs_on_loop(login, maildrop, _NOTHING, _NOTHING):
            maildrop.close()
        else:
            await asyncio.shield(login.blocking(login.privileged, maildrop.close))
    except Exception:
        log.exception("%s: closing the maildrop of %s failed", login.peer, login.session.user)
