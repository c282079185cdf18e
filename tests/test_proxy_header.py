"""The PROXY protocol parser (server/proxyheader.py): every family HAProxy
sends, version 2's TLVs, strict refusals, and fuzzing: whatever the bytes
and however they are cut, the parser either names a header or refuses, and
never takes a byte that follows the header."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qpopper.server.proxyheader import (
    CLIENT_CERT_CONN,
    CLIENT_SSL,
    SSL_SUB_CIPHER,
    SSL_SUB_CN,
    SSL_SUB_VERSION,
    TLV_ALPN,
    TLV_AUTHORITY,
    TLV_CRC32C,
    TLV_NOOP,
    TLV_SSL,
    TLV_UNIQUE_ID,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderReader,
    build_v2,
)

AFTER = b"USER alice\r\n"  # what the client sent right behind the header


def read_all(data: bytes, cuts: list[int] | None = None) -> tuple[ProxyHeader, bytes]:
    """Feed `data` in pieces (cut at `cuts`, or one octet at a time); the
    header and what the parser left for the session."""
    reader = ProxyHeaderReader()
    bounds = sorted(set(cuts)) if cuts is not None else list(range(1, len(data)))
    pieces, start = [], 0
    for end in [*bounds, len(data)]:
        if start < end <= len(data):
            pieces.append(data[start:end])
            start = end
    rest = b""
    for i, piece in enumerate(pieces):
        if reader.header is not None:
            rest += piece
            continue
        used = reader.feed(piece)
        if reader.header is not None:
            rest = piece[used:] + b"".join(pieces[i + 1 :])
            break
    assert reader.header is not None
    return reader.header, rest


def one(data: bytes) -> ProxyHeader:
    reader = ProxyHeaderReader()
    used = reader.feed(data)
    assert reader.header is not None
    assert used == reader.header.length
    return reader.header


# ---- version 1 ------------------------------------------------------------------


def test_v1_tcp4() -> None:
    line = b"PROXY TCP4 198.51.100.7 192.0.2.1 56324 110\r\n"
    header, rest = read_all(line + AFTER, cuts=[len(line) + 3])
    assert (header.version, header.command, header.family) == (1, "PROXY", "TCP4")
    assert header.source == ("198.51.100.7", 56324)
    assert header.destination == ("192.0.2.1", 110)
    assert header.length == len(line)
    assert rest == AFTER


def test_v1_tcp6_is_written_canonically() -> None:
    line = b"PROXY TCP6 2001:DB8:0:0:0:0:0:7 ::1 65535 0\r\n"
    header, rest = read_all(line + AFTER)
    assert header.family == "TCP6"
    assert header.source == ("2001:db8::7", 65535)
    assert header.destination == ("::1", 0)
    assert rest == AFTER


@pytest.mark.parametrize(
    "line", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff:f::1 ffff:f::2 65535 65535\r\n", b"PROXY UNKNOWN junk\r\n"]
)
def test_v1_unknown_names_no_client(line: bytes) -> None:
    header, rest = read_all(line + AFTER)
    assert header.family == "UNKNOWN" and header.source is None and header.destination is None
    assert rest == AFTER


def test_v1_longest_line_is_accepted() -> None:
    six = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY UNKNOWN {six} {six} 65535 65535\r\n".encode()
    assert len(line) == 107
    assert one(line).family == "UNKNOWN"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"PROXY TCP4 198.51.100.07 192.0.2.1 1 2\r\n", "bad address"),
        (b"PROXY TCP4 198.51.100.7 192.0.2.1 01 2\r\n", "bad port"),
        (b"PROXY TCP4 198.51.100.7 192.0.2.1 1 65536\r\n", "bad port"),
        (b"PROXY TCP4 198.51.100.7 192.0.2.1 +1 2\r\n", "bad port"),
        (b"PROXY TCP4 ::1 ::1 1 2\r\n", "bad address"),
        (b"PROXY TCP6 1.2.3.4 1.2.3.4 1 2\r\n", "bad address"),
        (b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n", "expected source"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", "expected source"),
        (b"PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n", "unknown protocol"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n", "bare LF"),
        (b"PROXY TCP4 1.2.3.4\r1.2.3.4 1 2\r\n", "bare CR"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 \xc3\xa9\r\n", "ASCII"),
        (b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n", "not a PROXY header"),
        (b"USER alice\r\n", "not a PROXY header"),
        (b"PROXY " + b"A" * 120, "without CRLF"),
    ],
)
def test_v1_refusals(line: bytes, reason: str) -> None:
    with pytest.raises(ProxyHeaderError, match=reason):
        ProxyHeaderReader().feed(line)


def test_a_wrong_first_octet_is_refused_at_once() -> None:
    reader = ProxyHeaderReader()
    with pytest.raises(ProxyHeaderError):
        reader.feed(b"+")  # one octet is enough: no waiting for the deadline


def test_feeding_after_the_header_is_a_programming_error() -> None:
    reader = ProxyHeaderReader()
    reader.feed(b"PROXY UNKNOWN\r\n")
    with pytest.raises(RuntimeError):
        reader.feed(b"x")


# ---- version 2 ------------------------------------------------------------------


def test_v2_tcp4() -> None:
    data = build_v2(("203.0.113.9", 40000), ("192.0.2.1", 110))
    header, rest = read_all(data + AFTER)
    assert (header.version, header.command, header.family) == (2, "PROXY", "TCP4")
    assert header.source == ("203.0.113.9", 40000)
    assert header.destination == ("192.0.2.1", 110)
    assert header.length == len(data) == 28
    assert rest == AFTER


def test_v2_tcp6() -> None:
    data = build_v2(("2001:db8::42", 1), ("2001:db8::1", 995))
    header, rest = read_all(data + b"\x16\x03\x01", cuts=[5, 13, 20])
    assert header.family == "TCP6"
    assert header.source == ("2001:db8::42", 1)
    assert rest == b"\x16\x03\x01"  # a TLS ClientHello right behind stays whole


def test_v2_local_is_the_balancer_itself() -> None:
    # LOCAL: whatever follows the fixed part (here an address block) is ignored.
    data = V2_SIGNATURE + bytes([0x20, 0x11, 0, 12]) + bytes(12)
    header, rest = read_all(data + AFTER)
    assert (header.command, header.family, header.source) == ("LOCAL", "UNKNOWN", None)
    assert rest == AFTER
    assert one(build_v2(None, None, local=True)).command == "LOCAL"


def test_v2_unspecified_family_names_no_client() -> None:
    data = V2_SIGNATURE + bytes([0x21, 0x00, 0, 0])
    header = one(data)
    assert (header.command, header.family, header.source) == ("PROXY", "UNKNOWN", None)


def test_v2_unix_client_keeps_the_connection_address() -> None:
    data = V2_SIGNATURE + bytes([0x21, 0x31]) + (216).to_bytes(2) + b"/run/a".ljust(108, b"\0") + bytes(108)
    header = one(data)
    assert header.family == "UNIX" and header.source is None


def test_v2_tlvs_are_read() -> None:
    ssl = (
        bytes([CLIENT_SSL | CLIENT_CERT_CONN])
        + (0).to_bytes(4)
        + bytes([SSL_SUB_VERSION]) + (7).to_bytes(2) + b"TLSv1.3"
        + bytes([SSL_SUB_CIPHER]) + (22).to_bytes(2) + b"TLS_AES_256_GCM_SHA384"
        + bytes([SSL_SUB_CN]) + (5).to_bytes(2) + b"alice"
    )  # fmt: skip
    tlvs = (
        (TLV_ALPN, b"pop3"),
        (TLV_AUTHORITY, b"pop.example.org"),
        (TLV_UNIQUE_ID, b"\x01" * 128),
        (TLV_NOOP, b""),
        (TLV_SSL, ssl),
        (0xE0, b"custom"),
    )
    header = one(build_v2(("192.0.2.5", 5), ("192.0.2.1", 110), tlvs=tlvs))
    assert header.tlv(TLV_ALPN) == b"pop3"
    assert header.tlv(TLV_AUTHORITY) == b"pop.example.org"
    assert header.tlv(TLV_UNIQUE_ID) == b"\x01" * 128
    assert header.tlv(0xE0) == b"custom"
    assert header.tlv(TLV_CRC32C) is None
    assert header.tls is not None
    assert header.tls.tls and header.tls.verified
    assert (header.tls.version, header.tls.cipher, header.tls.common_name) == (
        "TLSv1.3", "TLS_AES_256_GCM_SHA384", "alice"
    )


def test_v2_ssl_tlv_without_the_ssl_bit_is_no_tls() -> None:
    header = one(build_v2(("192.0.2.5", 5), ("192.0.2.1", 110), tlvs=((TLV_SSL, bytes(5)),)))
    assert header.tls is not None and not header.tls.tls


def with_crc(source: tuple[str, int], destination: tuple[str, int], corrupt: bool = False) -> bytes:
    zeroed = build_v2(source, destination, tlvs=((TLV_ALPN, b"pop3"), (TLV_CRC32C, bytes(4))))
    checksum = crc32c.crc32c(zeroed) ^ (1 if corrupt else 0)
    return zeroed[:-4] + checksum.to_bytes(4)


def test_v2_crc32c_is_checked() -> None:
    assert one(with_crc(("192.0.2.5", 5), ("192.0.2.1", 110))).source == ("192.0.2.5", 5)
    with pytest.raises(ProxyHeaderError, match="CRC32C checksum does not match"):
        ProxyHeaderReader().feed(with_crc(("192.0.2.5", 5), ("192.0.2.1", 110), corrupt=True))


def v2_raw(command: int, family: int, payload: bytes) -> bytes:
    return V2_SIGNATURE + bytes([command, family]) + len(payload).to_bytes(2) + payload


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (V2_SIGNATURE[:5] + b"x", "signature"),
        (v2_raw(0x11, 0x11, bytes(12)), "version 1"),
        (v2_raw(0x22, 0x11, bytes(12)), "unknown command"),
        (v2_raw(0x21, 0x12, bytes(12)), "not a stream"),
        (v2_raw(0x21, 0x10, bytes(12)), "not a stream"),
        (v2_raw(0x21, 0x41, bytes(12)), "unknown address family"),
        (v2_raw(0x21, 0x11, bytes(8)), "cut short"),
        (v2_raw(0x21, 0x21, bytes(12)), "cut short"),
        (v2_raw(0x21, 0x11, bytes(12) + b"\x01\x00"), "truncated TLV"),
        (v2_raw(0x21, 0x11, bytes(12) + b"\x01\x00\x09ab"), "runs past"),
        (v2_raw(0x21, 0x11, bytes(12) + b"\x20\x00\x02ab"), "SSL TLV shorter"),
        (v2_raw(0x21, 0x11, bytes(12) + b"\x20\x00\x06" + bytes(5) + b"\x21"), "SSL sub-TLV"),
        (v2_raw(0x21, 0x11, bytes(12) + b"\x03\x00\x02ab"), "malformed CRC32C"),
    ],
)
def test_v2_refusals(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyHeaderError, match=reason):
        ProxyHeaderReader().feed(data)


# ---- fuzzing ---------------------------------------------------------------------


def _feed_chunks(data: bytes, cuts: list[int]) -> tuple[ProxyHeader | None, int, str | None]:
    """(header, octets it took, refusal) for `data` cut at `cuts`."""
    reader = ProxyHeaderReader()
    bounds = sorted({c % (len(data) + 1) for c in cuts}) + [len(data)]
    taken, start = 0, 0
    try:
        for end in bounds:
            piece = data[start:end]
            start = end
            if not piece:
                continue
            used = reader.feed(piece)
            assert 0 <= used <= len(piece)
            taken += used
            if reader.header is not None:
                assert used == len(piece) or taken == reader.header.length
                return reader.header, taken, None
            assert used == len(piece)  # an incomplete header takes all it is given
    except ProxyHeaderError as exc:
        return None, taken, str(exc)
    return None, taken, None


@settings(max_examples=400, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.builds(lambda tail: V2_SIGNATURE + tail, st.binary(max_size=120)),
        st.builds(lambda tail: b"PROXY " + tail, st.binary(max_size=120)),
    ),
    cuts=st.lists(st.integers(0, 400), max_size=6),
)
def test_any_bytes_any_cuts(data: bytes, cuts: list[int]) -> None:
    whole = _feed_chunks(data, [])
    cut = _feed_chunks(data, cuts)
    # However the bytes arrive, the verdict is the same, and a header is
    # never longer than its own specification allows.
    assert (whole[0], whole[2] is None) == (cut[0], cut[2] is None)
    if whole[0] is not None:
        assert whole[1] == whole[0].length <= 16 + 65535
        assert whole[0].version == 2 or whole[0].length <= 107


addresses4 = st.ip_addresses(v=4).map(str)
addresses6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@settings(max_examples=200, deadline=None)
@given(
    v6=st.booleans(),
    data=st.data(),
    tlvs=st.lists(st.tuples(st.sampled_from([TLV_ALPN, TLV_AUTHORITY, TLV_NOOP, 0xE5]), st.binary(max_size=40)),
                  max_size=4),
    after=st.binary(max_size=50),
    cuts=st.lists(st.integers(0, 400), max_size=6),
    v1=st.booleans(),
)
def test_valid_headers_round_trip(
    v6: bool, data: st.DataObject, tlvs: list[tuple[int, bytes]], after: bytes, cuts: list[int], v1: bool
) -> None:
    addresses = addresses6 if v6 else addresses4
    source = (data.draw(addresses), data.draw(ports))
    destination = (data.draw(addresses), data.draw(ports))
    if v1:
        family = "TCP6" if v6 else "TCP4"
        wire = f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()
    else:
        wire = build_v2(source, destination, tlvs=tuple(tlvs))
    header, taken, refusal = _feed_chunks(wire + after, cuts)
    assert refusal is None and header is not None
    assert taken == len(wire)
    assert header.source is not None and header.destination is not None
    af = socket.AF_INET6 if v6 else socket.AF_INET
    for got, sent in ((header.source, source), (header.destination, destination)):
        assert (socket.inet_pton(af, got[0]), got[1]) == (socket.inet_pton(af, sent[0]), sent[1])
    if not v1:
        assert header.tlvs == tuple(tlvs)
    assert read_all(wire + after, cuts)[1] == after


@pytest.mark.slow
def test_bounded_atheris_campaign() -> None:
    pytest.importorskip("atheris")
    script = Path(__file__).resolve().parent.parent / "fuzz" / "fuzz_proxy_header.py"
    out = subprocess.run([sys.executable, str(script), "-runs=20000", "-max_len=512"], capture_output=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-3000:]
