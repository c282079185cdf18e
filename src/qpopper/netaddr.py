"""Peer addresses as the socket reports them, read without `ipaddress`.

The daemon looks at every peer's address (the clear-text password policy
asks "loopback?", DRAC wants the IPv4 octets); the stdlib's ipaddress
module would answer too but costs ~0.35 MB that a daemon holding
thousands of sessions keeps for its whole life. inet_pton accepts exactly
the textual forms getpeername produces.
"""

from __future__ import annotations

import socket

_V4_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:a.b.c.d on a dual-stack socket
_V6_LOOPBACK = bytes(15) + b"\x01"


def _ipv6_octets(address: str) -> bytes | None:
    try:
        return socket.inet_pton(socket.AF_INET6, address.partition("%")[0])
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return None


def ipv4_octets(address: str) -> bytes | None:
    """The four octets of an IPv4 address, also when a dual-stack socket
    shows it as ::ffff:a.b.c.d; None for any other address."""
    try:
        return socket.inet_pton(socket.AF_INET, address)
    except (OSError, ValueError):
        pass
    packed = _ipv6_octets(address)
    if packed is not None and packed[:12] == _V4_MAPPED:
        return packed[12:]
    return None


def is_loopback(address: str) -> bool:
    """127.0.0.0/8 (plain or IPv4-mapped) or ::1."""
    v4 = ipv4_octets(address)
    if v4 is not None:
        return v4[0] == 127
    return _ipv6_octets(address) == _V6_LOOPBACK
