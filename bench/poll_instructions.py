#!/usr/bin/env python3
"""Instructions of a big maildrop's cold open, warm open and poll, per revision, counted by callgrind.

bench/poll.py gives wall-clock and CPU-tick figures against Dovecot; on a
loaded machine one cold sample moves by tens of percent. Instruction counts
do not, so this is the A/B for the maildrop code itself: each revision's
src/ is exported from git, and a child process (under valgrind --tool=callgrind,
PYTHONHASHSEED=0) opens its own copy of bench/poll.py's generated maildrop
in-process, with the counters zeroed after the imports and dumped after the
step:

    cold   open (no kept index or listing), STAT, UIDL | close
    warm   the same after a session that kept them, nothing delivered since
    poll   one message delivered (as an MDA does), then open, STAT, UIDL |
           RETR of the new message, UPDATE (it is marked seen), close

each counted in two parts ("_open": what the login and UIDL wait for;
"_close": the rest, where the kept index or listing is written).

The maildrop layer only: no sockets, no login, no event loop (bench/poll.py
has those). Prints one JSON line per revision, format and size.

    python bench/poll_instructions.py --mail /tmp/qpopper-poll-mail --sizes 50000 \\
        --revs HEAD,7a8f538,main --formats mbox,maildir
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from instructions import callgrind, total_instructions  # bench/instructions.py, beside this script
from poll import copy_mail, deliver, maildrop_of, new_message

REPO = Path(__file__).resolve().parent.parent

# The child: imports, then each step when told; the parent zeroes and dumps the counters around it.
CHILD = r"""
import sys
from qpopper.maildrop import MaildropSettings
from qpopper.maildrop.maildir import MaildirMaildrop
from qpopper.maildrop.mbox import MboxMaildrop
for optional in ("qpopper.maildrop.maildirlisting", "qpopper.maildrop.mbox.indexcache"):
    try:
        __import__(optional)
    except ImportError:
        pass  # a revision before the kept indexes
fmt, path = sys.argv[1], sys.argv[2]
print("ready", flush=True)
while sys.stdin.readline():
    md = MaildirMaildrop(path) if fmt == "maildir" else MboxMaildrop(path, MaildropSettings(server_mode=True))
    infos = md.messages()
    n = len(infos)
    infos.uids
    print("opened", flush=True)
    poll = sys.stdin.readline().strip() == "poll"
    if poll:
        b"".join(md.read(n - 1))
        md.commit(set(), {n - 1})
    md.close()
    print("closed", flush=True)
"""


def export(rev: str, work: Path) -> Path:
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    dest = work / f"src-{sha[:12]}"
    if not (dest / "src" / "qpopper").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", sha, "src"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(dest / "src")], check=True)
    return dest / "src"


def measure(src: Path, fmt: str, maildrop: Path, work: Path) -> dict[str, int]:
    """Instructions of each step, in one child: cold, warm, poll; each split
    into its open (open, STAT, UIDL: what the login waits for) and the rest
    (for the poll its RETR and UPDATE; then the close, which keeps the index)."""
    out = work / "callgrind.out"
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONPATH=str(src))
    child = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-c", CHILD, fmt,
         str(maildrop)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
        text=True)
    assert child.stdin is not None
    assert child.stdout is not None
    stdin, stdout = child.stdin, child.stdout

    def say(line: str, answer: str) -> int:
        callgrind(child.pid, "--zero")
        stdin.write(line + "\n")
        stdin.flush()
        if stdout.readline() != answer + "\n":
            raise RuntimeError(f"the child failed ({line!r})")
        callgrind(child.pid, "--dump")
        dumps = sorted(work.glob("callgrind.out.*"), key=lambda p: p.stat().st_mtime)
        return total_instructions(dumps[-1])

    result: dict[str, int] = {}
    try:
        if stdout.readline() != "ready\n":
            raise RuntimeError("the child did not start")
        for step in ("cold", "warm", "poll"):
            if step == "poll":
                deliver(fmt, maildrop, new_message(1))
            result[f"{step}_open"] = say("open", "opened")
            result[f"{step}_close"] = say("poll" if step == "poll" else "close", "closed")
            if step == "cold":
                # A session right after the copy may find the directories or the
                # spool just changed (their times not yet trusted): one more keeps them.
                say("open", "opened")
                say("close", "closed")
    finally:
        stdin.close()
        child.wait(60)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mail", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "qpopper-poll-mail"),
                   help="bench/poll.py's generated maildrops (it makes them)")
    p.add_argument("--sizes", default="50000")
    p.add_argument("--formats", default="mbox,maildir")
    p.add_argument("--revs", default="HEAD,7a8f538")
    a = p.parse_args()
    if shutil.which("valgrind") is None:
        print("bench/poll_instructions.py: valgrind is missing", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="qpopper-pollgrind-") as tmp:
        work = Path(tmp)
        for fmt in a.formats.split(","):
            for n in (int(x) for x in a.sizes.split(",")):
                src_mail = Path(a.mail) / f"{fmt}-{n}"
                if not src_mail.is_dir():
                    print(f"bench/poll_instructions.py: no {src_mail} (run bench/poll.py once)", file=sys.stderr)
                    return 2
                for rev in a.revs.split(","):
                    root = work / f"{fmt}-{n}-{rev}"
                    copy_mail(src_mail, root / "mail", fmt)
                    row: dict[str, Any] = {"format": fmt, "messages": n, "rev": rev}
                    row.update(measure(export(rev, work), fmt, maildrop_of(root, fmt), work))
                    print(json.dumps(row), flush=True)
                    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
