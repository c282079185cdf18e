"""Maildir specifics beyond the shared contract: names, hints, big drops."""

from __future__ import annotations

import os
from array import array
from pathlib import Path

import pytest

from helpers import write_maildir_message
from qpopper.errors import MaildropError, ResponseCode
from qpopper.maildrop import is_valid_uid
from qpopper.maildrop import maildir as maildir_module
from qpopper.maildrop.location import expand_location
from qpopper.maildrop.maildir import MaildirMaildrop, uid_from_name
from qpopper.protocol import wire_size

MSG = b"Subject: x\n\nbody\n"


def test_uid_is_the_unique_part_of_the_name() -> None:
    assert (
        uid_from_name("1491941793.M41850P8566.mx1.example.com,S=1000,W=1030:2,S")
        == "1491941793.M41850P8566.mx1.example.com"
    )
    assert uid_from_name("1234.abc:2,") == uid_from_name("1234.abc") == "1234.abc"
    long_name = "1491941793.M41850P8566V0000000000000015I0000000004F3030E_0.mx1.example.com,S=1000"
    uid = uid_from_name(long_name)
    assert is_valid_uid(uid) and uid == uid_from_name(long_name + ":2,S")
    assert is_valid_uid(uid_from_name("1234.caf\u00e9 name"))


def test_size_hints_are_trusted_and_a_stale_one_loses_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    md = tmp_path / "Maildir"
    good = write_maildir_message(md, MSG, name=f"1.a,S={len(MSG)},W=999")
    stale = write_maildir_message(md, MSG, name="2.b,S=5,W=7")  # edited behind the name's back
    unhinted = write_maildir_message(md, MSG, name="3.c,S=5")  # no W=: counted
    drop = MaildirMaildrop(str(md))
    try:
        sizes = {i.uid: i.size for i in drop.messages()}
        assert sizes[uid_from_name(good)] == 999
        assert sizes[uid_from_name(stale)] == 7
        assert sizes[uid_from_name(unhinted)] == wire_size(MSG)
        with caplog.at_level("WARNING"):
            assert b"".join(drop.read(1)) == MSG  # sent whole, as it is
        assert "no longer has the size" in caplog.text
    finally:
        drop.close()


@pytest.mark.parametrize("others", [0, 1], ids=["alone", "beside-hinted"])
def test_a_size_hint_no_file_can_have_is_not_trusted(tmp_path: Path, others: int) -> None:
    """A ,W= of 19 digits or more (beyond the sizes' array) is ignored, and so
    are digits of other scripts (int() would read them): the file is counted,
    the open does not fail."""
    md = tmp_path / "Maildir"
    if others:
        write_maildir_message(md, MSG, name=f"0.z,S={len(MSG)},W={wire_size(MSG)}")
    huge = write_maildir_message(md, MSG, name=f"1.a,S={len(MSG)},W={'9' * 19}")
    foreign = write_maildir_message(md, MSG, name="2.b,S=\u0661\u0662,W=\u0661\u0663")  # Arabic-Indic 12, 13
    drop = MaildirMaildrop(str(md))
    try:
        sizes = {i.uid: i.size for i in drop.messages()}
        assert sizes[uid_from_name(huge)] == wire_size(MSG) == sizes[uid_from_name(foreign)]
        assert len(sizes) == 2 + others
    finally:
        drop.close()


def test_a_hint_of_four_gigabytes_or_more_is_held_whole(tmp_path: Path) -> None:
    """Sizes are held 4 bytes each while they fit, 8 when one does not."""
    md = tmp_path / "Maildir"
    write_maildir_message(md, MSG, name=f"1.a,S={len(MSG)},W={wire_size(MSG)}")
    write_maildir_message(md, MSG, name=f"2.b,S={len(MSG)},W={2**32}")
    write_maildir_message(md, MSG, name=f"3.c,S={len(MSG)},W={2**32 - 1}")
    drop = MaildirMaildrop(str(md))
    try:
        assert list(drop.messages().sizes) == [wire_size(MSG), 2**32, 2**32 - 1]
    finally:
        drop.close()
    os.unlink(md / "new" / f"2.b,S={len(MSG)},W={2**32}")
    drop = MaildirMaildrop(str(md))
    try:
        sizes = drop.messages().sizes
        assert list(sizes) == [wire_size(MSG), 2**32 - 1]
        assert isinstance(sizes, array) and sizes.itemsize == 4
    finally:
        drop.close()


