"""A big Maildir's kept listing: unchanged directories are not read again, changed ones are."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qpopper.maildrop import fsutil, maildir, maildirlisting
from qpopper.maildrop.maildir import MaildirMaildrop, list_maildir

SIZE = b"Subject: hello\n\nbody\n"


def put(md: Path, name: str, sub: str = "new", body: bytes = SIZE) -> None:
    wire = len(body) + body.count(b"\n")
    (md / sub / f"{name},S={len(body)},W={wire}").write_bytes(body)


def make(tmp: Path, count: int) -> Path:
    md = tmp / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (md / sub).mkdir(parents=True)
    for k in range(count):
        put(md, f"{1700000000 + k}.M{k}P1.host", "cur" if k % 3 else "new")
    return md


def settle() -> None:
    time.sleep(maildirlisting.SETTLED_NS / 1e9 + 0.005)


def session(md: Path, delete: set[int] | None = None, seen: set[int] | None = None
            ) -> tuple[list[tuple[int, str]], list[str]]:
    """(size, UID) of each message, and which subdirectories were read; with
    `delete` or `seen` (message indexes), an UPDATE that deletes those or
    marks them seen."""
    read: list[str] = []
    real = maildir._names_in  # noqa: SLF001 - counting the directory reads is the point

    def spy(directory: str) -> list[str]:
        read.append(os.path.basename(directory))
        return real(directory)

    with mock.patch.object(maildir, "CACHED_DIR_BYTES", 0), mock.patch.object(maildir, "_names_in", spy):
        box = MaildirMaildrop(str(md))
        try:
            infos = box.messages()
            got = [(infos.sizes[i], infos.uids[i]) for i in range(len(infos))]
            assert [b"".join(box.read(i)) for i in range(len(infos))] == [SIZE] * len(infos)
            names = list(box._names)  # noqa: SLF001 - the order is the point
            listed = list(read)
            assert names == list_maildir(str(md))  # what a listing from scratch gives
            if delete or seen:
                box.commit({i for i in delete or () if i < len(names)}, {i for i in seen or () if i < len(names)})
        finally:
            box.close()
    return got, listed


def test_unchanged_directories_are_not_read_again(tmp_path: Path) -> None:
    md = make(tmp_path, 30)
    settle()
    first, read = session(md)
    assert sorted(read) == ["cur", "new"]
    assert (md / "qpopper-listing").stat().st_mode & 0o777 == 0o600
    assert session(md) == (first, [])


def test_a_delivery_reads_new_again_and_a_flag_change_cur(tmp_path: Path) -> None:
    md = make(tmp_path, 30)
    settle()
    session(md)
    put(md, "1800000000.M1P2.host")
    settle()
    got, read = session(md)
    assert read == ["new"] and len(got) == 31
    victim = sorted(os.listdir(md / "cur"))[0]
    os.rename(md / "cur" / victim, md / "cur" / (victim + ":2,S"))
    settle()
    assert session(md)[1] == ["cur"]


def test_the_listing_is_written_when_the_session_ends_not_at_login(tmp_path: Path) -> None:
    md = make(tmp_path, 30)
    settle()
    listing = md / "qpopper-listing"
    with mock.patch.object(maildir, "CACHED_DIR_BYTES", 0):
        box = MaildirMaildrop(str(md))
        assert not listing.exists()
        assert not box.writes_nothing(set(), set())  # so close runs off the event loop
        box.close()
    assert listing.exists()
    first = listing.stat()
    put(md, "1800000000.M1P2.host")
    settle()
    with mock.patch.object(maildir, "CACHED_DIR_BYTES", 0):
        box = MaildirMaildrop(str(md))
        assert listing.stat().st_ino == first.st_ino
        box.close()
    assert listing.stat().st_ino != first.st_ino


def test_a_directory_the_session_changed_is_not_kept(tmp_path: Path) -> None:
    """UPDATE moves a message from new/ to cur/ and removes one: neither
    directory is as it was listed, so the next session reads both again,
    and the listing written is not even worth writing."""
    md = make(tmp_path, 30)
    settle()
    session(md)
    settle()
    listing = md / "qpopper-listing"
    before = listing.read_bytes()
    got, read = session(md, delete={1}, seen={0})
    assert read == [] and len(got) == 30
    assert listing.read_bytes() == before
    settle()
    got, read = session(md)
    assert sorted(read) == ["cur", "new"] and len(got) == 29


def test_a_kept_listing_that_cannot_help_is_not_read_past_its_head(tmp_path: Path) -> None:
    md = make(tmp_path, 30)
    settle()
    session(md)
    put(md, "1800000000.M1P2.host", "cur")
    put(md, "1800000000.M2P2.host", "new")
    settle()
    reads: list[int] = []
    real = fsutil.read_at

    def spy(fd: int, offset: int, count: int) -> bytes:
        reads.append(count)
        return real(fd, offset, count)

    with mock.patch.object(maildirlisting, "read_at", spy):
        got, read = session(md)
    assert sorted(read) == ["cur", "new"] and len(got) == 32
    assert reads == [maildirlisting._HEAD.size + fsutil.DIGEST_BYTES]  # noqa: SLF001 - the head is the point


def test_a_listing_read_while_the_directory_changed_is_not_trusted(tmp_path: Path) -> None:
    md = make(tmp_path, 10)
    # The directories changed "just now" (within a tick this long, so that a
    # loaded machine cannot make the test late): their times are not trusted yet.
    with mock.patch.object(maildirlisting, "SETTLED_NS", 3600 * 10**9):
        session(md)
        assert sorted(session(md)[1]) == ["cur", "new"]


def test_a_planted_or_torn_listing_is_ignored(tmp_path: Path) -> None:
    md = make(tmp_path, 20)
    settle()
    session(md)
    listing = md / "qpopper-listing"
    good = listing.read_bytes()
    head = maildirlisting._HEAD.size + fsutil.DIGEST_BYTES  # noqa: SLF001 - where cur/'s names start
    cur_names = good[head : good.index(b"\n", head)]
    new_name = sorted(os.listdir(md / "new"))[0].encode()
    damaged = {
        good[:-1]: ["cur", "new"], good[:40]: ["cur", "new"], b"": ["cur", "new"],
        bytes([good[0] ^ 1]) + good[1:]: ["cur", "new"],  # the head's digest fails
        good.replace(cur_names, cur_names[:-1] + b"/", 1): ["cur"],  # cur/'s names' digest fails
        good.replace(new_name, new_name[:-1] + b"X", 1): ["new"],
    }
    for bad, read_again in damaged.items():
        listing.write_bytes(bad)
        listing.chmod(0o600)
        assert sorted(session(md)[1]) == read_again  # (and the listing is right: `session` checks)
        settle()
    listing.write_bytes(good)
    listing.chmod(0o666)
    assert sorted(session(md)[1]) == ["cur", "new"]


STEPS = ("deliver", "deliver", "session", "session", "update", "settle", "settle", "flag", "remove", "move-to-cur",
         "tear", "half-written")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(STEPS), min_size=1, max_size=15), st.data())
def test_every_session_lists_what_the_directories_hold(steps: list[str], data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as d:
        md = make(Path(d), 4)
        k = 0
        for step in steps:
            names = {sub: sorted(os.listdir(md / sub)) for sub in ("cur", "new")}
            if step == "deliver":
                k += 1
                put(md, f"1900000000.M{k}P3.host")
            elif step == "session":
                session(md)
            elif step == "update":
                count = sum(map(len, names.values()))
                session(md, delete=set(data.draw(st.lists(st.integers(0, max(0, count - 1)), max_size=2))),
                        seen=set(data.draw(st.lists(st.integers(0, max(0, count - 1)), max_size=2))))
            elif step == "settle":
                settle()
            elif step in ("flag", "remove", "move-to-cur"):
                sub = "cur" if step == "flag" else data.draw(st.sampled_from(["cur", "new"]))
                if names[sub]:
                    name = data.draw(st.sampled_from(names[sub]))
                    if step == "flag":
                        os.rename(md / sub / name, md / sub / (name.split(":")[0] + ":2,S"))
                    elif step == "remove":
                        os.unlink(md / sub / name)
                    else:
                        os.rename(md / sub / name, md / "cur" / name)
            elif step in ("tear", "half-written"):
                # (drawn whether or not there is a listing, and apart from its
                # size: whether a session wrote one depends on the clock)
                where = data.draw(st.integers(0, 1 << 24))
                listing = md / "qpopper-listing"
                if listing.exists():
                    # cut in its head, or anywhere: a writer killed after the
                    # rename, its data not yet on disk (no fsync)
                    os.truncate(listing, where % 61 if step == "tear" else where % max(1, listing.stat().st_size))
                    if step == "half-written":
                        (md / "qpopper-listing.new").write_bytes(b"QPMDIRL2 torn")
        session(md)
