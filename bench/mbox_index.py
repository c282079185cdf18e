"""Time indexing a large mbox spool: python3 bench/mbox_index.py [N] [SIZE_MB] [modes].

Builds (once, cached in /tmp) an mbox of N messages of about SIZE_MB in
total, postfix style, then opens it with MboxMaildrop a few times and
prints the best wall time and the peak RSS growth.

With "modes", it also times whole sessions (login, UPDATE) in server mode
and temp-drop mode, with and without update-status-headers and
fast_update: a session that changes nothing, and one that deletes one
message.
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import time

from qpopper.maildrop import MaildropSettings
from qpopper.maildrop.mbox import MboxMaildrop


def build(path: str, n: int, total_mb: int) -> None:
    per = max(200, total_mb * 1024 * 1024 // n)
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\n"
    with open(path, "wb") as f:
        for i in range(n):
            head = (
                b"From sender%d@example.org  Wed Dec  2 05:53:22 1992\n"
                b"Return-Path: <sender%d@example.org>\n"
                b"Received: from mx.example.org by mail.example.org; Wed, 2 Dec 1992 05:53:22 +0000\n"
                b"From: sender%d@example.org\nTo: user@example.org\nSubject: message %d\n"
                b"Date: Wed, 2 Dec 1992 05:53:22 +0000\nMessage-ID: <%d@example.org>\n\n" % (i, i, i, i, i)
            )
            body = line * max(1, (per - len(head)) // len(line))
            f.write(head + body + b"\n")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50000
    mb = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    directory = f"/tmp/qpopper-bench-mbox-{n}-{mb}"
    os.makedirs(directory, exist_ok=True)
    spool = os.path.join(directory, "user")
    if not os.path.exists(spool):
        build(spool, n, mb)
    size = os.path.getsize(spool)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        md = MboxMaildrop(spool)
        count = len(md.messages())
        md.close()
        best = min(best, time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    print(f"{count} messages, {size / 1e6:.0f} MB: indexed in {best:.3f} s "
          f"({size / 1e6 / best:.0f} MB/s, {count / best:.0f} msg/s), peak RSS growth {rss / 1024:.1f} MiB")

    if len(sys.argv) > 3 and sys.argv[3] == "modes":
        sessions(spool)


MODES = {
    "server": MaildropSettings(server_mode=True, update_status_headers=False),
    "server+ush": MaildropSettings(server_mode=True, update_status_headers=True),
    "tempdrop": MaildropSettings(server_mode=False, update_status_headers=False),
    "tempdrop+fast": MaildropSettings(server_mode=False, update_status_headers=False, fast_update=True),
    "tempdrop+ush": MaildropSettings(server_mode=False, update_status_headers=True),
}


def sessions(pristine: str) -> None:
    work = pristine + ".work"
    for name, settings in MODES.items():
        for deleted in (set(), {0}):
            shutil.copyfile(pristine, work)
            t0 = time.perf_counter()
            md = MboxMaildrop(work, settings)
            t1 = time.perf_counter()
            md.commit(deleted, set())
            md.close()
            t2 = time.perf_counter()
            what = "delete 1" if deleted else "no change"
            print(f"{name:14s} {what:9s}: login {t1 - t0:6.3f} s, update+close {t2 - t1:6.3f} s")
    os.unlink(work)


if __name__ == "__main__":
    main()
