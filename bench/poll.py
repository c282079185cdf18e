#!/usr/bin/env python3
"""The poll on a big maildrop, against Dovecot: what a client that leaves mail on the server costs.

One poll: a new message is delivered (as an MDA does: a dotlocked append to
the spool, or tmp/ then new/ in a Maildir), then one session does USER,
PASS, UIDL, RETR of the new message (checked to be it) and QUIT. Measured
per poll: the time of PASS (login and the maildrop's opening), of UIDL and
of the RETR, the whole session, and the server's CPU (its process tree,
reaped children included, over a block of polls, divided by their number:
/proc counts CPU in 10 ms ticks).

Two uses:

* `bench/run.py` calls `poll_compare` after its bigbox scenario (50,000
  messages), for the report's "bigbox poll" rows;
* run alone, it measures how the costs grow with the maildrop's size, for
  Dovecot and for two revisions of this server (this one, and the one
  before the kept indexes, by default; both exported from git), each on its
  own copy of the mail (`--also NAME=REV` adds more revisions to the same
  run, e.g. the main branch a change is to be merged into):

      .venv/bin/python bench/poll.py --sizes 10000,50000,200000 --mail /tmp/poll-mail

  per format and size: the cold first open (Dovecot: index dropped,
  restarted; qpopper: no kept index), the warm PASS to STAT (popbench's
  bigbox, median of 3 sessions), and `--rounds` polls. The maildrops are
  generated once under --mail (popbench gen-mbox / gen-maildir, the bigbox
  sizes) and reused by later runs; the report goes to --out (POLL.md and
  raw JSON lines).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import fcntl
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
USER = "big1"


def load_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ---- delivering one message, as an MDA does ------------------------------------------------


def new_message(n: int) -> bytes:
    """A plain message of about 3 kB, told apart by `n`."""
    body = b"".join(b"poll %d, line %d: the quick brown fox jumps over the lazy dog\n" % (n, i) for i in range(45))
    return (b"Return-Path: <poll@sender.example>\nReceived: from mx.example by bench.example; "
            b"Wed, 2 Dec 2026 01:00:%02d +0000\nFrom: poll@sender.example\nTo: big1@bench.example\n"
            b"Subject: poll %d\nMessage-ID: <poll.%d@bench.example>\nDate: Wed, 2 Dec 2026 01:00:00 +0000\n\n"
            % (n % 60, n, n)) + body


def deliver(fmt: str, maildrop: Path, message: bytes) -> None:
    if fmt == "mbox":
        _append_to_spool(maildrop, message)
    else:
        _deliver_to_maildir(maildrop, message)


def _append_to_spool(spool: Path, message: bytes) -> None:
    """Dotlock (O_EXCL), fcntl lock, append, as postfix's local(8) does."""
    lock = Path(str(spool) + ".lock")
    deadline = time.monotonic() + 30
    while True:
        try:
            os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            break
        except FileExistsError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{lock} held for 30 s") from None
            time.sleep(0.001)
    try:
        fd = os.open(spool, os.O_WRONLY | os.O_APPEND)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            quoted = message.replace(b"\nFrom ", b"\n>From ")
            os.write(fd, b"From poll@sender.example  " + time.strftime("%a %b %e %H:%M:%S %Y").encode()
                     + b"\n" + quoted + b"\n")
        finally:
            os.close(fd)
    finally:
        lock.unlink()


def _deliver_to_maildir(maildir: Path, message: bytes) -> None:
    now = time.time_ns()
    wire = len(message) + message.count(b"\n")
    name = f"{now // 10**9}.M{now // 1000 % 10**6:06d}P{os.getpid()}.poll,S={len(message)},W={wire}"
    tmp = maildir / "tmp" / name
    tmp.write_bytes(message)
    os.rename(tmp, maildir / "new" / name)


# ---- one poll ------------------------------------------------------------------------------


