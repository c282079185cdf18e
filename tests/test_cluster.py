"""Three hosts behind HAProxy on shared storage, and nothing lost.

Five network namespaces made here and removed at the end (even when the
test fails): `lb` holds a bridge, HAProxy (sending PROXY v2) and Redis;
`h1`, `h2`, `h3` each run one qpopper daemon; `cl` holds the clients, with
addresses of their own. Every address is in 198.18.0.0/24 (RFC 2544's
benchmarking range), and only inside these namespaces. The hosts share one
directory for the mail (Maildir and mbox users) and the passwd-file, as
hosts on shared storage would; the clients run in threads of this process
that entered the `cl` namespace (setns), the MDA in another thread.

While an MDA delivers all along, many users' sessions go through the
balancer; one user logs in through two hosts at once (exactly one gets the
maildrop); one host is killed with -9 in the middle of an mbox UPDATE and
started again; a brute force from one address meets a delay that follows
it from host to host (Redis); every host logs the clients' addresses, never
the balancer's (HAProxy's health checks, PROXY LOCAL connections, log
nothing at info). At the end every message is accounted for: in its
maildrop, or deleted by a session that was told so, or (only for sessions
cut by the kill) deleted by an UPDATE that finished as its host died; none
twice, none in another user's maildrop, none altered. And every host's
metrics endpoint is scraped: its counters are what the clients saw that
host process do (the greeting names the host and the process), so their
sum is what the clients did, but for the process the kill took with it.

Bounded: a fixed number of sessions and messages, every wait with a deadline.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import hashlib
import itertools
import os
import poplib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pg_helpers import PostgresServer, pg_bin
from qpopper.maildrop.delivery import deliver

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
IP = shutil.which("ip") or "/usr/sbin/ip"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if not sys.platform.startswith("linux"):
        return "needs Linux network namespaces"
    for program, package in ((IP, "iproute2"), (HAPROXY, "haproxy"), (REDIS, "redis-server"),
                             (REDIS_CLI, "redis-tools")):
        if not os.path.exists(program):
            return f"{program} is missing (Debian package {package})"
    probe = f"qpc-probe-{os.getpid()}"
    made = subprocess.run([IP, "netns", "add", probe], capture_output=True)
    if made.returncode != 0:
        return f"`ip netns` does not work here: {made.stderr.decode().strip()}"
    subprocess.run([IP, "netns", "del", probe], capture_output=True)
    return None


WHY_NOT = _why_not()
pytestmark = [pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or ""), pytest.mark.timeout(420)]

PASSWORD = "cluster-secret"
NET = "198.18.0"
LB = f"{NET}.1"
HOSTS = {"h1": f"{NET}.11", "h2": f"{NET}.12", "h3": f"{NET}.13"}
CLIENTS = [f"{NET}.{101 + i}" for i in range(8)]
BRUTE = f"{NET}.120"  # the brute force's own address
PINNED = {"h1": 1101, "h2": 1102, "h3": 1103}  # frontends that reach one host only
METRICS_PORT = 9110
GREETING = re.compile(rb"<(\d+)\.\d+@(h\d)\.cluster\.test>")  # the APOP timestamp: pid and host
MAILDIR_USERS = [f"m{i:02d}" for i in range(10)]
MBOX_USERS = [f"b{i:02d}" for i in range(5)]
USERS = MAILDIR_USERS + MBOX_USERS
TWICE = "twice"  # logs in through two hosts at once
BIG = "big"  # the mbox whose UPDATE the kill interrupts
BIG_COUNT = 3000
SESSIONS = 1500  # at most; they run from the start until the killed host served again
MDA_MESSAGES = 240
FAIL_DELAY = 0.1
CLONE_NEWNET = 0x40000000
# Kills a pid with -9 as soon as a path exists (within 120 s): argv[1], argv[2].
KILLER = """
import os, signal, sys, time
path, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 120
while not os.path.exists(path):
    if time.monotonic() > deadline:
        sys.exit("not seen")
    time.sleep(0.0002)
