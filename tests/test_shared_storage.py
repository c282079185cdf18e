"""Session locks on storage several hosts share, where OFD locks may not hold.

A mount without working NFS locking (`nolock`, `local_lock=all`) keeps each
host's OFD locks to itself. The hosts are simulated by processes that each
report a host name of their own and whose OFD lock is switched off (it
always succeeds, as it does on such a mount): with `shared-storage` the
session lock's owner file still lets exactly one of them in, a holder keeps
it fresh, and a dead host's or a killed process's lock is taken over. Then
a real server refuses a maildrop another "host" holds.
"""

from __future__ import annotations

import os
import poplib
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import PASSWORD
from qpopper import Controller, StaticAuthenticator
from qpopper.maildrop.dotlock import STALE_AGE
from qpopper.maildrop.maildir import LOCK_NAME
from qpopper.maildrop.mbox.paths import session_lock_path
from qpopper.maildrop.sessionlock import OWNER_SUFFIX

Fill = Callable[[str, list[bytes]], Path]
MSG = b"From: a@example.org\nSubject: shared storage\n\nbody\n"

# One "host": opens the maildrop, says what happened, holds it until told.
HOST = textwrap.dedent("""
    import socket, sys
    host, location, shared = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    socket.gethostname = lambda: host                  # another host ...
    from qpopper.maildrop import sessionlock
    sessionlock._lock_fd = lambda fd: True             # ... whose OFD locks this one never sees
    sessionlock._refresher.interval = 0.2
    from qpopper.errors import MaildropBusy
    from qpopper.maildrop import MaildropSettings
    from qpopper.maildrop.location import open_maildrop
    try:
        drop = open_maildrop(location, MaildropSettings(shared_storage=shared))
    except MaildropBusy:
        print("busy", flush=True)
        sys.exit(0)
    print("held", len(drop.messages()), flush=True)
    sys.stdin.readline()
    drop.close()
    print("released", flush=True)
""")


class Host:
    """A process playing one host, holding (or refused) a maildrop."""

    def __init__(self, script: Path, name: str, location: str, shared: bool = True) -> None:
        self.proc = subprocess.Popen([sys.executable, str(script), name, location, "1" if shared else "0"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.said = (self.proc.stdout.readline().split() or ["nothing"])[0]

    def release(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "released"
        self.proc.wait(30)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Callable[..., Host]]:
    script = tmp_path / "host.py"
    script.write_text(HOST)
    started: list[Host] = []

    def start(name: str, location: str, shared: bool = True) -> Host:
        host = Host(script, name, location, shared)
        started.append(host)
        return host

    yield start
    for host in started:
        host.close()


@pytest.fixture(params=["maildir", "mbox"])
def maildrop(request: pytest.FixtureRequest, fill: Fill, tmp_path: Path) -> tuple[str, Path]:
    """A maildrop with one message: its location and its owner file's path."""
    if request.param == "maildir":
        path = fill("alice", [MSG])
        return f"maildir:{path}", path / (LOCK_NAME + OWNER_SUFFIX)
    spool = tmp_path / "spool" / "alice"
    spool.parent.mkdir()
    spool.write_bytes(b"From a@example.org Wed Dec  2 05:00:00 2026\n" + MSG + b"\n")
    return f"mbox:{spool}", Path(session_lock_path(str(spool)) + OWNER_SUFFIX)


def test_without_the_setting_two_hosts_both_get_it(hosts: Callable[..., Host], maildrop: tuple[str, Path]) -> None:
    # What the setting is for: with the OFD lock out of play, nothing else excludes the second host.
    location, _ = maildrop
    first = hosts("host-a", location, shared=False)
    second = hosts("host-b", location, shared=False)
    assert (first.said, second.said) == ("held", "held")


def test_two_hosts_exclude_each_other(hosts: Callable[..., Host], maildrop: tuple[str, Path]) -> None:
    location, owner = maildrop
    first = hosts("host-a", location)
    assert first.said == "held"
    assert owner.read_text().split()[1] == "host-a" and int(owner.read_text().split()[0]) == first.proc.pid
    assert hosts("host-b", location).said == "busy"
    # The holder keeps its file fresh (every 0.2 s in this test, every minute in service).
    began = owner.stat().st_mtime
    deadline = time.monotonic() + 20
    while owner.stat().st_mtime == began and time.monotonic() < deadline:
        time.sleep(0.05)
    assert owner.stat().st_mtime > began, "the holder did not refresh its owner file"
    first.release()
    assert not owner.exists()
    second = hosts("host-b", location)
    assert second.said == "held"
    second.release()


def test_a_dead_hosts_lock_is_taken_over_once_stale(hosts: Callable[..., Host], maildrop: tuple[str, Path]) -> None:
    location, owner = maildrop
    first = hosts("host-a", location)
    assert first.said == "held"
    first.kill()  # the host is gone: its pid means nothing to host-b, its file stays
    assert owner.exists()
    assert hosts("host-b", location).said == "busy"  # fresh: it may be a live host's
    stale = time.time() - STALE_AGE - 10  # untouched for longer than a holder ever leaves it
    os.utime(owner, (stale, stale))
    second = hosts("host-b", location)
    assert second.said == "held"
    assert owner.read_text().split()[1] == "host-b"
    assert hosts("host-c", location).said == "busy"
    second.release()


def test_a_killed_process_of_this_host_is_taken_over_at_once(
    hosts: Callable[..., Host], maildrop: tuple[str, Path]
) -> None:
    location, owner = maildrop
    first = hosts("host-a", location)
    assert first.said == "held"
    first.kill()  # kill -9 on host-a: its pid is gone, and host-a can tell
    again = hosts("host-a", location)
    assert again.said == "held"
    assert int(owner.read_text().split()[0]) == again.proc.pid
    again.release()


def test_a_server_with_shared_storage_refuses_a_maildrop_another_host_holds(
    hosts: Callable[..., Host], fill: Fill, mailroot: Path
) -> None:
    path = fill("alice", [MSG])
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    server = Controller(authenticator=auth, shared_storage=True).start()
    try:
        other = hosts("elsewhere", f"maildir:{path}")
        assert other.said == "held"
        client = poplib.POP3(server.host, server.port, timeout=30)
        client.user("alice")
        with pytest.raises(poplib.error_proto, match=r"IN-USE"):
            client.pass_(PASSWORD)
        client.close()
        other.release()
        client = poplib.POP3(server.host, server.port, timeout=30)
        client.user("alice")
        client.pass_(PASSWORD)
        assert client.stat()[0] == 1
        assert (path / (LOCK_NAME + OWNER_SUFFIX)).read_text().split()[0] == str(os.getpid())
        client.quit()
        assert not (path / (LOCK_NAME + OWNER_SUFFIX)).exists()
    finally:
        server.stop()
