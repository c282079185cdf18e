"""qpopper's log records: the login record (log-login), the statistics
record (-s), the timing record (timing), and the client's host name from
a reverse lookup (-R turns it off).

Every value taken from the peer or the maildrop passes `printable` before
it reaches a log line, and templates are expanded by plain replacement,
never as format strings.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..logtext import printable

if TYPE_CHECKING:
    from ..auth import Principal
    from ..config.options import Options
    from ..protocol import Session

log = logging.getLogger("qpopper.session")

REVERSE_LOOKUP_TIMEOUT = 5.0


def expand_login_template(template: str, user: str, host: str, address: str) -> str:
    """%0 version, %1 user, %2 client host name, %3 client address, %% a %."""
    values = {"0": __version__, "1": printable(user), "2": printable(host), "3": printable(address), "%": "%"}
    out: list[str] = []
    i = 0
    while i < len(template):
        if template[i] == "%" and i + 1 < len(template) and template[i + 1] in values:
            out.append(values[template[i + 1]])
            i += 2
        else:
            out.append(template[i])
            i += 1
    return "".join(out)


def _resolve(address: str) -> tuple[str | None, set[str]]:
    """(name, its addresses), or (None, set()) if the address has no name."""
    try:
        name = socket.getnameinfo((address, 0), socket.NI_NAMEREQD)[0]
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_NONAME:
            return None, set()
        raise
    return name, {str(info[4][0]) for info in socket.getaddrinfo(name, None)}


async def reverse_lookup(address: str, run_blocking: Callable[..., Any]) -> str:
    """The client's host name, forward-confirmed; its address otherwise.

    Bounded in time and run beside the session in a worker thread (the
    system resolver blocks), so a slow resolver never holds up the greeting."""
    try:
        name, addresses = await asyncio.wait_for(run_blocking(_resolve, address), REVERSE_LOOKUP_TIMEOUT)
    except (OSError, TimeoutError, UnicodeError):
        return address
    if name is None:
        # qpopper's manual: a client whose address has no canonical name is warned of.
        log.warning("client address %s has no canonical host name", printable(address))
        return address
    if address not in addresses:
        log.warning(
            "client address %s is not listed for its host name %s", printable(address), printable(name)
        )
        return address
    return str(name)


@dataclass(slots=True)
class SessionTimes:
    """Monotonic marks for the timing record."""

    connected: float = field(default_factory=time.monotonic)
    authenticated: float | None = None
    opened: float | None = None
    finished: float | None = None

    def record(self, user: str, host: str, normal: bool) -> str:
        auth = (self.authenticated or self.connected) - self.connected
        init = (self.opened - self.authenticated) if self.opened and self.authenticated else 0.0
        end = self.finished or time.monotonic()
        clean = end - (self.opened or end)
        state = "normal" if normal else "error"
        return (
            f"(v{__version__}) Timing for {printable(user)}@{printable(host)} ({state}) "
            f"auth={auth:.3f} init={init:.3f} clean={clean:.3f}"
        )


def statistics_record(user: str, stats: tuple[int, int, int, int], host: str, address: str) -> str:
    deleted, deleted_octets, left, left_octets = stats
    return (
        f"Stats: {printable(user)} {deleted} {deleted_octets} {left} {left_octets} "
        f"{printable(host)} {printable(address)}"
    )


class SessionRecords(SessionTimes):
    """One session's share of the records: its timing marks (inherited, so
    a session carries one object for both) and the client's host name,
    asked for only when a record will print it."""

    __slots__ = ("_address", "_host_name", "_run")

    def __init__(self, options: Options, address: str, run_blocking: Callable[..., Any]) -> None:
        super().__init__()
        self._address = address
        self._run = run_blocking
        self._host_name: asyncio.Task[str] | None = None
        # The name only appears in the records that ask for it, so a server
        # that writes none of them asks the resolver nothing.
        wants_name = options.statistics or options.timing or bool(options.log_login)
        if options.reverse_lookup and wants_name and address != "local":
            self._host_name = asyncio.get_running_loop().create_task(reverse_lookup(address, run_blocking))

    def want_host_name(self, options: Options) -> None:
        """Start the lookup now if the session's own options (a user's
        option file switched `statistics` on) need a name the server's
        did not."""
        wants_name = options.statistics or options.timing or bool(options.log_login)
        if self._host_name is None and options.reverse_lookup and wants_name and self._address != "local":
            self._host_name = asyncio.get_running_loop().create_task(reverse_lookup(self._address, self._run))

    async def host_name(self) -> str:
        """The client's name if the reverse lookup confirmed one."""
        if self._host_name is None:
            return self._address
        try:
            return await self._host_name
        except Exception:  # noqa: BLE001 - the name is a courtesy of the records: any failure only costs it
            return self._address

    def cancel_lookup(self) -> None:
        if self._host_name is not None and not self._host_name.done():
            self._host_name.cancel()

    async def write(self, options: Options, principal: Principal | None, session: Session, committed: bool) -> None:
        """The statistics (-s) and timing records of a session that logged in."""
        if principal is None or not (options.statistics or options.timing):
            return
        self.finished = time.monotonic()
        host = await self.host_name()
        if options.statistics:
            deleted, octets, left, left_octets = session.drop_stats()
            if not committed:  # nothing was removed after all
                left, left_octets, deleted, octets = left + deleted, left_octets + octets, 0, 0
            log.info("%s", statistics_record(principal.user, (deleted, octets, left, left_octets), host, self._address))
        if options.timing:
            log.info("%s", self.record(principal.user, host, committed))
