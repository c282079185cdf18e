"""System calls per login session, counted by strace on the daemon.

The kernel's share of a login (15-45 % of our CPU in bench/run.py's reports)
is not in bench/instructions.py's counts; this gives its other half. The
server runs as instructions.py runs it (the guard's Maildirs, {PLAIN}
passwords, our default records to a file); after a warm-up, strace attaches
to every thread of the daemon (`-f -p`), a fixed number of login sessions
(USER, PASS, STAT, QUIT) run one after another, and strace detaches:

    python bench/syscalls.py [--sessions N] [--trace FILE] [--load SECONDS] [--retrs N]

`--retrs N` counts N RETRs of ~15 kB in one session instead (per RETR).
`--load S` drives popbench's login scenario instead (10 clients for S
seconds, as under bench/run.py's load, where one event-loop turn serves several
sessions) and divides by the sessions popbench completed. strace slows the
server several times over, so only the counts mean anything, never the times.

prints one JSON object: system calls per session, in all and by name
(`--trace FILE` also keeps strace's full log of the sessions, to read which
call belongs to which step).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from guard import USERS, free_port, make_maildirs, stop  # bench/guard.py, beside this script
from instructions import REPO, login_sessions, popbench_logins, retrs, server_command
from run import wait_port

# strace -c's table: "% time  seconds  usecs/call  calls  [errors]  syscall".
_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?([a-z_0-9]+)\s*$")


def parse_summary(text: str) -> dict[str, int]:
    calls: dict[str, int] = {}
    for line in text.splitlines():
        m = _ROW.match(line)
        if m and m.group(2) != "total":
            calls[m.group(2)] = int(m.group(1))
    return calls


def measure(work: Path, sessions: int, trace: Path | None, load: float | None = None,
            retr_count: int | None = None) -> dict[str, Any]:
    make_maildirs(work)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    port = free_port()
    with open(work / "server.log", "wb") as log:  # our default records, to a file as in bench/run.py
        server = subprocess.Popen(server_command(work, port, None), stdout=log, stderr=log, env=env, cwd=work)
        try:
            wait_port(port, 60.0, server)
            login_sessions(port, 60)  # warm-up: imports, caches, the thread pool
            summary = work / "strace.txt"
            mode = ["-o", str(trace)] if trace is not None else ["-c", "-o", str(summary)]
            tracer = subprocess.Popen(["strace", "-f", "-qq", *mode, "-p", str(server.pid)],
                                      stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # strace has attached every thread by then
            if retr_count is not None:
                retrs(port, retr_count)
                sessions = retr_count
            elif load is None:
                login_sessions(port, sessions)
            else:
                sessions = popbench_logins(port, load, 10, USERS)
            time.sleep(0.5)  # the last session's close and records
            tracer.send_signal(signal.SIGINT)
            tracer.wait(30)
        finally:
            stop(server)
    if trace is not None:
        lines = [ln for ln in trace.read_text().splitlines() if "(" in ln and "resumed>" not in ln]
        names: dict[str, int] = {}
        for ln in lines:
            name = re.sub(r"^\d+\s+", "", ln).split("(", 1)[0]
            names[name] = names.get(name, 0) + 1
        calls = names
    else:
        calls = parse_summary(summary.read_text())
    total = sum(calls.values())
    return {"sessions": sessions, "per_session": round(total / sessions, 2),
            "by_call": {k: round(v / sessions, 2) for k, v in sorted(calls.items(), key=lambda kv: -kv[1])}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=200, help="login sessions counted (default 200)")
    parser.add_argument("--trace", type=Path, help="keep strace's full log here (counts come from it)")
    parser.add_argument("--load", type=float, metavar="SECONDS", help="popbench login -c 10 for SECONDS instead")
    parser.add_argument("--retrs", type=int, metavar="N", help="N RETRs in one session instead (figures per RETR)")
    a = parser.parse_args(argv)
    if shutil.which("strace") is None:
        print("bench/syscalls.py: strace is missing (apt-get install -y strace)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="qpopper-strace-") as tmp:
        print(json.dumps(measure(Path(tmp), a.sessions, a.trace, a.load, a.retrs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
