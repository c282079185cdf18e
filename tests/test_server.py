"""The running server over real loopback sockets, with real clients."""

from __future__ import annotations

import hashlib
import os
import poplib
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import rawpop
from conftest import PASSWORD
from helpers import write_maildir_message
from qpopper import Controller, StaticAuthenticator
from qpopper.maildrop.maildir import LOCK_NAME

Fill = Callable[[str, list[bytes]], Path]


def message(n: int, extra: bytes = b"") -> bytes:
    return b"From: a@example.org\nSubject: test %d\nMessage-ID: <%d@x>\n\nline one\n.dot line\n" % (n, n) + extra


def login(server: Controller, user: str = "alice") -> poplib.POP3:
    client = poplib.POP3(server.host, server.port, timeout=10)
    try:
        client.user(user)
        client.pass_(PASSWORD)
    except BaseException:
        client.close()
        raise
    return client


def raw_connect(server: Controller) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection((server.host, server.port), timeout=10)
    greeting = sock.recv(512)
    return sock, greeting


def recv_until(sock: socket.socket, end: bytes) -> bytes:
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_poplib_full_session(pop_server: Controller, fill: Fill) -> None:
    msgs = [message(1), message(2), message(3, b"From the body\n..two dots\n")]
    fill("alice", msgs)
    client = login(pop_server)
    count, octets = client.stat()
    assert count == 3
    listing = client.list()[1]
    sizes = [int(line.split()[1]) for line in listing]
    assert octets == sum(sizes)
    for i, stored in enumerate(msgs, 1):
        _, lines, _ = client.retr(i)
        body = b"\r\n".join(lines) + b"\r\n"
        assert body == stored.replace(b"\n", b"\r\n")
        assert sizes[i - 1] == len(body)
    _, lines, _ = client.top(1, 0)
    assert lines[-1] == b"" and b"Subject: test 1" in lines
    uids = client.uidl()[1]
    assert len(uids) == 3
    client.dele(2)
    assert client.stat() == (2, octets - sizes[1])
    assert client.quit().startswith(b"+OK")
    client = login(pop_server)
    assert client.stat()[0] == 2
    assert [u.split()[1] for u in client.uidl()[1]] == [uids[0].split()[1], uids[2].split()[1]]
    client.quit()


def test_apop_with_poplib(pop_server: Controller, fill: Fill) -> None:
    fill("bob", [message(1)])
    client = poplib.POP3(pop_server.host, pop_server.port, timeout=10)
    assert client.apop("bob", PASSWORD).startswith(b"+OK")
    assert client.stat()[0] == 1
    client.quit()
    client = poplib.POP3(pop_server.host, pop_server.port, timeout=10)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        client.apop("bob", "wrong")
    client.quit()


def test_greeting_stamps_differ(pop_server: Controller) -> None:  # row 22
    stamps = set()
    for _ in range(20):
        sock, greeting = raw_connect(pop_server)
        sock.close()
        match = re.search(rb"<(\d+)\.(\d+)@([^>]+)>", greeting)
        assert match is not None
        stamps.add(match.group(0))
    assert len(stamps) == 20


def test_curl_lists_and_retrieves(pop_server: Controller, fill: Fill) -> None:
    curl = shutil.which("curl")
    assert curl is not None, "curl is installed by .ci/run"
    msgs = [message(1), message(2)]
    fill("alice", msgs)
    base = f"pop3://alice:{PASSWORD}@{pop_server.host}:{pop_server.port}/"
    listing = subprocess.run([curl, "-sS", base], capture_output=True, check=True, timeout=30).stdout
    assert listing.splitlines() == [b"%d %d" % (i, len(m) + m.count(b"\n")) for i, m in enumerate(msgs, 1)]
    got = subprocess.run([curl, "-sS", base + "2"], capture_output=True, check=True, timeout=30).stdout
    assert got == msgs[1].replace(b"\n", b"\r\n")
    # DELE through curl's custom request, then QUIT commits it.
    subprocess.run([curl, "-sS", "-X", "DELE", "-I", base + "1"], capture_output=True, check=True, timeout=30)
    listing = subprocess.run([curl, "-sS", base], capture_output=True, check=True, timeout=30).stdout
    assert listing.splitlines() == [b"1 %d" % (len(msgs[1]) + msgs[1].count(b"\n"))]
    bad = subprocess.run(
        [curl, "-sS", f"pop3://alice:wrong@{pop_server.host}:{pop_server.port}/"], capture_output=True, timeout=30
    )
    assert bad.returncode != 0


