"""Small helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import poplib
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from qpopper.maildrop.delivery import deliver


def write_maildir_message(maildir: Path, message: bytes, name: str | None = None, sub: str = "new") -> str:
    """Deliver into a Maildir, then move to `sub`; returns the file's name.

    Without `name`, through the maildrop's own delivery (a unique name).
    With one (a name another MDA or an IMAP server would have written,
    flags and all), the file is placed by hand, in tmp/ and renamed."""
    if name is None:
        name = os.path.basename(deliver(f"maildir:{maildir}", message))
        if sub != "new":
            os.rename(maildir / "new" / name, maildir / sub / name)
        return name
    for d in ("cur", "new", "tmp"):
        (maildir / d).mkdir(parents=True, exist_ok=True)
    tmp = maildir / "tmp" / name
    tmp.write_bytes(message)
    os.rename(tmp, maildir / sub / name)
    return name


QPOPPER = [sys.executable, "-m", "qpopper"]
# Quiet defaults for a test daemon: no syslog, no /etc/ftpusers, no delays.
TEST_DAEMON_ARGS = ["--syslog-socket=", "--nonauth-file=", "--auth-fail-delay=0"]


def pop_login(port: int, user: str, password: str, timeout: float = 30) -> poplib.POP3:
    """USER/PASS on a fresh loopback connection; the logged-in client (the
    caller QUITs it), or poplib.error_proto with the server's refusal."""
    client = poplib.POP3("127.0.0.1", port, timeout=timeout)
    try:
        client.user(user)
        client.pass_(password)
    except BaseException:
        client.close()
        raise
    return client


def pop_refusal(port: int, user: str, password: str) -> str:
    """The -ERR line a login that must fail gets (AssertionError if it succeeds)."""
    try:
        pop_login(port, user, password).quit()
    except poplib.error_proto as exc:
        reply: bytes = exc.args[0]
        return reply.decode()
    raise AssertionError(f"{user} logged in")


class QpopperProcess:
    """A real `qpopper` command listening on a free loopback port, its
    stderr kept in a file for the test to read."""

    def __init__(self, log_dir: Path, args: list[str]) -> None:
        self.log = log_dir / f"qpopper-{uuid.uuid4().hex[:8]}.log"
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(
            QPOPPER + TEST_DAEMON_ARGS + args + ["127.0.0.1:0"], stdout=subprocess.DEVNULL, stderr=self._log_file
        )
        deadline = time.monotonic() + 20
        self.port = 0
        while not self.port:
            match = re.search(rb"listening on 127\.0\.0\.1:(\d+)", self.log.read_bytes())
            if match:
                self.port = int(match.group(1))
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                self._log_file.close()
                raise AssertionError(self.log.read_text())
            else:
                time.sleep(0.02)

    def login(self, user: str, password: str) -> poplib.POP3:
        return pop_login(self.port, user, password)

    def stop(self) -> str:
        """SIGTERM, wait, and return everything it logged."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=40)
        self._log_file.close()
        return self.log.read_text()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log_file.close()


def without_coverage() -> dict[str, str]:
    """This process's environment minus what makes coverage start in a child
    Python (CI measures subprocesses): for tests that count which modules a
    fresh interpreter loads, since coverage itself loads threading, socket,
    html and pickle."""
    return {k: v for k, v in os.environ.items() if k not in ("COVERAGE_PROCESS_CONFIG", "COVERAGE_PROCESS_START")}
