"""Two revisions of the server side by side in one run: login and RETR CPU, A B A B.

    python bench/revisions.py REV_A REV_B [--rounds 6] [--seconds 3]

Two bench/run.py runs one after the other on a machine whose other load moves
by a core between them compare that load more than the code. Here the servers
of both revisions (each a `git archive` of its src/, byte-compiled as run.py
does) run at once on the same generated Maildirs, with our default records to
a file, and are measured in turn, round after round (bench/guard.py's driver:
login churn with 10 clients, then whole-maildrop downloads), so a change in the
machine's load falls on both. Prints one JSON object: per revision the medians
of server CPU per login session (ms, /proc), logins per second, server CPU per
GB retrieved (s), and B/A of each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from guard import PASSWORD, USERS, free_port, make_maildirs, measure, stop  # bench/guard.py, beside this script
from run import export_source, wait_port  # bench/run.py


def server_command(work: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "qpopper", "--passwd-file", str(work / "passwd"),
            "--mail-location", f"maildir:{work}/maildir/%u", "--auth-fail-delay", "0", "--syslog-socket", "",
            f"127.0.0.1:{port}"]


def compare(work: Path, revisions: list[str], rounds: int, seconds: float) -> dict[str, Any]:
    make_maildirs(work)
    (work / "passwd").write_text("".join(f"u{i}:{{PLAIN}}{PASSWORD}::::{work}::\n" for i in range(1, USERS + 1)))
    servers: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
    figures: dict[str, list[dict[str, float]]] = {rev: [] for rev in revisions}
    try:
        for rev in revisions:
            src = export_source(argparse.Namespace(worktree=False, rev=rev, work=str(work), python=sys.executable))
            port = free_port()
            with open(work / f"qpopper-{rev}.log", "wb") as log:  # the server writes to its own copy
                proc = subprocess.Popen(server_command(work, port), stdout=log, stderr=log, cwd=work,
                                        env=dict(os.environ, PYTHONPATH=str(src)))
            servers[rev] = (port, proc)
            wait_port(port, 30.0, proc)
        for _ in range(rounds):
            for rev, (port, proc) in servers.items():
                run = measure(port, proc.pid, seconds)
                run["logins_per_s"] = run["sessions"] / seconds
                figures[rev].append(run)
    finally:
        for _, proc in servers.values():
            stop(proc)
    keys = ("login", "logins_per_s", "retr")
    medians = {rev: {k: round(statistics.median(r[k] for r in runs), 4) for k in keys} for rev, runs in figures.items()}
    a, b = revisions
    return {
        "rounds": rounds, "seconds": seconds,
        "medians": medians,  # login: server CPU ms per session; retr: server CPU s per GB
        "b_over_a": {k: round(medians[b][k] / medians[a][k], 3) for k in keys},
        "runs": figures,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev_a")
    parser.add_argument("rev_b")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=3.0)
    a = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qpopper-revisions-") as tmp:
        result = compare(Path(tmp), [a.rev_a, a.rev_b], a.rounds, a.seconds)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
