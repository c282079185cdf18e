"""qpopper: a POP3 server compatible with qpopper 4.1, written in Python.

Embedding: `Controller` runs a real server in a thread (tests, tools);
`Server` is the asyncio service for callers that own an event loop;
`Session` is the sans-IO protocol core.
"""

from ._version import __version__
from .auth import Authenticator, Principal
from .auth.passwdfile import PasswdFileAuthenticator
from .auth.static import StaticAuthenticator
from .controller import Controller
from .errors import ConfigError, MaildropBusy, MaildropError, ResponseCode
from .maildrop import Maildrop, MessageInfo
from .config.options import ListenAddress, Options
from .protocol import Session, SessionConfig
from .server import Server

__all__ = [
    "__version__",
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
]