def test_pipelined_commands_in_one_packet(pop_server: Controller, fill: Fill) -> None:  # rows 73, 74
    fill("alice", [message(1), message(2)])
    sock, _ = raw_connect(pop_server)
    sock.sendall(b"USER alice\r\nPASS %s\r\nSTAT\r\nRETR 1\r\nLIST\r\nQUIT\r\n" % PASSWORD.encode())
    data = recv_until(sock, b"signing off (2 messages left).\r\n")
    replies = data.split(b"\r\n")
    assert replies[0].startswith(b"+OK Password required")
    assert replies[1].startswith(b"+OK alice has 2 visible")
    assert replies[2] == b"+OK 2 %d" % (2 * (len(message(1)) + message(1).count(b"\n")))
    assert data.count(b"\r\n.\r\n") == 2
    sock.close()


def test_disconnect_after_dele_loses_nothing(pop_server: Controller, fill: Fill) -> None:  # rows 57, 58
    fill("alice", [message(1), message(2)])
    client = login(pop_server)
    client.dele(1)
    client.dele(2)
    client.close()
    deadline = time.time() + 5
    while True:  # the server notices the close and releases the lock
        try:
            client = login(pop_server)
            break
        except poplib.error_proto:
            assert time.time() < deadline
            time.sleep(0.05)
    assert client.stat()[0] == 2
    client.quit()


def test_second_session_gets_in_use(pop_server: Controller, fill: Fill) -> None:  # rows 19, 20, 71
    fill("alice", [message(1)])
    first = login(pop_server)
    second = poplib.POP3(pop_server.host, pop_server.port, timeout=10)
    second.user("alice")
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_(PASSWORD)
    # Wrong credentials never reveal the lock.
    second.user("alice")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        second.pass_("wrong")
    first.quit()
    second.user("alice")
    assert second.pass_(PASSWORD).startswith(b"+OK")
    second.quit()


def test_unknown_user_and_wrong_password_look_the_same(mailroot: Path, fill: Fill) -> None:
    fill("alice", [message(1)])
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    with Controller(authenticator=auth, auth_fail_delay=0.3) as server:
        replies = {}
        for user in ("alice", "nobody"):
            sock, _ = raw_connect(server)
            started = time.monotonic()
            sock.sendall(b"USER %s\r\nPASS wrong\r\n" % user.encode())
            data = recv_until(sock, b"failed.\r\n")
            replies[user] = (data.replace(user.encode(), b"NAME"), time.monotonic() - started)
            sock.close()
        assert replies["alice"][0] == replies["nobody"][0]
        assert replies["alice"][1] >= 0.3 and replies["nobody"][1] >= 0.3


def test_new_mail_during_session_waits(pop_server: Controller, fill: Fill) -> None:  # row 41
    maildir = fill("alice", [message(1)])
    client = login(pop_server)
    write_maildir_message(maildir, message(2))
    assert client.stat()[0] == 1
    assert len(client.uidl()[1]) == 1
    client.dele(1)
    client.quit()
    client = login(pop_server)
    assert client.stat()[0] == 1
    assert b"test 2" in b"\n".join(client.retr(1)[1])
    client.quit()


def test_retrieved_messages_move_to_cur_as_seen(pop_server: Controller, fill: Fill) -> None:
    maildir = fill("alice", [message(1), message(2)])
    client = login(pop_server)
    client.retr(2)
    client.quit()
    names = sorted(p.name for p in (maildir / "cur").iterdir())
    assert len(names) == 1 and names[0].endswith(":2,S")
    assert len(list((maildir / "new").iterdir())) == 1
    client = login(pop_server)
    assert rawpop.shortcmd(client, "LAST").startswith(b"+OK 2 ")  # LAST has no poplib method
    client.quit()


