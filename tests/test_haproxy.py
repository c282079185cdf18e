"""Listeners behind a load balancer: the PROXY header's client address is the
client address everywhere (logs, failure delays, per-address caps, the
clear-text policy, the statistics record, the post-login hook), only trusted
networks may send one, and a listener that requires it refuses a connection
without one. First with headers written by the test, then through a real
HAProxy (Debian's haproxy, started here on loopback) with poplib and curl."""

from __future__ import annotations

import logging
import os
import poplib
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from conftest import PASSWORD
from qpopper import Controller, StaticAuthenticator
from qpopper.config.options import ListenAddress
from qpopper.errors import ConfigError
from qpopper.server.proxyheader import CLIENT_SSL, SSL_SUB_VERSION, TLV_SSL, build_v2

Fill = Callable[[str, list[bytes]], Path]
MSG = b"From: a@example.org\nSubject: behind a balancer\n\nbody\n"
CLIENT = ("203.0.113.9", 40000)  # TEST-NET-3: only ever inside a header here
OTHER = ("198.51.100.23", 40001)
SERVER = ("192.0.2.1", 110)


class ProxiedPOP3(poplib.POP3):
    """poplib, with a PROXY header written before the greeting is read."""

    def __init__(self, host: str, port: int, header: bytes, timeout: float = 20,
                 source: str | None = None) -> None:
        self._proxy_header = header
        self._source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout: float) -> socket.socket:
        source = (self._source, 0) if self._source else None
        sock = socket.create_connection((self.host, self.port), timeout, source_address=source)
        sock.sendall(self._proxy_header)
        return sock


class ProxiedPOP3S(poplib.POP3_SSL):
    """The same on an implicit-TLS listener: the header, then the handshake."""

    def __init__(self, host: str, port: int, header: bytes, context: ssl.SSLContext) -> None:
        self._proxy_header = header
        super().__init__(host, port, timeout=20, context=context)

    def _create_socket(self, timeout: float) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout)
        sock.sendall(self._proxy_header)
        context: ssl.SSLContext = self.context  # type: ignore[attr-defined]  # set by POP3_SSL, untyped
        return context.wrap_socket(sock, server_hostname=self.host)


def v2(client: tuple[str, int] = CLIENT, tls: bool = False) -> bytes:
    tlvs: tuple[tuple[int, bytes], ...] = ()
    if tls:
        tlvs = ((TLV_SSL, bytes([CLIENT_SSL]) + bytes(4) + bytes([SSL_SUB_VERSION]) + b"\x00\x07TLSv1.3"),)
    return build_v2(client, SERVER, tlvs=tlvs)


def v1(client: tuple[str, int] = CLIENT) -> bytes:
    return f"PROXY TCP4 {client[0]} {SERVER[0]} {client[1]} {SERVER[1]}\r\n".encode()


