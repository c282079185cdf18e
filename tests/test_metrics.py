"""The OpenMetrics endpoint, on a real daemon with two workers: its
exposition parsed with prometheus-client's OpenMetrics parser, scraped by
a real Prometheus (Debian's package, started here on loopback with its own
configuration and data directory), and every counter checked against the
sessions the test ran."""

from __future__ import annotations

import contextlib
import json
import os
import poplib
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from helpers import QpopperProcess, write_maildir_message

USERS = [f"m{i}" for i in range(8)]
MSG = b"From: a@example.org\nSubject: metrics\n\n" + b"line of the body\n" * 40
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class MetricsDaemon(QpopperProcess):
    """The daemon with metrics on, USERS as virtual users (password pw), two messages each."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.home = tmp_path / "home"
        passwd = tmp_path / "passwd"
        passwd.write_text("".join(f"{u}:{{PLAIN}}pw::::{self.home}/{u}::\n" for u in USERS))
        for user in USERS:
            for _ in range(2):
                write_maildir_message(self.home / user / "Maildir", MSG)
        super().__init__(tmp_path, ["--passwd-file", str(passwd), "--metrics-listen", "127.0.0.1:0", *args])
        self.metrics_port = int(self.wait_for_log(rb"metrics on http://127\.0\.0\.1:(\d+)/metrics"))

    def wait_for_log(self, pattern: bytes) -> bytes:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log.read_bytes())
            if match:
                return match.group(1)
            time.sleep(0.02)
        raise AssertionError(self.log.read_text())

    def exposition(self) -> str:
        request = urllib.request.Request(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                         headers={"Accept": OPENMETRICS})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            return str(response.read().decode())

    def samples(self) -> Samples:
        """Every sample of the exposition, parsed by prometheus-client's OpenMetrics parser."""
        out: Samples = {}
        for family in text_string_to_metric_families(self.exposition()):  # type: ignore[no-untyped-call]
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def wait_for(samples: Callable[[], Samples], done: Callable[[Samples], bool]) -> Samples:
    """The server publishes about once a second: poll until `done` holds (or 30 s pass)."""
    deadline = time.monotonic() + 30
    while True:
        found = samples()
        if done(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def wait_until(samples: Callable[[], Samples], name: str, expected: float, **labels: str) -> Samples:
    """Poll until `name` reaches `expected`."""
    return wait_for(samples, lambda found: value(found, name, **labels) == expected)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[MetricsDaemon]:
    daemon = MetricsDaemon(tmp_path, "--workers", "2")
    yield daemon
    daemon.stop()


def run_sessions(daemon: MetricsDaemon) -> dict[str, int]:
    """Five sessions that RETR and DELE one message each and QUIT, one that is
    dropped after a DELE (not applied), three failed logins; returns the counts."""
    sizes = 0
    for user in USERS[:5]:
        client = daemon.login(user, "pw")
        sizes += len(client.retr(1)[1])
        client.dele(1)
        client.quit()
    dropped = daemon.login(USERS[5], "pw")
    dropped.retr(1)
    dropped.retr(2)
    dropped.dele(1)
    dropped.sock.close()  # no QUIT: the deletion must not be applied
    for user in (USERS[6], USERS[7], "nobody"):
        client = poplib.POP3("127.0.0.1", daemon.port, timeout=20)
        client.user(user)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            client.pass_("wrong")
        client.quit()
    return {"ok": 6, "failed": 3, "sessions": 9, "retrieved": 7, "deleted": 5, "retr": 7}


def test_counters_of_two_workers_match_the_sessions_run(workers: MetricsDaemon) -> None:
    expected = run_sessions(workers)
    # Each figure, as (name, labels) and the value the sessions above make it.
    wanted: list[tuple[str, dict[str, str], float]] = [
        ("qpopper_sessions_ended_total", {}, expected["sessions"]),
        ("qpopper_logins_total", {"mechanism": "password", "result": "ok"}, expected["ok"]),
        ("qpopper_logins_total", {"mechanism": "password", "result": "failed"}, expected["failed"]),
        ("qpopper_failure_delays_total", {}, expected["failed"]),
        ("qpopper_messages_retrieved_total", {}, expected["retrieved"]),
        ("qpopper_messages_deleted_total", {}, expected["deleted"]),
        ("qpopper_error_replies_total", {"code": "AUTH"}, expected["failed"]),
        ("qpopper_connections_total", {"port": str(workers.port), "tls": "false"}, expected["sessions"]),
        ("qpopper_command_duration_seconds_count", {"command": "RETR"}, expected["retr"]),
        ("qpopper_command_duration_seconds_bucket", {"command": "RETR", "le": "+Inf"}, expected["retr"]),
        ("qpopper_maildrop_open_seconds_count", {}, expected["ok"]),
        ("qpopper_sessions", {}, 0),  # all over: no state holds a session
    ]

    def figures(samples: Samples) -> list[tuple[str, dict[str, str], float]]:
        return [(name, labels, value(samples, name, **labels)) for name, labels, _ in wanted]

    # A worker writes one metric file after another, so a scrape between two
    # of them sees part of its last batch: wait until every figure is in.
    samples = wait_for(workers.samples, lambda found: figures(found) == wanted)
    assert figures(samples) == wanted
    assert value(samples, "qpopper_sent_bytes_total") > expected["retrieved"] * len(MSG)
    # The dropped session's DELE was not applied; the others' were.
    assert _messages(workers.home / USERS[5] / "Maildir") == 2
    assert _messages(workers.home / USERS[0] / "Maildir") == 1


def _messages(maildir: Path) -> int:
    return sum(1 for sub in ("new", "cur") for _ in (maildir / sub).iterdir())


def test_sessions_gauge_counts_held_sessions_by_state(workers: MetricsDaemon) -> None:
    held = [workers.login(user, "pw") for user in USERS[:3]]
    waiting = poplib.POP3("127.0.0.1", workers.port, timeout=20)  # greeted, not logged in
    try:
        samples = wait_until(workers.samples, "qpopper_sessions", 3, state="transaction")
        assert value(samples, "qpopper_sessions", state="transaction") == 3
        assert value(samples, "qpopper_sessions", state="authorization") == 1
    finally:
        for client in [*held, waiting]:
            client.quit()
    samples = wait_until(workers.samples, "qpopper_sessions", 0)
    assert value(samples, "qpopper_sessions") == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus package")
def test_a_real_prometheus_scrapes_the_endpoint(workers: MetricsDaemon, tmp_path: Path) -> None:
    expected = run_sessions(workers)
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: qpopper\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{workers.metrics_port}']\n"
    )
    log = (tmp_path / "prometheus.log").open("wb")
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )

    def query(expression: str) -> list[dict[str, object]]:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                answer = json.load(response)
        except OSError:
            return []  # not up yet
        assert answer["status"] == "success", answer
        return list(answer["data"]["result"])

    def scalar(expression: str) -> float | None:
        result = query(expression)
        return float(result[0]["value"][1]) if result else None  # type: ignore[index]

    try:
        deadline = time.monotonic() + 60
        wanted = {
            'up{job="qpopper"}': 1.0,
            'sum(qpopper_logins_total{result="ok"})': float(expected["ok"]),
            'sum(qpopper_logins_total{result="failed"})': float(expected["failed"]),
            "sum(qpopper_messages_deleted_total)": float(expected["deleted"]),
            "sum(qpopper_sessions_ended_total)": float(expected["sessions"]),
            'sum(qpopper_command_duration_seconds_count{command="RETR"})': float(expected["retr"]),
        }
        found: dict[str, float | None] = {}
        while time.monotonic() < deadline:
            found = {expression: scalar(expression) for expression in wanted}
            if found == wanted:
                break
            time.sleep(0.5)
        assert found == wanted, (tmp_path / "prometheus.log").read_text()[-2000:]
        # Every series of a known label is there from the start (here: the refusals, still 0).
        assert scalar('sum(qpopper_connections_refused_total{reason="max-connections"})') == 0.0
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        log.close()


