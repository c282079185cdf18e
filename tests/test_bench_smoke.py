"""Benchmark smoke run: a guard against gross performance regressions, never noise.

popbench (../shared/bench/popbench.py, stdlib only) drives this server
(a `python -m qpopper` subprocess on a small generated Maildir under
tmp_path) and, in the same test, popbench's canned server: an in-process
asyncio server that answers from precomputed bytes and so costs about the
least any Python POP3 server can. The figures compared are server CPU per
unit of work (per login session, per GB retrieved), which stay steady when
the machine is busy, as ratios ours / canned measured on the same machine
within seconds of each other: never an absolute time.

The limits are several times the ratios measured when this test was
written (see LIMITS), so a run only fails when the server has become
several times more expensive per session or per byte. Full comparisons
against Dovecot: bench/run.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
POPBENCH = Path(os.environ.get("QPOPPER_BENCH_SHARED", REPO.parent / "shared" / "bench")) / "popbench.py"
PASSWORD = "pass"
USERS = 24
MESSAGES = 20

# ours / canned, server CPU per unit of work. Measured when written (2-core VM, uvloop,
# other test suites running beside it): login 28-47x (1.2-1.6 ms vs 0.035-0.043 ms per
# session), retr 3.6-13x (5.7-7.3 s/GB vs 0.7-2.0 s/GB; the canned figure is a few
# hundredths of a CPU second, hence its spread). The limits are about 3x the typical ratio,
# so only a gross regression trips them (a log handler printing a traceback per record,
# for instance, took login to 73x).
LIMITS = {"login": 100.0, "retr": 40.0}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not POPBENCH.is_file(), reason=f"popbench.py not found at {POPBENCH} (set QPOPPER_BENCH_SHARED)"),
]


def _source_mentions(text: str) -> bool:
    return any(text in p.read_text(errors="replace") for p in (REPO / "src" / "qpopper").rglob("*.py"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(proc: subprocess.Popen[str], port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.recv(64)
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def _popbench(*args: str, timeout: float = 60) -> dict[str, Any]:
    r = subprocess.run([sys.executable, str(POPBENCH), *args], capture_output=True, text=True, timeout=timeout)
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert lines, f"popbench {args[0]} printed no JSON (status {r.returncode}): {r.stderr[-2000:]}"
    result = lines[-1]
    assert result.get("ok"), f"popbench {' '.join(args[:2])} reported errors: {result.get('error_samples')}"
    return result


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def servers(tmp_path: Path) -> Any:
    mail = tmp_path / "mail"
    _popbench_gen = subprocess.run(
        [sys.executable, str(POPBENCH), "gen-maildir", "--out", str(mail), "--users", str(USERS),
         "--messages", str(MESSAGES)],
        capture_output=True, text=True, timeout=60,
    )
    assert _popbench_gen.returncode == 0, _popbench_gen.stderr
    passwd = tmp_path / "passwd"
    passwd.write_text("".join(f"u{i}:{{PLAIN}}{PASSWORD}::::{tmp_path}::\n" for i in range(1, USERS + 1)))
    # Records go to the log file only: a test host may have no syslog daemon.
    no_syslog = ["--syslog-socket", ""] if _source_mentions("syslog-socket") else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    ours_port, canned_port = _free_port(), _free_port()
    log = open(tmp_path / "qpopper.log", "w")  # a file, not a pipe nobody drains
    ours = subprocess.Popen(
        [sys.executable, "-m", "qpopper", "--passwd-file", str(passwd),
         "--mail-location", f"maildir:{mail}/maildir/%u", "--auth-fail-delay", "0", *no_syslog,
         f"127.0.0.1:{ours_port}"],
        stdout=log, stderr=log, text=True, env=env, cwd=tmp_path,
    )
    canned = subprocess.Popen(
        [sys.executable, str(POPBENCH), "canned", "--port", str(canned_port), "--messages", str(MESSAGES)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        _wait_listening(ours, ours_port)
        _wait_listening(canned, canned_port)
        yield {"ours": (ours_port, ours.pid), "canned": (canned_port, canned.pid), "manifest": str(mail)}
    finally:
        _stop(canned)
        _stop(ours)
        log.close()


def _run(scenario: str, port: int, pid: int, *extra: str) -> dict[str, Any]:
    return _popbench("run", scenario, "--port", str(port), "--server-pid", str(pid), "--password", PASSWORD,
                     "--users", str(USERS), "-j", "1", "--warmup", "0.5", *extra)


def test_no_gross_regression_against_canned_server(servers: dict[str, Any]) -> None:
    ours_port, ours_pid = servers["ours"]
    canned_port, canned_pid = servers["canned"]
    figures: dict[str, dict[str, float]] = {}
    for side, port, pid in (("canned", canned_port, canned_pid), ("ours", ours_port, ours_pid)):
        login = _run("login", port, pid, "-c", "10", "-d", "2")
        manifest = ("--manifest", servers["manifest"]) if side == "ours" else ()
        retr = _run("retr", port, pid, "-c", "1", "-d", "2", *manifest)
        assert login["sessions"] > 0 and retr["sessions"] > 0
        figures[side] = {
            "login": max(login["server_cpu_ms_per_session"], 0.005),
            "retr": max(retr["server_cpu_s_per_gb"], 0.05),
        }
    ratios = {k: figures["ours"][k] / figures["canned"][k] for k in LIMITS}
    report = ", ".join(
        f"{k}: ours {figures['ours'][k]:.3g} vs canned {figures['canned'][k]:.3g} = {ratios[k]:.1f}x "
        f"(limit {LIMITS[k]:g}x)" for k in LIMITS
    )
    print("bench smoke:", report)
    for k, limit in LIMITS.items():
        assert ratios[k] < limit, f"gross performance regression in {k}: {report}"

