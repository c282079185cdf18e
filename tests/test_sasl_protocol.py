"""STLS and SASL AUTH in the sans-IO core (checklist rows 77-101)."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
import scramp

from qpopper.auth import sasl
from qpopper.auth.credentials import CramMD5, Rejected, UserPass, Verified
from qpopper.auth.sasl import cram_md5_digest, scram_secret_from_password
from qpopper.protocol import (
    Authenticate,
    ConnectionSecurity,
    LookupScramSecret,
    Send,
    Session,
    SessionConfig,
    StartTls,
)
from test_protocol import STAMP, lines, run

CB = hashlib.sha256(b"certificate").digest()


def session(**security: object) -> Session:
    s = Session(
        SessionConfig(hostname="pop.example.org", sasl_mechanisms=sasl.ALL_MECHANISMS),  # -PLUS configured
        timestamp=STAMP,
        security=ConnectionSecurity(**security),  # type: ignore[arg-type]
    )
    run(s)
    return s


def capa(s: Session) -> list[bytes]:
    out, _ = run(s, b"CAPA\r\n")
    return lines(out)[1:-1]


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def challenge(out: bytes) -> bytes:
    assert out.startswith(b"+ ") and out.endswith(b"\r\n") and out.count(b"\r\n") == 1
    return base64.b64decode(out[2:-2])


# ---- STLS ---------------------------------------------------------------------


def test_stls_listed_only_while_usable_and_session_restarts() -> None:  # rows 77, 78, 82, 83
    s = session(stls_available=True, plaintext_allowed=False)
    before = capa(s)
    assert b"STLS" in before and b"USER" not in before
    assert b"SASL SCRAM-SHA-256 SCRAM-SHA-1 CRAM-MD5" in before
    out, effects = run(s, b"STLS\r\n")
    assert out == b"+OK Begin TLS negotiation now.\r\n" and effects == [StartTls()]
    s.tls_started(ConnectionSecurity(tls=True, plaintext_allowed=True, channel_binding=CB))
    after = capa(s)
    assert b"STLS" not in after and b"USER" in after
    assert b"SASL SCRAM-SHA-256-PLUS SCRAM-SHA-256 SCRAM-SHA-1-PLUS SCRAM-SHA-1 CRAM-MD5 PLAIN LOGIN" in after
    out, _ = run(s, b"STLS\r\n")  # row 79
    assert out.startswith(b"-ERR ")


def test_plaintext_pipelined_after_stls_is_discarded() -> None:  # row 81
    s = session(stls_available=True)
    out, effects = run(s, b"USER alice\r\nSTLS\r\nPASS injected\r\nQUIT\r\n")
    assert effects == [StartTls()]
    s.tls_started(ConnectionSecurity(tls=True))
    out, effects = run(s)
    assert out == b"" and effects == []
    assert s.user is None  # a USER given before STLS is forgotten
    out, _ = run(s, b"PASS x\r\n")
    assert out.startswith(b"-ERR")


def test_stls_refused_when_unavailable_and_after_login() -> None:  # row 80
    s = session()
    out, _ = run(s, b"STLS\r\n")
    assert out.startswith(b"-ERR ")
    assert b"STLS" not in capa(s)


# ---- AUTH ---------------------------------------------------------------------


def test_auth_without_argument_lists_mechanisms() -> None:
    s = session(plaintext_allowed=False)
    out, _ = run(s, b"AUTH\r\n")
    assert lines(out) == [
        b"+OK List of supported mechanisms follows",
        b"SCRAM-SHA-256",
        b"SCRAM-SHA-1",
        b"CRAM-MD5",
        b".",
    ]


@pytest.mark.parametrize("mechanism", [b"KERBEROS_V4", b"PLAIN", b"SCRAM-SHA-256-PLUS"])
def test_unsupported_or_forbidden_mechanism(mechanism: bytes) -> None:  # rows 87, 97
    s = session(plaintext_allowed=False)
    out, effects = run(s, b"AUTH " + mechanism + b"\r\n")
    assert out.startswith(b"-ERR ") and effects == []


def test_plain_without_initial_response_gets_empty_challenge() -> None:  # rows 88, 89
    s = session()
    out, _ = run(s, b"AUTH PLAIN\r\n")
    assert out == b"+ \r\n"
    out, effects = run(s, b64(b"\0test\0test") + b"\r\n")
    assert effects == [Authenticate(UserPass("test", b"test"))]
    assert effects[0].credentials == UserPass("test", b"test")  # type: ignore[attr-defined]


def test_plain_with_initial_response() -> None:  # row 89
    s = session()
    _, effects = run(s, b"AUTH PLAIN dGVzdAB0ZXN0AHRlc3Q=\r\n")
    assert effects[0].credentials == UserPass("test", b"test")  # type: ignore[attr-defined]


def test_plain_empty_initial_response_is_an_empty_message() -> None:  # row 90
    s = session()
    out, effects = run(s, b"AUTH PLAIN =\r\n")
    assert out.startswith(b"-ERR ") and effects == []


def test_cancel_with_star() -> None:  # row 91
    s = session()
    run(s, b"AUTH LOGIN\r\n")
    out, _ = run(s, b"*\r\nCAPA\r\n")
    assert lines(out)[0] == b"-ERR Authentication cancelled."
    assert lines(out)[1].startswith(b"+OK")
    _, effects = run(s, b"AUTH PLAIN " + b64(b"\0a\0b") + b"\r\n")
    assert isinstance(effects[0], Authenticate)


@pytest.mark.parametrize("bad", [b"=AAA", b"AAA=BBB", b"!!!!", b"AAA"])
def test_invalid_base64(bad: bytes) -> None:  # row 92
    s = session()
    run(s, b"AUTH PLAIN\r\n")
    out, effects = run(s, bad + b"\r\n")
    assert out.startswith(b"-ERR ") and effects == []
    out, _ = run(s, b"AUTH PLAIN " + bad + b"\r\n")
    assert out.startswith(b"-ERR ")


def test_initial_response_to_server_first_mechanism() -> None:  # row 93
    s = session()
    out, effects = run(s, b"AUTH CRAM-MD5 " + b64(b"tim x") + b"\r\n")
    assert out.startswith(b"-ERR ") and effects == []


def test_plain_fields_of_255_octets_and_authzid_rules() -> None:  # rows 95, 96
    s = session()
    user = b"u" * 64
    password = b"p" * 255
    run(s, b"AUTH PLAIN\r\n")
    _, effects = run(s, b64(user + b"\0" + user + b"\0" + password) + b"\r\n")
    assert effects[0].credentials == UserPass(user.decode(), password)  # type: ignore[attr-defined]
    s = session()
    _, effects = run(s, b"AUTH PLAIN " + b64(b"admin\0bob\0pw") + b"\r\n")
    assert effects[0].credentials == Rejected("bob", "PLAIN")  # type: ignore[attr-defined]


def test_login_exchange() -> None:
    s = session()
    out, _ = run(s, b"AUTH LOGIN\r\n")
    assert challenge(out) == b"Username:"
    out, _ = run(s, b64(b"alice") + b"\r\n")
    assert challenge(out) == b"Password:"
    _, effects = run(s, b64(b"pass word") + b"\r\n")
    assert effects[0].credentials == UserPass("alice", b"pass word")  # type: ignore[attr-defined]


def test_cram_md5_rfc2195_vector() -> None:  # row 98
    assert (
        cram_md5_digest(b"tanstaaftanstaaf", b"<1896.697170952@postoffice.reston.mci.net>")
        == "b913a602c7eda7a495b4e6e7334d3890"
    )
    s = session()
    out, _ = run(s, b"AUTH CRAM-MD5\r\n")
    ch = challenge(out)
    assert ch.startswith(b"<") and ch.endswith(b"@pop.example.org>")
    digest = hmac.new(b"tanstaaftanstaaf", ch, hashlib.md5).hexdigest()
    _, effects = run(s, b64(b"tim " + digest.encode()) + b"\r\n")
    assert effects[0].credentials == CramMD5("tim", ch, digest)  # type: ignore[attr-defined]


def scram_login(
    s: Session, mechanism: str, password: str, stored: str = "pencil", cb: bytes | None = None
) -> tuple[bytes, list[object]]:
    channel_binding = ("tls-server-end-point", cb) if cb is not None else None
    client = scramp.ScramClient([mechanism], "user", password, channel_binding=channel_binding)
    out, effects = run(s, f"AUTH {mechanism} ".encode() + b64(client.get_client_first().encode()) + b"\r\n")
    assert out == b"" and effects == [LookupScramSecret("user", mechanism.removesuffix("-PLUS"))]
    s.scram_secret(scram_secret_from_password(stored.encode(), mechanism.removesuffix("-PLUS")))
    out, _ = run(s)
    client.set_server_first(challenge(out).decode())
    out, effects = run(s, b64(client.get_client_final().encode()) + b"\r\n")
    if effects:
        return out, effects
    client.set_server_final(challenge(out).decode())  # verifies the server's signature
    return run(s, b"\r\n")


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_scram_success_and_failure(mechanism: str) -> None:  # row 99
    out, effects = scram_login(session(), mechanism, "pencil")
    assert out == b"" and effects == [Authenticate(Verified("user", mechanism))]
    assert effects[0].credentials == Verified("user", mechanism)  # type: ignore[attr-defined]
    out, effects = scram_login(session(), mechanism, "wrong")
    assert effects[0].credentials == Rejected("user", mechanism)  # type: ignore[attr-defined]


def test_scram_plus_binds_to_the_channel() -> None:  # row 100
    s = session(tls=True, channel_binding=CB)
    _, effects = scram_login(s, "SCRAM-SHA-256-PLUS", "pencil", cb=CB)
    assert effects[0].credentials == Verified("user", "SCRAM-SHA-256-PLUS")  # type: ignore[attr-defined]
    # A client that sees another certificate (a man in the middle) fails.
    s = session(tls=True, channel_binding=CB)
    _, effects = scram_login(s, "SCRAM-SHA-256-PLUS", "pencil", cb=hashlib.sha256(b"other").digest())
    assert effects[0].credentials == Rejected("user", "SCRAM-SHA-256-PLUS")  # type: ignore[attr-defined]


def test_scram_downgrade_flag_refused_when_plus_is_offered() -> None:  # row 100
    s = session(tls=True, channel_binding=CB)
    # "y": the client supports binding but believes the server does not.
    first = b"y,,n=user,r=abcdefgh"
    out, effects = run(s, b"AUTH SCRAM-SHA-256 " + b64(first) + b"\r\n")
    s.scram_secret(scram_secret_from_password(b"pencil", "SCRAM-SHA-256"))
    out, effects = run(s)
    assert out.startswith(b"-ERR ") and effects == []


def test_scram_unknown_user_fails_at_the_proof_like_a_wrong_password() -> None:
    s = session()
    client = scramp.ScramClient(["SCRAM-SHA-256"], "ghost", "x")
    run(s, b"AUTH SCRAM-SHA-256 " + b64(client.get_client_first().encode()) + b"\r\n")
    s.scram_secret(None)
    out, _ = run(s)
    client.set_server_first(challenge(out).decode())
    _, effects = run(s, b64(client.get_client_final().encode()) + b"\r\n")
    assert effects[0].credentials == Rejected("ghost", "SCRAM-SHA-256")  # type: ignore[attr-defined]


def test_scram_iterations_at_least_4096() -> None:  # row 101
    assert scram_secret_from_password(b"pw", "SCRAM-SHA-256").iterations >= 4096


def test_sasl_listed_after_login() -> None:  # row 94
    s = session()
    run(s, b"AUTH PLAIN " + b64(b"\0alice\0pw") + b"\r\n")
    s.auth_succeeded("alice")
    run(s)
    s.maildrop_opened([])
    run(s)
    assert any(line.startswith(b"SASL ") for line in capa(s))
    out, _ = run(s, b"AUTH PLAIN\r\n")
    assert out.startswith(b"-ERR ")


def test_long_sasl_response_is_accepted_and_huge_one_refused() -> None:
    s = session()
    run(s, b"AUTH PLAIN\r\n")
    _, effects = run(s, b64(b"\0alice\0" + b"p" * 200) + b"\r\n")
    assert effects
    s = session()
    run(s, b"AUTH LOGIN\r\n")
    out, effects = run(s, b"A" * 20000 + b"\r\nCAPA\r\n")
    assert lines(out)[0] == b"-ERR Authentication response too long." and lines(out)[1].startswith(b"+OK")


def test_send_is_used_for_challenges() -> None:
    s = session()
    s.receive_data(b"AUTH LOGIN\r\n")
    assert s.next_effect() == Send(b"+ VXNlcm5hbWU6\r\n")
