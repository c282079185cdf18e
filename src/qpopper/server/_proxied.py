"""Listeners behind a load balancer: whom to believe, and reading the header.

A listener marked for the PROXY protocol (`--haproxy-listen`) takes
connections only from `haproxy-trusted-networks` (as Dovecot's
haproxy_trusted_networks): a peer outside them is dropped before a byte is
read, so nobody else can name a client address of their choosing. From a
trusted peer the header must arrive within `haproxy-timeout` seconds and be
valid, or the connection is closed; the parser is `proxyheader`. Loaded
only where such a listener is configured.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

from ..errors import ConfigError
from ._stream import PopStream
from .proxyheader import ProxyHeader, ProxyHeaderError, ProxyHeaderReader

_PEEK_SIZE = 512  # past a version 1 line, and most version 2 headers in one peek

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> tuple[Network, ...]:
    """`10.0.0.0/8 192.0.2.7 2001:db8::/32` (spaces or commas): the networks."""
    out = []
    for word in text.replace(",", " ").split():
        try:
            out.append(ipaddress.ip_network(word, strict=False))
        except ValueError as exc:
            raise ConfigError(f"haproxy-trusted-networks: {exc}") from None
    return tuple(out)


@dataclass(frozen=True, slots=True)
class ProxyPolicy:
    """How this server's PROXY listeners treat their peers."""

    trusted: tuple[Network, ...]
    timeout: float
    # TLS the balancer terminated (its SSL TLV says so) counts as TLS for
    # the clear-text password policy.
    tls_is_secure: bool

    def trusts(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:  # "local", "unknown": no network holds them
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted)

    def secure(self, header: ProxyHeader) -> bool:
        """Whether the client's leg to the balancer counts as TLS here."""
        return self.tls_is_secure and header.tls is not None and header.tls.tls


def policy_of(networks: str | None, timeout: float, tls_is_secure: bool) -> ProxyPolicy:
    trusted = parse_networks(networks or "")
    if not trusted:
        raise ConfigError("a PROXY protocol listener needs haproxy-trusted-networks (the balancers' addresses)")
    return ProxyPolicy(trusted, timeout, tls_is_secure)


async def read_from_stream(stream: PopStream, timeout: float) -> ProxyHeader:
    """The header at the start of a stream; bytes after it stay in the stream."""
    reader = ProxyHeaderReader()
    async with asyncio.timeout(timeout):
        while True:
            data = await stream.read(_PEEK_SIZE)
            if not data:
                raise ProxyHeaderError("connection closed before the PROXY header was complete")
            used = reader.feed(data)
            if reader.header is not None:
                if used < len(data):
                    stream.unread(data[used:])
                return reader.header


async def read_from_socket(sock: socket.socket, timeout: float) -> ProxyHeader:
    """The header at the start of an accepted, non-blocking socket, read
    before a TLS handshake: each peek is followed by a receive of exactly
    the header's bytes in it, so the handshake finds its first byte."""
    loop = asyncio.get_running_loop()
    reader = ProxyHeaderReader()
    async with asyncio.timeout(timeout):
        while True:
            await _readable(loop, sock)
            try:
                data = sock.recv(_PEEK_SIZE, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                continue
            if not data:
                raise ProxyHeaderError("connection closed before the PROXY header was complete")
            used = reader.feed(data)
            sock.recv(used)  # those octets are there: they were just peeked
            if reader.header is not None:
                return reader.header


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())