@pytest.fixture
def balanced(mailroot: Path, fill: Fill) -> Iterator[Callable[..., Controller]]:
    """Start a Controller whose one listener requires the PROXY header from
    loopback (the test plays the balancer); settings as keywords."""
    fill("alice", [MSG])
    started: list[Controller] = []

    def start(**settings: Any) -> Controller:
        auth = StaticAuthenticator({"alice": PASSWORD, "bob": PASSWORD},
                                   mail_location=f"maildir:{mailroot}/%u/Maildir")
        options: dict[str, Any] = {
            "listen": (ListenAddress("127.0.0.1", 0, proxy=True),),
            "haproxy_trusted_networks": "127.0.0.0/8",
            "haproxy_timeout": 5.0,
        }
        options.update(settings)
        server = Controller(authenticator=auth, **options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def closed_without_greeting(sock: socket.socket) -> bool:
    sock.settimeout(20)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("header", [v1(), v2()], ids=["v1", "v2"])
def test_the_header_names_the_client_in_the_logs(
    balanced: Callable[..., Controller], header: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    server = balanced()
    with caplog.at_level(logging.INFO, "qpopper"):
        client = ProxiedPOP3(server.host, server.port, header)
        client.user("alice")
        client.pass_(PASSWORD)
        assert client.stat()[0] == 1
        client.quit()
        deadline = time.monotonic() + 20
        while "quit" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
    assert "203.0.113.9:40000: alice logged in" in caplog.text
    assert "127.0.0.1" not in caplog.text.replace("listening on 127.0.0.1", "")


def test_bytes_behind_the_header_reach_the_session(balanced: Callable[..., Controller]) -> None:
    server = balanced()
    with socket.create_connection((server.host, server.port), timeout=20) as sock:
        sock.sendall(v1() + b"CAPA\r\n")  # a pipelining client, in the header's segment
        data = b""
        while not data.endswith(b"\r\n.\r\n"):
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
    assert data.startswith(b"+OK")
    assert b"\r\n+OK" in data and b"USER\r\n" in data


@pytest.mark.parametrize("header", [build_v2(None, None, local=True), b"PROXY UNKNOWN\r\n"], ids=["LOCAL", "UNKNOWN"])
def test_local_and_unknown_keep_the_balancers_address(
    balanced: Callable[..., Controller], header: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    server = balanced()
    with caplog.at_level(logging.INFO, "qpopper"):
        client = ProxiedPOP3(server.host, server.port, header)
        client.user("alice")
        client.pass_(PASSWORD)
        client.quit()
    assert "127.0.0.1:" in caplog.text and "alice logged in" in caplog.text


def session_end_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "connection closed" in r.getMessage() or "connection lost" in r.getMessage()]


def wait_for_records(caplog: pytest.LogCaptureFixture, count: int, peer: str = "") -> list[logging.LogRecord]:
    """The session-end records (of `peer`'s connections), once there are `count` (20 s at most)."""
    deadline = time.monotonic() + 20
    while True:
        found = [r for r in session_end_records(caplog) if peer in r.getMessage()]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def test_a_silent_local_connection_ends_at_debug_level(
    balanced: Callable[..., Controller], caplog: pytest.LogCaptureFixture
) -> None:
    # A health check (LOCAL header, nothing said) goes at debug level; the
    # same from a client (a PROXY header), or a LOCAL one that sent a
    # command, is a disconnect worth its line at info.
    server = balanced()
    local = build_v2(None, None, local=True)
    with caplog.at_level(logging.DEBUG, "qpopper"):
        for header, then in ((local, b""), (v2(), b""), (local, b"NOOP\r\n")):
            with socket.create_connection((server.host, server.port), timeout=20) as sock:
                sock.sendall(header + then)
                assert sock.recv(100).startswith(b"+OK")
        ends = wait_for_records(caplog, 3)
    assert [(r.levelno, "health check" in r.getMessage()) for r in ends] == [
        (logging.DEBUG, True), (logging.INFO, False), (logging.INFO, False)]
    assert ends[1].getMessage().startswith("203.0.113.9:40000: connection ")
    assert "127.0.0.1:" in ends[2].getMessage()


def test_a_connection_without_a_header_is_refused(
    balanced: Callable[..., Controller], caplog: pytest.LogCaptureFixture
) -> None:
    server = balanced()
    with caplog.at_level(logging.WARNING, "qpopper"), socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(b"USER alice\r\n")
        assert closed_without_greeting(sock)
    assert "bad PROXY header: not a PROXY header" in caplog.text


def test_a_late_header_is_refused(balanced: Callable[..., Controller], caplog: pytest.LogCaptureFixture) -> None:
    server = balanced(haproxy_timeout=0.2)
    with caplog.at_level(logging.WARNING, "qpopper"), socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(v2()[:10])  # begun, never finished
        assert closed_without_greeting(sock)
    assert "no PROXY header in time" in caplog.text


def test_an_untrusted_peer_is_refused_before_its_header_is_read(
    balanced: Callable[..., Controller], caplog: pytest.LogCaptureFixture
) -> None:
    server = balanced(haproxy_trusted_networks="192.0.2.0/24 2001:db8::/32")
    with caplog.at_level(logging.WARNING, "qpopper"), socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(v2())
        assert closed_without_greeting(sock)
    assert "not from haproxy-trusted-networks" in caplog.text
    assert "203.0.113.9" not in caplog.text


def test_a_proxy_listener_needs_trusted_networks(mailroot: Path) -> None:
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    with pytest.raises(ConfigError, match="haproxy-trusted-networks"):
        Controller(authenticator=auth, listen=(ListenAddress("127.0.0.1", 0, proxy=True),)).start()


def test_failure_delays_follow_the_carried_address(balanced: Callable[..., Controller]) -> None:
    server = balanced(auth_fail_delay=0.05, auth_fail_delay_max=5.0)
    for _ in range(3):
        client = ProxiedPOP3(server.host, server.port, v2(CLIENT))
        client.user("alice")
        with pytest.raises(poplib.error_proto):
            client.pass_("wrong")
        client.quit()
    failures = server.server.services.failures
    assert failures.delay(CLIENT[0]) > failures.delay(OTHER[0]) == pytest.approx(0.05)
    assert failures.delay("127.0.0.1") == pytest.approx(0.05)  # the balancer's own address is clean


def test_per_address_caps_count_clients_not_the_balancer(balanced: Callable[..., Controller]) -> None:
    server = balanced(max_connections_per_ip=1)
    first = ProxiedPOP3(server.host, server.port, v2(CLIENT))
    second = ProxiedPOP3(server.host, server.port, v2(OTHER))  # same balancer, another client: served
    with socket.create_connection((server.host, server.port), timeout=20) as third:
        third.sendall(v2(CLIENT))
        assert third.recv(200).startswith(b"-ERR [SYS/TEMP] Too many connections")
    first.quit()
    second.quit()


def test_clear_text_policy_local_judges_the_client(balanced: Callable[..., Controller]) -> None:
    server = balanced(clear_text_password="local")  # qpopper's -p 3
    remote = ProxiedPOP3(server.host, server.port, v2(CLIENT))
    with pytest.raises(poplib.error_proto):
        remote.user("alice")  # the balancer is on loopback, the client is not
    remote.close()
    local = ProxiedPOP3(server.host, server.port, v2(("127.0.0.9", 5000)))
    local.user("alice")
    local.pass_(PASSWORD)
    local.quit()


@pytest.mark.parametrize("trusted", [False, True])
def test_tls_at_the_balancer_counts_only_when_configured(balanced: Callable[..., Controller], trusted: bool) -> None:
    server = balanced(clear_text_password="tls", haproxy_tls_is_secure=trusted)
    plain = ProxiedPOP3(server.host, server.port, v2(CLIENT))
    with pytest.raises(poplib.error_proto):
        plain.user("alice")  # no SSL TLV: never secure
    plain.close()
    over_tls = ProxiedPOP3(server.host, server.port, v2(CLIENT, tls=True))
    if trusted:
        over_tls.user("alice")
        over_tls.pass_(PASSWORD)
        over_tls.quit()
    else:
        with pytest.raises(poplib.error_proto):
            over_tls.user("alice")
        over_tls.close()


def test_statistics_and_post_login_hook_get_the_client(
    balanced: Callable[..., Controller], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hook_file = tmp_path / "logins"
    server = balanced(statistics=True, reverse_lookup=False, post_login_file=str(hook_file))
    with caplog.at_level(logging.INFO, "qpopper"):
        client = ProxiedPOP3(server.host, server.port, v2(CLIENT))
        client.user("alice")
        client.pass_(PASSWORD)
        client.quit()
        deadline = time.monotonic() + 20
        while not ("Stats: alice" in caplog.text and hook_file.exists()) and time.monotonic() < deadline:
            time.sleep(0.02)
    stats = next(line for line in caplog.text.splitlines() if "Stats: alice" in line)
    assert stats.endswith("203.0.113.9 203.0.113.9")
    assert hook_file.read_text().split()[-1] == "203.0.113.9"


def test_implicit_tls_after_the_header(mailroot: Path, fill: Fill, tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    fill("alice", [MSG])
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    with Controller(
        authenticator=auth, listen=(ListenAddress("127.0.0.1", 0, tls=True, proxy=True),),
        haproxy_trusted_networks="127.0.0.1", tls_cert_file=str(cert), tls_key_file=str(key),
    ) as server:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        context.check_hostname = False
        client = ProxiedPOP3S(server.host, server.port, v2(CLIENT), context)
        client.user("alice")
        client.pass_(PASSWORD)
        assert client.stat()[0] == 1
        client.quit()


def test_check_config_names_missing_trusted_networks(tmp_path: Path) -> None:
    from helpers import QPOPPER

    users = tmp_path / "users"
    users.write_text(f"alice:{{PLAIN}}{PASSWORD}::::::\n")
    out = subprocess.run([*QPOPPER, "--check-config", "--syslog-socket=", f"--passwd-file={users}",
                          "--haproxy-listen=127.0.0.1:0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "needs haproxy-trusted-networks" in out.stdout + out.stderr


def test_command_line_listener(tmp_path: Path) -> None:
    from qpopper.daemon.cli import build_options, parse_command_line

    options = build_options(parse_command_line(["--haproxy-listen=127.0.0.1:1110", "--haproxy-tls-listen=:1995",
                                                "--haproxy-trusted-networks=10.0.0.0/8,::1"]))
    assert options.listen == (ListenAddress("127.0.0.1", 1110, proxy=True), ListenAddress(None, 1995, True, True))
    assert options.haproxy_trusted_networks == "10.0.0.0/8 ::1"
    with pytest.raises(ConfigError, match="bad network"):
        build_options(parse_command_line(["--haproxy-trusted-networks=10.0.0.0/33"]))


# ---- a real HAProxy ------------------------------------------------------------------

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (Debian package haproxy)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class HaproxyProcess:
    """haproxy in the foreground with a config written here; its own log on stderr."""

    def __init__(self, base: Path, config: str) -> None:
        self.config = base / "haproxy.cfg"
        self.config.write_text(config)
        self.log = base / "haproxy.log"
        self._log_file = self.log.open("wb")
        assert HAPROXY is not None
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config)], stdout=self._log_file,
                                     stderr=subprocess.STDOUT)

    def wait_listening(self, port: int) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("haproxy did not listen: " + self.log.read_text())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log_file.close()


def haproxy_config(backend_port: int, plain_v2: int, plain_v1: int, tls_port: int, pem: Path) -> str:
    # The balancer reaches the server from 127.0.0.2; the clients come from 127.0.0.7.
    return f"""
global
    maxconn 200
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend pop3_v2
    bind 127.0.0.1:{plain_v2}
    default_backend qpopper_v2
frontend pop3_v1
    bind 127.0.0.1:{plain_v1}
    default_backend qpopper_v1
frontend pop3s
    bind 127.0.0.1:{tls_port} ssl crt {pem}
    default_backend qpopper_v2_ssl
backend qpopper_v2
    server s1 127.0.0.1:{backend_port} send-proxy-v2 source 127.0.0.2
backend qpopper_v1
    server s1 127.0.0.1:{backend_port} send-proxy source 127.0.0.2
backend qpopper_v2_ssl
    server s1 127.0.0.1:{backend_port} send-proxy-v2-ssl source 127.0.0.2
"""


@pytest.fixture
def haproxy_setup(tmp_path: Path, mailroot: Path, fill: Fill) -> Iterator[tuple[Controller, dict[str, int], Path]]:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    pem = tmp_path / "haproxy.pem"
    pem.write_bytes(leaf.private_key_pem.bytes() + b"".join(b.bytes() for b in leaf.cert_chain_pems))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    fill("alice", [MSG, MSG])
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    server = Controller(
        authenticator=auth, listen=(ListenAddress("127.0.0.1", 0, proxy=True),),
        haproxy_trusted_networks="127.0.0.2/32", clear_text_password="tls", haproxy_tls_is_secure=True,
        tls_support="none",
    ).start()
    ports = {"v2": free_port(), "v1": free_port(), "tls": free_port()}
    haproxy = HaproxyProcess(tmp_path, haproxy_config(server.port, ports["v2"], ports["v1"], ports["tls"], pem))
    try:
        for port in ports.values():
            haproxy.wait_listening(port)
        yield server, ports, ca_file
    finally:
        haproxy.stop()
        server.stop()


class SourcedPOP3(poplib.POP3):
    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=("127.0.0.7", 0))


class SourcedPOP3S(poplib.POP3_SSL):
    def _create_socket(self, timeout: float) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout, source_address=("127.0.0.7", 0))
        context: ssl.SSLContext = self.context  # type: ignore[attr-defined]  # set by POP3_SSL, untyped
        return context.wrap_socket(sock, server_hostname=self.host)


@needs_haproxy
def test_through_haproxy(haproxy_setup: tuple[Controller, dict[str, int], Path],
                         caplog: pytest.LogCaptureFixture) -> None:
    _, ports, ca_file = haproxy_setup
    with caplog.at_level(logging.INFO, "qpopper"):
        # Plain through HAProxy, v2 and v1: the client is 127.0.0.7, not the balancer's
        # 127.0.0.2, and the clear-text policy (tls) refuses its password.
        for port in (ports["v2"], ports["v1"]):
            plain = SourcedPOP3("127.0.0.1", port, timeout=20)
            with pytest.raises(poplib.error_proto):
                plain.user("alice")
            plain.quit()
        # TLS terminated at HAProxy (send-proxy-v2-ssl), trusted by configuration.
        context = ssl.create_default_context(cafile=str(ca_file))
        secure = SourcedPOP3S("127.0.0.1", ports["tls"], timeout=20, context=context)
        secure.user("alice")
        secure.pass_(PASSWORD)
        assert secure.stat()[0] == 2
        secure.quit()
        # curl, its own client, over HAProxy's TLS.
        curl = shutil.which("curl")
        if curl is not None:
            out = subprocess.run(
                [curl, "-sS", "--max-time", "20", "--interface", "127.0.0.7", "--cacert", str(ca_file),
                 "-u", f"alice:{PASSWORD}", f"pop3s://127.0.0.1:{ports['tls']}/1"],
                capture_output=True, timeout=30,
            )
            assert out.returncode == 0, out.stderr
            assert b"Subject: behind a balancer" in out.stdout
        deadline = time.monotonic() + 20
        while caplog.text.count("alice quit") < (2 if curl else 1) and time.monotonic() < deadline:
            time.sleep(0.02)
    assert "127.0.0.7:" in caplog.text and "alice logged in" in caplog.text
    session_lines = [line for line in caplog.text.splitlines() if "qpopper.session" in line]
    assert session_lines and all("127.0.0.2" not in line for line in session_lines)


@needs_haproxy
def test_haproxy_health_checks_are_quiet(tmp_path: Path, mailroot: Path, fill: Fill,
                                         caplog: pytest.LogCaptureFixture) -> None:
    # HAProxy's own checks (check-send-proxy: a LOCAL header, then a reset)
    # log nothing at info; a client through it that goes away without QUIT does.
    fill("alice", [MSG])
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    server = Controller(authenticator=auth, listen=(ListenAddress("127.0.0.1", 0, proxy=True),),
                        haproxy_trusted_networks="127.0.0.2/32").start()
    port = free_port()
    config = f"""
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend pop3
    bind 127.0.0.1:{port}
    default_backend qpopper
backend qpopper
    server s1 127.0.0.1:{server.port} send-proxy-v2 check check-send-proxy inter 100 source 127.0.0.2
"""
    with caplog.at_level(logging.DEBUG, "qpopper"):
        haproxy = HaproxyProcess(tmp_path, config)
        try:
            haproxy.wait_listening(port)
            checks = wait_for_records(caplog, 5, "127.0.0.2:")
            assert len(checks) >= 5, haproxy.log.read_text()
            client = SourcedPOP3("127.0.0.1", port, timeout=20)
            client.user("alice")
            client.close()  # gone without QUIT
            deadline = time.monotonic() + 20
            while not any("127.0.0.7" in r.getMessage() for r in session_end_records(caplog)):
                assert time.monotonic() < deadline, "the client's disconnect was not logged"
                time.sleep(0.02)
        finally:
            haproxy.stop()
            server.stop()
    ends = session_end_records(caplog)
    by_client = [r for r in ends if "127.0.0.7" in r.getMessage()]
    by_checks = [r for r in ends if "127.0.0.2" in r.getMessage()]
    assert [r.levelno for r in by_client] == [logging.INFO]
    assert len(by_checks) >= 5 and {r.levelno for r in by_checks} == {logging.DEBUG}
    assert all("health check" in r.getMessage() for r in by_checks)
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and "127.0.0.2" in r.getMessage()]


def test_a_stop_ends_a_connection_still_waiting_for_its_header(balanced: Callable[..., Controller]) -> None:
    server = balanced(haproxy_timeout=60.0)
    with socket.create_connection((server.host, server.port), timeout=20) as sock:
        sock.sendall(v2()[:5])
        deadline = time.monotonic() + 20
        while not server.server._handshaking and time.monotonic() < deadline:  # noqa: SLF001 - the stop's own list
            time.sleep(0.01)
        server.stop()  # does not wait out the header's 60 s
        assert closed_without_greeting(sock)
