"""State shared across instances through Redis (server/_shared_state.py):
failure delays per address, LOGIN-DELAY and per-address session caps hold
across two servers; Redis stopped or frozen (SIGSTOP) costs no login, only
a log line, and the per-process state answers. Debian's redis-server is
started by each test on a Unix socket (or a loopback port) in tmp_path."""

from __future__ import annotations

import logging
import poplib
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import PASSWORD
from qpopper import Controller, StaticAuthenticator
from qpopper.maildrop.maildir import LOCK_NAME
from qpopper.maildrop.sessionlock import SessionLock

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
pytestmark = pytest.mark.skipif(
    not Path(REDIS_SERVER).exists(), reason="redis-server is not installed (Debian package redis-server)"
)
Fill = Callable[[str, list[bytes]], Path]
MSG = b"Subject: shared\n\nbody\n"


class RedisProcess:
    """A private redis-server: no persistence, its socket in `base`."""

    def __init__(self, base: Path, tcp: bool = False) -> None:
        self.base = base
        self.socket = base / "redis.sock"
        self.port = 0
        args = [REDIS_SERVER, "--save", "", "--appendonly", "no", "--dir", str(base)]
        if tcp:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
            self.url = f"redis://127.0.0.1:{self.port}/0"
        else:
            args += ["--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700"]
            self.url = f"unix://{self.socket}"
        self._args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self._args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.client().ping():
                    return
            except redis.RedisError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(20)
        if self.socket.exists():
            self.socket.unlink()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path)
    yield server
    server.stop()


RACERS = [f"racer{i}" for i in range(8)]  # each logs in through two instances at once


@pytest.fixture
def instances(mailroot: Path, fill: Fill) -> Iterator[Callable[..., Controller]]:
    """Start servers on one maildir root, as instances behind a balancer would be."""
    users = ["alice", "bob", *RACERS]
    for user in users:
        fill(user, [MSG])
    started: list[Controller] = []

    def start(**settings: Any) -> Controller:
        auth = StaticAuthenticator(dict.fromkeys(users, PASSWORD), mail_location=f"maildir:{mailroot}/%u/Maildir")
        server = Controller(authenticator=auth, **settings).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def fail_once(server: Controller) -> float:
    """One wrong password; the seconds its answer took."""
    client = poplib.POP3(server.host, server.port, timeout=60)
    client.user("alice")
    began = time.monotonic()
    with pytest.raises(poplib.error_proto):
        client.pass_("wrong")
    took = time.monotonic() - began
    client.quit()
    return took


def login(server: Controller, user: str = "alice") -> poplib.POP3:
    client = poplib.POP3(server.host, server.port, timeout=60)
    client.user(user)
    client.pass_(PASSWORD)
    return client


def test_failure_delays_follow_the_address_across_instances(
    redis_server: RedisProcess, instances: Callable[..., Controller]
) -> None:
    settings = {"redis_url": redis_server.url, "auth_fail_delay": 0.1, "auth_fail_delay_max": 10.0}
    a, b = instances(**settings), instances(**settings)
    for _ in range(3):
        fail_once(a)
    assert int(redis_server.client().get("qpopper:fail:127.0.0.1") or 0) == 3
    # The fourth failure, on the other instance, waits as long as a fourth
    # one on the first would: 0.1 s doubled three times (a lower bound, which load cannot break).
    assert fail_once(b) >= 0.8
    assert int(redis_server.client().get("qpopper:fail:127.0.0.1") or 0) == 4
    assert 0 < redis_server.client().ttl("qpopper:fail:127.0.0.1") <= 600


def test_login_delay_holds_across_instances(redis_server: RedisProcess, instances: Callable[..., Controller]) -> None:
    settings = {"redis_url": redis_server.url, "enforce_login_delay": True, "announce_login_delay": 600}
    a, b = instances(**settings), instances(**settings)
    login(a).quit()
    client = poplib.POP3(b.host, b.port, timeout=60)
    client.user("alice")
    with pytest.raises(poplib.error_proto, match=r"LOGIN-DELAY"):
        client.pass_(PASSWORD)
    client.close()
    login(b, "bob").quit()  # another user is not held


