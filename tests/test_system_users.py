"""System users as qpopper served them: real Unix accounts made with
useradd, real PAM (pam_unix), a real forking daemon that drops to the user,
/var/mail spools written by real procmail. Runs as root (CI does)."""

from __future__ import annotations

import os
import poplib
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import QpopperProcess

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="system users need root")

REPO = Path(__file__).resolve().parent.parent
QPOPPER = [sys.executable, "-m", "qpopper"]
SPOOL = Path("/var/mail")


@dataclass
class Account:
    name: str
    password: str
    uid: int
    gid: int
    home: Path

    @property
    def spool(self) -> Path:
        return SPOOL / self.name


def _make_account(tag: str, uid: int) -> Account:
    name = f"qp{tag}{uid % 1000:03d}"
    password = f"pw-{uuid.uuid4().hex[:12]}"
    subprocess.run(["userdel", "-r", name], capture_output=True)
    subprocess.run(["useradd", "-m", "-u", str(uid), "-U", name], check=True, capture_output=True)
    subprocess.run(["chpasswd"], input=f"{name}:{password}\n".encode(), check=True)
    entry = subprocess.run(["getent", "passwd", name], capture_output=True, check=True, text=True).stdout.split(":")
    return Account(name, password, int(entry[2]), int(entry[3]), Path(entry[5]))


@pytest.fixture(scope="module")
def accounts(worker_id: str) -> Iterator[list[Account]]:
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not installed")
    base = 23000 + (0 if worker_id == "master" else int(worker_id.removeprefix("gw")) * 100) + random.randrange(0, 50)
    made = [_make_account("u", base + i) for i in range(3)]
    yield made
    for account in made:
        subprocess.run(["userdel", "-r", account.name], capture_output=True)
        for leftover in SPOOL.glob(f"*{account.name}*"):
            leftover.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def pam_service() -> Iterator[str]:
    name = f"qpopper-test-{uuid.uuid4().hex[:8]}"
    target = Path("/etc/pam.d") / name
    shutil.copy(REPO / "packaging" / "pam.d" / "pop3", target)
    yield name
    target.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def worker_id(request: pytest.FixtureRequest) -> str:
    return str(getattr(request.config, "workerinput", {}).get("workerid", "master"))


class Daemon(QpopperProcess):
    def __init__(self, tmp: Path, pam_service: str, *args: str) -> None:
        super().__init__(tmp, [f"--pam-service={pam_service}", "--min-uid=1000", "-d", *args])

    def login(self, account: Account, password: str | None = None) -> poplib.POP3:  # type: ignore[override]
        return super().login(account.name, account.password if password is None else password)

    def children(self) -> list[int]:
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    status = (entry / "status").read_text()
                except OSError:
                    continue
                if re.search(rf"^PPid:\s+{self.proc.pid}$", status, re.M):
                    out.append(int(entry.name))
        return out


@pytest.fixture
def daemon(tmp_path: Path, pam_service: str, accounts: list[Account]) -> Iterator[Daemon]:
    for account in accounts:
        account.spool.unlink(missing_ok=True)
    d = Daemon(tmp_path, pam_service)
    yield d
    d.stop()


def procmail_deliver(account: Account, subject: str, body: str = "body line\n") -> None:
    message = (
        f"From sender@example.org  Wed Nov 25 10:00:00 2026\nFrom: sender@example.org\n"
        f"To: {account.name}\nSubject: {subject}\n\n{body}"
    )
    subprocess.run(["procmail", "-d", account.name], input=message.encode(), check=True, timeout=60)


def subjects(client: poplib.POP3) -> list[str]:
    out = []
    for i in range(1, client.stat()[0] + 1):
        for line in client.top(i, 0)[1]:
            if line.startswith(b"Subject: "):
                out.append(line[9:].decode())
    return out


def proc_ids(pid: int) -> tuple[list[int], list[int], list[int]]:
    status = Path(f"/proc/{pid}/status").read_text()
    uids = [int(x) for x in re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()]  # type: ignore[union-attr]
    gids = [int(x) for x in re.search(r"^Gid:\s+(.*)$", status, re.M).group(1).split()]  # type: ignore[union-attr]
    groups = [int(x) for x in re.search(r"^Groups:\s*(.*)$", status, re.M).group(1).split()]  # type: ignore[union-attr]
    return uids, gids, groups


