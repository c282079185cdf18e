"""Driving the protocol core blindly: feed chunks, answer every effect with
something plausible, and check the invariants (no exception, a bounded input
buffer, no endless stream of effects). Shared by the hypothesis tests and the
atheris fuzzer."""

from __future__ import annotations

import random

from qpopper.auth.credentials import Rejected
from qpopper.errors import ResponseCode
from qpopper.maildrop import MessageInfo
from qpopper.protocol import (
    Authenticate,
    Close,
    Commit,
    ComputeSizes,
    Effect,
    ListHeaders,
    LookupScramSecret,
    OpenMaildrop,
    SaslStep,
    Send,
    SendMessage,
    Session,
    StartTls,
    SubmitMessage,
)

# The largest line the core may hold: an AUTH line or SASL response.
BUFFER_BOUND = 16384 + 1


class Finding(AssertionError):
    pass


def drive_blindly(session: Session, chunks: list[bytes], rng: random.Random) -> None:
    for chunk in chunks:
        session.receive_data(chunk)
        for _ in range(10_000):
            effect = session.next_effect()
            if effect is None:
                break
            if isinstance(effect, Close):
                return
            _answer_blindly(session, effect, rng)
            if session.buffered > BUFFER_BOUND:
                raise Finding("unbounded input buffer")
        else:
            raise Finding("effects without end")


def _answer_blindly(session: Session, effect: Effect, rng: random.Random) -> None:
    """Answer one effect as a driver might: success or failure, picked by `rng`."""
    if isinstance(effect, Authenticate):
        if rng.random() < 0.5 and not isinstance(effect.credentials, Rejected):
            session.auth_succeeded(effect.credentials.user)
        else:
            session.auth_failed(rng.choice([ResponseCode.AUTH, ResponseCode.SYS_TEMP]))
    elif isinstance(effect, OpenMaildrop):
        if rng.random() < 0.8:
            count = rng.randrange(0, 5)
            session.maildrop_opened([MessageInfo(rng.randrange(1, 10**6), f"uid{i}") for i in range(count)])
        else:
            session.maildrop_failed(ResponseCode.IN_USE)
    elif isinstance(effect, Commit):
        session.commit_done(None if rng.random() < 0.7 else ResponseCode.SYS_TEMP)
    elif isinstance(effect, StartTls):
        session.tls_started(session.security)
    elif isinstance(effect, LookupScramSecret):
        session.scram_secret(None)
    elif isinstance(effect, SubmitMessage):
        session.submit_done(None)
    elif isinstance(effect, ComputeSizes):
        session.sizes_computed(effect.spec, dict.fromkeys(effect.indices, 10))
    elif isinstance(effect, SaslStep):
        raise Finding("an offloaded SASL step without an offloading mechanism configured")
    elif isinstance(effect, SendMessage):
        if rng.random() < 0.1:
            session.message_unavailable(effect.index)
    elif not isinstance(effect, (Send, ListHeaders)):
        raise Finding(f"unknown effect {effect!r}")
