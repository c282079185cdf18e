"""The per-session budget's tools: idle_bytes.py measures a real server, budget.py puts
py-spy's stacks in the steps it names, and run.py's verdicts against a peer whose figure
is not above zero compare the figures themselves."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


def _bench_module(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCH))  # the scripts import each other (guard, run) as siblings
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_idle_bytes_lists_what_held_sessions_allocate() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    r = subprocess.run([sys.executable, str(BENCH / "idle_bytes.py"), "--sessions", "20", "--messages", "5",
                        "--top", "40"], check=False, capture_output=True, text=True, env=env, timeout=120, cwd=BENCH)
    assert r.returncode == 0, r.stderr
    total = re.search(r"bytes per held idle session \(20 sessions of 5 messages, Python allocations\): (\d+)",
                      r.stdout)
    assert total is not None and int(total.group(1)) > 1000, r.stdout
    # The listing's names and the protocol session are among the lines it names.
    assert "maildrop/maildir.py:" in r.stdout and "server/_connection.py:" in r.stdout, r.stdout


def test_budget_puts_each_stack_in_the_step_of_its_innermost_known_frame() -> None:
    budget = _bench_module("budget")
    base = "main (qpopper/daemon/cli.py:463);Connection._loop (qpopper/server/_connection.py:289)"
    assert budget.step_of(base + ";PopStream.write (qpopper/server/_stream.py:130)").startswith("server: stream")
    assert budget.step_of(base + ";Logger.info (logging/__init__.py:1479)") == "records (logging)"
    lock = (";MaildirMaildrop.__init__ (qpopper/maildrop/maildir.py:244)"
            ";SessionLock._open (qpopper/maildrop/sessionlock.py:76)")
    assert budget.step_of(base + lock) == "maildrop: session lock"
    assert budget.step_of(base + ";cmd_user (qpopper/protocol/_commands.py:40)") == "protocol: USER"
    assert budget.step_of("main (qpopper/daemon/cli.py:463)") == budget.LOOP


def test_verdict_against_a_peer_at_or_below_zero_compares_the_figures() -> None:
    run = _bench_module("run")
    metric = run.Metric("pss_delta_kb_per_session", "PSS over baseline", False, twisted_target=("<=", 1.0))
    assert run.verdict(metric, None, "T", (-1.1, 4.0)) == "**missed** (<= 1)"
    assert run.verdict(metric, None, "T", (0.0, -0.5)) == "met (<= 1)"
    assert run.verdict(metric, 0.8, "T", (5.0, 4.0)) == "met (<= 1)"
    assert run.verdict(metric, 0.8, "A", (5.0, 4.0)) == ""  # no target against Dovecot


def test_callgrind_totals_are_read_by_event_name(tmp_path: Path) -> None:
    instructions = _bench_module("instructions")
    dump = tmp_path / "callgrind.out.1"
    dump.write_text("version: 1\ncreator: callgrind-3.19.0\nevents: Ir Dr Dw I1mr Bc Bcm\n"
                    "fn=(1) main\n16 4 2 1 0 1 0\nsummary: 4000 1200 700 31 550 60\n")
    assert instructions.event_totals(dump) == {"Ir": 4000, "Dr": 1200, "Dw": 700, "I1mr": 31, "Bc": 550, "Bcm": 60}
    dump.write_text("events: Ir\nsummary:\n")
    with pytest.raises(RuntimeError, match="no totals"):
        instructions.event_totals(dump)


def test_instructions_refuses_bad_driver_options_with_one_line() -> None:
    r = subprocess.run([sys.executable, str(BENCH / "instructions.py"), "--load", "5", "--clients", "4"],
                       check=False, capture_output=True, text=True, timeout=60, cwd=BENCH)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--load" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, str(BENCH / "instructions.py"), "--last-level", "524288"],
                       check=False, capture_output=True, text=True, timeout=60, cwd=BENCH)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--cache-sim" in r.stderr, r.stderr