def test_pam_login_fetch_and_delete_keeps_owner_group_mode(daemon: Daemon, accounts: list[Account]) -> None:
    alice = accounts[0]
    for i in range(3):
        procmail_deliver(alice, f"message {i}")
    before = alice.spool.stat()
    c = daemon.login(alice)
    assert subjects(c) == ["message 0", "message 1", "message 2"]
    c.dele(2)
    c.quit()
    after = alice.spool.stat()
    assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == (
        before.st_uid, before.st_gid, stat.S_IMODE(before.st_mode)
    )
    c = daemon.login(alice)
    assert subjects(c) == ["message 0", "message 2"]
    c.quit()


def test_wrong_password_unknown_and_system_accounts_refused(daemon: Daemon, accounts: list[Account]) -> None:
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        daemon.login(accounts[0], password="wrong")
    ghost = Account("qpnosuchuser", "x", 0, 0, Path("/nonexistent"))
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        daemon.login(ghost)
    root = Account("root", "anything", 0, 0, Path("/root"))
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        daemon.login(root)
    log = daemon.stop()
    assert "login of root refused: uid 0 is below min-uid" in log


def test_nul_in_password_does_not_cut_it_short_for_pam(daemon: Daemon, accounts: list[Account]) -> None:
    """PAM takes C strings: "password\\0junk" is a plain [AUTH] failure, not a dropped session."""
    from test_nul_password import auth_login

    alice = accounts[0]
    reply, bye = auth_login(daemon.port, alice.name.encode(), alice.password.encode() + b"\0junk")
    assert reply.startswith(b"-ERR [AUTH]"), reply
    assert bye.startswith(b"+OK"), bye
    reply, _ = auth_login(daemon.port, alice.name.encode(), alice.password.encode())
    assert reply.startswith(b"+OK"), reply
    assert "Traceback" not in daemon.stop()


def test_locked_and_expired_accounts_refused(daemon: Daemon, accounts: list[Account]) -> None:
    bob = accounts[1]
    subprocess.run(["usermod", "-L", bob.name], check=True)
    try:
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            daemon.login(bob)
    finally:
        subprocess.run(["usermod", "-U", bob.name], check=True)
    subprocess.run(["chage", "-E", "2000-01-01", bob.name], check=True)
    try:
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            daemon.login(bob)
    finally:
        subprocess.run(["chage", "-E", "-1", bob.name], check=True)
    daemon.login(bob).quit()


