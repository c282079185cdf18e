"""The PROXY protocol header (HAProxy's versions 1 and 2), parsed without I/O.

A load balancer that speaks the PROXY protocol sends one header before the
client's first byte, saying who the client is. This module only turns bytes
into a `ProxyHeader`; reading them from a socket within a deadline, and
deciding whom to believe, is `_proxied`'s job. It never consumes a byte past
the header: `ProxyHeaderReader.feed` says how many of the bytes it was given
were the header's, so the rest (a pipelined command, a TLS ClientHello) goes
on to the session untouched.

Everything that does not match the specification exactly is refused with a
`ProxyHeaderError` naming what was wrong: the specification asks the
receiver to abort such a connection, and a lenient parser here would let a
confused sender put any address it likes into our logs and policies.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # "PROXY UNKNOWN <39> <39> 65535 65535\r\n"
_V2_FIXED = 16  # signature, version and command, family and transport, length

# Version 2's address blocks, by family nibble: (name, socket family, block size).
_INET, _INET6, _UNIX = 1, 2, 3
_V2_ADDRESS_SIZE = {0: 0, _INET: 12, _INET6: 36, _UNIX: 216}
_STREAM = 1

# TLV types this server reads (the others are kept, uninterpreted).
TLV_ALPN = 0x01
TLV_AUTHORITY = 0x02
TLV_CRC32C = 0x03
TLV_NOOP = 0x04
TLV_UNIQUE_ID = 0x05
TLV_SSL = 0x20
TLV_NETNS = 0x30
SSL_SUB_VERSION = 0x21
SSL_SUB_CN = 0x22
SSL_SUB_CIPHER = 0x23
CLIENT_SSL = 0x01  # bits of the SSL TLV's first byte
CLIENT_CERT_CONN = 0x02
CLIENT_CERT_SESS = 0x04


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY header; the text says why."""


@dataclass(frozen=True, slots=True)
class TlsAtBalancer:
    """What the balancer says about a TLS session it terminated (the SSL TLV)."""

    client_flags: int
    verified: bool  # the client's certificate, if it sent one, was verified
    version: str | None = None
    cipher: str | None = None
    common_name: str | None = None

    @property
    def tls(self) -> bool:
        return bool(self.client_flags & CLIENT_SSL)


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed header.

    `source` and `destination` are (address, port) of the client's original
    connection, or None when the header carries none the server can use
    (LOCAL: the balancer's own health check; UNKNOWN; a Unix-socket client):
    the connection's own endpoints stand then, as the specification says."""

    version: int
    command: str  # "PROXY" or "LOCAL"
    family: str  # "TCP4", "TCP6", "UNIX" or "UNKNOWN"
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int  # octets of the header on the wire
    tlvs: tuple[tuple[int, bytes], ...] = ()
    tls: TlsAtBalancer | None = None

    def tlv(self, kind: int) -> bytes | None:
        """The value of the first TLV of this type, or None."""
        for found, value in self.tlvs:
            if found == kind:
                return value
        return None


class ProxyHeaderReader:
    """Collects one header from bytes given in any pieces.

    `feed` returns how many of the given bytes belong to the header; once
    `header` is set, the rest of those bytes (and everything after) is the
    client's. Raises ProxyHeaderError as soon as the bytes cannot begin a
    valid header, so a wrong sender is dropped without waiting for the
    deadline."""

    __slots__ = ("_buffer", "header")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.header: ProxyHeader | None = None

    def feed(self, data: bytes) -> int:
        if self.header is not None:
            raise RuntimeError("the header is complete; further bytes are the client's")
        used = 0
        while used < len(data) and self.header is None:
            want = self._wanted()
            take = data[used : used + want]
            self._buffer += take
            used += len(take)
            self._check()
        if self.header is None or self.header.version == 2:
            return used
        # Version 1 took bytes up to its length limit: give back those after CRLF.
        extra = len(self._buffer) - self.header.length
        del self._buffer[self.header.length :]
        return used - extra

    def _wanted(self) -> int:
        """How many more bytes the header can take at most."""
        buf = self._buffer
        if not buf:
            return 1  # its first octet tells the version, and so how far to read
        if buf[0] != V2_SIGNATURE[0]:
            return V1_MAX_LENGTH - len(buf)
        if len(buf) < _V2_FIXED:
            return _V2_FIXED - len(buf)
        return _V2_FIXED + int.from_bytes(buf[14:16]) - len(buf)

    def _check(self) -> None:
        buf = bytes(self._buffer)
        if buf[:1] == V2_SIGNATURE[:1]:
            if not V2_SIGNATURE.startswith(buf[: len(V2_SIGNATURE)]):
                raise ProxyHeaderError("not a PROXY header (bad version 2 signature)")
            if len(buf) >= _V2_FIXED and len(buf) == _V2_FIXED + struct.unpack_from("!H", buf, 14)[0]:
                self.header = parse_v2(buf)
            return
        if not _V1_PREFIX.startswith(buf[: len(_V1_PREFIX)]):
            raise ProxyHeaderError("not a PROXY header")
        end = buf.find(b"\r\n")
        # The line so far (a last CR may begin the CRLF); bytes after CRLF are the client's.
        line = buf[:end] if end >= 0 else buf[:-1]
        if b"\n" in line or (b"\n" in buf[-1:] and end < 0):
            raise ProxyHeaderError("version 1 header ends in a bare LF")
        if b"\r" in line:
            raise ProxyHeaderError("version 1 header holds a bare CR")
        if end >= 0:
            self.header = parse_v1(buf[: end + 2])
        elif len(buf) >= V1_MAX_LENGTH:
            raise ProxyHeaderError(f"version 1 header without CRLF in its first {V1_MAX_LENGTH} octets")


def parse_v1(line: bytes) -> ProxyHeader:
    """A complete version 1 line, CRLF included."""
    if not line.endswith(b"\r\n") or len(line) > V1_MAX_LENGTH:
        raise ProxyHeaderError("version 1 header must be one line of at most 107 octets ending in CRLF")
    try:
        text = line[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("version 1 header is not ASCII") from None
    fields = text.split(" ")
    if fields[0] != "PROXY" or len(fields) < 2:
        raise ProxyHeaderError("not a PROXY header")
    family = fields[1]
    if family == "UNKNOWN":  # whatever follows is to be ignored
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None, len(line))
    if family not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"version 1 header: unknown protocol {family[:10]!r}")
    if len(fields) != 6:
        raise ProxyHeaderError("version 1 header: expected source, destination and their ports")
    af = socket.AF_INET if family == "TCP4" else socket.AF_INET6
    source = (_v1_address(af, fields[2]), _v1_port(fields[4]))
    destination = (_v1_address(af, fields[3]), _v1_port(fields[5]))
    return ProxyHeader(1, "PROXY", family, source, destination, len(line))


