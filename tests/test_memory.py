"""The daemon's C heap: one malloc arena for all threads (glibc).

Worker threads that open big maildrops would otherwise each keep an arena
and its high-water mark; glibc's malloc_info lists one <heap> per arena.
"""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import without_coverage

pytestmark = pytest.mark.skipif(ctypes.util.find_library("c") is None or sys.platform != "linux", reason="glibc only")

# Threads allocate C memory (bytes above the small-object limit) at the same
# time, then malloc_info reports the arenas.
_PROGRAM = r"""
import ctypes, os, sys, tempfile, threading
from qpopper.server._memory import limit_malloc_arenas
limited = limit_malloc_arenas() if sys.argv[1] == "limit" else False
barrier = threading.Barrier(4)
def work():
    barrier.wait()
    keep = [bytes(4096) for _ in range(2000)]
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
path = tempfile.mktemp()
fp = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(fp))
libc.fclose(ctypes.c_void_p(fp))
xml = open(path).read()
os.unlink(path)
print(limited, xml.count("<heap nr="))
"""


def _arenas(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    run_env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    run_env.update(env or {})
    out = subprocess.run([sys.executable, "-c", _PROGRAM, mode], capture_output=True, text=True, env=run_env,
                         check=True, timeout=60).stdout.split()
    return out[0], int(out[1])


def test_threads_share_one_arena_once_limited() -> None:
    assert _arenas("limit") == ("True", 1)
    _limited, arenas = _arenas("free")
    assert arenas > 1  # the control: without the limit the threads spread out


def test_an_administrators_malloc_arena_max_is_left_alone() -> None:
    limited, arenas = _arenas("limit", {"MALLOC_ARENA_MAX": "4"})
    assert limited == "False" and arenas > 1


# A daemon's modules stay with it for its whole life: the ones a plain
# session does not need are loaded on first use instead (each costs a few
# hundred kB per server process).
_SESSION_PROGRAM = r"""
import poplib, sys
import qpopper.daemon.cli
from qpopper import Controller, StaticAuthenticator
root = sys.argv[1]  # (pathlib and tempfile would load ipaddress themselves)
with open(root + "/carol", "wb") as spool:
    spool.write(b"From a@b Sat Jan  3 01:05:34 1996\nSubject: x\n\n.dot\n\n")
auth = StaticAuthenticator({"carol": "pw"}, mail_location=f"mbox:{root}/%u")
with Controller(authenticator=auth) as pop:
    c = poplib.POP3(pop.host, pop.port)
    c.user("carol"); c.pass_("pw"); c.stat(); c.list(); c.uidl(); c.retr(1); c.top(1, 0); c.quit()
print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] in ("email", "html", "ipaddress", "pickle", "logging",
                                                                    "redis", "crc32c", "prometheus_client")
                      or m.startswith("qpopper.extensions.xmangle.")
                      and m.rsplit(".", 1)[1] not in ("spec", "messages", "commands")
                      or m in ("logging.handlers", "qpopper.extensions.bulletins",
                               "qpopper.daemon.forking", "qpopper.daemon.workers", "qpopper.server.proxyheader",
                               "qpopper.server._proxied", "qpopper.server._shared_state",
                               "qpopper.server._tally", "qpopper.server._metrics", "qpopper.server._control",
                               "qpopper.server._operations", "qpopper.daemon.operations"))))
"""


def test_a_plain_session_loads_no_optional_modules(tmp_path: Path) -> None:
    # Not measured: coverage, which CI starts in every subprocess, would load html and pickle itself.
    env = without_coverage()
    result = subprocess.run(
        [sys.executable, "-c", _SESSION_PROGRAM, str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=True, env=env,
    )
    assert result.stdout.split() == ["logging"]
