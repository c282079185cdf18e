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
        [--clients N | --load SECONDS] [--cache-sim [--last-level BYTES]]
        [--twisted PYTHON] [-- SERVER FLAGS...]

With --clients N the login sessions run from N threads at once, so the server
holds up to N sessions between its loop's turns as under popbench's load (run.py
uses 50); the count per session then shows what concurrency itself costs, which
one-by-one sessions cannot. With --load S the login sessions are popbench's own
churn instead, as bench/run.py's login scenario drives it (50 clients over 1,000
users with 10-message Maildirs) for S seconds, divided by the sessions popbench
completed: the run's own workload, counted. Flags after `--` go to our server's
command line (`-- --no-use-uvloop` counts the plain asyncio loop). --cache-sim adds
callgrind's simulated cache misses and branch mispredictions per session: the
cost of an instruction that a count of instructions cannot show. callgrind
simulates two levels, L1 and a last level it sizes as the host's L3 (32 MiB
here, which nothing misses); `--last-level 524288` sizes it as this host's L2
instead, so its misses (ILmr, DLmr, DLmw) count what goes past L2 to the
shared L3: the cost that separated us from Twisted under load (bench/README.md).

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
import threading
from pathlib import Path
from typing import Any

from guard import PASSWORD, USERS, free_port, make_maildirs, stop  # bench/guard.py, beside this script
from run import SESSION_USERS, popbench_json, wait_port

REPO = Path(__file__).resolve().parent.parent
POPBENCH = Path(os.environ.get("QPOPPER_BENCH_SHARED", REPO.parent / "shared" / "bench")) / "popbench.py"
LOAD_CLIENTS, LOAD_MESSAGES = 50, 10  # run.py's login scenario: 50 clients, 10 messages per user


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


def login_sessions(port: int, count: int, user: int | None = None) -> int:
    """`count` login sessions one after another, over u1..u`USERS` or as u`user`
    only; the count."""
    for k in range(count):
        pop = Pop(port)
        pop.command(b"USER u%d" % (user if user is not None else k % USERS + 1))
        pop.command(b"PASS " + PASSWORD.encode())
        pop.command(b"STAT")
        pop.quit()
    return count


def concurrent_login_sessions(port: int, count: int, clients: int) -> int:
    """`count` login sessions from `clients` threads; thread t logs in as u(t+1) only,
    so no two sessions at once ask for the same maildrop (its lock would refuse one)."""
    failures: list[Exception] = []

    def client(t: int) -> None:
        try:
            login_sessions(port, count // clients + (t < count % clients), user=t + 1)
        except (OSError, RuntimeError) as e:  # reported once all threads are done
            failures.append(e)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    return count


def popbench_logins(port: int, seconds: float, clients: int, users: int) -> int:
    """popbench's login churn (`clients` at once over u1..u`users`) for
    `seconds`; the sessions it completed."""
    r = subprocess.run(
        [sys.executable, str(POPBENCH), "run", "login", "--port", str(port), "-c", str(clients), "-d", str(seconds),
         "--warmup", "0", "-j", "1", "--users", str(users), "--password", PASSWORD],
        capture_output=True, text=True, timeout=seconds + 300,
    )
    runs = popbench_json(r.stdout)
    if r.returncode != 0 or not runs or not runs[-1].get("sessions"):
        raise RuntimeError(f"popbench failed: {r.stderr.strip()[-500:] or r.stdout.strip()[-500:]}")
    return int(runs[-1]["sessions"])


def retrs(port: int, count: int) -> int:
    """`count` RETRs in one session; the count."""
    pop = Pop(port)
    pop.command(b"USER u1")
    pop.command(b"PASS " + PASSWORD.encode())
    messages = int(pop.command(b"STAT").split()[1])
    for k in range(count):
        pop.retr(k % messages + 1)
    pop.quit()
    return count


def callgrind(pid: int, what: str) -> None:
    r = subprocess.run(["callgrind_control", what, str(pid)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"callgrind_control {what} failed: {r.stderr.strip() or r.stdout.strip()}")


def event_totals(dump: Path) -> dict[str, int]:
    """The dump's totals by event: Ir (instructions) always; with --cache-sim
    also the simulated cache misses (I1mr, D1mr, D1mw, ILmr, DLmr, DLmw) and
    branches (Bc, Bcm: conditional and mispredicted; Bi, Bim: indirect)."""
    text = dump.read_text(errors="replace")
    names = re.search(r"^events:[ \t]*(.+)$", text, re.MULTILINE)
    totals = re.search(r"^(?:summary|totals):[ \t]*(.+)$", text, re.MULTILINE)
    if names is None or totals is None:
        raise RuntimeError(f"no totals in {dump}")
    return dict(zip(names.group(1).split(), map(int, totals.group(1).split()), strict=False))


def server_command(work: Path, port: int, twisted: str | None, flags: list[str] | None = None,
                   users: int = USERS) -> list[str]:
    if twisted is not None:
        passwd = work / "twisted-passwd"
        passwd.write_text("".join(f"u{i}:{PASSWORD}\n" for i in range(1, users + 1)))
        return [twisted, str(REPO / "bench" / "twisted_pop3.py"), "--maildirs", str(work / "maildir"),
                "--passwd", str(passwd), "--port", str(port)]
    passwd = work / "passwd"
    passwd.write_text("".join(f"u{i}:{{PLAIN}}{PASSWORD}::::{work}::\n" for i in range(1, users + 1)))
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "src")], check=True)
    return [sys.executable, "-m", "qpopper", "--passwd-file", str(passwd), "--mail-location",
            f"maildir:{work}/maildir/%u", "--auth-fail-delay", "0", "--syslog-socket", "", *(flags or []),
            f"127.0.0.1:{port}"]