def test_metrics_listen_needs_a_valid_address(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    result = subprocess.run(
        [*_qpopper(), "--passwd-file", str(passwd), "--syslog-socket=", "--metrics-listen", "127.0.0.1:notaport",
         "127.0.0.1:0"], capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("qpopper: metrics-listen") and "Traceback" not in result.stderr


def _qpopper() -> list[str]:
    import sys

    return [sys.executable, "-m", "qpopper"]


def test_exporter_process_ends_with_the_daemon(tmp_path: Path) -> None:
    daemon = MetricsDaemon(tmp_path, "--metrics-dir", str(tmp_path / "metrics"))
    exposition = daemon.exposition()
    assert "qpopper_logins_total" in exposition and exposition.endswith("# EOF\n")
    children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent_of(int(p)) == daemon.proc.pid]
    assert children  # the exporter
    daemon.stop()
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in children)


def test_a_daemon_killed_with_9_takes_its_exporter_along(tmp_path: Path) -> None:
    # The kernel ends the exporter as the daemon dies (PR_SET_PDEATHSIG), so a
    # daemon started again at once binds metrics-listen; before, the exporter
    # noticed once a second and the restart could find the port taken.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    first = MetricsDaemon(tmp_path / "first", "--metrics-listen", f"127.0.0.1:{port}")
    assert first.metrics_port == port
    children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent_of(int(p)) == first.proc.pid]
    assert children  # the exporter
    first.kill()
    second = MetricsDaemon(tmp_path / "second", "--metrics-listen", f"127.0.0.1:{port}")
    try:
        assert second.metrics_port == port
        assert "qpopper_logins_total" in second.exposition()
        assert not any(_alive(pid) for pid in children)
    finally:
        second.stop()


