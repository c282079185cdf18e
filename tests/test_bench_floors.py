"""bench/floors.py runs and reports every step it times (on a small maildrop)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_floors_times_the_open_and_each_unavoidable_step() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    r = subprocess.run([sys.executable, str(REPO / "bench" / "floors.py"), "300", "1"],
                       check=False, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = re.findall(r"^\| (.+?) \| ([0-9.]+) \| ([0-9]+) % \|$", r.stdout, re.MULTILINE)
    steps = [label for label, _, _ in rows]
    assert steps == [
        "open (as a session: locks, index)", "search for From_ lines alone", "line-end count alone",
        "open (as a session: lock, listing, sizes from names)", "reading the directory alone (os.listdir)",
        "sorting the names alone",
    ], r.stdout
    assert float(rows[0][1]) > 0 and float(rows[3][1]) > 0, r.stdout
    assert "mbox, 300 messages" in r.stdout and "Maildir, 300 messages" in r.stdout
