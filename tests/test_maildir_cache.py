"""A big Maildir's kept listing: unchanged directories are not read again, changed ones are."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qpopper.maildrop import maildir, maildirlisting
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


def session(md: Path) -> tuple[list[tuple[int, str]], list[str]]:
    """(size, UID) of each message, and which subdirectories were read."""
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
            names = box._names  # noqa: SLF001 - the order is the point
        finally:
            box.close()
    assert names == list_maildir(str(md))
    return got, read


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


def test_a_listing_read_while_the_directory_changed_is_not_trusted(tmp_path: Path) -> None:
    md = make(tmp_path, 10)
    session(md)  # the directories changed just now: their times are not trusted yet
    assert sorted(session(md)[1]) == ["cur", "new"]


def test_a_planted_or_torn_listing_is_ignored(tmp_path: Path) -> None:
    md = make(tmp_path, 20)
    settle()
    session(md)
    listing = md / "qpopper-listing"
    good = listing.read_bytes()
    for bad in (good[:-1], good[:40], b"", good.replace(b".host", b"/../x", 1)):
        listing.write_bytes(bad)
        listing.chmod(0o600)
        assert sorted(session(md)[1]) == ["cur", "new"]
        settle()
    listing.write_bytes(good)
    listing.chmod(0o666)
    assert sorted(session(md)[1]) == ["cur", "new"]


STEPS = ("deliver", "deliver", "session", "session", "settle", "settle", "flag", "remove", "move-to-cur", "tear")


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
            elif step == "tear" and (md / "qpopper-listing").exists():
                os.truncate(md / "qpopper-listing", data.draw(st.integers(0, 60)))
        session(md)
