"""What opening a 50,000-message maildrop costs, and how much of it no Python code can skip.

    .venv/bin/python bench/floors.py [N] [SIZE_MB]

Builds (once, cached in /tmp) an mbox spool of N messages and about SIZE_MB
(bench/mbox_index.py's builder) and a Maildir of N files named as Dovecot
names them, then times, best of five:

- the open as a session does it (MboxMaildrop / MaildirMaildrop: locks,
  index, listing), and
- on the same data, each step every implementation has to take, alone:
  for mbox, the search for From_ lines and the line-end count that RFC 1939
  sizes need, both over every byte and both already in C; for Maildir,
  reading the directory and putting the names in delivery order.

Set against the bigbox targets (bench/results/REPORT.md: at most a fifth of
Dovecot's cold-index time, at most five times its warm one), the second
part says how far the first can still fall.
"""

from __future__ import annotations

import mmap
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mbox_index import build  # beside this script, so on sys.path when it runs
from qpopper.maildrop.maildir import MaildirMaildrop
from qpopper.maildrop.mbox import MboxMaildrop
from qpopper.maildrop.mboxindex import _FROM_LINE, COUNT_CHUNK


def best_of(f: Callable[[], object], rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - start)
    return best


def mbox_floors(spool: str) -> list[tuple[str, float]]:
    def open_session() -> None:
        MboxMaildrop(spool).close()

    fd = os.open(spool, os.O_RDONLY)
    try:
        length = os.fstat(fd).st_size
        with mmap.mmap(fd, length, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), mmap.PROT_READ) as mm:
            def from_lines() -> int:
                return sum(1 for _ in _FROM_LINE.finditer(mm))

            def line_ends() -> int:
                return sum(mm[pos : pos + COUNT_CHUNK].count(b"\n") for pos in range(0, length, COUNT_CHUNK))

            return [("open (as a session: locks, index)", best_of(open_session)),
                    ("search for From_ lines alone", best_of(from_lines)),
                    ("line-end count alone", best_of(line_ends))]
    finally:
        os.close(fd)


def build_maildir(root: Path, n: int) -> None:
    cur = root / "cur"
    if cur.is_dir() and len(os.listdir(cur)) == n:
        return
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    text = b"Subject: s\n\nbody\n"
    for i in range(n):
        (cur / f"{1700000000 + i * 7 % n}.M{i}P1.floors,S={len(text)},W={len(text) + 3}:2,").write_bytes(text)


def maildir_floors(root: Path) -> list[tuple[str, float]]:
    def open_session() -> None:
        MaildirMaildrop(str(root)).close()

    names = os.listdir(root / "cur")
    return [("open (as a session: lock, listing, sizes from names)", best_of(open_session)),
            ("reading the directory alone (os.listdir)", best_of(lambda: os.listdir(root / "cur"))),
            ("sorting the names alone", best_of(lambda: sorted(names)))]


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50000
    mb = int(sys.argv[2]) if len(sys.argv) > 2 else 210
    base = Path(f"/tmp/qpopper-bench-mbox-{n}-{mb}")
    base.mkdir(exist_ok=True)
    spool = base / "user"
    if not spool.exists():
        build(str(spool), n, mb)
    maildir = Path(f"/tmp/qpopper-bench-maildir-{n}")
    build_maildir(maildir, n)
    for title, rows in ((f"mbox, {n} messages, {spool.stat().st_size / 1e6:.0f} MB", mbox_floors(str(spool))),
                        (f"Maildir, {n} messages", maildir_floors(maildir))):
        total = rows[0][1]
        print(f"\n{title}\n\n| step | best of 5, ms | share of the open |\n|---|---|---|")
        for label, seconds in rows:
            print(f"| {label} | {seconds * 1000:.2f} | {100 * seconds / total:.0f} % |")


if __name__ == "__main__":
    main()