def measure(work: Path, sessions: int, count: int, twisted: str | None = None, clients: int = 1,
            flags: list[str] | None = None, cache_sim: bool = False, load: float | None = None,
            last_level: int | None = None) -> dict[str, Any]:
    if load is not None:
        users = SESSION_USERS
        make_maildirs(work, users=users, messages=LOAD_MESSAGES)
    else:
        users = max(USERS, clients)
        make_maildirs(work, users=users)
    env = dict(os.environ, PYTHONHASHSEED="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    port = free_port()
    out = work / "callgrind.out"
    with open(work / "server.log", "wb") as log:  # our default records, to a file as in bench/run.py
        server = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             *(["--cache-sim=yes", "--branch-sim=yes"] if cache_sim else []),
             *([f"--LL={last_level},8,64"] if last_level else []),
             *server_command(work, port, twisted, flags, users)],
            stdout=log, stderr=log, env=env, cwd=work,
        )
        try:
            wait_port(port, 120.0, server)
            login_sessions(port, 2 * USERS)  # warm-up: imports, caches, the allocator's arenas
            if twisted is None:
                retrs(port, 40)
            result: dict[str, Any] = {}

            def logins(port: int, n: int) -> int:
                if load is not None:
                    return popbench_logins(port, load, LOAD_CLIENTS, users)
                if clients > 1:
                    return concurrent_login_sessions(port, n, clients)
                return login_sessions(port, n)

            steps = [("login", logins, sessions)] + ([("retr", retrs, count)] if twisted is None else [])
            for name, drive, wanted in steps:
                callgrind(server.pid, "--zero")
                n = drive(port, wanted)
                callgrind(server.pid, "--dump")
                dumps = sorted(work.glob("callgrind.out.*"), key=lambda p: p.stat().st_mtime)
                totals = event_totals(dumps[-1])
                result[name] = {"count": n, "instructions_per": totals["Ir"] // n, "dump": str(dumps[-1])}
                if cache_sim:
                    result[name]["events_per"] = {event: total // n for event, total in totals.items()}
        finally:
            stop(server)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=200, help="login sessions counted (default 200)")
    parser.add_argument("--retrs", type=int, default=400, help="RETRs counted (default 400)")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (the dumps)")
    parser.add_argument("--twisted", help="count Twisted's POP3 server instead, run by this interpreter")
    parser.add_argument("--clients", type=int, default=1, help="login sessions from this many threads at once")
    parser.add_argument("--load", type=float, metavar="SECONDS",
                        help="count popbench's login churn (50 clients, 1,000 users) for SECONDS instead")
    parser.add_argument("--cache-sim", action="store_true",
                        help="simulate the caches and branch predictors too (callgrind's; about twice as slow)")
    parser.add_argument("--last-level", type=int, metavar="BYTES",
                        help="with --cache-sim: the simulated last-level cache's size (the host's L3 by default; "
                             "the L2's size counts what misses L2)")
    parser.add_argument("flags", nargs="*", help="after --: more flags for our server")
    a = parser.parse_args(argv)
    if a.load is not None and (a.load <= 0 or a.clients != 1):
        print("bench/instructions.py: --load takes seconds above 0, and no --clients", file=sys.stderr)
        return 2
    if a.last_level is not None and (not a.cache_sim or a.last_level < 65536 or a.last_level & (a.last_level - 1)):
        print("bench/instructions.py: --last-level needs --cache-sim and a power of two of 64 KiB or more",
              file=sys.stderr)
        return 2
    if a.clients < 1:
        print("bench/instructions.py: --clients must be at least 1", file=sys.stderr)
        return 2
    if shutil.which("valgrind") is None:
        print("bench/instructions.py: valgrind is missing (apt-get install -y valgrind)", file=sys.stderr)
        return 2
    if a.keep is not None:
        a.keep.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qpopper-callgrind-") as tmp:
        result = measure(a.keep or Path(tmp), a.sessions, a.retrs, a.twisted, a.clients, a.flags, a.cache_sim,
                         a.load, a.last_level)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
