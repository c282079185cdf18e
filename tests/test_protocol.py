"""The sans-IO core driven with bytes: RFC 1939/2449 checklist rows.

Row numbers refer to the conformance checklist at the end of
shared/reference/standards.md.
"""

from __future__ import annotations

import re

import pytest

from qpopper.auth.credentials import ApopDigest, UserPass
from qpopper.errors import ResponseCode
from qpopper.maildrop import MessageInfo
from qpopper.protocol import (
    Authenticate,
    Close,
    Commit,
    OpenMaildrop,
    Send,
    SendMessage,
    Session,
    SessionConfig,
    State,
    apop_digest,
)

STAMP = "<1896.697170952@dbc.mtview.ca.us>"
MESSAGES = [MessageInfo(120, "uid-one"), MessageInfo(200, "uid-two", seen=True), MessageInfo(50, "uid-three")]


def run(session: Session, data: bytes = b"") -> tuple[bytes, list[object]]:
    """Feed data; return all bytes sent and the other effects, in order."""
    if data:
        session.receive_data(data)
    out = b""
    others: list[object] = []
    while (effect := session.next_effect()) is not None:
        if isinstance(effect, Send):
            out += effect.data
        else:
            others.append(effect)
    return out, others


def new_session(**config: object) -> tuple[Session, bytes]:
    session = Session(SessionConfig(hostname="pop.example.org", **config), timestamp=STAMP)  # type: ignore[arg-type]
    greeting, _ = run(session)
    return session, greeting


def logged_in(messages: list[MessageInfo] | None = None, **config: object) -> Session:
    session, _ = new_session(**config)
    _, effects = run(session, b"USER alice\r\nPASS secret\r\n")
    assert isinstance(effects[0], Authenticate)
    session.auth_succeeded("alice")
    _, effects = run(session)
    assert effects == [OpenMaildrop("alice")]
    session.maildrop_opened(MESSAGES if messages is None else messages)
    out, _ = run(session)
    assert out.startswith(b"+OK ")
    return session


def lines(data: bytes) -> list[bytes]:
    assert data.endswith(b"\r\n")
    return data[:-2].split(b"\r\n")


# ---- greeting and lexical rules -----------------------------------------------


def test_greeting_is_one_ok_line_with_apop_stamp() -> None:  # rows 1, 2, 21
    session, greeting = new_session()
    assert greeting.startswith(b"+OK ") and greeting.endswith(b"\r\n")
    assert greeting.count(b"\r\n") == 1 and len(greeting) <= 512
    assert re.findall(rb"<[^<>]*>", greeting) == [STAMP.encode()]
    assert session.state is State.AUTHORIZATION


def test_shy_greeting_hides_version() -> None:
    _, greeting = new_session(shy=True)
    assert greeting == b"+OK ready  " + STAMP.encode() + b"\r\n"


def test_no_stamp_without_apop() -> None:
    _, greeting = new_session(apop=False)
    assert b"<" not in greeting


def test_keywords_case_insensitive_and_replies_upper_case() -> None:  # rows 3, 4, 5
    session = logged_in()
    for cmd in (b"stat", b"Stat", b"STAT", b"sTaT"):
        out, _ = run(session, cmd + b"\r\n")
        assert out == b"+OK 3 370\r\n"


def test_bare_lf_accepted_as_line_end() -> None:
    session = logged_in()
    out, _ = run(session, b"STAT\n")
    assert out == b"+OK 3 370\r\n"


def test_unknown_command_leaves_state_unchanged() -> None:  # row 6
    session, _ = new_session()
    out, _ = run(session, b"FOOB\r\nXYZ 1 2\r\n")
    assert lines(out) == [b"-ERR Unknown command.", b"-ERR Unknown command."]
    assert session.state is State.AUTHORIZATION


@pytest.mark.parametrize(
    "command",
    [b"LIST 1x", b"LIST +1", b"LIST -1", b"LIST 0x1", b"LIST 1 2", b"STAT 1",
     b"RETR", b"RETR a", b"DELE 99999999999", b"TOP 1", b"TOP 1 -1", b"TOP 1 x", b"NOOP x",
     b"UIDL 1\x00", b"RETR \xff"],
)
def test_invalid_arguments_get_err_and_nothing_happens(command: bytes) -> None:  # rows 7, 33, 47
    session = logged_in()
    out, effects = run(session, command + b"\r\n")
    assert out.startswith(b"-ERR ") and out.count(b"\r\n") == 1
    assert effects == []
    out, _ = run(session, b"STAT\r\n")
    assert out == b"+OK 3 370\r\n"


