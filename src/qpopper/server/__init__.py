"""The asyncio side: listeners, connections, TLS and the login and
retrieval steps a connection runs. The process models around it (forking,
workers, inetd, systemd) are in `qpopper.daemon`."""

from ._connection import Connection, Peer
from ._server import Server, bind_socket, make_authenticator

__all__ = ["Connection", "Peer", "Server", "bind_socket", "make_authenticator"]