os.kill(pid, signal.SIGKILL)
print("killed")
"""


# ---- namespaces -------------------------------------------------------------------


def run(*args: str) -> None:
    out = subprocess.run(args, capture_output=True, timeout=30)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {out.stderr.decode().strip()}")


class Network:
    """The namespaces, the bridge in `lb` and a veth pair per other namespace."""

    def __init__(self) -> None:
        tag = f"qpc{os.getpid() % 100000}"
        self.names = {role: f"{tag}-{role}" for role in ("lb", "h1", "h2", "h3", "cl")}
        self.made: list[str] = []

    def build(self) -> None:
        for name in self.names.values():
            run(IP, "netns", "add", name)
            self.made.append(name)
            run(IP, "-n", name, "link", "set", "lo", "up")
        lb = self.names["lb"]
        run(IP, "-n", lb, "link", "add", "br0", "type", "bridge")
        run(IP, "-n", lb, "link", "set", "br0", "up")
        run(IP, "-n", lb, "addr", "add", f"{LB}/24", "dev", "br0")
        addresses = {**{role: [addr] for role, addr in HOSTS.items()}, "cl": [*CLIENTS, BRUTE]}
        for role, addrs in addresses.items():
            name = self.names[role]
            run(IP, "-n", lb, "link", "add", f"v{role}", "type", "veth", "peer", "name", "eth0", "netns", name)
            run(IP, "-n", lb, "link", "set", f"v{role}", "master", "br0", "up")
            for addr in addrs:
                run(IP, "-n", name, "addr", "add", f"{addr}/24", "dev", "eth0")
            run(IP, "-n", name, "link", "set", "eth0", "up")

    def remove(self) -> None:
        """Every namespace made; their veths, bridge and addresses go with them."""
        for name in reversed(self.made):
            subprocess.run([IP, "netns", "del", name], capture_output=True, timeout=30)
        self.made.clear()

    def leftovers(self) -> list[str]:
        out = subprocess.run([IP, "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        return [name for name in self.names.values() if re.search(rf"^{re.escape(name)}\b", out, re.M)]

    def popen(self, role: str, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            return subprocess.Popen([IP, "netns", "exec", self.names[role], *args], stdout=out,
                                    stderr=subprocess.STDOUT)

    def enter(self, role: str) -> None:
        """Move the calling thread (only it) into a namespace."""
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.names[role]}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)


def wait_port(net: Network, role: str, host: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        probe = subprocess.run([IP, "netns", "exec", net.names[role], sys.executable, "-c",
                                f"import socket; socket.create_connection(({host!r}, {port}), 2).close()"],
                               capture_output=True, timeout=30)
        if probe.returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {host}:{port}: " + log.read_text(errors="replace")[-3000:])


# ---- the mail -----------------------------------------------------------------------


@dataclass
class Ledger:
    """What was delivered, deleted and cut short, by Message-ID."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    delivered: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (user, sha of the body)
    deleted: set[str] = field(default_factory=set)  # in sessions whose QUIT got +OK
    uncertain: set[str] = field(default_factory=set)  # marked in sessions cut before +OK
    sessions: int = 0
    in_use: int = 0
    cut: int = 0  # sessions whose host went away under them (the kill)
    errors: list[str] = field(default_factory=list)
    trail: list[str] = field(default_factory=list)  # what each session saw and did, for a failure's message
    # What the clients saw each server process do, by (host, pid) from its greeting:
    # logins ok and failed, messages retrieved, deleted at an answered QUIT, connections.
    served: dict[tuple[str, int], collections.Counter[str]] = field(default_factory=dict)

    def count(self, server: tuple[str, int], **what: int) -> None:
        with self.lock:
            self.served.setdefault(server, collections.Counter()).update(what)


def message(user: str, serial: int) -> tuple[str, bytes]:
    msgid = f"<{serial}.{user}@cluster.test>"
    body = f"message {serial} for {user}\n" + "".join(f"line {i} {random.random()}\n" for i in range(20))
    text = f"From: mda@cluster.test\nTo: {user}@cluster.test\nMessage-ID: {msgid}\nX-User: {user}\n\n{body}"
    return msgid, text.encode()


def body_sha(raw: bytes) -> str:
    return hashlib.sha256(raw.split(b"\n\n", 1)[1]).hexdigest()


def location(root: Path, user: str) -> str:
    if user in MBOX_USERS or user == BIG:
        return f"mbox:{root}/spool/{user}"
    return f"maildir:{root}/maildirs/{user}"


