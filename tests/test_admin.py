"""qpopper's administrator switches and options, each shown on a real
server: over a real connection, or in the log, syslog or trace file."""

from __future__ import annotations

import poplib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import QpopperProcess, write_maildir_message

QPOPPER = [sys.executable, "-m", "qpopper"]
MSG = b"From: a@example.org\nSubject: admin test\n\nbody\n"


class Daemon(QpopperProcess):
    """The daemon with carol, dave and root as virtual users."""

    def __init__(self, tmp_path: Path, args: list[str], users: str | None = None) -> None:
        self.tmp_path = tmp_path
        self.passwd = tmp_path / "passwd"
        if users is None:
            users = "".join(f"{u}:{{PLAIN}}pw::::{tmp_path}/home/{u}::\n" for u in ("carol", "dave", "root"))
        self.passwd.write_text(users)
        super().__init__(tmp_path, ["--passwd-file", str(self.passwd), *args])

    def deliver(self, user: str, message: bytes = MSG) -> None:
        write_maildir_message(self.tmp_path / "home" / user / "Maildir", message)

    def client(self, user: str = "carol", password: str = "pw") -> poplib.POP3:
        return self.login(user, password)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(*args: str, users: str | None = None) -> Daemon:
        d = Daemon(tmp_path, list(args), users)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def test_downcase_and_trim_domain(daemon: Callable[..., Daemon]) -> None:
    d = daemon("-c", "-C")
    d.deliver("carol")
    c = d.client("Carol@Example.ORG")
    assert c.stat()[0] == 1
    c.quit()


def test_without_downcase_the_name_is_taken_as_given(daemon: Callable[..., Daemon]) -> None:
    d = daemon()
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        d.client("Carol")


def test_no_mime_suffix_is_stripped(daemon: Callable[..., Daemon]) -> None:
    d = daemon()
    d.deliver("carol")
    c = d.client("carol-no-mime")
    assert c.stat()[0] == 1
    c.quit()


