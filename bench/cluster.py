"""Scaling out: one instance against two behind HAProxy, each on a core of its own.

    .venv/bin/python bench/cluster.py --quick   # 1 round of 3 s per case
    .venv/bin/python bench/cluster.py           # 3 rounds of 8 s

Three set-ups serve the same Maildir (one directory, as shared storage would
be), each qpopper process pinned to one core with taskset:

- `one`: one instance, the clients connect to it directly;
- `one+lb`: the same instance behind HAProxy (PROXY v2): HAProxy's own cost;
- `two+lb`: two instances (cores 0 and 1) behind HAProxy, round robin.

For login churn (`popbench login -c 50`) and downloads (`popbench retr -c 8`,
every byte checked against the generator's manifest), alternating the
set-ups round by round, it reports sessions/s (and MB/s), the servers' CPU
per session (both instances summed), HAProxy's CPU per session (from /proc),
and two+lb over one. The client (popbench) and HAProxy run on the same two
cores as the servers, so the two-instance figure is bounded by what is left
for them: the report says how much CPU each took, each instance's share of
the servers' CPU, and the capacity the CPU per session implies (sessions/s
with a core per instance and nothing else on it). Writes
bench/results/CLUSTER.md (or --out) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "benchpass"
RETR_USERS = 16
LOGIN_USERS = 1000
CLOCK = os.sysconf("SC_CLK_TCK")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK


def popbench_json(stdout: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        if line.strip().startswith("{"):
            try:
                data: dict[str, Any] = json.loads(line)
                return data
            except json.JSONDecodeError:
                pass
    raise RuntimeError(f"no JSON from popbench: {stdout[-500:]}")


class Cluster:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []
        base = args.port_base
        self.direct_port = base
        self.backend_ports = (base + 1, base + 2)
        self.lb_one, self.lb_two = base + 10, base + 11
        self.pids: dict[str, list[int]] = {}
        self.haproxy_pid = 0

    def start(self) -> None:
        mail = self.work / "mail"
        users = sorted(os.listdir(mail / "maildir"))
        passwd = self.work / "passwd"
        passwd.write_text("".join(f"{u}:{{PLAIN}}{PASSWORD}::::{self.work}::\n" for u in users))
        common = [
            self.args.python, "-m", "qpopper", "--passwd-file", str(passwd),
            "--mail-location", f"maildir:{mail}/maildir/%u", "--auth-fail-delay", "0",
            "--max-connections", "20000", "--max-connections-per-ip", "20000", "--syslog-socket=",
            "--nonauth-file=", "-R",
        ]
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
        direct = self._spawn(["taskset", "-c", "0", *common, f"127.0.0.1:{self.direct_port}"], "direct", env)
        behind = []
        for core, port in enumerate(self.backend_ports):
            behind.append(self._spawn(
                ["taskset", "-c", str(core), *common, f"--haproxy-listen=127.0.0.1:{port}",
                 "--haproxy-trusted-networks=127.0.0.1/32"], f"backend{core}", env))
        self.pids = {"one": [direct.pid], "one+lb": [behind[0].pid], "two+lb": [p.pid for p in behind]}
        servers = "\n".join(
            f"    server s{i} 127.0.0.1:{port} send-proxy-v2" for i, port in enumerate(self.backend_ports)
        )
        config = self.work / "haproxy.cfg"
        config.write_text(f"""global
    maxconn 4000
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend one
    bind 127.0.0.1:{self.lb_one}
    default_backend one
frontend two
    bind 127.0.0.1:{self.lb_two}
    default_backend two
backend one
    server s0 127.0.0.1:{self.backend_ports[0]} send-proxy-v2
