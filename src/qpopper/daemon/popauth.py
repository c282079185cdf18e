"""`popauth`: manage the APOP database, with qpopper's commands.

    popauth -init [-force]          create an empty database
    popauth -list [user]            list users (never their secrets)
    popauth -user NAME [SECRET]     add or change NAME's secret (asked twice if not given)
    popauth -delete NAME            remove NAME
    popauth [SECRET]                a user changes their own secret

root (or whoever owns the database) manages every entry; anyone else may
only change their own, as qpopper's setuid popauth allowed. The database
path is /etc/qpopper/pop.auth unless -file PATH says otherwise.

Exit status: 0 done, 1 refused or failed (the message says why), 2 usage.
"""

from __future__ import annotations

import getpass
import os
import pwd
import sys
from collections.abc import Callable, Sequence

from ..auth.apopdb import DEFAULT_APOP_FILE, ApopDatabase, prepared_name
from ..errors import ConfigError

USAGE = (
    "usage: popauth [-file PATH] -init [-force]\n"
    "       popauth [-file PATH] -list [user]\n"
    "       popauth [-file PATH] -user NAME [SECRET]\n"
    "       popauth [-file PATH] -delete NAME\n"
    "       popauth [-file PATH] [SECRET]          (change your own secret)"
)


class UsageError(Exception):
    """Bad usage: exit 2, with the usage unless the message says all there is to say."""

    def __init__(self, message: str, show_usage: bool = True) -> None:
        super().__init__(message)
        self.show_usage = show_usage


def _ask_secret() -> str:
    if not sys.stdin.isatty():
        line = sys.stdin.readline()
        if not line:  # end of input at once: a script or cron job with nothing to give
            raise UsageError(
                "no secret given and no terminal to ask on: give it as an argument or a line on stdin",
                show_usage=False,
            )
        return line.rstrip("\r\n")
    first = getpass.getpass("New APOP secret: ")
    second = getpass.getpass("Again: ")
    if first != second:
        raise ConfigError("the two secrets differ; nothing changed")
    return first


def _caller() -> tuple[str, bool]:
    """The invoking user's name, and whether they may manage everyone."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return name, uid == 0


def run(argv: Sequence[str]) -> int:
    args = list(argv)
    path = DEFAULT_APOP_FILE
    if len(args) >= 2 and args[0] in ("-file", "--file"):
        path = args[1]
        args = args[2:]
    database = ApopDatabase(path)
    caller, privileged = _caller()
    command = args[0] if args and args[0].startswith("-") else None
    rest = args[1:] if command else args
    if command in ("-h", "-help", "--help"):
        print(USAGE)
        return 0
    if command is None:
        _set_own(database, rest, caller)
        return 0
    action = _COMMANDS.get(command)
    if action is None:
        raise UsageError(f"unknown command {command}")
    action(database, rest, caller, privileged)
    return 0


def _init(database: ApopDatabase, rest: list[str], caller: str, privileged: bool) -> None:
    if rest not in ([], ["-force"]):
        raise UsageError("-init takes only -force")
    _require(privileged, "only root may create the APOP database")
    database.initialise(force=rest == ["-force"])
    print(f"popauth: created {database.path}")


def _list(database: ApopDatabase, rest: list[str], caller: str, privileged: bool) -> None:
    if len(rest) > 1:
        raise UsageError("-list takes at most one user name")
    if not os.path.exists(database.path):
        raise ConfigError(f"{database.path} does not exist (run popauth -init first)")
    users = sorted(database.load())
    if rest:
        _require(privileged or rest[0] == caller, "you may only look up your own entry")
        name = prepared_name(rest[0])  # as stored: a UTF-8 name in either normal form is one entry
        if name not in users:
            raise ConfigError(f"{rest[0]} is not in {database.path}")
        users = [name]
    else:
        _require(privileged, "only root may list the APOP database")
    for user in users:
        print(user)


def _user(database: ApopDatabase, rest: list[str], caller: str, privileged: bool) -> None:
    if len(rest) not in (1, 2):
        raise UsageError("-user takes a name and optionally a secret")
    _require(privileged or rest[0] == caller, "you may only change your own secret")
    database.set_secret(rest[0], rest[1] if len(rest) == 2 else _ask_secret())
    print(f"popauth: secret of {rest[0]} set")


def _delete(database: ApopDatabase, rest: list[str], caller: str, privileged: bool) -> None:
    if len(rest) != 1:
        raise UsageError("-delete takes one user name")
    _require(privileged, "only root may delete entries")
    database.delete(rest[0])
    print(f"popauth: {rest[0]} deleted")


def _set_own(database: ApopDatabase, rest: list[str], caller: str) -> None:
    """No command: the caller sets their own secret."""
    if len(rest) > 1:
        raise UsageError("too many arguments")
    database.set_secret(caller, rest[0] if rest else _ask_secret())
    print(f"popauth: secret of {caller} set")


# Each command: (database, its arguments, the caller's name, whether the caller is root).
_COMMANDS: dict[str, Callable[[ApopDatabase, list[str], str, bool], None]] = {
    "-init": _init,
    "-list": _list,
    "-user": _user,
    "-delete": _delete,
}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise PermissionError(message)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"popauth: {exc}\n{USAGE}" if exc.show_usage else f"popauth: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:
        print(f"popauth: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"popauth: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"popauth: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, EOFError):
        print("popauth: interrupted; nothing changed", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
