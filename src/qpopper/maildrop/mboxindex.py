"""Finding the messages of an mbox spool, their sizes and their UIDs.

A spool of 50,000 messages must be listed in about a second, so nothing
here looks at lines one by one in Python. The file is mapped (mmap) and
searched with bytes and regex methods that run in C; Python code runs once
per *message* (and once per body line that starts with "From ", which MDAs
quote, so those are rare).

What counts as a message boundary is what qpopper accepts:

* a line starting "From " that is the first line of the file or follows
  an empty line (LF or CRLF), and
* whose end carries a date in one of the layouts Mark Crispin's c-client
  accepts ("Wed Dec  2 05:53 1992", with or without seconds, with a zone
  name or a numeric zone before or after the year, optionally followed by
  " remote from host"). Anything else is body text.

A `Content-Length:` header (mboxcl/mboxcl2, whose writers do not quote
"From " in bodies) is honoured only when the length it states ends exactly
at end of file or at a valid From_ line, so a wrong or forged one changes
nothing.

The From_ line belongs to the format, not to the message, and so does the
empty line that writers append after each message: a message's bytes run
from after its From_ line to before that empty line. Quoting (">From ")
is left as stored. Sizes are RFC 1939 sizes of those bytes (every line end
counted as CRLF, plus CRLF for a missing final newline), i.e. exactly what
RETR sends before dot-stuffing.

UIDs are worked out when first asked for (`work_out_uids`), not while
indexing: hashing every header block is most of an index's cost, and a
session that only checks for mail or downloads never needs them.

UIDs follow qpopper 4 (reference 4.4): the first X-UIDL header whose value
is of the length qpopper writes is used as it is; otherwise the UID is
qpopper's deterministic one, MD5 over the From_ line, the Received:, Date:,
Message-Id: and Subject: header lines and the From_ line again, written in
its "base 80" alphabet. A spool qpopper served therefore keeps its UIDs,
whether qpopper wrote X-UIDL headers or recomputed the UIDs each session.
"""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
import re
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from ..wiresize import SizeCounter, wire_size
from ._base import UID_MAX_LEN, is_valid_uid

# Longest line we accept as a From_ line (qpopper reads 1 kB lines; we are
# more generous for long VERP senders, but a megabyte-long line is body).
MAX_FROM_LINE = 4096
# Headers longer than this are not parsed for UIDs and flags.
MAX_HEADER_PARSE = 256 * 1024
# Messages are counted in pieces of this size so no large copy is made.
COUNT_CHUNK = 4 * 1024 * 1024
# Mappings up to this size are populated at once (fewer page faults); the
# populating read runs before the first dotlock refresh, so a bigger spool
# on a slow disk is left to fault in as the scan goes, refreshing as it goes.
POPULATE_BYTES = 1024 * 1024 * 1024
# qpopper accepts an X-UIDL value (with its line end) of 12..33 octets.
XUIDL_MIN, XUIDL_MAX = 12, 33
# Octets of the digest of one part of the fingerprint.
PART_DIGEST = 16

