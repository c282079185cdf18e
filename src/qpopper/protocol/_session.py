"""The POP3 session (RFC 1939, RFC 2449), free of I/O.

Bytes go in through `receive_data`; `next_effect` hands out what to do, one
effect at a time, until it returns None (it needs more input, or it waits
for the answer to an effect it asked for). Pipelined commands are answered
strictly in order because a command is only parsed once every effect of the
previous one has been taken and answered.

`Session` is the driver: it frames input, dispatches each line through the
command table of `_commands`, takes the server's answers, and is the one
implementation of the `CommandContext` the handlers see. Where it is
(state, awaited answer) lives in `_state`, which alone changes it.

Replies never echo raw client input: where a reply names a message number
or a user name, that value has already passed strict validation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet

from ..auth import sasl
from ..auth.credentials import ScramSecret
from ..errors import ResponseCode
from ..extensions.xmangle.commands import remember_sizes, sizes_as_sent
from ..extensions.xmangle.spec import NO_MIME, MangleSpec
from ..maildrop import MessageInfo, MessageList
from . import _capa
from ._args import PASSWORD_BYTES, PRINTABLE, parse_number, split_arguments, split_keyword
from ._commands import COMMANDS, run_macro
from ._config import SASL_LINE_MAX, ConnectionSecurity, SessionConfig
from ._context import LineSink
from ._effects import Close, Effect, OpenMaildrop, ResolveUids, Send
from ._framing import LineBuffer, OverlongLine
from ._lang import ENGLISH, Language, translate, utf8_replies
from ._replies import drop_summary, err, greeting, ok
from ._sasl_driver import SaslExchange
from ._state import Awaiting, Event, State, StateMachine

_NONE: frozenset[int] = frozenset()

# Stands for the login reply where sizes must be computed before it goes
# out (-no-mime): no client line can be this, framing refuses NUL.
_LOGIN_SUMMARY = b"\x00login summary"

# Commands whose arguments may hold a UTF-8 user name, and the bytes allowed there.
_UTF8_NAME_COMMANDS = frozenset({b"USER", b"APOP"})
_NAME_BYTES = b"\t" + PASSWORD_BYTES

_MAILDROP_FAILURES = {
    ResponseCode.IN_USE: "Maildrop is in use by another session.",
    ResponseCode.SYS_PERM: "Maildrop cannot be read; please contact support.",
    ResponseCode.LOGIN_DELAY: "Minimum time between logins has not elapsed.",
}


def _with(marks: AbstractSet[int], index: int) -> set[int]:
    """`marks` plus `index`, in a set of the session's own (not the shared empty one)."""
    own = marks if isinstance(marks, set) else set(marks)
    own.add(index)
    return own


def _masked(data: bytes) -> str:
    """A command line for a trace record, passwords hidden."""
    keyword, rest = split_keyword(data)
    word = keyword.upper()
    if word == b"PASS":
        return "PASS <password>"
    args = split_arguments(rest) if word in (b"APOP", b"AUTH") else []
    first = args[0].decode("ascii", "backslashreplace") if args else ""
    if word == b"APOP":
        return "APOP " + first + " <digest>"
    if word == b"AUTH" and len(args) > 1:
        return "AUTH " + first + " <initial response>"
    return data.decode("ascii", "backslashreplace")


