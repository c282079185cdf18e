"""The asyncio side: listeners, connections, systemd and inetd plumbing."""

from ._connection import Connection, Peer
from ._server import Server, bind_socket, make_authenticator
from ._inetd import serve_inetd
from ._systemd import listen_fds, notify

__all__ = ["Connection", "Peer", "Server", "bind_socket", "make_authenticator", "serve_inetd", "listen_fds", "notify"]
