"""The index a big mbox spool keeps between sessions: used when it may be, refused otherwise.

Every refusal must cost a full index and nothing else: the session's view
is compared with an index made from scratch each time.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

from mbox_helpers import deliver, entry, numbered
from qpopper.errors import MaildropError
from qpopper.maildrop import MaildropSettings, mboxindex
from qpopper.maildrop.mbox import MboxMaildrop, indexcache
from qpopper.maildrop.mbox import spool as spool_module
from qpopper.maildrop.mbox.paths import index_cache_path
from qpopper.maildrop.mboxindex import index_buffer, index_file

BODY = b"".join(b"line %d of a body long enough to make the spool big\n" % i for i in range(50))


def big_spool(path: Path, count: int = 500) -> None:
    """A spool past the size from which its index is kept (~1.5 MB)."""
    path.write_bytes(b"".join(entry(b"Subject: message %d\nMessage-ID: <%d@x>\n\n" % (k, k) + BODY, k)
                             for k in range(count)))
    assert path.stat().st_size >= spool_module.CACHED_SPOOL_BYTES
    settle()


def settle() -> None:
    time.sleep(indexcache.SETTLED_NS / 1e9 + 0.005)


def view(path: Path, uidl: bool = True) -> list[tuple[int, str, bytes]]:
    md = MboxMaildrop(str(path))
    try:
        infos = md.messages()
        uids = list(infos.uids) if uidl else [""] * len(infos)
        return [(infos.sizes[i], uids[i], b"".join(md.read(i))) for i in range(len(infos))]
    finally:
        md.close()


def scratch(path: Path) -> list[tuple[int, str, bytes]]:
    data = path.read_bytes()
    idx = index_buffer(data)
    assert idx.uids is not None
    return [(idx.sizes[i], idx.uids[i], data[idx.starts[i] : idx.ends[i]]) for i in range(len(idx))]


def full_indexes(path: Path, uidl: bool = True) -> int:
    """How many times the session indexed the spool whole; checks its view."""
    with mock.patch.object(spool_module, "index_file", wraps=index_file) as spy:
        seen = view(path, uidl)
    want = scratch(path)
    assert seen == (want if uidl else [(size, "", data) for size, _, data in want])
    return spy.call_count


def test_a_poll_indexes_only_what_arrived(tmp_path: Path) -> None:
    spool = tmp_path / "alice"
    big_spool(spool)
    assert full_indexes(spool) == 1
    assert os.path.exists(index_cache_path(str(spool)))
    for k in range(3):
        deliver(str(spool), numbered(1000 + k), 1000 + k)
        settle()  # (a session right after a delivery writes a cache the next unchanged one refuses)
        assert full_indexes(spool) == 0
    before = os.stat(index_cache_path(str(spool)))
    assert full_indexes(spool) == 0  # unchanged: nothing indexed, nothing written
    after = os.stat(index_cache_path(str(spool)))
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_poll_appends_a_record_until_a_rewrite_pays(tmp_path: Path) -> None:
    """What a poll learned is appended to the file it loaded, not written
    whole; past `MAX_RECORDS` the file is written whole again, and every
    session's view is the one an index from scratch gives."""
    spool = tmp_path / "alice"
    big_spool(spool)
    cache = Path(index_cache_path(str(spool)))
    assert full_indexes(spool, uidl=False) == 1
    with mock.patch.object(indexcache, "MAX_RECORDS", 3):
        for k in range(5):
            before = cache.stat()
            deliver(str(spool), numbered(2000 + k), 2000 + k)
            settle()
            assert full_indexes(spool, uidl=k % 2 == 0) == 0
            after = cache.stat()
            if k == 0:
                assert after.st_ino != before.st_ino  # UIDs learned: written whole, with them
            elif k < 4:
                assert after.st_ino == before.st_ino
                assert 0 < after.st_size - before.st_size < 4096  # one record, not the index again
            else:
                assert after.st_ino != before.st_ino  # three records: written whole again
    assert full_indexes(spool) == 0