def test_uidl_stable_across_restart(mailroot: Path, fill: Fill) -> None:  # row 51
    fill("alice", [message(i) for i in range(5)])
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    with Controller(authenticator=auth) as server:
        client = login(server)
        first = client.uidl()[1]
        client.quit()
    with Controller(authenticator=auth) as server:
        client = login(server)
        assert client.uidl()[1] == first
        client.quit()


def test_large_message_streams_exactly(pop_server: Controller, fill: Fill) -> None:
    body = b"".join(b".%d dotted line number %d\n" % (i % 3, i) for i in range(200_000))
    big = message(1) + body
    fill("alice", [big])
    client = login(pop_server)
    size = int(rawpop.shortcmd(client, "LIST 1").split()[2])
    _, lines, _ = client.retr(1)
    got = b"\r\n".join(lines) + b"\r\n"
    assert got == big.replace(b"\n", b"\r\n") and len(got) == size
    client.quit()


def test_overlong_line_and_garbage_over_the_wire(pop_server: Controller) -> None:
    sock, _ = raw_connect(pop_server)
    sock.sendall(b"X" * 100_000 + b"\r\nCAPA\r\n")
    data = recv_until(sock, b"\r\n.\r\n")
    assert data.startswith(b"-ERR Command line too long.\r\n+OK")
    sock.sendall(b"QUIT\r\n")
    assert recv_until(sock, b"\r\n").startswith(b"+OK")
    sock.close()


def test_connection_limit_per_address(mailroot: Path) -> None:
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    with Controller(authenticator=auth, max_connections_per_ip=2) as server:
        a, ga = raw_connect(server)
        b, gb = raw_connect(server)
        c, gc = raw_connect(server)
        assert ga.startswith(b"+OK") and gb.startswith(b"+OK")
        assert gc.startswith(b"-ERR [SYS/TEMP]")
        a.close()
        deadline = time.time() + 5
        while True:
            d, gd = raw_connect(server)
            d.close()
            if gd.startswith(b"+OK"):
                break
            assert time.time() < deadline
            time.sleep(0.05)
        for s in (b, c):
            s.close()


def test_autologout_closes_without_reply_and_commits_nothing(mailroot: Path, fill: Fill) -> None:  # row 60
    fill("alice", [message(1)])
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    with Controller(authenticator=auth, timeout=0.5) as server:
        client = login(server)
        client.dele(1)
        time.sleep(1.0)
        assert client.sock.recv(100) == b""
        client.close()
    with Controller(authenticator=auth) as server:
        client = login(server)
        assert client.stat()[0] == 1
        client.quit()


def test_update_on_abort_commits_when_enabled(mailroot: Path, fill: Fill) -> None:
    fill("alice", [message(1), message(2)])
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    with Controller(authenticator=auth, update_on_abort=True) as server:
        client = login(server)
        client.dele(1)
        client.close()
        deadline = time.time() + 5
        while True:
            try:
                client = login(server)
                break
            except poplib.error_proto:
                assert time.time() < deadline
                time.sleep(0.05)
        assert client.stat()[0] == 1
        client.quit()


def test_unreadable_maildrop_gives_clean_error(pop_server: Controller, fill: Fill) -> None:
    maildir = fill("alice", [message(1)])
    (maildir / LOCK_NAME).mkdir()  # the lock file cannot be opened
    client = poplib.POP3(pop_server.host, pop_server.port, timeout=10)
    client.user("alice")
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
        client.pass_(PASSWORD)
    assert client.quit().startswith(b"+OK")


def test_message_vanishing_under_the_session(pop_server: Controller, fill: Fill) -> None:
    maildir = fill("alice", [message(1), message(2)])
    client = login(pop_server)
    for p in (maildir / "new").iterdir():
        if b"test 1" in p.read_bytes():
            p.unlink()
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
        client.retr(1)
    assert client.retr(2)[0].startswith(b"+OK")
    client.dele(1)
    assert client.quit().startswith(b"+OK")


