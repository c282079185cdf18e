"""UIDLs another POP3 server gave a Maildir's messages, kept after a migration.

A client set to leave mail on the server remembers each message's UIDL; if
the UIDLs change when a site moves from Dovecot or Courier to this server,
every such client downloads the whole maildrop again. Both servers left what
they served in the Maildir, so we serve the same for the messages they knew:

- Dovecot's `dovecot-uidlist` (version 3, and the older version 1): a
  message's UIDL is the one Dovecot stored for it (the `P` field, written by
  `pop3_save_uidl` or its POP3 migration plugin), otherwise Dovecot's
  default `pop3_uidl_format` `%08Xu%08Xv`: the IMAP UID and the
  UIDVALIDITY, 8 hex digits each; in lower case, as Dovecot's `X` modifier
  writes them (Dovecot 2.3 serves `000000016b0f65ce`, whatever the
  format's capital suggests; tests/test_migration_clients.py checks it).
- courier-pop3d's `courierpop3dsizelist` (versions 2 and 3): `UID<n>-<uidv>`
  (`UID<n>` when the validity is 0), or, for an entry with no number, the
  file name's unique part with Courier's escapes, as courier-pop3d does.

Both files are written by the user's own server but sit where the user can
write, so they are untrusted: a line that does not parse is skipped, a UIDL
RFC 1939 does not allow or that two messages would share is dropped (that
message keeps our own UID), a file is read up to `MAX_FILE_BYTES` and lines
up to `MAX_LINE_BYTES`. Nothing here raises on bad content.

This module is loaded only when a Maildir holds one of those files: the
Maildir backend probes for them and a plain Maildir never imports it.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from typing import NamedTuple

from ._base import is_valid_uid

log = logging.getLogger(__name__)

DOVECOT_FILE = "dovecot-uidlist"
COURIER_FILE = "courierpop3dsizelist"

# Where an imported UIDL came from, as the report names it.
DOVECOT_STORED = "dovecot-uidlist (stored POP3 UIDL)"
DOVECOT_UID = "dovecot-uidlist (IMAP UID and UIDVALIDITY)"
COURIER = "courierpop3dsizelist"
SOURCES = (DOVECOT_STORED, DOVECOT_UID, COURIER)

# A 100,000-message uidlist is about 8 MB; beyond this the rest is ignored
# (those messages get our UIDs) rather than held in memory.
MAX_FILE_BYTES = 64 * 1024 * 1024
# Both files hold a line of under 300 bytes per message. A small maildrop's
# UIDs are worked out on the event loop, so its file is read only as far as
# is plausible for it: a user cannot stall the loop with a huge file.
BYTES_PER_MESSAGE = 1024
MIN_READ_BYTES = 64 * 1024


def read_limit(messages: int) -> int:
    """How much of a file is read for a maildrop of `messages` messages."""
    return min(MAX_FILE_BYTES, max(MIN_READ_BYTES, BYTES_PER_MESSAGE * messages))
# Longer than any line either server writes (a file name is at most 255).
MAX_LINE_BYTES = 8192
_MAX_NUMBER_DIGITS = 20


class Imported(NamedTuple):
    """A message's UIDL from another server, and which rule gave it."""

    uidl: str
    source: str


def _read_bounded(fd: int, path: str, limit: int) -> bytes:
    """At most `limit` bytes of a regular file (an open fd, closed here),
    ending at the last whole line; b"" for anything else."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            log.warning("%s is not a regular file; its UIDLs are not used", path)
            return b""
        chunks = []
        left = limit + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        log.warning("cannot read %s (%s); its UIDLs are not used", path, exc)
        return b""
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        log.warning("%s is larger than %d bytes; only its beginning is used", path, limit)
        data = data[: data.rfind(b"\n", 0, limit) + 1]
    return data


def _number(field: bytes) -> int | None:
    """A decimal field as an int, or None (no sign, no spaces, bounded)."""
    if not field.isdigit() or len(field) > _MAX_NUMBER_DIGITS:
        return None
    return int(field)


def _key(filename: bytes) -> str | None:
    """The unique part a file name is matched by (before ":"), or None for a
    name no Maildir file can have."""
    base = filename.partition(b":")[0]
    if not base or b"/" in base or b"\0" in base:
        return None
    return os.fsdecode(base)


def _lines(data: bytes) -> Sequence[bytes]:
    return [line for line in data.split(b"\n")[1:] if 0 < len(line) <= MAX_LINE_BYTES]


def _dovecot_header(header: list[bytes]) -> tuple[bytes, int | None] | None:
    """The version and UIDVALIDITY of a dovecot-uidlist header (None: not
    one we read; a UIDVALIDITY of None: unusable, stored UIDLs still are)."""
    version = header[0]
    uidvalidity: int | None = None
    if version == b"1" and len(header) >= 3:
        uidvalidity = _number(header[1])
    elif version == b"3":
        for field in header[1:]:
            if field[:1] == b"V":
                uidvalidity = _number(field[1:])
    else:
        return None
    if uidvalidity is not None and not 0 < uidvalidity < 1 << 32:
        uidvalidity = None
    return version, uidvalidity


def _dovecot_v3_fields(rest: bytes) -> tuple[bytes | None, bytes | None]:
    """The stored POP3 UIDL (`P` field) and the file name of a version 3
    entry after its UID: space-separated fields, then ":" and the name."""
    stored = None
    pos = 0
    while pos < len(rest):
        if rest[pos] == 0x20:
            pos += 1
        elif rest[pos] == 0x3A:  # ":" starts the file name
            return stored, rest[pos + 1 :]
        else:
            end = rest.find(b" ", pos)
            end = len(rest) if end < 0 else end
            if rest[pos] == 0x50:  # "P"
                stored = rest[pos + 1 : end]
            pos = end
    return stored, None


def parse_dovecot_uidlist(data: bytes) -> dict[str, Imported]:
    """Unique part -> UIDL, from a dovecot-uidlist's bytes."""
    header = _dovecot_header(data.partition(b"\n")[0].split(b" "))
    if header is None:
        log.warning("%s: unknown header; its UIDLs are not used", DOVECOT_FILE)
        return {}
    version, uidvalidity = header
    found: dict[str, Imported] = {}
    skipped = 0
    for line in _lines(data):
        uid_field, _, rest = line.partition(b" ")
        uid = _number(uid_field)
        stored, filename = _dovecot_v3_fields(rest) if version == b"3" else (None, rest.lstrip(b" "))
        key = _key(filename) if filename else None
        if uid is None or not 0 < uid < 1 << 32 or key is None:
            skipped += 1
        elif stored is not None:
            found[key] = Imported(stored.decode("ascii", "replace"), DOVECOT_STORED)
        elif uidvalidity is not None:
            found[key] = Imported(f"{uid:08x}{uidvalidity:08x}", DOVECOT_UID)
    if skipped:
        log.warning("%s: %d malformed lines skipped", DOVECOT_FILE, skipped)
    return found


