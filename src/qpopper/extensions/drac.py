"""DRAC, Dynamic Relay Authorization Control: after a POP login, tell the
DRAC daemon the client's address so that the site's SMTP server relays for
it for a while (qpopper's `-D drac-host`).

The protocol is ONC RPC (RFC 5531) over UDP: program 900101, version 1,
procedure 1 (DRACPROC_ADD) taking the IPv4 address as one XDR unsigned int
and answering an addstat enum (0 success, 1 permission denied, 2 system
error, 3 unknown). The daemon's port comes from the portmapper (rpcbind,
program 100000 version 2, PMAPPROC_GETPORT). XDR here is a few struct
calls: the stdlib's xdrlib is deprecated.
"""

from __future__ import annotations

import os
import socket
import struct

from ..netaddr import ipv4_octets

DRAC_PROGRAM = 900101
DRAC_VERSION = 1
DRACPROC_ADD = 1
PMAP_PROGRAM = 100000
PMAP_VERSION = 2
PMAPPROC_GETPORT = 3
PMAP_PORT = 111
IPPROTO_UDP = 17

ADD_STATUS = {0: "success", 1: "permission denied", 2: "system error", 3: "unknown"}


class RpcError(Exception):
    pass


def call_message(xid: int, program: int, version: int, procedure: int, args: bytes) -> bytes:
    """An RPC CALL with AUTH_NONE credentials and verifier."""
    return struct.pack(">IIIIII", xid, 0, 2, program, version, procedure) + struct.pack(">IIII", 0, 0, 0, 0) + args


def parse_reply(xid: int, data: bytes) -> bytes:
    """The result bytes of an accepted, successful reply to `xid`."""
    if len(data) < 12:
        raise RpcError("short RPC reply")
    rxid, mtype, reply_stat = struct.unpack(">III", data[:12])
    if rxid != xid or mtype != 1:
        raise RpcError("not our reply")
    if reply_stat != 0:
        raise RpcError("RPC call denied")
    _flavor, length = struct.unpack(">II", data[12:20])
    offset = 20 + ((length + 3) & ~3)
    (accept_stat,) = struct.unpack(">I", data[offset : offset + 4])
    if accept_stat != 0:
        raise RpcError(f"RPC call not accepted (status {accept_stat})")
    return data[offset + 4 :]


def rpc_call(host: str, port: int, program: int, version: int, procedure: int, args: bytes, timeout: float) -> bytes:
    xid = int.from_bytes(os.urandom(4), "big")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(call_message(xid, program, version, procedure, args), (host, port))
        while True:
            data, _ = sock.recvfrom(8192)
            try:
                return parse_reply(xid, data)
            except RpcError as exc:
                if str(exc) != "not our reply":
                    raise


def drac_port(host: str, timeout: float) -> int:
    args = struct.pack(">IIII", DRAC_PROGRAM, DRAC_VERSION, IPPROTO_UDP, 0)
    result = rpc_call(host, PMAP_PORT, PMAP_PROGRAM, PMAP_VERSION, PMAPPROC_GETPORT, args, timeout)
    (port,) = struct.unpack(">I", result[:4])
    if port == 0:
        raise RpcError(f"no DRAC daemon registered with the portmapper on {host}")
    return int(port)


def drac_add(host: str, client_address: str, timeout: float = 2.0) -> str:
    """Register `client_address` with the DRAC daemon; returns its status
    word. Raises RpcError or OSError when the daemon cannot be reached."""
    args = ipv4_octets(client_address)
    if args is None:
        raise RpcError("DRAC knows IPv4 addresses only")
    result = rpc_call(host, drac_port(host, timeout), DRAC_PROGRAM, DRAC_VERSION, DRACPROC_ADD, args, timeout)
    (status,) = struct.unpack(">I", result[:4])
    return ADD_STATUS.get(status, f"status {status}")
