"""What a command handler may see and do: the `CommandContext` interface.

Handlers, the RFC 1939 ones in `_commands` as much as qpopper's own in
`qpopper.extensions`, are plain functions `handler(ctx, args, line)`. They
get the session as a `CommandContext` and use nothing else of it, so the
session's insides can change without touching them. `Session` is the one
implementation; the interface costs nothing at run time.

A handler answers through `reply`/`emit`; asks the server for something
with `ask` (or `rerun_after`, which runs the command line again once the
answer is in); refuses with `bad`, which counts towards the bad-command
budget; and moves the session only through `fire`, whose transitions are
the table in `_state`. A handler that needs the following input lines
itself (SASL, XTND XMIT) hands them to a `LineSink` with `divert_input`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from ._framing import Line, OverlongLine
from ._state import Awaiting, Event, State

if TYPE_CHECKING:
    from ..extensions.xmangle.spec import MangleSpec
    from ..maildrop import MessageList
    from ._config import ConnectionSecurity, SessionConfig
    from ._effects import Effect
    from ._lang import Language


class LineSink(Protocol):
    """Takes the input lines while a multi-line exchange runs."""

    def line(self, ctx: CommandContext, item: Line | OverlongLine) -> None:
        """One input line, or the marker of an over-long one."""

    def masked(self, item: Line | OverlongLine) -> str | None:
        """The line as a trace record may show it; None: not traced."""


class CommandContext(Protocol):
    """The session as its command handlers see it."""

    # Site policy and what the connection offers (read only by handlers).
    @property
    def config(self) -> SessionConfig: ...
    @property
    def security(self) -> ConnectionSecurity: ...
    @property
    def kerberos(self) -> object | None: ...
    @property
    def timestamp(self) -> str:
        """The APOP stamp of the greeting."""
    @property
    def state(self) -> State: ...
    @property
    def messages(self) -> MessageList:
        """The maildrop as listed at login (empty before)."""
    @property
    def last_read(self) -> int:
        """The highest message number read in this session (LAST)."""
    @property
    def retrieved(self) -> frozenset[int]: ...

    # The login name so far (USER, APOP, AUTH), and the "-no-mime" choice.
    user: str | None
    mangle: bool
    # RFC 6856: UTF-8 mode (the UTF8 command) and the language of replies (LANG).
    utf8: bool
    language: Language
    # Kept for qpopper's extensions: MDEF's macros and the XMANGLE sizes
    # learnt from the server, None until the first one.
    macros: dict[bytes, bytes] | None
    mangled_sizes: dict[tuple[MangleSpec, int], int] | None

    # ---- replies and effects
    def reply(self, data: bytes) -> None:
        """Send these bytes (a reply formatted with `_replies`)."""
    def emit(self, effect: Effect) -> None:
        """Queue an effect that needs no answer."""
    def ask(self, effect: Effect, awaiting: Awaiting) -> None:
        """Queue an effect and read no more commands until `awaiting` is answered."""
    def rerun_after(self, effect: Effect, awaiting: Awaiting, line: bytes) -> None:
        """Like `ask`; once answered, the command `line` runs again."""
    def bad(self, text: str) -> None:
        """Refuse the command; too many refusals close the session."""
    def fire(self, event: Event) -> None:
        """Move the session as the transition table says."""

    # ---- arguments and the maildrop
    def need_args(self, args: list[bytes], low: int, high: int) -> bool:
        """True if low <= len(args) <= high; otherwise refuse the command."""
    def message_index(self, arg: bytes) -> int | None:
        """The 0-based index a message-number argument names, or None after
        replying why it names none."""
    def is_deleted(self, index: int) -> bool: ...
    def visible(self) -> list[int]:
        """Indices of the messages not marked deleted."""
    def visible_totals(self) -> tuple[int, int]:
        """Messages not marked deleted and their stored octets."""
    def uids(self, line: bytes) -> Sequence[str] | None:
        """The UIDs, or None after asking the server to work them out
        (the command `line` then runs again)."""
    def uid_request(self, args: list[bytes], line: bytes) -> tuple[int | None, Sequence[str]] | None:
        """UIDL's (and EUIDL's) optional message number and the UIDs; None
        when the command was refused or waits for the UIDs to be worked out."""
    def mark_deleted(self, index: int) -> None: ...
    def mark_retrieved(self, index: int) -> None: ...
    def note_read(self, index: int) -> None:
        """Message `index` was read or deleted (LAST)."""
    def reset_marks(self) -> None:
        """RSET: no deletions, nothing read."""
    def effective_deletions(self) -> set[int]:
        """What UPDATE would remove (with auto-delete, what was retrieved too)."""

    # ---- input
    def divert_input(self, sink: LineSink, max_line: int) -> None:
        """Give the following lines, up to `max_line` octets, to `sink`."""
    def restore_input(self) -> None:
        """Back to reading commands, with the command-line limit."""
    def clear_input(self) -> None:
        """Forget the input not read yet (STLS)."""
    def run_command(self, data: bytes) -> None:
        """Run a command line built by the server itself (a macro's); it is
        not expanded as a macro again."""


Handler = Callable[[CommandContext, list[bytes], bytes], None]
