"""Error types shared by every layer.

The split follows whose fault a failure is: the client's mistakes become
`-ERR` replies inside the protocol core and never reach here; failures of the
server's own parts (storage, authentication backends, configuration) are
exceptions that carry the RFC 2449/3206 response code the client should see.
"""

from __future__ import annotations

import enum


class ResponseCode(enum.Enum):
    """Extended response codes (RFC 2449 section 8, RFC 3206)."""

    IN_USE = "IN-USE"
    LOGIN_DELAY = "LOGIN-DELAY"
    SYS_TEMP = "SYS/TEMP"
    SYS_PERM = "SYS/PERM"
    AUTH = "AUTH"


class QpopperError(Exception):
    """Base of every exception this package raises on purpose."""


class ConfigError(QpopperError):
    """A setting or a configuration file is wrong; raised before serving.

    `source` says where the bad value came from ("file:line", "-T", ...)
    when it is known, so the command line can add its usage line."""

    def __init__(self, message: str, source: str | None = None) -> None:
        super().__init__(message)
        self.source = source


class MaildropError(QpopperError):
    """A maildrop could not be opened, read or updated.

    `code` decides what the client is told; the message text is for the log
    only, because it may hold paths the client must not learn.
    """

    def __init__(self, message: str, code: ResponseCode = ResponseCode.SYS_TEMP) -> None:
        super().__init__(message)
        self.code = code


class MaildropBusy(MaildropError):
    """Another session holds the maildrop's POP lock."""

    def __init__(self, message: str = "maildrop is locked by another session") -> None:
        super().__init__(message, ResponseCode.IN_USE)


class WouldBlock(QpopperError):
    """A quick attempt met work that belongs in a worker thread: a big
    maildrop, a held lock, a crash to recover from. Nothing was changed;
    the caller tries again the slow way."""


class AuthUnavailable(QpopperError):
    """The authentication backend failed (not the user's credentials)."""


class LoginRefused(QpopperError):
    """Right credentials, but the user database says this user may not log
    in now and gives the client a reason (Dovecot's nologin with reason=,
    e.g. "mailbox is being migrated, try again tomorrow"). Only raised once
    the password has matched, so the text tells a stranger nothing."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