# A line starting "From " (group 1, after the newline before it) up to and
# with its newline; a line longer than MAX_FROM_LINE ends the match without one.
_FROM_LINE = re.compile(rb"\n(From [^\n]{0,%d}\n?)" % (MAX_FROM_LINE - 6))
_FIRST_FROM_LINE = re.compile(rb"From [^\n]{0,%d}\n?" % (MAX_FROM_LINE - 6))
_BLANK_LINE = re.compile(rb"\n\r?\n")
# The tail of a valid From_ line: the c-client date layouts.
_ZONE = rb"(?:[A-Za-z]{3}|[+-][0-9]{4})"
# The layout nearly every delivery agent writes (" Wed Dec  2 05:53:22 1992"
# and an LF), checked at its fixed place at the end of the line before the
# search above has to look for a date anywhere in it.
_USUAL_DATE_TAIL = re.compile(rb" [A-Za-z]{3} [A-Za-z]{3} [ 0-9][0-9] [0-9]{2}:[0-9]{2}:[0-9]{2} [0-9]{4}\n")
_USUAL_TAIL_LEN = 26
_FROM_DATE = re.compile(
    rb" [A-Za-z]{3} [A-Za-z]{3} [ 0-9][0-9] [0-9]{2}:[0-9]{2}(?::[0-9]{2})?"
    rb"(?: " + _ZONE + rb" [0-9]{4}| [0-9]{4}(?: " + _ZONE + rb")?)"
    rb"(?: remote from [^ \r\n]*)?\r?\n?\Z"
)
_HEADER = re.compile(
    rb"^(received|date|message-id|subject|x-uidl|status|content-length):([^\n]*(?:\n|\Z))",
    re.IGNORECASE | re.MULTILINE,
)
_HASHED = frozenset((b"received", b"date", b"message-id", b"subject"))
# Most messages carry none of the fields that need a closer look; for them
# one search and one findall replace a Python loop over every header.
# Both start with a literal newline (searched for in C) and are applied to
# the block with a newline in front; the line end of a hashed line is put
# back by the caller, so that adjacent lines each keep their newline.
_RARE_NAMES = rb"(?i:x-uidl|status|content-length):"
_RARE_HEADER = re.compile(rb"\n" + _RARE_NAMES)
# Whichever comes first from a message's From_ line end: one of those
# headers, or the empty line that ends the header block (group 1).
_HEADER_END_OR_RARE = re.compile(rb"\n(?:(\r?\n)|" + _RARE_NAMES + rb")")
_HASHED_LINE = re.compile(rb"\n((?i:received|date|message-id|subject):[^\n]*)")
_CONTENT_LENGTH = re.compile(rb"[ \t]*([0-9]{1,15})[ \t]*\r?\n?\Z")


def is_from_line(line: bytes) -> bool:
    """True if `line` (with or without its line end) is a valid From_ line."""
    return line.startswith(b"From ") and len(line) <= MAX_FROM_LINE and _FROM_DATE.search(line) is not None


def _digit(value: int) -> str:
    ch = chr(0x21 + value)
    return "~" if ch == "." else ch


_ONE = [_digit(v) for v in range(80)]