def test_hinted_links_and_directories_are_never_listed_or_followed(tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    write_maildir_message(md, MSG, name=f"1.a,S={len(MSG)},W={wire_size(MSG)}")
    secret = tmp_path / "secret"
    secret.write_bytes(b"not mail\n")
    os.symlink(secret, md / "new" / "2.b,S=9,W=10")
    (md / "cur" / "3.c,S=1,W=1:2,S").mkdir()
    drop = MaildirMaildrop(str(md))
    try:
        assert [i.uid for i in drop.messages()] == ["1.a"]
        # swapped for a link after listing: refused, not followed
        target = md / "new" / f"1.a,S={len(MSG)},W={wire_size(MSG)}"
        target.unlink()
        os.symlink(secret, target)
        with pytest.raises(MaildropError):
            b"".join(drop.read(0))
    finally:
        drop.close()


def test_dotfiles_tmp_and_symlinks_are_ignored(tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    write_maildir_message(md, MSG, name="1.real")
    (md / "tmp" / "2.partial").write_bytes(b"Subject: half")
    (md / "new" / ".3.hidden").write_bytes(MSG)
    secret = tmp_path / "secret"
    secret.write_bytes(b"not mail\n")
    os.symlink(secret, md / "cur" / "4.link:2,")
    drop = MaildirMaildrop(str(md))
    try:
        assert [i.uid for i in drop.messages()] == ["1.real"]
    finally:
        drop.close()


def test_missing_maildir_is_an_empty_drop(tmp_path: Path) -> None:
    drop = MaildirMaildrop(str(tmp_path / "never-delivered"))
    assert list(drop.messages()) == []
    drop.commit(set(), set())
    drop.close()


@pytest.mark.parametrize("hint", ["", f",S={len(MSG)},W={wire_size(MSG)}"], ids=["plain", "hinted"])
def test_message_renamed_by_another_agent_is_still_found(tmp_path: Path, hint: str) -> None:
    md = tmp_path / "Maildir"
    name = write_maildir_message(md, MSG, name="7.x" + hint)
    drop = MaildirMaildrop(str(md))
    try:
        os.rename(md / "new" / name, md / "cur" / (name + ":2,F"))  # an IMAP server flagged it
        assert b"".join(drop.read(0)) == MSG
        drop.commit({0}, set())
    finally:
        drop.close()
    assert os.listdir(md / "cur") == [] and os.listdir(md / "new") == []


def test_only_a_listing_small_enough_for_the_event_loop_is_packed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Packed names are split into a list at the first RETR, on the event
    loop: a big listing stays a list from the start."""
    from qpopper.maildrop.packednames import PackedNames

    md = tmp_path / "Maildir"
    for n in range(3):
        write_maildir_message(md, MSG, name=f"{n}.a,S={len(MSG)},W={wire_size(MSG)}")
    for small in (True, False):
        if not small:
            monkeypatch.setattr(maildir_module, "QUICK_DIR_BYTES", 0)
        drop = MaildirMaildrop(str(md))
        try:
            assert isinstance(drop._names, PackedNames) is small  # noqa: SLF001 - the choice under test
            assert [b"".join(drop.read(i)) for i in range(3)] == [MSG] * 3
        finally:
            drop.close()


def test_a_newline_in_a_name_leaves_every_size_with_its_own_message(tmp_path: Path) -> None:
    """All names are matched in one text, a line each: a name holding a
    newline (a hand can make one) is two lines, and must not hand its second
    hint to the name after it."""
    md = tmp_path / "Maildir"
    odd = write_maildir_message(md, b"odd\n", name="1.a,S=4,W=999\n2.b,S=4,W=888")
    plain = write_maildir_message(md, MSG, name="3.c")
    drop = MaildirMaildrop(str(md))
    try:
        sizes = {i.uid: i.size for i in drop.messages()}
        assert sizes[uid_from_name(plain)] == wire_size(MSG)
        assert [b"".join(drop.read(i)) for i in range(2)] == [b"odd\n", MSG]
    finally:
        drop.close()
    assert sorted(os.listdir(md / "new")) == sorted([odd, plain])


def test_same_unique_part_twice_gets_distinct_uids(tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    write_maildir_message(md, MSG, name="5.dup")
    write_maildir_message(md, MSG, name="5.dup:2,S", sub="cur")
    drop = MaildirMaildrop(str(md))
    try:
        uids = [i.uid for i in drop.messages()]
    finally:
        drop.close()
    assert len(set(uids)) == 2 and all(is_valid_uid(u) for u in uids)


@pytest.mark.parametrize("odd", [" ", "\x7f", "\x1f", "\u00e9", "\udcff", "~!"], ids=repr)
def test_a_unique_part_unfit_for_uidl_gets_a_digest_and_the_others_keep_theirs(tmp_path: Path, odd: str) -> None:
    """The one check over all unique parts at once (the usual drop's fast
    road) lets through exactly the characters UIDL may carry, 0x21..0x7E."""
    md = tmp_path / "Maildir"
    plain = write_maildir_message(md, MSG, name="1.plain")
    other = write_maildir_message(md, MSG, name=f"2.od{odd}d")
    drop = MaildirMaildrop(str(md))
    try:
        uids = list(drop.messages().uids)
    finally:
        drop.close()
    assert all(is_valid_uid(u) for u in uids) and uids[0] == "1.plain" == uid_from_name(plain)
    assert uids[1] == uid_from_name(other) and (uids[1] == f"2.od{odd}d") == (odd == "~!")


@pytest.mark.parametrize(
    ("template", "user", "home"),
    [("maildir:/srv/%u", "../../etc", None), ("maildir:~/Maildir", "bob", None), ("maildir:rel/%u", "bob", None),
     ("mh:/x/%u", "bob", None), ("maildir:/srv/%x", "bob", None)],
)
def test_bad_locations_are_refused(template: str, user: str, home: str | None) -> None:
    with pytest.raises(MaildropError):
        expand_location(template, user, home)


@pytest.mark.parametrize(
    ("template", "user", "home", "expanded"),
    [("maildir:/srv/%u/Maildir", "bob", None, "maildir:/srv/bob/Maildir"),
     ("maildir:/srv/%d/%n", "bob@example.org", None, "maildir:/srv/example.org/bob"),
     ("maildir:~/Maildir", "bob", "/home/bob", "maildir:/home/bob/Maildir"),
     ("mbox:%h//spool/", "bob", "/home/bob", "mbox:/home/bob/spool"),
     ("maildir:/srv/100%%/%u%", "bob", None, "maildir:/srv/100%/bob%"),
     ("maildir:/srv/%u", "bob", None, "maildir:/srv/bob")],
)
def test_locations_expand_the_same_each_time(template: str, user: str, home: str | None, expanded: str) -> None:
    """The template is split once and kept; every expansion of it reads the same."""
    assert expand_location(template, user, home) == expanded
    assert expand_location(template, user, home) == expanded  # from the kept split


@pytest.mark.slow
def test_fifty_thousand_messages_listed_without_reading_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    md = tmp_path / "Maildir"
    for d in ("cur", "new", "tmp"):
        (md / d).mkdir(parents=True)
    body = MSG * 3
    hint = f",S={len(body)},W={wire_size(body)}"
    new = md / "new"
    for i in range(50_000):
        (new / f"{1700000000 + i // 100}.M{i}P1.host{hint}").write_bytes(body)

    def no_reading(path: str) -> int:
        raise AssertionError(f"{path} was read to size it")

    monkeypatch.setattr(maildir_module, "_counted_size", no_reading)
    drop = MaildirMaildrop(str(md))
    try:
        infos = drop.messages()
        assert len(infos) == 50_000
        assert {i.size for i in infos} == {wire_size(body)}
        assert len({i.uid for i in infos}) == 50_000
        assert infos[0].uid == "1700000000.M0P1.host"
    finally:
        drop.close()


@pytest.mark.parametrize("hinted", [True, False])
def test_one_name_in_both_cur_and_new_stays_two_messages(tmp_path: Path, hinted: bool) -> None:
    """Nothing delivers that, but a hand can: each file is read and deleted as itself."""
    md = tmp_path / "Maildir"
    name = "9.twin,S=6,W=7" if hinted else "9.twin"
    write_maildir_message(md, b"first\n", name=name, sub="cur")
    write_maildir_message(md, b"other\n", name=name, sub="new")
    write_maildir_message(md, b"third\n", name="8.x,S=6,W=7" if hinted else "8.x", sub="new")
    drop = MaildirMaildrop(str(md))
    try:
        bodies = [b"".join(drop.read(i)) for i in range(len(drop.messages()))]
        assert sorted(bodies) == [b"first\n", b"other\n", b"third\n"]
        assert len(set(drop.messages().uids)) == 3
        twins = [i for i, body in enumerate(bodies) if body in (b"first\n", b"other\n")]
        drop.commit({twins[1]}, set())
    finally:
        drop.close()
    left = {p.read_bytes() for sub in ("cur", "new") for p in (md / sub).iterdir()}
    assert left == {bodies[twins[0]], b"third\n"}


def test_location_is_parsed_once_and_unknown_kinds_are_refused() -> None:
    from qpopper.maildrop.location import MaildropLocation, open_maildrop

    loc = MaildropLocation.parse("mbox:/var/mail/a:b")
    assert loc == MaildropLocation("mbox", "/var/mail/a:b") and str(loc) == "mbox:/var/mail/a:b"
    assert MaildropLocation.parse("maildir:/x").kind == "maildir"
    for text in ("mh:/var/mail/a", "/var/mail/a", "Maildir:/x", ""):
        with pytest.raises(MaildropError) as info:
            MaildropLocation.parse(text)
        assert info.value.code is ResponseCode.SYS_PERM
        with pytest.raises(MaildropError):
            open_maildrop(text)


def test_delivery_names_sort_in_delivery_order_and_never_replace(tmp_path: Path) -> None:
    from qpopper.maildrop.delivery import deliver

    md = tmp_path / "fresh" / "Maildir"  # created by the first delivery
    paths = [deliver(f"maildir:{md}", b"Subject: %d\n\n" % i) for i in range(20)]
    assert all(os.path.dirname(p) == str(md / "new") for p in paths)
    assert sorted(paths) == paths and len(set(paths)) == 20
    assert sorted(os.listdir(md)) == ["cur", "new", "tmp"] and os.listdir(md / "tmp") == []
    assert deliver(f"maildir:{md}", b"bulletin\n", uid="1764630000.000.3") == str(md / "new" / "1764630000.000.3")
    with pytest.raises(FileExistsError):
        deliver(f"maildir:{md}", b"another\n", uid="1764630000.000.3")
    assert (md / "new" / "1764630000.000.3").read_bytes() == b"bulletin\n"
    assert os.listdir(md / "tmp") == []
    for uid in ("a/b", "a:2,S", "a,S=5", ".hidden"):
        with pytest.raises(MaildropError):
            deliver(f"maildir:{md}", b"x\n", uid=uid)


@pytest.mark.parametrize("hint", ["", f",S={len(MSG)},W={wire_size(MSG)}"], ids=["plain", "hinted"])
def test_every_message_retrieved_whole_gets_the_seen_flag(tmp_path: Path, hint: str) -> None:
    """Wherever it was: new/ moves to cur/, a cur/ file without S gains it;
    other flags stay, in ASCII order; messages not retrieved keep their names.
    (Hinted names are the listing the session packs, plain ones stay a list.)"""
    md = tmp_path / "Maildir"
    for unique, flags in (("1.a", ":2,"), ("2.b", ":2,RT"), ("3.c", ""), ("4.d", ":2,FS"), ("6.f", ":2,T")):
        write_maildir_message(md, MSG, name=unique + hint + flags, sub="cur")
    write_maildir_message(md, MSG, name="5.e" + hint)
    drop = MaildirMaildrop(str(md))
    try:
        assert drop.writes_nothing(set(), {3})  # 4.d is seen already
        assert not drop.writes_nothing(set(), {0})  # 1.a is in cur/ but not seen
        drop.commit(set(), {0, 1, 2, 3, 4})
    finally:
        drop.close()
    expected = [("1.a", ":2,S"), ("2.b", ":2,RST"), ("3.c", ":2,S"), ("4.d", ":2,FS"), ("5.e", ":2,S"), ("6.f", ":2,T")]
    assert sorted(os.listdir(md / "cur")) == [unique + hint + flags for unique, flags in expected]
    assert os.listdir(md / "new") == []
    drop = MaildirMaildrop(str(md))
    try:
        assert [i.seen for i in drop.messages()] == [True] * 5 + [False]
        assert drop.writes_nothing(set(), {0, 1, 2, 3, 4})
    finally:
        drop.close()
