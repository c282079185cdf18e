"""`qpopper-admin`: who is connected, and ending a user's sessions.

    qpopper-admin [--control-dir DIR] who
    qpopper-admin [--control-dir DIR] kick USER

It asks every serving process's control socket in the control directory
(`control-dir` of the server, see `qpopper.server._control`) and joins the
answers: one socket per process, so workers and session processes are all
reached. A socket whose process is gone (killed with -9) is skipped and
removed. Exit status: 0 done, 1 the server could not be asked, 2 bad usage;
every failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Sequence

from ..usernames import is_valid_username

DEFAULT_CONTROL_DIR = "/run/qpopper/control"
TIMEOUT = 10.0
EXIT_FAILED = 1
EXIT_USAGE = 2


class AdminError(Exception):
    """A failure to report in one line (exit 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """One clear line and status 2, not argparse's usage block."""
        raise _UsageError(message)


class _UsageError(Exception):
    pass


def _parser() -> _Parser:
    parser = _Parser(prog="qpopper-admin", description="List and end sessions of a running qpopper.")
    parser.add_argument("--control-dir", default=DEFAULT_CONTROL_DIR,
                        help=f"the server's control-dir (default {DEFAULT_CONTROL_DIR})")
    parser.add_argument("--json", action="store_true", help="print the answers as JSON")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands.add_parser("who", help="list the sessions: user, client address, since, state, bytes sent")
    kick = commands.add_parser("kick", help="end every session of USER; their deletions are not applied")
    kick.add_argument("user")
    return parser


def ask(directory: str, request: str) -> list[dict[str, object]]:
    """Every live process's answer to `request`."""
    if not os.path.isdir(directory):
        raise AdminError(f"no control directory {directory} (is control-dir set and the server running?)")
    try:
        names = os.listdir(directory)
    except PermissionError:
        raise AdminError(f"cannot read {directory}: only root and the server's account may") from None
    paths = sorted(os.path.join(directory, name) for name in names if name.endswith(".sock"))
    answers = []
    for path in paths:
        answer = _ask_one(path, request)
        if answer is not None:
            answers.append(answer)
    return answers


def _ask_one(path: str, request: str) -> dict[str, object] | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    try:
        try:
            sock.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(OSError):
                os.unlink(path)  # its process is gone
            return None
        except PermissionError:
            raise AdminError(f"cannot connect to {path}: only root and the server's account may") from None
        sock.sendall(request.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        if exc.errno in (errno.ECONNRESET, errno.EPIPE):
            return None  # the process ended while we asked
        raise AdminError(f"{path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        answer = json.loads(data)
    except ValueError:
        return None  # cut off by the process's end
    if not isinstance(answer, dict):
        raise AdminError(f"{path}: unexpected answer")
    if "error" in answer:
        raise AdminError(f"{path}: {answer['error']}")
    return answer


def _list(value: object) -> list[dict[str, object]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def who_lines(sessions: list[dict[str, object]]) -> list[str]:
    """The sessions as a table, oldest first (like doveadm who's)."""
    rows = [("USER", "ADDRESS", "SINCE", "STATE", "SENT", "PID")]
    for s in sorted(sessions, key=lambda s: float(str(s.get("since", 0)))):
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(str(s["since"]))))
        user = str(s["user"]) or "-"
        rows.append((user, str(s["address"]), since, str(s["state"]), str(s["sent"]), str(s["pid"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


def main(argv: Sequence[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parser().parse_args(args_list)
        if args.command == "kick" and not is_valid_username(args.user):
            raise _UsageError(f"not a user name: {args.user!r}")
    except _UsageError as exc:
        print(f"qpopper-admin: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "who":
            answers = ask(args.control_dir, "who")
            sessions = [s for a in answers for s in _list(a.get("sessions"))]
            if args.json:
                print(json.dumps(sessions))
            else:
                print("\n".join(who_lines(sessions)))
            return 0
        answers = ask(args.control_dir, f"kick {args.user}")
        kicked = sum(int(str(a.get("kicked", 0))) for a in answers)
        updating = sum(int(str(a.get("updating", 0))) for a in answers)
        if args.json:
            print(json.dumps({"kicked": kicked, "updating": updating}))
        elif kicked or updating:
            note = f"; {updating} already in UPDATE, finishing it" if updating else ""
            print(f"kicked {kicked} session{'s' if kicked != 1 else ''} of {args.user}{note}")
        else:
            print(f"no session of {args.user}")
        return 0
    except AdminError as exc:
        print(f"qpopper-admin: {exc}", file=sys.stderr)
        return EXIT_FAILED