def test_nonauth_and_auth_files(daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    deny = tmp_path / "ftpusers"
    deny.write_text("# system accounts\nroot\n")
    allow = tmp_path / "pop.allow"
    allow.write_text("carol\n")
    d = daemon(f"--nonauth-file={deny}", f"--auth-file={allow}")
    for user in ("root", "dave"):
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Authentication failed"):
            d.client(user)
    d.client("carol").quit()
    log = d.stop()
    assert "login of root refused: listed in" in log and "login of dave refused: not listed in" in log


def test_login_delay_announced_and_enforced(daemon: Callable[..., Daemon]) -> None:
    d = daemon("-e", "login_delay=60,expire=30", "--enforce-login-delay")
    c = poplib.POP3("127.0.0.1", d.port, timeout=10)
    caps = c.capa()
    assert caps["LOGIN-DELAY"] == ["60"] and caps["EXPIRE"] == ["30"]
    c.user("carol")
    c.pass_("pw")
    c.quit()
    with pytest.raises(poplib.error_proto, match=r"\[LOGIN-DELAY\]"):
        d.client("carol")
    d.client("dave").quit()  # per user


def test_login_delay_only_announced_by_default(daemon: Callable[..., Daemon]) -> None:
    d = daemon("-e", "login_delay=60")
    d.client().quit()
    d.client().quit()


def test_auto_delete_removes_retrieved_messages_and_announces_expire_0(daemon: Callable[..., Daemon]) -> None:
    d = daemon("--auto-delete")
    for _ in range(3):
        d.deliver("carol")
    c = d.client()
    assert c.capa()["EXPIRE"] == ["0"]
    c.retr(1)
    c.top(2, 0)  # TOP is not a retrieval
    c.quit()
    c = d.client()
    assert c.stat()[0] == 2
    c.quit()


def test_update_on_abort_switch(daemon: Callable[..., Daemon]) -> None:
    d = daemon("--update-on-abort")
    d.deliver("carol")
    d.deliver("carol")
    c = d.client()
    c.dele(1)
    c.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            c = d.client()
            break
        except poplib.error_proto:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert c.stat()[0] == 1
    c.quit()


def test_timeout_switch(daemon: Callable[..., Daemon]) -> None:
    d = daemon("-T1")
    c = poplib.POP3("127.0.0.1", d.port, timeout=10)
    time.sleep(1.5)
    assert c.sock.recv(100) == b""
    c.close()


def test_timeout_counts_from_the_last_command(daemon: Callable[..., Daemon]) -> None:
    d = daemon("-T1")
    c = poplib.POP3("127.0.0.1", d.port, timeout=10)
    for _ in range(6):  # 2.4 s in all, never 1 s quiet
        time.sleep(0.4)
        assert "UIDL" in c.capa()
    time.sleep(1.6)
    assert c.sock.recv(100) == b""
    c.close()


def test_shy(daemon: Callable[..., Daemon]) -> None:
    d = daemon("--shy")
    c = d.client()
    assert c.getwelcome().startswith(b"+OK ready  <")
    assert "IMPLEMENTATION" not in c.capa()
    c.quit()


def test_statistics_timing_and_login_records(daemon: Callable[..., Daemon]) -> None:
    d = daemon("-s", "--timing", "--log-login=(v%0) POP login by user \"%1\" at (%2) %3", "-R")
    d.deliver("carol")
    d.deliver("carol")
    c = d.client()
    c.dele(1)
    c.quit()
    log = d.stop()
    msg_size = len(MSG) + MSG.count(b"\n")
    assert f"Stats: carol 1 {msg_size} 1 {msg_size} 127.0.0.1 127.0.0.1" in log
    assert re.search(r'POP login by user "carol" at \(127\.0\.0\.1\) 127\.0\.0\.1', log)
    assert re.search(r"Timing for carol@127\.0\.0\.1 \(normal\) auth=\d+\.\d{3} init=\d+\.\d{3} clean=\d+\.\d{3}", log)


def test_reverse_lookup_names_the_client(daemon: Callable[..., Daemon]) -> None:
    d = daemon("-s")
    c = d.client()
    c.quit()
    log = d.stop()
    name = socket.getnameinfo(("127.0.0.1", 0), socket.NI_NAMEREQD)[0]
    assert f"Stats: carol 0 0 0 0 {name} 127.0.0.1" in log


def test_trace_file_masks_secrets(daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    trace = tmp_path / "trace.log"
    d = daemon("-t", str(trace))
    d.deliver("carol")
    c = d.client(password="pw")
    c.retr(1)
    c.quit()
    c = poplib.POP3("127.0.0.1", d.port, timeout=10)
    c.apop("carol", "pw")
    c.quit()
    d.stop()
    text = trace.read_text()
    assert "USER carol" in text and "PASS <password>" in text and "APOP carol <digest>" in text
    assert "> +OK" in text and "RETR 1" in text
    assert "pw\n" not in text and " pw " not in text


def test_trace_file_logs_a_big_message_reply_once(daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """A message sent in several writes (over 256 kB) is one reply in the trace."""
    trace = tmp_path / "trace.log"
    d = daemon("-t", str(trace))
    d.deliver("carol", b"Subject: big\n\n" + b"line of a big message\n" * 40000)
    c = d.client(password="pw")
    c.retr(1)
    c.quit()
    d.stop()
    replies = re.findall(r"> \+OK \d+ octets", trace.read_text())
    assert len(replies) == 1, replies


def test_debug_switch_logs_debug_records(daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = daemon("-d")
    d.client().quit()
    log = d.stop()
    assert re.search(r"DEBUG qpopper.session: 127\.0\.0\.1:\d+: connected \(plain\)", log)
    assert "authenticated carol (UserPass)" in log
    d = daemon()
    d.client().quit()
    assert "DEBUG" not in d.stop()


def test_syslog_facility_and_priority(daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    path = str(tmp_path / "syslog.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(10)
    try:
        d = daemon("-y", "local3", f"--syslog-socket={path}", "-s")
        d.client().quit()
        records: list[bytes] = []
        deadline = time.monotonic() + 10
        while not any(b"Stats:" in r for r in records) and time.monotonic() < deadline:
            records.append(listener.recv(4096))
    finally:
        listener.close()
    stats = next(r for r in records if b"Stats:" in r)
    # <PRI> = facility * 8 + severity: local3 is 19, notice is 5.
    assert stats.startswith(b"<%d>qpopper[" % (19 * 8 + 5))


def test_user_option_files(daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    home = tmp_path / "home" / "carol"
    home.mkdir(parents=True)
    (home / ".qpopper-options").write_text(
        "set announce-expire = 90\nset clear-text-password = never\nset statistics\n"
    )
    (spool / ".carol.qpopper-options").write_text("set announce-expire = 120\n")
    d = daemon("-u", "-U", f"--spool-dir={spool}")
    c = d.client()
    assert c.capa()["EXPIRE"] == ["120"]  # the spool file is read last and wins
    c.quit()
    log = d.stop()
    assert "clear-text-password is not allowed in a user option file" in log
    assert "Stats: carol" in log  # statistics from the home file still applied


def test_clear_text_password_local_policy(daemon: Callable[..., Daemon]) -> None:
    d = daemon("-p", "1")
    c = poplib.POP3("127.0.0.1", d.port, timeout=10)
    assert "USER" not in c.capa()
    with pytest.raises(poplib.error_proto):
        c.user("carol")
    c.apop("carol", "pw")  # APOP is not a clear-text password
    c.quit()
    d = daemon("-p", "3")
    d.client().quit()  # loopback is local


def test_ignored_c_options_are_logged(daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    conf = tmp_path / "qpopper.conf"
    conf.write_text("set tls-options = 4\nset chunky-writes = never\n")
    d = daemon("-f", str(conf))
    d.client().quit()
    log = d.stop()
    assert "setting tls-options is accepted for compatibility but has no effect here" in log


def test_config_file_error_is_fatal_at_startup(tmp_path: Path) -> None:
    conf = tmp_path / "qpopper.conf"
    conf.write_text("set timeout = 700\nset bogus\nset debug\n")
    out = subprocess.run(QPOPPER + ["-f", str(conf), "127.0.0.1:0"], capture_output=True, timeout=30)
    assert out.returncode == 2
    assert f"{conf}:2: unknown option 'bogus'".encode() in out.stderr
    assert b"Traceback" not in out.stderr


def test_y_switch_works(tmp_path: Path) -> None:  # it was broken in qpopper 4.0
    out = subprocess.run(QPOPPER + ["-y", "local0", "--show-config"], capture_output=True, timeout=30)
    assert out.returncode == 0 and b"set log-facility = local0" in out.stdout


def test_version_switches() -> None:
    for flag in ("-v", "-V"):
        out = subprocess.run(QPOPPER + [flag], capture_output=True, timeout=30)
        assert out.returncode == 0 and out.stdout.startswith(b"qpopper ")


def _welcome(port: int) -> bytes:
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    welcome = client.getwelcome()
    client.quit()
    return welcome


def test_sighup_rereads_the_config_file(daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    conf = tmp_path / "qpopper.conf"
    conf.write_text("reset shy\n")
    d = daemon("-f", str(conf))
    assert _welcome(d.port).startswith(b"+OK Qpopper")
    conf.write_text("set shy\n")
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not _welcome(d.port).startswith(b"+OK ready"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    conf.write_text("set nonsense\n")  # a broken edit keeps the running settings
    d.proc.send_signal(signal.SIGHUP)
    # The daemon logs the refusal once it has read the file: wait for that line, not for a fixed time.
    deadline = time.monotonic() + 10
    while "reload refused" not in d.log.read_text():
        assert time.monotonic() < deadline, d.log.read_text()
        time.sleep(0.02)
    assert _welcome(d.port).startswith(b"+OK ready")
    assert "reload refused" in d.stop()