@functools.cache
def _pairs() -> list[str]:
    """Base-80 digits in pairs (least significant first), so a group of
    five digits costs three table look-ups instead of five divisions; made
    at the first UIDL (6,400 strings, ~380 kB) rather than at import."""
    return [_ONE[v % 80] + _ONE[v // 80] for v in range(6400)]


def base80(digest: bytes) -> str:
    """qpopper's UID alphabet: 4 groups of 4 digest bytes -> 5 chars each.

    qpopper folds each group with 4-bit shifts (its comment admits this is
    "not exact about MSBs", but it is what its UIDs are made of), then
    writes base-80 digits from 0x21, least significant first, turning "."
    into "~" so a UID never needs dot-stuffing.
    """
    d = digest
    two = _pairs()
    out = []
    for g in (0, 4, 8, 12):
        v = (d[g] << 12) + (d[g + 1] << 8) + (d[g + 2] << 4) + d[g + 3]
        out.append(two[v % 6400] + two[(v // 6400) % 6400] + _ONE[(v // 40960000) % 80])
    return "".join(out)


@dataclass(slots=True)
class HeaderFacts:
    """What the indexer needs from one message's header block."""

    xuidl: str | None = None
    seen: bool = False
    content_length: int | None = None
    hashed_lines: list[bytes] = field(default_factory=list)


def parse_headers(block: bytes) -> HeaderFacts:
    """Pick X-UIDL, Status, Content-Length and the UID lines from headers.

    Like qpopper, only header lines starting with the field name count
    (continuation lines are not hashed), an X-UIDL of the wrong length is
    ignored and the next one tried, and "R" anywhere in Status means the
    message was retrieved before.
    """
    facts = HeaderFacts()
    for m in _HEADER.finditer(block):
        name = m.group(1).lower()
        rest = m.group(2)
        if name in _HASHED:
            if facts.xuidl is None:
                facts.hashed_lines.append(m.group(0))
        elif name == b"x-uidl":
            if facts.xuidl is None:
                value = rest.lstrip(b" \t")
                if XUIDL_MIN <= len(value) + (0 if value.endswith(b"\n") else 1) <= XUIDL_MAX:
                    uid = value.rstrip(b" \t\r\n").decode("ascii", "replace")
                    if is_valid_uid(uid):
                        facts.xuidl = uid
        elif name == b"status":
            facts.seen = facts.seen or b"R" in rest
        elif facts.content_length is None:
            cl = _CONTENT_LENGTH.match(rest)
            if cl:
                facts.content_length = int(cl.group(1))
    return facts


def header_facts(block: bytes) -> HeaderFacts:
    """`parse_headers`, faster for the usual block without X-UIDL, Status
    or Content-Length."""
    text = b"\n" + block
    if _RARE_HEADER.search(text) is not None:
        return parse_headers(block)
    lines = _HASHED_LINE.findall(text)
    if not lines:
        return HeaderFacts()
    hashed = b"\n".join(lines)
    if not text.endswith(b"\n" + lines[-1]):
        hashed += b"\n"  # every hashed line ends in a newline but a last one at the very end
    return HeaderFacts(hashed_lines=[hashed])


def computed_uid(from_line: bytes, hashed_lines: list[bytes]) -> str:
    """qpopper's deterministic UID (update-status-headers off, new style)."""
    digest = hashlib.md5(from_line + b"".join(hashed_lines) + from_line, usedforsecurity=False).digest()
    return base80(digest)


def wire_size_of(buf: bytes | mmap.mmap, start: int, end: int) -> int:
    """RFC 1939 size of buf[start:end] by the one rule (`qpopper.wiresize`):
    bytes are counted in place; a mapping, which has no count, is copied
    out in bounded pieces."""
    if isinstance(buf, bytes):
        return wire_size(buf, start, end)
    if end - start <= COUNT_CHUNK:
        return wire_size(buf[start:end])  # one copy, counted in place
    counter = SizeCounter()
    for pos in range(start, end, COUNT_CHUNK):
        counter.feed(buf[pos : min(end, pos + COUNT_CHUNK)])
    return counter.result()


@dataclass(slots=True)
class MboxIndex:
    """Where each message lies in the file, plus what POP lists for it.

    Per message i: `from_starts[i]` is where its segment (From_ line
    included) begins, `starts[i]`/`ends[i]` delimit the message bytes
    (From_ line and separating empty line excluded), `body_starts[i]` is
    where the body begins (after the empty line ending the headers; equal
    to `ends[i]` if there is none) and `seg_ends[i]` is where the next
    segment begins. Segments tile the file from `from_starts[0]` to
    `length`; bytes before that are empty lines only. A first message
    without a From_ line (garbage before the first From_ line) has
    `from_starts[0] == starts[0] == 0`.
    """

    length: int = 0
    from_starts: array[int] = field(default_factory=lambda: array("q"))
    starts: array[int] = field(default_factory=lambda: array("q"))
    body_starts: array[int] = field(default_factory=lambda: array("q"))
    ends: array[int] = field(default_factory=lambda: array("q"))
    seg_ends: array[int] = field(default_factory=lambda: array("q"))
    sizes: array[int] = field(default_factory=lambda: array("q"))
    seen: bytearray = field(default_factory=bytearray)  # 1: Status says retrieved
    crlf: bytearray = field(default_factory=bytearray)  # 1: From_ line ends in CRLF
    xuidls: dict[int, str] = field(default_factory=dict)  # UIDs read from X-UIDL headers
    uids: list[str] | None = None  # None until work_out_uids
    renamed: set[int] = field(default_factory=set)  # UIDs given a suffix to be unique
    fingerprint: bytes = b""
    # The fingerprint's parts (see `fingerprint`): messages per part, and a digest per part.
    fp_parts: tuple[int, ...] = ()
    fp_digests: bytes = b""
    # How far a Content-Length of a message may reach (the farthest offset it
    # could name as the next boundary): of all but the last message, and of the last.
    cl_reach_before_last: int = 0
    cl_reach_last: int = 0
    # UIDs before they were made unique, when known before `work_out_uids`
    # (kept from an earlier session); and, once made unique, the plain UID of
    # each renamed message.
    raw_uids: list[str] | None = None
    raw_renamed: dict[int, str] | None = None
    raw_uid_text: bytes = b""  # raw_uids still to be split out (one per line)

    def __len__(self) -> int:
        return len(self.starts)

    def has_xuidl(self, i: int) -> bool:
        return i in self.xuidls


class _Separators(NamedTuple):
    """The valid From_ lines of a buffer, in order."""

    positions: list[int]  # where each starts
    line_ends: list[int]  # where the line after each starts
    lines: list[bytes]  # the lines themselves, for the fingerprint
    # Where the message before each ends: the empty line that must come
    # before a From_ line is the format's, not the message's (see
    # `_message_end`, which says the same for the last message).
    ends_before: list[int]


def _separators(buf: bytes | mmap.mmap, length: int) -> _Separators:
    """Every valid From_ line, found by one regex walk.

    The walk finds every line starting "From " together with its end (at
    most MAX_FROM_LINE octets; a longer line is body text), so the
    per-candidate Python is two byte tests and the date check. What the
    index needs of each line is kept: reading it out of the buffer again
    per message would cost more than keeping it.
    """
    found = _Separators([], [], [], [])
    positions, line_ends, lines, ends_before = found
    if buf[:5] == b"From ":
        first = _FIRST_FROM_LINE.match(buf)
        assert first is not None
        eol = first.end()
        if (eol == length or buf[eol - 1] == 0x0A) and _FROM_DATE.search(buf, 0, eol):
            positions.append(0)
            line_ends.append(eol)
            lines.append(first.group())
            ends_before.append(0)
    date, usual = _FROM_DATE.search, _USUAL_DATE_TAIL.fullmatch
    for m in _FROM_LINE.finditer(buf):
        nl, eol = m.span()
        # The line before must be empty: "\n\n", "\n\r\n", or the file's
        # first line ("\n" or "\r\n" at offset 0).
        if nl == 0 or buf[nl - 1] == 0x0A:
            end_before = nl
        elif buf[nl - 1] == 0x0D and (nl == 1 or buf[nl - 2] == 0x0A):
            end_before = nl - 1
        else:
            continue
        # (On a line too short for the usual tail, the window takes in the
        # newline before "From ", which the tail cannot match: the search decides.)
        if usual(buf, eol - _USUAL_TAIL_LEN, eol) or (
                (eol == length or buf[eol - 1] == 0x0A) and date(buf, nl + 1, eol)):
            positions.append(nl + 1)
            line_ends.append(eol)
            lines.append(m.group(1))
            ends_before.append(end_before)
    return found


def _message_end(buf: bytes | mmap.mmap, start: int, seg_end: int) -> int:
    """End of the message in [start, seg_end): drop the separating empty line.

    Writers end every message with an empty line before the next From_
    line (postfix always adds one, procmail makes sure there is one), so a
    final line end that itself starts a line is the format's, not the
    message's. A message that lacks it (the last one, or one whose writer
    left no final newline) is kept whole.
    """
    if seg_end > start and buf[seg_end - 1] == 0x0A:
        cut = seg_end - 1
        if cut > start and buf[cut - 1] == 0x0D and (cut - 1 == start or buf[cut - 2] == 0x0A):
            return cut - 1
        if cut == start or buf[cut - 1] == 0x0A:
            return cut
    return seg_end


def _body_start(buf: bytes | mmap.mmap, start: int, end: int) -> int:
    """Offset just after the empty line that ends the headers (or `end`)."""
    if start >= end:
        return end
    if buf[start] == 0x0A:
        return start + 1
    if buf[start : start + 2] == b"\r\n":
        return start + 2
    m = _BLANK_LINE.search(buf, start, end)
    return m.end() if m else end


def fingerprint(read_at: Callable[[int, int], bytes], index: MboxIndex) -> bytes:
    """A digest of every From_ line and of both ends of the indexed bytes.

    Computed when indexing and again, from the file, before UPDATE: if the
    spool was changed other than by appending (an MUA rewrote it), the
    From_ lines no longer sit where the index says and UPDATE refuses to
    run rather than cut messages in the wrong places.

    The From_ lines are digested in parts, runs of consecutive messages
    (`index.fp_parts`), and the fingerprint is the digest of the length,
    the parts' digests and both ends: an index extended by mail appended
    since (`extend_index`) keeps the digests of the parts it kept, so it
    need not read every From_ line again, and the result is the same.
    """
    digests = []
    i = 0
    for count in index.fp_parts:
        h = _part_hash()
        for k in range(i, i + count):
            a = index.from_starts[k]
            h.update(read_at(a, index.starts[k] - a))
        digests.append(h.digest())
        i += count
    return _fingerprint_of_parts(index, b"".join(digests), read_at)


def _part_hash() -> hashlib.blake2b:
    return hashlib.blake2b(digest_size=PART_DIGEST)


def split_parts(count: int) -> tuple[int, ...]:
    """How an index of `count` messages splits its From_ lines into parts:
    the last message alone, so that an extension, which indexes the last
    message again with the new mail, keeps every other part."""
    if count <= 1:
        return (count,) if count else ()
    return (count - 1, 1)


def _fingerprint_of_buffer(buf: bytes | mmap.mmap, index: MboxIndex, from_lines: list[bytes] | None) -> None:
    """Set the fingerprint of the buffer just indexed, the From_ lines of
    each part joined into one update (the digest is the same as line by
    line): `from_lines` when they are exactly the indexed messages' From_
    lines, else sliced out."""
    parts = split_parts(len(index))
    if from_lines is None:
        with memoryview(buf) as view:  # slices of a view are not copied before the join
            # Each message is appended to every array at once: equal lengths by construction.
            lines: list[bytes | memoryview] = [view[a:s] for a, s in zip(index.from_starts, index.starts, strict=False)]
            index.fp_digests = _digest_parts(lines, parts)
    else:
        # text before the first From_ line is a message with an empty From_ line
        found = from_lines if len(from_lines) == len(index) else [b"", *from_lines]
        index.fp_digests = _digest_parts(found, parts)
    index.fp_parts = parts
    index.fingerprint = _fingerprint_of_parts(index, index.fp_digests, lambda a, n: bytes(buf[a : a + n]))


def _digest_parts(lines: Sequence[bytes | memoryview], parts: tuple[int, ...]) -> bytes:
    out = []
    i = 0
    for count in parts:
        out.append(hashlib.blake2b(b"".join(lines[i : i + count]), digest_size=PART_DIGEST).digest())
        i += count
    return b"".join(out)


def _fingerprint_of_parts(index: MboxIndex, digests: bytes, read_at: Callable[[int, int], bytes]) -> bytes:
    """The fingerprint from the parts' digests: with the length, and both ends of the file."""
    h = hashlib.blake2b(digest_size=20)
    h.update(index.length.to_bytes(8, "little"))
    h.update(digests)
    h.update(read_at(0, min(4096, index.length)))
    tail = min(4096, index.length)
    h.update(read_at(index.length - tail, tail))
    return h.digest()


def index_buffer(
    buf: bytes | mmap.mmap,
    length: int | None = None,
    *,
    use_content_length: bool = True,
    tick: Callable[[], None] | None = None,
    with_uids: bool = True,
) -> MboxIndex:
    """Index an mbox held in `buf` (bytes, or an mmap of the spool).

    `tick` is called every few hundred messages so a caller holding a
    dotlock can refresh it during a long scan. Without `with_uids` the
    UIDs are left for `work_out_uids`.
    """
    if length is None:
        length = len(buf)
    index = MboxIndex(length=length)
    positions, line_ends, from_lines, ends_before = _separators(buf, length)
    first = positions[0] if positions else length
    if buf[:first].strip(b"\r\n\t \0"):
        # Text before the first From_ line: serve it rather than refuse the
        # whole maildrop (qpopper answers [SYS/PERM] and locks the user out).
        _add(index, buf, 0, 0, first)
    position_of: dict[int, int] | None = None  # made for the first Content-Length
    seg_ends = positions[1:]
    seg_ends.append(length)
    count = len(positions)
    ends = ends_before[1:]
    if count:
        ends.append(_message_end(buf, line_ends[-1], length))
    # The loop below adds the usual message inline (no header that matters
    # before its empty line, found by one search); `_add` takes the others.
    # A 50,000-message spool would spend most of its indexing time in
    # per-message Python otherwise.
    scan = _HEADER_END_OR_RARE.search
    add_from, add_start, add_body = index.from_starts.append, index.starts.append, index.body_starts.append
    add_end, add_seg_end, add_size = index.ends.append, index.seg_ends.append, index.sizes.append
    add_seen, add_crlf = index.seen.append, index.crlf.append
    skip_to = 0  # separators a Content-Length put inside a message body
    reaches: dict[int, int] = {}  # message -> how far its Content-Length reaches
    jumped = False  # some were: not every From_ line found starts a message
    # One entry per From_ line in each list (`_separators` appends to all four together;
    # seg_ends and ends are shifted by one and completed above): equal by construction.
    for k, (from_start, start, seg_end, end) in enumerate(zip(positions, line_ends, seg_ends, ends, strict=False)):
        if k < skip_to:
            continue
        if tick is not None and not k & 511:
            tick()
        found = scan(buf, start - 1, end)
        if found is not None and found.group(1) is not None:
            add_from(from_start)
            add_start(start)
            add_body(found.end())
            add_end(end)
            add_seg_end(seg_end)
            # wire_size_of, with its usual case inline: one call per message
            add_size(wire_size(buf[start:end]) if end - start <= COUNT_CHUNK else wire_size_of(buf, start, end))
            add_seen(0)
            add_crlf(start - from_start >= 2 and buf[start - 1] == 0x0A and buf[start - 2] == 0x0D)
            continue
        facts = _add(index, buf, from_start, start, seg_end)
        if use_content_length and facts.content_length is not None:
            if position_of is None:
                position_of = {p: i for i, p in enumerate(positions)}
            target = index.body_starts[-1] + facts.content_length
            reaches[len(index) - 1] = target + 2  # the farthest boundary it may name
            jump = _content_length_target(buf, length, target, position_of)
            if jump is not None and jump > k + 1:
                skip_to = jump
                jumped = True
                _drop_last(index)
                _add(index, buf, from_start, start, positions[jump] if jump < count else length)
    # Text before the first From_ line adds a message with an empty From_
    # line, so without a jump the lines found are the messages' From_ lines.
    _fingerprint_of_buffer(buf, index, None if jumped else from_lines)
    if reaches:
        last = len(index) - 1
        index.cl_reach_last = reaches.pop(last, 0)
        index.cl_reach_before_last = max(reaches.values(), default=0)
    if with_uids:
        work_out_uids(index, lambda a, n: bytes(buf[a : a + n]))
    return index


def work_out_uids(index: MboxIndex, read_at: Callable[[int, int], bytes]) -> list[str]:
    """Every message's UID, made unique; computed once, from the file.

    `read_at(offset, n)` reads the indexed file (pread on a spool: the
    mapping is gone by now, and a pread past a truncation fails cleanly
    where a mapped page would fault). The spool is not locked while a
    session reads it, so the From_ lines read here are checked against the
    index's fingerprint: a spool rewritten since (an MUA ignoring the
    session) raises ValueError rather than yield UIDs of other messages.
    UIDs known before (`raw_uids`, kept from the session that read those
    messages) are not read again once some picked at random agree, whether
    they are still text or an extension (`extend_index`) split them.
    """
    if index.uids is not None:
        return index.uids
    if index.raw_uid_text:
        index.raw_uids, index.raw_uid_text = index.raw_uid_text.decode("ascii").split("\n"), b""
    raw = index.raw_uids
    if raw is not None and len(raw) == len(index) and _sampled_uids_agree(index, raw, read_at):
        uids = list(raw)
    else:
        uids = _uids_read_from(index, read_at)
    index.renamed, index.raw_renamed = _make_unique(uids)
    index.uids = uids
    return uids


# UIDs kept from an earlier session are checked by working these many out again.
UID_SAMPLES = 32


def _sampled_uids_agree(index: MboxIndex, raw: list[str], read_at: Callable[[int, int], bytes]) -> bool:
    """Whether UIDs kept from an earlier session (`raw`) hold for some
    messages picked at random, and the first and last; if not, every UID
    is worked out from the file."""
    n = len(index)
    if len(raw) != n or min(map(len, raw)) < 1 or max(map(len, raw)) > UID_MAX_LEN:
        return False
    import random  # only sessions that kept UIDs need it

    picks = {0, n - 1, *random.SystemRandom().sample(range(n), min(UID_SAMPLES, n))}
    try:
        return all(raw_uid(index, i, read_at) == raw[i] for i in picks)
    except (OSError, EOFError):
        return False


def _uids_read_from(index: MboxIndex, read_at: Callable[[int, int], bytes]) -> list[str]:
    uids: list[str] = []
    digests = []
    starts, from_starts, body_starts, xuidls = index.starts, index.from_starts, index.body_starts, index.xuidls
    first = 0
    for count in index.fp_parts:
        check = _part_hash()
        for i in range(first, first + count):
            a, s = from_starts[i], starts[i]
            uid = xuidls.get(i)
            if uid is None:
                head = read_at(a, min(body_starts[i], s + MAX_HEADER_PARSE) - a)
                uid = computed_uid(head[: s - a], header_facts(head[s - a :]).hashed_lines)
                check.update(head[: s - a])
            else:
                check.update(read_at(a, s - a))
            uids.append(uid)
        first += count
        digests.append(check.digest())
    if uids and _fingerprint_of_parts(index, b"".join(digests), read_at) != index.fingerprint:
        raise ValueError("the spool changed since it was indexed")
    return uids


def raw_uid(index: MboxIndex, i: int, read_at: Callable[[int, int], bytes]) -> str:
    """Message `i`'s UID before it is made unique."""
    uid = index.xuidls.get(i)
    if uid is not None:
        return uid
    a, s = index.from_starts[i], index.starts[i]
    head = read_at(a, min(index.body_starts[i], s + MAX_HEADER_PARSE) - a)
    return computed_uid(head[: s - a], header_facts(head[s - a :]).hashed_lines)


def _content_length_target(
    buf: bytes | mmap.mmap, length: int, target: int, position_of: dict[int, int]
) -> int | None:
    """Separator number where a Content-Length says the next message starts.

    Returns len(positions) (as "end of file") for a body ending at EOF,
    None when the stated length does not land on a boundary.
    """
    for skip in (b"", b"\n", b"\r\n"):
        at = target + len(skip)
        if at > length or buf[target:at] != skip:
            continue
        if at == length:
            return len(position_of)
        if at in position_of:
            return position_of[at]
    return None


_NO_FACTS = HeaderFacts()


def _add(index: MboxIndex, buf: bytes | mmap.mmap, from_start: int, start: int, seg_end: int) -> HeaderFacts:
    """Append the message whose segment is [from_start, seg_end).

    Only X-UIDL, Status and Content-Length matter here (the lines hashed
    into UIDs wait for `work_out_uids`), and most header blocks have none
    of them: one search of the mapped file, from the From_ line's newline,
    says so without copying the block.
    """
    end = _message_end(buf, start, seg_end)
    body = _body_start(buf, start, end)
    header_end = min(body, start + MAX_HEADER_PARSE)
    if start > from_start and _RARE_HEADER.search(buf, start - 1, header_end) is None:
        facts = _NO_FACTS
    else:
        facts = parse_headers(bytes(buf[start:header_end]))
    n = len(index.starts)
    index.from_starts.append(from_start)
    index.starts.append(start)
    index.body_starts.append(body)
    index.ends.append(end)
    index.seg_ends.append(seg_end)
    index.sizes.append(wire_size_of(buf, start, end))
    index.seen.append(facts.seen)
    index.crlf.append(start - from_start >= 2 and buf[start - 1] == 0x0A and buf[start - 2] == 0x0D)
    if facts.xuidl is not None:
        index.xuidls[n] = facts.xuidl
    return facts


def _drop_last(index: MboxIndex) -> None:
    for arr in (index.from_starts, index.starts, index.body_starts, index.ends, index.seg_ends, index.sizes):
        arr.pop()
    index.seen.pop()
    index.crlf.pop()
    index.xuidls.pop(len(index.starts), None)


def _make_unique(uids: list[str]) -> tuple[set[int], dict[int, str] | None]:
    """Give repeated UIDs a counter suffix, in file order.

    Copies of one message (same From_ line and headers, or one X-UIDL
    copied along) would otherwise share a UID, which RFC 1939 forbids.
    The first keeps the plain UID, so deleting a later copy changes no
    other UID. Returns the renamed messages and their plain UIDs (None:
    none was renamed).
    """
    seen: set[str] = set(uids)
    renamed: set[int] = set()
    if len(seen) == len(uids):
        return renamed, None
    used: set[str] = set()
    plain: dict[int, str] = {}
    for i, uid in enumerate(uids):
        if uid not in used:
            used.add(uid)
            continue
        n = 2
        while True:
            candidate = f"{uid[:60]}-{n}"
            if candidate not in used and candidate not in seen:
                break
            n += 1
        uids[i] = candidate
        used.add(candidate)
        renamed.add(i)
        plain[i] = uid
    return renamed, plain


# An extension that would make the fingerprint of more parts than this
# indexes the spool whole instead (and so starts again from two parts).
MAX_PARTS = 512


def extend_index(
    index: MboxIndex,
    region: bytes,
    length: int,
    read_at: Callable[[int, int], bytes],
    *,
    use_content_length: bool = True,
) -> bool:
    """Extend `index`, in place, to a file that grew to `length` octets.

    The caller has made sure that the first `index.length` octets are still
    those `index` describes. `region` holds the file's octets from the last
    indexed message's From_ line to `length`: that message is indexed
    again with what follows it (mail appended after it may have extended
    it, or start after the empty line that ends it), so the result is the
    index a full scan of the file gives. Returns False, with `index`
    unchanged, where that cannot be promised: the last message has no
    From_ line, or a Content-Length of an earlier message could name a
    boundary in the new part; the caller then indexes the file whole.
    """
    n = len(index)
    if n == 0 or (index.fp_parts[-1:] != (1,)) or len(index.fp_parts) >= MAX_PARTS:
        return False
    at = index.from_starts[n - 1]
    if at == index.starts[n - 1] or at + len(region) != length or length < index.length:
        return False  # text before the first From_ line: only a full scan knows it
    if use_content_length and index.cl_reach_before_last > at:
        return False
    new = index_buffer(region, len(region), use_content_length=use_content_length, with_uids=False)
    if len(new) == 0 or new.from_starts[0] != 0:
        return False
    if index.raw_uid_text:
        index.raw_uids, index.raw_uid_text = index.raw_uid_text.decode("ascii").split("\n"), b""
    raw_uids = index.raw_uids
    if raw_uids is not None:
        del raw_uids[n - 1 :]
        raw_uids.extend(raw_uid(new, k, lambda a, m: region[a : a + m]) for k in range(len(new)))
    keep = n - 1
    for name in ("from_starts", "starts", "body_starts", "ends", "seg_ends", "sizes"):
        old_arr: array[int] = getattr(index, name)
        del old_arr[keep:]
        added: array[int] = getattr(new, name)
        old_arr.extend(added if name == "sizes" else array("q", [x + at for x in added]))
    del index.seen[keep:]
    index.seen += new.seen
    del index.crlf[keep:]
    index.crlf += new.crlf
    index.xuidls.pop(keep, None)
    index.xuidls.update({keep + k: uid for k, uid in new.xuidls.items()})
    index.fp_parts = index.fp_parts[:-1] + new.fp_parts
    index.fp_digests = index.fp_digests[: -PART_DIGEST] + new.fp_digests
    index.length = length
    if new.cl_reach_before_last:
        index.cl_reach_before_last = max(index.cl_reach_before_last, new.cl_reach_before_last + at)
    index.cl_reach_last = new.cl_reach_last + at if new.cl_reach_last else 0
    index.uids, index.renamed, index.raw_renamed = None, set(), None

    def read_new(a: int, m: int) -> bytes:
        return region[a - at : a - at + m] if a >= at else read_at(a, m)

    index.fingerprint = _fingerprint_of_parts(index, index.fp_digests, read_new)
    return True


def index_file(
    fd: int,
    length: int,
    *,
    use_content_length: bool = True,
    tick: Callable[[], None] | None = None,
) -> MboxIndex:
    """Index the first `length` bytes of the open spool `fd` through mmap.

    The caller holds the spool locks, so no writer truncates the file while
    it is mapped (which would fault the process). Small spools are mapped
    too: read whole into a buffer that is freed while the session's own
    objects stay, they left the heap of a daemon holding hundreds of
    sessions full of holes (see server/_memory.py).
    """
    if length == 0:
        return MboxIndex(length=0)
    populate = getattr(mmap, "MAP_POPULATE", 0) if length <= POPULATE_BYTES else 0
    with mmap.mmap(fd, length, mmap.MAP_SHARED | populate, mmap.PROT_READ) as mm:
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
            mm.madvise(mmap.MADV_SEQUENTIAL)
        return index_buffer(mm, length, use_content_length=use_content_length, tick=tick, with_uids=False)


def read_exact(fd: int, offset: int, n: int) -> bytes:
    """pread that insists on `n` bytes (a shorter file means it shrank)."""
    out = os.pread(fd, n, offset)
    while len(out) < n:
        more = os.pread(fd, n - len(out), offset + len(out))
        if not more:
            raise EOFError(f"file ended at {offset + len(out)}, expected {offset + n}")
        out += more
    return out
