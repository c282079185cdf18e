"""The KPOP exchange on a connection, before its greeting (qpopper's -k).

The client's three messages (two version strings, then the AP-REQ) are
read here, on the event loop, within one deadline, each bounded; only
then does libkrb5 run, in a worker thread, over the bytes already read
(`auth.kpop.recvauth`), so a client that stalls or sends something else
holds no thread and reaches no C code. Every way it can fail ends in one
log line and a closed connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct

from ..auth.kpop import (
    MAX_AP_REQ_LENGTH,
    MAX_VERSION_LENGTH,
    VERSIONS_OK,
    KpopError,
    KpopIdentity,
    length_prefixed,
    opening_problem,
    recvauth,
)
from ..config.options import Options
from ._services import Peer, Services

log = logging.getLogger("qpopper.session")


class _Refused(Exception):
    """The client's bytes are not a KPOP exchange we take."""


async def _read_exactly(sock: socket.socket, count: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while len(data) < count:
        chunk = await loop.sock_recv(sock, count - len(data))  # never more than asked: the POP lines stay unread
        if not chunk:
            raise _Refused("connection closed during the exchange")
        data += chunk
    return bytes(data)


async def _read_message(sock: socket.socket, limit: int, what: str) -> bytes:
    (length,) = struct.unpack(">I", await _read_exactly(sock, 4))
    if length > limit:
        raise _Refused(f"not a Kerberos exchange ({what} of {length} octets)")
    return await _read_exactly(sock, length)


async def kpop_exchange(sock: socket.socket, peer: Peer, services: Services) -> KpopIdentity | None:
    """Run the exchange on the accepted `sock` (non-blocking); the client's
    identity, or None when it failed (logged; the caller closes)."""
    options: Options = services.options
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(options.login_timeout):
            sendauth = await _read_message(sock, MAX_VERSION_LENGTH, "a version string")
            appl = await _read_message(sock, MAX_VERSION_LENGTH, "a version string")
            problem = opening_problem(sendauth, appl)
            if problem is not None:
                await loop.sock_sendall(sock, problem)
                raise _Refused("not a KPOP client (its version strings are not KPOP's)")
            await loop.sock_sendall(sock, VERSIONS_OK)
            ap_req = await _read_message(sock, MAX_AP_REQ_LENGTH, "an AP-REQ")
            received = length_prefixed(sendauth) + length_prefixed(appl) + length_prefixed(ap_req)
            identity: KpopIdentity | None
            identity, reply, reason = await services.run_blocking(
                recvauth, received, options.kerberos_service, options.hostname, options.kerberos_keytab
            )
            if reply:
                await loop.sock_sendall(sock, reply)
    except TimeoutError:
        log.info("%s: KPOP exchange not finished in %.0f s, connection closed", peer, options.login_timeout)
        return None
    except _Refused as exc:
        log.info("%s: KPOP refused: %s", peer, exc)
        return None
    except KpopError as exc:
        log.error("%s: KPOP failed: %s", peer, exc)
        return None
    except OSError as exc:
        log.info("%s: KPOP exchange: connection lost (%s)", peer, exc.strerror or exc)
        return None
    if identity is None:
        log.info("%s: KPOP authentication failed: %s", peer, reason)
        return None
    log.debug("%s: KPOP authenticated %s", peer, identity.principal)
    return identity
