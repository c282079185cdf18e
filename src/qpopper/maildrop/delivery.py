"""Delivering a message into a maildrop, as a delivery agent would.

Bulletins and the tests add mail through this one function; which format
the maildrop has is decided here, from the parsed location, never by the
caller. Each backend has its own implementation: an mbox spool gets the
message appended under the locks Debian's MDAs take, with a From_ line and
">From " quoting (`mbox.append`); a Maildir gets a file written in tmp/
and moved into new/ under a unique name (`maildir`). A session holding the
maildrop meanwhile does not list the message; its next login does.
"""

from __future__ import annotations

from ..errors import MaildropError, ResponseCode
from .location import MaildropLocation


def deliver(
    location: MaildropLocation | str, message: bytes, *, from_line: bytes | None = None, uid: str | None = None
) -> str:
    """Add `message` (stored form: LF line ends, no From_ line) to the
    maildrop at an expanded `location`; returns where it went (the Maildir
    file, or the mbox spool).

    `uid` makes the message's UIDL that string (a Maildir file name; an
    mbox `X-UIDL:` header, 11 to 32 characters); without it the backend's
    usual UID applies. `from_line` is the mbox envelope line (with its
    newline; default `From MAILER-DAEMON  <now>`); Maildir has none.
    Raises MaildropError for an unknown kind, an unusable `uid` or a lock
    not obtained; file-system failures raise OSError.
    """
    kind, path = location if isinstance(location, MaildropLocation) else MaildropLocation.parse(location)
    if kind == "mbox":
        from .mbox.append import append_message

        return append_message(path, message, from_line=from_line, uid=uid)
    if kind == "maildir":
        from .maildir import deliver_to_maildir

        return deliver_to_maildir(path, message, uid=uid)
    if kind == "memory":
        from .memory import deliver_to_memory

        return deliver_to_memory(path, message, uid=uid)
    raise MaildropError(f"no delivery for maildrop kind {kind!r}", ResponseCode.SYS_PERM)
