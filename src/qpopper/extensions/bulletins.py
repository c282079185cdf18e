"""qpopper's bulletins: messages an administrator posts once for everyone.

A bulletin is a file in `bulldir` whose name starts with its number (and,
with group-bulletins, `NUMBER.GROUP...` limits it to a group; `ALL` or no
group means everyone). It must be a message in mbox form (a valid `From `
line first) or it is skipped with a log line. At login every bulletin newer
than the user's mark is delivered into the user's maildrop, like mail from
a delivery agent: its `To:` header becomes `To: user@host`, its `Status:`
and `X-UIDL:` headers are dropped (mbox copies get a fresh X-UIDL), and
the mark is raised. A user seen for the first time gets at most
`max-bulletins` of the newest (qpopper's default, 1).

The mark lives in `~/.popbull` (one decimal number; written as the user,
mode 0600) or, with `bulldb`, in `<bulldir>/bulldb` (lines "user number",
updated under an exclusive lock; an existing ~/.popbull is imported the
first time). Deliveries happen while the session holds the maildrop's POP
lock, so two logins never both deliver; the mark is raised only after the
bulletins are in the maildrop (a crash in between repeats a bulletin rather
than losing it). Nothing here ever fails a login: errors are logged.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..auth import Principal
from ..errors import MaildropError, ResponseCode
from ..logtext import printable
from ..maildrop.delivery import deliver as deliver_message
from ..maildrop.location import MaildropLocation

if TYPE_CHECKING:
    from ..config.options import Options

log = logging.getLogger("qpopper.bulletins")

_NUMBER = re.compile(r"(\d{1,9})")
BULLDB_NAME = "bulldb"
MAX_BULLETIN_SIZE = 10 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Bulletin:
    number: int
    path: str
    group: str | None


def scan(bulldir: str) -> list[Bulletin]:
    """The bulletin files, by number."""
    out = []
    try:
        names = os.listdir(bulldir)
    except OSError as exc:
        log.error("cannot list bulletin directory %s: %s", bulldir, exc.strerror)
        return []
    for name in names:
        match = _NUMBER.match(name)
        if match is None:
            continue
        parts = name.split(".")
        group = parts[1] if len(parts) > 1 and parts[1] else None
        out.append(Bulletin(int(match.group(1)), os.path.join(bulldir, name), group))
    out.sort(key=lambda b: (b.number, b.path))
    return out


def for_user(bulletins: list[Bulletin], principal: Principal, group_bulletins: bool) -> list[Bulletin]:
    if not group_bulletins:
        return bulletins
    import grp

    out = []
    for b in bulletins:
        if b.group is None or b.group == "ALL":
            out.append(b)
            continue
        try:
            entry = grp.getgrnam(b.group)
        except KeyError:
            continue  # an unknown group: nobody
        if principal.gid == entry.gr_gid or principal.user in entry.gr_mem:
            out.append(b)
    return out


def render(raw: bytes, user: str, host: str) -> tuple[bytes, bytes] | None:
    """(From_ line, message) for a bulletin file, or None if it is not one."""
    # Here, not at the top: a Maildir server without bulletins never loads the mbox indexer.
    from ..maildrop.mboxindex import is_from_line

    raw = raw.replace(b"\r\n", b"\n")
    first, _, rest = raw.partition(b"\n")
    if not is_from_line(first + b"\n"):
        return None
    head, sep, body = rest.partition(b"\n\n")
    kept = []
    skipping = False
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                kept.append(line)
            continue
        name = line.split(b":", 1)[0].strip().lower()
        skipping = name in (b"to", b"status", b"x-uidl")
        if name == b"to":
            kept.append(b"To: " + f"{user}@{host}".encode("ascii", "replace"))
        elif not skipping:
            kept.append(line)
    message = b"\n".join(kept) + b"\n" + (b"\n" + body if sep else b"")
    if not message.endswith(b"\n"):
        message += b"\n"
    return first + b"\n", message


# ---- marks ------------------------------------------------------------------


def read_popbull(home: str | None) -> int | None:
    """The mark in ~/.popbull; None if absent or unreadable; -1 if empty
    (qpopper: an empty file means every bulletin was seen)."""
    if not home:
        return None
    try:
        with open(os.path.join(home, ".popbull"), "rb") as f:
            text = f.read(64).strip()
    except OSError:
        return None
    if not text:
        return -1
    return int(text) if text.isdigit() else None


def write_popbull(home: str, number: int) -> None:
    path = os.path.join(home, ".popbull")
    tmp = path + ".new"
    old_umask = os.umask(0o077)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{number}\n")
        os.rename(tmp, path)
    finally:
        os.umask(old_umask)


class BulletinDatabase:
    """`<bulldir>/bulldb`: "user number" lines, changed under flock."""

    def __init__(self, bulldir: str, max_tries: int = 75) -> None:
        self.path = os.path.join(bulldir, BULLDB_NAME)
        self.max_tries = max_tries

    def _open(self) -> int:
        for attempt in range(max(1, self.max_tries)):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o660)
            except OSError:
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                os.close(fd)
                time.sleep(0.01 * (attempt + 1))
        raise TimeoutError(f"{self.path} stayed locked")

    def update(self, user: str, change: Callable[[int | None], int | None]) -> None:
        """Read the user's mark, let `change` decide the new one, write it."""
        fd = self._open()
        try:
            data = b""
            while chunk := os.read(fd, 65536):
                data += chunk
            marks: dict[str, int] = {}
            for line in data.decode("utf-8", "replace").splitlines():
                name, _, number = line.partition(" ")
                if number.strip().isdigit():
                    marks[name] = int(number)
            new = change(marks.get(user))
            if new is None or new == marks.get(user):
                return
            marks[user] = new
            text = "".join(f"{name} {number}\n" for name, number in sorted(marks.items())).encode()
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, text)
            os.ftruncate(fd, len(text))
            os.fsync(fd)
        finally:
            os.close(fd)


