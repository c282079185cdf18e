"""The `qpopper` command as administrators run it: demo, standalone with
signals, inetd, systemd socket activation, and its errors."""

from __future__ import annotations

import os
import poplib
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import write_maildir_message

QPOPPER = [sys.executable, "-m", "qpopper"]


def wait_for_line(proc: subprocess.Popen[bytes], pattern: bytes, timeout: float = 20) -> re.Match[bytes]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = b""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"no {pattern!r} in output: {seen!r}")


@pytest.fixture
def passwd(tmp_path: Path) -> Path:
    path = tmp_path / "passwd"
    path.write_text(f"carol:{{PLAIN}}pw::::{tmp_path}/home/carol::\n")
    write_maildir_message(tmp_path / "home" / "carol" / "Maildir", b"Subject: hi\n\nhello\n")
    return path


def test_version_flag() -> None:
    out = subprocess.run(QPOPPER + ["-v"], capture_output=True, check=True, timeout=30)
    assert re.match(rb"qpopper \d+\.\d+", out.stdout)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], b"option --bogus not recognized"),
        (["-Q"], b"option -Q not recognized"),
        (["-T", "abc"], b"timeout: expected a number"),
        (["-Tabc"], b"timeout: expected a number"),
        (["-T0"], b"timeout must be a positive number"),
        (["-l", "7"], b"tls-support: expected one of"),
        (["-p9"], b"clear-text-password: expected one of"),
        (["-e", "login_delay=x"], b"-e login_delay must be a number"),
        (["-e", "bogus=1"], b"-e takes login_delay"),
        (["-y", "local9"], b"log-facility: expected one of"),
        (["-f", "/nonexistent.conf"], b"cannot read config file /nonexistent.conf"),
        (["--sasl-mechanisms=FOO"], b"unknown SASL mechanism FOO"),
        (["--passwd-file", "/nonexistent/passwd", "127.0.0.1:0"], b"cannot read passwd-file"),
        (["127.0.0.1:99999"], b"bad port"),
        (["--auth-backend=passwd-file", "127.0.0.1:0"], b"no user database"),
    ],
)
def test_bad_invocations_exit_2_with_a_reason(args: list[str], message: bytes) -> None:
    proc = subprocess.run(QPOPPER + args, capture_output=True, timeout=30)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert b"Traceback" not in proc.stderr


def test_bad_passwd_file_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_text("ok:{PLAIN}x::::/h::\nbad:{NOSUCH}x::::/h::\n")
    proc = subprocess.run(QPOPPER + ["--passwd-file", str(path), "127.0.0.1:0"], capture_output=True, timeout=30)
    assert proc.returncode == 2
    assert f"{path}:2: unsupported password scheme".encode() in proc.stderr


def test_demo_serves_out_of_the_box(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        QPOPPER + ["--demo", "127.0.0.1:0"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        match = wait_for_line(proc, rb"demo server on ([\d.]+):(\d+)")
        host, port = match.group(1).decode(), int(match.group(2))
        curl = subprocess.run(["curl", "-sS", f"pop3://demo:demo@{host}:{port}/1"], capture_output=True, timeout=30)
        assert curl.returncode == 0 and b"Welcome to qpopper" in curl.stdout
        client = poplib.POP3(host, port, timeout=10)
        client.user("demo")
        client.pass_("demo")
        assert client.stat()[0] == 3
        client.quit()
        assert (tmp_path / "qpopper-demo" / "passwd").exists()
        # STLS and implicit TLS work out of the box with the throwaway certificate.
        stls = subprocess.run(
            ["curl", "-sSk", "--ssl-reqd", f"pop3://demo:demo@{host}:{port}/2"], capture_output=True, timeout=30
        )
        assert stls.returncode == 0 and b"Dot-stuffing" in stls.stdout
        tls_port = int(wait_for_line(proc, rb"pop3s://\S+:(\d+)/1").group(1))
        pop3s = subprocess.run(
            ["curl", "-sSk", f"pop3s://demo:demo@{host}:{tls_port}/3"], capture_output=True, timeout=30
        )
        assert pop3s.returncode == 0 and b"From here on" in pop3s.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert proc.stdout is not None
        proc.stdout.close()


def test_standalone_sigterm_keeps_marked_mail_and_sighup_reloads(tmp_path: Path, passwd: Path) -> None:
    proc = subprocess.Popen(
        QPOPPER + ["--passwd-file", str(passwd), "--auth-fail-delay", "0", "127.0.0.1:0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 20
        port = 0
        while time.monotonic() < deadline and not port:
            m = re.search(rb"listening on 127\.0\.0\.1:(\d+)", proc.stderr.readline())
            port = int(m.group(1)) if m else 0
        assert port
        client = poplib.POP3("127.0.0.1", port, timeout=10)
        client.user("carol")
        client.pass_("pw")
        client.dele(1)
        # SIGHUP: a user added to the file can log in at once.
        with passwd.open("a") as f:
            f.write(f"dave:{{PLAIN}}pw2::::{tmp_path}/home/dave::\n")
        proc.send_signal(signal.SIGHUP)
        other = poplib.POP3("127.0.0.1", port, timeout=10)
        other.user("dave")
        assert other.pass_("pw2").startswith(b"+OK")
        other.quit()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    assert len(os.listdir(tmp_path / "home" / "carol" / "Maildir" / "new")) == 1


def _talk(sock: socket.socket) -> bytes:
    sock.settimeout(20)
    data = b""
    sock.sendall(b"USER carol\r\nPASS pw\r\nSTAT\r\nRETR 1\r\nQUIT\r\n")
    while not data.endswith(b"signing off (1 messages left).\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_inetd_mode_on_a_socket(passwd: Path) -> None:
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        QPOPPER + ["-i", "--passwd-file", str(passwd), "--hostname", "pop.test"],
        stdin=theirs.fileno(),
        stdout=theirs.fileno(),
        stderr=subprocess.DEVNULL,
    )
    theirs.close()
    try:
        data = _talk(ours)
        assert data.startswith(b"+OK Qpopper") and b"pop.test" in data
        assert b"\r\n+OK 1 " in data and b"hello\r\n.\r\n" in data
        assert proc.wait(timeout=30) == 0
    finally:
        ours.close()


def test_inetd_mode_on_pipes(passwd: Path) -> None:
    proc = subprocess.run(
        QPOPPER + ["-i", "--passwd-file", str(passwd)],
        input=b"USER carol\r\nPASS pw\r\nLIST\r\nQUIT\r\n",
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 0
    lines = proc.stdout.split(b"\r\n")
    assert lines[0].startswith(b"+OK") and lines[4] == b"1 22" and lines[6].startswith(b"+OK")


def test_systemd_socket_activation_and_notify(tmp_path: Path, passwd: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    notify_path = str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(20)
    # systemd hands the socket over as fd 3 and names the pid that owns it.
    launcher = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
        "os.execv(sys.executable, [sys.executable, '-m', 'qpopper'] + sys.argv[2:])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, str(listener.fileno()), "--passwd-file", str(passwd)],
        pass_fds=[listener.fileno()],
        env={**os.environ, "LISTEN_FDS": "1", "NOTIFY_SOCKET": notify_path},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    listener.close()
    try:
        assert notify.recv(100) == b"READY=1"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert sock.recv(512).startswith(b"+OK")
            assert b"hello\r\n.\r\n" in _talk(sock)
        proc.send_signal(signal.SIGTERM)
        assert notify.recv(100) == b"STOPPING=1"
        assert proc.wait(timeout=30) == 0
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