def deliver_one(root: Path, ledger: Ledger, user: str, serial: int) -> None:
    msgid, raw = message(user, serial)
    with ledger.lock:  # written down first: a session may fetch it the moment it is in
        ledger.delivered[msgid] = (user, body_sha(raw))
    deliver(location(root, user), raw)
    with ledger.lock:
        ledger.trail.append(f"{time.time():.3f} delivered {msgid}")


def parse(lines: list[bytes]) -> tuple[str, str, str]:
    """(Message-ID, X-User, body sha) of a retrieved message."""
    raw = b"\n".join(line[1:] if line.startswith(b"..") else line for line in lines) + b"\n"
    head = raw.split(b"\n\n", 1)[0].decode()
    msgid = re.search(r"^Message-ID: (\S+)$", head, re.M)
    owner = re.search(r"^X-User: (\S+)$", head, re.M)
    return (msgid.group(1) if msgid else "?", owner.group(1) if owner else "?", body_sha(raw))


# ---- clients --------------------------------------------------------------------------


class SourcedPOP3(poplib.POP3):
    """poplib from a given source address; `server`: the (host, pid) that greeted it."""

    def __init__(self, host: str, port: int, source: str) -> None:
        self._source = source
        try:
            super().__init__(host, port, timeout=60)
        except BaseException:  # no greeting (the host died): poplib would leave the socket open
            if getattr(self, "sock", None) is not None:
                self.close()
            raise
        found = GREETING.search(self.welcome)
        assert found, self.welcome
        self.server = (found.group(2).decode(), int(found.group(1)))

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))


def cut_short(ledger: Ledger, what: str, exc: BaseException) -> None:
    """A session that ended early: the kill's doing (the connection went), or an error."""
    lost = isinstance(exc, (OSError, EOFError)) or (
        isinstance(exc, poplib.error_proto) and exc.args[0] in ("-ERR EOF", b"-ERR EOF")
    )
    with ledger.lock:
        if lost:
            ledger.cut += 1
        else:
            ledger.errors.append(f"{what}: {exc}")


def one_session(user: str, source: str, ledger: Ledger, port: int = 110, delete: bool = True) -> list[str]:
    """Log in, check and fetch every message, delete them, QUIT; the ids seen."""
    marked: list[str] = []
    seen: list[str] = []
    try:
        client = SourcedPOP3(LB, port, source)
    except (OSError, EOFError, poplib.error_proto) as exc:
        cut_short(ledger, f"{user} connect", exc)
        return seen
    ledger.count(client.server, connections=1)
    try:
        client.user(user)
        client.pass_(PASSWORD)
        ledger.count(client.server, logins_ok=1)
    except (OSError, EOFError, poplib.error_proto) as exc:
        if isinstance(exc, poplib.error_proto) and "IN-USE" in str(exc.args[0]):
            ledger.count(client.server, logins_ok=1)  # the password was right: the maildrop was taken
            with ledger.lock:
                ledger.in_use += 1
        else:
            cut_short(ledger, f"{user} login", exc)
        client.close()
        return seen
    try:
        count = client.stat()[0]
        for n in range(1, count + 1):
            msgid, owner, sha = parse(client.retr(n)[1])
            ledger.count(client.server, retrieved=1)
            seen.append(msgid)
            with ledger.lock:
                known = ledger.delivered.get(msgid)
            if known != (user, sha) or owner != user:
                ledger.errors.append(f"{user} got {msgid} owned by {owner}, delivered as {known}")
            if delete:
                client.dele(n)
                marked.append(msgid)
        client.quit()
        ledger.count(client.server, deleted=len(marked))
    except (OSError, EOFError, poplib.error_proto) as exc:
        with ledger.lock:
            ledger.uncertain.update(marked)
        cut_short(ledger, f"{user} session", exc)
        client.close()
        return seen
    with ledger.lock:
        ledger.deleted.update(marked)
        ledger.sessions += 1
        ledger.trail.append(f"{time.time():.3f} {user} via {port} from {source}: saw {seen} deleted {marked}")
    return seen


# ---- the cluster -------------------------------------------------------------------------


