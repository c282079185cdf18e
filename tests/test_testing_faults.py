"""Each scripted fault of qpopper.testing, seen by real clients: poplib
for all, curl and fetchmail where they show what a client in the field
makes of it. Every test is bounded (socket timeouts, subprocess timeouts)."""

from __future__ import annotations

import poplib
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import rawpop
from qpopper.testing import Fault, TestServer

BIG = b"Subject: big\n\n" + b"".join(b"line %05d of a long body\n" % i for i in range(2000))
SMALL = b"Subject: small\n\nshort body\n"


@pytest.fixture
def pop3() -> Iterator[TestServer]:
    with TestServer() as server:
        server.add_user("alice", "pw")
        server.add_user("bob", "pw")
        for user in ("alice", "bob"):
            server.deliver(user, BIG)
            server.deliver(user, SMALL)
        yield server


def login(server: TestServer, user: str = "alice", port: int | None = None) -> poplib.POP3:
    client = poplib.POP3(server.host, port or server.port, timeout=10)
    client.user(user)
    client.pass_("pw")
    return client


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (Debian package curl)")
    return subprocess.run(["curl", "--silent", "--show-error", "--max-time", "20", *args],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("code", ["IN-USE", "LOGIN-DELAY", "SYS/TEMP", "AUTH"])
def test_a_login_answered_with_a_response_code(pop3: TestServer, code: str) -> None:
    pop3.add_fault("login", user="alice", code=code, sessions=1)
    client = poplib.POP3(pop3.host, pop3.port, timeout=10)
    client.user("alice")
    with pytest.raises(poplib.error_proto, match=rf"^b'-ERR \[{code}\]"):
        client.pass_("pw")
    client.close()
    login(pop3, "bob").quit()  # another user is not affected
    client = login(pop3)  # the fault was for one session
    assert client.stat()[0] == 2
    client.quit()
    assert pop3.mailbox("alice").messages == [BIG, SMALL]


def test_curl_reports_the_refused_login(pop3: TestServer) -> None:
    pop3.add_fault("login", code="SYS/TEMP")
    result = curl("-u", "alice:pw", f"{pop3.url}/2")
    assert result.returncode == 67  # CURLE_LOGIN_DENIED
    pop3.clear_faults()
    assert curl("-u", "alice:pw", f"{pop3.url}/2").stdout.replace("\r\n", "\n").encode() == SMALL


def test_the_connection_dropped_after_n_bytes_of_retr(pop3: TestServer) -> None:
    pop3.add_fault("drop-retr", bytes=1000)
    client = login(pop3)
    assert client.list()[0].startswith(b"+OK")  # other multi-line answers pass
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        client.retr(1)
    client.close()
    pop3.wait_sessions_ended()
    assert pop3.mailbox("alice").messages == [BIG, SMALL]  # nothing deleted, nothing lost


def test_curl_sees_a_retr_cut_short(pop3: TestServer) -> None:
    pop3.add_fault("drop-retr", bytes=1000, sessions=1)
    result = curl("-u", "alice:pw", f"{pop3.url}/1")
    # What this shows a client developer: curl writes the first octets and,
    # the connection closed without the final ".", exits 0 all the same.
    assert result.returncode == 0
    assert 0 < len(result.stdout) < len(BIG)
    whole = curl("-u", "alice:pw", f"{pop3.url}/1")  # the next session is whole
    assert whole.stdout.replace("\r\n", "\n").encode() == BIG


def test_the_connection_dropped_in_the_middle_of_a_listing(pop3: TestServer) -> None:
    for n in range(50):
        pop3.deliver("bob", b"Subject: %d\n\nx\n" % n)
    pop3.add_fault("drop-multiline", user="bob", bytes=60)
    client = login(pop3, "bob")
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        client.uidl()
    client.close()
    client = login(pop3, "alice")  # the fault is bob's
    assert len(client.uidl()[1]) == 2
    client.quit()


def test_replies_throttled(pop3: TestServer) -> None:
    pop3.add_fault("throttle", bytes=20000)
    client = login(pop3)
    started = time.monotonic()
    _, lines, octets = client.retr(1)
    elapsed = time.monotonic() - started
    client.quit()
    assert octets >= len(BIG) and b"".join(line + b"\n" for line in lines) == BIG
    # 51 kB at 20 kB/s: the throttle is what this test is about, so its time is
    # the observable (a lower bound only; no upper bound is asserted).
    assert elapsed >= 1.5


def test_a_list_size_that_disagrees_with_retr(pop3: TestServer) -> None:
    pop3.add_fault("list-size", delta=-7)
    client = login(pop3)
    listed = int(rawpop.shortcmd(client, "LIST 2").split()[2])
    _, _, octets = client.retr(2)
    client.quit()
    assert listed == octets - 7


def test_a_uidl_that_changes_between_sessions(pop3: TestServer) -> None:
    pop3.add_fault("uidl-changes", user="alice")
    uids = []
    for _ in range(2):
        client = login(pop3)
        uids.append(client.uidl()[1])
        client.quit()
        pop3.wait_sessions_ended()
    assert uids[0] != uids[1] and len(uids[0]) == len(uids[1]) == 2


def test_a_tls_handshake_that_fails() -> None:
    with TestServer(tls="both") as server:
        server.add_user("alice", "pw")
        assert server.ca_path is not None and server.implicit_tls_port is not None
        context = ssl.create_default_context(cafile=server.ca_path)
        server.add_fault("tls-fail", sessions=2)
        # Implicit TLS: the first bytes are not a ServerHello.
        with socket.create_connection((server.host, server.implicit_tls_port), 10) as raw, pytest.raises(ssl.SSLError):
            context.wrap_socket(raw, server_hostname="localhost").close()
        with socket.create_connection((server.host, server.port), 10) as raw:
            reader = raw.makefile("rb")
            assert reader.readline().startswith(b"+OK")
            raw.sendall(b"STLS\r\n")
            assert reader.readline().startswith(b"+OK")  # STLS accepted, then the handshake fails
            with pytest.raises(ssl.SSLError):
                context.wrap_socket(raw, server_hostname="localhost").close()
            reader.close()
        tls_client = poplib.POP3_SSL(server.host, server.implicit_tls_port, context=context, timeout=10)
        tls_client.user("alice")
        tls_client.pass_("pw")  # the fault is used up: the third session shakes hands
        tls_client.quit()


def test_a_greeting_without_an_apop_stamp(pop3: TestServer) -> None:
    pop3.add_fault("no-apop-stamp")
    client = poplib.POP3(pop3.host, pop3.port, timeout=10)
    assert b"<" not in client.getwelcome()
    with pytest.raises(poplib.error_proto, match="APOP not supported"):
        client.apop("alice", "pw")
    client.user("alice")
    client.pass_("pw")
    client.quit()


def test_dropped_after_quit_before_update_deletes_nothing(pop3: TestServer) -> None:
    pop3.add_fault("drop-before-update", user="alice")
    client = login(pop3)
    client.dele(1)
    client.dele(2)
    with pytest.raises(poplib.error_proto, match="EOF"):  # no +OK: the connection just closes
        client.quit()
    client.close()
    pop3.wait_sessions_ended()
    assert pop3.mailbox("alice").messages == [BIG, SMALL]
    assert pop3.mailbox("alice").deleted == []


def test_fetchmail_keeps_the_mail_when_quit_is_lost(pop3: TestServer, tmp_path: Path) -> None:
    if shutil.which("fetchmail") is None:
        pytest.skip("fetchmail is not installed (Debian package fetchmail)")
    pop3.add_fault("drop-before-update", user="alice", sessions=1)
    rc = tmp_path / "fetchmailrc"
    delivered = tmp_path / "delivered"
    rc.write_text(
        f'poll 127.0.0.1 service {pop3.port} protocol pop3 auth password\n'
        f'  user "alice" password "pw" is alice here no keep sslproto ""\n'
        f'  mda "cat >> {delivered}"\n'
    )
    rc.chmod(0o600)
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    args = ["fetchmail", "--nodetach", "--nosyslog", "-f", str(rc), "--pidfile", str(tmp_path / "pid")]
    first = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
    assert first.returncode != 0  # fetchmail saw the session fail
    pop3.wait_sessions_ended()
    assert pop3.mailbox("alice").messages == [BIG, SMALL]  # fetched, but not deleted
    second = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    pop3.wait_sessions_ended()
    assert pop3.mailbox("alice").messages == []
    assert len(pop3.mailbox("alice").deleted) == 2


def test_an_unknown_fault_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault("explode")
    with pytest.raises(ValueError, match="login fault's code"):
        Fault("login", code="SYS/PERM")
    with pytest.raises(ValueError, match="before the client names a user"):
        Fault("no-apop-stamp", user="alice")
    with pytest.raises(ValueError, match="sessions is at least 1"):
        Fault("throttle", bytes=10, sessions=0)
