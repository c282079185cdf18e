"""The last qpopper rows of issue 21, each on a real daemon or Controller:
a bare port as the positional, -t turning debug on, `debug` and
`drac-host` in a user's option file, the reverse-lookup warning and the
lookup `statistics` from an option file needs, -no-mime's login octets, the
pre-login timeout record, -e expire with auto-delete, and session lock
files that no longer stay behind."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import poplib
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import PASSWORD
from helpers import QPOPPER, TEST_DAEMON_ARGS, write_maildir_message
from qpopper import Controller, StaticAuthenticator
from qpopper.config.options import ListenAddress, parse_listen_address
from qpopper.errors import MaildropBusy
from qpopper.maildrop.maildir import LOCK_NAME
from qpopper.maildrop.sessionlock import SessionLock
from qpopper.server import _records
from test_admin import Daemon
from test_postlogin import DracDaemon, rpcbind  # noqa: F401 - rpcbind is the fixture DracDaemon needs

MIME = (
    b"From: a@example.org\nSubject: parts\nMIME-Version: 1.0\n"
    b'Content-Type: multipart/alternative; boundary="b"\n\n'
    b"--b\nContent-Type: text/plain\n\nplain text\n"
    b"--b\nContent-Type: text/html\n\n<p>html text that is longer than the plain one</p>\n"
    b"--b--\n"
)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(*args: str) -> Daemon:
        d = Daemon(tmp_path, list(args))
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def wait_for(path: Path, pattern: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, text := path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, f"{pattern!r} not in:\n{text}"
        time.sleep(0.05)
    return text


# ---- a bare port as the positional --------------------------------------------------


@pytest.mark.parametrize(
    ("text", "address"), [("8110", ListenAddress(None, 8110)), (":8110", ListenAddress(None, 8110))]
)
def test_a_bare_port_is_a_port_on_every_address(text: str, address: ListenAddress) -> None:
    assert parse_listen_address(text) == address


def test_the_manuals_own_example_listens_on_that_port(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port free a moment ago; the daemon binds it on every address
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    passwd = tmp_path / "passwd"
    passwd.write_text(f"carol:{{PLAIN}}pw::::{tmp_path}/home/carol::\n")
    log = tmp_path / "daemon.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [*QPOPPER, *TEST_DAEMON_ARGS, f"--passwd-file={passwd}", str(port), "-S", "-T600"],
            stdout=subprocess.DEVNULL, stderr=err,
        )
        try:
            wait_for(log, rf"listening on [^ ]*:{port}")
            client = poplib.POP3("127.0.0.1", port, timeout=10)
            client.user("carol")
            assert client.pass_("pw").startswith(b"+OK")
            client.quit()
        finally:
            proc.terminate()
            proc.wait(30)
    assert "cannot listen" not in log.read_text()


# ---- -t ---------------------------------------------------------------------------------


def test_a_trace_file_turns_debug_on_and_gets_the_debug_records(daemons: Callable[..., Daemon], tmp_path: Path) -> None:
    trace = tmp_path / "trace.log"
    d = daemons("-t", str(trace))
    d.client().quit()
    text = wait_for(trace, r"signing off")
    assert re.search(r"DEBUG qpopper\.session: 127\.0\.0\.1:\d+: authenticated carol", text)
    assert "PASS <password>" in text and "pw" not in text.replace("carol", "")
    # Without -d, the debug records go to the trace file only.
    assert "DEBUG" not in d.stop()


# ---- user option files ------------------------------------------------------------------


def spool_server(tmp_path: Path, options_text: str, **settings: object) -> Controller:
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    (spool / "alice").write_bytes(b"From a@b  Wed Nov 25 10:00:00 2026\nSubject: one\n\n1\n\n")
    (spool / ".alice.qpopper-options").write_text(options_text)
    auth = StaticAuthenticator({"alice": PASSWORD, "bob": PASSWORD}, mail_location=f"mbox:{spool}/%u")
    return Controller(authenticator=auth, spool_options=True, spool_dir=str(spool), **settings)  # type: ignore[arg-type]


def pop_session(server: Controller, user: str = "alice") -> None:
    client = poplib.POP3(server.host, server.port, timeout=10)
    client.user(user)
    client.pass_(PASSWORD)
    client.stat()
    client.quit()


def test_debug_in_an_option_file_debugs_that_session(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="qpopper")
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "bob").write_bytes(b"")
    with spool_server(tmp_path, "set debug\n") as server:
        pop_session(server)
        pop_session(server, "bob")
    debug = [r.getMessage() for r in caplog.records if r.getMessage().startswith("debug: ")]
    assert any("debug records on for alice" in m for m in debug)
    assert any(m.endswith("alice < STAT") for m in debug)
    assert any("opened" in m for m in debug)
    assert not any("bob" in m for m in debug)  # that session only


def test_drac_host_in_an_option_file_registers_the_client(drac: DracDaemon, tmp_path: Path) -> None:
    with spool_server(tmp_path, "set drac-host = 127.0.0.1\n") as server:
        pop_session(server)
        deadline = time.monotonic() + 10
        while not drac.added:
            assert time.monotonic() < deadline, "the option file's DRAC host was never told"
            time.sleep(0.05)
    assert drac.added == ["127.0.0.1"]


@pytest.fixture
def drac(rpcbind: None) -> Iterator[DracDaemon]:  # noqa: F811 - the fixture imported above, used here
    daemon = DracDaemon()
    daemon.start()
    yield daemon
    daemon.stop()


# ---- reverse lookup --------------------------------------------------------------------


def test_statistics_from_an_option_file_still_looks_the_client_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="qpopper")
    with spool_server(tmp_path, "set statistics\n") as server:
        pop_session(server)
        deadline = time.monotonic() + 10
        while not any(r.getMessage().startswith("Stats: alice") for r in caplog.records):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    (stats,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Stats: alice")]
    # 127.0.0.1 is "localhost" in /etc/hosts: the name shows the lookup ran.
    assert stats.endswith(" localhost 127.0.0.1")


def test_an_address_without_a_name_is_warned_of(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The one stand-in of this file: tests may send no DNS query beyond the
    # loopback, and every loopback address has a name or goes to DNS, so the
    # resolver's "no such name" answer is played here.
    def no_name(address: tuple[str, int], flags: int) -> tuple[str, str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getnameinfo", no_name)
    caplog.set_level(logging.WARNING, logger="qpopper")
    assert asyncio.run(_records.reverse_lookup("192.0.2.9", asyncio.to_thread)) == "192.0.2.9"
    assert "client address 192.0.2.9 has no canonical host name" in caplog.text


# ---- small rows ------------------------------------------------------------------------


def test_no_mime_login_octets_agree_with_stat_and_list(daemons: Callable[..., Daemon]) -> None:
    d = daemons()
    d.deliver("carol", MIME)
    d.deliver("carol")
    client = poplib.POP3("127.0.0.1", d.port, timeout=10)
    client.user("carol-no-mime")
    welcome = client.pass_("pw")
    count, octets = client.stat()
    listed = sum(int(line.split()[1]) for line in client.list()[1])
    client.quit()
    match = re.search(rb"has (\d+) visible messages \(0 hidden\) in (\d+) octets", welcome)
    assert match is not None
    assert (int(match.group(1)), int(match.group(2))) == (count, octets) and octets == listed
    plain = d.client()
    assert plain.stat()[1] != octets  # mangling did change the sizes: the agreement means something
    plain.quit()


def test_the_pre_login_timeout_record_names_the_peer(daemons: Callable[..., Daemon]) -> None:
    d = daemons("-T", "1")
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
        sock.recv(512)
        wait_for(d.log, r"127\.0\.0\.1:\d+: timeout \(1 s\) before login")
    assert "for None" not in d.log.read_text()


def test_expire_with_auto_delete_is_warned_of_and_announces_expire_0(daemons: Callable[..., Daemon]) -> None:
    d = daemons("-e", "expire=5", "--auto-delete")
    client = poplib.POP3("127.0.0.1", d.port, timeout=10)
    assert client.capa()["EXPIRE"] == ["0"]
    client.quit()
    assert "announce-expire 5 is overridden by auto-delete" in d.stop()


# ---- session lock files ----------------------------------------------------------------


def test_no_lock_file_stays_beside_an_mbox_and_a_maildir_keeps_its_one(tmp_path: Path, mailroot: Path) -> None:
    with spool_server(tmp_path, "") as server:
        pop_session(server)
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == [".alice.qpopper-options", "alice"]
    maildir = mailroot / "alice" / "Maildir"
    write_maildir_message(maildir, b"Subject: x\n\nx\n")
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    with Controller(authenticator=auth) as server:
        pop_session(server)
        made = (maildir / LOCK_NAME).stat()
        pop_session(server)  # the same file again: no file made or removed per login
    kept = (maildir / LOCK_NAME).stat()
    assert (kept.st_ino, kept.st_size) == (made.st_ino, 0)


def test_a_lock_file_unlinked_under_a_waiting_locker_is_not_a_second_lock(tmp_path: Path) -> None:
    path = str(tmp_path / ".alice.qpopper-pop3.lock")
    first = SessionLock(path)
    first.acquire()
    stale = os.open(path, os.O_RDWR)  # a second session opened the file and is about to lock it
    with pytest.raises(MaildropBusy):
        SessionLock(path).acquire()
    first.release()
    assert not os.path.exists(path)
    third = SessionLock(path)
    third.acquire()  # a new file
    # The second session now locks the old, unlinked file; it must see that
    # the path names another file and start over, finding the third's lock.
    second = SessionLock(path)
    with pytest.raises(MaildropBusy):
        second.acquire()
    os.close(stale)
    third.release()


def _contend(path: str, inside: str, rounds: int, held: multiprocessing.Queue[int]) -> None:
    won = 0
    for _ in range(rounds):
        lock = SessionLock(path)
        try:
            lock.acquire()
        except MaildropBusy:
            continue
        fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if another holder is inside
        os.close(fd)
        os.unlink(inside)
        won += 1
        lock.release()
    held.put(won)


def test_lockers_racing_the_removal_never_hold_the_lock_together(tmp_path: Path) -> None:
    path, inside = str(tmp_path / "lock"), str(tmp_path / "inside")
    context = multiprocessing.get_context("fork")
    held: multiprocessing.Queue[int] = context.Queue()
    workers = [context.Process(target=_contend, args=(path, inside, 300, held)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0  # an O_EXCL failure (two holders at once) would end it non-zero
    assert sum(held.get(timeout=5) for _ in workers) > 0
    assert not os.path.exists(path) and not os.path.exists(inside)