def pass_reply(sock: socket.socket) -> bytes:
    """The one-line reply to a PASS already sent on `sock`."""
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(512)
        assert chunk, data
        data += chunk
    return data


def test_concurrent_logins_on_two_instances_let_exactly_one_in(
    redis_server: RedisProcess, instances: Callable[..., Controller]
) -> None:
    # Each user's two PASS commands reach two servers at the same moment:
    # check and record being one step in Redis, exactly one session passes,
    # and the other is told LOGIN-DELAY (not IN-USE: it never reached the maildrop).
    settings = {"redis_url": redis_server.url, "enforce_login_delay": True, "announce_login_delay": 600}
    a, b = instances(**settings), instances(**settings)
    replies: dict[str, list[bytes]] = {}
    for user in RACERS:
        socks = [socket.create_connection((server.host, server.port), timeout=30) for server in (a, b)]
        try:
            for sock in socks:
                assert sock.recv(512).startswith(b"+OK")
                sock.sendall(f"USER {user}\r\n".encode())
                assert pass_reply(sock).startswith(b"+OK")
            start = threading.Barrier(2)

            def send_pass(sock: socket.socket, start: threading.Barrier = start) -> bytes:
                start.wait(30)
                sock.sendall(f"PASS {PASSWORD}\r\n".encode())
                return pass_reply(sock)

            with ThreadPoolExecutor(2) as pool:
                replies[user] = sorted(pool.map(send_pass, socks))
            for sock in socks:
                sock.sendall(b"QUIT\r\n")
                sock.recv(512)
        finally:
            for sock in socks:
                sock.close()
    for user, (first, second) in replies.items():
        assert first.startswith(b"+OK") and second.startswith(b"-ERR [LOGIN-DELAY]"), (user, first, second)
        assert 0 < redis_server.client().ttl(f"qpopper:login:{user}") <= 600


@pytest.mark.parametrize("shared", [True, False], ids=["redis", "per-process"])
def test_a_login_that_did_not_get_its_maildrop_holds_nobody_off(
    request: pytest.FixtureRequest, instances: Callable[..., Controller], mailroot: Path, shared: bool
) -> None:
    settings: dict[str, Any] = {"enforce_login_delay": True, "announce_login_delay": 600}
    if shared:
        settings["redis_url"] = request.getfixturevalue("redis_server").url
    server = instances(**settings)
    holder = SessionLock(str(mailroot / "alice" / "Maildir" / LOCK_NAME), remove=False)
    with holder:  # another session holds alice's maildrop: her login gets IN-USE ...
        client = poplib.POP3(server.host, server.port, timeout=60)
        client.user("alice")
        with pytest.raises(poplib.error_proto, match=r"IN-USE"):
            client.pass_(PASSWORD)
        client.close()
    # ... and that login, which never opened it, is not counted against her next one.
    client = login(server)
    assert client.stat()[0] == 1
    client.quit()
    client = poplib.POP3(server.host, server.port, timeout=60)
    client.user("alice")
    with pytest.raises(poplib.error_proto, match=r"LOGIN-DELAY"):  # the one that did, is
        client.pass_(PASSWORD)
    client.close()


def test_per_address_cap_counts_every_instance(
    redis_server: RedisProcess, instances: Callable[..., Controller]
) -> None:
    settings = {"redis_url": redis_server.url, "max_connections_per_ip": 2}
    a, b = instances(**settings), instances(**settings)
    first, second = login(a), login(b, "bob")
    with socket.create_connection((a.host, a.port), timeout=30) as third:
        assert third.recv(200).startswith(b"-ERR [SYS/TEMP] Too many connections")
    second.quit()
    deadline = time.monotonic() + 30  # the end of a session reaches Redis just after its QUIT
    while redis_server.client().zcard("qpopper:conns:127.0.0.1") > 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    login(a, "bob").quit()
    first.quit()