def _courier_legacy_uidl(key: str) -> str:
    """courier-pop3d's UIDL for an entry without a number: the unique part,
    characters outside 0x21-0x7E and ' " + written as +XX."""
    out = []
    for byte in os.fsencode(key):
        out.append(f"+{byte:02X}" if byte < 0x21 or byte > 0x7E or byte in b"'\"+" else chr(byte))
    return "".join(out)


def parse_courier_sizelist(data: bytes) -> dict[str, Imported]:
    """Unique part -> UIDL, from a courierpop3dsizelist's bytes."""
    header = data.partition(b"\n")[0]
    fields = header[1:].split()
    if header[:1] != b"/" or len(fields) < 2 or fields[0] not in (b"2", b"3"):
        log.warning("%s: unknown header; its UIDLs are not used", COURIER_FILE)
        return {}
    found: dict[str, Imported] = {}
    skipped = 0
    for line in _lines(data):
        # "<file name> <size> <uid>:<uidvalidity>[:<utf8>]"; the name may hold spaces.
        name, _, numbers = line.rpartition(b" ")
        name, _, size = name.rpartition(b" ")
        parts = numbers.split(b":")
        key = _key(name)
        uid = _number(parts[0])
        uidv = _number(parts[1]) if len(parts) in (2, 3) else None
        if key is None or _number(size) is None or uid is None or uidv is None:
            skipped += 1
            continue
        if uid == 0:
            uidl = _courier_legacy_uidl(key)
        else:
            uidl = f"UID{uid}-{uidv}" if uidv else f"UID{uid}"
        found[key] = Imported(uidl, COURIER)
    if skipped:
        log.warning("%s: %d malformed lines skipped", COURIER_FILE, skipped)
    return found


_PARSERS = {DOVECOT_FILE: parse_dovecot_uidlist, COURIER_FILE: parse_courier_sizelist}


def read_imports(path: str, opened: Sequence[tuple[str, int]], messages: int) -> dict[str, Imported]:
    """The UIDLs of the files `opened` (name, fd: closed here) in Maildir
    `path`, which holds `messages` messages (read_limit). Where both files
    know a message, the one written last wins: that server was the one
    serving POP3 when the site moved."""
    dated = []
    for name, fd in opened:
        try:
            mtime = os.fstat(fd).st_mtime_ns
        except OSError:
            mtime = 0
        dated.append((mtime, name, fd))
    imported: dict[str, Imported] = {}
    for _, name, fd in sorted(dated):  # oldest first: a newer file overwrites
        imported.update(_PARSERS[name](_read_bounded(fd, os.path.join(path, name), read_limit(messages))))
    return imported


def apply_imports(
    path: str, names: Sequence[str], ours: Sequence[str], imported: dict[str, Imported]
) -> tuple[list[str], list[str | None]]:
    """Per message, its UID (imported where one is known and usable, else
    ours) and the source of an imported one (None: ours). `ours` must be
    unique, as the Maildir backend makes them.

    An imported UIDL that RFC 1939 does not allow, that two messages would
    share, or that another message already has as its own, is not used:
    that message keeps ours (one log line says how many)."""
    uids = list(ours)
    sources: list[str | None] = [None] * len(names)
    invalid = 0
    holder: dict[str, int] = {}  # imported UIDL -> the message it is given to
    shared: set[str] = set()
    for i, name in enumerate(names):
        hit = imported.get(name.partition(":")[0])
        if hit is None:
            continue
        if not is_valid_uid(hit.uidl):
            invalid += 1
            continue
        if hit.uidl in holder:
            shared.add(hit.uidl)
        holder.setdefault(hit.uidl, i)
        uids[i], sources[i] = hit.uidl, hit.source
    clashes = 0
    for i in range(len(names)):
        if sources[i] is not None and uids[i] in shared:
            uids[i], sources[i] = ours[i], None
            clashes += 1
    # A message that keeps ours takes that UID; an imported one equal to it
    # goes back to its own, which may free nothing but may clash in turn:
    # each message goes back at most once, so this ends after len(names) steps.
    pending = [i for i in range(len(names)) if sources[i] is None]
    while pending:
        i = pending.pop()
        j = holder.get(ours[i])
        if j is not None and j != i and sources[j] is not None:
            uids[j], sources[j] = ours[j], None
            clashes += 1
            pending.append(j)
    if invalid or clashes:
        log.warning(
            "%s: %d imported UIDLs unfit for UIDL, %d shared or taken; those messages get UIDs of our own",
            path, invalid, clashes,
        )
    return uids, sources