def _parent_of(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return -1
    match = re.search(r"^PPid:\s+(\d+)$", status, re.M)
    return int(match.group(1)) if match else -1


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_the_tally_names_commands_and_codes_from_fixed_sets() -> None:
    from qpopper.server._tally import Tally

    tally = Tally()
    for word in (b"RETR", b"retr", b"c2VjcmV0", b"PASSWORD", b"TOP"):
        tally.command(word, 0.001)
    assert set(tally.commands) == {"RETR", "other", "TOP"}  # a base64 AUTH line is no label
    assert tally.commands["RETR"][-1] == pytest.approx(0.002)
    for reply in (b"-ERR [SYS/TEMP] x\r\n", b"-ERR [IN-USE] x\r\n", b"-ERR no such message\r\n",
                  b"-ERR [EVIL/CODE] x\r\n", b"-ERR [unterminated"):
        tally.error_reply(reply)
    assert tally.errors == {"SYS/TEMP": 1, "IN-USE": 1, "none": 1, "other": 2}
    batch = tally.take()
    assert batch.errors and not tally.errors and not tally.commands


def test_tls_handshakes_and_cap_refusals_are_counted(tmp_path: Path) -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    daemon = MetricsDaemon(tmp_path, f"--tls-server-cert-file={tmp_path / 'server.pem'}",
                           f"--tls-private-key-file={tmp_path / 'server.pem'}", "--tls-listen=127.0.0.1:0",
                           "--max-connections-per-ip=1")
    try:
        tls_port = int(daemon.wait_for_log(rb"listening on 127\.0\.0\.1:(\d+) \(TLS\)"))
        context = ssl.create_default_context()
        ca.configure_trust(context)
        client = poplib.POP3_SSL("127.0.0.1", tls_port, context=context, timeout=20)
        client.user(USERS[0])
        client.pass_("pw")
        # The cap: one connection per address, so a second is refused while this one holds.
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=20) as second:
            assert second.makefile("rb").readline().startswith(b"-ERR [SYS/TEMP]")
        client.quit()
        with socket.create_connection(("127.0.0.1", tls_port), timeout=20) as broken:
            broken.sendall(b"USER not-a-tls-client\r\n" * 10)  # no ClientHello: the handshake fails
            broken.recv(100)
        samples = wait_until(daemon.samples, "qpopper_tls_handshakes_total", 1, kind="implicit", result="failed")
        assert value(samples, "qpopper_tls_handshakes_total", kind="implicit", result="ok") == 1
        assert value(samples, "qpopper_tls_handshakes_total", kind="implicit", result="failed") == 1
        assert value(samples, "qpopper_connections_total", port=str(tls_port), tls="true") == 1
        assert value(samples, "qpopper_connections_refused_total", reason="max-connections-per-ip") == 1
        assert value(samples, "qpopper_logins_total", mechanism="password", result="ok") == 1
    finally:
        daemon.stop()