@pytest.mark.parametrize("damage", ["cut", "flip", "extra"])
def test_a_torn_or_flipped_record_costs_a_full_index(tmp_path: Path, damage: str) -> None:
    spool = tmp_path / "alice"
    big_spool(spool)
    cache = Path(index_cache_path(str(spool)))
    view(spool)
    deliver(str(spool), numbered(3000), 3000)
    settle()
    size = cache.stat().st_size
    assert full_indexes(spool) == 0
    grown = cache.stat().st_size
    assert grown > size
    data = bytearray(cache.read_bytes())
    at = random.Random(22).randrange(size, grown)
    if damage == "cut":
        del data[at:]
    elif damage == "flip":
        data[at] ^= 0x20
    else:
        data += data[size:]  # the same record twice: it does not follow the first
    cache.write_bytes(bytes(data))
    deliver(str(spool), numbered(3001), 3001)
    settle()
    assert full_indexes(spool) == 1
    assert full_indexes(spool) == 0


@pytest.mark.parametrize("kept_uids", [False, True])
def test_a_from_line_rewritten_in_place_then_a_delivery(tmp_path: Path, kept_uids: bool) -> None:
    """A same-size rewrite of a From_ line moves no boundary, so the samples
    pass; at UIDL the From_ lines disagree with the kept fingerprint (or,
    with UIDs kept, the sampled UIDs with the kept ones: here every one is
    sampled), the index is confirmed by a full one and takes its
    fingerprint, and UIDL gives what an index from scratch gives, in this
    session and the next."""
    spool = tmp_path / "alice"
    big_spool(spool)
    view(spool, uidl=kept_uids)
    data = spool.read_bytes()
    at = data.index(b"sender", data.index(b"From ", 1000))
    fd = os.open(spool, os.O_WRONLY)
    os.pwrite(fd, b"S", at)
    os.close(fd)
    deliver(str(spool), numbered(4000), 4000)
    settle()
    cache = Path(index_cache_path(str(spool)))
    before = cache.stat().st_ino
    with mock.patch.object(indexcache, "SAMPLES", 0), mock.patch.object(mboxindex, "UID_SAMPLES", 10**6), \
            mock.patch.object(indexcache, "index_file", wraps=index_file) as confirming:
        assert full_indexes(spool) == 0  # the login used the cache; its view is right
        assert confirming.call_count == 1  # at UIDL: the index confirmed by a full one, then adopted
        assert cache.stat().st_ino != before  # and written whole, with the new fingerprint
        assert full_indexes(spool) == 0
        assert confirming.call_count == 1


def test_the_cache_file_is_the_owners_alone(tmp_path: Path) -> None:
    spool = tmp_path / "alice"
    big_spool(spool)
    view(spool)
    st = os.stat(index_cache_path(str(spool)))
    assert (st.st_mode & 0o777, st.st_uid) == (0o600, spool.stat().st_uid)


def test_small_spools_and_temp_drop_mode_keep_nothing(tmp_path: Path) -> None:
    small = tmp_path / "bob"
    small.write_bytes(entry(numbered(1)))
    view(small)
    assert not os.path.exists(index_cache_path(str(small)))
    spool = tmp_path / "alice"
    big_spool(spool)
    md = MboxMaildrop(str(spool), MaildropSettings(server_mode=False))
    md.close()
    assert not os.path.exists(index_cache_path(str(spool)))


