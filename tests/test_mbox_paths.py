"""Spool paths: qpopper's genpath rules (spool-dir, hash-spool 1 and 2, home-dir-mail)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from qpopper.errors import MaildropError, ResponseCode
from qpopper.maildrop import MaildropSettings
from qpopper.maildrop.mbox import temp_drop_path
from qpopper.maildrop.spoolpath import hash_dirs, spool_path


def letter(name: str) -> str:
    """Method 1 as genpath.c writes it: 'a' + (sum of the first <= 5 chars) % 26."""
    return chr(ord("a") + sum(ord(c) for c in name[:5]) % 26)


def test_plain_spool_dir() -> None:
    assert spool_path("alice", spool_dir="/var/mail") == "/var/mail/alice"
    assert spool_path("alice", spool_dir="/var/spool/mail/") == "/var/spool/mail/alice"


@pytest.mark.parametrize("name", ["user", "a", "ab", "abc", "abcd", "abcde", "abcdefgh", "j.smith", "x9"])
def test_hash_method_1(tmp_path: Path, name: str) -> None:
    assert hash_dirs(name, 1) == [letter(name)]
    assert spool_path(name, spool_dir=str(tmp_path), hash_spool=1) == f"{tmp_path}/{letter(name)}/{name}"


def test_hash_method_1_known_values() -> None:
    # "user": 117+115+101+114 = 447, 447 % 26 = 5 -> 'f'; only five characters count.
    assert hash_dirs("user", 1) == ["f"]
    assert hash_dirs("abcdeZZZ", 1) == hash_dirs("abcde", 1) == [chr(ord("a") + (97 + 98 + 99 + 100 + 101) % 26)]


def test_hash_method_2(tmp_path: Path) -> None:
    assert spool_path("user", spool_dir=str(tmp_path), hash_spool=2) == f"{tmp_path}/u/s/user"
    assert spool_path("q", spool_dir=str(tmp_path), hash_spool=2) == f"{tmp_path}/q/q/q"


def test_hash_dirs_are_created_like_the_spool_dir(tmp_path: Path) -> None:
    spool_dir = tmp_path / "mail"
    spool_dir.mkdir()
    os.chmod(spool_dir, 0o1775)
    path = spool_path("user", spool_dir=str(spool_dir), hash_spool=2)
    for d in (spool_dir / "u", spool_dir / "u" / "s"):
        st = os.stat(d)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o1775
        assert (st.st_uid, st.st_gid) == (os.stat(spool_dir).st_uid, os.stat(spool_dir).st_gid)
    assert path == f"{spool_dir}/u/s/user"
    spool_path("user", spool_dir=str(spool_dir), hash_spool=2)  # existing dirs are fine


def test_check_hash_dir_off_creates_nothing(tmp_path: Path) -> None:
    path = spool_path("user", spool_dir=str(tmp_path), hash_spool=1, check_hash_dir=False)
    assert path == f"{tmp_path}/f/user"
    assert not os.path.exists(tmp_path / "f")


def test_hash_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("not a dir")
    with pytest.raises(MaildropError) as err:
        spool_path("user", spool_dir=str(tmp_path), hash_spool=1)
    assert err.value.code is ResponseCode.SYS_PERM


def test_home_dir_mail() -> None:
    assert spool_path("alice", spool_dir="/var/mail", home_dir_mail=".mail", home="/home/alice") == "/home/alice/.mail"
    assert (
        spool_path("alice", spool_dir="/var/mail", hash_spool=2, home_dir_mail="Mail/inbox", home="/home/alice/")
        == "/home/alice/Mail/inbox"
    )


@pytest.mark.parametrize("value", ["../bob/.mail", "/etc/passwd", ".", "..", "a/../../x"])
def test_home_dir_mail_may_not_escape(value: str) -> None:
    with pytest.raises(MaildropError) as err:
        spool_path("alice", spool_dir="/var/mail", home_dir_mail=value, home="/home/alice")
    assert err.value.code is ResponseCode.SYS_PERM


def test_home_dir_mail_needs_a_home() -> None:
    with pytest.raises(MaildropError):
        spool_path("alice", spool_dir="/var/mail", home_dir_mail=".mail", home=None)
    with pytest.raises(MaildropError):
        spool_path("alice", spool_dir="/var/mail", home_dir_mail=".mail", home="relative/home")


@pytest.mark.parametrize("name", ["", "../etc", "a/b", ".hidden", "a..b", "a\0b", "x" * 65, "al ice", "%s"])
def test_bad_user_names_are_refused(name: str) -> None:
    with pytest.raises(MaildropError) as err:
        spool_path(name, spool_dir="/var/mail", hash_spool=2, check_hash_dir=False)
    assert err.value.code is ResponseCode.SYS_PERM


def test_relative_spool_dir_and_unknown_method_are_refused() -> None:
    with pytest.raises(MaildropError):
        spool_path("alice", spool_dir="var/mail")
    with pytest.raises(MaildropError):
        spool_path("alice", spool_dir="/var/mail", hash_spool=3)


def test_dot_as_second_character_stays_in_the_spool_dir(tmp_path: Path) -> None:
    # genpath would make "j/./j.smith"; the file is the same.
    assert spool_path("j.smith", spool_dir=str(tmp_path), hash_spool=2) == f"{tmp_path}/j/j.smith"


def test_temp_drop_path() -> None:
    s = MaildropSettings()
    assert temp_drop_path("/var/mail/alice", s) == "/var/mail/.alice.pop"
    assert temp_drop_path("/var/mail/f/user", s) == "/var/mail/f/.user.pop"
    s = MaildropSettings(temp_dir="/var/tmp/pop", temp_name="%s.tmp")
    assert temp_drop_path("/var/mail/alice", s) == "/var/tmp/pop/alice.tmp"
    for bad in ("%s/x", "no-user", "%s%s", "%s"):
        with pytest.raises(MaildropError):
            temp_drop_path("/var/mail/alice", MaildropSettings(temp_name=bad))
