"""Hostile clients against a real running server over loopback: floods,
slow drips, brute force, poisoned names, kills at the worst moment, a full
disk. Nothing lost, no one let in, everyone else still served."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import poplib
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import PASSWORD
from driver import drive_blindly
from helpers import QpopperProcess, write_maildir_message
from qpopper import Controller, StaticAuthenticator
from qpopper.protocol import (
    Session,
    SessionConfig,
)

Fill = Callable[[str, list[bytes]], Path]
QPOPPER = [sys.executable, "-m", "qpopper"]


def connect(server: Controller) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=10)
    assert sock.recv(512).startswith(b"+OK")
    return sock


def read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


# ---- input ----------------------------------------------------------------


@pytest.mark.parametrize("name", [b"ali\x00ce", b"ali\x1bce", b"ali\xffce", b"alice\rUSER x"])
def test_controls_and_8bit_in_names_are_refused_not_truncated(pop_server: Controller, fill: Fill, name: bytes) -> None:
    fill("alice", [b"Subject: x\n\ny\n"])
    sock = connect(pop_server)
    sock.sendall(b"USER " + name + b"\r\nPASS " + PASSWORD.encode() + b"\r\nSTAT\r\nQUIT\r\n")
    sock.settimeout(10)
    data = read_all(sock)
    sock.close()
    assert b"+OK alice has" not in data and b"\r\n+OK 1 " not in data
    assert data.split(b"\r\n")[0].startswith(b"-ERR")


@pytest.mark.parametrize("logged_in", [False, True])
def test_flood_of_bad_commands_ends_in_a_disconnect(pop_server: Controller, fill: Fill, logged_in: bool) -> None:
    fill("alice", [])
    sock = connect(pop_server)
    if logged_in:
        sock.sendall(b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\n")
        assert sock.recv(512).startswith(b"+OK")
    sock.sendall(b"BOGUS\r\n" * 100)
    sock.settimeout(10)
    data = read_all(sock)
    sock.close()
    assert data.endswith(b"-ERR Too many bad commands; closing connection.\r\n")
    assert data.count(b"-ERR") <= 25


def test_absurd_line_is_dropped_without_memory_growth_and_others_served(pop_server: Controller) -> None:
    sock = connect(pop_server)
    stop = threading.Event()

    flooding = threading.Event()

    def pump() -> None:
        chunk = b"A" * 65536
        sent = 0
        try:
            while not stop.is_set():
                sock.sendall(chunk)
                sent += len(chunk)
                if sent >= 32 << 20:  # more than the socket buffers hold: the server has read and dropped most
                    flooding.set()
        except OSError:
            pass

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    assert flooding.wait(30)
    other = poplib.POP3(pop_server.host, pop_server.port, timeout=10)
    assert other.capa()
    other.quit()
    stop.set()
    sock.close()
    t.join(5)


# ---- floods ------------------------------------------------------------------


def test_slowloris_and_idle_crowd_do_not_keep_a_fresh_client_out(mailroot: Path, fill: Fill) -> None:
    fill("alice", [b"Subject: x\n\ny\n"])
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    with Controller(authenticator=auth, max_connections=60, max_connections_per_ip=1000, login_timeout=30) as server:
        crowd = []
        for i in range(120):  # twice the cap: slow drips and silent sockets
            s = socket.create_connection((server.host, server.port), timeout=10)
            if i % 2:
                s.sendall(b"U")
            crowd.append(s)
        stop = threading.Event()

        def drip() -> None:
            while not stop.is_set():
                for s in crowd[1::2]:
                    try:
                        s.send(b"S")
                    except OSError:
                        pass
                stop.wait(1.0)

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        try:
            started = time.monotonic()
            client = poplib.POP3(server.host, server.port, timeout=10)
            client.user("alice")
            client.pass_(PASSWORD)
            assert client.stat()[0] == 1
            client.quit()
            assert time.monotonic() - started < 5
        finally:
            stop.set()
            dripper.join(5)
            for s in crowd:
                s.close()


def test_login_deadline_cuts_a_slow_drip(mailroot: Path) -> None:
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    with Controller(authenticator=auth, login_timeout=1.5) as server:
        sock = connect(server)
        sock.settimeout(10)
        closed = False
        for _ in range(10):
            try:
                sock.send(b"N")
                if sock.recv(100, socket.MSG_DONTWAIT) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed = True
                break
            time.sleep(0.5)
        sock.close()
        assert closed


# ---- passwords ---------------------------------------------------------------


def test_failures_delay_grows_per_address_without_blocking_others(
    mailroot: Path, fill: Fill, caplog: pytest.LogCaptureFixture
) -> None:
    fill("alice", [])
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    with (
        caplog.at_level(logging.WARNING, logger="qpopper.session"),
        Controller(authenticator=auth, auth_fail_delay=0.2, auth_fail_delay_max=0.8, log_auth_failures=True) as server,
    ):
        waits = []
        sock = connect(server)
        for _ in range(4):
            started = time.monotonic()
            sock.sendall(b"USER alice\r\nPASS wrong\r\n")
            data = b""
            while not data.endswith(b"failed.\r\n"):
                data += sock.recv(512)
            waits.append(time.monotonic() - started)
            # Meanwhile another client is served at once.
        assert waits[0] >= 0.2 and waits[1] >= 0.4 and waits[2] >= 0.8 and waits[3] >= 0.8
        sock.sendall(b"USER alice\r\nPASS wrong\r\n")
        other = poplib.POP3(server.host, server.port, timeout=10)
        other.user("alice")
        other_started = time.monotonic()
        other.pass_(PASSWORD)  # a right password is never delayed
        assert time.monotonic() - other_started < 0.5
        other.quit()
        sock.close()
    assert "authentication failure; rhost=127.0.0.1 user=alice" in caplog.text


# ---- names and paths ---------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


HOSTILE_NAMES = [
    "../canary", "../../etc/passwd", "/etc/passwd", "a/b", "..", ".", ".hidden", "~root", "$(touch pwned)",
    "`id`", "a;rm -rf x", "%s%n%x", "a|b", "a b", "x" * 300, "a\tb", "ü", "*", "?", "{a,b}", "-rf",
]


def test_hostile_names_never_touch_anything(tmp_path: Path) -> None:
    mail = tmp_path / "mail"
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep").write_text("canary")
    mail.mkdir()
    auth = StaticAuthenticator(dict.fromkeys(("alice",), "pw"), mail_location=f"maildir:{mail}/%u/Maildir")
    before = snapshot(tmp_path)
    with Controller(authenticator=auth) as server:
        for name in HOSTILE_NAMES:
            encoded = name.encode("utf-8")
            for line in (b"USER " + encoded, b"APOP " + encoded + b" " + b"0" * 32):
                sock = socket.create_connection((server.host, server.port), timeout=10)
                sock.recv(512)
                sock.sendall(line + b"\r\nPASS pw\r\nQUIT\r\n")
                sock.settimeout(10)
                read_all(sock)
                sock.close()
            sock = socket.create_connection((server.host, server.port), timeout=10)
            sock.recv(512)
            sock.sendall(b"AUTH PLAIN " + base64.b64encode(b"\0" + encoded + b"\0pw") + b"\r\nQUIT\r\n")
            sock.settimeout(10)
            read_all(sock)
            sock.close()
    assert snapshot(tmp_path) == before


# ---- spool attacks (virtual users, mbox) -------------------------------------


def test_symlinked_mbox_spool_is_never_written(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"From a@b Wed Nov 25 10:00:00 2026\nSubject: v\n\nvictim\n")
    (spool_dir / "alice").symlink_to(victim)
    before = victim.read_bytes()
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"mbox:{spool_dir}/%u")
    with Controller(authenticator=auth) as server:
        c = poplib.POP3(server.host, server.port, timeout=10)
        c.user("alice")
        try:
            c.pass_(PASSWORD)
            c.dele(1)
            c.quit()
        except poplib.error_proto:
            c.quit()
    assert victim.read_bytes() == before and (spool_dir / "alice").is_symlink()


# ---- crashes and faults --------------------------------------------------------


class Daemon(QpopperProcess):
    def __init__(self, tmp: Path, location: str, *args: str) -> None:
        passwd = tmp / "passwd"
        passwd.write_text(f"alice:{{PLAIN}}{PASSWORD}::::{tmp}::\n")
        super().__init__(
            tmp, ["--passwd-file", str(passwd), f"--mail-location={location}", "--no-reverse-lookup", *args]
        )


def mbox_of(messages: list[bytes]) -> bytes:
    return b"".join(b"From a@b Wed Nov 25 10:00:00 2026\n" + m + b"\n" for m in messages)


@pytest.mark.parametrize("kind", ["maildir", "mbox"])
def test_kill_after_dele_before_quit_loses_nothing(tmp_path: Path, kind: str) -> None:
    messages = [b"Subject: m%d\n\nbody %d\n" % (i, i) for i in range(10)]
    if kind == "maildir":
        for m in messages:
            write_maildir_message(tmp_path / "Maildir", m)
        location = f"maildir:{tmp_path}/Maildir"
    else:
        (tmp_path / "spool").write_bytes(mbox_of(messages))
        location = f"mbox:{tmp_path}/spool"
    d = Daemon(tmp_path, location)
    c = poplib.POP3("127.0.0.1", d.port, timeout=10)
    c.user("alice")
    c.pass_(PASSWORD)
    for i in range(1, 11):
        c.dele(i)
    d.kill()
    c.close()
    d = Daemon(tmp_path, location)
    c = poplib.POP3("127.0.0.1", d.port, timeout=10)
    c.user("alice")
    c.pass_(PASSWORD)
    assert c.stat()[0] == 10
    c.quit()
    d.kill()


@pytest.mark.slow
def test_kill_during_maildir_update_never_loses_an_undeleted_message(tmp_path: Path) -> None:
    rng = random.Random(7)
    for round_ in range(8):
        base = tmp_path / f"r{round_}"
        base.mkdir()
        maildir = base / "Maildir"
        messages = {i: b"Subject: m%d\n\nbody %d\n" % (i, i) for i in range(300)}
        for m in messages.values():
            write_maildir_message(maildir, m)
        d = Daemon(base, f"maildir:{maildir}")
        c = poplib.POP3("127.0.0.1", d.port, timeout=10)
        c.user("alice")
        c.pass_(PASSWORD)
        listing = c.list()[1]
        keep = set()
        for line in listing:
            number = int(line.split()[0])
            if rng.random() < 0.5:
                c.dele(number)
            else:
                keep.add(number)
        kept_bodies = {b"\n".join(c.retr(n)[1]) for n in keep}
        c.sock.sendall(b"QUIT\r\n")
        time.sleep(rng.uniform(0, 0.05))
        d.kill()
        c.close()
        remaining = set()
        for sub in ("new", "cur"):
            for p in (maildir / sub).iterdir():
                remaining.add(p.read_bytes().rstrip(b"\n"))
        assert {b.replace(b"\r\n", b"\n").rstrip(b"\n") for b in kept_bodies} <= remaining


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB file system of our own, to fill up or make read-only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_full_disk_during_update_keeps_the_old_spool(small_tmpfs: Path) -> None:
    mount = small_tmpfs
    messages = [b"Subject: m%d\n\n" % i + b"x" * 3000 + b"\n" for i in range(50)]
    spool = mount / "alice"
    spool.write_bytes(mbox_of(messages))
    before = spool.read_bytes()
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"mbox:{mount}/%u")
    with Controller(authenticator=auth) as server:
        c = poplib.POP3(server.host, server.port, timeout=10)
        c.user("alice")
        c.pass_(PASSWORD)
        c.dele(1)
        fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass  # the disk is full now
        finally:
            os.close(fd)
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            c.quit()
        c.close()
    assert spool.read_bytes() == before
    assert not [p for p in mount.iterdir() if p.name not in ("alice", "filler") and not p.name.endswith(".lock")]


def test_vanished_spool_gets_a_clean_error(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    (spool_dir / "alice").write_bytes(mbox_of([b"Subject: a\n\nx\n", b"Subject: b\n\ny\n"]))
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"mbox:{spool_dir}/%u")
    with Controller(authenticator=auth) as server:
        c = poplib.POP3(server.host, server.port, timeout=10)
        c.user("alice")
        c.pass_(PASSWORD)
        c.dele(1)
        (spool_dir / "alice").unlink()  # gone under the session
        with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[SYS/"):
            c.quit()
        c.close()


def test_read_only_spool_gets_a_clean_error_and_stays(small_tmpfs: Path) -> None:
    mount = small_tmpfs
    spool = mount / "alice"
    spool.write_bytes(mbox_of([b"Subject: a\n\nx\n", b"Subject: b\n\ny\n"]))
    before = spool.read_bytes()
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"mbox:{mount}/%u")
    with Controller(authenticator=auth) as server:
        c = poplib.POP3(server.host, server.port, timeout=10)
        c.user("alice")
        refusal = b""  # the login, the DELE or at the latest the QUIT meets the spool's failure
        try:
            c.pass_(PASSWORD)
            c.dele(1)
            c.quit()
        except poplib.error_proto as exc:
            refusal = exc.args[0]
        assert re.match(rb"-ERR \[SYS/", refusal)
        c.close()
    assert spool.read_bytes() == before


# ---- fuzzing the core ----------------------------------------------------------


COMMAND_WORDS = [
    b"USER alice", b"PASS pw", b"APOP alice " + b"a" * 32, b"STAT", b"LIST", b"LIST 1", b"RETR 1", b"TOP 1 0",
    b"DELE 1", b"RSET", b"NOOP", b"UIDL", b"LAST", b"CAPA", b"STLS", b"AUTH PLAIN", b"AUTH LOGIN",
    b"AUTH SCRAM-SHA-256 biwsbj11c2VyLHI9YWJj", b"*", b"XTND XMIT", b"XTND XLST Subject", b"EUIDL",
    b"MDEF m(STAT)", b"m", b"RETR 1 XMANGLE", b"LIST XMANGLE(text=html)", b".", b"QUIT", b"=", b"AUTH", b"",
]


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(st.one_of(st.sampled_from(COMMAND_WORDS), st.binary(max_size=40)), max_size=40),
    seps=st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b" ", b"", b"\x00"]), min_size=40, max_size=40),
    cuts=st.lists(st.integers(0, 2000), max_size=6),
    seed=st.integers(0, 2**32),
)
def test_core_survives_any_input(parts: list[bytes], seps: list[bytes], cuts: list[int], seed: int) -> None:
    data = b"".join(p + s for p, s in zip(parts, seps, strict=False))  # 40 separators for up to 40 parts
    bounds = sorted({c % (len(data) + 1) for c in cuts}) + [len(data)]
    chunks, start = [], 0
    for end in bounds:
        chunks.append(data[start:end])
        start = end
    session = Session(SessionConfig(hostname="h"), timestamp="<1.2@h>")
    drive_blindly(session, [c for c in chunks if c], random.Random(seed))


@pytest.mark.slow
def test_bounded_atheris_campaign() -> None:
    pytest.importorskip("atheris")
    script = Path(__file__).resolve().parent.parent / "fuzz" / "fuzz_session.py"
    out = subprocess.run(
        [sys.executable, str(script), "-runs=20000", "-max_len=4096"], capture_output=True, timeout=600
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-3000:]


@pytest.mark.parametrize("server_mode", [True, False])
@pytest.mark.parametrize("plant", [".alice.pop", ".alice.qpopper-new", "alice.lock", ".alice.qpopper-pop3.lock"])
@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_planted_links_beside_the_spool_are_never_written_through(
    tmp_path: Path, server_mode: bool, plant: str, link: str
) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    victim = spool_dir / "victim" if link == "hardlink" else tmp_path / "victim"
    victim.write_bytes(b"precious, not mail\n")
    before_victim = victim.read_bytes()
    (spool_dir / "alice").write_bytes(mbox_of([b"Subject: a\n\nx\n", b"Subject: b\n\ny\n"]))
    target = spool_dir / plant
    if link == "symlink":
        target.symlink_to(victim)
    else:
        os.link(victim, target)
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"mbox:{spool_dir}/%u")
    with Controller(authenticator=auth, server_mode=server_mode) as server:
        c = poplib.POP3(server.host, server.port, timeout=10)
        c.user("alice")
        refusal = b""
        try:
            c.pass_(PASSWORD)
            c.dele(1)
            c.quit()
        except poplib.error_proto as exc:
            refusal = exc.args[0]
            c.close()
        assert not refusal or re.match(rb"-ERR \[(SYS|IN-USE)", refusal)
    assert victim.read_bytes() == before_victim
    remaining = (spool_dir / "alice").read_bytes()
    assert remaining.count(b"\nSubject: ") + remaining.startswith(b"Subject: ") in (1, 2)
