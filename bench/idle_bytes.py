"""The bytes a held idle session keeps, by the line that allocated them.

bench/README.md's idle budget comes from here. A real server (qpopper's
Controller: the daemon's code in a thread of this process) serves the guard's
Maildirs with a passwd-file; tracemalloc traces every Python allocation; N
sessions log in (USER, PASS, STAT, as popbench's idle scenario does) and are
held. The difference between a snapshot with the sessions held and one before
them, divided by N and grouped by the allocating line, is what one session
holds, object by object. The clients are plain sockets of this process; their
own allocations (the socket module, this file) are left out. Memory outside
Python's allocators (the kernel's socket buffers, uvloop's libuv handles,
OpenSSL) is not seen: popbench's PSS figure includes it.

    python bench/idle_bytes.py [--sessions N] [--messages M] [--top K]
"""

from __future__ import annotations

import argparse
import gc
import socket
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from guard import PASSWORD, make_maildirs

SKIP = ("socket.py", "idle_bytes.py", "tracemalloc.py", "threading.py")


def hold(port: int, count: int) -> list[socket.socket]:
    held = []
    for k in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"USER u%d\r\nPASS %s\r\nSTAT\r\n" % (k + 1, PASSWORD.encode()))
        got = b""
        while got.count(b"\r\n") < 4:  # greeting and three replies
            more = sock.recv(4096)
            if not more:
                raise RuntimeError(f"closed: {got!r}")
            got += more
        if got.count(b"+OK") != 4:
            raise RuntimeError(f"server said {got!r}")
        held.append(sock)
    return held


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--messages", type=int, default=10, help="messages in each Maildir (default 10)")
    parser.add_argument("--top", type=int, default=25, help="lines listed (default 25)")
    a = parser.parse_args(argv)
    from qpopper import Controller

    with tempfile.TemporaryDirectory(prefix="qpopper-idle-") as tmp:
        work = Path(tmp)
        make_maildirs(work, users=a.sessions, messages=a.messages)
        passwd = work / "passwd"
        passwd.write_text("".join(f"u{i}:{{PLAIN}}{PASSWORD}::::{work}::\n" for i in range(1, a.sessions + 1)))
        with Controller(passwd_file=str(passwd), mail_location=f"maildir:{work}/maildir/%u",
                        max_connections=a.sessions + 50, max_connections_per_ip=a.sessions + 50) as server:
            for sock in hold(server.port, 20):  # warm-up: imports, caches (those sessions end)
                sock.close()
            time.sleep(0.5)
            tracemalloc.start(8)
            gc.collect()
            before = tracemalloc.take_snapshot()
            held = hold(server.port, a.sessions)
            time.sleep(0.5)  # the server's side settles (its replies are all sent)
            gc.collect()
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            for sock in held:
                sock.close()
    keep = [tracemalloc.Filter(False, f"*{name}") for name in SKIP]
    diff = after.filter_traces(keep).compare_to(before.filter_traces(keep), "lineno")
    total = sum(d.size_diff for d in diff)
    print(f"### bytes per held idle session ({a.sessions} sessions of {a.messages} messages, Python allocations): "
          f"{total / a.sessions:.0f}\n")
    print("| bytes | objects | allocated at |\n|---|---|---|")
    for d in diff[: a.top]:
        frame = d.traceback[0]
        where = "/".join(Path(frame.filename).parts[-2:])
        print(f"| {d.size_diff / a.sessions:.0f} | {d.count_diff / a.sessions:.1f} | `{where}:{frame.lineno}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
