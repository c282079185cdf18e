"""Where a session's time goes: py-spy samples of the daemon under load, per step.

bench/README.md's per-session budget comes from here. The server runs on
generated Maildirs (bench/guard.py's ~15 kB messages) with its default records
on (to a file, as bench/run.py runs it) while popbench drives it:

    login   popbench login -c 50 (USER, PASS, STAT, QUIT on a new connection)
    retr    popbench retr -c 1 (whole maildrops of 10 messages, RETR after RETR)

py-spy samples the daemon (`record -f raw`: one line per distinct stack). Each
sample is put in the step of the innermost frame a rule below knows, and the
samples of a step, divided by the sampling rate and by the sessions (or RETRs)
the load generator completed, give microseconds per session (per RETR). Time
in C (a system call, uvloop's transport) counts for the Python frame that
called it; samples with no frame of ours are the event loop's own work
(accepting, reading sockets, running callbacks).

    python bench/budget.py [--rev REV | --worktree] [--seconds S]

prints a Markdown table per scenario (and --json FILE keeps the figures).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from guard import PASSWORD, free_port, make_maildirs, stop  # bench/guard.py, beside this script
from run import wait_port

REPO = Path(__file__).resolve().parent.parent
USERS = 300
MESSAGES = 10
RATE = 997  # samples/s; prime, so it never beats with the event loop's timers

_Q = r"(?:\w+\.)*"  # py-spy names methods Class.name
# (step, pattern on "function (file)" of a frame). The innermost frame that
# matches one decides the step; the first matching rule wins for that frame.
RULES: list[tuple[str, str]] = [
    ("records (logging)", r"\(logging/|logsetup\.py|_records\.py"),
    ("maildrop: session lock", r"sessionlock\.py"),
    ("maildrop: read a message", rf"^{_Q}(read|_open|_find_moved) .*maildrop/"),
    ("maildrop: open and list", rf"^{_Q}(open_maildrop|expand_location|__init__|_list|_scan|_stat_or_none|messages"
                                r"|_uids\w*|_subdirs_of)\b.*maildrop/|<listcomp>.*maildrop/"),
    ("maildrop: close, commit", rf"^{_Q}(close|commit|writes_nothing|_lacks_seen) .*maildrop/"),
    ("maildrop: other", r"maildrop/"),
    ("authentication (passwd-file)", r"\(.*qpopper/auth/"),
    ("protocol: encoding (line ends, dot-stuffing)", r"_stuffing\.py"),
    ("protocol: USER", rf"^{_Q}cmd_user "),
    ("protocol: PASS", rf"^{_Q}(cmd_pass|auth_succeeded|maildrop_opened) "),
    ("protocol: STAT", rf"^{_Q}cmd_stat "),
    ("protocol: RETR", rf"^{_Q}cmd_retr "),
    ("protocol: LIST, UIDL", rf"^{_Q}(cmd_list|cmd_uidl) "),
    ("protocol: QUIT and UPDATE", rf"^{_Q}(cmd_quit|commit_done) "),
    ("protocol: greeting and session set-up", rf"^{_Q}(__init__|greeting) .*protocol/"),
    ("protocol: framing and dispatch", r"qpopper/protocol/"),
    ("server: login step", r"_login\.py"),
    ("server: retrieval (read, encode, write)", r"_retrieval\.py"),
    ("server: UPDATE and close of the maildrop", r"_update\.py"),
    ("server: accept and connection set-up", rf"^{_Q}(__init__|_security|new_timestamp) .*_connection\.py|_server\.py"),
    ("server: session end (records, close)", rf"^{_Q}(_finish|shutdown) .*_connection\.py"),
    ("server: connection loop (effects, flush)", r"_connection\.py"),
    ("server: stream (read, write: the send system call)", r"_stream\.py"),
    ("server: TLS", r"_tls\.py|ssl\.py"),
]
COMPILED = [(step, re.compile(pattern)) for step, pattern in RULES]
LOOP = "event loop (uvloop: accept, recv, callbacks, wake-ups)"


def step_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):  # innermost first
        for step, pattern in COMPILED:
            if pattern.search(frame):
                return step
    return LOOP


def classify(raw: Path) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[step_of(stack)] += int(n)
    return counts


def source_dir(args: argparse.Namespace, work: Path) -> Path:
    if args.worktree:
        src = REPO / "src"
    else:
        src = work / "src-export"
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.rev, "src"], capture_output=True, check=True)
        src.mkdir()
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
        src = src / "src"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(src)], check=True)
    return src


def profile(args: argparse.Namespace, work: Path, src: Path, scenario: str) -> dict[str, Any]:
    passwd = work / "passwd"
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(src))
    raw = (args.raw_dir or work) / f"{scenario}.raw"
    with open(work / "qpopper.log", "ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "qpopper", "--passwd-file", str(passwd),
             "--mail-location", f"maildir:{work}/maildir/%u", "--auth-fail-delay", "0",
             "--syslog-socket", "", f"127.0.0.1:{port}"],
            stdout=log, stderr=log, env=env, cwd=work,
        )
        try:
            wait_port(port, 20.0, server)
            load = ["login", "-c", "50"] if scenario == "login" else ["retr", "-c", "1"]
            driver = subprocess.Popen(
                [sys.executable, str(args.popbench), "run", *load, "-d", str(args.seconds + 1), "--warmup", "1",
                 "--users", str(USERS), "--password", PASSWORD, "--port", str(port), "--server-pid", str(server.pid)],
                stdout=subprocess.PIPE, text=True)
            # py-spy starts after popbench's warm-up second and stops before its end.
            time.sleep(1.5)
            spy = subprocess.run(
                [args.py_spy, "record", "-f", "raw", "-r", str(RATE), "-o", str(raw), "--pid", str(server.pid),
                 "-d", str(args.seconds), "--nonblocking"],
                capture_output=True, text=True, timeout=args.seconds + 60)
            out, _ = driver.communicate(timeout=args.seconds + 60)
        finally:
            stop(server)
    if spy.returncode != 0:
        raise RuntimeError(f"py-spy failed: {spy.stderr.strip()[-500:]}")
    result = json.loads([x for x in out.splitlines() if x.startswith("{")][-1])
    counts = classify(raw)
    # popbench's measured span and py-spy's overlap; scale by the sessions per second.
    units = result["messages"] if scenario == "retr" else result["sessions"]
    per_s = units / result["elapsed_s"]
    sampled_units = per_s * args.seconds
    return {
        "scenario": scenario,
        "units": "RETR" if scenario == "retr" else "session",
        "per_second": per_s,
        "server_cpu_us_per_unit": result["server_cpu_s"] / units * 1e6,
        "samples": sum(counts.values()),
        "us_per_unit": {step: n / RATE / sampled_units * 1e6 for step, n in counts.most_common()},
    }


def table(figures: dict[str, Any]) -> str:
    unit = figures["units"]
    rows = [f"### {figures['scenario']}: µs per {unit} ({figures['per_second']:.0f} {unit}s/s, "
            f"{figures['samples']} samples; server CPU by /proc {figures['server_cpu_us_per_unit']:.0f} µs per {unit})",
            "", "| step | µs |", "|---|---|"]
    rows += [f"| {step} | {us:.1f} |" for step, us in figures["us_per_unit"].items()]
    rows.append(f"| **sampled total** | **{sum(figures['us_per_unit'].values()):.0f}** |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default="HEAD", help="git revision to measure (default HEAD)")
    parser.add_argument("--worktree", action="store_true", help="measure the working tree's src/")
    parser.add_argument("--seconds", type=int, default=8, help="sampled seconds per scenario (default 8)")
    parser.add_argument("--scenarios", default="login,retr")
    parser.add_argument("--popbench", type=Path, default=REPO.parent / "shared" / "bench" / "popbench.py")
    parser.add_argument("--py-spy", default=str(Path(sys.executable).parent / "py-spy"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--raw-dir", type=Path, help="keep py-spy's raw stacks here (SCENARIO.raw)")
    args = parser.parse_args(argv)
    figures = []
    with tempfile.TemporaryDirectory(prefix="qpopper-budget-") as tmp:
        work = Path(tmp)
        make_maildirs(work, users=USERS, messages=MESSAGES)
        (work / "passwd").write_text(
            "".join(f"u{i}:{{PLAIN}}{PASSWORD}::::{work}::\n" for i in range(1, USERS + 1)))
        src = source_dir(args, work)
        for scenario in args.scenarios.split(","):
            figures.append(profile(args, work, src, scenario))
            print(table(figures[-1]))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
