"""`qpopper-uidl-report`: which UIDLs a Maildir's messages will be served with.

    qpopper-uidl-report [--list] MAILDIR

Before (or after) moving a site from Dovecot or Courier, an administrator
wants to know that clients which leave mail on the server will not fetch it
all again: this counts the messages that keep the UIDL the old server gave
them (and from which of its files) and those that get one of ours. `--list`
adds a line per message: its UIDL, where it came from, its file name.
Nothing is written and the maildrop's lock is not taken, so it may run
while users are logged in.

Exit status: 0 done; 2 usage, or a path that is not a readable Maildir
(one line on stderr says which).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence

from ..errors import MaildropError
from ..maildrop.maildir import list_maildir, uids_and_sources
from ..maildrop.uidimport import SOURCES

PROG = "qpopper-uidl-report"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{PROG}: {message}", file=sys.stderr)
        raise SystemExit(2)


def report(path: str, listing: bool) -> list[str]:
    """The report's lines for the Maildir at `path`; MaildropError or
    OSError if it cannot be read."""
    if not os.path.isdir(os.path.join(path, "cur")) and not os.path.isdir(os.path.join(path, "new")):
        raise MaildropError(f"{path} is not a Maildir (no cur/ or new/)")
    names = list_maildir(path)
    uids, sources = uids_and_sources(path, names)
    counts = Counter(sources)
    lines = [f"{path}: {len(names)} messages"]
    lines += [f"  {counts[label]} keep the UIDL of {label}" for label in SOURCES]
    lines.append(f"  {counts[None]} get a UIDL of our own")
    if listing:
        lines += [f"{uid} {source or 'ours'} {name}" for uid, source, name in zip(uids, sources, names, strict=True)]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog=PROG, description="Count the messages of a Maildir that keep the UIDL "
                     "Dovecot or Courier gave them.")
    parser.add_argument("--list", action="store_true", help="also one line per message")
    parser.add_argument("maildir")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    # uidimport says on stderr what it skipped (malformed lines, clashes).
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format=f"{PROG}: %(message)s")
    try:
        lines = report(args.maildir, args.list)
    except MaildropError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{PROG}: {exc.filename or args.maildir}: {exc.strerror}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
