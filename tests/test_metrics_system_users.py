"""Metrics, who and kick in the system-users model: a real forking daemon,
a process per session that drops to a real Unix account, real PAM and
procmail. One scrape sees every session process's counts; the metric
files stay as many as the sessions ever held at once; each session
process answers who and kick on its own socket, which its parent removes.
Runs as root (CI does)."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from test_system_users import Account, Daemon, accounts, pam_service, procmail_deliver, worker_id

__all__ = ["accounts", "pam_service", "worker_id"]  # the fixtures, used by name

ADMIN = [sys.executable, "-c", "import sys; from qpopper.daemon.admin import main; sys.exit(main())"]
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


@pytest.fixture
def daemon(tmp_path: Path, pam_service: str, accounts: list[Account]) -> Iterator[Daemon]:
    for account in accounts:
        account.spool.unlink(missing_ok=True)
    d = Daemon(tmp_path, pam_service, "--metrics-listen", "127.0.0.1:0", f"--metrics-dir={tmp_path / 'metrics'}",
               f"--control-dir={tmp_path / 'control'}")
    yield d
    d.stop()


def _metrics_port(daemon: Daemon) -> int:
    match = re.search(rb"metrics on http://127\.0\.0\.1:(\d+)/metrics", daemon.log.read_bytes())
    assert match, daemon.log.read_text()
    return int(match.group(1))


def _value(daemon: Daemon, name: str, **labels: str) -> float:
    request = urllib.request.Request(f"http://127.0.0.1:{_metrics_port(daemon)}/metrics",
                                     headers={"Accept": OPENMETRICS})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):  # type: ignore[no-untyped-call]
        for sample in family.samples:
            if sample.name == name and set(labels.items()) <= set(sample.labels.items()):
                total += sample.value
    return total


def _wait(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def _who(control: Path) -> list[dict[str, object]]:
    result = subprocess.run([*ADMIN, "--control-dir", str(control), "--json", "who"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


def test_session_processes_are_counted_listed_and_kicked(
    daemon: Daemon, accounts: list[Account], tmp_path: Path
) -> None:
    alice, bob = accounts[0], accounts[1]
    for i in range(3):
        procmail_deliver(alice, f"alice {i}")
        procmail_deliver(bob, f"bob {i}")
    for _ in range(4):  # sessions one after another: each a process of its own
        client = daemon.login(alice)
        client.retr(1)
        client.quit()
    held = daemon.login(alice)
    kicked = daemon.login(bob)
    kicked.dele(1)
    kicked.dele(2)
    control = tmp_path / "control"
    sessions = {str(s["user"]): s for s in _who(control)}
    assert set(sessions) == {alice.name, bob.name}
    assert all(s["state"] == "transaction" for s in sessions.values())
    assert {int(str(s["pid"])) for s in sessions.values()} <= set(daemon.children())  # session processes
    result = subprocess.run([*ADMIN, "--control-dir", str(control), "kick", bob.name], capture_output=True,
                            text=True, timeout=60)
    assert result.stdout == f"kicked 1 session of {bob.name}\n", result.stderr
    kicked.close()
    _wait(lambda: [s["user"] for s in _who(control)] == [alice.name])
    held.quit()
    _wait(lambda: not list(control.glob("*.sock")))  # the parent removed each session's socket
    again = daemon.login(bob)
    assert again.stat()[0] == 3  # bob's deletions were never applied
    again.quit()

    deadline = time.monotonic() + 30
    while _value(daemon, "qpopper_sessions_ended_total") != 7 and time.monotonic() < deadline:
        time.sleep(0.1)
    files = sorted(p.name for p in (tmp_path / "metrics").iterdir())
    assert _value(daemon, "qpopper_sessions_ended_total") == 7, (files, daemon.log.read_text()[-3000:])
    assert _value(daemon, "qpopper_logins_total", result="ok") == 7
    assert _value(daemon, "qpopper_messages_retrieved_total") == 4
    assert _value(daemon, "qpopper_messages_deleted_total") == 0
    assert _value(daemon, "qpopper_sessions") == 0
    # Slots are reused: never more files than sessions held at once (two), plus the parent's.
    counters = sorted(p.name for p in (tmp_path / "metrics").glob("counter_*.db"))
    assert len(counters) <= 3, counters


def _exporter(daemon: Daemon) -> int:
    """The daemon's child that runs as nobody: the exporter (a session process runs as its user)."""
    nobody = pwd.getpwnam("nobody").pw_uid
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for pid in daemon.children():
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{pid}/status").read_text()
                uid = re.search(r"^Uid:\s+\d+\s+(\d+)", status, re.M)
                if uid and int(uid.group(1)) == nobody and re.search(r"^State:\s+[^Z]", status, re.M):
                    return pid
        time.sleep(0.05)
    raise AssertionError(daemon.log.read_text()[-3000:])


def test_the_exporter_runs_as_nobody_and_is_restarted_after_kill_9(
    daemon: Daemon, accounts: list[Account]
) -> None:
    alice = accounts[0]
    procmail_deliver(alice, "alice 0")
    for _ in range(2):
        daemon.login(alice).quit()
    _wait(lambda: _value(daemon, "qpopper_sessions_ended_total") == 2)
    first = _exporter(daemon)  # nobody: found by its uid; it reads the files in a root-owned 0700 tree
    os.kill(first, signal.SIGKILL)
    _wait(lambda: b"metrics exporter restarted" in daemon.log.read_bytes())
    second = _exporter(daemon)
    assert second != first
    assert _value(daemon, "qpopper_sessions_ended_total") == 2  # the counts live in the files
    daemon.login(alice).quit()
    _wait(lambda: _value(daemon, "qpopper_sessions_ended_total") == 3)
    assert re.search(rb"metrics exporter \d+ ended unexpectedly \(signal 9\)", daemon.log.read_bytes())


def test_a_request_to_a_session_process_that_ends_is_dropped_quietly(
    daemon: Daemon, accounts: list[Account], tmp_path: Path
) -> None:
    import socket

    alice = accounts[0]
    procmail_deliver(alice, "alice 0")
    client = daemon.login(alice)
    control = tmp_path / "control"
    _wait(lambda: len(list(control.glob("*.sock"))) == 1)
    pending = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    pending.settimeout(20)
    pending.connect(str(next(control.glob("*.sock"))))  # no request line yet: the process is reading it
    client.quit()  # the session ends, and its process with it
    assert pending.recv(100) == b""  # closed, unanswered
    pending.close()
    _wait(lambda: not list(control.glob("*.sock")))
    assert "Traceback" not in daemon.log.read_text()
