"""RETR latency of running sessions while a burst of logins hashes passwords.

Issue 19, item 5: password hashing must not stall the sessions already
running. This starts the real daemon (one worker process, so the burst
and the readers share one event loop), keeps READERS sessions retrieving
messages in a loop, and measures each RETR's latency, first with no
logins going on, then during a burst of logins (a fixed time, CONCURRENCY
clients logging in and out as fast as they are let), for each configuration:

    sql-plain      auth-backend sql (SQLite), the burst users' passwords {PLAIN}
    sql-argon2id   the same with ARGON2ID hashes (Dovecot's doveadm default:
                   m=64 MiB, t=3, p=1), checked in the bounded, lower-priority hash pool
    file-argon2id  the passwd-file backend, same hashes, checked in the server's
                   general worker threads (up to 32 at once, normal priority)

    .venv/bin/python bench/login_burst.py --quick

Prints one line per configuration and phase: RETRs measured, p50, p99
and max latency in ms, and logins per second of the burst.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import poplib
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

READERS = 4
MESSAGES = 40
MESSAGE_SIZE = 40_000


def _argon2id() -> str:
    from passlib.hash import argon2

    return "{ARGON2ID}" + str(argon2.using(type="ID", memory_cost=65536, rounds=3, parallelism=1).hash("pw"))


def _maildir(path: Path, messages: int) -> None:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    body = b"From: bench@example.org\nSubject: burst\n\n" + (b"x" * 76 + b"\n") * (MESSAGE_SIZE // 77)
    for i in range(messages):
        (path / "cur" / f"{i}.bench:2,S").write_bytes(body)


def _prepare(root: Path, burst_users: int, hashed: str) -> tuple[Path, Path]:
    """The users (readers r0.., burst b0..) as a SQLite database and a passwd-file."""
    rows = []
    for i in range(READERS):
        _maildir(root / f"r{i}", MESSAGES)
        rows.append((f"r{i}", "{PLAIN}pw", f"maildir:{root}/r{i}"))
    for i in range(burst_users):
        _maildir(root / f"b{i}", 0)
        rows.append((f"b{i}", hashed, f"maildir:{root}/b{i}"))
    db = root / "users.sqlite"
    db.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE users (userid TEXT PRIMARY KEY, password TEXT, maildir TEXT)")
        conn.executemany("INSERT INTO users VALUES (?, ?, ?)", rows)
        conn.commit()
    args = root / "sql.conf"
    args.write_text(f"driver = sqlite\nconnect = {db}\n"
                    "password_query = SELECT userid AS user, password, maildir AS userdb_mail FROM users "
                    "WHERE userid = '%u'\n")  # fmt: skip
    passwd = root / "passwd"
    passwd.write_text("".join(f"{u}:{p}::::::userdb_mail={m}\n" for u, p, m in rows))
    return args, passwd


@contextlib.contextmanager
def _daemon(python: str, src: str, root: Path, backend_args: list[str]) -> Iterator[int]:
    log = root / "qpopper.log"
    env = dict(os.environ, PYTHONPATH=src)
    cmd = [python, "-m", "qpopper", "--syslog-socket=", "--nonauth-file=", "--auth-fail-delay=0", "--workers=1",
           "--max-connections-per-ip=10000", *backend_args, "127.0.0.1:0"]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=out, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            match = re.search(rb"listening on 127\.0\.0\.1:(\d+)", log.read_bytes())
            if match:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the daemon did not start: {log.read_text()}")
            time.sleep(0.05)
        yield int(match.group(1))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def _reader(port: int, user: str, stop: threading.Event, window: list[tuple[float, float]]) -> None:
    """RETR every message in turn until `stop`; (when, latency) of each."""
    client = poplib.POP3("127.0.0.1", port, timeout=120)
    client.user(user)
    client.pass_("pw")
    i = 0
    while not stop.is_set():
        started = time.perf_counter()
        client.retr(i % MESSAGES + 1)
        window.append((started, time.perf_counter() - started))
        i += 1
    client.quit()


def _burst(port: int, users: int, concurrency: int, duration: float) -> int:
    """Log in burst users, `concurrency` at a time, for `duration` seconds
    (each worker cycles over its own users, so no two share a maildrop);
    the logins done."""
    done = [0] * concurrency
    deadline = time.perf_counter() + duration

    def worker(k: int) -> None:
        mine = list(range(k, users, concurrency))
        i = 0
        while time.perf_counter() < deadline:
            client = poplib.POP3("127.0.0.1", port, timeout=300)
            client.user(f"b{mine[i % len(mine)]}")
            client.pass_("pw")
            client.quit()
            done[k] += 1
            i += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done)


def _percentiles(latencies: list[float]) -> str:
    if len(latencies) < 2:
        return "too few RETRs"
    ms = sorted(x * 1000 for x in latencies)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"{len(ms):5d} RETRs  p50 {statistics.median(ms):7.1f} ms  p99 {p99:7.1f} ms  max {ms[-1]:7.1f} ms"


def measure(port: int, burst_users: int, concurrency: int, quiet: float, duration: float) -> tuple[str, str, float]:
    stop = threading.Event()
    samples: list[tuple[float, float]] = []
    readers = [threading.Thread(target=_reader, args=(port, f"r{i}", stop, samples)) for i in range(READERS)]
    for t in readers:
        t.start()
    time.sleep(quiet)
    burst_start = time.perf_counter()
    logins = _burst(port, burst_users, concurrency, duration)
    burst_end = time.perf_counter()
    stop.set()
    for t in readers:
        t.join()
    before = [lat for when, lat in samples if burst_start - quiet + 0.5 <= when < burst_start]
    during = [lat for when, lat in samples if burst_start <= when < burst_end]
    return _percentiles(before), _percentiles(during), logins / (burst_end - burst_start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a shorter burst (5 s), for development")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--src", default=str(Path(__file__).resolve().parent.parent / "src"))
    parser.add_argument("--configs", default="sql-plain,sql-argon2id,file-argon2id")
    ns = parser.parse_args()
    burst_users, concurrency, quiet, duration = (60, 20, 3.0, 5.0) if ns.quick else (200, 40, 5.0, 15.0)
    root = Path(tempfile.mkdtemp(prefix="qpopper-burst-"))
    try:
        argon = _argon2id()
        print(f"{READERS} sessions RETR {MESSAGE_SIZE // 1000} kB messages in a loop; a burst of logins for "
              f"{duration:g} s, {concurrency} at a time; cores {len(os.sched_getaffinity(0))}")  # fmt: skip
        for config in ns.configs.split(","):
            backend, _, scheme = config.partition("-")
            args, passwd = _prepare(root, burst_users, "{PLAIN}pw" if scheme == "plain" else argon)
            backend_args = (["--auth-backend=sql", f"--auth-backend-args={args}"] if backend == "sql"
                            else ["--auth-backend=passwd-file", f"--passwd-file={passwd}"])  # fmt: skip
            with _daemon(ns.python, ns.src, root, backend_args) as port:
                before, during, rate = measure(port, burst_users, concurrency, quiet, duration)
            print(f"{config:14s} no burst:     {before}")
            print(f"{config:14s} during burst: {during}   ({rate:.1f} logins/s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
