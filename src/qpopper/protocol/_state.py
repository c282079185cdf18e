"""Where a session is, and the only code that moves it.

Two rules keep this file honest. Everything that changes `state` or
`awaiting` is a method of `StateMachine` below; nothing else assigns them.
And the transitions are data: `TRANSITIONS` says which event leads where
from each state, `AWAITED_IN` in which state each answer of the server may
be awaited. A move the tables do not allow is a bug of ours and raises
`RuntimeError`; the client can never cause one, because the command tables
only run a command in the states it is valid in.

    AUTHORIZATION --LOGGED_IN--> TRANSACTION --QUIT--> UPDATE --COMMITTED--> CLOSED
          |                           |                   |
          +--QUIT / CLOSE--> CLOSED <-+------CLOSE--------+
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    """The POP3 states of RFC 1939, and CLOSED once the session is over."""

    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"
    CLOSED = "CLOSED"

    # Members are singletons compared by identity: hash them the same way,
    # in C. Enum's own __hash__ is Python code, run on every command that
    # looks its state up in a table.
    __hash__ = object.__hash__


class Event(enum.Enum):
    """What moves a session from one state to another."""

    LOGGED_IN = enum.auto()  # the maildrop is open
    QUIT = enum.auto()
    COMMITTED = enum.auto()  # UPDATE finished, well or not
    CLOSE = enum.auto()  # too many bad commands, or an internal error

    __hash__ = object.__hash__  # as State's


class Awaiting(enum.Enum):
    """The server's answer the session waits for before it reads on."""

    NOTHING = enum.auto()
    AUTH = enum.auto()  # auth_succeeded / auth_failed
    MAILDROP = enum.auto()  # maildrop_opened / maildrop_failed
    COMMIT = enum.auto()  # commit_done
    TLS = enum.auto()  # tls_started
    SCRAM_SECRET = enum.auto()  # scram_secret
    SASL_STEP = enum.auto()  # sasl_step_done
    SIZES = enum.auto()  # sizes_computed
    UIDS = enum.auto()  # uids_resolved
    SUBMIT = enum.auto()  # submit_done

    __hash__ = object.__hash__  # as State's


TRANSITIONS: dict[State, dict[Event, State]] = {
    State.AUTHORIZATION: {Event.LOGGED_IN: State.TRANSACTION, Event.QUIT: State.CLOSED, Event.CLOSE: State.CLOSED},
    State.TRANSACTION: {Event.QUIT: State.UPDATE, Event.CLOSE: State.CLOSED},
    State.UPDATE: {Event.COMMITTED: State.CLOSED, Event.CLOSE: State.CLOSED},
    State.CLOSED: {Event.CLOSE: State.CLOSED},
}

AWAITED_IN: dict[Awaiting, State] = {
    Awaiting.AUTH: State.AUTHORIZATION,
    Awaiting.MAILDROP: State.AUTHORIZATION,
    Awaiting.TLS: State.AUTHORIZATION,
    Awaiting.SCRAM_SECRET: State.AUTHORIZATION,
    Awaiting.SASL_STEP: State.AUTHORIZATION,
    Awaiting.SIZES: State.TRANSACTION,
    Awaiting.UIDS: State.TRANSACTION,
    Awaiting.SUBMIT: State.TRANSACTION,
    Awaiting.COMMIT: State.UPDATE,
}

# States in which the client's commands are read.
READING = (State.AUTHORIZATION, State.TRANSACTION)


class StateMachine:
    """The state and the awaited answer, plus `ready`: whether the next
    command line may be read now. Session inherits from it, so reading
    these costs no more than reading any attribute of the session."""

    __slots__ = ("awaiting", "ready", "state")

    def __init__(self) -> None:
        self.state = State.AUTHORIZATION
        self.awaiting = Awaiting.NOTHING
        self.ready = True

    def fire(self, event: Event) -> None:
        """Take the transition `event` triggers in the current state."""
        target = TRANSITIONS[self.state].get(event)
        if target is None:
            raise RuntimeError(f"{event.name} is not allowed in {self.state.name}")
        self.state = target
        self.ready = self.awaiting is Awaiting.NOTHING and target in READING

    def wait(self, what: Awaiting) -> None:
        """Stop reading commands until the server answers `what`."""
        if self.awaiting is not Awaiting.NOTHING:
            raise RuntimeError(f"session already waits for {self.awaiting.name}")
        if AWAITED_IN[what] is not self.state:
            raise RuntimeError(f"{what.name} is not awaited in {self.state.name}")
        self.awaiting = what
        self.ready = False

    def answered(self, what: Awaiting) -> None:
        """The server answered `what`; commands may be read again."""
        if self.awaiting is not what:
            raise RuntimeError(f"session is not waiting for {what.name}")
        self.awaiting = Awaiting.NOTHING
        self.ready = self.state in READING

    def abort(self) -> None:
        """Close from anywhere, forgetting whatever was awaited (internal errors)."""
        self.awaiting = Awaiting.NOTHING
        self.fire(Event.CLOSE)