class Cluster:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.net = Network()
        self.shared = base / "shared"
        self.logs = base / "logs"
        self.hosts: dict[str, subprocess.Popen[bytes]] = {}
        self.others: list[subprocess.Popen[bytes]] = []
        # Users in PostgreSQL (over its Unix socket, which every namespace sees);
        # a passwd-file on the shared storage where PostgreSQL is not installed.
        self.pg: PostgresServer | None = None
        self.user_args: list[str] = []

    def prepare(self) -> None:
        (self.shared / "maildirs").mkdir(parents=True)
        (self.shared / "spool").mkdir()
        self.logs.mkdir()
        users = [*USERS, TWICE, BIG]
        if pg_bin() is None:
            lines = [f"{user}:{{PLAIN}}{PASSWORD}::::::userdb_mail={location(self.shared, user)}" for user in users]
            (self.shared / "users").write_text("\n".join(lines) + "\n")
            self.user_args = [f"--passwd-file={self.shared}/users", "--auth-backend=passwd-file"]
            return
        self.pg = PostgresServer()
        self.pg.start()
        self.pg.execute("CREATE TABLE users (userid TEXT PRIMARY KEY, password TEXT, mail TEXT)")
        for user in users:
            self.pg.execute("INSERT INTO users VALUES (%s, %s, %s)", (user, f"{{PLAIN}}{PASSWORD}",
                                                                      location(self.shared, user)))
        self.pg.create_role("qpopper", "pg-connect-secret")
        args = self.base / "sql.conf"
        args.write_text(
            "driver = pgsql\n"
            f"connect = {self.pg.dsn('qpopper', 'pg-connect-secret')}\n"
            "password_query = SELECT userid AS user, password FROM users WHERE userid = '%u'\n"
            "user_query = SELECT mail FROM users WHERE userid = '%u'\n"
        )
        self.user_args = ["--auth-backend=sql", f"--auth-backend-args={args}"]

    def start_lb(self) -> None:
        redis_log = self.logs / "redis.log"
        redis = self.net.popen("lb", [REDIS, "--bind", LB, "--port", "6379", "--save", "", "--appendonly", "no",
                                      "--protected-mode", "no", "--dir", str(self.base)], redis_log)
        self.others.append(redis)
        # Health checks (PROXY LOCAL headers) on the pool: quiet in the hosts' logs.
        servers = "\n".join(f"    server {h} {addr}:110 send-proxy-v2 check check-send-proxy inter 1s fall 2 rise 1"
                             for h, addr in HOSTS.items())
        pinned = "".join(
            f"frontend pin_{h}\n    bind {LB}:{port}\n    default_backend only_{h}\n"
            f"backend only_{h}\n    server {h} {HOSTS[h]}:110 send-proxy-v2\n"
            for h, port in PINNED.items()
        )
        config = self.base / "haproxy.cfg"
        config.write_text(f"""global
    maxconn 1000
defaults
    mode tcp
    timeout connect 3s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch 1
frontend pop3
    bind {LB}:110
    default_backend pool
backend pool
    balance roundrobin
{servers}
{pinned}""")
        haproxy_log = self.logs / "haproxy.log"
        haproxy = self.net.popen("lb", [HAPROXY, "-db", "-f", str(config)], haproxy_log)
        self.others.append(haproxy)
        wait_port(self.net, "lb", LB, 6379, redis, redis_log)
        wait_port(self.net, "lb", LB, 110, haproxy, haproxy_log)

    def host_command(self, host: str) -> list[str]:
        return [sys.executable, "-m", "qpopper", "--syslog-socket=", "--nonauth-file=",
                *self.user_args, f"--hostname={host}.cluster.test",
                f"--haproxy-listen={HOSTS[host]}:110", f"--haproxy-trusted-networks={LB}/32",
                # Redis's answers are what this test checks: a loaded machine must not time them out.
                f"--redis-url=redis://{LB}:6379/0", "--redis-timeout=3",
                f"--auth-fail-delay={FAIL_DELAY}", "--auth-fail-delay-max=5", "--clear-text-password=always",
                "-R", "--shared-storage",
                f"--metrics-listen={HOSTS[host]}:{METRICS_PORT}", f"--metrics-dir={self.base}/metrics-{host}"]

    def start_host(self, host: str) -> None:
        log = self.logs / f"{host}.log"
        proc = self.net.popen(host, self.host_command(host), log)
        self.hosts[host] = proc
        wait_port(self.net, host, HOSTS[host], 110, proc, log)

    def metrics(self, host: str) -> dict[str, float]:
        """The host's counters (summed over their labels but `result`'s), scraped
        over the network; call from a thread in the clients' namespace."""
        url = f"http://{HOSTS[host]}:{METRICS_PORT}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                result = sample.labels.get("result")
                name = f"{sample.name}:{result}" if result else sample.name
                out[name] = out.get(name, 0.0) + sample.value
        return out

    def wait_pool_up(self) -> None:
        """Until HAProxy's health checks have every pool server up (checks that
        ran before a host listened marked it down)."""
        deadline = time.monotonic() + 30
        while True:
            text = (self.logs / "haproxy.log").read_text(errors="replace")
            states = dict(re.findall(r"Server pool/(h\d) is (UP|DOWN)", text))
            if all(states.get(host, "UP") == "UP" for host in HOSTS):
                return
            assert time.monotonic() < deadline, text[-3000:]
            time.sleep(0.1)

    def log_of(self, host: str) -> str:
        return (self.logs / f"{host}.log").read_text(errors="replace")

    def redis(self, *args: str) -> str:
        out = subprocess.run([IP, "netns", "exec", self.net.names["lb"], REDIS_CLI, "-h", LB, *args],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip()

    def stop(self) -> None:
        for proc in [*self.hosts.values(), *self.others]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.hosts.values(), *self.others]:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self.pg is not None:
            self.pg.stop(remove=True)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    built = Cluster(tmp_path)
    try:
        built.prepare()
        built.net.build()
        built.start_lb()
        for host in HOSTS:
            built.start_host(host)
        built.wait_pool_up()
        yield built
    finally:
        built.stop()
        built.net.remove()
        assert built.net.leftovers() == [], "network namespaces left behind"


