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
from typing import Any

from .._version import __version__
from ..logtext import printable

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


def _resolve(address: str) -> tuple[str, set[str]]:
    name = socket.getnameinfo((address, 0), socket.NI_NAMEREQD)[0]
    return name, {str(info[4][0]) for info in socket.getaddrinfo(name, None)}


async def reverse_lookup(address: str, run_blocking: Callable[..., Any]) -> str:
    """The client's host name, forward-confirmed; its address otherwise.

    Bounded in time and run beside the session in a worker thread (the
    system resolver blocks), so a slow resolver never holds up the greeting."""
    try:
        name, addresses = await asyncio.wait_for(run_blocking(_resolve, address), REVERSE_LOOKUP_TIMEOUT)
    except (OSError, TimeoutError, UnicodeError):
        return address
    if address not in addresses:
        log.warning(
            "client address %s is not listed for its host name %s", printable(address), printable(name)
        )
        return address
    return str(name)


@dataclass
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
