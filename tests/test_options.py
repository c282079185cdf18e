"""Listener syntax, defaults that the RFCs constrain, and the async API."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from qpopper import ListenAddress, Options, Server, StaticAuthenticator
from qpopper.config.options import parse_listen_address
from qpopper.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:1110", ListenAddress("127.0.0.1", 1110)),
        ("127.0.0.1", ListenAddress("127.0.0.1", 110)),
        (":995", ListenAddress(None, 995)),
        ("[::1]:1110", ListenAddress("::1", 1110)),
        ("[::1]", ListenAddress("::1", 110)),
        ("::1", ListenAddress("::1", 110)),
        ("mail.example.org:110", ListenAddress("mail.example.org", 110)),
    ],
)
def test_listen_address_syntax(text: str, expected: ListenAddress) -> None:
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize("text", ["[::1", "[::1]x", "host:port", "host:70000", "host:-1"])
def test_bad_listen_addresses(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_listen_address(text)


def test_rfc1939_autologout_default_is_at_least_ten_minutes() -> None:  # row 59
    assert Options().timeout >= 600
    assert Options().update_on_abort is False


async def _talk(host: str, port: int) -> list[bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    replies = [await reader.readline()]
    writer.write(b"USER alice\r\nPASS pw\r\nSTAT\r\nQUIT\r\n")
    for _ in range(4):
        replies.append(await reader.readline())
    writer.close()
    await writer.wait_closed()
    return replies


def test_async_api_with_several_listeners_ipv4_and_ipv6(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    auth = StaticAuthenticator({"alice": "pw"}, mail_location=f"maildir:{tmp_path}/%u")
    options = Options(listen=(ListenAddress("127.0.0.1", 0), ListenAddress("::1", 0)), auth_fail_delay=0)

    async def main() -> None:
        async with Server(options, auth) as server:
            addresses = server.addresses
            assert {a[0] for a in addresses} == {"127.0.0.1", "::1"}
            for host, port in addresses:
                replies = await _talk(host, port)
                assert replies[3] == b"+OK 0 0\r\n" and replies[4].startswith(b"+OK")

    asyncio.run(main())
