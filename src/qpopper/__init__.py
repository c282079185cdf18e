"""qpopper: a POP3 server compatible with qpopper 4.1, written in Python.

Embedding: `Controller` runs a real server in a thread (tests, tools);
`Server` is the asyncio service for callers that own an event loop;
`Session` is the sans-IO protocol core.

The names below are loaded on first use, not when the package is imported:
`import qpopper.protocol` runs this file too, and the protocol core must not
drag in asyncio, ssl, socket or threading with the server and Controller.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports
from ._version import __version__

if TYPE_CHECKING:
    from .auth import Authenticator, Principal
    from .auth.passwdfile import PasswdFileAuthenticator
    from .auth.static import StaticAuthenticator
    from .config.options import ListenAddress, Options
    from .controller import Controller
    from .errors import ConfigError, MaildropBusy, MaildropError, ResponseCode
    from .maildrop import Maildrop, MessageInfo
    from .protocol import Session, SessionConfig
    from .server import Server

# Public name -> the module (relative to this package) that defines it.
_LAZY = {
    "Authenticator": ".auth",
    "Principal": ".auth",
    "PasswdFileAuthenticator": ".auth.passwdfile",
    "StaticAuthenticator": ".auth.static",
    "Controller": ".controller",
    "ConfigError": ".errors",
    "MaildropBusy": ".errors",
    "MaildropError": ".errors",
    "ResponseCode": ".errors",
    "Maildrop": ".maildrop",
    "MessageInfo": ".maildrop",
    "ListenAddress": ".config.options",
    "Options": ".config.options",
    "Session": ".protocol",
    "SessionConfig": ".protocol",
    "Server": ".server",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "Authenticator",
    "ConfigError",
    "Controller",
    "ListenAddress",
    "Maildrop",
    "MaildropBusy",
    "MaildropError",
    "MessageInfo",
    "Options",
    "PasswdFileAuthenticator",
    "Principal",
    "ResponseCode",
    "Server",
    "Session",
    "SessionConfig",
    "StaticAuthenticator",
    "__version__",
]
