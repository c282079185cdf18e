"""who and kick over the control sockets, with the real `qpopper-admin`
command against a real daemon with two workers: the list, a kick whose
session's deletions are never applied (update-on-abort or not), the
sockets' modes, SO_PEERCRED's refusal of another account, and bad input."""

from __future__ import annotations

import json
import os
import poplib
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import QpopperProcess, write_maildir_message

ADMIN = [sys.executable, "-c", "import sys; from qpopper.daemon.admin import main; sys.exit(main())"]
USERS = ("carol", "dave", "erin")
MSG = b"From: a@example.org\nSubject: control\n\nbody\n"


class ControlDaemon(QpopperProcess):
    def __init__(self, tmp_path: Path, *args: str, control: Path | None = None) -> None:
        self.home = tmp_path / "home"
        self.control = control or tmp_path / "control"
        passwd = tmp_path / "passwd"
        passwd.write_text("".join(f"{u}:{{PLAIN}}pw::::{self.home}/{u}::\n" for u in USERS))
        for user in USERS:
            for _ in range(2):
                write_maildir_message(self.home / user / "Maildir", MSG)
        super().__init__(tmp_path, ["--passwd-file", str(passwd), "--control-dir", str(self.control), *args])

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ADMIN, "--control-dir", str(self.control), *args], capture_output=True, text=True,
                              timeout=60)

    def who(self) -> list[dict[str, object]]:
        result = self.admin("--json", "who")
        assert result.returncode == 0, result.stderr
        return list(json.loads(result.stdout))

    def messages(self, user: str) -> int:
        return sum(1 for sub in ("new", "cur") for _ in (self.home / user / "Maildir" / sub).iterdir())


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., ControlDaemon]]:
    started: list[ControlDaemon] = []

    def start(*args: str, control: Path | None = None) -> ControlDaemon:
        daemon = ControlDaemon(tmp_path, *args, control=control)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_who_lists_the_sessions_of_every_worker(start: Callable[..., ControlDaemon]) -> None:
    daemon = start("--workers", "2")
    clients = [daemon.login(user, "pw") for user in USERS[:2]]
    waiting = poplib.POP3("127.0.0.1", daemon.port, timeout=20)
    try:
        clients[0].retr(1)
        sessions = daemon.who()
        by_user = {s["user"]: s for s in sessions}
        assert set(by_user) == {"carol", "dave", ""}
        assert by_user["carol"]["state"] == "transaction" and by_user[""]["state"] == "authorization"
        assert by_user["carol"]["address"] == "127.0.0.1"
        # Both were greeted and logged in; carol was sent a message on top.
        assert int(str(by_user["carol"]["sent"])) >= int(str(by_user["dave"]["sent"])) + len(MSG) > len(MSG)
        assert abs(float(str(by_user["carol"]["since"])) - time.time()) < 60
        table = daemon.admin("who")
        assert table.returncode == 0
        header, *rows = table.stdout.splitlines()
        assert header.split() == ["USER", "ADDRESS", "SINCE", "STATE", "SENT", "PID"]
        assert sorted(row.split()[0] for row in rows) == ["-", "carol", "dave"]
    finally:
        for client in [*clients, waiting]:
            client.quit()
    wait_for(lambda: daemon.who() == [])


@pytest.mark.parametrize("update_on_abort", [False, True])
def test_a_kicked_sessions_deletions_are_never_applied(
    start: Callable[..., ControlDaemon], update_on_abort: bool
) -> None:
    daemon = start("--workers", "2", *(["--update-on-abort"] if update_on_abort else []))
    carol = daemon.login("carol", "pw")
    dave = daemon.login("dave", "pw")
    carol.dele(1)
    carol.dele(2)
    result = daemon.admin("kick", "carol")
    assert result.returncode == 0 and result.stdout == "kicked 1 session of carol\n", result.stderr
    with pytest.raises(poplib.error_proto, match=r"ended by the administrator"):
        carol.stat()  # reads the farewell the idle session was sent
    carol.close()
    wait_for(lambda: [s["user"] for s in daemon.who()] == ["dave"])
    assert daemon.messages("carol") == 2
    assert dave.stat()[0] == 2  # the other user's session goes on
    dave.dele(1)
    dave.quit()
    assert daemon.messages("dave") == 1
    again = daemon.login("carol", "pw")  # the kicked session's lock is gone
    assert again.stat()[0] == 2
    again.quit()
    assert daemon.admin("kick", "carol").stdout == "no session of carol\n"
    assert "ended by the administrator" in daemon.log.read_text()


def test_sockets_are_private_and_other_accounts_are_refused(
    start: Callable[..., ControlDaemon], request: pytest.FixtureRequest
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another account")
    # Where another account can reach it once the modes allow (not under pytest's private tmp).
    control = Path(tempfile.mkdtemp(prefix="qpopper-control-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(control, ignore_errors=True))
    os.chmod(control, 0o755)
    daemon = start(control=control)
    wait_for(lambda: any(daemon.control.glob("*.sock")))
    assert stat.S_IMODE(daemon.control.stat().st_mode) == 0o700
    (path,) = daemon.control.glob("*.sock")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _ask_as_nobody(path) == "EACCES"  # the file's mode stops another account
    # Past the file's mode, SO_PEERCRED still refuses another uid.
    os.chmod(daemon.control, 0o755)
    os.chmod(path, 0o666)
    answer = json.loads(_ask_as_nobody(path))
    assert answer["error"].startswith("permission denied"), answer
    # The record follows the answer within the loop's turn (stderr's records are written once per turn).
    wait_for(lambda: "refused a request from uid" in daemon.log.read_text())
    assert daemon.who() == []  # root still may


# Run by the system's Python as `nobody` (who may not reach the test's interpreter): connect, ask, print.
_ASK = """
import socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.settimeout(10)
try:
    sock.connect(sys.argv[1])
except PermissionError:
    print("EACCES")
else:
    sock.sendall(b"who\\n")
    print(sock.makefile("rb").readline().decode().strip())
"""


def _ask_as_nobody(path: Path) -> str:
    """Ask `who` on `path` as the account `nobody`; its answer, or EACCES."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("needs the system's python3 to act as another account")
    entry = pwd.getpwnam("nobody")
    result = subprocess.run([python, "-c", _ASK, str(path)], capture_output=True, text=True, timeout=60,
                            user=entry.pw_uid, group=entry.pw_gid, extra_groups=[], cwd="/")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_bad_input_gets_one_line_and_status_2(start: Callable[..., ControlDaemon]) -> None:
    daemon = start()
    for args in (["kick"], ["frob"], [], ["kick", "a b"], ["who", "extra"]):
        result = daemon.admin(*args)
        assert result.returncode == 2, (args, result)
        assert result.stderr.startswith("qpopper-admin: ") and result.stderr.count("\n") == 1, (args, result.stderr)
        assert "Traceback" not in result.stderr
    wait_for(lambda: any(daemon.control.glob("*.sock")))
    (path,) = daemon.control.glob("*.sock")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"\xff\xfe\n")
        assert "error" in json.loads(sock.makefile("rb").readline())
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"shutdown now\n")
        assert json.loads(sock.makefile("rb").readline())["error"].startswith("unknown request")
    missing = subprocess.run([*ADMIN, "--control-dir", str(daemon.control / "nope"), "who"], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1


def test_a_dead_process_socket_is_skipped_and_removed(start: Callable[..., ControlDaemon]) -> None:
    daemon = start()
    stale = daemon.control / "999999.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))  # bound, never listening: as a killed process leaves it
    assert daemon.who() == []
    assert not stale.exists()
