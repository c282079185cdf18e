"""The pytest plugin of qpopper.testing, loaded through the pytest11 entry point.

Fixtures (all function-scoped, each test gets its own server on a free port
and a fresh store, so they work under pytest-xdist):

pop3_server          a running TestServer, plain POP3 (USER/PASS, APOP, SASL)
pop3_stls_server     the same offering STLS; `.ca_path` is the CA to trust
pop3_tls_server      implicit TLS (POP3S) on `.port`; `.ca_path` likewise
pop3_server_factory  call it with TestServer's arguments for any other kind;
                     every server it made is stopped after the test
pop3_user            a factory on pop3_server: pop3_user("alice", "pw") -> "alice"
pop3_deliver         a factory on pop3_server: pop3_deliver("alice", message) -> UID

The names all start with pop3_ so they do not clash with a project's own
fixtures. Nothing of qpopper is imported until a fixture is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from email.message import Message

    from . import TestServer


@pytest.fixture
def pop3_server_factory() -> Iterator[Callable[..., TestServer]]:
    """Make started TestServers (keyword arguments as TestServer's); all are
    stopped when the test ends."""
    from . import TestServer

    made: list[TestServer] = []

    def make(**kwargs: Any) -> TestServer:
        server = TestServer(**kwargs).start()
        made.append(server)
        return server

    yield make
    for server in reversed(made):
        server.stop()


@pytest.fixture
def pop3_server(pop3_server_factory: Callable[..., TestServer]) -> TestServer:
    """A running plain-POP3 TestServer with an empty store."""
    return pop3_server_factory()


@pytest.fixture
def pop3_stls_server(pop3_server_factory: Callable[..., TestServer]) -> TestServer:
    """A running TestServer offering STLS; trust `.ca_path`."""
    return pop3_server_factory(tls="stls")


@pytest.fixture
def pop3_tls_server(pop3_server_factory: Callable[..., TestServer]) -> TestServer:
    """A running TestServer speaking implicit TLS on `.port`; trust `.ca_path`."""
    return pop3_server_factory(tls="implicit")


@pytest.fixture
def pop3_user(pop3_server: TestServer) -> Callable[..., str]:
    """Create users on pop3_server: pop3_user(name="user", password="secret")."""

    def make(name: str = "user", password: str = "secret") -> str:
        return pop3_server.add_user(name, password)

    return make


@pytest.fixture
def pop3_deliver(pop3_server: TestServer) -> Callable[..., str]:
    """Deliver into pop3_server: pop3_deliver(user, bytes or EmailMessage, uid=None)."""

    def deliver(user: str, message: bytes | Message, uid: str | None = None) -> str:
        return pop3_server.deliver(user, message, uid)

    return deliver