@pytest.mark.parametrize(
    "command", [b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"NOOP", b"RSET", b"TOP 1 1", b"UIDL", b"LAST"]
)
def test_transaction_commands_refused_before_login(command: bytes) -> None:  # row 8
    session, _ = new_session()
    out, effects = run(session, command + b"\r\n")
    assert out == b"-ERR Command not valid in this state.\r\n" and effects == []


@pytest.mark.parametrize("command", [b"USER bob", b"PASS x", b"APOP bob " + b"a" * 32])
def test_authorization_commands_refused_after_login(command: bytes) -> None:  # row 9
    session = logged_in()
    out, effects = run(session, command + b"\r\n")
    assert out.startswith(b"-ERR ") and effects == []
    assert session.user == "alice"


def test_255_octet_command_accepted_and_longer_gets_one_err() -> None:  # rows 10, 11, 12
    session, _ = new_session()
    password = b"p" * (255 - len(b"PASS \r\n"))
    _, effects = run(session, b"USER alice\r\nPASS " + password + b"\r\n")
    assert effects == [Authenticate(UserPass("alice", password))]
    assert effects[0].credentials.password == password  # type: ignore[attr-defined]
    session.auth_failed()
    out, _ = run(session, b"PASS " + password + b"x\r\nCAPA\r\n")
    assert out.startswith(b"-ERR [AUTH] Authentication failed.\r\n-ERR Command line too long.\r\n+OK")


def test_endless_line_is_never_buffered_without_bound() -> None:
    session = logged_in()
    for _ in range(1000):
        session.receive_data(b"A" * 10000)
        assert session.next_effect() is None
        assert session.buffered <= 255
    out, _ = run(session, b"\r\nNOOP\r\n")
    assert lines(out) == [b"-ERR Command line too long.", b"+OK no big woop"]


def test_over_long_line_split_across_reads_is_one_error() -> None:
    session = logged_in()
    for piece in (b"DELE 1" + b"x" * 200, b"y" * 200, b"\r\nDELE 2\r\n"):
        session.receive_data(piece)
    out, _ = run(session)
    assert lines(out) == [b"-ERR Command line too long.", b"+OK Message 2 has been deleted."]


def test_first_response_lines_stay_under_512() -> None:  # row 13
    session = logged_in([MessageInfo(10**15, "u" * 70)] * 3)
    for cmd in (b"STAT", b"LIST 1", b"UIDL 1", b"RETR 1", b"TOP 1 0", b"RSET", b"LAST", b"NOOP", b"CAPA"):
        session.receive_data(cmd + b"\r\n")
        while (effect := session.next_effect()) is not None:
            data = effect.status if isinstance(effect, SendMessage) else getattr(effect, "data", b"")
            if data:
                assert len(data.split(b"\r\n", 1)[0]) + 2 <= 512


# ---- USER / PASS / APOP -----------------------------------------------------


def test_pass_without_user() -> None:  # row 14
    session, _ = new_session()
    out, effects = run(session, b"PASS secret\r\n")
    assert out.startswith(b"-ERR ") and effects == []


def test_pass_takes_the_rest_of_the_line() -> None:  # row 15
    session, _ = new_session()
    _, effects = run(session, b"USER alice\r\nPASS  two  spaces \r\n")
    (auth,) = effects
    assert isinstance(auth, Authenticate)
    assert auth.credentials == UserPass("alice", b" two  spaces ")


def test_user_reply_does_not_reveal_existence() -> None:  # row 16
    # The core cannot know who exists; USER always answers the same way.
    session, _ = new_session()
    out, _ = run(session, b"USER nosuchuser\r\n")
    assert out == b"+OK Password required for nosuchuser.\r\n"


@pytest.mark.parametrize("name", [b"../etc", b"a/b", b".hidden", b"x" * 65, b"a%sb", b"a;b", b"a$b"])
def test_dangerous_user_names_refused_before_anything(name: bytes) -> None:
    session, _ = new_session()
    out, effects = run(session, b"USER " + name + b"\r\nPASS pw\r\n")
    assert lines(out) == [b"-ERR Invalid user name.", b"-ERR USER first."]
    assert effects == []


