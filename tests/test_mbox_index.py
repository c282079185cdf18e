"""mbox indexing: separators, sizes, header facts and UIDs (qpopper's rules)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from mbox_helpers import entry, from_line, mbox, stored
from qpopper.maildrop import is_valid_uid
from qpopper.maildrop.mboxindex import base80, computed_uid, index_buffer, index_file, is_from_line, parse_headers
from qpopper.protocol import wire_size

# The layouts c-client's VALID macro documents, plus " remote from".
VALID_FROM_LINES = [
    b"From user Wed Dec  2 05:53 1992",
    b"From user Wed Dec  2 05:53:22 1992",
    b"From user Wed Dec  2 05:53 PST 1992",
    b"From user Wed Dec  2 05:53:22 PST 1992",
    b"From user Wed Dec  2 05:53 -0700 1992",
    b"From user Wed Dec  2 05:53:22 -0700 1992",
    b"From user Wed Dec  2 05:53 1992 PST",
    b"From user Wed Dec  2 05:53:22 1992 PST",
    b"From user Wed Dec  2 05:53 1992 -0700",
    b"From user Wed Dec  2 05:53:22 1992 -0700",
    b"From user Wed Dec  2 05:53:22 1992 remote from uucphost",
    b"From sender@example.org  Fri Nov 27 04:20:14 2026",  # procmail, postfix: two spaces
    b"From MAILER-DAEMON Fri Jun 23 02:56:55 2000",
    b"From \"quoted local\"@example.org Fri Jun 23 02:56:55 2000",
    b"From  Fri Jun 23 02:56:55 2000",
]
INVALID_FROM_LINES = [
    b"From here to eternity",
    b"From user Wed Dec 2 05:53:22 1992",  # day not space-padded
    b"From user Wed Dec  2 05:53:22 92",
    b"From user Wed Dec  2 0553 1992",
    b"From user",
    b"from user Wed Dec  2 05:53:22 1992",
    b">From user Wed Dec  2 05:53:22 1992",
    b"From user Wed Dec  2 05:53:22 1992 trailing words",
]


@pytest.mark.parametrize("line", VALID_FROM_LINES)
def test_valid_from_lines(line: bytes) -> None:
    assert is_from_line(line + b"\n")
    assert is_from_line(line + b"\r\n")
    assert len(index_buffer(line + b"\nSubject: x\n\nbody\n")) == 1


@pytest.mark.parametrize("line", INVALID_FROM_LINES)
def test_invalid_from_lines_do_not_split(line: bytes) -> None:
    assert not is_from_line(line + b"\n")
    spool = entry(b"Subject: one\n\nbody\n\n" + line + b"\nmore body\n")
    # Written unquoted on purpose (mboxcl2 style) to see it is not a separator.
    spool = spool.replace(b">" + line, line)
    idx = index_buffer(spool)
    assert len(idx) == 1


def test_from_line_needs_an_empty_line_before_it() -> None:
    body = b"Subject: a\n\nline\nFrom x@y Wed Dec  2 05:53:22 1992\ntail\n"
    spool = from_line() + body + b"\n"  # unquoted body line not after an empty line
    idx = index_buffer(spool)
    assert len(idx) == 1
    assert spool[idx.starts[0] : idx.ends[0]] == body


def test_messages_sizes_and_bytes() -> None:
    messages = [b"Subject: a\n\nA\n", b"Subject: b\n\n\n\nB ends with empty lines\n\n", b"Subject: c\n\nC"]
    spool = mbox(messages)
    idx = index_buffer(spool)
    assert len(idx) == 3
    for i, m in enumerate(messages):
        got = spool[idx.starts[i] : idx.ends[i]]
        assert got == stored(m)
        assert idx.sizes[i] == wire_size(got) == wire_size(stored(m))
    assert idx.from_starts[0] == 0 and idx.seg_ends[-1] == len(spool)
    assert list(idx.seg_ends[:-1]) == list(idx.from_starts[1:])


def test_crlf_stored_spool() -> None:
    one = b"Subject: a\r\n\r\nA\r\n"
    two = b"Subject: b\r\n\r\nB\r\n"
    spool = from_line(1).replace(b"\n", b"\r\n") + one + b"\r\n" + from_line(2).replace(b"\n", b"\r\n") + two + b"\r\n"
    idx = index_buffer(spool)
    assert len(idx) == 2
    assert spool[idx.starts[0] : idx.ends[0]] == one
    assert spool[idx.starts[1] : idx.ends[1]] == two
    assert list(idx.sizes) == [len(one), len(two)]
    assert idx.body_starts[0] == idx.starts[0] + len(b"Subject: a\r\n\r\n")


def test_crlf_message_in_lf_spool_as_procmail_writes_it() -> None:
    msg = b"From: a@b\r\nSubject: crlf\r\n\r\nw\r\n"
    spool = from_line() + msg + b"\n" + entry(b"Subject: next\n\nx\n")
    idx = index_buffer(spool)
    assert len(idx) == 2
    assert spool[idx.starts[0] : idx.ends[0]] == msg
    assert idx.sizes[0] == wire_size(msg)


def test_missing_final_newline_at_end_of_file() -> None:
    spool = from_line() + b"Subject: a\n\nno newline"
    idx = index_buffer(spool)
    assert list(idx.sizes) == [wire_size(b"Subject: a\n\nno newline")]
    assert spool[idx.starts[0] : idx.ends[0]] == b"Subject: a\n\nno newline"


def test_unterminated_message_glued_to_next_by_procmail_stays_one() -> None:
    # procmail ends such a message with one newline and no empty line; like
    # qpopper we do not split there (the next From_ line follows no empty line).
    spool = from_line(1) + b"Subject: a\n\nno final newline\n" + entry(b"Subject: b\n\nb\n", 2)
    assert len(index_buffer(spool)) == 1


def test_quoting_left_as_stored() -> None:
    spool = entry(b"Subject: q\n\n>From already quoted\nFrom to be quoted\n")
    idx = index_buffer(spool)
    assert spool[idx.starts[0] : idx.ends[0]] == b"Subject: q\n\n>From already quoted\n>From to be quoted\n"


def test_empty_and_degenerate_spools() -> None:
    assert len(index_buffer(b"")) == 0
    assert len(index_buffer(b"\n\n")) == 0
    idx = index_buffer(from_line())
    assert len(idx) == 1 and list(idx.sizes) == [0]
    idx = index_buffer(from_line().rstrip(b"\n"))
    assert len(idx) == 1 and list(idx.sizes) == [0]


def test_leading_empty_lines_are_skipped() -> None:
    spool = b"\n\n" + mbox([b"Subject: a\n\na\n"])
    idx = index_buffer(spool)
    assert len(idx) == 1 and spool[idx.starts[0] : idx.ends[0]] == b"Subject: a\n\na\n"


def test_text_before_first_from_line_is_served_not_refused() -> None:
    junk = b"Subject: stray\n\nnot an mbox message\n\n"
    spool = junk + mbox([b"Subject: a\n\na\n"])
    idx = index_buffer(spool)
    assert len(idx) == 2
    assert idx.from_starts[0] == idx.starts[0] == 0
    assert spool[idx.starts[0] : idx.ends[0]] == b"Subject: stray\n\nnot an mbox message\n"


def test_content_length_spans_unquoted_from_lines() -> None:
    body = b"text\n\nFrom x@y Wed Dec  2 05:53:22 1992\nstill the same message\n"
    msg = b"Subject: cl\nContent-Length: %d\n\n" % len(body) + body
    spool = from_line(1) + msg + b"\n" + from_line(2) + b"Subject: b\n\nb\n\n"
    idx = index_buffer(spool)
    assert len(idx) == 2
    assert spool[idx.starts[0] : idx.ends[0]] == msg
    at_eof = from_line(1) + msg
    assert len(index_buffer(at_eof)) == 1
    assert len(index_buffer(at_eof, use_content_length=False)) == 2


def test_wrong_content_length_is_ignored() -> None:
    for stated in (0, 5, 10**9):
        msg = b"Subject: cl\nContent-Length: %d\n\nbody\n" % stated
        spool = from_line(1) + msg + b"\n" + entry(b"Subject: b\n\nb\n", 2)
        idx = index_buffer(spool)
        assert len(idx) == 2
        assert spool[idx.starts[0] : idx.ends[0]] == msg


def test_header_facts() -> None:
    block = (
        b"Received: from a\n\tby b\nDate: Wed, 2 Dec 1992\nSubject: s\nStatus: RO\n"
        b"X-UIDL: short\nX-UIDL: 0123456789abcdef0123456789abcdef\nMessage-Id: <x@y>\n\n"
    )
    facts = parse_headers(block)
    assert facts.seen
    assert facts.xuidl == "0123456789abcdef0123456789abcdef"
    # Hashing stops at the X-UIDL that was accepted (it makes the hash moot).
    assert facts.hashed_lines == [b"Received: from a\n", b"Date: Wed, 2 Dec 1992\n", b"Subject: s\n"]
    assert not parse_headers(b"Status: O\n\n").seen
    assert parse_headers(b"X-UIDL: " + b"x" * 33 + b"\n").xuidl is None
    assert parse_headers(b"X-UIDL: has a space in it\n").xuidl is None
    assert parse_headers(b"X-UIDL: 12345678901\n").xuidl == "12345678901"


def test_computed_uid_is_qpoppers_formula() -> None:
    fl = from_line()
    msg = b"Received: from x\nFrom: a@b\nDate: d\nMessage-Id: <m>\nSubject: s\nX-Other: o\n\nbody\n"
    idx = index_buffer(fl + msg + b"\n")
    digest = hashlib.md5(
        fl + b"Received: from x\n" + b"Date: d\n" + b"Message-Id: <m>\n" + b"Subject: s\n" + fl
    ).digest()
    assert (
        idx.uids
        == [base80(digest)]
        == [computed_uid(fl, [b"Received: from x\n", b"Date: d\n", b"Message-Id: <m>\n", b"Subject: s\n"])]
    )
    uid = idx.uids[0]
    assert len(uid) == 20 and "." not in uid and is_valid_uid(uid)


def test_base80_alphabet() -> None:
    assert base80(bytes(16)) == "!" * 20
    assert base80(b"\xff" * 16) == base80(b"\xff" * 16)
    for i in range(256):
        uid = base80(bytes([i]) * 16)
        assert len(uid) == 20 and "." not in uid and is_valid_uid(uid)


def test_duplicate_uids_get_a_suffix_in_file_order() -> None:
    same = b"Subject: same\nMessage-Id: <same@x>\n\nbody\n"
    xu = b"X-UIDL: 0123456789abcdef0123\nSubject: copied\n\nb\n"
    spool = mbox([same, same, xu, same, xu])
    spool = spool.replace(from_line(1), from_line(0)).replace(from_line(3), from_line(0))
    idx = index_buffer(spool)
    u = idx.uids
    assert u is not None
    assert len(set(u)) == 5 and all(is_valid_uid(x) for x in u)
    assert u[2] == "0123456789abcdef0123" and u[4] == "0123456789abcdef0123-2"
    assert u[1] == u[0] + "-2" and u[3] == u[0] + "-3"


def test_qpopper_written_spool_keeps_uids_and_seen_flags() -> None:
    messages = [
        b"Subject: one\nStatus: RO\nX-UIDL: 4f2a!!!8b#!!Mq(!!p3)!\n\n1\n",
        b"Subject: two\nX-UIDL: 0123456789abcdef0123456789abcdef\nStatus: O\n\n2\n",
        b"Subject: three\nStatus: U\n\n3\n",
    ]
    idx = index_buffer(mbox(messages))
    assert idx.uids is not None
    assert idx.uids[:2] == ["4f2a!!!8b#!!Mq(!!p3)!", "0123456789abcdef0123456789abcdef"]
    assert list(idx.seen) == [True, False, False]
    assert len(idx.uids[2]) == 20


def test_uid_does_not_depend_on_position_or_neighbours() -> None:
    msgs = [b"Subject: m%d\nMessage-Id: <%d@x>\n\nbody\n" % (i, i) for i in range(5)]
    full = index_buffer(mbox(msgs)).uids
    assert full is not None
    fewer = index_buffer(b"".join(entry(m, n) for n, m in enumerate(msgs) if n in (1, 4))).uids
    assert fewer == [full[1], full[4]]


def test_a_spool_cut_short_while_indexed_is_a_value_error(tmp_path: Path) -> None:
    """index_file's callers turn ValueError into "cannot index"; a shorter
    file than the length asked for must not escape as anything else."""
    spool = tmp_path / "cut"
    spool.write_bytes(mbox([b"Subject: a\n\nbody\n"]))
    fd = os.open(spool, os.O_RDONLY)
    try:
        with pytest.raises(ValueError):
            index_file(fd, spool.stat().st_size + 100)
    finally:
        os.close(fd)


def test_a_mapped_spool_indexes_like_the_same_bytes_in_memory(tmp_path: Path) -> None:
    """Spools are mapped and counted in copied pieces; bytes in memory are
    counted in place: same sizes either way, over a megabyte of mixed mail."""
    kinds = [b"Subject: lf\n\nline\n" * 40, b"Subject: crlf\r\n\r\nline\r\n" * 40, b"Subject: cr\n\nbare\rcr\n" * 40,
             b"Subject: end\n\nno final newline"]
    data = b""
    n = 0
    while len(data) <= 1024 * 1024:
        data += entry(kinds[n % len(kinds)], n)
        n += 1
    spool = tmp_path / "big"
    spool.write_bytes(data)
    fd = os.open(spool, os.O_RDONLY)
    try:
        mapped = index_file(fd, len(data))
    finally:
        os.close(fd)
    whole = index_buffer(data)
    assert len(mapped) == len(whole) == n
    assert list(mapped.sizes) == list(whole.sizes) and list(mapped.starts) == list(whole.starts)
    assert mapped.fingerprint == whole.fingerprint
