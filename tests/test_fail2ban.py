"""The shipped fail2ban filter and jail against a real daemon's failed logins:
fail2ban-regex on the syslog and journal forms of the lines, and a real
fail2ban-server that bans 127.0.0.1 with the `dummy` action (a file, never
the firewall)."""

from __future__ import annotations

import os
import poplib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

PACKAGING = Path(__file__).resolve().parent.parent / "packaging" / "fail2ban"
FAIL2BAN_CONF = Path("/etc/fail2ban")

pytestmark = pytest.mark.skipif(
    shutil.which("fail2ban-regex") is None or not (FAIL2BAN_CONF / "filter.d" / "common.conf").exists(),
    reason="fail2ban is not installed (Debian package fail2ban)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(condition: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not callable(condition) or not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def fail2ban_dir(tmp_path: Path) -> Path:
    """A fail2ban configuration directory: Debian's common.conf and dummy action, our filter and jail."""
    conf = tmp_path / "fail2ban"
    (conf / "filter.d").mkdir(parents=True)
    (conf / "action.d").mkdir()
    (conf / "jail.d").mkdir()
    shutil.copy(FAIL2BAN_CONF / "filter.d" / "common.conf", conf / "filter.d")
    shutil.copy(FAIL2BAN_CONF / "action.d" / "dummy.conf", conf / "action.d")
    shutil.copy(PACKAGING / "filter.d" / "qpopper.conf", conf / "filter.d")
    shutil.copy(PACKAGING / "jail.d" / "qpopper.conf", conf / "jail.d")
    return conf


class Daemon:
    """A real qpopper with failed-login lines on, its stderr to a file, syslog to our datagram socket."""

    def __init__(self, tmp_path: Path, stderr: IO[bytes], syslog: bool = True) -> None:
        passwd = tmp_path / "passwd"
        passwd.write_text("bob:{PLAIN}right\n")
        self.port = free_port()
        self.syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.syslog.bind(str(tmp_path / "log.sock"))
        # A syslog socket nobody reads fills after a few datagrams (and then blocks the sender): only when read.
        to_syslog = ["--syslog-socket", str(tmp_path / "log.sock")] if syslog else ["--syslog-socket="]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qpopper", "--no-use-uvloop", "--passwd-file", str(passwd),
             "--mail-location", f"maildir:{tmp_path}/%u", "--log-auth-failures",
             "--auth-fail-delay=0.01", "--auth-fail-delay-max=0.02", "--log-facility=mail",
             *to_syslog, f"127.0.0.1:{self.port}"],
            stderr=stderr,
        )  # fmt: skip

    def fail_logins(self, count: int) -> None:
        for _ in range(count):
            wait_for(self._listening, "the daemon to listen")
            client = poplib.POP3("127.0.0.1", self.port, timeout=30)
            client.user("bob")
            with pytest.raises(poplib.error_proto):
                client.pass_("wrong")
            client.quit()

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
        except ConnectionRefusedError:
            return False
        return True

    def syslog_lines(self, count: int) -> list[str]:
        """The datagrams as rsyslog writes them to /var/log/mail.log: date, host, then the message."""
        self.syslog.settimeout(30)
        lines: list[str] = []
        while len(lines) < count:
            data = self.syslog.recv(4096).decode()
            message = re.sub(r"^<\d+>", "", data)
            if "authentication failure" in message:
                lines.append(f"{time.strftime('%b %e %H:%M:%S')} pophost {message}")
        return lines

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.syslog.close()


@pytest.fixture
def daemon_log(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Daemon, Path]]:
    log = tmp_path / "stderr.log"
    with open(log, "ab") as stderr:
        daemon = Daemon(tmp_path, stderr, syslog=bool(request.param))
        try:
            yield daemon, log
        finally:
            daemon.stop()