def in_clients(net: Network) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=6, initializer=net.enter, initargs=("cl",))


def test_three_hosts_lose_nothing(cluster: Cluster) -> None:
    rng = random.Random(20)  # the MDA's choices; each session's user comes from its number
    ledger = Ledger()
    root = cluster.shared
    serial = iter(range(1, 10**9))
    for user in [*USERS, TWICE]:
        for _ in range(3):
            deliver_one(root, ledger, user, next(serial))
    before = set(ledger.delivered)
    for _ in range(BIG_COUNT):
        deliver_one(root, ledger, BIG, next(serial))
    big_ids = set(ledger.delivered) - before

    # The MDA delivers all along, to every user but the big one.
    stop_mda = threading.Event()

    def mda() -> None:
        for _ in range(MDA_MESSAGES):
            if stop_mda.wait(0.02):
                return
            deliver_one(root, ledger, rng.choice(USERS), next(serial))

    mda_thread = threading.Thread(target=mda, name="mda")
    mda_thread.start()
    try:
        with in_clients(cluster.net) as pool, in_clients(cluster.net) as special:
            # Many users' sessions through the balancer, from the clients' own
            # addresses, all along: before, during and after the kill.
            stop_sessions = threading.Event()
            numbers = itertools.count()

            def numbered_session(n: int) -> None:
                one_session(random.Random(n).choice(USERS), CLIENTS[n % len(CLIENTS)], ledger)

            def sessions() -> None:
                while not stop_sessions.wait(0.02) and (n := next(numbers)) < SESSIONS:
                    numbered_session(n)

            futures = [pool.submit(sessions) for _ in range(6)]

            # Meanwhile: two logins of one user through two hosts: exactly one gets the maildrop.
            def twice() -> tuple[bytes, bytes]:
                first = SourcedPOP3(LB, PINNED["h1"], CLIENTS[0])
                first.user(TWICE)
                first.pass_(PASSWORD)
                second = SourcedPOP3(LB, PINNED["h2"], CLIENTS[1])
                second.user(TWICE)
                try:
                    refused = second.pass_(PASSWORD)
                except poplib.error_proto as exc:
                    refused = exc.args[0]
                second.close()
                first.quit()
                for client in (first, second):
                    ledger.count(client.server, connections=1, logins_ok=1)
                return first.welcome, refused

            _, refused = special.submit(twice).result(timeout=120)
            assert b"[IN-USE]" in refused

            # A brute force from one address: each host it lands on waits longer (Redis).
            # Its tries go to h1, h2, h3, h1 through the pinned frontends: round robin
            # amid the other clients' sessions put all four on one host once in a while.
            def brute() -> list[float]:
                took = []
                for host in ["h1", "h2", "h3", "h1"]:
                    client = SourcedPOP3(LB, PINNED[host], BRUTE)
                    client.user(USERS[0])
                    began = time.monotonic()
                    with contextlib.suppress(poplib.error_proto):
                        client.pass_("wrong")
                    took.append(time.monotonic() - began)
                    client.quit()
                    ledger.count(client.server, connections=1, failed=1)
                return took

            took = special.submit(brute).result(timeout=120)

            # Kill -9 a host in the middle of an mbox UPDATE, then start it again.
            def start_big_update() -> tuple[SourcedPOP3, list[str]]:
                client = SourcedPOP3(LB, PINNED["h3"], CLIENTS[2])
                client.user(BIG)
                client.pass_(PASSWORD)
                ledger.count(client.server, connections=1, logins_ok=1)  # the process the kill takes
                assert client.stat()[0] == BIG_COUNT
                ids = []
                for n in range(1, BIG_COUNT + 1, 2):
                    head = client.top(n, 0)[1]
                    ids.append(next(line.split(b" ", 1)[1].decode() for line in head
                                    if line.startswith(b"Message-ID:")))
                    client.dele(n)
                assert client.sock is not None
                client.sock.sendall(b"QUIT\r\n")  # no waiting for the answer: the host dies first
                return client, ids

            # The kill comes from a process of its own that watches for the new
            # spool: a thread here, among the clients' threads, could wake too late
            # and find the UPDATE (a few hundred ms) over.
            new_spool = root / "spool" / f".{BIG}.qpopper-new"
            killed = cluster.hosts["h3"].pid
            killer = subprocess.Popen([sys.executable, "-c", KILLER, str(new_spool), str(killed)],
                                      stdout=subprocess.PIPE, text=True)
            try:
                big_client, big_deleted = special.submit(start_big_update).result(timeout=120)
                under_way = killer.communicate(timeout=150)[0].strip() == "killed"
            finally:
                if killer.poll() is None:
                    killer.kill()
                    killer.wait(10)
            ledger.trail.append(f"{time.time():.3f} killed h3")
            if cluster.hosts["h3"].poll() is None:
                cluster.hosts["h3"].send_signal(signal.SIGKILL)
            cluster.hosts["h3"].wait(10)
            big_client.close()
            assert under_way, "the UPDATE was not seen under way"
            served_before = cluster.log_of("h3").count("logged in")
            cluster.start_host("h3")

            # Sessions through the balancer until h3 served again: the ones
            # above may have used up their number by now on a loaded machine.
            def until_h3_served() -> None:
                deadline = time.monotonic() + 60
                while cluster.log_of("h3").count("logged in") < served_before + 5 and time.monotonic() < deadline:
                    numbered_session(next(numbers))
                    time.sleep(0.05)

            special.submit(until_h3_served).result(timeout=120)
            assert cluster.log_of("h3").count("logged in") >= served_before + 5, "h3 did not serve again"
            stop_sessions.set()
            for future in futures:
                future.result(timeout=300)
            stop_mda.set()
            mda_thread.join(60)

            # The big mbox is the old one or the new one, whole.
            big_now = pool.submit(one_session, BIG, CLIENTS[3], ledger, PINNED["h3"], False).result(timeout=120)
            assert len(big_now) == len(set(big_now))
            assert set(big_now) in (big_ids, big_ids - set(big_deleted))
            ledger.uncertain.update(big_deleted)  # its QUIT was never answered

            # What is left, read through the balancer without deleting.
            remaining: dict[str, list[str]] = {BIG: big_now}
            for user in [*USERS, TWICE]:
                remaining[user] = pool.submit(one_session, user, CLIENTS[4], ledger, 110, False).result(timeout=120)

            # Every host's metrics, scraped from the clients' namespace once they
            # are published (about once a second), against what its clients saw.
            running = {(host, proc.pid): host for host, proc in cluster.hosts.items()}
            assert set(ledger.served) <= {*running, ("h3", killed)}, (sorted(ledger.served), running, killed)
            scraped = {server: pool.submit(settled_metrics, cluster, host, ledger.served.get(server))
                       .result(timeout=120) for server, host in running.items()}
    finally:
        stop_mda.set()
        mda_thread.join(60)

    summary = (f"sessions={ledger.sessions} cut={ledger.cut} in_use={ledger.in_use} "
               f"uncertain={len(ledger.uncertain)} delivered={len(ledger.delivered)} deleted={len(ledger.deleted)}")
    assert not ledger.errors, ledger.errors[:10]
    assert ledger.sessions > len(USERS) * 3, summary
    # Every message accounted for: left in its own maildrop (once), or deleted
    # by a session that was told so, or by an UPDATE its host finished as it died.
    left = [msgid for ids in remaining.values() for msgid in ids]
    assert len(left) == len(set(left)), "a message is in a maildrop twice"
    for user, ids in remaining.items():
        assert all(ledger.delivered[msgid][0] == user for msgid in ids)
    delivered = set(ledger.delivered)
    assert not set(left) & ledger.deleted, "a message deleted by a finished UPDATE came back"
    assert set(left) | ledger.deleted <= delivered
    lost = delivered - set(left) - ledger.deleted - ledger.uncertain
    trail = [line for line in ledger.trail if "killed" in line or any(msgid in line for msgid in lost)]
    assert not lost, f"lost: {sorted(lost)[:10]} ({summary}); sessions that saw them: {trail}"

    # The brute force's delay grew as it moved from host to host.
    assert cluster.redis("GET", f"qpopper:fail:{BRUTE}") == "4"
    assert [round(t, 2) >= FAIL_DELAY * 2**k * 0.9 for k, t in enumerate(took)] == [True] * 4, took
    brute_hosts = [h for h in HOSTS if f"{BRUTE}:" in cluster.log_of(h)]
    assert len(brute_hosts) >= 2, "the brute force met one host only"

    # Every host logs the clients' addresses, never the balancer's.
    for host in HOSTS:
        text = cluster.log_of(host)
        logins = [line for line in text.splitlines() if "logged in" in line or "authentication failed" in line]
        assert logins, f"{host} served no session"
        assert all(re.search(rf"{re.escape(NET)}\.(1[0-2][0-9]):\d+: ", line) for line in logins), logins[:5]
        assert not re.search(rf"\b{re.escape(LB)}:\d+: ", text), f"{host} logged the balancer as a client"
        # HAProxy's health checks (a LOCAL header, then a reset, once a second) log nothing at info:
        # neither as a connection without an address nor as an error.
        assert not re.search(r"\b(local|unknown):0: |internal error|Traceback", text), f"{host}: {text[-3000:]}"
    assert "twice logged in" in cluster.log_of("h1")

    # Each running process counted what its clients saw it do; so the sum over
    # the hosts is what the clients did, all but what the killed process served.
    for server, metrics in scraped.items():
        assert counters_of(metrics) == expected_of(ledger.served.get(server)), (server, metrics)
        # Sessions ended: the clients', and HAProxy's health checks besides.
        assert metrics.get("qpopper_sessions_ended_total", 0) >= ledger.served[server]["connections"]
    clients = sum((ledger.served[s] for s in running), collections.Counter())
    total = sum((collections.Counter(counters_of(m)) for m in scraped.values()), collections.Counter())
    assert total == collections.Counter(expected_of(clients)), (total, clients)
    assert clients["logins_ok"] > len(USERS) * 3
    assert clients["failed"] + ledger.served.get(("h3", killed), collections.Counter())["failed"] == 4