backend two
    balance roundrobin
{servers}
""")
        haproxy = self._spawn([self.args.haproxy, "-db", "-f", str(config)], "haproxy", env)
        self.haproxy_pid = haproxy.pid
        for port, proc in ((self.direct_port, direct), *zip(self.backend_ports, behind, strict=True),
                           (self.lb_one, haproxy), (self.lb_two, haproxy)):
            try:
                wait_port(port, proc)
            except RuntimeError as exc:
                logs = "".join(f.read_text(errors="replace")[-1500:] for f in self.work.glob("*.log"))
                raise RuntimeError(f"{exc}\n{logs}") from None

    def _spawn(self, cmd: list[str], name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.work / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.work,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def port(self, setup: str) -> int:
        ports: dict[str, int] = {"one": self.direct_port, "one+lb": self.lb_one, "two+lb": self.lb_two}
        return ports[setup]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def measure(cluster: Cluster, args: argparse.Namespace, setup: str, scenario: str) -> dict[str, Any]:
    work = cluster.work
    if scenario == "login":
        extra = ["login", "-c", "50", "--user-format", "l{i}", "--users", str(LOGIN_USERS)]
    else:
        extra = ["retr", "-c", "8", "--users", str(RETR_USERS), "--manifest", str(work / "mail")]
    cmd = [args.python, str(args.popbench), "run", *extra, "--port", str(cluster.port(setup)),
           "--password", PASSWORD, "-d", str(args.duration), "--warmup", "1",
           *[f"--server-pid={pid}" for pid in cluster.pids[setup]]]
    lb_before = cpu_seconds(cluster.haproxy_pid)
    servers_before = [cpu_seconds(pid) for pid in cluster.pids[setup]]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration * 10 + 120)
    lb_cpu = cpu_seconds(cluster.haproxy_pid) - lb_before
    # Each instance's share of the servers' CPU (warm-up included): how evenly the balancer split the work.
    spent = [cpu_seconds(pid) - before for pid, before in zip(cluster.pids[setup], servers_before, strict=True)]
    result = popbench_json(out.stdout)
    if not result.get("ok"):
        raise RuntimeError(f"{setup} {scenario}: {result.get('errors')} errors: {result.get('error_samples')}")
    # The warm-up's sessions are in HAProxy's CPU too: scale by the measured share of the run.
    measured = float(result["elapsed_s"])
    lb_cpu *= measured / (measured + 1.0)
    sessions = int(result["sessions"])
    if "server_cpu_ms_per_session" not in result and sessions:  # retr reports per GB
        server_cpu = float(result["server_cpu_s_per_gb"]) * float(result["mbytes"]) / 1000
        result["server_cpu_ms_per_session"] = round(1000 * server_cpu / sessions, 3)
    result["haproxy_cpu_ms_per_session"] = round(1000 * lb_cpu / sessions, 3) if setup != "one" and sessions else 0.0
    # Capacity: the sessions/s the set-up would serve if each instance had its core
    # to itself (nothing else on it): one core-second per busiest instance's share.
    busiest = max(spent) / sum(spent) if sum(spent) > 0 else 1.0
    result["instance_shares"] = [round(x / sum(spent), 3) for x in spent] if sum(spent) > 0 else []
    cpu_ms = float(result.get("server_cpu_ms_per_session") or 0)
    result["capacity_per_s"] = round(1000 / cpu_ms / busiest, 1) if cpu_ms > 0 else float("nan")
    return result


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(results: dict[tuple[str, str], list[dict[str, Any]]], args: argparse.Namespace) -> str:
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    lines = [
        "# Scaling out: one instance against two behind HAProxy",
        "",
        f"Commit {rev}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
        f"{args.rounds} round(s) of {args.duration} s per case (medians). Command: "
        f"`.venv/bin/python bench/cluster.py{' --quick' if args.quick else ''}`.",
        "Each qpopper process is pinned to one core (taskset); HAProxy (1 thread) and the popbench client",
        "are not pinned and share the same two cores.",
        "",
        "| scenario | set-up | sessions/s | MB/s | server CPU ms/session | HAProxy CPU ms/session |"
        " client CPU (cores) | other CPU (cores) | instance shares | capacity sessions/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario in ("login", "retr"):
        for setup in ("one", "one+lb", "two+lb"):
            runs = results.get((scenario, setup), [])
            if not runs:
                continue

            def m(key: str, runs: list[dict[str, Any]] = runs) -> float:
                return median([float(r[key]) for r in runs if r.get(key) is not None])

            mbs = f"{m('mb_per_s'):.1f}" if scenario == "retr" else ""
            shares = "/".join(f"{median([r['instance_shares'][i] for r in runs]):.2f}"
                              for i in range(len(runs[0].get("instance_shares", []))))
            lines.append(
                f"| {scenario} | {setup} | {m('sessions') / m('elapsed_s'):.1f} | {mbs} | "
                f"{m('server_cpu_ms_per_session'):.3f} | {m('haproxy_cpu_ms_per_session'):.3f} | "
                f"{m('client_cpu_util'):.2f} | {m('other_cpu_util'):.2f} | {shares} | {m('capacity_per_s'):.0f} |"
            )
    lines += ["", "| scenario | measured two+lb / one | two+lb / one+lb | capacity two+lb / one | two+lb / one+lb |",
              "|---|---|---|---|---|"]
    for scenario in ("login", "retr"):
        def rate(setup: str, key: str = "", scenario: str = scenario) -> float:
            runs = results.get((scenario, setup), [])
            if key:
                return median([float(r[key]) for r in runs])
            return median([r["sessions"] / r["elapsed_s"] for r in runs])

        lines.append(f"| {scenario} | {rate('two+lb') / rate('one'):.2f} | {rate('two+lb') / rate('one+lb'):.2f} | "
                     f"{rate('two+lb', 'capacity_per_s') / rate('one', 'capacity_per_s'):.2f} | "
                     f"{rate('two+lb', 'capacity_per_s') / rate('one+lb', 'capacity_per_s'):.2f} |")
    lines += ["", "Capacity: 1000 / (server CPU ms per session) / (the busiest instance's share of the servers'",
              "CPU), the sessions/s if each instance had its core to itself; it extrapolates from CPU per",
              "session measured under this run's contention, which inflates it (cache and scheduler",
              "interference from the client, HAProxy and other tenants on the same cores)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 round of 3 s per case")
    p.add_argument("--rounds", type=int)
    p.add_argument("--duration", type=float)
    p.add_argument("--scenarios", default="login,retr")
    p.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python")
                   if (REPO / ".venv" / "bin" / "python").exists() else sys.executable)
    shared = Path(os.environ.get("QPOPPER_BENCH_SHARED", REPO.parent / "shared" / "bench"))
    p.add_argument("--popbench", default=str(shared / "popbench.py"))
    p.add_argument("--haproxy", default=shutil.which("haproxy") or "/usr/sbin/haproxy")
    p.add_argument("--port-base", type=int, default=11310)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "CLUSTER.md"))
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (3.0 if args.quick else 8.0)
    for program in (args.haproxy, args.popbench, shutil.which("taskset") or "/usr/bin/taskset"):
        if not os.path.exists(program):
            print(f"missing: {program}", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="qpopper-cluster-bench-") as tmp:
        work = Path(tmp)
        gen = [args.python, args.popbench, "gen-maildir", "--out", str(work / "mail")]
        subprocess.run([*gen, "--users", str(RETR_USERS), "--messages", "200"], check=True, capture_output=True)
        subprocess.run([*gen, "--users", str(LOGIN_USERS), "--user-format", "l{i}", "--messages", "10"],
                       check=True, capture_output=True)
        cluster = Cluster(args, work)
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        try:
            cluster.start()
            for round_no in range(args.rounds):
                for scenario in args.scenarios.split(","):
                    for setup in ("one", "one+lb", "two+lb"):
                        log(f"round {round_no + 1}: {scenario} {setup}")
                        results.setdefault((scenario, setup), []).append(measure(cluster, args, setup, scenario))
        finally:
            cluster.stop()
    text = report(results, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
