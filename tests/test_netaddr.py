"""Peer-address helpers agree with the stdlib's ipaddress on every address
(and treat ::ffff:127.x.x.x as the loopback it is)."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from qpopper.auth.cleartext import plaintext_allowed
from qpopper.netaddr import ipv4_octets, is_loopback


@given(st.ip_addresses())
def test_agrees_with_ipaddress(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    text = str(address)
    if isinstance(address, ipaddress.IPv4Address):
        assert ipv4_octets(text) == address.packed
        assert is_loopback(text) == address.is_loopback
    elif address.ipv4_mapped is not None:
        assert ipv4_octets(text) == address.ipv4_mapped.packed
        assert is_loopback(text) == address.ipv4_mapped.is_loopback
    else:
        assert ipv4_octets(text) is None
        assert is_loopback(text) == address.is_loopback


def test_forms_getpeername_does_not_produce() -> None:
    for text in ("", "local", "1.2.3", "127.1", "localhost", "::1::", "300.1.1.1", "127.0.0.1\x00", "::1\x00"):
        assert ipv4_octets(text) is None
        assert not is_loopback(text)
    assert is_loopback("::1%lo") and ipv4_octets("::ffff:127.0.0.1%eth0") == bytes([127, 0, 0, 1])


def test_policy_local_means_loopback_or_stdio() -> None:
    def allowed(peer: str) -> bool:
        return plaintext_allowed("local", tls_active=False, peer=peer, tls_configured=True)

    assert allowed("127.0.0.1") and allowed("::1") and allowed("::ffff:127.0.0.1") and allowed("local")
    assert not allowed("192.0.2.1") and not allowed("::ffff:192.0.2.1") and not allowed("2001:db8::1")