def counters_of(metrics: dict[str, float]) -> dict[str, int]:
    """The counters the clients can check, from one host's scrape."""
    return {
        "logins_ok": int(metrics.get("qpopper_logins_total:ok", 0)),
        "failed": int(metrics.get("qpopper_logins_total:failed", 0)),
        "failure_delays": int(metrics.get("qpopper_failure_delays_total", 0)),
        "retrieved": int(metrics.get("qpopper_messages_retrieved_total", 0)),
        "deleted": int(metrics.get("qpopper_messages_deleted_total", 0)),
    }


def expected_of(served: collections.Counter[str] | None) -> dict[str, int]:
    """What those counters should say, from what the clients saw one process do."""
    seen = served or collections.Counter()
    return {"logins_ok": seen["logins_ok"], "failed": seen["failed"], "failure_delays": seen["failed"],
            "retrieved": seen["retrieved"], "deleted": seen["deleted"]}


def settled_metrics(cluster: Cluster, host: str, served: collections.Counter[str] | None) -> dict[str, float]:
    """The host's scrape once it shows what its clients saw (30 s at most:
    each process publishes its counts about once a second)."""
    deadline = time.monotonic() + 30
    while True:
        metrics = cluster.metrics(host)
        if counters_of(metrics) == expected_of(served) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.2)
