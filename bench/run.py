#!/usr/bin/env python3
"""Benchmark this server against a private Dovecot, side by side, and write a report.

One command (from the repository root; see bench/README.md):

    .venv/bin/python bench/run.py            # full: 5 rounds of 10 s per scenario, ~30 min
    .venv/bin/python bench/run.py --quick    # development: 2 rounds of 3 s, ~6 min

It installs nothing. It checks its prerequisites (Dovecot, openssl, setpriv, the
shared harness, matplotlib, an importable qpopper) and says how to get what is
missing. Then, for each mail format (maildir, mbox):

  1. generates two identical copies of the test mail with popbench.py (same seed):
     one for Dovecot, one for us, so neither server sees the other's index files,
     flag renames or locks;
  2. starts a private Dovecot (dovecot.sh, Dovecot's default "secure" login mode)
     and this server (`python -m qpopper`, --auth-fail-delay 0) on separate ports;
  3. runs `popbench.py run` against each server in turn, round after round (A =
     Dovecot, T = Twisted, B = qpopper: A T B A T B) for login, retr -c 1, retr -c 8,
     idle and bigbox (warm), plus Dovecot's cold-index bigbox (restart + drop-index
     before each run); Twisted's POP3 server (bench/twisted_pop3.py, in a virtualenv
     made under --work or given by --twisted-venv) joins login, TLS login and idle on
     Maildir, on small maildrops and on medium ones (the -200 sections);
  4. stops both servers.

Finally it writes REPORT.md (medians, spread, B/A ratio, target verdicts), ratios.png
and the raw JSON lines of every run into the results directory.

The harness (popbench.py, dovecot.sh) is found in ../shared/bench relative to the
repository root, or wherever --shared-bench / $QPOPPER_BENCH_SHARED points.
Generated mail goes under --work (default $TMPDIR/qpopper-bench), never into the
shared directory or the repository.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))  # poll.py, bigbox's poll variant
PASSWORD = "pass"
RETR_USERS = 16  # u1..u16, 200 messages each (popbench's default maildrop)
SESSION_USERS = 1000  # l1..l1000, 10 messages each: login churn and idle (see note below)
# Why a second set of users for login and idle: this server allows one POP session per
# maildrop (RFC 1939 exclusive access; -ERR [IN-USE] otherwise), Dovecot does not lock by
# default. With 50 concurrent logins cycling over 16 users the sessions would collide, and
# 500 held sessions need 500 distinct users. Both servers get the same users.
BIGBOX_SIZES = "lognormal:median=3000,sigma=0.8,min=600,max=100000"
# The Python peer (Twisted's POP3 server) stats every message at login, so its cost grows
# with the maildrop: m1..m200 hold 200 messages each for the medium-maildrop sections. Login
# never reads a message, so they are small (2 kB) to keep three copies of the mail cheap.
MEDIUM_USERS = 200
MEDIUM_SIZES = "fixed:2000"
# The reference peers: A = Dovecot (every section), T = Twisted (Maildir login, TLS login
# and idle, small and medium maildrops). B is this server.
PEER_NAMES = {"A": "Dovecot", "T": "Twisted"}


# ----------------------------------------------------------------------------------------
# scenarios and the metrics reported for each
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    key: str  # key in popbench's per-run JSON line
    label: str
    higher_is_better: bool
    # target on the ratio qpopper/Dovecot (None: informational); see issue 4
    target: tuple[str, float] | None = None  # (">=" | "<=", ratio)
    chart: bool = False
    # target on the ratio qpopper/Twisted, where Twisted runs (issue 24)
    twisted_target: tuple[str, float] | None = None


@dataclass(frozen=True)
class Scenario:
    name: str  # our name (report section)
    popbench: str  # popbench scenario
    args: tuple[str, ...]
    metrics: tuple[Metric, ...]
    needs_tls: bool = False
    peers: tuple[str, ...] = ("A",)  # reference peers it runs against (PEER_NAMES), before B
    maildir_only: bool = False
    # popbench `run` arguments of a warm-up: when set, our server and Twisted's are restarted
    # before each of their rounds and warmed by this run, so that memory a previous scenario
    # freed is not what the held sessions reuse (a baseline then shows what a session costs)
    warmup: tuple[str, ...] = ()


def scenarios(quick: bool, mail_manifest: str) -> list[Scenario]:
    dur = "3" if quick else "10"
    login_metrics = (
        Metric("sessions_per_s", "sessions/s", True, (">=", 5.0), chart=True, twisted_target=(">=", 1.5)),
        Metric("server_cpu_ms_per_session", "server CPU ms/session", False, ("<=", 0.2), chart=True,
               twisted_target=("<=", 2 / 3)),
        Metric("p50_ms", "latency p50 ms", False),
        Metric("p99_ms", "latency p99 ms", False),
        Metric("client_cpu_util", "client CPU (cores)", True),
        Metric("server_cpu_util", "server CPU (cores)", False),
        Metric("other_cpu_util", "other tenants' CPU (cores)", False),
    )
    retr_metrics = (
        Metric("mb_per_s", "MB/s", True, (">=", 1.0), chart=True),
        Metric("server_cpu_s_per_gb", "server CPU s/GB", False, ("<=", 0.5), chart=True),
        Metric("msgs_per_s", "messages/s", True),
        Metric("p50_session_ms", "session p50 ms", False),
        Metric("client_cpu_s_per_gb", "client CPU s/GB", False),
        Metric("other_cpu_util", "other tenants' CPU (cores)", False),
    )
    session_users = ("--user-format", "l{i}", "--users", str(SESSION_USERS))
    medium_users = ("--user-format", "m{i}", "--users", str(MEDIUM_USERS))
    tls_metrics = tuple(
        Metric(m.key, m.label, m.higher_is_better, (">=", 1.5) if m.key == "sessions_per_s" else None,
               m.chart and m.key == "sessions_per_s", m.twisted_target if m.key == "sessions_per_s" else None)
        for m in login_metrics)
    idle_metrics = (
        Metric("pss_kb_per_session", "PSS kB/session", False, ("<=", 0.1), chart=True),
        Metric("rss_kb_per_session", "RSS kB/session", False),
        Metric("pss_delta_kb_per_session", "PSS kB/session over idle baseline", False, twisted_target=("<=", 1.0)),
        Metric("rss_delta_kb_per_session", "RSS kB/session over idle baseline", False),
    )
    with_twisted = ("A", "T")
    return [
        Scenario("login", "login", ("-c", "50", "-d", dur) + session_users, login_metrics, peers=with_twisted),
        Scenario("tls-login", "tls-login", ("-c", "50", "-d", dur) + session_users, tls_metrics,
                 needs_tls=True, peers=with_twisted),
        Scenario("login-200", "login", ("-c", "50", "-d", dur) + medium_users, login_metrics,
                 peers=("T",), maildir_only=True),
        Scenario("tls-login-200", "tls-login", ("-c", "50", "-d", dur) + medium_users, tls_metrics,
                 needs_tls=True, peers=("T",), maildir_only=True),
        Scenario("retr-c1", "retr", ("-c", "1", "-d", dur, "--users", str(RETR_USERS), "--manifest", mail_manifest),
                 retr_metrics),
        Scenario("retr-c8", "retr", ("-c", "8", "-d", dur, "--users", str(RETR_USERS), "--manifest", mail_manifest),
                 retr_metrics),
        Scenario("idle", "idle", ("-k", "500", "-c", "50", "--hold", "2" if quick else "3") + session_users,
                 idle_metrics, peers=with_twisted, warmup=("login", "-c", "10", "-d", "1") + session_users),
        Scenario("idle-200", "idle", ("-k", str(MEDIUM_USERS), "-c", "50", "--hold", "2" if quick else "3")
                 + medium_users, idle_metrics, peers=("T",), maildir_only=True,
                 warmup=("login", "-c", "10", "-d", "1") + medium_users),
        Scenario("bigbox", "bigbox", ("--user-format", "big{i}", "--repeat", "2" if quick else "3"),
                 (
                     Metric("ready_s_median", "PASS to STAT answered, s (warm)", False, ("<=", 5.0), chart=True),
                     Metric("pass_s_median", "PASS s", False),
                     Metric("stat_s_median", "STAT s", False),
                     Metric("list_s_median", "full LIST s", False),
                     Metric("uidl_s_median", "full UIDL s", False),
                     Metric("server_cpu_s", "server CPU s per run", False),
                 )),
    ]


# ----------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------


class Skip(Exception):
    pass


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, text=True, capture_output=True, **kw)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.recv(100)
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answered on 127.0.0.1:{port} within {timeout} s")


def summarise(values: list[float]) -> dict[str, float]:
    med = statistics.median(values)
    lo, hi = min(values), max(values)
    spread = (hi - lo) / 2 / abs(med) * 100 if med else 0.0
    return {"median": med, "min": lo, "max": hi, "spread_pct": spread, "n": len(values)}


def fmt_num(x: float | None) -> str:
    if x is None:
        return "–"
    ax = abs(x)
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _tree(pid: int) -> list[int]:
    """`pid` and its children (the workers of a --workers pool)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [pid] + [int(p) for p in f.read().split()]
    except OSError:
        return [pid]