def _exporter_of(daemon: MetricsDaemon) -> int:
    """The exporter's pid: the daemon's child that listens on the metrics port."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
            # The metrics port alone: the exporter (a worker holds the POP3 listener too).
            if _parent_of(pid) == daemon.proc.pid and _alive(pid) and _listening(pid) == {daemon.metrics_port}:
                return pid
        time.sleep(0.05)
    raise AssertionError(daemon.log.read_text())


def _listening(pid: int) -> set[int]:
    """The TCP ports `pid` listens on (its sockets, found in the kernel's table)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _sockets(pid: int) -> int:
    """How many of `pid`'s descriptors are sockets."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def _uid_of(pid: int) -> int:
    match = re.search(r"^Uid:\s+(\d+)\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert match
    return int(match.group(2))


@pytest.mark.parametrize("model", ["single", "workers"])
def test_a_killed_exporter_is_restarted_and_the_counts_survive(tmp_path: Path, model: str) -> None:
    daemon = MetricsDaemon(tmp_path, *(["--workers", "2"] if model == "workers" else []))
    try:
        expected = run_sessions(daemon)
        before = wait_until(daemon.samples, "qpopper_sessions_ended_total", expected["sessions"])
        assert value(before, "qpopper_sessions_ended_total") == expected["sessions"]
        first = _exporter_of(daemon)
        if os.geteuid() == 0:  # root's exporter has dropped to nobody after the daemon bound its port
            assert _uid_of(first) == pwd.getpwnam("nobody").pw_uid
        held = daemon.login(USERS[6], "pw")  # a session open while the new exporter is forked
        os.kill(first, signal.SIGKILL)
        daemon.wait_for_log(rb"metrics exporter (\d+) ended unexpectedly \(signal 9\); restarting it")
        daemon.wait_for_log(rb"metrics exporter restarted \(pid (\d+)\)")
        second = _exporter_of(daemon)
        assert second != first and not _alive(first)  # the old one reaped, not a zombie
        assert _sockets(second) == 1  # its listener: no client connection, no POP3 or control listener
        # The same port, the same counts (they live in the files), and the held session's login.
        after = wait_until(daemon.samples, "qpopper_logins_total", value(before, "qpopper_logins_total") + 1)
        assert value(after, "qpopper_logins_total") == value(before, "qpopper_logins_total") + 1
        for name in ("qpopper_sessions_ended_total", "qpopper_messages_deleted_total"):
            assert value(after, name) == value(before, name)
        # QUIT: the server closes the connection, though the exporter was forked while it was open.
        held.sock.settimeout(20)
        held.sock.sendall(b"QUIT\r\n")
        assert held.file.readline().startswith(b"+OK")
        assert held.sock.recv(1) == b""
        held.close()
        if os.geteuid() == 0:
            assert _uid_of(second) == pwd.getpwnam("nobody").pw_uid
        assert _listening(second) == {daemon.metrics_port}  # no POP3 listener inherited
        client = daemon.login(USERS[0], "pw")  # and the server serves on
        client.quit()
        wait_until(daemon.samples, "qpopper_sessions_ended_total", expected["sessions"] + 2)
        assert value(daemon.samples(), "qpopper_sessions_ended_total") == expected["sessions"] + 2
    finally:
        log = daemon.stop()
    assert "Traceback" not in log


def test_an_exporter_that_keeps_dying_is_restarted_after_longer_pauses(tmp_path: Path) -> None:
    daemon = MetricsDaemon(tmp_path)
    try:
        for _ in range(3):
            exporter = _exporter_of(daemon)
            os.kill(exporter, signal.SIGKILL)
            while _alive(exporter):
                time.sleep(0.02)
        deadline = time.monotonic() + 30
        while len(re.findall(rb"restarting it in (\d+) s", daemon.log.read_bytes())) < 3:
            assert time.monotonic() < deadline, daemon.log.read_text()
            time.sleep(0.05)
        pauses = [int(p) for p in re.findall(rb"restarting it in (\d+) s", daemon.log.read_bytes())]
        assert pauses == [1, 2, 4]
        assert "qpopper_logins_total" in daemon.exposition()
    finally:
        daemon.stop()


def test_a_scrape_skips_a_metric_file_still_being_made(tmp_path: Path) -> None:
    daemon = MetricsDaemon(tmp_path, "--metrics-dir", str(tmp_path / "metrics"))
    try:
        # A session process's file, as it is for a moment after prometheus-client made it: empty.
        (tmp_path / "metrics" / "counter_s9.db").touch()
        client = daemon.login(USERS[0], "pw")
        client.quit()
        samples = wait_until(daemon.samples, "qpopper_sessions_ended_total", 1)
        assert value(samples, "qpopper_sessions_ended_total") == 1
    finally:
        log = daemon.stop()
    assert "Traceback" not in log and "scrape failed" not in log
