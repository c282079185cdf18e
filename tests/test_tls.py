"""TLS end to end with real clients: poplib, curl, openssl s_client, fetchmail."""

from __future__ import annotations

import base64
import poplib
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import scramp
import trustme
from cryptography import x509

import rawpop
from conftest import PASSWORD
from qpopper import Controller, ListenAddress, Options, StaticAuthenticator
from qpopper.auth.cleartext import plaintext_allowed
from qpopper.auth.sasl import ALL_MECHANISMS
from qpopper.errors import ConfigError
from qpopper.server import Server
from qpopper.server._channel_binding import server_end_point
from test_channel_binding import _reference as reference_binding

Fill = Callable[[str, list[bytes]], Path]
MSG = b"From: a@example.org\nSubject: over TLS\n\n.dot\nbody\n"


class Certs:
    def __init__(self, base: Path) -> None:
        self.ca = trustme.CA()
        leaf = self.ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
        self.cert = base / "cert.pem"
        self.key = base / "key.pem"
        self.ca_file = base / "ca.pem"
        leaf.cert_chain_pems[0].write_to_path(str(self.cert))
        leaf.private_key_pem.write_to_path(str(self.key))
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        return ctx


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


@pytest.fixture
def tls_server(certs: Certs, mailroot: Path) -> Iterator[Controller]:
    """STLS on one port, implicit TLS on another; clear-text policy automatic;
    every mechanism offered, the -PLUS ones included."""
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    with Controller(
        authenticator=auth,
        sasl_mechanisms=ALL_MECHANISMS,
        listen=(ListenAddress("127.0.0.1", 0), ListenAddress("127.0.0.1", 0, tls=True)),
        tls_cert_file=str(certs.cert),
        tls_key_file=str(certs.key),
    ) as server:
        yield server


def ports(server: Controller) -> tuple[int, int]:
    plain = next(p for _, p, tls in server.server.listeners if not tls)
    implicit = next(p for _, p, tls in server.server.listeners if tls)
    return plain, implicit


def test_poplib_stls_then_login(tls_server: Controller, certs: Certs, fill: Fill) -> None:
    fill("alice", [MSG])
    plain, _ = ports(tls_server)
    client = poplib.POP3("127.0.0.1", plain, timeout=10)
    caps = client.capa()
    assert "STLS" in caps
    client.stls(context=certs.client_context())
    caps = client.capa()
    assert "STLS" not in caps and "SASL" in caps
    client.user("alice")
    client.pass_(PASSWORD)
    assert client.retr(1)[1] == MSG.rstrip(b"\n").split(b"\n")
    client.quit()


def test_poplib_implicit_tls(tls_server: Controller, certs: Certs, fill: Fill) -> None:  # row 85
    fill("alice", [MSG])
    _, implicit = ports(tls_server)
    client = poplib.POP3_SSL("127.0.0.1", implicit, context=certs.client_context(), timeout=10)
    assert client.getwelcome().startswith(b"+OK")
    assert "STLS" not in client.capa()
    client.apop("alice", PASSWORD)
    assert client.stat()[0] == 1
    client.quit()


def test_wrong_certificate_is_detected_by_the_client(tls_server: Controller) -> None:
    _, implicit = ports(tls_server)
    other_ca = trustme.CA()
    ctx = ssl.create_default_context()
    other_ca.configure_trust(ctx)
    with pytest.raises(ssl.SSLCertVerificationError):
        poplib.POP3_SSL("127.0.0.1", implicit, context=ctx, timeout=10)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_old_tls_versions_are_refused(tls_server: Controller, version: str) -> None:  # row 86
    _, implicit = ports(tls_server)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT@SECLEVEL=0")
    ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, version)
    with (
        socket.create_connection(("127.0.0.1", implicit), timeout=10) as raw,
        pytest.raises(ssl.SSLError),
        ctx.wrap_socket(raw) as tls,
    ):
        tls.recv(10)


