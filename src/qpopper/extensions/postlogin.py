"""What happens after each successful login besides serving mail:
qpopper's DRAC registration, and a generic hook for today's
POP-before-SMTP setups (a command run without a shell, and/or a line
appended to a file).

None of it may delay or fail a session: the server runs these beside the
session, each with a bounded number of tries, and only logs failures.

The hook command gets three arguments: user, client address, and the
time (seconds since the epoch). The hook file gets one line per login,
"TIME USER ADDRESS", appended with O_APPEND so concurrent sessions never
interleave within a line.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import time

from ..logtext import printable
from .drac import RpcError, drac_add

log = logging.getLogger("qpopper.postlogin")

DRAC_TRIES = 3
HOOK_TIMEOUT = 30


def register_with_drac(host: str, address: str) -> None:
    for attempt in range(1, DRAC_TRIES + 1):
        try:
            status = drac_add(host, address)
        except (RpcError, OSError, TimeoutError) as exc:
            if attempt == DRAC_TRIES:
                log.warning("DRAC: cannot register %s with %s: %s", address, printable(host), exc)
            continue
        if status == "success":
            log.debug("DRAC: %s registered with %s", address, host)
        else:
            log.warning("DRAC: %s refused %s: %s", printable(host), address, status)
        return


def run_hook_command(command: str, user: str, address: str, when: float) -> None:
    argv = shlex.split(command) + [user, address, str(int(when))]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=HOOK_TIMEOUT, check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("post-login command %s failed: %s", printable(argv[0]), exc)
        return
    if proc.returncode != 0:
        log.warning(
            "post-login command %s exited %d: %s", printable(argv[0]), proc.returncode, printable(proc.stderr, 200)
        )


def append_hook_file(path: str, user: str, address: str, when: float) -> None:
    line = f"{int(when)} {user} {address}\n".encode("ascii", "replace")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("post-login file %s: %s", printable(path), exc.strerror)


def after_login(
    user: str,
    address: str,
    *,
    drac_host: str | None,
    command: str | None,
    file: str | None,
) -> None:
    """Everything configured, in one blocking call for a worker thread."""
    when = time.time()
    if file:
        append_hook_file(file, user, address, when)
    if command:
        run_hook_command(command, user, address, when)
    if drac_host:
        register_with_drac(drac_host, address)