def fail2ban_regex(tmp_path: Path, lines: list[str]) -> str:
    tmp_path = Path(tempfile.mkdtemp(dir=tmp_path))
    sample = tmp_path / "sample.log"
    sample.write_text("\n".join(lines) + "\n")
    filt = fail2ban_dir(tmp_path) / "filter.d" / "qpopper.conf"
    result = subprocess.run(
        ["fail2ban-regex", "--out", "ip", str(sample), str(filt)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("daemon_log", [True], indirect=True, ids=["syslog"])
def test_fail2ban_regex_matches_the_syslog_form(tmp_path: Path, daemon_log: tuple[Daemon, Path]) -> None:
    daemon, _ = daemon_log
    lines = []
    for _ in range(3):  # read as they come, as syslogd does
        daemon.fail_logins(1)
        lines += daemon.syslog_lines(1)
    assert all("qpopper.session: authentication failure; rhost=127.0.0.1 user=bob" in x for x in lines), lines
    assert fail2ban_regex(tmp_path, lines).split() == ["127.0.0.1"] * 3


@pytest.mark.parametrize("daemon_log", [False], indirect=True, ids=["stderr"])
def test_fail2ban_regex_matches_the_journal_form(tmp_path: Path, daemon_log: tuple[Daemon, Path]) -> None:
    daemon, log = daemon_log
    daemon.fail_logins(3)
    wait_for(lambda: log.read_text().count("authentication failure;") == 3, "three failure lines")
    messages = [x for x in log.read_text().splitlines() if "authentication failure;" in x]
    # What fail2ban's systemd backend hands the filter: "_HOSTNAME SYSLOG_IDENTIFIER[PID]: MESSAGE".
    journal = [f"pophost qpopper[{daemon.proc.pid}]: {m}" for m in messages]
    assert fail2ban_regex(tmp_path, journal).split() == ["127.0.0.1"] * 3
    assert fail2ban_regex(tmp_path, messages).split() == ["127.0.0.1"] * 3  # stderr captured to a file


def test_a_user_name_cannot_inject_an_address(tmp_path: Path) -> None:
    line = (
        f"{time.strftime('%b %e %H:%M:%S')} pophost qpopper[7]: qpopper.session: "
        "authentication failure; rhost=127.0.0.1 user=x rhost=192.0.2.9"
    )
    assert fail2ban_regex(tmp_path, [line]).split() == ["127.0.0.1"]


@pytest.mark.skipif(shutil.which("fail2ban-server") is None, reason="fail2ban-server is not installed")
def test_fail2ban_server_bans_brute_force_from_loopback(tmp_path: Path) -> None:
    conf = fail2ban_dir(tmp_path)
    mail_log = tmp_path / "mail.log"
    mail_log.touch()
    bans = tmp_path / "bans"
    run = tmp_path / "run"
    run.mkdir()
    (conf / "fail2ban.conf").write_text(
        f"[Definition]\nloglevel = INFO\nlogtarget = {tmp_path}/fail2ban.log\n"
        f"socket = {run}/fail2ban.sock\npidfile = {run}/fail2ban.pid\ndbfile = :memory:\n"
    )
    (conf / "jail.conf").write_text("[DEFAULT]\nbackend = polling\n")
    # The shipped jail, switched on for this log, with the dummy action and loopback not exempt.
    (conf / "jail.local").write_text(
        f"[qpopper]\nenabled = true\nlogpath = {mail_log}\nbackend = polling\nmaxretry = 3\n"
        f"action = dummy[target={bans}]\nignoreself = false\nignoreip =\n"
    )
    server = subprocess.Popen(
        ["fail2ban-server", "-f", "-x", "-c", str(conf), "-s", f"{run}/fail2ban.sock", "-p", f"{run}/fail2ban.pid"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        log = tmp_path / "fail2ban.log"
        wait_for(lambda: log.exists() and "Jail 'qpopper' started" in log.read_text(), "the jail to start")
        with open(mail_log, "ab") as stderr:
            daemon = Daemon(tmp_path, stderr, syslog=False)
            try:
                daemon.fail_logins(4)
                wait_for(lambda: bans.exists() and "+127.0.0.1" in bans.read_text(), "the ban", timeout=60)
            finally:
                daemon.stop()
        assert "Ban 127.0.0.1" in log.read_text()
    finally:
        server.terminate()
        _, err = server.communicate(timeout=60)
    assert server.returncode in (0, -15), err
    assert not os.path.exists(bans)  # the dummy action's stop removed its file: nothing else was touched