def _pipelined(server: Controller, commands: bytes) -> bytes:
    """Everything the server sends for these commands, until it closes."""
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.sendall(b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\n" + commands)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    sock.close()
    return received


@pytest.mark.parametrize("sent_before_failure", [False, True])
def test_read_failing_mid_message(
    pop_server: Controller, fill: Fill, monkeypatch: pytest.MonkeyPatch, sent_before_failure: bool
) -> None:
    """Message 2 fails after its first piece. If nothing of it has gone out
    yet, the client hears -ERR [SYS/TEMP] and the session goes on (the DELE
    before it is committed at QUIT); if part of it is on the wire, the
    connection closes without the final "." and nothing is committed. No
    traceback either way. (A disk failing mid-read cannot be made here: the
    maildrop's read is replaced for message 2.)"""
    from qpopper.errors import MaildropError
    from qpopper.maildrop.maildir import MaildirMaildrop

    maildir = fill("alice", [message(1), message(2)])
    real_read = MaildirMaildrop.read
    big = b"x" * 70 + b"\n"

    def failing_read(self: MaildirMaildrop, index: int, chunk_size: int = 65536):  # type: ignore[no-untyped-def]
        if index != 1:
            yield from real_read(self, index, chunk_size)
            return
        yield b"Subject: half\n\nfirst piece\n"
        if sent_before_failure:
            yield big * 4000  # past the write threshold: flushed to the client
        raise MaildropError("disk gone")

    monkeypatch.setattr(MaildirMaildrop, "read", failing_read)
    received = _pipelined(pop_server, b"DELE 1\r\nRETR 2\r\nQUIT\r\n")
    assert b"Traceback" not in received and b"Internal" not in received
    left = list((maildir / "new").iterdir()) + list((maildir / "cur").iterdir())
    if sent_before_failure:
        assert b"first piece" in received and not received.endswith(b"\r\n.\r\n")
        assert b"signing off" not in received and len(left) == 2
    else:
        assert b"first piece" not in received
        assert b"-ERR [SYS/TEMP] Message cannot be read now.\r\n+OK" in received
        assert received.endswith(b"\r\n") and b"signing off" in received
        assert len(left) == 1 and b"test 2" in left[0].read_bytes()


def test_many_concurrent_sessions(pop_server: Controller, fill: Fill, mailroot: Path) -> None:
    users = [f"user{i}" for i in range(20)]
    auth = StaticAuthenticator(dict.fromkeys(users, PASSWORD), mail_location=f"maildir:{mailroot}/%u/Maildir")
    for u in users:
        fill(u, [message(i) for i in range(3)])
    errors: list[BaseException] = []
    with Controller(authenticator=auth) as server:

        def work(user: str) -> None:
            try:
                for _ in range(5):
                    c = login(server, user)
                    digest = hashlib.sha256(b"".join(c.retr(2)[1])).hexdigest()
                    assert digest
                    c.quit()
            except BaseException as exc:  # noqa: BLE001 - reported by the assert below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(u,)) for u in users]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_draining_stop_lets_update_finish(mailroot: Path, fill: Fill, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM's path: a session in UPDATE completes its commit and gets +OK;
    an idle session is closed without deleting anything."""
    from qpopper.maildrop.maildir import MaildirMaildrop

    fill("alice", [message(1), message(2)])
    fill("bob", [message(1)])
    in_commit = threading.Event()
    release = threading.Event()
    real_commit = MaildirMaildrop.commit

    def slow_commit(self: MaildirMaildrop, deleted: object, retrieved: object) -> None:
        if deleted:
            in_commit.set()
            release.wait(30)
        real_commit(self, deleted, retrieved)  # type: ignore[arg-type]

    monkeypatch.setattr(MaildirMaildrop, "commit", slow_commit)
    auth = StaticAuthenticator({"alice": PASSWORD, "bob": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    server = Controller(authenticator=auth).start()
    alice = login(server, "alice")
    bob = login(server, "bob")
    bob.dele(1)
    alice.dele(1)
    alice.sock.sendall(b"QUIT\r\n")
    assert in_commit.wait(10)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    bob.file.read()  # the stop is under way once it has closed the idle session; let the commit finish now
    release.set()
    assert rawpop.getresp(alice).startswith(b"+OK")  # reply to the QUIT sent by hand
    stopper.join(30)
    assert not stopper.is_alive()
    alice.close()
    bob.close()
    maildir = mailroot / "alice" / "Maildir"
    assert len(os.listdir(maildir / "new")) + len(os.listdir(maildir / "cur")) == 1
    assert len(os.listdir(mailroot / "bob" / "Maildir" / "new")) == 1
