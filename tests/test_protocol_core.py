"""The protocol core as a library: what importing it loads, that a session
is reproducible from its inputs, and the rules of its state machine."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap

import pytest

from helpers import without_coverage
from qpopper.auth.credentials import CramMD5
from qpopper.errors import ResponseCode
from qpopper.maildrop import MessageInfo
from qpopper.protocol import (
    Authenticate,
    Awaiting,
    Close,
    Commit,
    ComputeSizes,
    Entropy,
    Event,
    ListHeaders,
    OpenMaildrop,
    ResolveUids,
    Send,
    SendMessage,
    Session,
    SessionConfig,
    State,
    make_cram_challenge,
    make_timestamp,
)
from qpopper.protocol._state import AWAITED_IN, TRANSITIONS, StateMachine

IO_MODULES = ("asyncio", "socket", "ssl", "threading", "subprocess", "selectors", "logging")


# ---- what `import qpopper.protocol` loads -----------------------------------------


def _loaded_after(code: str) -> list[str]:
    """The I/O modules a fresh interpreter holds after running `code`."""
    probe = code + textwrap.dedent(f"""
        import sys
        print(" ".join(m for m in {IO_MODULES!r} if m in sys.modules))
    """)
    # Not measured: coverage, which CI starts in every subprocess, would load threading and socket itself.
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=without_coverage()
    )
    return out.stdout.split()


def test_importing_the_package_loads_no_io_modules() -> None:
    assert _loaded_after("import qpopper, qpopper.protocol") == []


def test_a_whole_session_with_every_extension_loads_no_io_modules() -> None:
    # Every command family the core serves without the server's help:
    # CAPA, AUTH (CRAM-MD5, PLAIN), APOP, the RFC 1939 set, XTND, EUIDL,
    # MDEF and XMANGLE. SCRAM is left out: its mechanism loads scramp,
    # which imports ssl, once a client starts such an exchange.
    code = textwrap.dedent("""
        from qpopper.maildrop import MessageInfo
        from qpopper.protocol import Authenticate, ComputeSizes, OpenMaildrop, Session, SessionConfig, SubmitMessage
        from qpopper.protocol import Commit

        s = Session(SessionConfig(hostname="h"))
        s.receive_data(b"CAPA\\r\\nAUTH\\r\\nAUTH CRAM-MD5\\r\\n*\\r\\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\\r\\n")
        while (e := s.next_effect()) is not None:
            if isinstance(e, Authenticate):
                s.auth_failed()
        s.receive_data(b"APOP alice 0123456789abcdef0123456789abcdef\\r\\n")
        while (e := s.next_effect()) is not None:
            if isinstance(e, Authenticate):
                s.auth_succeeded("alice")
            elif isinstance(e, OpenMaildrop):
                s.maildrop_opened([MessageInfo(10, "a"), MessageInfo(20, "b")])
        s.receive_data(
            b"STAT\\r\\nLIST\\r\\nUIDL\\r\\nTOP 1 0\\r\\nRETR 1\\r\\nDELE 2\\r\\nRSET\\r\\nLAST\\r\\nNOOP\\r\\n"
            b"XTND XLST Subject\\r\\nEUIDL\\r\\nMDEF s(STAT)\\r\\nS\\r\\nLIST 1 XMANGLE(charset=utf-8)\\r\\n"
            b"XTND XMIT\\r\\nSubject: x\\r\\n\\r\\nbody\\r\\n.\\r\\nQUIT\\r\\n"
        )
        while (e := s.next_effect()) is not None:
            if isinstance(e, ComputeSizes):
                s.sizes_computed(e.spec, {i: 5 for i in e.indices})
            elif isinstance(e, SubmitMessage):
                s.submit_done(None)
            elif isinstance(e, Commit):
                s.commit_done()
        assert s.state.name == "CLOSED", s.state
    """)
    assert _loaded_after(code) == []


# ---- a session replays byte for byte ------------------------------------------------


def _seeded(seed: int) -> SessionConfig:
    clock = iter(range(1_700_000_000_000_000_000, 1_800_000_000_000_000_000, 1_000_003))
    return SessionConfig(
        hostname="pop.example.org",
        entropy=Entropy(pid=lambda: 4242, clock_ns=lambda: next(clock), random_bits=random.Random(seed).getrandbits),
    )


_CLIENT = [
    b"CAPA\r\nAUTH CRAM-MD5\r\n",
    b"YWxpY2UgMDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\r\n",  # "alice <32 hex digits>"
    b"USER alice\r\nPASS secret\r\n",
    b"STAT\r\nLIST\r\nUIDL\r\nRETR 1\r\nTOP 2 1\r\nDELE 1\r\n"
    b"LIST 2 XMANGLE(charset=utf-8)\r\nXTND XLST From\r\nQUIT\r\n",
]


def _replay(config: SessionConfig) -> bytes:
    """Run the same conversation and answer every effect the same way;
    return everything that went out, effects included, as bytes."""
    session = Session(config)
    out = bytearray()
    for chunk in [b"", *_CLIENT]:
        if chunk:
            session.receive_data(chunk)
        while (effect := session.next_effect()) is not None:
            out += effect.data if isinstance(effect, Send) else repr(effect).encode() + b"\n"
            if isinstance(effect, Authenticate):
                if isinstance(effect.credentials, CramMD5):
                    out += effect.credentials.challenge + b"\n"  # not in the repr, but must replay too
                    session.auth_failed()
                else:
                    session.auth_succeeded(effect.credentials.user)
            elif isinstance(effect, OpenMaildrop):
                session.maildrop_opened([MessageInfo(100, "u1"), MessageInfo(200, "u2")])
            elif isinstance(effect, ComputeSizes):
                session.sizes_computed(effect.spec, dict.fromkeys(effect.indices, 77))
            elif isinstance(effect, Commit):
                session.commit_done()
            else:
                assert isinstance(effect, (Send, SendMessage, ListHeaders, Close)), effect
    return bytes(out)


def test_two_sessions_with_the_same_sources_send_the_same_bytes() -> None:
    first, second = _replay(_seeded(7)), _replay(_seeded(7))
    assert first == second
    assert b"<4242." in first and b"+ " in first  # the APOP stamp and the CRAM-MD5 challenge came from them


def test_the_sources_are_what_makes_challenges_differ() -> None:
    assert _replay(_seeded(7)) != _replay(_seeded(8))


def test_timestamp_and_cram_challenge_keep_their_shape() -> None:
    assert make_timestamp("h.example", 12, 3_000_999, 5) == f"<12.{3000 * 2**40 + 5}@h.example>"
    assert make_cram_challenge("h.example", 12, 99) == b"<12.99@h.example>"
    stamp = Entropy().timestamp("h.example")
    assert stamp.startswith("<") and stamp.endswith("@h.example>")
    assert stamp[1:-len("@h.example>")].replace(".", "", 1).isdigit()


def test_a_given_timestamp_still_wins() -> None:
    session = Session(SessionConfig(hostname="h"), timestamp="<1.2@h>")
    greeting = session.next_effect()
    assert isinstance(greeting, Send) and greeting.data.endswith(b"  <1.2@h>\r\n")


# ---- the state machine ----------------------------------------------------------------


def test_every_state_has_a_row_and_every_answer_a_state() -> None:
    assert set(TRANSITIONS) == set(State)
    assert set(AWAITED_IN) == set(Awaiting) - {Awaiting.NOTHING}
    assert all(Event.CLOSE in row for row in TRANSITIONS.values())


def test_moves_the_table_does_not_allow_are_bugs() -> None:
    machine = StateMachine()
    with pytest.raises(RuntimeError):
        machine.fire(Event.COMMITTED)  # no UPDATE without QUIT
    with pytest.raises(RuntimeError):
        machine.wait(Awaiting.COMMIT)  # a commit is awaited in UPDATE only
    machine.wait(Awaiting.AUTH)
    assert not machine.ready
    with pytest.raises(RuntimeError):
        machine.wait(Awaiting.MAILDROP)  # one answer at a time
    with pytest.raises(RuntimeError):
        machine.answered(Awaiting.TLS)
    machine.answered(Awaiting.AUTH)
    machine.fire(Event.LOGGED_IN)
    assert machine.state is State.TRANSACTION and machine.ready
    machine.fire(Event.QUIT)
    assert machine.state is State.UPDATE and not machine.ready
    machine.abort()
    assert machine.state is State.CLOSED and machine.awaiting is Awaiting.NOTHING


def test_a_session_walks_the_table_from_greeting_to_close() -> None:
    session = Session(SessionConfig(hostname="h"), timestamp="<1.2@h>")
    seen = [(session.state, session.awaiting)]
    session.receive_data(b"USER a\r\nPASS b\r\nUIDL\r\nQUIT\r\n")
    while True:
        effect = session.next_effect()
        seen.append((session.state, session.awaiting))
        if isinstance(effect, Authenticate):
            session.auth_succeeded("a")
        elif isinstance(effect, OpenMaildrop):
            session.maildrop_opened([MessageInfo(1, "x")])
        elif isinstance(effect, ResolveUids):
            session.uids_resolved()
        elif isinstance(effect, Commit):
            session.commit_done(ResponseCode.SYS_TEMP)
        elif isinstance(effect, Close):
            break
    assert (State.AUTHORIZATION, Awaiting.AUTH) in seen
    assert (State.AUTHORIZATION, Awaiting.MAILDROP) in seen
    assert (State.UPDATE, Awaiting.COMMIT) in seen
    assert seen[-1] == (State.CLOSED, Awaiting.NOTHING)


def test_xtnd_loads_its_server_half_only_when_asked() -> None:
    assert _loaded_after("import qpopper.extensions.xtnd, qpopper.extensions.xtnd.commands") == []
    assert "subprocess" in _loaded_after("from qpopper.extensions.xtnd import submit, header_lines")
