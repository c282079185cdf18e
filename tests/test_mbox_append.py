"""Delivery into an mbox spool (qpopper.maildrop.delivery, mbox.append): the
bytes bulletins have always written, the locks MDAs take, the quoting."""

from __future__ import annotations

import os
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


def test_a_spool_replaced_while_waiting_for_its_lock_gets_the_message(tmp_path: Path) -> None:
    # Found by the cluster test: an UPDATE renamed its new spool over the old one
    # after the delivery had opened the old one and before it got the lock; the
    # message went into the replaced file and was lost.
    import threading
    import time

    from qpopper.maildrop.dotlock import SpoolLock

    spool = tmp_path / "alice"
    spool.write_bytes(entry(b"Subject: old\n\nold\n"))
    fd = os.open(spool, os.O_RDWR)
    lock = SpoolLock(str(spool), fd, exclusive=True)
    lock.__enter__()  # as a session's UPDATE holds it
    delivered = threading.Thread(target=deliver, args=(f"mbox:{spool}", MESSAGE), kwargs={"from_line": FROM})
    delivered.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until the delivery has the old spool open
        fds = [os.path.join("/proc/self/fd", n) for n in os.listdir("/proc/self/fd")]
        opened = [f for f in fds if f != f"/proc/self/fd/{fd}" and os.path.realpath(f) == str(spool)]
        if opened:
            break
        time.sleep(0.005)
    new = tmp_path / ".alice.qpopper-new"
    new.write_bytes(b"")  # the UPDATE deleted the old message
    os.rename(new, spool)
    lock.__exit__(None, None, None)
    os.close(fd)
    delivered.join(30)
    assert not delivered.is_alive()
    data = spool.read_bytes()
    assert data.startswith(FROM) and b"Subject: news" in data and b"Subject: old" not in data
