"""The sans-IO POP3 core: no sockets, no asyncio, no ssl in this package.

Drive a `Session` with bytes and carry out the effects it returns; see
`qpopper.server` for the asyncio adapter and the tests for byte-level use.
Command handlers outside this package (qpopper's extensions) are written
against `CommandContext` and use only the names exported here.

The modules are:
  _session     Session: input framing, dispatch, the server's answers
  _state       State, Awaiting, the transition table (the only writer)
  _context     CommandContext and LineSink: what handlers may use
  _commands    the RFC 1939/2449 handlers and the command table
  _capa        CAPA and the SASL mechanisms on offer
  _sasl_driver AUTH: a SASL mechanism over POP3's base64 lines
  _replies     status lines, response codes, listings
  _challenges  APOP stamps and CRAM-MD5 challenges from given sources
  _config      SessionConfig and ConnectionSecurity
  _effects     what the session asks the server to do
  _framing, _args, _stuffing   lines in, arguments, message bytes out

Names are loaded on first use: the command table names handlers in
`qpopper.extensions`, which import this package's public names, so an
eager import here would go round in a circle whichever side came first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from ._challenges import SYSTEM_ENTROPY, Entropy, make_cram_challenge, make_timestamp
    from ._config import COMMAND_LINE_MAX, SASL_LINE_MAX, ConnectionSecurity, SessionConfig
    from ._context import CommandContext, Handler, LineSink
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
        SaslStep,
        Send,
        SendMessage,
        StartTls,
        SubmitMessage,
    )
    from ._framing import Line, LineBuffer, OverlongLine
    from ._replies import err, ok
    from ._session import Session, apop_digest
    from ._state import Awaiting, Event, State
    from ._stuffing import SizeCounter, StuffingEncoder, encode_whole, wire_size

# Public name -> the module of this package that defines it.
_WHERE = {
    "SYSTEM_ENTROPY": "._challenges",
    "Entropy": "._challenges",
    "make_cram_challenge": "._challenges",
    "make_timestamp": "._challenges",
    "COMMAND_LINE_MAX": "._config",
    "SASL_LINE_MAX": "._config",
    "ConnectionSecurity": "._config",
    "SessionConfig": "._config",
    "CommandContext": "._context",
    "Handler": "._context",
    "LineSink": "._context",
    "Authenticate": "._effects",
    "Close": "._effects",
    "Commit": "._effects",
    "ComputeSizes": "._effects",
    "Effect": "._effects",
    "ListHeaders": "._effects",
    "LookupScramSecret": "._effects",
    "OpenMaildrop": "._effects",
    "ResolveUids": "._effects",
    "SaslStep": "._effects",
    "Send": "._effects",
    "SendMessage": "._effects",
    "StartTls": "._effects",
    "SubmitMessage": "._effects",
    "Line": "._framing",
    "LineBuffer": "._framing",
    "OverlongLine": "._framing",
    "err": "._replies",
    "ok": "._replies",
    "Session": "._session",
    "apop_digest": "._session",
    "Awaiting": "._state",
    "Event": "._state",
    "State": "._state",
    "SizeCounter": "._stuffing",
    "StuffingEncoder": "._stuffing",
    "encode_whole": "._stuffing",
    "wire_size": "._stuffing",
}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE)


__all__ = [
    "COMMAND_LINE_MAX",
    "SASL_LINE_MAX",
    "SYSTEM_ENTROPY",
    "Authenticate",
    "Awaiting",
    "Close",
    "CommandContext",
    "Commit",
    "ComputeSizes",
    "ConnectionSecurity",
    "Effect",
    "Entropy",
    "Event",
    "Handler",
    "Line",
    "LineBuffer",
    "LineSink",
    "ListHeaders",
    "LookupScramSecret",
    "OpenMaildrop",
    "OverlongLine",
    "ResolveUids",
    "SaslStep",
    "Send",
    "SendMessage",
    "Session",
    "SessionConfig",
    "SizeCounter",
    "StartTls",
    "State",
    "StuffingEncoder",
    "SubmitMessage",
    "apop_digest",
    "encode_whole",
    "err",
    "make_cram_challenge",
    "make_timestamp",
    "ok",
    "wire_size",
]