def mem_status(pid: int) -> dict[str, int]:
    """RssAnon / RssFile / VmHWM summed over a process and its children, kB
    (file pages include mmap'd spools)."""
    out: dict[str, int] = {}
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k in ("RssAnon", "RssFile", "VmHWM"):
                        out[k] = out.get(k, 0) + int(v.split()[0])
        except OSError:
            pass
    return out


def cpu_split(pid: int) -> tuple[float, float]:
    """User and kernel CPU seconds of a process and its children so far
    (utime+cutime, stime+cstime): what share of a server's cost lies in
    system calls and the network stack rather than in its own code."""
    user = kernel = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the name: [0] state ... [11] utime [12] stime [13] cutime [14] cstime
        user += (int(fields[11]) + int(fields[13])) / tick
        kernel += (int(fields[12]) + int(fields[14])) / tick
    return user, kernel


class MemSampler:
    """Samples a process's anonymous and file-backed RSS every 20 ms; keeps the peaks."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid, self.peak = pid, {"RssAnon": 0, "RssFile": 0}
        self.before = mem_status(pid)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            m = mem_status(self.pid)
            for k in self.peak:
                self.peak[k] = max(self.peak[k], m.get(k, 0))

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._t.join()
        return {"before": self.before, "peak": self.peak}


# ----------------------------------------------------------------------------------------
# prerequisites
# ----------------------------------------------------------------------------------------


@dataclass
class Env:
    shared: Path
    popbench: Path
    dovecot_sh: Path
    python: str  # interpreter for our server and the popbench client
    matplotlib: bool
    mbox_backend: bool
    tls: bool
    python_version: str  # the interpreter's, not this script's
    python_build: str  # whether libpython is a shared library
    notes: list[str] = field(default_factory=list)


def check_prerequisites(args: argparse.Namespace) -> Env:
    problems: list[str] = []
    notes: list[str] = []
    shared = Path(args.shared_bench).resolve()
    popbench, dovecot_sh = shared / "popbench.py", shared / "dovecot.sh"
    if not popbench.is_file() or not dovecot_sh.is_file():
        problems.append(
            f"the shared harness is not at {shared} (popbench.py, dovecot.sh): "
            "give --shared-bench DIR or set QPOPPER_BENCH_SHARED"
        )
    if not Path("/usr/sbin/dovecot").exists() or not Path("/usr/lib/dovecot/pop3").exists():
        problems.append(
            "Dovecot's POP3 server is not installed: as root, run "
            "`apt-get update && apt-get install -y dovecot-pop3d` (the system service is not used)"
        )
    for tool in ("openssl",) + (("setpriv",) if os.geteuid() == 0 else ()):
        if shutil.which(tool) is None:
            problems.append(
                f"`{tool}` is missing (apt-get install -y {'openssl' if tool == 'openssl' else 'util-linux'})"
            )
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("dovecot")
        except KeyError:
            problems.append("no `dovecot` system user (reinstall dovecot-core)")
    python = args.python
    env = dict(os.environ, PYTHONPATH=str(args.src_dir))
    probe = run(
        [python, "-c",
         "import importlib.util, sys, qpopper\n"
         "assert qpopper.__file__.startswith(sys.argv[1]), qpopper.__file__\n"
         "print(importlib.util.find_spec('qpopper.maildrop.mbox') is not None)\n"
         "print(importlib.util.find_spec('uvloop') is not None)\n"
         "import platform\n"
         "print(platform.python_version())\n"
         "print(any('libpython' in line for line in open('/proc/self/maps')))\n",
         str(args.src_dir)],
        env=env, cwd=REPO,
    )
    mbox_backend = tls = False
    python_version, python_build = "?", "?"
    if probe.returncode != 0:
        problems.append(
            f"{python} cannot import qpopper and its dependencies: run ./dev test once (it makes .venv), "
            f"or give --python. ({probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else ''})"
        )
    else:
        mbox_s, uvloop_s, python_version, shared_s = probe.stdout.split()
        mbox_backend = mbox_s == "True"
        # The interpreter's build moves every figure: pyenv's (a shared
        # libpython, no profile-guided build) spent 1.4x the CPU per login of
        # Debian's python3 (linked into its executable) on the same sessions.
        python_build = "a shared libpython" if shared_s == "True" else "libpython linked into the executable"
        if uvloop_s != "True":
            notes.append(f"uvloop is not importable by {python}: both the server and the client run plain asyncio.")
    # Features of the measured revision, found in its source (its command line changes shape).
    source = "".join(p.read_text(errors="replace") for p in Path(args.src_dir, "qpopper").rglob("*.py"))
    tls = "tls-listen" in source
    args.no_syslog = ["--syslog-socket", ""] if "syslog-socket" in source else []
    mpl = importlib.util.find_spec("matplotlib") is not None
    if not mpl:
        if args.no_chart:
            notes.append("matplotlib not installed: no chart (--no-chart).")
        else:
            problems.append(f"matplotlib is missing: `{sys.executable} -m pip install matplotlib` (or pass --no-chart)")
    if problems:
        for p in problems:
            print(f"bench/run.py: {p}", file=sys.stderr)
        raise SystemExit(2)
    return Env(shared, popbench, dovecot_sh, python, mpl, mbox_backend, tls, python_version, python_build, notes)


# ----------------------------------------------------------------------------------------
# the two servers
# ----------------------------------------------------------------------------------------


class Dovecot:
    def __init__(self, env: Env, dir: Path, fmt: str, port: int, tls_port: int) -> None:
        self.env, self.dir, self.fmt, self.port, self.tls_port = env, dir, fmt, port, tls_port
        self.pid: int | None = None

    def start(self) -> int:
        r = run(["bash", str(self.env.dovecot_sh), "start", "--dir", str(self.dir), "--format", self.fmt,
                 "--port", str(self.port), "--tls-port", str(self.tls_port), "--password", PASSWORD])
        if r.returncode != 0:
            raise RuntimeError(f"dovecot.sh start failed:\n{r.stderr}")
        self.pid = int(r.stdout.strip().splitlines()[-1])
        return self.pid

    def stop(self) -> None:
        if self.pid is not None:
            run(["bash", str(self.env.dovecot_sh), "stop", "--pid", str(self.pid)])
            self.pid = None

    def drop_index(self) -> None:
        r = run(["bash", str(self.env.dovecot_sh), "drop-index", "--dir", str(self.dir)])
        if r.returncode != 0:
            raise RuntimeError(f"dovecot.sh drop-index failed:\n{r.stderr}")

    def version(self) -> str:
        r = run(["/usr/sbin/dovecot", "--version"])
        return r.stdout.strip() or "?"


class ServerProcess:
    """One of the peers' servers run as our child (ours, Twisted's): its pid,
    stopped with SIGINT as an administrator would, restarted afresh."""

    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> int:
        """Stop and start again: a fresh process; its pid."""
        self.stop()
        return self.start()


class Qpopper(ServerProcess):
    workers = 1

    def __init__(self, env: Env, dir: Path, fmt: str, port: int, src_dir: Path,
                 tls_port: int | None = None, cert: Path | None = None, key: Path | None = None) -> None:
        self.env, self.dir, self.fmt, self.port, self.src_dir = env, dir, fmt, port, src_dir
        self.tls_port, self.cert, self.key = tls_port, cert, key
        self.no_syslog: list[str] = []
        self.proc = None
        self.log_path = dir / "qpopper.log"

    def start(self) -> int:
        mail = self.dir / "mail"
        users = sorted(os.listdir(mail / ("maildir" if self.fmt == "maildir" else "spool")))
        passwd = self.dir / "passwd"
        passwd.write_text("".join(f"{u}:{{PLAIN}}{PASSWORD}::::{self.dir}::\n" for u in users))
        where = f"{mail}/maildir/%u" if self.fmt == "maildir" else f"{mail}/spool/%u"
        cmd = [
            self.env.python, "-m", "qpopper",
            "--passwd-file", str(passwd),
            "--mail-location", f"{self.fmt}:{where}",
            "--auth-fail-delay", "0",
            "--max-connections", "20000", "--max-connections-per-ip", "20000",
            *(["--workers", str(self.workers)] if self.workers != 1 else []),  # older revisions lack it
            # records go to stderr (a file); no syslog, which may be absent on a test host
            *self.no_syslog,
            f"127.0.0.1:{self.port}",
        ]
        if self.tls_port:
            # the same RSA-2048 self-signed certificate Dovecot uses (made by dovecot.sh)
            cmd += ["--tls-listen", f"127.0.0.1:{self.tls_port}",
                    "--tls-server-cert-file", str(self.cert), "--tls-private-key-file", str(self.key)]
        env = dict(os.environ, PYTHONPATH=str(self.src_dir))
        # The server writes to its own copy of the descriptor: ours is closed once it runs.
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=self.dir,
                                         start_new_session=True)
        wait_port(self.port, 20, self.proc)
        return self.proc.pid


class Twisted(ServerProcess):
    """Twisted's POP3 server (bench/twisted_pop3.py) on its own copy of the Maildirs."""

    def __init__(self, python: str, dir: Path, port: int, tls_port: int | None, cert: Path, key: Path) -> None:
        self.python, self.dir, self.port, self.tls_port, self.cert, self.key = python, dir, port, tls_port, cert, key
        self.proc = None
        self.log_path = dir / "twisted.log"

    def start(self) -> int:
        maildirs = self.dir / "mail" / "maildir"
        passwd = self.dir / "passwd"
        passwd.write_text("".join(f"{u}:{PASSWORD}\n" for u in sorted(os.listdir(maildirs))))
        cmd = [self.python, str(REPO / "bench" / "twisted_pop3.py"), "--maildirs", str(maildirs),
               "--passwd", str(passwd), "--port", str(self.port)]
        if self.tls_port:
            cmd += ["--tls-port", str(self.tls_port), "--cert", str(self.cert), "--key", str(self.key)]
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=self.dir,
                                         start_new_session=True)
        wait_port(self.port, 20, self.proc)
        return self.proc.pid


    def version(self) -> str:
        r = run([self.python, "-c", "import twisted; print(twisted.__version__)"])
        return r.stdout.strip() or "?"


