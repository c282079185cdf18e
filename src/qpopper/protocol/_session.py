"""The POP3 session state machine (RFC 1939, RFC 2449), free of I/O.

Bytes go in through `receive_data`; `next_effect` hands out what to do, one
effect at a time, until it returns None (it needs more input, or it waits
for the answer to an effect it asked for). Pipelined commands are answered
strictly in order because a command is only parsed once every effect of the
previous one has been taken and answered.

Replies never echo raw client input: where a reply names a message number
or a user name, that value has already passed strict validation.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from .._version import __version__
from ..auth import sasl
from ..auth.credentials import ApopDigest, ScramSecret, UserPass
from ..errors import ResponseCode
from ..extensions.xmangle import spec as manglespec
from ..maildrop import MessageInfo, MessageList
from ._effects import (
    Authenticate,
    Close,
    Commit,
    ComputeSizes,
    ResolveUids,
    Effect,
    SaslStep,
    LookupScramSecret,
    OpenMaildrop,
    Send,
    SendMessage,
    StartTls,
)
from . import _extensions
from ._framing import Line, LineBuffer, OverlongLine
from ..usernames import is_valid_username

# RFC 2449 section 4: commands up to 255 octets including CRLF.
COMMAND_LINE_MAX = 255
# SASL responses can be far longer than commands (RFC 5034 section 4).
SASL_LINE_MAX = 16384
# A message number or TOP line count: digits only, and few enough of them
# that the value cannot overflow anything downstream.
_MAX_NUMBER_DIGITS = 10


class State(enum.Enum):
    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"
    CLOSED = "CLOSED"


_NONE: frozenset[int] = frozenset()


def _with(marks: AbstractSet[int], index: int) -> set[int]:
    """`marks` plus `index`, in a set of the session's own (not the shared empty one)."""
    own = marks if isinstance(marks, set) else set(marks)
    own.add(index)
    return own


class _Waiting(enum.Enum):
    NOTHING = enum.auto()
    SUBMIT = enum.auto()
    AUTH = enum.auto()
    MAILDROP = enum.auto()
    COMMIT = enum.auto()
    TLS = enum.auto()
    SCRAM_SECRET = enum.auto()
    SIZES = enum.auto()
    UIDS = enum.auto()
    SASL_STEP = enum.auto()


