"""Login churn with real password hashes and real user databases, side by
side with Dovecot configured the same way (issue 19, item 6).

    .venv/bin/python bench/userdb_login.py --quick        # ~5 min: 2 rounds of 3 s per pairing
    .venv/bin/python bench/userdb_login.py                # 5 rounds of 10 s
    bench/run.py --scenarios userdb ...                   # the same, as a section of the main run

Pairings: backend (passwd-file, PostgreSQL, LDAP) x scheme (SHA512-CRYPT
with 5000 rounds, ARGON2ID with m=19456 KiB, t=2, p=1) x auth cache (off,
on; the passwd-file is in memory on both sides, so only off). Both
servers read the same database and the same hashes: one slapd
(tests/slapd_helpers) and one PostgreSQL cluster (tests/pg_helpers), both
on this machine; a passwd-file each, with the same lines. Dovecot
(Debian's dovecot-pop3d, dovecot-pgsql, dovecot-ldap) runs a private
instance written here, as ../shared/bench/dovecot.sh does it (rootless:
its processes run as the `dovecot` user when started as root), with
passdb ldap or sql and userdb prefetch (one lookup per login, as ours),
and auth_cache_size 0 or 10M. Users s1..sN hold SHA512-CRYPT hashes,
a1..aN ARGON2ID ones, each an empty Maildir of its own per side.

popbench's `compare login` alternates the two servers; server CPU per
session is the server's processes (Dovecot's master, auth, login and pop3
processes; our one process); the directory's or database's CPU during the
runs is reported beside it (both sides use the same one). The report goes
to bench/results/USERDB.md and its raw lines to results/raw/userdb-*.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the slapd and PostgreSQL fixtures the tests use

PASSWORD = "pass"
SCHEMES = ("SHA512-CRYPT", "ARGON2ID")
PREFIX = {"SHA512-CRYPT": "s", "ARGON2ID": "a"}
SQL_ROLE, SQL_SECRET = "qpopper", "bench-sql-secret"


def log(text: str) -> None:
    print(f"[userdb {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def hashes(scheme: str, users: int) -> list[str]:
    """One hash per user (own salt), as "{SCHEME}hash"."""
    from passlib.hash import argon2, sha512_crypt

    if scheme == "SHA512-CRYPT":
        handler = sha512_crypt.using(rounds=5000)
    else:
        handler = argon2.using(type="ID", memory_cost=19456, rounds=2, parallelism=1)
    return [f"{{{scheme}}}{handler.hash(PASSWORD)}" for _ in range(users)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on {port}")
        time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its descendants (clock ticks)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                todo += [int(c) for c in children]
        except (OSError, IndexError, ValueError):
            continue
    return total


# ---- the shared databases ----------------------------------------------------------------


@dataclass
class Users:
    names: dict[str, list[str]]  # scheme -> user names
    stored: dict[str, list[str]]  # scheme -> "{SCHEME}hash" per user


def make_users(count: int) -> Users:
    names, stored = {}, {}
    for scheme in SCHEMES:
        names[scheme] = [f"{PREFIX[scheme]}{i}" for i in range(1, count + 1)]
        stored[scheme] = hashes(scheme, count)
    return Users(names, stored)


def start_slapd(work: Path, users: Users) -> Any:
    from slapd_helpers import BASE, Slapd

    server = Slapd(work / "slapd")
    server.start()
    server.load_base()
    ldif = []
    for scheme in SCHEMES:
        for name, value in zip(users.names[scheme], users.stored[scheme], strict=True):
            ldif.append(
                f"dn: uid={name},ou=people,{BASE}\nobjectClass: inetOrgPerson\nobjectClass: posixAccount\n"
                f"uid: {name}\ncn: {name}\nsn: bench\nuidNumber: 1000\ngidNumber: 1000\n"
                f"homeDirectory: /nonexistent/{name}\nuserPassword: {value}\n\n"
            )
    for start in range(0, len(ldif), 200):
        server.ldapadd("".join(ldif[start:start + 200]))
    return server


def start_postgres(users: Users) -> Any:
    from pg_helpers import PostgresServer

    pg = PostgresServer()
    pg.start()
    pg.execute("CREATE TABLE users (userid TEXT PRIMARY KEY, password TEXT NOT NULL, home TEXT)")
    import psycopg

    with psycopg.connect(pg.dsn(), autocommit=True) as conn, conn.cursor() as cursor:
        rows = [(n, h, f"/nonexistent/{n}") for s in SCHEMES for n, h in zip(users.names[s], users.stored[s],
                                                                              strict=True)]
        cursor.executemany("INSERT INTO users VALUES (%s, %s, %s)", rows)
    pg.create_role(SQL_ROLE, SQL_SECRET)
    os.chmod(pg.root, 0o755)  # Dovecot's auth process (another user) reaches the socket
    return pg


# ---- the two servers, configured alike ------------------------------------------------------


@dataclass(frozen=True)
class Pairing:
    backend: str  # passwd-file | pgsql | ldap
    scheme: str
    cache: bool

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.scheme}/cache-{'on' if self.cache else 'off'}"


def ldap_args(slapd: Any, dovecot: bool) -> str:
    from slapd_helpers import BASE, READER_DN, READER_PW

    home = "homeDirectory=userdb_home" if dovecot else "homeDirectory=home"
    return (f"uris = {slapd.url}\ndn = {READER_DN}\ndnpass = {READER_PW}\nbase = ou=people,{BASE}\n"
            "scope = subtree\npass_filter = (&(objectClass=posixAccount)(uid=%u))\n"
            "user_filter = (&(objectClass=posixAccount)(uid=%u))\n"
            f"pass_attrs = uid=user, userPassword=password, {home}\n"
            + ("" if dovecot else "user_attrs = homeDirectory=home\n"))


def sql_args(pg: Any) -> str:
    return (f"driver = pgsql\nconnect = {pg.dsn(user=SQL_ROLE, password=SQL_SECRET)}\n"
            "password_query = SELECT userid AS user, password, home AS userdb_home FROM users WHERE userid = '%u'\n")


class Dovecot:
    """A private Dovecot for one pairing (written after dovecot.sh's layout)."""

    def __init__(self, work: Path, pairing: Pairing, mail: Path, passwd: Path, db_args: str, port: int) -> None:
        self.dir = work / "dovecot"
        self.port = port
        for sub in ("etc", "run", "state", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.as_root = os.geteuid() == 0
        user = pwd.getpwnam("dovecot") if self.as_root else pwd.getpwuid(os.geteuid())
        self.uid, self.gid = user.pw_uid, user.pw_gid
        group = __import__("grp").getgrgid(self.gid).gr_name
        if pairing.backend == "passwd-file":
            passdb = f"passdb {{\n  driver = passwd-file\n  args = {passwd}\n}}\n"
            userdb = f"userdb {{\n  driver = passwd-file\n  args = {passwd}\n}}\n"
        else:
            args = self.dir / "etc" / f"dovecot-{pairing.backend}.conf.ext"
            args.write_text(db_args)
            driver = "ldap" if pairing.backend == "ldap" else "sql"
            passdb = f"passdb {{\n  driver = {driver}\n  args = {args}\n}}\n"
            userdb = "userdb {\n  driver = prefetch\n}\n"
        cache = "auth_cache_size = 10M\nauth_cache_ttl = 1 hour\nauth_cache_negative_ttl = 1 hour\n" if pairing.cache \
            else "auth_cache_size = 0\n"
        (self.dir / "etc" / "dovecot.conf").write_text(
            f"protocols = pop3\nlisten = 127.0.0.1\nbase_dir = {self.dir}/run\nstate_dir = {self.dir}/state\n"
            f"instance_name = bench-userdb-{port}\nlog_path = {self.dir}/log/dovecot.log\n"
            f"default_internal_user = {user.pw_name}\ndefault_internal_group = {group}\n"
            f"default_login_user = {user.pw_name}\nfirst_valid_uid = {self.uid}\nfirst_valid_gid = {self.gid}\n"
            f"mail_uid = {self.uid}\nmail_gid = {self.gid}\n"
            "disable_plaintext_auth = no\nauth_mechanisms = plain\n"
            f"mail_location = maildir:{mail}/%u\nmail_max_userip_connections = 100000\n"
            f"{cache}{passdb}{userdb}ssl = no\n"
            f"service pop3-login {{\n  inet_listener pop3 {{\n    address = 127.0.0.1\n    port = {port}\n  }}\n"
            "  chroot =\n  process_limit = 2000\n  service_count = 1\n}\n"
            "service pop3 {\n  process_limit = 2000\n}\n"
            "service anvil {\n  chroot =\n  client_limit = 4100\n}\n"
            "service auth {\n  client_limit = 4100\n}\n"
            "service imap-login {\n  chroot =\n}\nservice submission-login {\n  chroot =\n}\n"
            "service managesieve-login {\n  chroot =\n}\n"
        )
        self.pid = 0

    def start(self) -> int:
        cmd = ["/usr/sbin/dovecot", "-c", str(self.dir / "etc" / "dovecot.conf")]
        if self.as_root:
            subprocess.run(["chown", "-R", f"{self.uid}:{self.gid}", str(self.dir)], check=True)
            cmd = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--"] + cmd
        # Not a pipe: the master's children would hold it open after it forks away.
        start_log = self.dir / "log" / "start.out"
        with open(start_log, "wb") as out:
            result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"dovecot failed: {start_log.read_text(errors='replace')}{self.log_tail()}")
        wait_port(self.port)
        pid_file = self.dir / "run" / "master.pid"
        deadline = time.monotonic() + 20
        while not (pid_file.exists() and pid_file.read_text().strip()):  # written after the listeners open
            if time.monotonic() > deadline:
                raise RuntimeError(f"dovecot wrote no master.pid: {self.log_tail()}")
            time.sleep(0.02)
        self.pid = int(pid_file.read_text().split()[0])
        return self.pid

    def log_tail(self) -> str:
        try:
            return (self.dir / "log" / "dovecot.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    os.kill(self.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            self.pid = 0


class Qpopper:
    def __init__(self, work: Path, pairing: Pairing, mail: Path, passwd: Path, db_args: str, port: int,
                 python: str, src: Path) -> None:
        self.dir = work / "qpopper"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.cmd = [python, "-m", "qpopper", "--auth-fail-delay", "0", "--syslog-socket=", "--nonauth-file=",
                    "--max-connections", "20000", "--max-connections-per-ip", "20000",
                    "--mail-location", f"maildir:{mail}/%u"]
        if pairing.backend == "passwd-file":
            self.cmd += ["--passwd-file", str(passwd)]
        else:
            args = self.dir / f"{pairing.backend}.conf"
            args.write_text(db_args)
            self.cmd += ["--auth-backend", "ldap" if pairing.backend == "ldap" else "sql",
                         "--auth-backend-args", str(args)]
            if pairing.cache:
                self.cmd += ["--auth-cache-size", "10M", "--auth-cache-ttl", "1 hour"]
        self.cmd.append(f"127.0.0.1:{port}")
        self.env = dict(os.environ, PYTHONPATH=str(src))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        with open(self.dir / "qpopper.log", "ab") as logf:
            self.proc = subprocess.Popen(self.cmd, stdout=logf, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        wait_port(self.port, self.proc)
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# ---- the run ------------------------------------------------------------------------------------


def popbench_compare(python: str, popbench: Path, a: tuple[int, int], b: tuple[int, int], users: list[str],
                     rounds: int, duration: int, concurrency: int) -> list[dict[str, Any]]:
    prefix = users[0].rstrip("0123456789")
    cmd = [python, str(popbench), "compare", "login", "--a", f"127.0.0.1:{a[0]}", "--a-pid", str(a[1]),
           "--b", f"127.0.0.1:{b[0]}", "--b-pid", str(b[1]), "--rounds", str(rounds), "--pause", "1",
           "--password", PASSWORD, "--user-format", prefix + "{i}", "--users", str(len(users)),
           "-c", str(concurrency), "-d", str(duration)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    lines = [json.loads(x) for x in result.stdout.splitlines() if x.strip().startswith("{")]
    if result.returncode != 0 and not lines:
        raise RuntimeError(f"popbench failed: {result.stderr[-2000:]}")
    return [x for x in lines if "side" in x]


def median(values: list[Any]) -> float | None:
    known = sorted(float(v) for v in values if v is not None)
    if not known:
        return None
    mid = len(known) // 2
    return known[mid] if len(known) % 2 else (known[mid - 1] + known[mid]) / 2


def run(args: argparse.Namespace) -> Path:
    popbench = Path(args.shared_bench) / "popbench.py"
    work = Path(tempfile.mkdtemp(prefix="qpopper-userdb-"))
    work.chmod(0o755)
    out = Path(args.out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    src = Path(args.src) if args.src else REPO / "src"
    log(f"hashing {args.users} users per scheme")
    users = make_users(args.users)
    mails = {side: work / "mail" / side for side in ("dovecot", "qpopper")}
    for root in mails.values():
        for scheme in SCHEMES:
            for name in users.names[scheme]:
                for sub in ("cur", "new", "tmp"):
                    (root / name / sub).mkdir(parents=True, exist_ok=True)
    passwd = work / "passwd"
    passwd.write_text("".join(f"{n}:{h}::::/nonexistent/{n}::\n" for s in SCHEMES
                              for n, h in zip(users.names[s], users.stored[s], strict=True)))
    passwd.chmod(0o644)
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "dovecot:dovecot", str(mails["dovecot"])], check=True)
    backends = args.backends.split(",")
    slapd = start_slapd(work, users) if "ldap" in backends else None
    pg = start_postgres(users) if "pgsql" in backends else None
    results: list[dict[str, Any]] = []
    try:
        for backend in backends:
            for scheme in args.schemes.split(","):
                for cache in ((False,) if backend == "passwd-file" else (False, True)):
                    pairing = Pairing(backend, scheme, cache)
                    db_dovecot = ldap_args(slapd, True) if backend == "ldap" else sql_args(pg) if pg else ""
                    db_ours = ldap_args(slapd, False) if backend == "ldap" else sql_args(pg) if pg else ""
                    dport, qport = free_port(), free_port()
                    dov = Dovecot(work / pairing.name.replace("/", "-"), pairing, mails["dovecot"], passwd,
                                  db_dovecot, dport)
                    ours = Qpopper(work / pairing.name.replace("/", "-"), pairing, mails["qpopper"], passwd,
                                   db_ours, qport, args.python, src)
                    backing = slapd.proc.pid if backend == "ldap" and slapd else (
                        _postmaster_pid(pg) if backend == "pgsql" and pg else None)
                    try:
                        a, b = dov.start(), ours.start()
                        log(f"{pairing.name}: dovecot {a} on {dport}, qpopper {b} on {qport}")
                        db_cpu0 = cpu_seconds(backing) if backing else 0.0
                        runs = popbench_compare(args.python, popbench, (dport, a), (qport, b),
                                                users.names[scheme], args.rounds, args.duration, args.concurrency)
                        db_cpu = (cpu_seconds(backing) - db_cpu0) if backing else None
                    except Exception as exc:  # noqa: BLE001 - one pairing failing must not lose the others
                        log(f"{pairing.name}: failed: {exc}")
                        results.append({"pairing": pairing.name, "error": str(exc)[-1500:]})
                        continue
                    finally:
                        dov.stop()
                        ours.stop()
                    (out / "raw" / f"userdb-{pairing.name.replace('/', '-')}.jsonl").write_text(
                        "".join(json.dumps(x) + "\n" for x in runs))
                    results.append(_summary(pairing, runs, db_cpu))
                    log(f"{pairing.name}: {results[-1]}")
    finally:
        if slapd is not None:
            slapd.stop()
        if pg is not None:
            pg.stop(remove=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return write_report(out, args, results)


def _postmaster_pid(pg: Any) -> int | None:
    try:
        return int((pg.data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _summary(pairing: Pairing, runs: list[dict[str, Any]], db_cpu: float | None) -> dict[str, Any]:
    row: dict[str, Any] = {"pairing": pairing.name}
    sessions = 0
    for side, name in (("A", "dovecot"), ("B", "qpopper")):
        mine = [x for x in runs if x.get("side") == side]
        row[name] = {
            "sessions_per_s": median([x.get("sessions_per_s") for x in mine]),
            "cpu_ms": median([x.get("server_cpu_ms_per_session") for x in mine]),
            "p50_ms": median([x.get("p50_ms") for x in mine]),
            "p99_ms": median([x.get("p99_ms") for x in mine]),
            "errors": sum(int(x.get("errors", 0) or 0) for x in mine),
        }
        sessions += sum(int(x.get("sessions", 0) or 0) for x in mine)
    row["db_cpu_ms_per_session"] = (db_cpu * 1000 / sessions) if db_cpu is not None and sessions else None
    return row


def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def write_report(out: Path, args: argparse.Namespace, results: list[dict[str, Any]]) -> Path:
    lines = [
        "# Logins with real hashes and user databases, qpopper vs Dovecot (issue 19)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores; "
        f"{args.rounds} rounds of {args.duration} s per side, {args.concurrency} concurrent clients, "
        f"{args.users} users per scheme. Command: `{' '.join(sys.argv)}`",
        "",
        "Server CPU: the server's own processes per session (Dovecot's master, auth, login and pop3; our one "
        "process). Directory/database CPU: slapd's or PostgreSQL's, per session of both sides together.",
        "",
        "| pairing | Dovecot sessions/s | qpopper sessions/s | ratio | Dovecot CPU ms/session | "
        "qpopper CPU ms/session | ratio | p50 ms D / q | db CPU ms/session | errors D / q |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        if "error" in row:
            lines.append(f"| {row['pairing']} | failed: {row['error'].splitlines()[-1][:120]} |||||||||")
            continue
        d, q = row["dovecot"], row["qpopper"]
        rate = q["sessions_per_s"] / d["sessions_per_s"] if d["sessions_per_s"] and q["sessions_per_s"] else None
        cpu = q["cpu_ms"] / d["cpu_ms"] if d["cpu_ms"] and q["cpu_ms"] else None
        lines.append(
            f"| {row['pairing']} | {_fmt(d['sessions_per_s'], 0)} | {_fmt(q['sessions_per_s'], 0)} | {_fmt(rate)} | "
            f"{_fmt(d['cpu_ms'])} | {_fmt(q['cpu_ms'])} | {_fmt(cpu)} | {_fmt(d['p50_ms'], 1)} / "
            f"{_fmt(q['p50_ms'], 1)} | {_fmt(row['db_cpu_ms_per_session'])} | {d['errors']} / {q['errors']} |"
        )
    lines += ["", "Target (issue 19): qpopper's sessions/s >= Dovecot's and CPU per session <= Dovecot's in "
              "every pairing.", ""]
    path = out / str(args.report_name)
    path.write_text("\n".join(lines) + "\n")
    (out / "raw" / "userdb-summary.json").write_text(json.dumps(results, indent=1))
    return path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 rounds of 3 s (default 5 rounds of 10 s)")
    p.add_argument("--rounds", type=int)
    p.add_argument("-d", "--duration", type=int)
    p.add_argument("-c", "--concurrency", type=int, default=16)
    p.add_argument("--users", type=int, default=100, help="users per scheme")
    p.add_argument("--backends", default="passwd-file,pgsql,ldap")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--report-name", default="USERDB.md")
    p.add_argument("--shared-bench", default=os.environ.get("QPOPPER_BENCH_SHARED",
                                                            str(REPO.parent / "shared" / "bench")))
    p.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"))
    p.add_argument("--src", help="the src/ to run (default the working tree's)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.duration = args.duration or (3 if args.quick else 10)
    for need in ("/usr/sbin/dovecot", "/usr/lib/dovecot/pop3"):
        if not Path(need).exists():
            print(f"userdb_login.py: {need} is missing (apt-get install dovecot-pop3d dovecot-ldap dovecot-pgsql)",
                  file=sys.stderr)
            return 2
    # A SIGTERM (timeout, ^C from a wrapper) still stops slapd, PostgreSQL and the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = run(args)
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