def test_successful_login_enters_transaction_with_nothing_deleted() -> None:  # row 17
    session = logged_in()
    assert session.state is State.TRANSACTION
    assert session.marked_deleted == frozenset()
    out, _ = run(session, b"STAT\r\n")
    assert out == b"+OK 3 370\r\n"


def test_wrong_password_stays_in_authorization_and_user_again_works() -> None:  # row 18, 75
    session, _ = new_session()
    run(session, b"USER alice\r\nPASS wrong\r\n")
    session.auth_failed()
    out, _ = run(session, b"PASS again\r\n")
    assert out == b"-ERR [AUTH] Authentication failed.\r\n-ERR USER first.\r\n"
    assert session.state is State.AUTHORIZATION
    _, effects = run(session, b"USER alice\r\nPASS secret\r\n")
    assert isinstance(effects[0], Authenticate)


def test_backend_failure_is_sys_temp_not_auth() -> None:  # row 76
    session, _ = new_session()
    run(session, b"USER alice\r\nPASS x\r\n")
    session.auth_failed(ResponseCode.SYS_TEMP)
    out, _ = run(session)
    assert out.startswith(b"-ERR [SYS/TEMP] ")


def test_locked_maildrop_is_in_use_and_session_stays_in_authorization() -> None:  # rows 19, 71
    session, _ = new_session()
    run(session, b"USER alice\r\nPASS secret\r\n")
    session.auth_succeeded("alice")
    run(session)
    session.maildrop_failed(ResponseCode.IN_USE)
    out, _ = run(session, b"STAT\r\n")
    assert lines(out) == [
        b"-ERR [IN-USE] Maildrop is in use by another session.",
        b"-ERR Command not valid in this state.",
    ]


def test_apop_rfc1939_vector_passed_through() -> None:  # rows 23, 24
    session, _ = new_session()
    digest = apop_digest(STAMP, b"tanstaaf")
    assert digest == "c4c9334bac560ecc979e58001b3e22fb"
    _, effects = run(session, b"APOP mrose " + digest.upper().encode() + b"\r\n")
    assert effects == [Authenticate(ApopDigest("mrose", STAMP, digest))]
    assert effects[0].credentials.digest == digest  # type: ignore[attr-defined]


@pytest.mark.parametrize("args", [b"mrose", b"mrose abc", b"mrose " + b"g" * 32, b"mrose " + b"a" * 33])
def test_apop_malformed(args: bytes) -> None:
    session, _ = new_session()
    out, effects = run(session, b"APOP " + args + b"\r\n")
    assert out.startswith(b"-ERR ") and effects == []


def test_quit_in_authorization() -> None:  # row 25
    session, _ = new_session()
    out, effects = run(session, b"QUIT\r\nUSER alice\r\n")
    assert out == b"+OK Pop server at pop.example.org signing off.\r\n"
    assert effects == [Close("quit")]
    assert session.state is State.CLOSED


# ---- TRANSACTION --------------------------------------------------------------


def test_stat_and_list_exclude_deleted() -> None:  # rows 26, 27, 29, 31, 32
    session = logged_in()
    out, _ = run(session, b"DELE 2\r\nSTAT\r\nLIST\r\nLIST 3\r\nLIST 2\r\nLIST 4\r\n")
    assert lines(out) == [
        b"+OK Message 2 has been deleted.",
        b"+OK 2 170",
        b"+OK 2 visible messages (170 octets)",
        b"1 120",
        b"3 50",
        b".",
        b"+OK 3 50",
        b"-ERR Message 2 has been marked for deletion.",
        b"-ERR Message 4 does not exist.",
    ]


def test_list_of_empty_maildrop() -> None:  # row 30
    session = logged_in([])
    out, _ = run(session, b"LIST\r\nUIDL\r\nSTAT\r\n")
    assert lines(out) == [b"+OK 0 visible messages (0 octets)", b".", b"+OK uidl command accepted.", b".", b"+OK 0 0"]


def test_retr_asks_to_stream_with_size() -> None:  # rows 34, 38
    session = logged_in()
    out, effects = run(session, b"RETR 2\r\n")
    assert out == b"" and effects == [SendMessage(1, None, b"+OK 200 octets\r\n")]
    run(session, b"DELE 2\r\n")
    out, effects = run(session, b"RETR 2\r\n")
    assert out.startswith(b"-ERR ") and effects == []