@dataclass(frozen=True, slots=True)
class ConnectionSecurity:
    """What the transport offers right now; replaced when STLS completes.

    `plaintext_allowed` is the clear-text password policy's verdict for
    this connection (USER/PASS, SASL PLAIN and LOGIN). `channel_binding`
    is the tls-server-end-point data once TLS is up (SCRAM -PLUS).
    """

    tls: bool = False
    plaintext_allowed: bool = True
    stls_available: bool = False
    channel_binding: bytes | None = None
    # The verified client certificate's name (SASL EXTERNAL), if any.
    certificate_user: str | None = None


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Everything the protocol core needs to know about site policy."""

    hostname: str = "localhost"
    shy: bool = False
    # USER/PASS accepted and announced (the clear-text policy decides).
    allow_user_pass: bool = True
    apop: bool = True
    max_line: int = COMMAND_LINE_MAX
    # Announced in CAPA; None leaves the capability out.
    login_delay: int | None = None
    expire: str | None = "NEVER"
    # Bad commands tolerated before the session is closed.
    max_bad_commands_auth: int = 10
    max_bad_commands_trans: int = 20
    # qpopper's -c and -C: lower-case user names; drop an @domain part.
    downcase_user: bool = False
    trim_domain: bool = False
    # Messages retrieved whole are deleted at UPDATE (EXPIRE 0).
    auto_delete: bool = False
    # XTND XMIT (qpopper -x turns it off) and its size limit in octets.
    xmit: bool = True
    xmit_max_size: int = 10 * 1024 * 1024
    # SASL mechanisms offered (filtered per connection by the policy).
    sasl_mechanisms: tuple[str, ...] = sasl.DEFAULT_MECHANISMS
    implementation: str = f"qpopper-python-{__version__}"
    extra_capabilities: tuple[str, ...] = field(default=())


def _ok(text: str) -> bytes:
    return b"+OK " + text.encode("ascii", "replace") + b"\r\n"


def _err(text: str, code: ResponseCode | None = None) -> bytes:
    prefix = f"[{code.value}] " if code is not None else ""
    return b"-ERR " + (prefix + text).encode("ascii", "replace") + b"\r\n"


def _parse_number(arg: bytes) -> int | None:
    """A strict decimal: ASCII digits only, no sign, no blanks, bounded."""
    if not arg or len(arg) > _MAX_NUMBER_DIGITS or not arg.isdigit():
        return None
    return int(arg)


# Bytes allowed in a command line other than PASS: SP and visible ASCII.
_PRINTABLE = bytes(range(0x20, 0x7F))

# PASS may carry 8-bit bytes (UTF-8 passwords) but no control characters.
_PASSWORD_BYTES = bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))

_Handler = Callable[["Session", list[bytes], bytes], None]


class Session:
    """One POP3 conversation from greeting to close."""

    # Slots: an idle server holds one per connection.
    __slots__ = (
        "_bad_commands", "_buffer", "_deleted", "_effects", "_eof", "_last", "_macros",
        "_mangled_sizes", "_messages", "_pending_line", "_retrieved", "_sasl", "_waiting", "_xmit",
        "_xmit_overflow", "config", "kerberos", "mangle", "security", "state", "timestamp", "trace", "user",
    )

    def __init__(
        self,
        config: SessionConfig | None = None,
        *,
        timestamp: str,
        security: ConnectionSecurity | None = None,
    ) -> None:
        self.config = config or SessionConfig()
        self.timestamp = timestamp  # the APOP challenge "<pid.clock@host>"
        self.security = security or ConnectionSecurity(plaintext_allowed=self.config.allow_user_pass)
        self._sasl: sasl.Mechanism | None = None
        # The server's Kerberos acceptor when GSSAPI is on (qpopper -k).
        self.kerberos: object | None = None
        # The "-no-mime" user-name suffix asks for MIME mangling.
        self.mangle = False
        # Called with each command line as received, secrets masked (-t).
        self.trace: Callable[[str], None] | None = None
        self._macros: dict[bytes, bytes] = {}
        # XMANGLE sizes learnt so far, and the command waiting for some.
        self._mangled_sizes: dict[tuple[manglespec.MangleSpec, int], int] = {}
        self._pending_line: bytes | None = None
        self._xmit: bytearray | None = None  # an XTND XMIT message being received
        self._xmit_overflow = False
        self.state = State.AUTHORIZATION
        self.user: str | None = None  # set by USER, confirmed by login
        # AUTH may carry an initial response longer than a command line
        # (a Kerberos ticket); clients send them although RFC 5034 asks not to.
        self._buffer = LineBuffer(self.config.max_line, long_prefix=b"AUTH ", long_max=SASL_LINE_MAX)
        # A list, not a deque: it holds one command's few effects, and a
        # deque's first block alone is 600 bytes in every idle session.
        self._effects: list[Effect] = []
        self._waiting = _Waiting.NOTHING
        self._messages = MessageList((), ())
        # Shared empty sets until the first DELE/RETR: an idle session holds none.
        self._deleted: AbstractSet[int] = _NONE
        self._retrieved: AbstractSet[int] = _NONE
        self._last = 0  # highest message read in this session (LAST)
        self._bad_commands = 0
        self._eof = False
        self._emit(Send(self._greeting()))

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
            if self._waiting is not _Waiting.NOTHING:
                return None
            if self.state not in (State.AUTHORIZATION, State.TRANSACTION):
                return None
            item = self._buffer.next_line()
            if item is None:
                return None
            if self._xmit is not None:
                _extensions.xmit_line(self, item.data if isinstance(item, Line) else None)
                continue
            if self.trace is not None:
                self.trace(self._masked(item))
            if self._sasl is not None:
                self._sasl_line(item)
            elif isinstance(item, OverlongLine):
                self._bad("Command line too long.")
            else:
                self._dispatch(item)
        return self._effects.pop(0)

    def _masked(self, item: Line | OverlongLine) -> str:
        """The line for a trace record: passwords and SASL data hidden."""
        if isinstance(item, OverlongLine):
            return f"<over-long line of {item.discarded} octets>"
        if self._sasl is not None:
            return "<SASL response>" if item.data != b"*" else "*"
        keyword, _, rest = item.data.partition(b" ")
        word = keyword.upper()
        if word == b"PASS":
            return "PASS <password>"
        if word == b"APOP":
            return "APOP " + rest.partition(b" ")[0].decode("ascii", "backslashreplace") + " <digest>"
        if word == b"AUTH" and b" " in rest:
            return "AUTH " + rest.partition(b" ")[0].decode("ascii", "backslashreplace") + " <initial response>"
        return item.data.decode("ascii", "backslashreplace")

    def drop_stats(self) -> tuple[int, int, int, int]:
        """(messages deleted, octets deleted, messages left, octets left)
        as the UPDATE state would leave them (qpopper's -s record)."""
        deleted = self._effective_deletions()
        sizes = self._messages.sizes
        gone = sum(sizes[i] for i in deleted)
        total = sum(sizes)
        return len(deleted), gone, len(self._messages) - len(deleted), total - gone

    def _effective_deletions(self) -> set[int]:
        if self.config.auto_delete:
            return set(self._deleted) | set(self._retrieved)
        return set(self._deleted)

    @property
    def waiting(self) -> bool:
        """True while an effect awaits its answer from the server."""
        return self._waiting is not _Waiting.NOTHING

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

    def discard_pending_input(self) -> None:
        """Drop buffered input (STLS: pipelined plaintext must not run)."""
        self._buffer.clear()

    # ---- answers to effects -----------------------------------------------

    def tls_started(self, security: ConnectionSecurity) -> None:
        """The STLS handshake succeeded: start AUTHORIZATION over (RFC 2595)."""
        self._expect(_Waiting.TLS)
        self._waiting = _Waiting.NOTHING
        self._buffer.clear()
        self.security = security
        self.user = None

    def sasl_step_done(self, step: sasl.Step) -> None:
        """Answer to SaslStep: what the mechanism decided."""
        self._expect(_Waiting.SASL_STEP)
        self._waiting = _Waiting.NOTHING
        self._sasl_step(step)

    def scram_secret(self, secret: ScramSecret | None) -> None:
        self._expect(_Waiting.SCRAM_SECRET)
        self._waiting = _Waiting.NOTHING
        assert self._sasl is not None
        self._sasl_step(self._sasl.secret(secret))

    def _waiting_xmit(self) -> None:
        self._waiting = _Waiting.SUBMIT

    def sizes_computed(self, spec: manglespec.MangleSpec, sizes: dict[int, int]) -> None:
        """Answer to ComputeSizes; the command that asked runs again."""
        self._expect(_Waiting.SIZES)
        self._waiting = _Waiting.NOTHING
        for index, size in sizes.items():
            self._mangled_sizes[(spec, index)] = size
        line, self._pending_line = self._pending_line, None
        if line is not None:
            self._dispatch(Line(line), macros=False)

    def uids_resolved(self, ok: bool = True) -> None:
        """Answer to ResolveUids; the command that asked runs again, or, if
        the maildrop could not be read, is refused."""
        self._expect(_Waiting.UIDS)
        self._waiting = _Waiting.NOTHING
        line, self._pending_line = self._pending_line, None
        if not ok:
            self._emit(Send(_err("Unique-ids cannot be worked out now.", ResponseCode.SYS_TEMP)))
        elif line is not None:
            self._dispatch(Line(line), macros=False)

    def _uids(self, line: bytes) -> Sequence[str] | None:
        """The UIDs, or None after asking the server to work them out first
        (the command then runs again)."""
        if self._messages.uids_ready:
            return self._messages.uids
        self._pending_line = line
        self._waiting = _Waiting.UIDS
        self._emit(ResolveUids(self._messages))
        return None

    def _mangle_spec(self, args: list[bytes]) -> tuple[list[bytes], manglespec.MangleSpec | None] | None:
        """Split an XMANGLE(...) modifier off the arguments (it may hold
        spaces); without one, -no-mime's spec applies. None: refused."""
        for i, arg in enumerate(args):
            if arg[:7].upper() == b"XMANGLE":
                try:
                    spec = manglespec.parse_modifier(b" ".join(args[i:]).decode("ascii"))
                except ValueError as exc:
                    self._bad(f"Bad XMANGLE modifier: {exc}"[:200])
                    return None
                return args[:i], spec
        return args, (manglespec.NO_MIME if self.mangle else None)

    def _sizes(self, indices: list[int], spec: manglespec.MangleSpec | None, line: bytes) -> dict[int, int] | None:
        """Sizes of these messages as they will be sent; None if some must
        be computed first (the command is then run again)."""
        if spec is None:
            sizes = self._messages.sizes
            return {i: sizes[i] for i in indices}
        missing = tuple(i for i in indices if (spec, i) not in self._mangled_sizes)
        if missing:
            self._pending_line = line
            self._waiting = _Waiting.SIZES
            self._emit(ComputeSizes(spec, missing))
            return None
        return {i: self._mangled_sizes[(spec, i)] for i in indices}

    def submit_done(self, error: ResponseCode | None, text: str = "") -> None:
        """XTND XMIT's message was accepted (error None) or refused."""
        self._expect(_Waiting.SUBMIT)
        self._waiting = _Waiting.NOTHING
        if error is None:
            self._emit(Send(_ok("Message sent successfully.")))
        else:
            self._emit(Send(_err(text or "The mail system did not accept the message.", error)))

    def auth_succeeded(self, user: str) -> None:
        """The credentials were good; `user` is the canonical login name."""
        self._expect(_Waiting.AUTH)
        self.user = user
        self._waiting = _Waiting.MAILDROP
        self._emit(OpenMaildrop(user))

    def auth_failed(self, code: ResponseCode = ResponseCode.AUTH) -> None:
        """Bad credentials (AUTH) or a failing backend (SYS/TEMP)."""
        self._expect(_Waiting.AUTH)
        self._waiting = _Waiting.NOTHING
        self.user = None
        if code is ResponseCode.AUTH:
            self._emit(Send(_err("Authentication failed.", code)))
        else:
            self._emit(Send(_err("Authentication is unavailable, try again later.", code)))

    def maildrop_opened(self, messages: Sequence[MessageInfo]) -> None:
        self._expect(_Waiting.MAILDROP)
        self._waiting = _Waiting.NOTHING
        self._messages = MessageList.of(messages)
        self.state = State.TRANSACTION
        self._bad_commands = 0
        self._last = 0
        self._emit(Send(_ok(self._drop_summary())))

    def maildrop_failed(self, code: ResponseCode) -> None:
        self._expect(_Waiting.MAILDROP)
        self._waiting = _Waiting.NOTHING
        self.user = None
        texts = {
            ResponseCode.IN_USE: "Maildrop is in use by another session.",
            ResponseCode.SYS_PERM: "Maildrop cannot be read; please contact support.",
            ResponseCode.LOGIN_DELAY: "Minimum time between logins has not elapsed.",
        }
        self._emit(Send(_err(texts.get(code, "Maildrop is unavailable, try again later."), code)))

    def commit_done(self, error: ResponseCode | None = None) -> None:
        """UPDATE finished (error None) or failed, leaving the maildrop as it was."""
        self._expect(_Waiting.COMMIT)
        self._waiting = _Waiting.NOTHING
        if error is None:
            left = len(self._messages) - len(self._effective_deletions())
            self._emit(Send(_ok(f"Pop server at {self.config.hostname} signing off ({left} messages left).")))
        else:
            self._emit(Send(_err("Some deleted messages not removed.", error)))
        self._emit(Close("quit"))
        self.state = State.CLOSED

    def message_unavailable(self, index: int) -> None:
        """Message `index`, listed at login, could not be read (none of it
        was sent). It no longer counts as retrieved: auto-delete and the
        Status update must not act on mail the client never got."""
        if index in self._retrieved:
            kept = set(self._retrieved)
            kept.discard(index)
            self._retrieved = kept
        self._emit(Send(_err("Message cannot be read now.", ResponseCode.SYS_TEMP)))

    def internal_error(self) -> None:
        """The server failed while serving this session: tell the client, close."""
        self._effects.clear()
        self._emit(Send(_err("Internal server error.", ResponseCode.SYS_TEMP)))
        self._emit(Close("internal error"))
        self.state = State.CLOSED
        self._waiting = _Waiting.NOTHING

    # ---- internals --------------------------------------------------------

    def _emit(self, effect: Effect) -> None:
        self._effects.append(effect)

    def _expect(self, what: _Waiting) -> None:
        if self._waiting is not what:
            raise RuntimeError(f"session is not waiting for {what.name}")

    def _greeting(self) -> bytes:
        if self.config.shy:
            text = "ready"
        else:
            text = f"Qpopper (version {__version__}-py) at {self.config.hostname} starting."
        if self.config.apop:
            text += "  " + self.timestamp
        return _ok(text)

    def _visible(self) -> list[int]:
        return [i for i in range(len(self._messages)) if i not in self._deleted]

    def _visible_totals(self) -> tuple[int, int]:
        """Messages not marked deleted and their stored octets."""
        sizes = self._messages.sizes
        return len(sizes) - len(self._deleted), sum(sizes) - sum(sizes[i] for i in self._deleted)

    def _drop_summary(self) -> str:
        count, octets = self._visible_totals()
        return f"{self.user} has {count} visible messages (0 hidden) in {octets} octets."

    def _bad(self, text: str) -> None:
        """A command we refuse; too many of them end the session."""
        self._bad_commands += 1
        limit = (
            self.config.max_bad_commands_trans
            if self.state is State.TRANSACTION
            else self.config.max_bad_commands_auth
        )
        if self._bad_commands > limit:
            self._emit(Send(_err("Too many bad commands; closing connection.")))
            self._emit(Close("too many bad commands"))
            self.state = State.CLOSED
            return
        self._emit(Send(_err(text)))

    def _dispatch(self, line: Line, macros: bool = True) -> None:
        data = line.data
        keyword, _, rest = data.partition(b" ")
        keyword = keyword.upper()
        entry = _COMMANDS.get(keyword)
        if entry is None:
            if macros and self.state is State.TRANSACTION and _extensions.run_macro(self, keyword, rest):
                return
            self._bad("Unknown command.")
            return
        handler, states, takes_rest = entry
        if self.state not in states:
            self._bad("Command not valid in this state.")
            return
        if takes_rest:
            args = [rest] if rest else []
        else:
            if data.translate(None, _PRINTABLE):
                self._bad("Invalid characters in command.")
                return
            args = rest.split(b" ") if rest else []
            if b"" in args or (not rest and data.endswith(b" ")):
                self._bad("Malformed command: arguments are separated by one space.")
                return
        handler(self, args, data)

    def _need_args(self, args: list[bytes], low: int, high: int) -> bool:
        if low <= len(args) <= high:
            return True
        self._bad("Wrong number of arguments.")
        return False

    def _message_index(self, arg: bytes) -> int | None:
        """Map a message-number argument to an index, replying on error."""
        number = _parse_number(arg)
        count = len(self._messages)
        if number is None:
            self._bad(f"Parameter must be a number between 1 and {count}.")
            return None
        if not 1 <= number <= count:
            self._emit(Send(_err(f"Message {number} does not exist.")))
            return None
        if number - 1 in self._deleted:
            self._emit(Send(_err(f"Message {number} has been marked for deletion.")))
            return None
        return number - 1

    # ---- AUTHORIZATION ----------------------------------------------------

    def _cmd_user(self, args: list[bytes], _line: bytes) -> None:
        if not self.security.plaintext_allowed:
            self._bad("USER/PASS is not allowed on this connection.")
            return
        if not self._need_args(args, 1, 1):
            return
        name = self._login_name(args[0].decode("ascii"))
        if name is None:
            self.user = None
            self._bad("Invalid user name.")
            return
        self.user = name
        self._emit(Send(_ok(f"Password required for {name}.")))

    def _login_name(self, raw: str) -> str | None:
        """qpopper's user-name processing, then validation."""
        name = raw
        if name.lower().endswith("-no-mime"):
            name = name[: -len("-no-mime")]
            self.mangle = True
        if self.config.downcase_user:
            name = name.lower()
        if self.config.trim_domain:
            name = name.partition("@")[0]
        return name if is_valid_username(name) else None

    def _cmd_pass(self, args: list[bytes], _line: bytes) -> None:
        # PASS takes the rest of the line whole: passwords may hold spaces.
        user, self.user = self.user, None
        if user is None or not self.security.plaintext_allowed:
            self._bad("USER first.")
            return
        if not args:
            self._bad("Wrong number of arguments.")
            return
        password = args[0]
        if password.translate(None, _PASSWORD_BYTES):
            self._bad("Invalid characters in password.")
            return
        self.user = user
        self._waiting = _Waiting.AUTH
        self._emit(Authenticate(UserPass(user, password)))

    def _cmd_apop(self, args: list[bytes], _line: bytes) -> None:
        self.user = None
        if not self.config.apop:
            self._bad("APOP is not enabled.")
            return
        if not self._need_args(args, 2, 2):
            return
        name = self._login_name(args[0].decode("ascii"))
        digest = args[1].decode("ascii").lower()
        if name is None:
            self._bad("Invalid user name.")
            return
        if len(digest) != 32 or any(c not in "0123456789abcdef" for c in digest):
            self._bad("APOP digest must be 32 hexadecimal digits.")
            return
        self.user = name
        self._waiting = _Waiting.AUTH
        self._emit(Authenticate(ApopDigest(name, self.timestamp, digest)))

    def _cmd_quit(self, args: list[bytes], _line: bytes) -> None:
        if not self._need_args(args, 0, 0):
            return
        if self.state is State.TRANSACTION:
            self.state = State.UPDATE
            self._waiting = _Waiting.COMMIT
            self._emit(Commit(frozenset(self._effective_deletions()), frozenset(self._retrieved)))
            return
        self._emit(Send(_ok(f"Pop server at {self.config.hostname} signing off.")))
        self._emit(Close("quit"))
        self.state = State.CLOSED

    def _cmd_capa(self, args: list[bytes], _line: bytes) -> None:
        if not self._need_args(args, 0, 0):
            return
        lines = [b"+OK Capability list follows\r\n"]
        lines += [c.encode("ascii") + b"\r\n" for c in self.capabilities()]
        lines.append(b".\r\n")
        self._emit(Send(b"".join(lines)))

    def capabilities(self) -> list[str]:
        """The CAPA list for the current state (RFC 2449 section 5).

        Everything listed before login is listed after it too; only
        IMPLEMENTATION is held back until login, so versions do not leak
        to unauthenticated peers.
        """
        cfg = self.config
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.security.plaintext_allowed:
            caps.append("USER")
        mechanisms = self.sasl_mechanisms()
        if mechanisms:
            caps.append("SASL " + " ".join(mechanisms))
        if self.security.stls_available and self.state is State.AUTHORIZATION:
            caps.append("STLS")
        if cfg.login_delay is not None:
            caps.append(f"LOGIN-DELAY {cfg.login_delay}")
        if cfg.auto_delete:
            caps.append("EXPIRE 0")
        elif cfg.expire is not None:
            caps.append(f"EXPIRE {cfg.expire}")
        caps.append("XTND XMIT XLST" if cfg.xmit else "XTND XLST")
        caps.append("X-MACRO")
        caps.append(manglespec.CAPABILITY)
        caps.extend(cfg.extra_capabilities)
        if self.state is State.TRANSACTION and not cfg.shy:
            caps.append(f"IMPLEMENTATION {cfg.implementation}")
        return caps

    def sasl_mechanisms(self) -> list[str]:
        """Mechanisms usable on this connection, strongest first."""
        out = []
        for name in self.config.sasl_mechanisms:
            if name in sasl.CLEARTEXT_MECHANISMS and not self.security.plaintext_allowed:
                continue
            if name.endswith("-PLUS") and self.security.channel_binding is None:
                continue
            if name == "EXTERNAL" and self.security.certificate_user is None:
                continue
            if name == "GSSAPI" and self.kerberos is None:
                continue
            out.append(name)
        return out

    def _cmd_stls(self, args: list[bytes], _line: bytes) -> None:
        self.user = None
        if not self._need_args(args, 0, 0):
            return
        if self.security.tls:
            self._emit(Send(_err("TLS is already active.")))
            return
        if not self.security.stls_available:
            self._bad("STLS is not available.")
            return
        # Whatever the client pipelined after STLS came in clear text and
        # must never run as a command (the STARTTLS injection attacks).
        self._buffer.clear()
        self._waiting = _Waiting.TLS
        self._emit(Send(_ok("Begin TLS negotiation now.")))
        self._emit(StartTls())

    def _cmd_auth(self, args: list[bytes], _line: bytes) -> None:
        self.user = None
        if not self._need_args(args, 0, 2):
            return
        if not args:
            listing = "".join(m + "\r\n" for m in self.sasl_mechanisms())
            self._emit(Send(_ok("List of supported mechanisms follows") + listing.encode("ascii") + b".\r\n"))
            return
        name = args[0].decode("ascii").upper()
        mechanism = None
        offered = self.sasl_mechanisms()
        if name in offered:
            # The channel is offered for binding only where a -PLUS mechanism
            # was listed: a client that saw none rightly answers SCRAM with
            # "y" (RFC 5802 section 6), which is a downgrade only if we had.
            binding = self.security.channel_binding if any(m.endswith("-PLUS") for m in offered) else None
            mechanism = sasl.make_mechanism(
                name,
                self.config.hostname,
                binding,
                self.security.certificate_user,
                self.kerberos,
            )
        if mechanism is None:
            self._bad("Unsupported authentication mechanism.")
            return
        initial: bytes | None = None
        if len(args) == 2:
            if mechanism.server_first:
                self._bad("This mechanism takes no initial response.")
                return
            decoded = _b64decode(args[1], initial=True)
            if decoded is None:
                self._bad("Invalid base64 in initial response.")
                return
            initial = decoded
        self._sasl = mechanism
        self._buffer.max_line = SASL_LINE_MAX
        if mechanism.offload:
            self._waiting = _Waiting.SASL_STEP
            self._emit(SaslStep(mechanism, initial, initial=True))
            return
        self._sasl_step(mechanism.start(initial))

    def _sasl_line(self, item: Line | OverlongLine) -> None:
        if isinstance(item, OverlongLine):
            self._end_sasl()
            self._bad("Authentication response too long.")
            return
        if item.data == b"*":
            self._end_sasl()
            self._emit(Send(_err("Authentication cancelled.")))
            return
        decoded = _b64decode(item.data, initial=False)
        if decoded is None:
            self._end_sasl()
            self._bad("Invalid base64 in authentication response.")
            return
        assert self._sasl is not None
        if self._sasl.offload:
            self._waiting = _Waiting.SASL_STEP
            self._emit(SaslStep(self._sasl, decoded, initial=False))
            return
        self._sasl_step(self._sasl.step(decoded))

    def _sasl_step(self, step: sasl.Step) -> None:
        if isinstance(step, sasl.Challenge):
            self._emit(Send(b"+ " + base64.b64encode(step.data) + b"\r\n"))
        elif isinstance(step, sasl.NeedScramSecret):
            self._waiting = _Waiting.SCRAM_SECRET
            self._emit(LookupScramSecret(step.user, step.mechanism))
        elif isinstance(step, sasl.Finish):
            self._end_sasl()
            self.user = step.credentials.user
            self._waiting = _Waiting.AUTH
            self._emit(Authenticate(step.credentials))
        else:
            self._end_sasl()
            self._bad("Authentication exchange failed.")

    def _end_sasl(self) -> None:
        self._sasl = None
        self._buffer.max_line = self.config.max_line

    # ---- TRANSACTION ------------------------------------------------------

    def _cmd_stat(self, args: list[bytes], line: bytes) -> None:
        if not self._need_args(args, 0, 0):
            return
        if not self.mangle:  # stored sizes: two sums, no list of 50,000 numbers
            count, octets = self._visible_totals()
            self._emit(Send(_ok(f"{count} {octets}")))
            return
        visible = self._visible()
        sizes = self._sizes(visible, manglespec.NO_MIME, line)
        if sizes is not None:
            self._emit(Send(_ok(f"{len(visible)} {sum(sizes.values())}")))

    def _cmd_list(self, args: list[bytes], line: bytes) -> None:
        split = self._mangle_spec(args)
        if split is None:
            return
        args, spec = split
        if not self._need_args(args, 0, 1):
            return
        if args:
            index = self._message_index(args[0])
            if index is not None:
                sizes = self._sizes([index], spec, line)
                if sizes is not None:
                    self._emit(Send(_ok(f"{index + 1} {sizes[index]}")))
            return
        visible = self._visible()
        sizes = self._sizes(visible, spec, line)
        if sizes is None:
            return
        head = _ok(f"{len(visible)} visible messages ({sum(sizes.values())} octets)")
        body = "".join(f"{i + 1} {sizes[i]}\r\n" for i in visible)
        self._emit(Send(head + body.encode("ascii") + b".\r\n"))

    def _uid_request(self, args: list[bytes], line: bytes) -> tuple[int | None, Sequence[str]] | None:
        """UIDL/EUIDL's optional message number and the UIDs; None when the
        command was refused or waits for the UIDs to be worked out."""
        if not self._need_args(args, 0, 1):
            return None
        index = self._message_index(args[0]) if args else None
        if args and index is None:
            return None
        uids = self._uids(line)
        return None if uids is None else (index, uids)

    def _cmd_uidl(self, args: list[bytes], line: bytes) -> None:
        request = self._uid_request(args, line)
        if request is None:
            return
        index, uids = request
        if index is not None:
            self._emit(Send(_ok(f"{index + 1} {uids[index]}")))
            return
        body = "".join(f"{i + 1} {uids[i]}\r\n" for i in self._visible())
        self._emit(Send(b"+OK uidl command accepted.\r\n" + body.encode("ascii") + b".\r\n"))

    def _cmd_retr(self, args: list[bytes], line: bytes) -> None:
        split = self._mangle_spec(args)
        if split is None:
            return
        args, spec = split
        if not self._need_args(args, 1, 1):
            return
        index = self._message_index(args[0])
        if index is None:
            return
        sizes = self._sizes([index], spec, line)
        if sizes is None:
            return
        self._retrieved = _with(self._retrieved, index)
        self._last = max(self._last, index + 1)
        self._emit(SendMessage(index, None, _ok(f"{sizes[index]} octets"), spec))

    def _cmd_top(self, args: list[bytes], _line: bytes) -> None:
        split = self._mangle_spec(args)
        if split is None:
            return
        args, spec = split
        if not self._need_args(args, 2, 2):
            return
        lines = _parse_number(args[1])
        if lines is None:
            self._bad("Line count must be a non-negative number.")
            return
        index = self._message_index(args[0])
        if index is None:
            return
        self._last = max(self._last, index + 1)
        self._emit(SendMessage(index, lines, _ok("Message follows."), spec))

    def _cmd_dele(self, args: list[bytes], _line: bytes) -> None:
        if not self._need_args(args, 1, 1):
            return
        number = _parse_number(args[0])
        if number is not None and 1 <= number <= len(self._messages) and number - 1 in self._deleted:
            self._emit(Send(_err(f"Message {number} has already been deleted.")))
            return
        index = self._message_index(args[0])
        if index is None:
            return
        self._deleted = _with(self._deleted, index)
        self._last = max(self._last, index + 1)
        self._emit(Send(_ok(f"Message {index + 1} has been deleted.")))

    def _cmd_noop(self, args: list[bytes], _line: bytes) -> None:
        if self._need_args(args, 0, 0):
            self._emit(Send(_ok("no big woop")))

    def _cmd_rset(self, args: list[bytes], _line: bytes) -> None:
        if not self._need_args(args, 0, 0):
            return
        self._deleted = _NONE
        self._last = 0
        self._emit(Send(_ok(self._drop_summary())))

    def _cmd_last(self, args: list[bytes], _line: bytes) -> None:
        if self._need_args(args, 0, 0):
            # Read before this session (Status/seen flags) or in it, whichever is later.
            last = max(self._messages.last_seen(), self._last)
            self._emit(Send(_ok(f"{last} is the last read message.")))


_AUTH = frozenset({State.AUTHORIZATION})
_TRANS = frozenset({State.TRANSACTION})
_BOTH = _AUTH | _TRANS

# keyword -> (handler, states where it is valid, takes the rest of the line whole)
_COMMANDS: dict[bytes, tuple[_Handler, frozenset[State], bool]] = {
    b"USER": (Session._cmd_user, _AUTH, False),
    b"PASS": (Session._cmd_pass, _AUTH, True),
    b"APOP": (Session._cmd_apop, _AUTH, False),
    b"QUIT": (Session._cmd_quit, _BOTH, False),
    b"STLS": (Session._cmd_stls, _AUTH, False),
    b"AUTH": (Session._cmd_auth, _AUTH, False),
    b"CAPA": (Session._cmd_capa, _BOTH, False),
    b"STAT": (Session._cmd_stat, _TRANS, False),
    b"LIST": (Session._cmd_list, _TRANS, False),
    b"UIDL": (Session._cmd_uidl, _TRANS, False),
    b"RETR": (Session._cmd_retr, _TRANS, False),
    b"TOP": (Session._cmd_top, _TRANS, False),
    b"DELE": (Session._cmd_dele, _TRANS, False),
    b"NOOP": (Session._cmd_noop, _TRANS, False),
    b"RSET": (Session._cmd_rset, _TRANS, False),
    b"LAST": (Session._cmd_last, _TRANS, False),
    b"XTND": (_extensions.cmd_xtnd, _TRANS, False),
    b"EUIDL": (_extensions.cmd_euidl, _TRANS, False),
    b"MDEF": (_extensions.cmd_mdef, _TRANS, True),
}


def _b64decode(data: bytes, *, initial: bool) -> bytes | None:
    """Strict base64; "=" alone is the empty initial response (RFC 5034)."""
    if initial and data == b"=":
        return b""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


def apop_digest(timestamp: str, secret: bytes) -> str:
    """RFC 1939 APOP: hex MD5 of the timestamp followed by the secret."""
    return hashlib.md5(timestamp.encode("ascii") + secret).hexdigest()