def _mapped(pid: int, name: str) -> bool:
    """Whether a file whose name holds `name` (libpam.so: any version) is mapped in `pid`."""
    return any(name in line.rsplit("/", 1)[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


def test_session_processes_inherit_pam_loaded_once_in_the_parent(daemon: Daemon, accounts: list[Account]) -> None:
    """libpam and the service's modules are loaded in the parent, so a session
    process neither looks libpam up again (python-pam's find_library runs
    ldconfig twice) nor dlopens pam_unix: it has them before its PASS."""
    alice = accounts[0]
    for name in ("libpam.so", "libpam_misc.so", "pam_unix.so"):
        assert _mapped(daemon.proc.pid, name), name
    client = poplib.POP3("127.0.0.1", daemon.port, timeout=20)
    try:
        client.user(alice.name)
        deadline = time.monotonic() + 10
        while not (children := daemon.children()) and time.monotonic() < deadline:
            time.sleep(0.02)
        (child,) = children
        assert _mapped(child, "pam_unix.so") and _mapped(child, "libpam_misc.so")
        client.pass_(alice.password)
        assert client.stat()[0] == 0
    finally:
        client.quit()
    # SIGHUP loads the modules afresh (an upgraded one is used from then on); logins go on.
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while b"configuration reloaded" not in daemon.log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _mapped(daemon.proc.pid, "pam_unix.so")
    daemon.login(alice).quit()
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        daemon.login(alice, password="wrong")
    log = daemon.stop()
    assert "configuration reloaded" in log and "Traceback" not in log


def test_resident_pam_handle_loads_and_unloads_the_modules(pam_service: str) -> None:
    from qpopper.auth.pamresident import ResidentPam

    resident = ResidentPam(pam_service)
    assert resident.open() and resident.is_open
    assert _mapped(os.getpid(), "pam_unix.so")
    assert resident.open()  # again: the old handle is ended first, the modules stay
    assert _mapped(os.getpid(), "pam_unix.so")
    resident.close()
    assert not resident.is_open
    resident.close()  # a second close is harmless


def test_session_process_runs_as_the_user_and_cannot_reach_other_spools(
    daemon: Daemon, accounts: list[Account]
) -> None:
    alice, bob = accounts[0], accounts[1]
    procmail_deliver(alice, "for alice")
    procmail_deliver(bob, "for bob")
    c = daemon.login(alice)
    (child,) = daemon.children()
    uids, gids, groups = proc_ids(child)
    assert uids == [alice.uid] * 4
    assert gids[:2] == [alice.gid, alice.gid] and gids[3] == alice.gid
    mail_gid = SPOOL.stat().st_gid
    assert mail_gid not in groups and 0 not in groups  # the spool group is never held while serving
    # What that process could do with another user's spool: nothing.
    probe = subprocess.run(
        ["setpriv", f"--reuid={alice.uid}", f"--regid={alice.gid}",
         f"--groups={','.join(map(str, groups)) or alice.gid}", "cat", str(bob.spool)],
        capture_output=True,
    )
    assert probe.returncode != 0 and b"Permission denied" in probe.stderr
    assert subjects(c) == ["for alice"]
    c.quit()
    log = daemon.stop()
    assert f"now running as uid {alice.uid} gid {alice.gid}" in log


def test_home_files_are_read_as_the_user(tmp_path: Path, pam_service: str, accounts: list[Account]) -> None:
    carol = accounts[2]
    carol.spool.unlink(missing_ok=True)
    options = carol.home / ".qpopper-options"
    secret = tmp_path / "root-only.conf"
    secret.write_text("set announce-expire = 999\n")
    secret.chmod(0o600)
    # A symlink to a root-only file: followed as root it would apply.
    options.unlink(missing_ok=True)
    options.symlink_to(secret)
    d = Daemon(tmp_path, pam_service, "-u", "-e", "expire=30")
    try:
        c = d.login(carol)
        assert c.capa()["EXPIRE"] == ["30"]
        c.quit()
    finally:
        log = d.stop()
        options.unlink()
    assert "Permission denied" in log or "cannot read config file" in log


def test_mda_delivers_while_sessions_run_nothing_lost_or_merged(daemon: Daemon, accounts: list[Account]) -> None:
    alice = accounts[0]
    expected: list[str] = []
    procmail_deliver(alice, "seed 0")
    expected.append("seed 0")
    stop = threading.Event()
    delivered: list[str] = []
    errors: list[BaseException] = []

    def deliver() -> None:
        n = 0
        try:
            while not stop.is_set():
                subject = f"live {n}"
                started = time.monotonic()
                procmail_deliver(alice, subject, body=f"{subject}\nFrom the body\n.\n")
                assert time.monotonic() - started < 60  # never held off longer than a lock refresh
                delivered.append(subject)
                n += 1
                time.sleep(random.uniform(0, 0.05))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=deliver)
    thread.start()
    seen: list[str] = []
    try:
        for _ in range(12):
            c = daemon.login(alice)
            listing = subjects(c)
            # Delete a random half of what this session sees.
            for number, subject in enumerate(listing, 1):
                if random.random() < 0.5:
                    c.dele(number)
                    seen.append(subject)
            time.sleep(random.uniform(0, 0.1))
            c.quit()
    finally:
        stop.set()
        thread.join()
    assert errors == []
    c = daemon.login(alice)
    remaining = subjects(c)
    c.quit()
    everything = ["seed 0", *delivered]
    assert sorted(remaining + seen) == sorted(everything)  # none lost, none twice
    assert len(set(remaining)) == len(remaining)
    raw = alice.spool.read_bytes()
    assert raw.count(b"\nSubject: ") + raw.startswith(b"Subject: ") == len(remaining)  # none merged


def test_refuses_to_start_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    from qpopper.daemon import cli

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    code = cli.main(["--syslog-socket=", "127.0.0.1:0"])
    assert code == 2


def test_inetd_mode_serves_system_users(pam_service: str, accounts: list[Account]) -> None:
    bob = accounts[1]
    bob.spool.unlink(missing_ok=True)
    procmail_deliver(bob, "via inetd")
    import socket

    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        QPOPPER + ["-i", f"--pam-service={pam_service}", "--syslog-socket=", "--nonauth-file="],
        stdin=theirs.fileno(),
        stdout=theirs.fileno(),
        stderr=subprocess.DEVNULL,
    )
    theirs.close()
    ours.settimeout(20)
    ours.sendall(f"USER {bob.name}\r\nPASS {bob.password}\r\nSTAT\r\nQUIT\r\n".encode())
    data = b""
    while b"signing off" not in data:
        chunk = ours.recv(4096)
        if not chunk:
            break
        data += chunk
    ours.close()
    assert proc.wait(timeout=30) == 0
    assert b"\r\n+OK 1 " in data