def test_a_plain_session_does_not_load_the_cache_module(tmp_path: Path) -> None:
    program = (
        "import sys\nfrom qpopper.maildrop.mbox import MboxMaildrop\n"
        "md = MboxMaildrop(sys.argv[1]); md.messages().uids; md.close()\n"
        "print('qpopper.maildrop.mbox.indexcache' in sys.modules)\n"
    )
    small = tmp_path / "bob"
    small.write_bytes(entry(numbered(1)))
    out = subprocess.run([sys.executable, "-c", program, str(small)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]


def _cached(tmp_path: Path) -> tuple[Path, Path]:
    spool = tmp_path / "alice"
    big_spool(spool)
    view(spool)
    settle()
    return spool, Path(index_cache_path(str(spool)))


@pytest.mark.parametrize("plant", ["group-writable", "symlink", "hard-link", "another-owner"])
def test_a_cache_not_plainly_the_owners_is_ignored(tmp_path: Path, plant: str) -> None:
    spool, cache = _cached(tmp_path)
    if plant == "group-writable":
        cache.chmod(0o660)
    elif plant == "symlink":
        cache.rename(tmp_path / "elsewhere")
        cache.symlink_to(tmp_path / "elsewhere")
    elif plant == "hard-link":
        os.link(cache, tmp_path / "second-name")
    else:
        if os.geteuid() != 0:
            pytest.skip("giving a file to another user needs root")
        os.chown(cache, 65534, 65534)
    assert full_indexes(spool) == 1


def test_a_torn_or_flipped_cache_costs_a_full_index(tmp_path: Path) -> None:
    spool, cache = _cached(tmp_path)
    good = cache.read_bytes()
    rng = random.Random(22)
    for cut in [0, 1, 20, len(good) // 2, len(good) - 33, len(good) - 1] + rng.sample(range(len(good)), 4):
        cache.write_bytes(good[:cut])
        cache.chmod(0o600)
        assert full_indexes(spool, uidl=False) == 1, cut
        cache.write_bytes(good)
        settle()
    for at in rng.sample(range(len(good)), 6):
        cache.write_bytes(good[:at] + bytes([good[at] ^ 0x20]) + good[at + 1 :])
        assert full_indexes(spool, uidl=False) == 1, at
        settle()


def test_a_cache_of_another_version_is_ignored(tmp_path: Path) -> None:
    spool, _ = _cached(tmp_path)
    with mock.patch.object(indexcache, "_VERSION", b"9.9".ljust(32, b"\0")):
        assert full_indexes(spool) == 1


def test_a_same_size_rewrite_costs_a_full_index(tmp_path: Path) -> None:
    spool, _ = _cached(tmp_path)
    data = bytearray(spool.read_bytes())
    at = data.index(b"Subject: message 250")
    data[at + 9 : at + 16] = b"MESSAGE"  # the same length, a UID changes
    with open(spool, "r+b") as f:
        f.write(bytes(data))
    assert full_indexes(spool) == 1


def test_an_mua_deleting_a_message_then_a_delivery_cost_a_full_index(tmp_path: Path) -> None:
    spool, _ = _cached(tmp_path)
    data = spool.read_bytes()
    idx = index_buffer(data)
    cut = data[: idx.from_starts[7]] + data[idx.from_starts[8] :]
    with open(spool, "r+b") as f:
        f.truncate(0)
        f.write(cut)
    deliver(str(spool), numbered(2000), 2000)
    deliver(str(spool), numbered(2001), 2001)
    assert full_indexes(spool) == 1


def _forge(spool: Path, change: str) -> None:
    """Write, as the spool's owner could, a cache that is self-consistent
    (right digest, right fingerprint) but describes the spool wrongly."""
    data = spool.read_bytes()
    idx = index_buffer(data)
    if change == "merge":  # messages 3 and 4 as one
        for name in ("from_starts", "starts", "body_starts"):
            del getattr(idx, name)[3]
        for name in ("ends", "seg_ends", "sizes"):
            del getattr(idx, name)[2]
        del idx.seen[3], idx.crlf[3]
        idx.sizes[2] = idx.sizes[2] + 1000
        assert idx.uids is not None
        del idx.uids[3]
    elif change == "seen":
        idx.seen[5] = 1
    from qpopper.maildrop.mboxindex import fingerprint, split_parts

    idx.fp_parts = split_parts(len(idx))
    idx.fp_digests = b""
    # the parts' digests as the index computes them
    import hashlib

    lines = [data[a:s] for a, s in zip(idx.from_starts, idx.starts, strict=True)]
    idx.fp_digests = b"".join(
        hashlib.blake2b(b"".join(lines[sum(idx.fp_parts[:k]) : sum(idx.fp_parts[: k + 1])]), digest_size=16).digest()
        for k in range(len(idx.fp_parts)))
    idx.fingerprint = fingerprint(lambda a, n: data[a : a + n], idx)
    state = indexcache.SpoolState(*(lambda st: (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns))(spool.stat()),
                                  settled=True)
    cache = Path(index_cache_path(str(spool)))
    body = indexcache._encode(idx, state, True)  # noqa: SLF001 - forging is the point
    cache.write_bytes(body + hashlib.sha256(body).digest())
    cache.chmod(0o600)


@pytest.mark.parametrize("change", ["merge", "seen"])
def test_update_never_writes_from_a_forged_cache(tmp_path: Path, change: str) -> None:
    """A forged cache that the samples miss (none are taken here) is used for
    the listing, but UPDATE confirms the index by a full one before it
    writes, refuses, and drops the cache: the next session is right."""
    spool, _ = _cached(tmp_path)
    _forge(spool, change)
    before = spool.read_bytes()
    with mock.patch.object(indexcache, "SAMPLES", 0):
        md = MboxMaildrop(str(spool))
        try:
            assert len(md.messages()) == (499 if change == "merge" else 500)
            with pytest.raises(MaildropError, match="kept index disagrees"):
                md.commit({0}, set())
        finally:
            md.close()
    assert spool.read_bytes() == before
    assert not os.path.exists(index_cache_path(str(spool)))
    assert full_indexes(spool) == 1


def test_sampled_messages_catch_a_forged_cache(tmp_path: Path) -> None:
    spool, _ = _cached(tmp_path)
    _forge(spool, "merge")
    with mock.patch.object(indexcache, "SAMPLES", 500):  # every message sampled
        assert full_indexes(spool) == 1


def test_what_the_samples_may_miss(tmp_path: Path) -> None:
    """The one change the checks may not see: a same-length rewrite inside a
    message that moves no boundary (an IMAP server setting a flag in place),
    followed by a delivery. The cached flag of that message may stay; its
    bytes are read from the spool as they are now, and UPDATE refuses to
    write from an index a full one does not confirm."""
    spool, _ = _cached(tmp_path)
    data = bytearray(spool.read_bytes())
    at = data.index(b"Subject: message 300\n")
    data[at : at + 20] = b"Status: RO\nSubject:3"  # same length: the message is now seen
    with open(spool, "r+b") as f:
        f.write(bytes(data))
    deliver(str(spool), numbered(3000), 3000)
    with mock.patch.object(indexcache, "SAMPLES", 0):
        md = MboxMaildrop(str(spool))
        try:
            assert not md.messages().seen[300]  # the cached flag (scratch says seen)
            assert b"".join(md.read(300)) == bytes(scratch(spool)[300][2])  # the bytes as they are
            with pytest.raises(MaildropError, match="kept index disagrees"):
                md.commit({0}, set())
        finally:
            md.close()
    assert full_indexes(spool) == 1


CHILD = """
import sys
from qpopper.maildrop.mbox import MboxMaildrop
print("ready", flush=True)
sys.stdin.readline()
md = MboxMaildrop(sys.argv[1])
md.messages().uids
md.close()
print("done", flush=True)
"""


@pytest.mark.slow
def test_sigkill_while_the_cache_is_written(tmp_path: Path) -> None:
    """A session killed at any instant of indexing and writing the cache
    leaves the spool as it was, and the next session's view is right."""
    spool = tmp_path / "alice"
    big_spool(spool, 1500)
    pristine = spool.read_bytes()
    cache = Path(index_cache_path(str(spool)))

    def run(kill_after: float | None) -> float:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(spool)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE)
        assert child.stdin is not None and child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        start = time.monotonic()
        child.stdin.write(b"go\n")
        child.stdin.flush()
        if kill_after is None:
            assert child.stdout.readline() == b"done\n"
            child.communicate()
            return time.monotonic() - start
        time.sleep(kill_after)
        child.send_signal(signal.SIGKILL)
        child.communicate()
        return 0.0

    duration = run(None)
    rng = random.Random(1939)
    deadline = time.monotonic() + 25
    rounds = 0
    while rounds < 20 and time.monotonic() < deadline:
        cache.unlink(missing_ok=True)
        if rounds % 2:
            deliver(str(spool), numbered(5000 + rounds), 5000 + rounds)  # an extension to write
            pristine = spool.read_bytes()
            view(spool)
            deliver(str(spool), numbered(6000 + rounds), 6000 + rounds)
            pristine = spool.read_bytes()
        run(rng.uniform(0, duration * 1.2))
        assert spool.read_bytes() == pristine
        assert view(spool) == scratch(spool)
        rounds += 1
    assert rounds >= 8
