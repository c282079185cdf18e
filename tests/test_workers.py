"""--workers: several serving processes on one set of listeners, supervised.

Each test runs the real command; the greeting's timestamp names the pid of
the process that answered, which tells the workers apart.
"""

from __future__ import annotations

import os
import poplib
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_admin import Daemon


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, ["--workers", "2", "--max-connections", "40"])
    yield d
    d.stop()


def _pid_of_greeting(port: int) -> tuple[int, socket.socket]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    greeting = sock.recv(200)
    match = re.search(rb"<(\d+)\.", greeting)
    assert match, greeting
    return int(match.group(1)), sock


def _worker_pids(port: int, want: int = 2, tries: int = 300) -> set[int]:
    """Pids seen answering; connections are held so both workers get some."""
    pids: set[int] = set()
    held = []
    try:
        for _ in range(tries):
            pid, sock = _pid_of_greeting(port)
            pids.add(pid)
            held.append(sock)
            if len(held) > 15:
                held.pop(0).close()
            if len(pids) >= want:
                break
    finally:
        for sock in held:
            sock.close()
    return pids


def _children(pid: int, want: int = 2) -> set[int]:
    """The pool's children, once `want` of them run (the parent says it
    listens before it forks them)."""
    deadline = time.monotonic() + 15
    while True:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            found = {int(p) for p in f.read().split()}
        if len(found) >= want or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def test_two_workers_answer_and_share_the_work(pool: Daemon) -> None:
    pids = _worker_pids(pool.port)
    assert pids == _children(pool.proc.pid)
    assert len(pids) == 2 and pool.proc.pid not in pids


def test_one_session_per_maildrop_across_workers(pool: Daemon) -> None:
    pool.deliver("carol")
    clients = []
    try:
        first = pool.client()
        clients.append(first)
        for _ in range(6):  # whichever worker takes them, the lock is in a file
            with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
                clients.append(pool.client())
        assert first.stat()[0] == 1
    finally:
        for c in clients:
            try:
                c.quit()
            except (poplib.error_proto, OSError):
                pass


def test_a_killed_worker_is_replaced(pool: Daemon) -> None:
    before = _children(pool.proc.pid)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while True:
        now = _children(pool.proc.pid)
        if len(now) == 2 and victim not in now:
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.05)
    pool.deliver("dave")
    c = pool.client("dave")
    assert c.stat()[0] == 1
    c.quit()
    assert "ended unexpectedly" in pool.stop()


def test_sigterm_stops_every_worker(pool: Daemon) -> None:
    workers = _children(pool.proc.pid)
    c = pool.client()
    log = pool.stop()
    assert pool.proc.returncode == 0, log
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    with pytest.raises((OSError, poplib.error_proto)):
        c.noop()
    c.close()


def test_sighup_reaches_every_worker(tmp_path: Path) -> None:
    conf = tmp_path / "qpopper.conf"
    conf.write_text("reset shy\n")
    d = Daemon(tmp_path, ["--workers", "2", "-f", str(conf)])
    try:
        conf.write_text("set shy\n")
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        greetings: dict[int, bytes] = {}
        while len(greetings) < 2 or not all(g.startswith(b"+OK ready") for g in greetings.values()):
            assert time.monotonic() < deadline, greetings
            sock = socket.create_connection(("127.0.0.1", d.port), timeout=10)
            greeting = sock.recv(200)
            sock.close()
            match = re.search(rb"<(\d+)\.", greeting)
            assert match
            greetings[int(match.group(1))] = greeting
    finally:
        d.stop()


def test_workers_zero_means_one_per_cpu(tmp_path: Path) -> None:
    d = Daemon(tmp_path, ["--workers", "0"])
    try:
        cpus = len(os.sched_getaffinity(0))
        assert len(_children(d.proc.pid, cpus)) == cpus
    finally:
        d.stop()


def test_bad_worker_counts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="workers must be"):
        Daemon(tmp_path, ["--workers", "-1"])