def test_planted_links_in_place_of_a_spool_are_refused(daemon: Daemon, accounts: list[Account], tmp_path: Path) -> None:
    alice, bob = accounts[0], accounts[1]
    procmail_deliver(bob, "bob's mail")
    bob_before = bob.spool.read_bytes()
    target = tmp_path / "elsewhere"
    target.write_text("")
    for plant in ("symlink-to-other", "hardlink-to-other", "symlink-to-root-file"):
        alice.spool.unlink(missing_ok=True)
        if plant == "symlink-to-other":
            alice.spool.symlink_to(bob.spool)
        elif plant == "hardlink-to-other":
            os.link(bob.spool, alice.spool)
        else:
            alice.spool.symlink_to(target)
        with pytest.raises(poplib.error_proto, match=r"\[SYS/PERM\]"):
            daemon.login(alice)
    alice.spool.unlink()
    assert bob.spool.read_bytes() == bob_before and target.read_text() == ""
    assert bob.spool.stat().st_nlink == 1


def test_bulletins_for_system_users_mark_written_as_the_user(
    tmp_path: Path, pam_service: str, accounts: list[Account]
) -> None:
    carol = accounts[2]
    carol.spool.unlink(missing_ok=True)
    (carol.home / ".popbull").unlink(missing_ok=True)
    # Bulletins are read by the session after it became the user, so the
    # directory must be readable by everyone, as /var/spool/bulls is.
    bulldir = Path(tempfile.mkdtemp(prefix="qpopper-bulls-", dir="/tmp"))
    bulldir.chmod(0o755)
    (bulldir / "1").write_text(
        "From admin@example.org  Wed Nov 25 10:00:00 2026\nTo: all\nSubject: system bulletin\n\nhello\n"
    )
    (bulldir / "1").chmod(0o644)
    d = Daemon(tmp_path, pam_service, "-b", str(bulldir))
    try:
        c = d.login(carol)
        assert subjects(c) == ["system bulletin"]
        c.quit()
        c = d.login(carol)
        assert subjects(c) == ["system bulletin"]  # once only
        c.quit()
    finally:
        d.stop()
        shutil.rmtree(bulldir)
    mark = carol.home / ".popbull"
    assert mark.read_text() == "1\n"
    st = mark.stat()
    assert st.st_uid == carol.uid and stat.S_IMODE(st.st_mode) == 0o600


@pytest.mark.parametrize("mode", ["--no-server-mode", "--server-mode"])
def test_procmail_races_in_both_spool_modes(
    tmp_path: Path, pam_service: str, accounts: list[Account], mode: str
) -> None:
    bob = accounts[1]
    bob.spool.unlink(missing_ok=True)
    d = Daemon(tmp_path, pam_service, mode)
    delivered: list[str] = []
    stop = threading.Event()

    def deliver() -> None:
        n = 0
        while not stop.is_set():
            procmail_deliver(bob, f"m{n}")
            delivered.append(f"m{n}")
            n += 1

    t = threading.Thread(target=deliver)
    t.start()
    taken: list[str] = []
    try:
        for _ in range(8):
            c = d.login(bob)
            listing = subjects(c)
            for number, subject in enumerate(listing, 1):
                if number % 2:
                    c.dele(number)
                    taken.append(subject)
            c.quit()
    finally:
        stop.set()
        t.join()
        c = d.login(bob)
        left = subjects(c)
        c.quit()
        d.stop()
    assert sorted(left + taken) == sorted(delivered)