def _v1_address(af: socket.AddressFamily, text: str) -> str:
    """The address in its canonical form; refused unless the family's own
    syntax (IPv4 exactly as inet_ntop writes it: no leading zeros)."""
    try:
        packed = socket.inet_pton(af, text)
    except (OSError, ValueError):
        raise ProxyHeaderError(f"version 1 header: bad address {text[:40]!r}") from None
    canonical = socket.inet_ntop(af, packed)
    if af == socket.AF_INET and canonical != text:
        raise ProxyHeaderError(f"version 1 header: IPv4 address not in canonical form: {text!r}")
    return canonical


def _v1_port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyHeaderError(f"version 1 header: bad port {text[:10]!r}")
    return int(text)


def parse_v2(data: bytes) -> ProxyHeader:
    """A complete version 2 header: the 16 fixed octets and their payload."""
    if len(data) < _V2_FIXED or not data.startswith(V2_SIGNATURE):
        raise ProxyHeaderError("not a version 2 PROXY header")
    version, command = data[12] >> 4, data[12] & 0x0F
    family, transport = data[13] >> 4, data[13] & 0x0F
    (length,) = struct.unpack_from("!H", data, 14)
    if version != 2:
        raise ProxyHeaderError(f"version 2 signature with version {version}")
    if len(data) != _V2_FIXED + length:
        raise ProxyHeaderError("version 2 header length does not match its payload")
    if command == 0:
        # LOCAL: the balancer speaking for itself (a health check); the rest is ignored.
        return ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, len(data))
    if command != 1:
        raise ProxyHeaderError(f"version 2 header: unknown command {command}")
    if family not in _V2_ADDRESS_SIZE:
        raise ProxyHeaderError(f"version 2 header: unknown address family {family}")
    if family != 0 and transport != _STREAM:
        raise ProxyHeaderError("version 2 header: not a stream connection (POP3 runs over TCP)")
    size = _V2_ADDRESS_SIZE[family]
    if length < size:
        raise ProxyHeaderError("version 2 header: address block is cut short")
    block = data[_V2_FIXED : _V2_FIXED + size]
    tlv_bytes = data[_V2_FIXED + size :]
    tlvs = _parse_tlvs(tlv_bytes, "TLV")
    _check_crc(data, tlvs)
    source = destination = None
    name = "UNKNOWN"
    if family == _INET:
        name = "TCP4"
        source = (socket.inet_ntop(socket.AF_INET, block[0:4]), int.from_bytes(block[8:10]))
        destination = (socket.inet_ntop(socket.AF_INET, block[4:8]), int.from_bytes(block[10:12]))
    elif family == _INET6:
        name = "TCP6"
        source = (socket.inet_ntop(socket.AF_INET6, block[0:16]), int.from_bytes(block[32:34]))
        destination = (socket.inet_ntop(socket.AF_INET6, block[16:32]), int.from_bytes(block[34:36]))
    elif family == _UNIX:
        name = "UNIX"  # a client on the balancer's own host: no address of ours to use
    tls = None
    ssl_value = next((value for kind, value in tlvs if kind == TLV_SSL), None)
    if ssl_value is not None:
        tls = _parse_ssl(ssl_value)
    return ProxyHeader(2, "PROXY", name, source, destination, len(data), tuple(tlvs), tls)


