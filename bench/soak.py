"""Soak run: one server under a bounded mixed load; afterwards nothing lost or duplicated, and
the slopes of its memory, descriptors and tasks per hour.

    python bench/soak.py [--minutes 30] [--model workers|system-users] [--clients 8] [--sample 10]
                         [--hold 144] [--trace]

The mix, from `--clients` concurrent clients and one MDA: logins with the right password and with
a wrong one; plain and implicit-TLS sessions that STAT, LIST, UIDL, TOP, RETR, DELE and QUIT;
connections dropped in the middle of a session (after DELE, so nothing may be deleted); slow
clients that send their commands a few bytes at a time; and deliveries into the maildrops while
sessions run. The MDA keeps the maildrops steady: it delivers only while fewer than `--hold`
messages are held (delivered and not yet taken), so that what the server holds for a maildrop (its
listing, its index) stays the same size and a slope is the server's own; `--hold 0` delivers
without a bound, and the maildrops grow over the run. Metrics (scraped at each sample) and the
control socket (`who` at each sample) are on, as an operator would run it.

`workers` serves virtual users (a passwd-file, Maildirs) with --workers 2; `system-users` (root)
serves Unix accounts made here with useradd, through PAM, a process per session, mbox spools in
/var/mail; the accounts are removed afterwards.

Every message carries a unique X-Soak-Id. A client records an id as taken when it read the
message, deleted it and got +OK to QUIT. At the end: every delivered id is either taken once or
still in its maildrop once, never both, never twice (exit 1 otherwise). The long-lived processes
(the daemon, its workers, the exporter; not the short session processes) are sampled every
`--sample` seconds: RSS, open descriptors, tasks; the slopes per hour are fitted by least squares
after the first fifth of the run (the warm-up), for the sum and, RSS and its anonymous part (the
heap: what a leak grows), for each role (daemon, worker, exporter). Prints one JSON object.

`--trace` runs the server under tracemalloc (bench/tracehook.py): at the end of the warm-up and at
the end of the run each long-lived process writes the lines whose allocations grew most since the
warm-up; the report names the files (in `--work`, which then should be given).

Run it alone on the machine: python bench/soak.py --minutes 30
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from qpopper.maildrop.delivery import deliver  # noqa: E402 - after the path above

PASSWORD = "soak-pass"
USERS = 12
INITIAL = 6  # messages per maildrop at the start
ID = re.compile(rb"^X-Soak-Id: (\S+)", re.M)


def message(soak_id: str, rng: random.Random) -> bytes:
    body = b"".join(b"line %d of the body %s\n" % (i, b"." * rng.randrange(3)) for i in range(rng.randrange(5, 400)))
    return b"From: mda@example.org\nSubject: soak\nX-Soak-Id: %s\n\n%s" % (soak_id.encode(), body)


@dataclass
class Ledger:
    """What the run delivered and what clients took away."""

    delivered: set[str] = field(default_factory=set)
    taken: Counter[str] = field(default_factory=Counter)
    ops: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


# ---- the mail ---------------------------------------------------------------------


class Mail:
    """The users and their maildrops for one model."""

    def __init__(self, work: Path, model: str) -> None:
        self.work = work
        self.model = model
        self.users: list[str] = []
        self.pam_service: str | None = None
        if model == "workers":
            self.users = [f"s{i}" for i in range(1, USERS + 1)]
            (work / "passwd").write_text("".join(f"{u}:{{PLAIN}}{PASSWORD}::::{work}/home/{u}::\n" for u in self.users))
            for user in self.users:
                for sub in ("new", "cur", "tmp"):
                    (work / "home" / user / "Maildir" / sub).mkdir(parents=True, exist_ok=True)
        else:
            tag = uuid.uuid4().hex[:4]
            self.users = [f"qs{tag}{i}" for i in range(1, USERS + 1)]
            for user in self.users:
                subprocess.run(["useradd", "-m", "-U", user], check=True, capture_output=True)
                subprocess.run(["chpasswd"], input=f"{user}:{PASSWORD}\n".encode(), check=True)
                spool = Path("/var/mail") / user
                spool.unlink(missing_ok=True)
                fd = os.open(spool, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
                pw = subprocess.run(["getent", "passwd", user], capture_output=True, text=True, check=True)
                uid, gid = (int(x) for x in pw.stdout.split(":")[2:4])
                os.fchown(fd, uid, gid)
                os.close(fd)
            self.pam_service = f"qpopper-soak-{tag}"
            shutil.copy(REPO / "packaging" / "pam.d" / "pop3", f"/etc/pam.d/{self.pam_service}")

    def location(self, user: str) -> str:
        if self.model == "workers":
            return f"maildir:{self.work}/home/{user}/Maildir"
        return f"mbox:/var/mail/{user}"

    def ids_left(self) -> Counter[str]:
        """Every X-Soak-Id still in a maildrop, with how often it is there."""
        found: Counter[str] = Counter()
        for user in self.users:
            if self.model == "workers":
                for sub in ("new", "cur"):
                    for path in (self.work / "home" / user / "Maildir" / sub).iterdir():
                        found.update(m.decode() for m in ID.findall(path.read_bytes()))
            else:
                found.update(m.decode() for m in ID.findall((Path("/var/mail") / user).read_bytes()))
        return found

    def remove(self) -> None:
        if self.model == "system-users":
            for user in self.users:
                subprocess.run(["userdel", "-r", user], capture_output=True)
                (Path("/var/mail") / user).unlink(missing_ok=True)
            if self.pam_service:
                Path(f"/etc/pam.d/{self.pam_service}").unlink(missing_ok=True)


# ---- the server ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def certificate(work: Path) -> tuple[Path, Path]:
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


class Server:
    def __init__(self, work: Path, mail: Mail, trace: bool = False) -> None:
        self.port, self.tls_port = free_port(), free_port()
        cert, key = certificate(work)
        self.control = work / "control"
        self.traced = trace
        entry = [str(REPO / "bench" / "tracehook.py")] if trace else ["-m", "qpopper"]
        command = [sys.executable, *entry, "--syslog-socket=", "--auth-fail-delay=0.05",
                   f"--tls-server-cert-file={cert}", f"--tls-private-key-file={key}", "--metrics-listen=127.0.0.1:0",
                   f"--control-dir={self.control}", "--tls-listen", f"127.0.0.1:{self.tls_port}",
                   f"127.0.0.1:{self.port}"]
        if mail.model == "workers":
            command += ["--passwd-file", str(work / "passwd"), "--workers", "2"]
        else:
            command += [f"--pam-service={mail.pam_service}", "--min-uid=1000"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"),
                                                                          os.environ.get("PYTHONPATH")])),
                   QPOPPER_TRACE_DIR=str(work))
        self.log = work / "qpopper.log"
        self._log = self.log.open("wb")
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=self._log, env=env, cwd=work)
        deadline = time.monotonic() + 30
        self.metrics_port = 0
        while not self.metrics_port:
            match = re.search(rb"metrics on http://127\.0\.0\.1:(\d+)/metrics", self.log.read_bytes())
            if match and b"listening on" in self.log.read_bytes():
                self.metrics_port = int(match.group(1))
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {self.log.read_text()[-2000:]}")
            else:
                time.sleep(0.05)

    def long_lived(self) -> list[int]:
        """The daemon, its workers and its exporter (a session process lives seconds)."""
        pids = [self.proc.pid]
        for entry in os.listdir("/proc"):
            if entry.isdigit() and _parent(int(entry)) == self.proc.pid and _age(int(entry)) > 30:
                pids.append(int(entry))
        return pids

    def trace_report(self) -> None:
        """SIGUSR2 to each long-lived process: a baseline the first time, a report after."""
        for pid in self.long_lived():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR2)

    def children(self) -> int:
        return sum(1 for e in os.listdir("/proc") if e.isdigit() and _parent(int(e)) == self.proc.pid)

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            return str(response.read().decode())

    def who(self) -> int:
        result = subprocess.run([sys.executable, "-c", "import sys; from qpopper.daemon.admin import main; "
                                 "sys.exit(main())", "--control-dir", str(self.control), "--json", "who"],
                                capture_output=True, text=True, timeout=60,
                                env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
        if result.returncode != 0:
            raise RuntimeError(f"who failed: {result.stderr}")
        return len(json.loads(result.stdout))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ""


def _parent(pid: int) -> int:
    match = re.search(r"^PPid:\s+(\d+)", _status(pid), re.M)
    return int(match.group(1)) if match else -1


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _age(pid: int) -> float:
    try:
        start = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]) / _CLOCK_TICKS
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return 0.0
    return uptime - start


def sample(pids: list[int]) -> dict[str, float]:
    """RSS (MB), open descriptors and tasks of `pids`, summed."""
    rss = fds = tasks = 0.0
    for pid in pids:
        match = re.search(r"^VmRSS:\s+(\d+) kB", _status(pid), re.M)
        with contextlib.suppress(OSError):
            fds += len(os.listdir(f"/proc/{pid}/fd"))
            tasks += len(os.listdir(f"/proc/{pid}/task"))
        rss += int(match.group(1)) / 1024 if match else 0
    return {"rss_mb": rss, "fds": fds, "tasks": tasks}


def anonymous_mb(pid: int) -> float:
    """The anonymous part of `pid`'s RSS (heap, malloc's arenas; not code or mapped files), MB."""
    with contextlib.suppress(OSError):
        match = re.search(r"^Anonymous:\s+(\d+) kB", Path(f"/proc/{pid}/smaps_rollup").read_text(), re.M)
        if match:
            return int(match.group(1)) / 1024
    return 0.0


def role(server: Server, pid: int) -> str:
    """daemon, worker, exporter or session: which process `pid` is, by the TCP ports it listens on
    (a worker on the POP3 ones, the exporter on the metrics one alone, a session process on none)."""
    if pid == server.proc.pid:
        return "daemon"
    ports = _listening_ports(pid)
    if server.port in ports:
        return "worker"
    return "exporter" if ports == {server.metrics_port} else "session"


def _listening_ports(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value), per hour."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var * 3600


# ---- the clients ----------------------------------------------------------------------


class Pop:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, tls: ssl.SSLContext | None) -> Pop:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=tls, limit=1 << 22), 30)
        pop = cls(reader, writer)
        await pop.reply()
        return pop

    async def reply(self) -> bytes:
        line = await asyncio.wait_for(self.reader.readline(), 60)
        if not line:
            raise ConnectionError("closed")
        return line

    async def command(self, text: str, slow: bool = False) -> bytes:
        data = text.encode() + b"\r\n"
        if slow:
            for i in range(0, len(data), 3):
                self.writer.write(data[i:i + 3])
                await self.writer.drain()
                await asyncio.sleep(0.05)
        else:
            self.writer.write(data)
        return await self.reply()

    async def multiline(self, text: str) -> bytes | None:
        status = await self.command(text)
        if not status.startswith(b"+OK"):
            return None
        lines = []
        while (line := await self.reply()) != b".\r\n":
            lines.append(line)
        return b"".join(lines)

    def abort(self) -> None:
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self.writer.wait_closed()


async def session(server: Server, user: str, ledger: Ledger, rng: random.Random, tls: ssl.SSLContext,
                  kind: str) -> None:
    """One client session of `kind`."""
    port, context = (server.tls_port, tls) if kind == "tls" else (server.port, None)
    pop = await Pop.open(port, context)
    try:
        slow = kind == "slow"
        await pop.command(f"USER {user}", slow)
        if kind == "bad":
            answer = await pop.command("PASS wrong-password")
            if not answer.startswith(b"-ERR"):
                ledger.errors.append(f"a wrong password was accepted for {user}")
            await pop.command("QUIT")
            ledger.ops["bad"] += 1
            return
        answer = await pop.command(f"PASS {PASSWORD}", slow)
        if answer.startswith(b"-ERR"):
            if b"[IN-USE]" not in answer:  # another client has this maildrop now: expected
                ledger.errors.append(f"login of {user}: {answer!r}")
            ledger.ops["in-use"] += 1
            await pop.command("QUIT")
            return
        count = int((await pop.command("STAT")).split()[1])
        await pop.multiline("LIST")
        await pop.multiline("UIDL")
        deleted = []
        for n in rng.sample(range(1, count + 1), min(count, rng.randrange(1, 5))):
            text = await (pop.multiline(f"TOP {n} 0") if rng.random() < 0.3 else pop.multiline(f"RETR {n}"))
            ids = ID.findall(text or b"")
            if len(ids) != 1:
                ledger.errors.append(f"message {n} of {user} has ids {ids}")
                continue
            if rng.random() < 0.6 and (await pop.command(f"DELE {n}")).startswith(b"+OK"):
                deleted.append(ids[0].decode())
        if kind == "drop":
            pop.abort()  # the deletions must not be applied
            ledger.ops["dropped"] += 1
            return
        if (await pop.command("QUIT", slow)).startswith(b"+OK"):
            ledger.taken.update(deleted)
        else:
            ledger.errors.append(f"QUIT of {user} failed")
    finally:
        await pop.close()
    ledger.ops[kind] += 1


async def client(server: Server, users: list[str], ledger: Ledger, seed: int, until: float,
                 tls: ssl.SSLContext) -> None:
    rng = random.Random(seed)
    kinds = ["plain"] * 5 + ["tls"] * 2 + ["bad", "drop", "slow"]
    while time.monotonic() < until:
        kind, user = rng.choice(kinds), rng.choice(users)
        try:
            await session(server, user, ledger, rng, tls, kind)
        except (OSError, ConnectionError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError) as exc:
            ledger.errors.append(f"{kind} session of {user}: {type(exc).__name__}: {exc} {traceback.format_exc(-3)}")
        await asyncio.sleep(rng.random() * 0.05)


async def mda(mail: Mail, ledger: Ledger, until: float, counter: itertools.count[int], hold: int) -> None:
    rng = random.Random(7)
    loop = asyncio.get_running_loop()
    while time.monotonic() < until:
        if hold and len(ledger.delivered) - sum(ledger.taken.values()) >= hold:
            await asyncio.sleep(0.1)  # the maildrops are full: deliver what the clients take away
            continue
        user = rng.choice(mail.users)
        soak_id = f"{user}-{next(counter)}"
        await loop.run_in_executor(None, deliver, mail.location(user), message(soak_id, rng))
        ledger.delivered.add(soak_id)
        ledger.ops["delivered"] += 1
        await asyncio.sleep(0.05 + rng.random() * 0.2)


async def sampler(server: Server, until: float, every: float, samples: list[dict[str, float]],
                  ledger: Ledger, trace_at: float | None) -> None:
    start = time.monotonic()
    loop = asyncio.get_running_loop()
    while time.monotonic() < until:
        if trace_at is not None and time.monotonic() - start >= trace_at:
            server.trace_report()  # the baseline, at the end of the warm-up
            trace_at = None
        roles: dict[str, list[int]] = {}
        for pid in server.long_lived():
            roles.setdefault(role(server, pid), []).append(pid)
        roles.pop("session", None)  # a slow session's process, older than 30 s: not the server's own
        pids = [pid for members in roles.values() for pid in members]
        figures = sample(pids)
        for name, members in roles.items():
            figures[f"{name}_rss_mb"] = sample(members)["rss_mb"]
            figures[f"{name}_anon_mb"] = sum(anonymous_mb(pid) for pid in members)
        figures["t"] = time.monotonic() - start
        figures["processes"] = len(pids)
        figures["children"] = server.children()
        try:
            text = await loop.run_in_executor(None, server.scrape)
            figures["sessions_metric"] = sum(float(line.split()[-1]) for line in text.splitlines()
                                             if line.startswith("qpopper_sessions{"))
            figures["who"] = await loop.run_in_executor(None, server.who)
        except (OSError, RuntimeError, ValueError) as exc:
            ledger.errors.append(f"sampler: {exc}")
        samples.append(figures)
        await asyncio.sleep(every)


async def load(server: Server, mail: Mail, ledger: Ledger, seconds: float, clients: int, every: float,
               samples: list[dict[str, float]], hold: int) -> None:
    until = time.monotonic() + seconds
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    counter = itertools.count()
    shares = [mail.users[i::clients] or mail.users for i in range(clients)]  # fewer IN-USE collisions
    await asyncio.gather(
        sampler(server, until, every, samples, ledger, seconds / 5 if server.traced else None),
        mda(mail, ledger, until, counter, hold),
        *(client(server, shares[i], ledger, i, until, tls) for i in range(clients)),
    )


def run(work: Path, model: str, seconds: float, clients: int, every: float, hold: int = 0,
        trace: bool = False) -> dict[str, Any]:
    mail = Mail(work, model)
    ledger = Ledger()
    try:
        rng = random.Random(1)
        for user in mail.users:
            for i in range(INITIAL):
                soak_id = f"{user}-init{i}"
                deliver(mail.location(user), message(soak_id, rng))
                ledger.delivered.add(soak_id)
        server = Server(work, mail, trace)
        samples: list[dict[str, float]] = []
        try:
            asyncio.run(load(server, mail, ledger, seconds, clients, every, samples, hold))
            if trace:
                server.trace_report()
                time.sleep(5)  # the processes write their reports
        finally:
            server.stop()
        left = mail.ids_left()
    finally:
        mail.remove()
    duplicated = sorted(i for i, n in (left + ledger.taken).items() if n > 1)
    lost = sorted(ledger.delivered - set(left) - set(ledger.taken))
    unknown = sorted((set(left) | set(ledger.taken)) - ledger.delivered)
    warm = [s for s in samples if s["t"] >= seconds / 5]
    slopes = {key: slope_per_hour([(s["t"], s[key]) for s in warm]) for key in ("rss_mb", "fds", "tasks")}
    role_keys = sorted({k for s in warm for k in s if k.endswith(("_rss_mb", "_anon_mb")) and k != "rss_mb"})
    role_slopes = {k: slope_per_hour([(s["t"], s[k]) for s in warm if k in s]) for k in role_keys}
    return {
        "model": model, "seconds": seconds, "clients": clients, "samples": len(samples),
        "slopes_per_hour": slopes, "memory_slopes_per_hour_by_role": role_slopes, "hold": hold,
        "held_at_end": len(ledger.delivered) - sum(ledger.taken.values()),
        "first": samples[0] if samples else None, "last": samples[-1] if samples else None,
        # Every sample after the warm-up: seconds, RSS MB, descriptors, tasks, sessions held (who).
        "series": [[round(s["t"]), round(s["rss_mb"], 2), s["fds"], s["tasks"], s.get("who")] for s in warm],
        "ops": dict(ledger.ops), "delivered": len(ledger.delivered), "taken": sum(ledger.taken.values()),
        "left": sum(left.values()),
        "lost": lost[:20], "duplicated": duplicated[:20], "unknown": unknown[:20],
        "errors": ledger.errors[:20], "error_count": len(ledger.errors),
        "ok": not (lost or duplicated or unknown or ledger.errors),
        "traces": sorted(str(p) for p in work.glob("trace-*.txt")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the load (default 30)")
    parser.add_argument("--model", choices=("workers", "system-users"), default="workers")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples (default 10)")
    parser.add_argument("--work", type=Path, help="directory for the mail (default: a temporary one)")
    parser.add_argument("--hold", type=int, default=USERS * INITIAL * 2,
                        help="messages held at most in the maildrops (default %(default)s; 0: no bound)")
    parser.add_argument("--trace", action="store_true", help="tracemalloc reports (bench/tracehook.py)")
    a = parser.parse_args(argv)
    if a.minutes <= 0 or a.clients < 1 or a.sample <= 0 or a.hold < 0:
        print("soak.py: --minutes, --clients and --sample must be positive, --hold not negative", file=sys.stderr)
        return 2
    if a.model == "system-users" and os.geteuid() != 0:
        print("soak.py: the system-users model needs root (useradd, PAM, the privilege drop)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="qpopper-soak-") as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.chmod(work, 0o755)
        result = run(work, a.model, a.minutes * 60, a.clients, a.sample, a.hold, a.trace)
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