def test_unreadable_message_gets_sys_temp() -> None:
    session = logged_in()
    run(session, b"RETR 1\r\n")
    session.message_unavailable(0)
    out, _ = run(session, b"NOOP\r\n")
    assert lines(out) == [b"-ERR [SYS/TEMP] Message cannot be read now.", b"+OK no big woop"]


def test_an_unreadable_message_is_not_retrieved_for_auto_delete() -> None:
    """Auto-delete removes what was retrieved: a message that could not be
    sent must stay (so must one sent earlier that fails the second time)."""
    session = logged_in(auto_delete=True)
    run(session, b"RETR 1\r\nRETR 2\r\n")
    session.message_unavailable(0)
    _, effects = run(session, b"QUIT\r\n")
    commit = next(e for e in effects if isinstance(e, Commit))
    assert commit.deleted == frozenset({1}) and commit.retrieved == frozenset({1})


def test_dele_twice_and_numbers_stay() -> None:  # rows 39, 40
    session = logged_in()
    out, effects = run(session, b"DELE 1\r\nDELE 1\r\nRETR 2\r\n")
    assert lines(out) == [b"+OK Message 1 has been deleted.", b"-ERR Message 1 has already been deleted."]
    assert effects == [SendMessage(1, None, b"+OK 200 octets\r\n")]


def test_noop_and_rset() -> None:  # rows 42, 43
    session = logged_in()
    out, _ = run(session, b"STAT\r\nDELE 1\r\nDELE 3\r\nRSET\r\nSTAT\r\nNOOP\r\n")
    got = lines(out)
    assert got[0] == got[4] == b"+OK 3 370"
    assert got[3] == b"+OK alice has 3 visible messages (0 hidden) in 370 octets."
    assert got[5] == b"+OK no big woop"
    assert session.marked_deleted == frozenset()


def test_top() -> None:  # rows 44-47
    session = logged_in()
    _, effects = run(session, b"TOP 1 0\r\nTOP 3 99999\r\n")
    assert effects == [
        SendMessage(0, 0, b"+OK Message follows.\r\n"),
        SendMessage(2, 99999, b"+OK Message follows.\r\n"),
    ]


def test_uidl() -> None:  # rows 48, 53
    session = logged_in()
    out, _ = run(session, b"UIDL\r\nUIDL 2\r\nDELE 2\r\nUIDL\r\nUIDL 2\r\n")
    assert lines(out) == [
        b"+OK uidl command accepted.",
        b"1 uid-one",
        b"2 uid-two",
        b"3 uid-three",
        b".",
        b"+OK 2 uid-two",
        b"+OK Message 2 has been deleted.",
        b"+OK uidl command accepted.",
        b"1 uid-one",
        b"3 uid-three",
        b".",
        b"-ERR Message 2 has been marked for deletion.",
    ]


def test_last_starts_at_seen_and_follows_access() -> None:
    session = logged_in()
    out, _ = run(session, b"LAST\r\n")
    assert out == b"+OK 2 is the last read message.\r\n"
    run(session, b"RETR 3\r\n")
    out, _ = run(session, b"LAST\r\nRSET\r\nLAST\r\n")
    assert lines(out)[0] == b"+OK 3 is the last read message."
    assert lines(out)[-1] == b"+OK 2 is the last read message."


def test_quit_in_transaction_commits_exactly_the_marked() -> None:  # row 54
    session = logged_in()
    _, effects = run(session, b"RETR 1\r\nDELE 2\r\nQUIT\r\nDELE 3\r\n")
    assert effects[-1] == Commit(frozenset({1}), frozenset({0}))
    assert session.state is State.UPDATE
    session.commit_done()
    out, effects = run(session)
    assert out == b"+OK Pop server at pop.example.org signing off (2 messages left).\r\n"
    assert effects == [Close("quit")]


def test_failed_commit_says_so_and_closes() -> None:  # row 56
    session = logged_in()
    run(session, b"DELE 1\r\nQUIT\r\n")
    session.commit_done(ResponseCode.SYS_TEMP)
    out, effects = run(session)
    assert out == b"-ERR [SYS/TEMP] Some deleted messages not removed.\r\n" and effects == [Close("quit")]


