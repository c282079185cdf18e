"""UIDLs kept from Dovecot's dovecot-uidlist and courier-pop3d's
courierpop3dsizelist: parsing, serving over a real session, hostile files,
and the qpopper-uidl-report command."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_maildir_message
from qpopper.daemon import uidlreport
from qpopper.maildrop import uidimport
from qpopper.maildrop.maildir import MaildirMaildrop, uids_and_sources

MSG = b"From: a@example.org\nSubject: s\n\nbody\n"
UIDV = 1700000000  # 0x6553f100
NAMES = ["1700000001.M1P10.host,S=40,W=42", "1700000002.M2P10.host,S=40,W=42", "1700000003.M3P10.host,S=40,W=42"]
GUID = "0123456789abcdef0123456789abcdef"


def _maildir(tmp_path: Path, names: list[str] = NAMES, sub: str = "cur", flags: str = ":2,S") -> Path:
    md = tmp_path / "Maildir"
    for name in names:
        write_maildir_message(md, MSG, name=name + flags, sub=sub)
    return md


def _uids(md: Path) -> list[str]:
    drop = MaildirMaildrop(str(md))
    try:
        return list(drop.messages().uids)
    finally:
        drop.close()


def _dovecot(md: Path, lines: list[str], header: str = f"3 V{UIDV} N10 G{GUID}") -> None:
    (md / "dovecot-uidlist").write_text(header + "\n" + "".join(line + "\n" for line in lines))


def _courier(md: Path, lines: list[str], header: str = f"/3 10 {UIDV}") -> None:
    (md / "courierpop3dsizelist").write_text(header + "\n" + "".join(line + "\n" for line in lines))


def test_dovecot_default_format_is_uid_and_uidvalidity_in_hex(tmp_path: Path) -> None:
    md = _maildir(tmp_path)
    _dovecot(md, [f"7 :{NAMES[0]}", f"8 W42 :{NAMES[1]}"])
    assert _uids(md) == ["000000076553f100", "000000086553f100", NAMES[2].split(",")[0]]


def test_dovecot_stored_pop3_uidl_wins_over_the_format(tmp_path: Path) -> None:
    md = _maildir(tmp_path)
    _dovecot(md, [f"1 P{'legacy:uidl-1'} G{GUID} :{NAMES[0]}", f"2 W42 Pold-2 :{NAMES[1]}", f"3 :{NAMES[2]}"])
    uids, sources = uids_and_sources(str(md), sorted(os.listdir(md / "cur")))
    assert uids == ["legacy:uidl-1", "old-2", "000000036553f100"]
    assert sources == [uidimport.DOVECOT_STORED, uidimport.DOVECOT_STORED, uidimport.DOVECOT_UID]


def test_dovecot_version_1_file(tmp_path: Path) -> None:
    md = _maildir(tmp_path, sub="new", flags="")
    _dovecot(md, [f"5 {NAMES[0]}"], header=f"1 {UIDV} 6")
    assert _uids(md)[0] == "000000056553f100"


def test_courier_uid_and_uidvalidity_and_the_legacy_name_form(tmp_path: Path) -> None:
    md = _maildir(tmp_path)
    _courier(md, [f"{NAMES[0]}:2,S 42 4:{UIDV}:0", f"{NAMES[1]}:2,S 42 5:0:0", f"{NAMES[2]}:2,S 42 0:{UIDV}:0"])
    assert _uids(md) == [f"UID4-{UIDV}", "UID5", NAMES[2]]


def test_courier_version_2_lines_and_names_with_spaces(tmp_path: Path) -> None:
    names = ["1700000001.M1P10.host", "1700000002.M2 P10.host"]
    md = _maildir(tmp_path, names=names, flags=":2,")
    _courier(md, [f"{names[0]}:2, 42 1:{UIDV}", f"{names[1]}:2, 42 0:{UIDV}"], header=f"/2 3 {UIDV}")
    assert _uids(md) == [f"UID1-{UIDV}", "1700000002.M2+20P10.host"]


def test_new_mail_gets_ours_and_the_newer_file_wins_where_both_know_a_message(tmp_path: Path) -> None:
    md = _maildir(tmp_path, names=NAMES[:2])
    _courier(md, [f"{NAMES[0]}:2,S 42 1:{UIDV}:0", f"{NAMES[1]}:2,S 42 2:{UIDV}:0"])
    os.utime(md / "courierpop3dsizelist", (1, 1))
    _dovecot(md, [f"9 :{NAMES[1]}"])
    new = write_maildir_message(md, MSG)
    assert _uids(md) == [f"UID1-{UIDV}", "000000096553f100", new]


def test_unfit_shared_or_taken_uidls_fall_back_to_ours_and_are_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    names = [*NAMES, "1700000004.M4P10.host,S=40,W=42", "1700000005.M5P10.host,S=40,W=42"]
    md = _maildir(tmp_path, names=names)
    ours = [name.split(",")[0] for name in names]
    _dovecot(md, [
        f"1 P{'x' * 71} :{names[0]}",  # too long for RFC 1939
        f"2 Psame :{names[1]}",
        f"3 Psame :{names[2]}",  # two messages would share it
        f"4 P{ours[4]} :{names[3]}",  # the UID message 5 keeps as its own
    ])
    with caplog.at_level(logging.WARNING):
        uids = _uids(md)
    assert uids == ours
    assert len(set(uids)) == len(uids)
    assert "1 imported UIDLs unfit for UIDL, 3 shared or taken" in caplog.text


def test_a_chain_of_taken_uidls_ends_unique(tmp_path: Path) -> None:
    """Message k imports the UID message k-1 would fall back to: every one
    goes back to its own, in one pass per message."""
    names = [f"17000000{i:02d}.M{i}P1.h,S=40,W=42" for i in range(30)]
    md = _maildir(tmp_path, names=names)
    ours = [name.split(",")[0] for name in names]
    _dovecot(md, [f"{i + 1} P{ours[i - 1]} :{names[i]}" for i in range(1, 30)])
    uids = _uids(md)
    assert len(set(uids)) == 30 and uids == ours


HOSTILE = [
    b"",
    b"3\n",
    b"9 V1 N2\n1 :a\n",
    b"3 Vxyz N2\n1 :" + NAMES[0].encode() + b"\n",
    b"3 V1 N2\n0 :a\n-1 :a\n1 :a/../b\n1 P\n1\n" + b"9" * 50 + b" :a\n1 P\x00\xff :a\n1 :\n",
    b"3 V1 N2\n" + b"1 " + b"W" * 100_000 + b" :a\n",
    b"/3 1 1\nonlyname\n a 1 1:1\nb x 1:1\nc 1 1:x\nd 1 1:1:1:1\n" + b"e 1 " + b"9" * 40 + b":1\n",
    b"/9 1 1\na 1 1:1\n",
    b"\xff\xfe garbage \x00\n" * 100,
    b"3 V1 N2\n1 P\xff\x01 :" + NAMES[0].encode() + b"\n2 P\x7fx\r :" + NAMES[1].encode() + b"\n",
    b"/3 1 1\n" + NAMES[0].encode() + b"\x01 1 0:1:0\n",
]


@pytest.mark.parametrize("content", HOSTILE)
@pytest.mark.parametrize("file", ["dovecot-uidlist", "courierpop3dsizelist"])
def test_hostile_files_never_raise_nor_give_a_bad_uidl(tmp_path: Path, file: str, content: bytes) -> None:
    md = _maildir(tmp_path)
    (md / file).write_bytes(content)
    uids = _uids(md)
    assert len(set(uids)) == len(uids) == 3
    assert all(0 < len(uid) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in uid) for uid in uids)


def test_read_limit_grows_with_the_maildrop_up_to_the_bound() -> None:
    assert uidimport.read_limit(3) == uidimport.MIN_READ_BYTES
    assert uidimport.read_limit(1000) == 1000 * uidimport.BYTES_PER_MESSAGE
    assert uidimport.read_limit(10**9) == uidimport.MAX_FILE_BYTES


def test_a_huge_file_is_read_only_up_to_the_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uidimport, "MIN_READ_BYTES", 4096)
    md = _maildir(tmp_path)
    filler = [f"{100 + i} :filler.{i}" for i in range(400)]  # ~ 7 kB: past the bound
    _dovecot(md, [f"1 :{NAMES[0]}", *filler, f"2 :{NAMES[1]}"])
    assert _uids(md)[:2] == ["000000016553f100", NAMES[1].split(",")[0]]


def test_links_and_fifos_are_not_read(tmp_path: Path) -> None:
    md = _maildir(tmp_path)
    secret = tmp_path / "elsewhere"
    secret.write_text(f"3 V{UIDV} N9\n1 :{NAMES[0]}\n")
    (md / "dovecot-uidlist").symlink_to(secret)
    os.mkfifo(md / "courierpop3dsizelist")  # would block a reader that waited
    assert _uids(md) == [name.split(",")[0] for name in NAMES]


def test_a_plain_maildir_never_loads_the_importer(tmp_path: Path) -> None:
    md = _maildir(tmp_path)
    code = (
        "import sys; from qpopper.maildrop.maildir import MaildirMaildrop\n"
        f"d = MaildirMaildrop({str(md)!r}); d.messages().uids; d.close()\n"
        "print('qpopper.maildrop.uidimport' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_report_counts_each_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    md = _maildir(tmp_path)
    _dovecot(md, [f"1 Pkept-1 :{NAMES[0]}", f"2 :{NAMES[1]}"])
    write_maildir_message(md, MSG)
    assert uidlreport.main(["--list", str(md)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:5] == [
        f"{md}: 4 messages",
        "  1 keep the UIDL of dovecot-uidlist (stored POP3 UIDL)",
        "  1 keep the UIDL of dovecot-uidlist (IMAP UID and UIDVALIDITY)",
        "  0 keep the UIDL of courierpop3dsizelist",
        "  2 get a UIDL of our own",
    ]
    assert out[5] == f"kept-1 dovecot-uidlist (stored POP3 UIDL) {NAMES[0]}:2,S"


@pytest.mark.parametrize("bad", ["missing", "file", "empty-dir"])
def test_report_on_a_bad_path_is_one_line_and_exit_2(tmp_path: Path, bad: str) -> None:
    path = tmp_path / bad
    if bad == "file":
        path.write_text("x")
    elif bad == "empty-dir":
        path.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "qpopper.daemon.uidlreport", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("qpopper-uidl-report: "), proc.stderr


def test_report_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        uidlreport.main([])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("qpopper-uidl-report: ")