def twisted_python(args: argparse.Namespace) -> str | None:
    """The interpreter of a virtualenv with Twisted: --twisted-venv if it has one, else one
    made there (pip install twisted[tls]). None, with the reason logged, if that fails."""
    venv = Path(args.twisted_venv).resolve()
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import twisted.mail.pop3, OpenSSL, service_identity"]
    if python.exists() and run(probe).returncode == 0:
        return str(python)
    log(f"making a virtualenv with Twisted in {venv} (pip install twisted[tls])")
    made = run([sys.executable, "-m", "venv", str(venv)])
    if made.returncode == 0:
        made = run([str(python), "-m", "pip", "install", "-q", "twisted[tls]"])
    if made.returncode != 0 or run(probe).returncode != 0:
        log(f"no Twisted peer: could not make {venv}: {(made.stderr or made.stdout).strip()[-300:]}")
        return None
    return str(python)


# ----------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------


MAIL_SETS = {
    "retr": ["--users", str(RETR_USERS), "--messages", "200"],
    "session": ["--users", str(SESSION_USERS), "--user-format", "l{i}", "--messages", "10"],
    "medium": ["--users", str(MEDIUM_USERS), "--user-format", "m{i}", "--messages", "200", "--sizes", MEDIUM_SIZES],
    "bigbox": ["--users", "1", "--user-format", "big{i}", "--messages", "50000", "--sizes", BIGBOX_SIZES],
}


