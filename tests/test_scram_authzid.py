"""SCRAM with an authorisation identity in the GS2 header (issue 26, item 2).

The client side is written out here from RFC 5802 rather than taken from
scramp, whose client never sends an authzid: these messages are what
neomutt's GNU SASL sends (`n,a=user,n=user,r=...`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import socket
from pathlib import Path

import pytest

from qpopper.auth.credentials import Rejected, Verified
from qpopper.auth.sasl import scram_secret_from_password
from qpopper.protocol import Authenticate, LookupScramSecret, Session
from test_protocol import run
from test_sasl_protocol import CB, b64, challenge, session

MECHANISMS = ["SCRAM-SHA-256", "SCRAM-SHA-1", "SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS"]


class Client:
    """RFC 5802's client computations, for one exchange."""

    def __init__(
        self,
        mechanism: str,
        password: bytes,
        gs2_header: str,
        cb_data: bytes = b"",
        nonce: str = "fyko+d2lbbFgONRv9qkxdawL",
    ) -> None:
        self.hash = hashlib.sha256 if mechanism.startswith("SCRAM-SHA-256") else hashlib.sha1
        self.password = password
        self.gs2_header = gs2_header  # what c= binds to
        self.sent_header = gs2_header  # what client-first carries
        self.cb_data = cb_data
        self.bare = f"n=user,r={nonce}"
        self.server_signature = b""

    def first(self) -> bytes:
        return f"{self.sent_header}{self.bare}".encode()

    def final(self, server_first: str) -> bytes:
        fields = dict(item.split("=", 1) for item in server_first.split(","))
        salted = hashlib.pbkdf2_hmac(self.hash().name, self.password, base64.b64decode(fields["s"]), int(fields["i"]))
        client_key = hmac.new(salted, b"Client Key", self.hash).digest()
        stored_key = self.hash(client_key).digest()
        cbind = base64.b64encode(self.gs2_header.encode() + self.cb_data).decode()
        without_proof = f"c={cbind},r={fields['r']}"
        message = f"{self.bare},{server_first},{without_proof}".encode()
        signature = hmac.new(stored_key, message, self.hash).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.new(salted, b"Server Key", self.hash).digest()
        self.server_signature = hmac.new(server_key, message, self.hash).digest()
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()


def test_the_client_here_computes_rfc_7677s_example() -> None:
    client = Client("SCRAM-SHA-256", b"pencil", "n,,", nonce="rOprNGfwEbeRWgbNEkqO")
    final = client.final("r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    assert (
        final
        == b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    assert base64.b64encode(client.server_signature) == b"6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def exchange(mechanism: str, client: Client, password: bytes = b"pencil") -> tuple[Session, bytes, list[object]]:
    plus = mechanism.endswith("-PLUS")
    s = session(tls=True, channel_binding=CB) if plus else session()
    out, effects = run(s, f"AUTH {mechanism} ".encode() + b64(client.first()) + b"\r\n")
    base = mechanism.removesuffix("-PLUS")
    if effects != [LookupScramSecret("user", base)]:
        return s, out, effects
    s.scram_secret(scram_secret_from_password(password, base))
    out, _ = run(s)
    out, effects = run(s, b64(client.final(challenge(out).decode())) + b"\r\n")
    return s, out, effects


def header(mechanism: str, authzid: str) -> str:
    flag = "p=tls-server-end-point" if mechanism.endswith("-PLUS") else "n"
    return f"{flag},{authzid},"


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_an_authzid_equal_to_the_user_logs_in(mechanism: str) -> None:
    client = Client(mechanism, b"pencil", header(mechanism, "a=user"), CB if mechanism.endswith("-PLUS") else b"")
    s, out, effects = exchange(mechanism, client)
    assert effects == []
    assert challenge(out) == b"v=" + base64.b64encode(client.server_signature)
    _, effects = run(s, b"\r\n")
    assert effects == [Authenticate(Verified("user", mechanism))]


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_an_authzid_naming_another_user_is_a_failed_login(mechanism: str) -> None:
    client = Client(mechanism, b"pencil", header(mechanism, "a=other"), CB if mechanism.endswith("-PLUS") else b"")
    _, out, effects = exchange(mechanism, client)
    assert out == b"" and effects == [Authenticate(Rejected("user", mechanism))]


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_a_wrong_password_with_an_authzid_still_fails(mechanism: str) -> None:
    client = Client(mechanism, b"wrong", header(mechanism, "a=user"), CB if mechanism.endswith("-PLUS") else b"")
    _, _, effects = exchange(mechanism, client)
    assert effects == [Authenticate(Rejected("user", mechanism))]


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_the_binding_covers_the_header_as_sent(mechanism: str) -> None:
    # c= must encode the GS2 header with its authzid: a client that binds
    # to another header (or, for -PLUS, another certificate) fails.
    client = Client(mechanism, b"pencil", header(mechanism, ""), CB if mechanism.endswith("-PLUS") else b"")
    client.sent_header = header(mechanism, "a=user")
    _, _, effects = exchange(mechanism, client)
    assert effects == [Authenticate(Rejected("user", mechanism))]
    if mechanism.endswith("-PLUS"):
        other = Client(mechanism, b"pencil", header(mechanism, "a=user"), hashlib.sha256(b"other").digest())
        _, _, effects = exchange(mechanism, other)
        assert effects == [Authenticate(Rejected("user", mechanism))]


@pytest.mark.parametrize("authzid", ["b=user", "a=", "a=us=er"])
def test_a_malformed_authzid_is_a_malformed_exchange(authzid: str) -> None:
    _, out, effects = exchange("SCRAM-SHA-256", Client("SCRAM-SHA-256", b"pencil", f"n,{authzid},"))
    assert out.startswith(b"-ERR ") and effects == []


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_a_real_server_takes_neomutts_client_first(tmp_path: Path, mechanism: str) -> None:
    from qpopper import Controller, StaticAuthenticator

    (tmp_path / "user").write_bytes(b"From a@b Sat Jan  3 01:05:34 1996\nSubject: x\n\nhello\n")
    auth = StaticAuthenticator({"user": "pencil"}, mail_location=f"mbox:{tmp_path}/%u")
    with Controller(authenticator=auth, apop_file=str(tmp_path / "pop.auth")) as pop:
        for authzid, expected in (("a=user", b"+OK"), ("a=other", b"-ERR")):
            with socket.create_connection((pop.host, pop.port), timeout=10) as sock:
                reader = sock.makefile("rb")
                reader.readline()
                client = Client(mechanism, b"pencil", f"n,{authzid},")
                sock.sendall(f"AUTH {mechanism} ".encode() + b64(client.first()) + b"\r\n")
                reply = reader.readline()
                if authzid == "a=user":
                    sock.sendall(b64(client.final(base64.b64decode(reply[2:]).decode())) + b"\r\n")
                    assert base64.b64decode(reader.readline()[2:]) == b"v=" + base64.b64encode(client.server_signature)
                    sock.sendall(b"\r\n")
                    reply = reader.readline()
                assert reply.startswith(expected), reply
                if expected == b"+OK":
                    sock.sendall(b"STAT\r\n")
                    assert reader.readline().startswith(b"+OK 1 ")
                sock.sendall(b"QUIT\r\n")