def test_lost_connection_commits_nothing() -> None:  # row 57 (the server acts on in_transaction)
    session = logged_in()
    run(session, b"DELE 1\r\n")
    session.receive_data(b"")
    assert session.in_transaction and session.next_effect() is None


# ---- CAPA and pipelining ------------------------------------------------------


def capa(session: Session) -> list[bytes]:
    out, _ = run(session, b"CAPA\r\n")
    got = lines(out)
    assert got[0].startswith(b"+OK") and got[-1] == b"."
    return got[1:-1]


def test_capa_in_both_states() -> None:  # rows 62-65, 69
    session, _ = new_session()
    before = capa(session)
    for tag in (b"TOP", b"UIDL", b"USER", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING", b"EXPIRE NEVER"):
        assert tag in before
    assert not any(line.startswith(b"IMPLEMENTATION") for line in before)
    session = logged_in()
    after = capa(session)
    assert set(before) <= set(after)
    assert any(line.startswith(b"IMPLEMENTATION ") for line in after)
    for line in before + after:
        assert len(line) + 2 <= 512 and not line.startswith(b".")


def test_capa_login_delay_and_no_user_when_plaintext_refused() -> None:  # row 66
    session, _ = new_session(login_delay=900, expire="30", allow_user_pass=False)
    got = capa(session)
    assert b"LOGIN-DELAY 900" in got and b"EXPIRE 30" in got and b"USER" not in got
    out, effects = run(session, b"USER alice\r\n")
    assert out.startswith(b"-ERR") and effects == []


def test_pipelined_burst_answered_in_order() -> None:  # rows 73, 74
    session, _ = new_session()
    session.receive_data(b"USER alice\r\nPASS secret\r\nSTAT\r\nLIST 1\r\nQUIT\r\n")
    first = session.next_effect()
    assert first == Send(b"+OK Password required for alice.\r\n")
    assert isinstance(session.next_effect(), Authenticate)
    assert session.next_effect() is None  # waits for the answer; STAT is not run yet
    session.auth_succeeded("alice")
    assert session.next_effect() == OpenMaildrop("alice")
    session.maildrop_opened(MESSAGES)
    out, effects = run(session)
    assert lines(out) == [b"+OK alice has 3 visible messages (0 hidden) in 370 octets.", b"+OK 3 370", b"+OK 1 120"]
    assert effects == [Commit(frozenset(), frozenset())]


def test_failed_pass_in_pipeline_then_stat_is_refused() -> None:
    session, _ = new_session()
    session.receive_data(b"USER alice\r\nPASS bad\r\nSTAT\r\n")
    run(session)
    session.auth_failed()
    out, _ = run(session)
    assert lines(out) == [b"-ERR [AUTH] Authentication failed.", b"-ERR Command not valid in this state."]


def test_resp_texts_never_start_with_bracket_unless_code() -> None:  # row 70
    session = logged_in()
    out, _ = run(session, b"RETR 9\r\nFOO\r\nLIST x\r\nDELE 0\r\n")
    for line in lines(out):
        text = line.split(b" ", 1)[1]
        assert not text.startswith(b"[")


def test_error_replies_never_echo_client_input() -> None:
    session = logged_in()
    out, _ = run(session, b"XSECRET hunter2\r\nLIST hunter2\r\nTOP 1 hunter2\r\n")
    assert b"hunter2" not in out and b"XSECRET" not in out


def test_too_many_bad_commands_close_the_session() -> None:
    session, _ = new_session(max_bad_commands_auth=3)
    out, effects = run(session, b"A\r\nB\r\nC\r\nD\r\nE\r\n")
    assert lines(out)[-1] == b"-ERR Too many bad commands; closing connection."
    assert effects == [Close("too many bad commands")]
    assert session.state is State.CLOSED


def test_internal_error_reports_sys_temp_and_closes() -> None:
    session = logged_in()
    session.internal_error()
    out, effects = run(session, b"STAT\r\n")
    assert out == b"-ERR [SYS/TEMP] Internal server error.\r\n" and effects == [Close("internal error")]


def test_answering_an_effect_not_asked_for_is_a_bug() -> None:
    session, _ = new_session()
    with pytest.raises(RuntimeError):
        session.auth_succeeded("alice")
