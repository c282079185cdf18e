"""Delivery into an mbox spool (qpopper.maildrop.delivery, mbox.append): the
bytes bulletins have always written, the locks MDAs take, the quoting."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mbox_helpers import append_locked, entry
from qpopper.errors import MaildropError
from qpopper.maildrop.delivery import deliver
from qpopper.maildrop.mbox import MboxMaildrop
from qpopper.maildrop.mboxindex import is_from_line

FROM = b"From admin@example.org  Wed Dec  2 05:53:22 1992\n"
MESSAGE = b"Subject: news\nTo: alice@host\n\nFrom now on:\n>From the past\nend\n"


def test_the_spool_gets_exactly_the_bulletin_bytes(tmp_path: Path) -> None:
    spool = tmp_path / "alice"
    spool.write_bytes(entry(b"Subject: old\n\nold\n").rstrip(b"\n") + b"\n")  # no empty line at the end
    assert deliver(f"mbox:{spool}", MESSAGE, from_line=FROM, uid="1764630000.000.3") == str(spool)
    quoted = b"X-UIDL: 1764630000.000.3\nSubject: news\nTo: alice@host\n\n>From now on:\n>>From the past\nend\n"
    assert spool.read_bytes() == entry(b"Subject: old\n\nold\n") + FROM + quoted + b"\n"
    md = MboxMaildrop(str(spool))
    try:
        assert [i.uid for i in md.messages()][1] == "1764630000.000.3"
        assert b"".join(md.read(1)) == quoted
    finally:
        md.close()


def test_a_new_spool_is_created_private_with_a_valid_from_line(tmp_path: Path) -> None:
    spool = tmp_path / "bob"
    deliver(f"mbox:{spool}", b"Subject: x\n\nno final newline")
    data = spool.read_bytes()
    first, _, rest = data.partition(b"\n")
    assert is_from_line(first + b"\n") and first.startswith(b"From MAILER-DAEMON  ")
    assert rest == b"Subject: x\n\nno final newline\n\n"
    assert os.stat(spool).st_mode & 0o777 == 0o600


def test_it_waits_for_and_excludes_other_delivery_agents(tmp_path: Path) -> None:
    spool = str(tmp_path / "carol")
    append_locked(spool, entry(b"Subject: 1\n\none\n"))
    deliver(f"mbox:{spool}", b"Subject: 2\n\ntwo\n")
    append_locked(spool, entry(b"Subject: 3\n\nthree\n"))
    md = MboxMaildrop(spool)
    try:
        assert [b"".join(md.read(i)).split(b"\n")[0] for i in range(3)] == [b"Subject: 1", b"Subject: 2", b"Subject: 3"]
    finally:
        md.close()


def test_a_bad_from_line_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    spool = tmp_path / "dave"
    with pytest.raises(MaildropError):
        deliver(f"mbox:{spool}", MESSAGE, from_line=b"From nobody\n")
    assert not spool.exists()


def test_an_append_waiting_while_update_renames_a_new_spool_over_lands_in_the_new_one(tmp_path: Path) -> None:
    # Found by bench/soak.py (system users): the appender opened the spool, waited for
    # the lock while UPDATE wrote a new spool and renamed it over, then appended to the
    # old, unlinked file: the message was lost.
    import threading

    from qpopper.maildrop.dotlock import SpoolLock

    spool = tmp_path / "carol"
    deliver(f"mbox:{spool}", b"Subject: kept\n\nold\n")
    fd = os.open(spool, os.O_RDONLY)
    lock = SpoolLock(str(spool), fd)
    lock.acquire()  # as UPDATE holds it
    appender = threading.Thread(target=deliver, args=(f"mbox:{spool}", b"Subject: new\n\nnew mail\n"))
    appender.start()
    deadline = time.monotonic() + 10
    while not any(f"/proc/self/fd/{n}" for n in os.listdir("/proc/self/fd")
                  if os.path.realpath(f"/proc/self/fd/{n}") == str(spool) and int(n) != fd):
        assert time.monotonic() < deadline  # the appender has the spool open and waits
        time.sleep(0.01)
    replacement = tmp_path / "carol.new"
    replacement.write_bytes(spool.read_bytes())
    os.rename(replacement, spool)  # UPDATE's rename over the spool
    lock.release()
    os.close(fd)
    appender.join(timeout=30)
    assert not appender.is_alive()
    assert b"new mail" in spool.read_bytes() and b"Subject: kept" in spool.read_bytes()
