"""kill -9 at random instants of UPDATE: the spool is the old one or the new one.

A child process opens a large spool, is told to commit, and is killed
after a random delay spread over the measured duration of a commit. After
every kill the spool must be byte-for-byte the old or the new spool, and
the next session must open it at once (the dead child's dotlock is
recognised as stale, its half-written copy removed).

In temp-drop mode the child logs in (moving the spool to the temp drop)
only after it is told to go, so the kills also hit the move at login; the
mail may then be in the temp drop, so the check runs after the next
session has recovered and ended: the spool must again be byte-for-byte
the old one or the new one, with nothing left beside it.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mbox_helpers import entry
from qpopper.maildrop import MaildropSettings
from qpopper.maildrop.mbox import (
    MboxMaildrop,
    gather_journal_path,
    new_spool_path,
    putback_flag_path,
    temp_drop_path,
)

CHILD = """
import sys
from qpopper.maildrop import MaildropSettings
from qpopper.maildrop.mbox import MboxMaildrop
server = sys.argv[2] == "server"
settings = MaildropSettings(server_mode=server)
if server:
    md = MboxMaildrop(sys.argv[1], settings)
print("ready", flush=True)
sys.stdin.readline()
if not server:
    md = MboxMaildrop(sys.argv[1], settings)
md.commit(set(range(0, len(md.messages()), 3)), set())
print("done", flush=True)
md.close()
"""


def big_spool(path: Path, count: int = 6000) -> None:
    body = b"".join(b"line %d of a body that is long enough to matter\n" % i for i in range(60))
    with open(path, "wb") as f:
        for k in range(count):
            f.write(entry(b"Subject: message %d\nMessage-ID: <%d@x>\n\n" % (k, k) + body, k))


def run_child(spool: Path, kill_after: float | None, mode: str) -> tuple[str, float]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(spool), mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert child.stdin is not None and child.stdout is not None
    assert child.stdout.readline() == b"ready\n"
    start = time.monotonic()
    child.stdin.write(b"go\n")
    child.stdin.flush()
    if kill_after is None:
        assert child.stdout.readline() == b"done\n"
        elapsed = time.monotonic() - start
        child.communicate()
        return "finished", elapsed
    time.sleep(kill_after)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    return ("killed" if child.returncode == -signal.SIGKILL else "finished"), time.monotonic() - start


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["server", "tempdrop"])
def test_sigkill_during_update_leaves_old_or_new_spool(tmp_path: Path, mode: str) -> None:
    settings = MaildropSettings(server_mode=mode == "server")
    pristine = tmp_path / "pristine"
    big_spool(pristine)
    spool = tmp_path / "alice"
    shutil.copyfile(pristine, spool)
    old = pristine.read_bytes()
    _, duration = run_child(spool, None, mode)  # calibration: a full UPDATE
    new = spool.read_bytes()
    assert new != old and len(new) < len(old)
    temp = temp_drop_path(str(spool), settings)
    leftovers = [new_spool_path(str(spool)), putback_flag_path(str(spool)), gather_journal_path(temp), temp]
    rng = random.Random(1939)
    outcomes = {"old": 0, "new": 0, "files left to recover": 0}
    deadline = time.monotonic() + 25
    rounds = 0
    while rounds < 30 and time.monotonic() < deadline:
        shutil.copyfile(pristine, spool)
        run_child(spool, rng.uniform(0, duration * 1.3), mode)
        outcomes["files left to recover"] += any(os.path.exists(p) for p in leftovers)
        if mode == "server":
            now = spool.read_bytes()
            assert now in (old, new), f"round {rounds}: spool is neither old nor new"
        t = time.monotonic()
        MboxMaildrop(str(spool), settings, lock_timeout=10).close()  # next login works at once
        assert time.monotonic() - t < 5
        now = spool.read_bytes()
        assert now in (old, new), f"round {rounds}: spool is neither old nor new after recovery"
        outcomes["old" if now == old else "new"] += 1
        assert not any(os.path.exists(p) for p in leftovers)
        rounds += 1
    print(f"{mode}: {rounds} rounds, commit {duration * 1000:.0f} ms: {outcomes}")
    assert rounds >= 10
