"""What the metrics cost on the hot path: login and RETR, metrics on against off, in one run.

    python bench/metrics_cost.py [--rounds 4] [--seconds 3]          # CPU time, alternating A B A B
    python bench/metrics_cost.py --callgrind [--sessions 150]       # instruction counts (valgrind)

Two servers run side by side on the same generated Maildirs (bench/guard.py's
mail and load driver): A without metrics, B with `--metrics-listen`. The
CPU mode alternates A and B, reads each server's CPU time from /proc and
prints the medians of server CPU per login session and per GB retrieved,
and B/A. The callgrind mode runs each server under valgrind's callgrind
(PYTHONHASHSEED=0) for a fixed workload and for none, and prints the
instructions the workload cost, per session and per message retrieved:
the figure that other load on the machine does not move. The exporter
process (which only works when scraped) is not counted in either mode.

Run it alone on the machine: python bench/metrics_cost.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from guard import (  # bench/guard.py, beside this script
    MESSAGES,
    PASSWORD,
    USERS,
    Client,
    free_port,
    make_maildirs,
    measure,
    stop,
)
from run import wait_port  # bench/run.py

REPO = Path(__file__).resolve().parent.parent


def server_command(work: Path, port: int, metrics: bool) -> list[str]:
    passwd = work / "passwd"
    command = [sys.executable, "-m", "qpopper", "--passwd-file", str(passwd),
               "--mail-location", f"maildir:{work}/maildir/%u", "--auth-fail-delay", "0", "--syslog-socket", ""]
    if metrics:
        command += ["--metrics-listen", "127.0.0.1:0", "--metrics-dir", str(work / f"metrics-{port}")]
    return [*command, f"127.0.0.1:{port}"]


def environment() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, PYTHONHASHSEED="0")


def prepare(work: Path) -> None:
    make_maildirs(work)
    (work / "passwd").write_text("".join(f"u{i}:{{PLAIN}}{PASSWORD}::::{work}::\n" for i in range(1, USERS + 1)))


def cpu_mode(work: Path, rounds: int, seconds: float) -> dict[str, Any]:
    servers = {}
    logs = []
    try:
        for name, metrics in (("off", False), ("on", True)):
            port = free_port()
            log = open(work / f"qpopper-{name}.log", "wb")  # noqa: SIM115 - closed below
            logs.append(log)
            proc = subprocess.Popen(server_command(work, port, metrics), stdout=log, stderr=log, env=environment(),
                                    cwd=work)
            servers[name] = (port, proc)
            wait_port(port, 20.0, proc)
        figures: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
        for _ in range(rounds):
            for name, (port, proc) in servers.items():
                figures[name].append(measure(port, proc.pid, seconds))
    finally:
        for _, proc in servers.values():
            stop(proc)
        for log in logs:
            log.close()
    medians = {name: {key: statistics.median(f[key] for f in runs) for key in ("login", "retr")}
               for name, runs in figures.items()}
    return {
        "mode": "cpu", "rounds": rounds, "seconds": seconds,
        "medians": medians,  # login: server CPU ms per session; retr: server CPU s per GB
        "ratio": {k: medians["on"][k] / medians["off"][k] for k in ("login", "retr")},
        "runs": figures,
    }


def _instructions(work: Path, metrics: bool, sessions: int, downloads: int) -> int:
    """Instructions callgrind counted in the server for `sessions` login
    sessions and `downloads` whole-maildrop downloads (0 and 0: start and stop only)."""
    port = free_port()
    out = work / f"callgrind-{port}.out"
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--trace-children=no",
               *server_command(work, port, metrics)]
    with open(work / f"valgrind-{port}.log", "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=log, env=environment(), cwd=work)
        try:
            wait_port(port, 300.0, proc)
            asyncio.run(_fixed_work(port, sessions, downloads))
        finally:
            stop(proc)
            proc.wait()
    text = (work / f"valgrind-{port}.log").read_text()
    # The daemon's own count: the exporter it forks prints one too.
    match = re.search(rf"=={proc.pid}== Collected : (\d+)", text)
    if match is None:
        raise RuntimeError(f"callgrind gave no count: {text[-500:]}")
    return int(match.group(1))


async def _fixed_work(port: int, sessions: int, downloads: int) -> None:
    """`sessions` logins (login, QUIT) one after another, then `downloads` whole maildrops."""
    for n in range(sessions):
        client = await Client.connect(port)
        await client.login(f"u{n % USERS + 1}")
        await client.quit()
    for n in range(downloads):
        client = await Client.connect(port)
        await client.login(f"u{n % USERS + 1}")
        count = int((await client.command("STAT")).split()[1])
        for i in range(1, count + 1):
            await client.retr(i)
        await client.quit()


def callgrind_mode(work: Path, sessions: int, downloads: int) -> dict[str, Any]:
    result: dict[str, Any] = {"mode": "callgrind", "sessions": sessions, "downloads": downloads}
    for name, metrics in (("off", False), ("on", True)):
        idle = _instructions(work, metrics, 0, 0)
        logins = _instructions(work, metrics, sessions, 0)
        retrievals = _instructions(work, metrics, 0, downloads)
        result[name] = {
            "start_stop": idle,
            "per_login_session": (logins - idle) / sessions,
            "per_message_retrieved": (retrievals - idle) / (downloads * MESSAGES),
        }
    result["ratio"] = {k: result["on"][k] / result["off"][k] for k in ("per_login_session", "per_message_retrieved")}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--callgrind", action="store_true", help="instruction counts under valgrind instead")
    parser.add_argument("--sessions", type=int, default=150, help="callgrind: login sessions")
    parser.add_argument("--downloads", type=int, default=3, help="callgrind: whole-maildrop downloads")
    a = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qpopper-metrics-cost-") as tmp:
        work = Path(tmp)
        prepare(work)
        result = callgrind_mode(work, a.sessions, a.downloads) if a.callgrind else cpu_mode(work, a.rounds, a.seconds)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
