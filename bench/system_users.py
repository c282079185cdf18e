"""Login churn in system-users mode (PAM, a process per session that drops
to the user), side by side with a private Dovecot on the same accounts.

    sudo .venv/bin/python bench/system_users.py [--users 16] [--rounds 3] [-d 10]

It creates the Unix accounts qpbench1..N (password "pass") with useradd,
runs popbench's login scenario against `qpopper` started as root in
system-users mode and against Dovecot, alternating, and removes the
accounts afterwards. Root is needed for both useradd and the privilege drop.

Dovecot is, by default (`--dovecot pam`), a private instance started as
root with `passdb pam` on the same PAM service and `userdb passwd`, the
same accounts and the same /var/mail spools: each login checks the
account's real hash (yescrypt on Debian 12, or `--crypt-method`), as ours
does, and its pop3 process runs as the user. `--dovecot passwd-file` is
the earlier comparison (../shared/bench/dovecot.sh: rootless, {PLAIN}
passwords from a file, the same user names).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("QPOPPER_BENCH_SHARED", REPO.parent / "shared" / "bench"))
POPBENCH = SHARED / "popbench.py"
PASSWORD = "pass"


def sh(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload]


def make_users(n: int, crypt_method: str | None) -> list[str]:
    names = [f"qpbench{i}" for i in range(1, n + 1)]
    method = ["-c", crypt_method] if crypt_method else []
    for name in names:
        subprocess.run(["userdel", "-r", name], capture_output=True)
        sh(["useradd", "-m", "-U", name])
        subprocess.run(["chpasswd", *method], input=f"{name}:{PASSWORD}\n", text=True, check=True)
    return names


def remove_users(names: list[str]) -> None:
    for name in names:
        subprocess.run(["userdel", "-r", name], capture_output=True)
        Path("/var/mail", name).unlink(missing_ok=True)
        for leftover in Path("/var/mail").glob(f".{name}.*"):
            leftover.unlink(missing_ok=True)


def start_qpopper(python: str, port: int, pam_service: str, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [python, "-m", "qpopper", f"--pam-service={pam_service}", "--auth-fail-delay=0", "--syslog-socket=",
         "--no-reverse-lookup", "--nonauth-file=", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        # A session of its own, as Dovecot's master makes itself (and as a service
        # manager runs either): with autogroup scheduling the kernel shares CPU between
        # sessions first, and left in ours the server would share a slice with popbench.
        start_new_session=True,
    )
    deadline = time.monotonic() + 20
    while b"listening on" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"qpopper did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return proc


def start_dovecot_pam(work: Path, port: int, pam_service: str) -> int:
    """A private Dovecot as root: passdb pam, userdb passwd, the users' /var/mail spools."""
    base = work / "dovecot-pam"
    for sub in ("run", "state", "log"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    conf = base / "dovecot.conf"
    conf.write_text(
        f"protocols = pop3\nlisten = 127.0.0.1\nbase_dir = {base}/run\nstate_dir = {base}/state\n"
        f"instance_name = bench-pam-{port}\nlog_path = {base}/log/dovecot.log\n"
        "disable_plaintext_auth = no\nauth_mechanisms = plain\nfirst_valid_uid = 1000\n"
        "mail_location = mbox:~/mail:INBOX=/var/mail/%u\nmail_privileged_group = mail\n"
        "mail_max_userip_connections = 100000\n"
        f"passdb {{\n  driver = pam\n  args = {pam_service}\n}}\nuserdb {{\n  driver = passwd\n}}\nssl = no\n"
        f"service pop3-login {{\n  inet_listener pop3 {{\n    address = 127.0.0.1\n    port = {port}\n  }}\n"
        "  process_limit = 2000\n  service_count = 1\n}\nservice pop3 {\n  process_limit = 2000\n}\n"
        "service anvil {\n  client_limit = 4100\n}\nservice auth {\n  client_limit = 4100\n}\n"
    )
    with open(base / "log" / "start.out", "wb") as out:  # not a pipe: the forked master's children keep it
        subprocess.run(["/usr/sbin/dovecot", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT, check=True,
                       timeout=60)
    deadline = time.monotonic() + 20
    pid_file = base / "run" / "master.pid"
    while not pid_file.exists() or not pid_file.read_text().strip():
        if time.monotonic() > deadline:
            raise SystemExit(f"Dovecot (pam) did not start: {(base / 'log' / 'dovecot.log').read_text()[-2000:]}")
        time.sleep(0.05)
    return int(pid_file.read_text().split()[0])


def stop_pid(pid: int) -> None:
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def run_login(python: str, port: int, pid: int, users: int, concurrency: int, duration: int) -> dict[str, float]:
    out = sh(
        [python, str(POPBENCH), "run", "login", "--port", str(port), "--server-pid", str(pid),
         "-c", str(concurrency), "-d", str(duration), "--runs", "1", "--password", PASSWORD,
         "--user-format", "qpbench{i}", "--users", str(users)]
    ).stdout
    line = [json.loads(x) for x in out.splitlines() if x.startswith("{")][-1]
    if not line.get("ok", False):
        raise SystemExit(f"login run failed: {line.get('errors')}")
    return {"sessions_per_s": float(line["sessions_per_s"]), "cpu_ms": float(line["server_cpu_ms_per_session"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # More users than -c: a user whose last session still holds its POP lock gets [IN-USE].
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-d", "--duration", type=int, default=10)
    parser.add_argument("-c", "--concurrency", type=int, default=16)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--crypt-method", help="chpasswd -c METHOD (default: the system's, yescrypt on Debian 12)")
    parser.add_argument("--dovecot", choices=("pam", "passwd-file"), default="pam",
                        help="pam: a root Dovecot with passdb pam on the same accounts (default); "
                             "passwd-file: dovecot.sh's rootless instance with {PLAIN} passwords")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("system_users.py: run as root (useradd, PAM, privilege drop)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="qpopper-sysbench-"))
    work.chmod(0o755)  # Dovecot's processes run as its own user
    pam_service = f"qpopper-bench-{uuid.uuid4().hex[:6]}"
    shutil.copy(REPO / "packaging" / "pam.d" / "pop3", f"/etc/pam.d/{pam_service}")
    names = make_users(args.users, args.crypt_method)
    results: dict[str, list[dict[str, float]]] = {"dovecot": [], "qpopper": []}
    dovecot_pid = None
    qpopper: subprocess.Popen[bytes] | None = None
    try:
        (work / "mail" / "maildir").mkdir(parents=True)
        for name in names:  # Dovecot serves the same names from its passwd-file
            for sub in ("cur", "new", "tmp"):
                (work / "mail" / "maildir" / name / sub).mkdir(parents=True)
        subprocess.run(["chmod", "-R", "a+rwX", str(work / "mail")], check=True)
        if args.dovecot == "pam":
            dovecot_pid = start_dovecot_pam(work, 11510, pam_service)
        else:
            out = sh(["bash", str(SHARED / "dovecot.sh"), "start", "--dir", str(work / "dovecot"), "--format",
                      "maildir", "--mail", str(work / "mail"), "--port", "11510", "--password", PASSWORD]).stdout
            dovecot_pid = int(re.findall(r"\d+", out)[-1])
        qpopper = start_qpopper(args.python, 11520, pam_service, work / "qpopper.log")
        for _ in range(args.rounds):
            results["dovecot"].append(
                run_login(args.python, 11510, dovecot_pid, args.users, args.concurrency, args.duration)
            )
            results["qpopper"].append(
                run_login(args.python, 11520, qpopper.pid, args.users, args.concurrency, args.duration)
            )
    finally:
        if qpopper is not None:  # also when a run failed: it holds the port and the PAM service
            qpopper.terminate()
            qpopper.wait(60)
        if dovecot_pid is not None:
            stop_pid(dovecot_pid)
        remove_users(names)
        Path(f"/etc/pam.d/{pam_service}").unlink(missing_ok=True)
    for side, runs in results.items():
        rates = sorted(r["sessions_per_s"] for r in runs)
        cpu = sorted(r["cpu_ms"] for r in runs)
        print(f"{side}: sessions/s median {rates[len(rates) // 2]:.0f} (runs {', '.join(f'{x:.0f}' for x in rates)}), "
              f"server CPU ms/session median {cpu[len(cpu) // 2]:.2f}")
    ours = sorted(r["sessions_per_s"] for r in results["qpopper"])[len(results["qpopper"]) // 2]
    theirs = sorted(r["sessions_per_s"] for r in results["dovecot"])[len(results["dovecot"]) // 2]
    print(f"ratio qpopper/Dovecot ({'passdb pam' if args.dovecot == 'pam' else 'passwd-file {PLAIN}'}): "
          f"{ours / theirs:.2f} (issue 19's target: >= 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