def gen_mail(env: Env, out: Path, fmt: str, sets: tuple[str, ...] = ("retr", "session", "bigbox")) -> None:
    pb = [env.python, str(env.popbench), f"gen-{fmt}", "--out", str(out)]
    for extra in (MAIL_SETS[name] for name in sets):
        r = run(pb + extra)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(pb + extra)} failed:\n{r.stderr}")


def popbench_json(stdout: str) -> list[dict[str, Any]]:
    out = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


class Bench:
    def __init__(self, args: argparse.Namespace, env: Env) -> None:
        self.args, self.env = args, env
        self.rounds = args.rounds or (2 if args.quick else 5)
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.raw = self.out / "raw"
        self.raw.mkdir(exist_ok=True)
        self.results: dict[str, dict[str, Any]] = {}  # key "fmt/scenario" -> data
        self.skipped: list[str] = []
        self.extra: dict[str, Any] = {}
        self.started = datetime.datetime.now(datetime.UTC)
        self.twisted_python = None if args.no_twisted else twisted_python(args)
        if self.twisted_python is None:
            self.skipped.append("no Twisted peer" + (" (--no-twisted)" if args.no_twisted else
                                                     f": no virtualenv with Twisted at {args.twisted_venv}"))

    def popbench(self, argv: list[str], timeout: float) -> tuple[int, list[dict[str, Any]], str]:
        cmd = [self.env.python, str(self.env.popbench)] + argv
        log("$ " + " ".join(cmd))
        try:
            r = run(cmd, timeout=timeout)
        except subprocess.TimeoutExpired:
            return 124, [], f"timed out after {timeout} s"
        return r.returncode, popbench_json(r.stdout), r.stderr

    def ceiling(self) -> None:
        d = "2" if self.args.quick else "5"
        rc, lines, err = self.popbench(
            ["ceiling", "--port", str(self.args.port_base + 90), "--tls-port", str(self.args.port_base + 91),
             "--scenarios", "login,tls-login,retr" if self.env.tls else "login,retr", "-d", d, "-c", "50",
             "--retr-concurrency", "1,8"], timeout=300)
        (self.raw / "ceiling.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        self.extra["ceiling"] = lines
        if rc != 0:
            self.extra["ceiling_error"] = err[-2000:]

    def compare(self, fmt: str, sc: Scenario, sides: list[tuple[str, int, int]],
                restart: dict[str, Callable[[], int]] | None = None) -> None:
        """`popbench run` against each side in turn, round after round (A T B A T B ...):
        what popbench's own `compare` does for two servers, for any number of them.
        `sides` are (label, port, pid); B, ours, comes last. With a warm-up in the
        scenario, the sides in `restart` are started afresh (the callable stops the
        server, starts it and returns its pid) and warmed before each of their runs."""
        key = f"{fmt}/{sc.name}"
        argv = ["run", sc.popbench, "--password", PASSWORD, *sc.args]
        lines: list[dict[str, Any]] = []
        rc, errs = 0, []
        user = kernel = 0.0
        for r in range(self.rounds):
            for label, port, pid in sides:
                if sc.warmup and restart and label in restart:
                    pid = restart[label]()
                    self.popbench(["run", *sc.warmup, "--password", PASSWORD, "--port", str(port)], timeout=300)
                # Only B (ours) is split: Dovecot's work is spread over its short-lived
                # login processes. Ours is idle while the others run: the delta is its runs.
                split0 = cpu_split(pid)
                rc_one, got, err = self.popbench(argv + ["--port", str(port), "--server-pid", str(pid)], timeout=900)
                if label == "B":
                    split1 = cpu_split(pid)
                    user, kernel = user + split1[0] - split0[0], kernel + split1[1] - split0[1]
                rc |= rc_one
                if rc_one != 0:
                    errs.append(f"{PEER_NAMES.get(label, 'qpopper')}: {err[-1000:]}")
                for x in got:
                    x["side"], x["round"] = label, r + 1
                lines += got
                time.sleep(1)
        (self.raw / f"{fmt}-{sc.name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        runs = [x for x in lines if "side" in x]
        data: dict[str, Any] = {"scenario": sc, "argv": argv, "rc": rc, "runs": runs,
                                "errors": [x.get("error_samples") for x in runs if not x.get("ok", True)],
                                "stderr": "\n".join(errs)[-3000:],
                                "ours_user_kernel_s": (user, kernel)}
        self.results[key] = data
        bad = sum(1 for x in runs if not x.get("ok", True))
        log(f"{key}: rc={rc}, {len(runs)} runs, {bad} with errors")

    def bigbox_cold(self, fmt: str, dov: Dovecot) -> None:
        """Dovecot with no index: stop, drop-index, start, one session; `rounds` times."""
        vals = []
        lines_all = []
        for _ in range(max(1, min(self.rounds, 3))):
            dov.stop()
            dov.drop_index()
            pid = dov.start()
            _rc, lines, _err = self.popbench(
                ["run", "bigbox", "--port", str(dov.port), "--server-pid", str(pid), "--password", PASSWORD,
                 "--user-format", "big{i}", "--repeat", "1"], timeout=600)
            lines_all += lines
            for x in lines:
                if x.get("ok") and "ready_s_first" in x:
                    vals.append(x["ready_s_first"])
        (self.raw / f"{fmt}-bigbox-dovecot-cold.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines_all))
        self.extra[f"{fmt}/bigbox_cold"] = vals

    def bigbox_poll(self, fmt: str, dov: Dovecot, ours: Qpopper) -> None:
        """bigbox's poll variant (bench/poll.py): a delivery, then PASS, UIDL, RETR of it, QUIT."""
        from poll import Side, load_module, maildrop_of, poll_compare

        pb = load_module("popbench", self.env.popbench)
        sides = [Side("A", dov.port, dov.pid or 0, maildrop_of(dov.dir, fmt)),
                 Side("B", ours.port, ours.pid, maildrop_of(ours.dir, fmt))]
        try:
            self.extra[f"{fmt}/bigbox_poll"] = poll_compare(pb, fmt, sides, PASSWORD, self.rounds)
        except Exception as exc:  # noqa: BLE001 - report what failed, keep what was measured
            self.skipped.append(f"{fmt}/bigbox poll: {exc}")

    def format(self, fmt: str) -> None:
        if fmt == "mbox" and not self.env.mbox_backend:
            self.skipped.append("mbox: skipped, this server has no mbox backend yet "
                                "(the package src/qpopper/maildrop/mbox/ is missing); rerun when it lands.")
            log(self.skipped[-1])
            return
        work = Path(self.args.work).resolve() / fmt
        if work.exists():
            shutil.rmtree(work)
        dov_dir, our_dir, tw_dir = work / "dovecot", work / "qpopper", work / "twisted"
        selected = [s for s in scenarios(self.args.quick, str(dov_dir / "mail"))
                    if (not self.args.scenarios or s.name in self.args.scenarios)
                    and (fmt == "maildir" or not s.maildir_only)]
        with_twisted = fmt == "maildir" and self.twisted_python is not None
        if not with_twisted:
            selected = [s for s in selected if "A" in s.peers]
        medium = ("medium",) if any("A" not in s.peers for s in selected) else ()
        log(f"{fmt}: generating mail (identical copies, same seed) under {work}")
        gen_mail(self.env, dov_dir / "mail", fmt)
        gen_mail(self.env, our_dir / "mail", fmt, ("retr", "session", "bigbox") + medium)
        if with_twisted:
            gen_mail(self.env, tw_dir / "mail", fmt, ("session",) + medium)
        pb = self.args.port_base
        dov = Dovecot(self.env, dov_dir, fmt, pb, pb + 1)
        tls = self.env.tls
        ours = Qpopper(self.env, our_dir, fmt, pb + 10, self.args.src_dir, pb + 11 if tls else None,
                       dov_dir / "etc" / "cert.pem", dov_dir / "etc" / "key.pem")
        ours.no_syslog = self.args.no_syslog
        ours.workers = self.args.workers
        tw = None
        if with_twisted:
            assert self.twisted_python is not None
            tw = Twisted(self.twisted_python, tw_dir, pb + 20, pb + 21 if tls else None,
                         dov_dir / "etc" / "cert.pem", dov_dir / "etc" / "key.pem")
        try:
            dpid = dov.start()
            qpid = ours.start()
            self.extra["dovecot_version"] = dov.version()
            log(f"{fmt}: Dovecot PID {dpid} on :{dov.port}, qpopper PID {qpid} on :{ours.port}")
            if tw is not None:
                log(f"{fmt}: Twisted PID {tw.start()} on :{tw.port}")
                self.extra["twisted_version"] = tw.version()
            for sc in selected:
                if sc.needs_tls:
                    if not tls:
                        self.skipped.append(f"{fmt}/{sc.name}: skipped, this server has no TLS listener "
                                            "(no --tls-listen option) in the measured revision.")
                        log(self.skipped[-1])
                        continue
                    sides = [("A", dov.tls_port, dov.pid or 0)] if "A" in sc.peers else []
                    if tw is not None and "T" in sc.peers and tw.tls_port:
                        sides.append(("T", tw.tls_port, tw.pid))
                    self.compare(fmt, sc, sides + [("B", pb + 11, ours.pid)])
                    continue
                sampler = MemSampler(ours.pid) if sc.name == "bigbox" else None
                if sc.name == "bigbox":
                    # both warm (Dovecot's index built, page cache filled) before the measured rounds
                    for port, pid in ((dov.port, dov.pid), (ours.port, ours.pid)):
                        self.popbench(["run", "bigbox", "--port", str(port), "--server-pid", str(pid),
                                       "--password", PASSWORD, "--user-format", "big{i}", "--repeat", "1"], 600)
                sides = [("A", dov.port, dov.pid or 0)] if "A" in sc.peers else []
                if tw is not None and "T" in sc.peers:
                    sides.append(("T", tw.port, tw.pid))
                restart: dict[str, Callable[[], int]] = {"B": ours.restart}
                if tw is not None:
                    restart["T"] = tw.restart
                self.compare(fmt, sc, sides + [("B", ours.port, ours.pid)], restart)
                if sampler is not None:
                    self.extra[f"{fmt}/qpopper_bigbox_mem"] = sampler.stop()
                    self.bigbox_cold(fmt, dov)
                    self.bigbox_poll(fmt, dov, ours)
                if ours.proc is not None and ours.proc.poll() is not None:
                    raise RuntimeError(f"qpopper died during {sc.name}; see {ours.log_path}")
        finally:
            ours.stop()
            dov.stop()
            if tw is not None:
                tw.stop()
        if not self.args.keep_mail:
            shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------


def machine_info() -> list[str]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal"):
                    mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return [f"host `{platform.node()}`, {platform.system()} {platform.release()} {platform.machine()}",
            f"CPU: {os.cpu_count()} × {cpu}; memory {mem}"]


def git_rev(args: argparse.Namespace) -> str:
    if not args.worktree:
        return f"`{args.rev_hash[:10]}` (`{args.rev}`, exported from git: uncommitted changes not measured)"
    r = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = run(["git", "-C", str(REPO), "status", "--porcelain", "src"]).stdout.strip()
    return f"working tree on `{r.stdout.strip() or '?'}`" + (" with uncommitted changes in src/" if dirty else "")


def verdict(m: Metric, ratio: float | None, peer: str = "A", values: tuple[float, float] | None = None) -> str:
    """Met or missed; `values` (the peer's median, ours) decide where the peer's is not
    above zero and a ratio means nothing (memory over a baseline can be 0 or below)."""
    target = m.target if peer == "A" else m.twisted_target
    if target is None or (ratio is None and values is None):
        return ""
    op, t = target
    if ratio is None:
        assert values is not None
        theirs, ours = values
        ok = ours >= t * theirs if op == ">=" else ours <= t * theirs
    else:
        ok = ratio >= t if op == ">=" else ratio <= t
    return f"{'met' if ok else '**missed**'} ({op} {t:g})"


def side_values(runs: list[dict[str, Any]], side: str, key: str) -> list[float]:
    return [float(x[key]) for x in runs if x.get("side") == side and x.get(key) is not None]


def ceiling_figure(bench: Bench, scenario: str, concurrency: int, key: str) -> float | None:
    """A figure of the canned server from this run's ceiling measurement."""
    for x in bench.extra.get("ceiling") or []:
        if (x.get("scenario") == scenario and x.get(key) is not None
                and x.get("params", {}).get("concurrency") == concurrency):
            return float(x[key])
    return None


def cost_notes(bench: Bench, name: str, data: dict[str, Any]) -> list[str]:
    """Where our CPU goes, for the sections with a CPU target: the kernel's
    share of it, and the floor a server that only answers from memory sets."""
    runs = data["runs"]
    notes: list[str] = []
    user, kernel = data.get("ours_user_kernel_s") or (0.0, 0.0)
    if name in ("login", "tls-login", "retr-c1", "retr-c8") and user + kernel > 0:
        notes.append(f"\nqpopper's CPU over the comparison, warm-ups included (/proc utime and stime): "
                     f"{user:.1f} s user, {kernel:.1f} s kernel "
                     f"({100 * kernel / (user + kernel):.0f} % in system calls and the network stack).")
    dovecot = side_values(runs, "A", "server_cpu_s_per_gb")
    ours = side_values(runs, "B", "server_cpu_s_per_gb")
    if name.startswith("retr-c") and dovecot and ours:
        floor = ceiling_figure(bench, "retr", int(name[len("retr-c"):]), "server_cpu_s_per_gb")
        sizes = [x["mbytes"] * 1e6 / x["messages"] for x in runs if x.get("side") == "B" and x.get("messages")]
        if floor is not None and sizes:
            bound = 0.5 * statistics.median(dovecot)
            mine = statistics.median(ours)
            per_msg_us = statistics.median(sizes) / 1e3  # µs per message for each s/GB
            notes.append(
                f"\nFloor: popbench's canned server (answers from memory: no file read, no encoding, no session "
                f"state) used {floor:.2f} s/GB at this concurrency in the ceiling run. The CPU target "
                f"(<= {bound:.2f} s/GB, half of Dovecot's) leaves {bound - floor:.2f} s/GB above that floor, "
                f"{(bound - floor) * per_msg_us:.0f} µs per average message ({statistics.median(sizes) / 1e3:.1f} kB); "
                f"qpopper spends {mine - floor:.2f} s/GB above it, {(mine - floor) * per_msg_us:.0f} µs per message "
                f"(reading the file, line ends and dot-stuffing, the command).")
    return notes


def write_report(bench: Bench, args: argparse.Namespace, argv: list[str]) -> Path:
    env = bench.env
    lines: list[str] = []
    w = lines.append
    finished = datetime.datetime.now(datetime.UTC)
    w("# qpopper (Python) vs Dovecot and Twisted: benchmark report\n")
    w(f"Generated by `{' '.join(['bench/run.py'] + argv)}` "
      f"({'quick' if args.quick else 'full'} mode, {bench.rounds} rounds per side, A = Dovecot, T = Twisted, "
      "B = qpopper, alternating A T B A T B).\n")
    w(f"- date: {bench.started:%Y-%m-%d %H:%M} – {finished:%H:%M} UTC")
    for m in machine_info():
        w(f"- {m}")
    w(f"- Python {env.python_version} ({env.python}, {env.python_build}); "
      f"Dovecot {bench.extra.get('dovecot_version', '?')} "
      "(private instance via dovecot.sh, default secure login mode: one pop3-login process per connection)")
    w(f"- qpopper: {git_rev(args)}; run with `--auth-fail-delay 0 --workers {args.workers}`, uvloop if installed")
    w(f"- harness: {env.popbench} (client loop: see `loop` in raw/*.jsonl)")
    if "twisted_version" in bench.extra:
        w(f"- Twisted {bench.extra['twisted_version']} (`twisted.mail.pop3` with a cred Portal, a cached "
          "FilePasswordDB of plain-text passwords and a realm of `MaildirMailbox`es: bench/twisted_pop3.py; its "
          "default reactor; no log observer, so no records) on its own copy of the Maildirs: login, TLS login "
          "and idle, on the small maildrops (l1..l1000, 10 messages) and on medium ones "
          f"(m1..m{MEDIUM_USERS}, 200 messages of 2 kB: sections `*-200`)")
    for n in env.notes + bench.skipped:
        w(f"- note: {n}")
    w("")
    w("Ratio = qpopper / the peer named. Spread = half the min–max range over the runs, as % of the median. "
      "Targets are issue 4's (Dovecot) and issue 24's (Twisted), expressed on that ratio. "
      "Raw JSON of every run: `raw/`.\n")
    ceil = bench.extra.get("ceiling") or []
    if ceil:
        parts = []
        for x in ceil:
            if x.get("scenario") in ("login", "tls-login"):
                parts.append(f"{x['scenario']} {fmt_num(x.get('sessions_per_s'))} sessions/s")
            elif x.get("scenario") == "retr":
                parts.append(f"retr -c {x['params']['concurrency']} {fmt_num(x.get('mb_per_s'))} MB/s")
        w("Harness ceiling (popbench's canned in-process server, same machine, same run): " + ", ".join(parts) + ".\n")

    chart_points: list[tuple[str, float]] = []
    for key, data in bench.results.items():
        fmt, name = key.split("/")
        sc: Scenario = data["scenario"]
        runs = data["runs"]
        w(f"## {fmt} — {name}\n")
        w(f"`popbench.py {' '.join(data['argv'][:2])} … {' '.join(sc.args)}`\n")
        if data["rc"] != 0 or data["errors"]:
            samples = [s for e in data["errors"] if e for s in e][:3]
            w(f"**Errors** (exit status {data['rc']}): {samples or data['stderr'][-500:]}\n")
        if not runs:
            w("No runs completed.\n")
            continue
        peers = [x for x in PEER_NAMES if any(r.get("side") == x for r in runs)]
        names = [PEER_NAMES[x] for x in peers]
        w("| metric | " + "".join(f"{n} median (spread) | " for n in names) + "qpopper median (spread) | "
          + "".join(f" ratio to {n} | target |" for n in names))
        w("|---|" + "---|" * (3 * len(peers) + 1))
        for m in sc.metrics:
            b = side_values(runs, "B", m.key)
            refs = [side_values(runs, x, m.key) for x in peers]
            if not b or not all(refs):
                continue
            sb = summarise(b)
            cells, verdicts = [], []
            for peer, values in zip(peers, refs, strict=True):
                sa = summarise(values)
                ratio = sb["median"] / sa["median"] if sa["median"] > 0 else None
                cells.append(f"{fmt_num(sa['median'])} (±{sa['spread_pct']:.0f}%) | ")
                verdicts.append(f" {fmt_num(ratio)} | {verdict(m, ratio, peer, (sa['median'], sb['median']))} |")
                if m.chart and ratio:
                    adv = ratio if m.higher_is_better else 1 / ratio
                    chart_points.append((f"{fmt} {name}\n{m.label}" + (" (vs Twisted)" if peer == "T" else ""), adv))
            w(f"| {m.label} | {''.join(cells)}{fmt_num(sb['median'])} (±{sb['spread_pct']:.0f}%) | {''.join(verdicts)}")
        for note in cost_notes(bench, name, data):
            w(note)
        if name == "bigbox":
            cold = bench.extra.get(f"{fmt}/bigbox_cold") or []
            ours = side_values(runs, "B", "ready_s_median")
            if cold and ours:
                sc_ = summarise(cold)
                ratio = statistics.median(ours) / sc_["median"]
                w(f"| PASS to STAT answered, s — Dovecot **cold** (index dropped, restarted) | "
                  f"{fmt_num(sc_['median'])} (±{sc_['spread_pct']:.0f}%, n={len(cold)}) | "
                  f"{fmt_num(statistics.median(ours))} | {fmt_num(ratio)} | "
                  f"{verdict(Metric('x', '', False, ('<=', 0.2)), ratio)} |")
                chart_points.append((f"{fmt} bigbox\nvs Dovecot cold", 1 / ratio))
            poll = bench.extra.get(f"{fmt}/bigbox_poll")
            for key, label in (("pass_s", "poll: PASS s"), ("uidl_s", "poll: UIDL s"), ("session_s", "poll: session s"),
                               ("server_cpu_s_per_poll", "poll: server CPU s per poll")):
                if poll:
                    a, b = poll["A"][key], poll["B"][key]
                    target = verdict(Metric(key, "", False, ("<=", 1.0)), b / a if a else None) \
                        if key == "server_cpu_s_per_poll" else ""
                    w(f"| {label} (a delivery, then PASS, UIDL, RETR of it, QUIT; {poll['B']['polls']} polls) | "
                      f"{fmt_num(a)} | {fmt_num(b)} | {fmt_num(b / a if a else None)} | {target} |")
            mem = bench.extra.get(f"{fmt}/qpopper_bigbox_mem")
            if mem:
                b, pk = mem["before"], mem["peak"]
                w(
                    f"\nqpopper's memory during the bigbox runs (all its processes; 50,000 messages, ~210 MB of mail), "
                    f"sampled every 20 ms: anonymous RSS {b.get('RssAnon', 0) / 1024:.0f} MB "
                    "before the first bigbox session, "
                    f"peak {pk['RssAnon'] / 1024:.0f} MB; file-backed RSS (mmap'd/page-cache pages, "
                    f"not private memory) peak {pk['RssFile'] / 1024:.0f} MB."
                )
        w("")
    if chart_points and env.matplotlib and not args.no_chart:
        png = bench.out / "ratios.png"
        chart(chart_points, png)
        w("## Chart\n")
        w("![qpopper advantage over Dovecot per metric](ratios.png)\n")
        w("Bars: how many times better qpopper is than Dovecot on each headline metric "
          "(ratio for higher-is-better metrics, inverse ratio for costs and times); "
          "log scale, 1 = parity, left of 1 = Dovecot better.\n")
    report = bench.out / args.report_name
    report.write_text("\n".join(lines) + "\n")
    return report


def chart(points: list[tuple[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [p[0] for p in points]
    vals = [p[1] for p in points]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(points) + 1.5))
    colors = ["#2a9d8f" if v >= 1 else "#e76f51" for v in vals]
    ax.barh(range(len(vals)), vals, color=colors)
    ax.set_xscale("log")
    ax.axvline(1, color="black", lw=1)
    ax.set_yticks(range(len(vals)), [lab.replace("\n", " — ") for lab in labels], fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.2g}×", va="center", fontsize=8)
    ax.set_xlabel("times better than Dovecot (log scale; >1 = qpopper better)")
    ax.set_title("qpopper (Python) vs Dovecot 2.3, same machine, same run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------


def export_source(args: argparse.Namespace) -> Path:
    """The src/ directory to put on PYTHONPATH: the working tree, or a clean export of --rev."""
    if args.worktree:
        compile_sources(args.python, REPO / "src")
        return REPO / "src"
    r = run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{args.rev}^{{commit}}"])
    if r.returncode != 0:
        raise SystemExit(f"bench/run.py: unknown git revision {args.rev!r}")
    args.rev_hash = r.stdout.strip()
    dest = Path(args.work).resolve() / f"src-{args.rev_hash[:12]}"
    if not (dest / "src" / "qpopper").is_dir():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", args.rev_hash, "src"], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    # Byte-compiled as pip installs it: a server that compiles its modules at
    # every start (PYTHONDONTWRITEBYTECODE, no __pycache__) carries ~2 MB more
    # heap from the compiler for as long as it runs.
    compile_sources(args.python, dest / "src")
    return dest / "src"


def compile_sources(python: str, src: Path) -> None:
    subprocess.run([python, "-m", "compileall", "-q", str(src)], check=True, stdout=subprocess.DEVNULL)


def other_servers() -> list[str]:
    """Running qpopper servers that are not this benchmark's (left by a test
    or by hand), as "PID command" strings."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"qpopper" in argv and b"-m" in argv:
            found.append(f"{entry} {b' '.join(argv).decode(errors='replace')[:120]}")
    return found


def default_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 rounds of 3 s (development); default 5 rounds of 10 s")
    p.add_argument("--rounds", type=int, help="rounds per side (overrides the mode's default)")
    p.add_argument("--formats", default="maildir,mbox", help="comma list of maildir, mbox")
    p.add_argument("--scenarios", help="comma list of login,tls-login,login-200,tls-login-200,retr-c1,retr-c8,idle,"
                                       "idle-200,bigbox (default all; the -200 ones only on Maildir, with Twisted), "
                                       "userdb (issue 19's pairings, bench/userdb_login.py: only when named)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="results directory")
    p.add_argument("--report-name", default="REPORT.md")
    p.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "qpopper-bench"),
                   help="scratch directory for generated mail and server state (~1 GB)")
    p.add_argument("--keep-mail", action="store_true", help="keep the generated mail and logs under --work")
    p.add_argument(
        "--shared-bench",
        default=os.environ.get("QPOPPER_BENCH_SHARED", str(REPO.parent / "shared" / "bench")),
        help="directory of popbench.py and dovecot.sh (env QPOPPER_BENCH_SHARED; default ../shared/bench)",
    )
    p.add_argument("--python", default=default_python(), help="interpreter for qpopper and popbench (default .venv)")
    p.add_argument("--port-base", type=int, default=11210,
                   help="Dovecot on BASE (TLS BASE+1), qpopper on BASE+10 (TLS BASE+11), Twisted on BASE+20 "
                        "(TLS BASE+21), ceiling on BASE+90/91")
    p.add_argument("--rev", default="HEAD", help="git revision of src/ to measure (exported to --work; default HEAD)")
    p.add_argument("--worktree", action="store_true", help="measure the working tree's src/ instead of --rev")
    p.add_argument("--no-ceiling", action="store_true", help="skip the harness-ceiling run")
    p.add_argument("--no-chart", action="store_true", help="no PNG (matplotlib not needed)")
    p.add_argument("--twisted-venv", help="virtualenv with Twisted for the Python peer (made there if it has none; "
                                          "default WORK/twisted-venv)")
    p.add_argument("--no-twisted", action="store_true", help="leave out the Twisted peer")
    p.add_argument("--workers", type=int, default=1,
                   help="qpopper's --workers (default 1, its default: the smallest in memory)")
    args = p.parse_args(argv)
    args.twisted_venv = args.twisted_venv or os.path.join(args.work, "twisted-venv")
    if args.scenarios:
        args.scenarios = set(args.scenarios.split(","))
    args.src_dir = export_source(args)
    env = check_prerequisites(args)
    for port in (args.port_base, args.port_base + 1, args.port_base + 10, args.port_base + 11,
                 args.port_base + 20, args.port_base + 21, args.port_base + 90, args.port_base + 91):
        if not port_free(port):
            print(f"bench/run.py: port {port} is in use (choose --port-base)", file=sys.stderr)
            return 2
    strays = other_servers()
    if strays:
        # They map the same interpreter and libraries, so they take a share
        # of those pages: qpopper's PSS (the idle target) would read too low.
        env.notes.append("other qpopper processes were running (PSS figures read low): " + "; ".join(strays))
        log("warning: " + env.notes[-1])
    bench = Bench(args, env)
    log(f"results -> {bench.out}; {bench.rounds} rounds per side; python {env.python}")
    if args.scenarios and "userdb" in args.scenarios:  # issue 19: real hashes, SQL and LDAP (its own report)
        import userdb_login

        userdb_login.main((["--quick"] if args.quick else []) + [
            "--out", str(bench.out), "--src", str(args.src_dir), "--python", env.python,
            "--shared-bench", args.shared_bench, *(["--rounds", str(args.rounds)] if args.rounds else [])])
        args.scenarios.discard("userdb")
        if not args.scenarios:
            return 0  # REPORT.md is left as it was
    if not args.no_ceiling:
        bench.ceiling()
    for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
        try:
            bench.format(fmt)
        except Exception as exc:  # noqa: BLE001 - report what failed, keep what was measured
            bench.skipped.append(f"{fmt}: aborted: {exc}")
            log(bench.skipped[-1])
    report = write_report(bench, args, argv)
    log(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