def _parse_tlvs(data: bytes, what: str) -> list[tuple[int, bytes]]:
    out = []
    at = 0
    while at < len(data):
        if len(data) - at < 3:
            raise ProxyHeaderError(f"version 2 header: truncated {what}")
        kind = data[at]
        (size,) = struct.unpack_from("!H", data, at + 1)
        if at + 3 + size > len(data):
            raise ProxyHeaderError(f"version 2 header: {what} 0x{kind:02x} runs past the header")
        out.append((kind, data[at + 3 : at + 3 + size]))
        at += 3 + size
    return out


def _parse_ssl(value: bytes) -> TlsAtBalancer:
    if len(value) < 5:
        raise ProxyHeaderError("version 2 header: SSL TLV shorter than 5 octets")
    client = value[0]
    (verify,) = struct.unpack_from("!I", value, 1)
    subs = dict(reversed(_parse_tlvs(value[5:], "SSL sub-TLV")))  # the first of each type wins

    def text(kind: int) -> str | None:
        raw = subs.get(kind)
        return None if raw is None else raw.decode("ascii", "replace")

    return TlsAtBalancer(client, verify == 0, text(SSL_SUB_VERSION), text(SSL_SUB_CIPHER), text(SSL_SUB_CN))


def _check_crc(data: bytes, tlvs: list[tuple[int, bytes]]) -> None:
    """A CRC32C TLV, when sent, must match the header (with itself zeroed)."""
    crcs = [value for kind, value in tlvs if kind == TLV_CRC32C]
    if not crcs:
        return
    if len(crcs) > 1 or len(crcs[0]) != 4:
        raise ProxyHeaderError("version 2 header: malformed CRC32C TLV")
    try:
        import crc32c  # optional (the cluster extra): only headers that carry a checksum need it
    except ImportError:
        raise ProxyHeaderError("version 2 header carries a CRC32C checksum; install crc32c to check it") from None
    at = _tlv_value_offset(data, TLV_CRC32C)
    zeroed = data[:at] + bytes(4) + data[at + 4 :]
    if crc32c.crc32c(zeroed) != int.from_bytes(crcs[0]):
        raise ProxyHeaderError("version 2 header: CRC32C checksum does not match")


def _tlv_value_offset(data: bytes, kind: int) -> int:
    family = data[13] >> 4
    at = _V2_FIXED + _V2_ADDRESS_SIZE[family]
    while data[at] != kind:
        at += 3 + struct.unpack_from("!H", data, at + 1)[0]
    return at + 3


def build_v2(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    *,
    local: bool = False,
    tlvs: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    """A version 2 header, as a balancer would send it (tests and the bench)."""
    if local or source is None or destination is None:
        family, block = 0x00, b""
    else:
        v6 = ":" in source[0]
        af = socket.AF_INET6 if v6 else socket.AF_INET
        family = 0x21 if v6 else 0x11
        block = (
            socket.inet_pton(af, source[0])
            + socket.inet_pton(af, destination[0])
            + source[1].to_bytes(2)
            + destination[1].to_bytes(2)
        )
    payload = block + b"".join(bytes([kind]) + len(value).to_bytes(2) + value for kind, value in tlvs)
    command = 0x20 if local else 0x21
    return V2_SIGNATURE + bytes([command, family]) + len(payload).to_bytes(2) + payload
