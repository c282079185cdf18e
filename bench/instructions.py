"""Instructions per login session and per RETR, counted by callgrind on the daemon.

Wall-clock and CPU-time figures move with whatever else the machine runs;
instruction counts barely do, so this is the before/after measure for a change
to the hot path (bench/run.py gives the side-by-side figures). The server runs
under `valgrind --tool=callgrind` with PYTHONHASHSEED=0 on the guard's Maildirs
(30 users, 20 messages of ~15 kB); after a warm-up (imports, caches) the counters
are zeroed, a fixed number of sessions run one after another from this process
(outside valgrind), and the counters are dumped:

    login   USER, PASS, STAT, QUIT on a new connection (popbench's login session)
    retr    RETR of a ~15 kB message in one logged-in session

    python bench/instructions.py [--sessions N] [--retrs N] [--keep DIR]
        [--twisted PYTHON]

With --twisted (the interpreter of a virtualenv holding Twisted, as bench/run.py
makes) Twisted's POP3 server (bench/twisted_pop3.py) is counted the same way on
the same mail, for the side-by-side figure a loaded machine's clock cannot give:
logins only, since Twisted 26.10's MaildirMailbox opens messages in text mode and
its RETR sends the status line and then nothing.

prints one JSON object: instructions per login session and per RETR, and the
dump files (read them with callgrind_annotate for the C functions that cost most).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from guard import PASSWORD, USERS, free_port, make_maildirs, stop  # bench/guard.py, beside this script
from run import wait_port

REPO = Path(__file__).resolve().parent.parent


class Pop:
    """A blocking POP3 client: enough for fixed sequences of commands."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.file = self.sock.makefile("rb")
        self.ok()

    def ok(self) -> bytes:
        line = self.file.readline()
        if not line.startswith(b"+OK"):
            raise RuntimeError(f"server said {line[:200]!r}")
        return line

    def command(self, text: bytes) -> bytes:
        self.sock.sendall(text + b"\r\n")
        return self.ok()

    def retr(self, n: int) -> int:
        self.command(b"RETR %d" % n)
        size = 0
        while (line := self.file.readline()) != b".\r\n":
            if not line:
                raise RuntimeError("connection closed in a RETR")
            size += len(line)
        return size

    def quit(self) -> None:
        self.command(b"QUIT")
        if self.file.read():
            raise RuntimeError("data after QUIT")
        self.file.close()
        self.sock.close()


def login_sessions(port: int, count: int) -> None:
    for k in range(count):
        pop = Pop(port)
        pop.command(b"USER u%d" % (k % USERS + 1))
        pop.command(b"PASS " + PASSWORD.encode())
        pop.command(b"STAT")
        pop.quit()


def retrs(port: int, count: int) -> None:
    pop = Pop(port)
    pop.command(b"USER u1")
    pop.command(b"PASS " + PASSWORD.encode())
    messages = int(pop.command(b"STAT").split()[1])
    for k in range(count):
        pop.retr(k % messages + 1)
    pop.quit()


def callgrind(pid: int, what: str) -> None:
    r = subprocess.run(["callgrind_control", what, str(pid)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"callgrind_control {what} failed: {r.stderr.strip() or r.stdout.strip()}")


def total_instructions(dump: Path) -> int:
    m = re.search(r"^(?:summary|totals):\s*(\d+)", dump.read_text(errors="replace"), re.MULTILINE)
    if m is None:
        raise RuntimeError(f"no totals in {dump}")
    return int(m.group(1))


def server_command(work: Path, port: int, twisted: str | None) -> list[str]:
    if twisted is not None:
        passwd = work / "twisted-passwd"
        passwd.write_text("".join(f"u{i}:{PASSWORD}\n" for i in range(1, USERS + 1)))
        return [twisted, str(REPO / "bench" / "twisted_pop3.py"), "--maildirs", str(work / "maildir"),
                "--passwd", str(passwd), "--port", str(port)]
    passwd = work / "passwd"
    passwd.write_text("".join(f"u{i}:{{PLAIN}}{PASSWORD}::::{work}::\n" for i in range(1, USERS + 1)))
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "src")], check=True)
    return [sys.executable, "-m", "qpopper", "--passwd-file", str(passwd), "--mail-location",
            f"maildir:{work}/maildir/%u", "--auth-fail-delay", "0", "--syslog-socket", "", f"127.0.0.1:{port}"]


def measure(work: Path, sessions: int, count: int, twisted: str | None = None) -> dict[str, Any]:
    make_maildirs(work)
    env = dict(os.environ, PYTHONHASHSEED="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    port = free_port()
    out = work / "callgrind.out"
    with open(work / "server.log", "wb") as log:  # our default records, to a file as in bench/run.py
        server = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *server_command(work, port, twisted)],
            stdout=log, stderr=log, env=env, cwd=work,
        )
        try:
            wait_port(port, 120.0, server)
            login_sessions(port, 2 * USERS)  # warm-up: imports, caches, the allocator's arenas
            if twisted is None:
                retrs(port, 40)
            result: dict[str, Any] = {}
            steps = [("login", login_sessions, sessions)] + ([("retr", retrs, count)] if twisted is None else [])
            for name, drive, n in steps:
                callgrind(server.pid, "--zero")
                drive(port, n)
                callgrind(server.pid, "--dump")
                dumps = sorted(work.glob("callgrind.out.*"), key=lambda p: p.stat().st_mtime)
                result[name] = {"count": n, "instructions_per": total_instructions(dumps[-1]) // n,
                                "dump": str(dumps[-1])}
        finally:
            stop(server)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=200, help="login sessions counted (default 200)")
    parser.add_argument("--retrs", type=int, default=400, help="RETRs counted (default 400)")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (the dumps)")
    parser.add_argument("--twisted", help="count Twisted's POP3 server instead, run by this interpreter")
    a = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("bench/instructions.py: valgrind is missing (apt-get install -y valgrind)", file=sys.stderr)
        return 2
    if a.keep is not None:
        a.keep.mkdir(parents=True, exist_ok=True)
        result = measure(a.keep, a.sessions, a.retrs, a.twisted)
    else:
        with tempfile.TemporaryDirectory(prefix="qpopper-callgrind-") as tmp:
            result = measure(Path(tmp), a.sessions, a.retrs, a.twisted)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
