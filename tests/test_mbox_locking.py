"""Spool locking against MDAs: dotlock + fcntl, stale locks, refresh, session lock."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mbox_helpers import mbox, numbered
from qpopper.errors import MaildropBusy, MaildropError, ResponseCode
from qpopper.maildrop.dotlock import DotLock, SpoolLock
from qpopper.maildrop.mbox import MboxMaildrop, session_lock_path


@pytest.fixture
def spool(tmp_path: Path) -> str:
    path = tmp_path / "alice"
    path.write_bytes(mbox([numbered(1), numbered(2)]))
    return str(path)


def test_dotlock_is_exclusive_and_released(spool: str) -> None:
    a, b = DotLock(spool), DotLock(spool)
    assert a.try_acquire()
    assert Path(spool + ".lock").read_bytes() == b"%d %s\n" % (os.getpid(), socket.gethostname().encode())
    assert not b.try_acquire()
    assert not b.break_if_stale()  # fresh, and its holder (we) is alive
    a.release()
    assert not os.path.exists(spool + ".lock")
    assert b.try_acquire()
    b.release()
    # No unique temporary files are left behind.
    assert sorted(os.listdir(os.path.dirname(spool))) == ["alice"]


def test_old_dotlock_is_stale(spool: str) -> None:
    Path(spool + ".lock").write_bytes(b"")  # postfix-style empty lock
    old = time.time() - 301
    os.utime(spool + ".lock", (old, old))
    md = MboxMaildrop(spool, lock_timeout=5)
    assert len(md.messages()) == 2
    md.close()


def test_dotlock_of_dead_process_is_stale(spool: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    Path(spool + ".lock").write_bytes(b"%d\n" % child.pid)
    t = time.monotonic()
    MboxMaildrop(spool, lock_timeout=5).close()
    assert time.monotonic() - t < 2


def test_dotlock_of_another_host_is_not_judged_by_our_pids(spool: str) -> None:
    # Shared storage: host B's session holds the lock with a pid that does not
    # exist here. Only its age may make it stale, never our process table.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    Path(spool + ".lock").write_bytes(b"%d other-host.example\n" % child.pid)
    with pytest.raises(MaildropError) as err:
        MboxMaildrop(spool, lock_timeout=0.3)
    assert err.value.code is ResponseCode.SYS_TEMP
    assert os.path.exists(spool + ".lock")
    # The same pid recorded with this host's name is a dead holder of ours: broken at once.
    Path(spool + ".lock").write_bytes(b"%d %s\n" % (child.pid, socket.gethostname().encode()))
    MboxMaildrop(spool, lock_timeout=5).close()


def test_live_dotlock_is_waited_for_then_sys_temp(spool: str) -> None:
    Path(spool + ".lock").write_bytes(b"%d\n" % os.getppid())  # a live process
    t = time.monotonic()
    with pytest.raises(MaildropError) as err:
        MboxMaildrop(spool, lock_timeout=0.3)
    assert err.value.code is ResponseCode.SYS_TEMP
    assert 0.3 <= time.monotonic() - t < 3
    assert os.path.exists(spool + ".lock")  # not ours to remove
    # ... and the session lock was released on the way out.
    os.unlink(spool + ".lock")
    MboxMaildrop(spool).close()


def test_fcntl_lock_of_an_mda_excludes_us(spool: str) -> None:
    # A classic POSIX lock as procmail/postfix take it (here in a child, as
    # an MDA would be).
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({spool!r}, os.O_WRONLY)\n"
         "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
         "print('locked', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        with pytest.raises(MaildropError):
            MboxMaildrop(spool, lock_timeout=0.3)
        # All-or-nothing: we did not keep the dotlock while waiting.
        assert not os.path.exists(spool + ".lock")
    finally:
        holder.communicate(b"")
    MboxMaildrop(spool).close()


def test_our_fcntl_lock_excludes_an_mda(spool: str) -> None:
    fd = os.open(spool, os.O_RDONLY)
    try:
        with SpoolLock(spool, fd):
            probe = subprocess.run(
                [sys.executable, "-c",
                 "import fcntl, os\n"
                 f"fd = os.open({spool!r}, os.O_WRONLY)\n"
                 "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    print('busy')\n"],
                capture_output=True,
            )
            assert probe.stdout == b"busy\n"
            assert os.path.exists(spool + ".lock")
        assert not os.path.exists(spool + ".lock")
    finally:
        os.close(fd)


def test_refresh_touches_and_detects_a_broken_lock(spool: str) -> None:
    lock = DotLock(spool)
    assert lock.try_acquire()
    before = os.stat(lock.path).st_mtime_ns
    time.sleep(0.02)
    lock.refresh_if_due(interval=0)
    assert os.stat(lock.path).st_mtime_ns > before
    lock.refresh_if_due()  # not due yet: no change, no error
    os.unlink(lock.path)  # an MDA judged it stale and took it
    Path(lock.path).write_bytes(b"1\n")
    with pytest.raises(MaildropError):
        lock.refresh()
    lock.release()
    assert os.path.exists(lock.path)  # someone else's lock is not removed


def test_spool_is_not_locked_during_the_session(spool: str) -> None:
    md = MboxMaildrop(spool)
    try:
        assert not os.path.exists(spool + ".lock")
        fd = os.open(spool, os.O_WRONLY)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # would raise if we held it
        os.close(fd)
    finally:
        md.close()


def test_session_lock_file_and_in_use(spool: str) -> None:
    md = MboxMaildrop(spool)
    try:
        assert os.path.basename(session_lock_path(spool)) == ".alice.qpopper-pop3.lock"
        with pytest.raises(MaildropBusy):
            MboxMaildrop(spool)
    finally:
        md.close()
    MboxMaildrop(spool).close()