def test_curl_pop3s_and_stls_with_each_mechanism(tls_server: Controller, certs: Certs, fill: Fill) -> None:
    curl = shutil.which("curl")
    assert curl is not None
    fill("alice", [MSG])
    plain, implicit = ports(tls_server)
    expected = MSG.replace(b"\n", b"\r\n")
    url = f"pop3s://alice:{PASSWORD}@127.0.0.1:{implicit}/1"
    out = subprocess.run([curl, "-sS", "--cacert", str(certs.ca_file), url], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected
    for mechanism in ("PLAIN", "LOGIN", "CRAM-MD5", "+APOP", "*"):
        url = f"pop3://alice:{PASSWORD}@127.0.0.1:{plain}/1"
        options = ["--login-options", f"AUTH={mechanism}"]
        out = subprocess.run(
            [curl, "-sS", "--ssl-reqd", "--cacert", str(certs.ca_file), *options, url], capture_output=True, timeout=30
        )
        assert out.returncode == 0, (mechanism, out.stderr)
        assert out.stdout == expected


def test_plaintext_refused_without_tls_when_policy_says_tls(certs: Certs, mailroot: Path, fill: Fill) -> None:
    fill("alice", [MSG])
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    with Controller(
        authenticator=auth, tls_cert_file=str(certs.cert), tls_key_file=str(certs.key), clear_text_password="tls"
    ) as server:
        client = poplib.POP3(server.host, server.port, timeout=10)
        caps = client.capa()
        assert "USER" not in caps and "PLAIN" not in caps.get("SASL", [])
        with pytest.raises(poplib.error_proto):
            client.user("alice")
        client.stls(context=certs.client_context())
        assert "USER" in client.capa()
        client.user("alice")
        client.pass_(PASSWORD)
        client.quit()


def test_default_policy_matches_dovecots_disable_plaintext_auth() -> None:  # row 84
    assert plaintext_allowed(None, tls_active=False, peer="192.0.2.1", tls_configured=True) is False
    assert plaintext_allowed(None, tls_active=True, peer="192.0.2.1", tls_configured=True) is True
    assert plaintext_allowed(None, tls_active=False, peer="127.0.0.1", tls_configured=True) is True
    assert plaintext_allowed(None, tls_active=False, peer="::1", tls_configured=True) is True
    assert plaintext_allowed(None, tls_active=False, peer="192.0.2.1", tls_configured=False) is True
    assert plaintext_allowed("local", tls_active=True, peer="192.0.2.1", tls_configured=True) is False
    assert plaintext_allowed("never", tls_active=True, peer="127.0.0.1", tls_configured=True) is False
    assert plaintext_allowed("always", tls_active=False, peer="192.0.2.1", tls_configured=True) is True


def test_openssl_s_client_starttls_and_implicit(tls_server: Controller, certs: Certs, fill: Fill) -> None:
    fill("alice", [MSG])
    plain, implicit = ports(tls_server)
    script = f"USER alice\nPASS {PASSWORD}\nSTAT\nQUIT\n".encode()
    for extra in (["-starttls", "pop3", "-connect", f"127.0.0.1:{plain}"], ["-connect", f"127.0.0.1:{implicit}"]):
        out = subprocess.run(
            ["openssl", "s_client", "-quiet", "-verify_return_error", "-CAfile", str(certs.ca_file), *extra],
            input=script,
            capture_output=True,
            timeout=30,
        )
        assert b"+OK 1 " in out.stdout, out.stderr
        assert b"signing off" in out.stdout


def test_fetchmail_with_sslcertck(tls_server: Controller, certs: Certs, fill: Fill, tmp_path: Path) -> None:
    fetchmail = shutil.which("fetchmail")
    assert fetchmail is not None, "fetchmail is installed by .ci/run"
    fill("alice", [MSG, MSG.replace(b"over TLS", b"second")])
    _, implicit = ports(tls_server)
    out = tmp_path / "fetched.bsmtp"
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        f"poll localhost protocol pop3 port {implicit} uidl\n"
        f"  user alice password {PASSWORD} ssl sslcertck sslcertfile {certs.ca_file} sslproto TLS1.2+\n"
        f"  bsmtp {out} fetchall nokeep\n"
    )
    rc.chmod(0o600)
    home = tmp_path / "home"
    home.mkdir()
    proc = subprocess.run(
        [fetchmail, "-f", str(rc), "--nosyslog", "--nodetach", "-v"],
        capture_output=True,
        timeout=60,
        env={"HOME": str(home), "PATH": "/usr/bin:/bin", "FETCHMAILHOME": str(home)},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()
    fetched = out.read_bytes()
    assert b"Subject: over TLS" in fetched and b"Subject: second" in fetched
    client = poplib.POP3_SSL("127.0.0.1", implicit, context=certs.client_context(), timeout=10)
    client.user("alice")
    client.pass_(PASSWORD)
    assert client.stat()[0] == 0  # nokeep: fetchmail deleted them with DELE + QUIT
    client.quit()


def test_scram_plus_over_real_tls(tls_server: Controller, certs: Certs, fill: Fill) -> None:
    fill("alice", [MSG])
    _, implicit = ports(tls_server)
    client = poplib.POP3_SSL("127.0.0.1", implicit, context=certs.client_context(), timeout=10)
    assert "SCRAM-SHA-256-PLUS" in client.capa()["SASL"]
    # The client's side, computed independently from the certificate it got.
    assert isinstance(client.sock, ssl.SSLSocket)
    der = client.sock.getpeercert(binary_form=True)
    assert der is not None
    cb = reference_binding(x509.load_der_x509_certificate(der))
    assert cb == server_end_point(str(certs.cert))
    scram = scramp.ScramClient(["SCRAM-SHA-256-PLUS"], "alice", PASSWORD, channel_binding=("tls-server-end-point", cb))
    def send(line: bytes) -> bytes:
        rawpop.putcmd(client, line.decode())  # poplib has no SASL helper
        return rawpop.getline(client)

    reply = send(b"AUTH SCRAM-SHA-256-PLUS " + base64.b64encode(scram.get_client_first().encode()))
    scram.set_server_first(base64.b64decode(reply[2:]).decode())
    reply = send(base64.b64encode(scram.get_client_final().encode()))
    scram.set_server_final(base64.b64decode(reply[2:]).decode())
    assert send(b"").startswith(b"+OK")
    assert client.stat()[0] == 1
    client.quit()


def test_certificate_reload_keeps_sessions(tmp_path: Path, mailroot: Path, fill: Fill) -> None:
    fill("alice", [MSG])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = Certs(tmp_path / "a"), Certs(tmp_path / "b")
    live_cert, live_key = tmp_path / "live-cert.pem", tmp_path / "live-key.pem"
    shutil.copy(first.cert, live_cert)
    shutil.copy(first.key, live_key)
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    with Controller(
        authenticator=auth,
        listen=(ListenAddress("127.0.0.1", 0, tls=True),),
        tls_cert_file=str(live_cert),
        tls_key_file=str(live_key),
    ) as server:
        old = poplib.POP3_SSL(server.host, server.port, context=first.client_context(), timeout=10)
        old.user("alice")
        old.pass_(PASSWORD)
        shutil.copy(second.cert, live_cert)
        shutil.copy(second.key, live_key)
        loop = server._loop  # noqa: SLF001 - the reload runs on the server's own loop, as SIGHUP's does
        assert loop is not None
        loop.call_soon_threadsafe(server.server.reload)
        deadline = time.time() + 10
        while True:
            try:
                new = poplib.POP3_SSL(server.host, server.port, context=second.client_context(), timeout=10)
                break
            except ssl.SSLCertVerificationError:
                assert time.time() < deadline
                time.sleep(0.05)
        new.quit()
        assert old.stat()[0] == 1  # the session from before the reload goes on
        old.quit()


def test_startup_errors_are_clear(tmp_path: Path, certs: Certs) -> None:
    (tmp_path / "x").mkdir()
    other = Certs(tmp_path / "x")
    auth = StaticAuthenticator({})

    def start(**settings: object) -> None:
        Server(Options(**settings), auth)  # type: ignore[arg-type]

    with pytest.raises(ConfigError, match=r"tls-server-cert-file .*missing"):
        start(tls_cert_file=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="does not match"):
        start(tls_cert_file=str(certs.cert), tls_key_file=str(other.key))
    with pytest.raises(ConfigError, match="no certificate"):
        start(tls_support="stls")
    with pytest.raises(ConfigError, match="tls-version"):
        start(tls_cert_file=str(certs.cert), tls_key_file=str(certs.key), tls_version="TLSv9")
    with pytest.raises(ConfigError, match="tls-cipher-list"):
        start(tls_cert_file=str(certs.cert), tls_key_file=str(certs.key), tls_cipher_list="NOSUCHCIPHER")


def test_tls13_ciphersuite_setting(certs: Certs, mailroot: Path) -> None:
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    with Controller(
        authenticator=auth,
        listen=(ListenAddress("127.0.0.1", 0, tls=True),),
        tls_cert_file=str(certs.cert),
        tls_key_file=str(certs.key),
        tls_ciphersuites="TLS_CHACHA20_POLY1305_SHA256",
    ) as server:
        client = poplib.POP3_SSL(server.host, server.port, context=certs.client_context(), timeout=10)
        assert client.sock.cipher()[0] == "TLS_CHACHA20_POLY1305_SHA256"  # type: ignore[attr-defined]
        client.quit()


def test_sasl_external_with_a_client_certificate(certs: Certs, mailroot: Path, fill: Fill) -> None:
    fill("alice", [MSG])
    auth = StaticAuthenticator({"alice": PASSWORD, "bob": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    with Controller(
        authenticator=auth,
        listen=(ListenAddress("127.0.0.1", 0, tls=True),),
        tls_cert_file=str(certs.cert),
        tls_key_file=str(certs.key),
        tls_client_ca_file=str(certs.ca_file),
    ) as server:
        # Without a client certificate EXTERNAL is not offered.
        anonymous = poplib.POP3_SSL(server.host, server.port, context=certs.client_context(), timeout=10)
        assert "EXTERNAL" not in anonymous.capa()["SASL"]
        anonymous.quit()
        ctx = certs.client_context()
        certs.ca.issue_cert("alice", common_name="alice").configure_cert(ctx)
        client = poplib.POP3_SSL(server.host, server.port, context=ctx, timeout=10)
        assert "EXTERNAL" in client.capa()["SASL"]
        # Asking to be somebody else is a credential failure.
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            rawpop.shortcmd(client, "AUTH EXTERNAL " + base64.b64encode(b"bob").decode())
        assert rawpop.shortcmd(client, "AUTH EXTERNAL =").startswith(b"+OK")
        assert client.stat()[0] == 1
        client.quit()


def test_failed_stls_handshake_closes_cleanly(tls_server: Controller) -> None:
    plain, _ = ports(tls_server)
    with socket.create_connection(("127.0.0.1", plain), timeout=10) as sock:
        sock.recv(512)
        sock.sendall(b"STLS\r\n")
        assert sock.recv(512).startswith(b"+OK")
        sock.sendall(b"this is not a TLS ClientHello\r\n" * 10)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        assert b"+OK" not in data  # no plaintext reply after a failed handshake
    # The server goes on serving others.
    client = poplib.POP3("127.0.0.1", plain, timeout=10)
    client.quit()


def test_incomplete_handshake_times_out(certs: Certs, mailroot: Path) -> None:
    auth = StaticAuthenticator({}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    with Controller(
        authenticator=auth,
        listen=(ListenAddress("127.0.0.1", 0, tls=True),),
        tls_cert_file=str(certs.cert),
        tls_key_file=str(certs.key),
        tls_handshake_timeout=0.5,
    ) as server, socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, then silence
        assert sock.recv(100) == b""  # closed by the server, not by our timeout


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_replies_are_never_held_back_by_nagle(certs: Certs, mailroot: Path, loop_kind: str) -> None:
    """Both event loops set TCP_NODELAY on every TCP transport they make, plain or
    TLS (the server no longer sets it again): a pipelined burst's replies and a
    RETR's last segment go out at once, not after the client's delayed ACK."""
    import asyncio

    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # the Controller's new loop is uvloop's
    try:
        auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
        with Controller(
            authenticator=auth,
            listen=(ListenAddress("127.0.0.1", 0), ListenAddress("127.0.0.1", 0, tls=True)),
            tls_cert_file=str(certs.cert),
            tls_key_file=str(certs.key),
        ) as server:
            plain, implicit = ports(server)
            clients = [poplib.POP3("127.0.0.1", plain, timeout=10),
                       poplib.POP3_SSL("127.0.0.1", implicit, timeout=10, context=certs.client_context())]
            sessions = server.server.sessions()
            assert len(sessions) == 2  # both greeted: both sessions run
            for conn in sessions:
                sock = conn.stream.get_extra_info("socket")
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            for client in clients:
                client.quit()
    finally:
        asyncio.set_event_loop_policy(None)