def test_a_stop_waits_for_the_end_of_a_session_to_reach_redis(
    redis_server: RedisProcess, instances: Callable[..., Controller], caplog: pytest.LogCaptureFixture
) -> None:
    # A session ends while Redis is slow to answer, and the server stops at once. The stop
    # waits for that session's last call: closing the Redis client under it broke the call
    # (or, caught while connecting, left its task pending in a closed loop).
    server = instances(redis_url=redis_server.url, redis_timeout=10, max_connections_per_ip=5)
    client = login(server)
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        client.quit()
        threading.Timer(0.5, redis_server.proc.send_signal, (signal.SIGCONT,)).start()
        with caplog.at_level(logging.WARNING, "qpopper.server"):
            server.stop()
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert "Redis failed" not in caplog.text
    assert redis_server.client().zcard("qpopper:conns:127.0.0.1") == 0


def test_a_stop_ends_a_connection_still_waiting_for_redis(
    redis_server: RedisProcess, instances: Callable[..., Controller], caplog: pytest.LogCaptureFixture
) -> None:
    # A client connects while Redis is frozen, so the server waits to count its session on
    # every instance, and the server stops: the stop ends that wait as it ends a handshake.
    # The client is closed without a greeting; no session starts on a stopping server.
    server = instances(redis_url=redis_server.url, redis_timeout=10, max_connections_per_ip=5)
    login(server).quit()  # the instance's Redis client is connected
    deadline = time.monotonic() + 30  # and that session's end has reached Redis
    while redis_server.client().zcard("qpopper:conns:127.0.0.1") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        with socket.create_connection((server.host, server.port), timeout=30) as waiting:
            time.sleep(0.3)  # its session's claim is on its way to the frozen Redis
            with caplog.at_level(logging.WARNING, "qpopper.server"):
                server.stop()
            assert waiting.recv(200) == b""
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert "Redis failed" not in caplog.text


def test_a_dead_instances_sessions_expire(redis_server: RedisProcess, instances: Callable[..., Controller]) -> None:
    # Another host died with a session open: its lease ran out, so it no longer counts.
    redis_server.client().zadd("qpopper:conns:127.0.0.1", {"deadhost:1:1:0": time.time() - 1})
    server = instances(redis_url=redis_server.url, max_connections_per_ip=1)
    login(server).quit()


def test_redis_stopped_costs_no_login(
    redis_server: RedisProcess, instances: Callable[..., Controller], caplog: pytest.LogCaptureFixture
) -> None:
    server = instances(redis_url=redis_server.url, auth_fail_delay=0.05, max_connections_per_ip=5,
                       enforce_login_delay=True, announce_login_delay=1)
    login(server).quit()
    redis_server.stop()
    with caplog.at_level(logging.WARNING, "qpopper.server"):
        client = login(server, "bob")  # connection cap, login and LOGIN-DELAY record without Redis
        assert client.stat()[0] == 1
        client.quit()
        fail_once(server)
        fail_once(server)  # per-process failure delays go on
    assert "shared state: Redis failed" in caplog.text
    assert caplog.text.count("shared state: Redis failed") == 1  # one line per outage, not per call
    redis_server.start()
    # The instance leaves Redis alone for a few seconds after a failure, then asks again.
    deadline = time.monotonic() + 60
    with caplog.at_level(logging.WARNING, "qpopper.server"):
        while "Redis answers again" not in caplog.text and time.monotonic() < deadline:
            fail_once(server)
    assert "Redis answers again" in caplog.text


def test_redis_frozen_costs_no_login(tmp_path: Path, instances: Callable[..., Controller],
                                     caplog: pytest.LogCaptureFixture) -> None:
    frozen = RedisProcess(tmp_path, tcp=True)
    try:
        server = instances(redis_url=frozen.url, redis_timeout=0.2, max_connections_per_ip=5,
                           enforce_login_delay=True, announce_login_delay=1)
        fail_once(server)  # the client is connected: the next calls go to a live socket
        assert frozen.proc is not None
        frozen.proc.send_signal(signal.SIGSTOP)
        with caplog.at_level(logging.WARNING, "qpopper.server"):
            for user in ("alice", "bob"):
                client = login(server, user)  # each within the poplib timeout: Redis is waited on 0.2 s at most
                assert client.stat()[0] == 1
                client.quit()
        assert "shared state: Redis failed (TimeoutError" in caplog.text
    finally:
        frozen.stop()


def test_without_redis_nothing_is_shared(instances: Callable[..., Controller]) -> None:
    server = instances()
    assert server.server.services.shared is None
    login(server).quit()
