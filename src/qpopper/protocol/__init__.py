"""The sans-IO POP3 core: no sockets, no asyncio, no ssl in this package.

Drive a `Session` with bytes and carry out the effects it returns; see
`qpopper.server` for the asyncio adapter and the tests for byte-level use.
"""

from ._effects import (
    Authenticate,
    Close,
    Commit,
    ComputeSizes,
    Effect,
    ListHeaders,
    LookupScramSecret,
    OpenMaildrop,
    ResolveUids,
    Send,
    SendMessage,
    SaslStep,
    StartTls,
    SubmitMessage,
)
from ._framing import LineBuffer
from ._session import COMMAND_LINE_MAX, ConnectionSecurity, Session, SessionConfig, State, apop_digest
from ._stuffing import SizeCounter, StuffingEncoder, encode_whole, wire_size

__all__ = [
    "Authenticate",
    "Close",
    "Commit",
    "ComputeSizes",
    "Effect",
    "LookupScramSecret",
    "ListHeaders",
    "SubmitMessage",
    "SaslStep",
    "StartTls",
    "ConnectionSecurity",
    "OpenMaildrop",
    "ResolveUids",
    "Send",
    "SendMessage",
    "LineBuffer",
    "COMMAND_LINE_MAX",
    "Session",
    "SessionConfig",
    "State",
    "apop_digest",
    "SizeCounter",
    "StuffingEncoder",
    "encode_whole",
    "wire_size",
]