async def poll_session(pb: ModuleType, port: int, password: str, n: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    _tr, c = await loop.create_connection(lambda: pb.PopConn(loop), "127.0.0.1", port)
    try:
        await c.ok("greeting")
        await c.cmd(f"USER {USER}\r\n".encode(), "USER")
        t1 = time.perf_counter()
        await c.cmd(f"PASS {password}\r\n".encode(), "PASS")
        t2 = time.perf_counter()
        await c.cmd(b"UIDL\r\n", "UIDL")
        listing = pb.parse_listing(await c.multi(), "UIDL")
        t3 = time.perf_counter()
        last = listing[-1][0]
        await c.cmd(b"RETR %d\r\n" % last, "RETR")
        body = await c.multi()
        t4 = time.perf_counter()
        if b"Message-ID: <poll.%d@bench.example>" % n not in body:
            raise pb.PopError(f"RETR {last} is not the message just delivered")
    except BaseException:
        c.transport.abort()
        raise
    await pb.quit_session(c)
    return {"pass_s": t2 - t1, "uidl_s": t3 - t2, "retr_s": t4 - t3, "session_s": time.perf_counter() - t0,
            "messages": float(len(listing))}


class Side:
    """One server under test: its port, its process, its copy of the maildrop."""

    def __init__(self, name: str, port: int, pid: int, maildrop: Path) -> None:
        self.name, self.port, self.pid, self.maildrop = name, port, pid, maildrop


def poll_compare(pb: ModuleType, fmt: str, sides: list[Side], password: str, rounds: int,
                 block: int = 4, first: int = 0) -> dict[str, dict[str, Any]]:
    """`rounds` blocks of `block` polls per side, sides alternating; per side
    the medians of the timings and the server CPU per poll."""
    runs: dict[str, list[dict[str, float]]] = {s.name: [] for s in sides}
    cpu: dict[str, list[float]] = {s.name: [] for s in sides}
    n = first
    for _ in range(rounds):
        for side in sides:
            before = pb.tree_cpu([side.pid])
            for _ in range(block):
                n += 1
                deliver(fmt, side.maildrop, new_message(n))
                runs[side.name].append(asyncio.run(poll_session(pb, side.port, password, n)))
            cpu[side.name].append((pb.tree_cpu([side.pid]) - before) / block)
    out: dict[str, dict[str, Any]] = {}
    for side in sides:
        r = runs[side.name]
        out[side.name] = {k: statistics.median(x[k] for x in r) for k in r[0]}
        out[side.name]["server_cpu_s_per_poll"] = statistics.median(cpu[side.name])
        out[side.name]["polls"] = len(r)
    return out


# ---- the size scan -------------------------------------------------------------------------


BIGBOX_SIZES = "lognormal:median=3000,sigma=0.8,min=600,max=100000"


def ensure_mail(pb_path: Path, python: str, mail: Path, fmt: str, n: int) -> Path:
    """The generated maildrop of `n` messages (made once, reused)."""
    out = mail / f"{fmt}-{n}"
    done = mail / f"done-{fmt}-{n}"
    if not done.exists():
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([python, str(pb_path), f"gen-{fmt}", "--out", str(out), "--users", "1",
                        "--user-format", "big{i}", "--messages", str(n), "--sizes", BIGBOX_SIZES],
                       check=True, stdout=subprocess.DEVNULL)
        done.touch()
    return out


def copy_mail(src: Path, dest: Path, fmt: str) -> None:
    """A private copy: a spool is appended to, so copied; Maildir files are
    only renamed and unlinked, so hard links do (and take no time)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    if fmt == "mbox":
        (dest / "spool").mkdir()
        shutil.copyfile(src / "spool" / USER, dest / "spool" / USER)
    else:
        subprocess.run(["cp", "-al", str(src / "maildir"), str(dest / "maildir")], check=True)
    shutil.copytree(src / "manifest", dest / "manifest")


def maildrop_of(root: Path, fmt: str) -> Path:
    return root / "mail" / ("spool" if fmt == "mbox" else "maildir") / USER


def bigbox(run: ModuleType, bench: Any, port: int, pid: int, repeat: int) -> dict[str, Any]:
    _rc, lines, err = bench.popbench(["run", "bigbox", "--port", str(port), "--server-pid", str(pid),
                                      "--password", run.PASSWORD, "--user-format", "big{i}",
                                      "--repeat", str(repeat)], 1200)
    for x in lines:
        if "ready_s_first" in x:
            return dict(x)
    raise RuntimeError(f"bigbox on :{port} failed: {err[-500:]}")


def scan(args: argparse.Namespace) -> int:
    run = load_module("bench_run", HERE / "run.py")
    ns = argparse.Namespace(shared_bench=args.shared_bench, python=args.python, no_chart=True, worktree=False,
                            work=args.work, rev=args.rev)
    ns.src_dir = run.export_source(ns)
    env = run.check_prerequisites(ns)
    pb = load_module("popbench", env.popbench)
    # Each revision compared with: "before" (--before) and any --also NAME=REV, exported alike.
    revisions = {"before": args.before, **dict(x.split("=", 1) for x in args.also)}
    others = {name: run.export_source(argparse.Namespace(**{**vars(ns), "worktree": False, "rev": rev}))
              for name, rev in revisions.items()}
    names = ["dovecot", "qpopper", *others]
    bench = run.Bench(argparse.Namespace(rounds=1, quick=True, out=args.out, no_twisted=True), env)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    base = args.port_base
    work = Path(args.work).resolve() / "poll"
    for fmt in args.formats.split(","):
        for n in [int(x) for x in args.sizes.split(",")]:
            src = ensure_mail(env.popbench, env.python, Path(args.mail), fmt, n)
            run.log(f"{fmt} {n}: copying the mail")
            roots = {name: work / f"{fmt}-{n}" / name for name in names}
            for root in roots.values():
                copy_mail(src, root / "mail", fmt)
            dov = run.Dovecot(env, roots["dovecot"], fmt, base, base + 1)
            ours = {"qpopper": run.Qpopper(env, roots["qpopper"], fmt, base + 10, ns.src_dir)}
            for k, (name, other_src) in enumerate(others.items()):
                ours[name] = run.Qpopper(env, roots[name], fmt, base + 20 + 10 * k, other_src)
            for q in ours.values():
                q.no_syslog = ns.no_syslog
            try:
                servers = {"dovecot": (dov.start(), base)}
                for name, q in ours.items():
                    servers[name] = (q.start(), q.port)
                row: dict[str, Any] = {"format": fmt, "messages": n, "date": datetime.datetime.now(datetime.UTC)
                                       .strftime("%Y-%m-%d %H:%M"),
                                       "revisions": {"qpopper": getattr(ns, "rev_hash", args.rev)[:7], **revisions}}
                for name, (pid, port) in servers.items():
                    row[f"{name}_cold"] = bigbox(run, bench, port, pid, 1)["ready_s_first"]
                for name, (pid, port) in servers.items():
                    warm = bigbox(run, bench, port, pid, 3)
                    row[f"{name}_warm"] = warm["ready_s_median"]
                    row[f"{name}_warm_uidl"] = warm["uidl_s_median"]
                sides = [Side(name, port, pid, maildrop_of(roots[name], fmt)) for name, (pid, port) in servers.items()]
                polls = poll_compare(pb, fmt, sides, run.PASSWORD, args.rounds)
                for name, figures in polls.items():
                    for key, value in figures.items():
                        row[f"{name}_poll_{key}"] = value
                rows.append(row)
                run.log(f"{fmt} {n}: {json.dumps(row)}")
                with open(out / "poll.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
            finally:
                for q in ours.values():
                    q.stop()
                dov.stop()
            if not args.keep_mail:
                shutil.rmtree(work / f"{fmt}-{n}", ignore_errors=True)
    # The report holds the newest row poll.jsonl has of each format and size
    # (runs of other sizes add to it; older rows stay in the file as history).
    with open(out / "poll.jsonl") as f:
        newest = {(r["format"], r["messages"]): r for r in (json.loads(line) for line in f if line.strip())}
    rows = list(newest.values())
    write_report(out / "POLL.md", rows, args)
    return 0


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x * 1000:.1f}"


def write_report(path: Path, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    lines = [
        "# The poll on a big maildrop: Dovecot, qpopper, and qpopper before its kept indexes\n",
        f"`bench/poll.py` (last: `{' '.join(sys.argv[1:])}`); qpopper = `{args.rev}`, before = `{args.before}`"
        + "".join(f", {x.replace('=', ' = `', 1)}`" for x in args.also) + " (each row names its revisions). "
        "Times in ms (medians); "
        "cold = the first session with no index (Dovecot: index dropped and restarted; qpopper: no kept "
        "index); warm = PASS to STAT answered, median of 3 sessions; poll = a delivery then PASS, UIDL, "
        "RETR of the new message, QUIT; CPU = the server's CPU per poll.\n",
        "| format | messages | server | cold PASS→STAT | warm PASS→STAT | warm full UIDL | poll PASS | poll UIDL "
        "| poll session | poll server CPU | date |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (r["format"], r["messages"], r.get("date", ""))):
        revisions = row.get("revisions", {})
        for name in ["dovecot", "qpopper", *(k for k in revisions if k != "qpopper")] if revisions else \
                ("dovecot", "qpopper", "before"):
            label = f"{name} ({revisions[name]})" if name in revisions else name
            lines.append(
                f"| {row['format']} | {row['messages']:,} | {label} | {_ms(row.get(f'{name}_cold'))} | "
                f"{_ms(row.get(f'{name}_warm'))} | {_ms(row.get(f'{name}_warm_uidl'))} | "
                f"{_ms(row.get(f'{name}_poll_pass_s'))} | {_ms(row.get(f'{name}_poll_uidl_s'))} | "
                f"{_ms(row.get(f'{name}_poll_session_s'))} | {_ms(row.get(f'{name}_poll_server_cpu_s_per_poll'))} | "
                f"{row.get('date', '')} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    run_py = HERE / "run.py"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,50000,200000")
    p.add_argument("--formats", default="mbox,maildir")
    p.add_argument("--rounds", type=int, default=3, help="blocks of 4 polls per server")
    p.add_argument("--mail", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "qpopper-poll-mail"),
                   help="where the generated maildrops are kept between runs")
    p.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "qpopper-bench"))
    p.add_argument("--out", default=str(HERE / "results" / "poll"))
    p.add_argument("--rev", default="HEAD", help="the revision measured (exported from git, as run.py does)")
    p.add_argument("--before", default="7a8f538", help="the revision to compare with (default: before issue 22)")
    p.add_argument("--also", action="append", default=[], metavar="NAME=REV",
                   help="one more revision measured in the same run, named NAME in the report (repeatable)")
    p.add_argument("--port-base", type=int, default=11310)
    p.add_argument("--keep-mail", action="store_true")
    p.add_argument("--shared-bench", default=os.environ.get("QPOPPER_BENCH_SHARED",
                                                            str(HERE.parent.parent / "shared" / "bench")))
    p.add_argument("--python", default=str(HERE.parent / ".venv" / "bin" / "python")
                   if (HERE.parent / ".venv").exists() else sys.executable)
    assert run_py.exists()
    return scan(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
