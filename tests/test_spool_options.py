"""qpopper's spool options on a real server: server mode and the temp
drop (-S, -F, keep-temp-drop, temp-dir, temp-name), update-status-headers,
the UW kluge, and bulletin marks for system users come in their own files."""

from __future__ import annotations

import dataclasses
import grp
import os
import poplib
from pathlib import Path
from typing import Any

import pytest

from conftest import PASSWORD
from qpopper import Controller, StaticAuthenticator
from qpopper.auth import Principal
from qpopper.config.options import Options
from qpopper.server._spool import maildrop_settings

FROM = b"From a@b  Wed Nov 25 10:00:00 2026\n"


def mbox(*messages: bytes) -> bytes:
    return b"".join(FROM + m + b"\n" for m in messages)


def session(server: Controller) -> poplib.POP3:
    c = poplib.POP3(server.host, server.port, timeout=10)
    c.user("alice")
    c.pass_(PASSWORD)
    return c


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    d = tmp_path / "spool"
    d.mkdir()
    (d / "alice").write_bytes(mbox(b"Subject: one\n\n1\n", b"Subject: two\n\n2\n", b"Subject: three\n\n3\n"))
    return d


def start(spool_dir: Path, **settings: Any) -> Controller:
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"mbox:{spool_dir}/%u")
    return Controller(authenticator=auth, **settings).start()


@pytest.mark.parametrize("fast_update", [False, True])
def test_temp_drop_mode_moves_the_spool_aside_during_the_session(spool_dir: Path, fast_update: bool) -> None:
    server = start(spool_dir, server_mode=False, fast_update=fast_update)
    try:
        c = session(server)
        temp_drop = spool_dir / ".alice.pop"
        assert temp_drop.exists() and temp_drop.stat().st_size > 0
        assert (spool_dir / "alice").stat().st_size == 0  # the spool is free for deliveries
        with open(spool_dir / "alice", "ab") as f:  # an MDA delivers meanwhile
            f.write(mbox(b"Subject: four\n\n4\n"))
        c.dele(2)
        c.quit()
        assert not temp_drop.exists()
        c = session(server)
        tops = [c.top(i, 0)[1] for i in range(1, c.stat()[0] + 1)]
        subjects = [next(line for line in top if line.startswith(b"Subject")) for top in tops]
        assert subjects == [b"Subject: one", b"Subject: three", b"Subject: four"]
        c.quit()
    finally:
        server.stop()


def test_server_mode_never_makes_a_temp_drop(spool_dir: Path) -> None:
    server = start(spool_dir, server_mode=True)
    try:
        c = session(server)
        assert not (spool_dir / ".alice.pop").exists()
        c.dele(1)
        c.quit()
        assert [p.name for p in spool_dir.iterdir() if not p.name.endswith(".lock")] == ["alice"]
    finally:
        server.stop()


def test_keep_temp_drop_temp_dir_and_temp_name(spool_dir: Path, tmp_path: Path) -> None:
    temp = tmp_path / "temp"
    temp.mkdir()
    server = start(spool_dir, server_mode=False, keep_temp_drop=True, temp_dir=str(temp), temp_name="%s.pop-drop")
    try:
        c = session(server)
        assert (temp / "alice.pop-drop").stat().st_size > 0
        c.quit()
        assert (temp / "alice.pop-drop").exists() and (temp / "alice.pop-drop").stat().st_size == 0
        assert not (spool_dir / ".alice.pop").exists()
    finally:
        server.stop()


def test_update_status_headers_writes_status_and_x_uidl(spool_dir: Path) -> None:
    server = start(spool_dir, update_status_headers=True)
    try:
        c = session(server)
        uids = c.uidl()[1]
        c.retr(1)
        c.dele(3)
        c.quit()
        raw = (spool_dir / "alice").read_bytes()
        assert b"Status: RO" in raw and raw.count(b"X-UIDL: ") == 2
        c = session(server)
        assert c.uidl()[1] == uids[:2]
        c.quit()
    finally:
        server.stop()


def test_uw_kluge_hides_the_folder_internal_data_message(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    d.mkdir()
    internal = (
        b"From: Mail System Internal Data <MAILER-DAEMON@host>\n"
        b"Subject: DON'T DELETE THIS MESSAGE -- FOLDER INTERNAL DATA\n"
        b"X-IMAP: 1234567890 0000000001\n\nThis text is part of the internal format of your mail folder.\n"
    )
    (d / "alice").write_bytes(mbox(internal, b"Subject: real\n\nmail\n"))
    server = start(d, uw_kluge=True)
    try:
        c = session(server)
        assert c.stat()[0] == 1
        c.dele(1)
        c.quit()
        assert b"FOLDER INTERNAL DATA" in (d / "alice").read_bytes()  # kept in the spool
    finally:
        server.stop()


def test_settings_are_the_options_own_unless_a_group_or_hashed_temp_dir_makes_them_the_users(
    tmp_path: Path,
) -> None:
    alice, bob = Principal("alice", "mbox:/a", gid=os.getgid()), Principal("bob", "mbox:/b", gid=-5)
    options = dataclasses.replace(Options(), server_mode=False, fast_update=True)
    first = maildrop_settings(options, alice)
    assert maildrop_settings(options, bob) is first  # one object for every user of these options
    assert (first.server_mode, first.fast_update) == (False, True)
    changed = dataclasses.replace(options, fast_update=False)
    assert maildrop_settings(changed, alice).fast_update is False  # new options, new settings
    grouped = dataclasses.replace(options, group_server_mode=grp.getgrgid(os.getgid()).gr_name)
    assert maildrop_settings(grouped, alice).server_mode is True
    assert maildrop_settings(grouped, bob).server_mode is False
    hashed = dataclasses.replace(options, temp_dir=str(tmp_path), hash_spool=1)
    temp_of_alice = maildrop_settings(hashed, alice).temp_dir
    assert temp_of_alice is not None and temp_of_alice.startswith(str(tmp_path) + os.sep)
    assert temp_of_alice != maildrop_settings(hashed, bob).temp_dir