# ---- delivery -----------------------------------------------------------------


def deliver(location: str, bulletins: list[Bulletin], user: str, host: str) -> int:
    """Deliver these bulletins into the maildrop at `location` (through the
    maildrop's own delivery, whatever its format: mbox copies get a fresh
    X-UIDL); returns the highest number delivered (or skipped as broken),
    0 if none."""
    where = MaildropLocation.parse(location)
    highest = 0
    for sequence, bulletin in enumerate(bulletins):
        try:
            with open(bulletin.path, "rb") as f:
                raw = f.read(MAX_BULLETIN_SIZE + 1)
        except OSError as exc:
            log.error("bulletin %s cannot be read: %s", printable(bulletin.path), exc.strerror)
            highest = max(highest, bulletin.number)
            continue
        rendered = render(raw, user, host) if len(raw) <= MAX_BULLETIN_SIZE else None
        if rendered is None:
            log.error("bulletin %s skipped: not a message in mbox form (a From_ line first)", printable(bulletin.path))
            highest = max(highest, bulletin.number)
            continue
        from_line, message = rendered
        uid = f"{int(time.time())}.{sequence:03d}.{bulletin.number}"
        deliver_message(where, message, from_line=from_line, uid=uid)
        log.info("bulletin %d delivered to %s", bulletin.number, user)
        highest = max(highest, bulletin.number)
    return highest


def pending(bulletins: list[Bulletin], mark: int | None, max_bulletins: int) -> tuple[list[Bulletin], int]:
    """(bulletins to deliver, newest number) given the user's mark."""
    if not bulletins:
        return [], mark or 0
    newest = bulletins[-1].number
    if mark == -1:  # qpopper: an empty .popbull means every bulletin was seen
        return [], newest
    if mark is None:
        mark = newest - max(0, max_bulletins)
    return [b for b in bulletins if b.number > mark], newest


# ---- the login step -------------------------------------------------------------


def _plainly(func: Callable[..., Any], *args: Any) -> Any:
    return func(*args)


def deliver_new_bulletins(
    options: Options, principal: Principal, privileged: Callable[..., Any] = _plainly, *, peer: object = "-"
) -> int:
    """Deliver the bulletins this user has not had yet; returns how many
    arrived, so the caller lists the maildrop again only if any did.

    Blocking (it reads files and takes locks): run it in a worker thread,
    while the session holds the maildrop's POP lock. `privileged(func,
    *args)` runs what writes the spool or the bulletin database (with the
    spool's group, for system users). Raises MaildropError (SYS/TEMP) only
    when the bulletin database cannot be used and bulldb-nonfatal is off;
    every other failure is logged and costs the user only the bulletins.
    """
    bulldir = options.bulldir
    assert bulldir is not None
    candidates = for_user(scan(bulldir), principal, options.group_bulletins)
    host = options.hostname
    delivered = 0
    if options.bulldb:
        db = BulletinDatabase(bulldir, options.bulldb_max_tries)

        def change(mark: int | None) -> int | None:
            nonlocal delivered
            if mark is None:
                mark = read_popbull(principal.home)  # import the old file once
            todo, newest = pending(candidates, mark, options.max_bulletins)
            delivered = len(todo)
            deliver(principal.mail, todo, principal.user, host)
            return newest if candidates else mark

        try:
            privileged(db.update, principal.user, change)
        except (OSError, TimeoutError) as exc:
            log.error("%s: bulletin database %s: %s", peer, db.path, exc)
            if not options.bulldb_nonfatal:
                raise MaildropError("bulletin database unavailable", ResponseCode.SYS_TEMP) from exc
            return 0
        return delivered
    if not principal.home:
        log.warning("%s: %s has no home for .popbull; bulletins need bulldb", peer, principal.user)
        return 0
    mark = read_popbull(principal.home)
    todo, newest = pending(candidates, mark, options.max_bulletins)
    try:
        privileged(deliver, principal.mail, todo, principal.user, host)
        if candidates and newest != mark:
            write_popbull(principal.home, newest)
    except OSError as exc:
        log.error("%s: [SYS/TEMP] bulletins for %s not delivered: %s", peer, principal.user, exc)
        return 0
    return len(todo)
