"""What the protocol core asks its caller to do.

The session never performs I/O. Each effect below is an instruction to the
server; the ones that need an answer (Authenticate, OpenMaildrop, Commit)
pause the session until the server reports back through the matching
Session method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..auth.credentials import Credentials
from ..extensions.xmangle.spec import MangleSpec
from ..maildrop._base import MessageList


@dataclass(frozen=True, slots=True)
class Send:
    """Write these bytes to the client."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Check the credentials; answer with auth_succeeded or auth_failed."""

    credentials: Credentials = field(repr=False)


@dataclass(frozen=True, slots=True)
class OpenMaildrop:
    """Lock and list the authenticated user's maildrop; answer with
    maildrop_opened or maildrop_failed."""

    user: str


@dataclass(frozen=True, slots=True)
class SendMessage:
    """Stream message `index` (0-based) dot-stuffed, then the ".CRLF" end.

    `body_lines` None means the whole message (RETR); n means TOP's cut.
    `status` is the "+OK" line to send first, once the message is known to
    be readable; if it is not, tell the session with message_unavailable.
    """

    index: int
    body_lines: int | None
    status: bytes
    # XMANGLE: condense the message into one text part before sending.
    mangle: MangleSpec | None = None


@dataclass(frozen=True, slots=True)
class Commit:
    """Enter UPDATE: remove `deleted`; answer with commit_done."""

    deleted: frozenset[int]
    retrieved: frozenset[int]


@dataclass(frozen=True, slots=True)
class StartTls:
    """STLS accepted: the "+OK" is queued before this. Flush it, drop any
    plaintext the client sent after STLS, run the TLS handshake, then call
    tls_started (or close the connection if the handshake fails)."""


@dataclass(frozen=True, slots=True)
class LookupScramSecret:
    """A SCRAM exchange needs the user's stored secret; answer with
    scram_secret (None for unknown users: the exchange then fails late,
    as a wrong password does)."""

    user: str
    mechanism: str


@dataclass(frozen=True, slots=True)
class ListHeaders:
    """qpopper's XTND XLST and EUIDL: send `status`, then one line per
    entry built from a header of that message, then ".".

    `entries` are (index, size, uid). With style "xlst" each line is the
    message number and the first header line starting with `header`, with
    its continuation lines; with "euidl" it is "n uid size value" where
    value is the header's unfolded value cut to 128 characters. With
    `single` the one entry's line is the status line itself (EUIDL n)."""

    status: bytes
    entries: tuple[tuple[int, int, str], ...]
    header: str
    style: str
    single: bool = False


@dataclass(frozen=True, slots=True)
class SaslStep:
    """Run one step of a SASL mechanism whose steps do I/O (GSSAPI):
    `mechanism.start(data)` when `initial`, else `mechanism.step(data)`;
    answer with sasl_step_done."""

    mechanism: Any = field(repr=False)
    data: bytes | None = field(repr=False)
    initial: bool


@dataclass(frozen=True, slots=True)
class ComputeSizes:
    """The sizes these messages have once mangled by `spec` (XMANGLE,
    -no-mime); answer with sizes_computed."""

    spec: MangleSpec
    indices: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ResolveUids:
    """Work out the UIDs `messages` defers (MessageList.resolve_uids, which
    may read the maildrop); answer with uids_resolved."""

    messages: MessageList


@dataclass(frozen=True, slots=True)
class SubmitMessage:
    """XTND XMIT: hand the message to the mail system with `sender` as the
    envelope sender; answer with submit_done."""

    data: bytes = field(repr=False)
    sender: str


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection after everything before it has been written."""

    reason: str


Effect = (
    Send
    | Authenticate
    | OpenMaildrop
    | SendMessage
    | Commit
    | StartTls
    | LookupScramSecret
    | ListHeaders
    | ComputeSizes
    | ResolveUids
    | SaslStep
    | SubmitMessage
    | Close
)