class Session(StateMachine):
    """One POP3 conversation from greeting to close."""

    # Slots: an idle server holds one per connection.
    __slots__ = (
        "_bad_commands", "_buffer", "_deleted", "_effects", "_eof", "_last", "_pending_line", "_retrieved",
        "_sink", "config", "kerberos", "language", "macros", "mangle", "mangled_sizes", "messages", "security",
        "timestamp", "trace", "user", "utf8",
    )

    def __init__(
        self,
        config: SessionConfig | None = None,
        *,
        timestamp: str | None = None,
        security: ConnectionSecurity | None = None,
    ) -> None:
        super().__init__()
        self.config = config = config or SessionConfig()
        # The APOP challenge "<pid.clock@host>"; made from the configured
        # sources unless the caller brings one.
        self.timestamp = timestamp if timestamp is not None else config.entropy.timestamp(config.hostname)
        self.security = security or ConnectionSecurity(plaintext_allowed=config.allow_user_pass)
        # The server's Kerberos acceptor when GSSAPI is on (qpopper -k).
        self.kerberos: object | None = None
        # The "-no-mime" user-name suffix asks for MIME mangling.
        self.mangle = False
        # RFC 6856: UTF8 sent; the language of the replies (LANG).
        self.utf8 = False
        self.language: Language = ENGLISH
        # Called with each command line as received, secrets masked (-t).
        self.trace: Callable[[str], None] | None = None
        # MDEF's macros and the XMANGLE sizes learnt: None until used.
        self.macros: dict[bytes, bytes] | None = None
        self.mangled_sizes: dict[tuple[MangleSpec, int], int] | None = None
        # The command to run again once the awaited answer is in.
        self._pending_line: bytes | None = None
        # Who takes the input lines instead of the command table (SASL, XMIT).
        self._sink: LineSink | None = None
        self.user: str | None = None  # set by USER, confirmed by login
        # AUTH may carry an initial response longer than a command line
        # (a Kerberos ticket); clients send them although RFC 5034 asks not to.
        self._buffer = LineBuffer(config.max_line, long_prefix=b"AUTH ", long_max=SASL_LINE_MAX)
        # A list, not a deque: it holds one command's few effects, and a
        # deque's first block alone is 600 bytes in every idle session.
        self._effects: list[Effect] = []
        self.messages = MessageList((), ())
        # Shared empty sets until the first DELE/RETR: an idle session holds none.
        self._deleted: AbstractSet[int] = _NONE
        self._retrieved: AbstractSet[int] = _NONE
        self._last = 0  # highest message read in this session (LAST)
        self._bad_commands = 0
        self._eof = False
        self._effects.append(Send(greeting(config.hostname, config.shy, self.timestamp if config.apop else None)))

    # ---- input and output -------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client; b"" means the client closed."""
        if not data:
            self._eof = True
            return
        if self.state in (State.AUTHORIZATION, State.TRANSACTION):
            self._buffer.feed(data)

    def next_effect(self) -> Effect | None:
        """The next thing to do, or None if input or an answer is needed."""
        while not self._effects:
            if not self.ready:
                return None
            item = self._buffer.next_line()
            if item is None:
                return None
            sink = self._sink
            if self.trace is not None:
                if sink is not None:
                    shown = sink.masked(item)
                elif isinstance(item, OverlongLine):
                    shown = f"<over-long line of {item.discarded} octets>"
                else:
                    shown = _masked(item.data)
                if shown is not None:
                    self.trace(shown)
            if sink is not None:
                sink.line(self, item)
            elif isinstance(item, OverlongLine):
                self.bad("Command line too long.")
            else:
                self._dispatch(item.data)
        return self._effects.pop(0)

    def drop_stats(self) -> tuple[int, int, int, int]:
        """(messages deleted, octets deleted, messages left, octets left)
        as the UPDATE state would leave them (qpopper's -s record)."""
        deleted = self.effective_deletions()
        sizes = self.messages.sizes
        gone = sum(sizes[i] for i in deleted)
        total = sum(sizes)
        return len(deleted), gone, len(self.messages) - len(deleted), total - gone

    @property
    def in_transaction(self) -> bool:
        return self.state is State.TRANSACTION

    @property
    def marked_deleted(self) -> frozenset[int]:
        return frozenset(self._deleted)

    @property
    def retrieved(self) -> frozenset[int]:
        return frozenset(self._retrieved)

    @property
    def authenticated(self) -> bool:
        return self.state in (State.TRANSACTION, State.UPDATE)

    @property
    def buffered(self) -> int:
        """Octets of input held that are not a complete line yet."""
        return len(self._buffer)

    def capabilities(self) -> list[str]:
        """The CAPA list for the current state (RFC 2449 section 5)."""
        return _capa.capabilities(self.config, self.security, self.state, self.kerberos)

    def sasl_mechanisms(self) -> list[str]:
        """Mechanisms usable on this connection, strongest first."""
        return _capa.sasl_mechanisms(self.config, self.security, self.kerberos)

    # ---- answers to effects -----------------------------------------------

    def tls_started(self, security: ConnectionSecurity) -> None:
        """The STLS handshake succeeded: start AUTHORIZATION over (RFC 2595)."""
        self.answered(Awaiting.TLS)
        self._buffer.clear()
        self.security = security
        self.user = None

    def sasl_step_done(self, step: sasl.Step) -> None:
        """Answer to SaslStep: what the mechanism decided."""
        self.answered(Awaiting.SASL_STEP)
        self._exchange().step(self, step)

    def scram_secret(self, secret: ScramSecret | None) -> None:
        self.answered(Awaiting.SCRAM_SECRET)
        self._exchange().secret(self, secret)

    def sizes_computed(self, spec: MangleSpec, sizes: dict[int, int]) -> None:
        """Answer to ComputeSizes; the command that asked runs again."""
        self.answered(Awaiting.SIZES)
        remember_sizes(self, spec, sizes)
        self._rerun()

    def uids_resolved(self, ok: bool = True) -> None:
        """Answer to ResolveUids; the command that asked runs again, or, if
        the maildrop could not be read, is refused."""
        self.answered(Awaiting.UIDS)
        if not ok:
            self._pending_line = None
            self.reply(err("Unique-ids cannot be worked out now.", ResponseCode.SYS_TEMP))
            return
        self._rerun()

    def submit_done(self, error: ResponseCode | None, text: str = "") -> None:
        """XTND XMIT's message was accepted (error None) or refused."""
        self.answered(Awaiting.SUBMIT)
        if error is None:
            self.reply(ok("Message sent successfully."))
        else:
            self.reply(err(text or "The mail system did not accept the message.", error))

    def auth_succeeded(self, user: str) -> None:
        """The credentials were good; `user` is the canonical login name."""
        self.answered(Awaiting.AUTH)
        self.user = user
        self.ask(OpenMaildrop(user), Awaiting.MAILDROP)

    def auth_failed(self, code: ResponseCode = ResponseCode.AUTH, reason: str | None = None) -> None:
        """Bad credentials (AUTH) or a failing backend (SYS/TEMP). `reason`
        replaces the AUTH text: the user database's word to a user whose
        password was right (one printable line, from the administrator)."""
        self.answered(Awaiting.AUTH)
        self.user = None
        if code is ResponseCode.AUTH:
            self.reply(err(reason or "Authentication failed.", code))
        elif code is ResponseCode.SYS_PERM:
            self.reply(err("This account cannot be served; please contact support.", code))
        else:
            self.reply(err("Authentication is unavailable, try again later.", code))

    def maildrop_opened(self, messages: Sequence[MessageInfo]) -> None:
        self.answered(Awaiting.MAILDROP)
        self.messages = MessageList.of(messages)
        self.fire(Event.LOGGED_IN)
        self._bad_commands = 0
        self._last = 0
        self._login_summary()

    def _login_summary(self) -> None:
        """The login reply. With -no-mime its octets are those STAT and LIST
        give, the sizes as sent, so they may have to be computed first."""
        if self.mangle:
            visible = self.visible()
            sizes = sizes_as_sent(self, visible, NO_MIME, _LOGIN_SUMMARY)
            if sizes is None:
                return  # asked for them; comes back here through _rerun
            count, octets = len(visible), sum(sizes.values())
        else:
            count, octets = self.visible_totals()
        user = self.user  # an ASCII name (nearly all) costs one isascii, no call
        utf8 = user is not None and not user.isascii() and utf8_replies(self)
        self.reply(ok(drop_summary(user, count, octets), utf8))

    def maildrop_failed(self, code: ResponseCode) -> None:
        self.answered(Awaiting.MAILDROP)
        self.user = None
        self.reply(err(_MAILDROP_FAILURES.get(code, "Maildrop is unavailable, try again later."), code))

    def commit_done(self, error: ResponseCode | None = None) -> None:
        """UPDATE finished (error None) or failed, leaving the maildrop as it was."""
        self.answered(Awaiting.COMMIT)
        if error is None:
            left = len(self.messages) - len(self.effective_deletions())
            self.reply(ok(f"Pop server at {self.config.hostname} signing off ({left} messages left)."))
        else:
            self.reply(err("Some deleted messages not removed.", error))
        self._effects.append(Close("quit"))
        self.fire(Event.COMMITTED)

    def message_unavailable(self, index: int) -> None:
        """Message `index`, listed at login, could not be read (none of it
        was sent). It no longer counts as retrieved: auto-delete and the
        Status update must not act on mail the client never got."""
        if index in self._retrieved:
            kept = set(self._retrieved)
            kept.discard(index)
            self._retrieved = kept
        self.reply(err("Message cannot be read now.", ResponseCode.SYS_TEMP))

    def internal_error(self) -> None:
        """The server failed while serving this session: tell the client, close."""
        self._effects.clear()
        self.reply(err("Internal server error.", ResponseCode.SYS_TEMP))
        self._effects.append(Close("internal error"))
        self.abort()

    # ---- the CommandContext: what command handlers use ----------------------

    @property
    def last_read(self) -> int:
        return self._last

    def reply(self, data: bytes) -> None:
        if self.language.texts:  # English, the source, has no table: one check
            data = translate(self.language, data)
        self._effects.append(Send(data))

    def emit(self, effect: Effect) -> None:
        self._effects.append(effect)

    def ask(self, effect: Effect, awaiting: Awaiting) -> None:
        self.wait(awaiting)
        self._effects.append(effect)

    def rerun_after(self, effect: Effect, awaiting: Awaiting, line: bytes) -> None:
        self.wait(awaiting)
        self._pending_line = line
        self._effects.append(effect)

    def bad(self, text: str) -> None:
        """A command we refuse; too many of them end the session."""
        self._bad_commands += 1
        config = self.config
        limit = config.max_bad_commands_trans if self.state is State.TRANSACTION else config.max_bad_commands_auth
        if self._bad_commands > limit:
            self.reply(err("Too many bad commands; closing connection."))
            self._effects.append(Close("too many bad commands"))
            self.fire(Event.CLOSE)
            return
        self.reply(err(text))

    def need_args(self, args: list[bytes], low: int, high: int) -> bool:
        if low <= len(args) <= high:
            return True
        self.bad("Wrong number of arguments.")
        return False

    def message_index(self, arg: bytes) -> int | None:
        number = parse_number(arg)
        count = len(self.messages)
        if number is None:
            self.bad(f"Parameter must be a number between 1 and {count}.")
            return None
        if not 1 <= number <= count:
            self.reply(err(f"Message {number} does not exist."))
            return None
        if number - 1 in self._deleted:
            self.reply(err(f"Message {number} has been marked for deletion."))
            return None
        return number - 1

    def is_deleted(self, index: int) -> bool:
        return index in self._deleted

    def visible(self) -> list[int]:
        deleted = self._deleted
        return [i for i in range(len(self.messages)) if i not in deleted]

    def visible_totals(self) -> tuple[int, int]:
        sizes = self.messages.sizes
        return len(sizes) - len(self._deleted), sum(sizes) - sum(sizes[i] for i in self._deleted)

    def uids(self, line: bytes) -> Sequence[str] | None:
        messages = self.messages
        if messages.uids_ready:
            return messages.uids
        self.rerun_after(ResolveUids(messages), Awaiting.UIDS, line)
        return None

    def uid_request(self, args: list[bytes], line: bytes) -> tuple[int | None, Sequence[str]] | None:
        if not self.need_args(args, 0, 1):
            return None
        index = self.message_index(args[0]) if args else None
        if args and index is None:
            return None
        uids = self.uids(line)
        return None if uids is None else (index, uids)

    def mark_deleted(self, index: int) -> None:
        self._deleted = _with(self._deleted, index)

    def mark_retrieved(self, index: int) -> None:
        self._retrieved = _with(self._retrieved, index)

    def note_read(self, index: int) -> None:
        if index >= self._last:
            self._last = index + 1

    def reset_marks(self) -> None:
        self._deleted = _NONE
        self._last = 0

    def effective_deletions(self) -> set[int]:
        if self.config.auto_delete:
            return set(self._deleted) | set(self._retrieved)
        return set(self._deleted)

    def divert_input(self, sink: LineSink, max_line: int) -> None:
        self._sink = sink
        self._buffer.max_line = max_line

    def restore_input(self) -> None:
        self._sink = None
        self._buffer.max_line = self.config.max_line

    def clear_input(self) -> None:
        self._buffer.clear()

    def run_command(self, data: bytes) -> None:
        self._dispatch(data, macros=False)

    # ---- internals --------------------------------------------------------

    def _exchange(self) -> SaslExchange:
        sink = self._sink
        if not isinstance(sink, SaslExchange):
            raise RuntimeError("no SASL exchange is running")
        return sink

    def _rerun(self) -> None:
        line, self._pending_line = self._pending_line, None
        if line == _LOGIN_SUMMARY:
            self._login_summary()
        elif line is not None:
            self._dispatch(line, macros=False)

    def _dispatch(self, data: bytes, macros: bool = True) -> None:
        keyword, rest = split_keyword(data)
        keyword = keyword.upper()
        entry = COMMANDS.get(keyword)
        if entry is None:
            if macros and self.macros and self.state is State.TRANSACTION and run_macro(self, keyword, rest):
                return
            self.bad("Unknown command.")
            return
        handler, states, takes_rest = entry
        if self.state not in states:
            self.bad("Command not valid in this state.")
            return
        if takes_rest:
            args = [rest] if rest else []
        else:
            if data.translate(None, PRINTABLE) and not (
                # RFC 6856 "UTF8 USER": UTF-8 user names in USER and APOP.
                keyword in _UTF8_NAME_COMMANDS and not rest.translate(None, _NAME_BYTES)
            ):
                self.bad("Invalid characters in command.")
                return
            args = split_arguments(rest)
        handler(self, args, data)


def apop_digest(timestamp: str, secret: bytes) -> str:
    """RFC 1939 APOP: hex MD5 of the timestamp followed by the secret."""
    return hashlib.md5(timestamp.encode("ascii") + secret).hexdigest()
