"""A site moves from Dovecot (or Courier) to this server: clients that leave
mail on the server fetch nothing again.

Real parts only: Debian's Dovecot serves a Maildir on a loopback port to
Debian's fetchmail and getmail, both in "keep" mode tracking UIDLs; Dovecot
is stopped and this server (the `qpopper` command) serves the same Maildir
on the same port to the same clients with the same state files. They fetch
nothing, and a message delivered afterwards is fetched exactly once.

For Courier, Dovecot stands in for courier-pop3d on the wire: it is given a
dovecot-uidlist with the UIDs and UIDVALIDITY a courierpop3dsizelist holds
and `pop3_uidl_format = UID%u-%v`, so it serves exactly the UIDLs
courier-pop3d would (`UID<n>-<uidvalidity>`); before this server takes over,
Dovecot's files are removed and only the courierpop3dsizelist, written as
courier-pop3d writes it, is left.

Every step is bounded: each client run and each server start has a timeout.
"""

from __future__ import annotations

import os
import poplib
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import QPOPPER, TEST_DAEMON_ARGS, write_maildir_message

USER = "migrant"
PASSWORD = "moving-day"
DOVECOT = "/usr/sbin/dovecot"
DOVECOT_POP3 = "/usr/lib/dovecot/pop3"
STEP_TIMEOUT = 60

pytestmark = [
    pytest.mark.skipif(not os.path.exists(DOVECOT_POP3), reason="needs Debian's dovecot-pop3d"),
    pytest.mark.skipif(shutil.which("fetchmail") is None, reason="needs Debian's fetchmail"),
    pytest.mark.skipif(shutil.which("getmail") is None, reason="needs getmail6 (Debian's or PyPI's)"),
]


def _message(n: int) -> bytes:
    return f"From: a@example.org\nTo: {USER}@example.org\nSubject: migration message {n}\n\nbody {n}\n".encode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(100).startswith(b"+OK"):
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"server on {port} did not come up:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class Site:
    """One user's Maildir, the port clients poll, and the clients' state."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.maildir = base / "mail" / USER / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (self.maildir / sub).mkdir(parents=True)
        self.port = _free_port()
        self.clients = base / "clients"
        self.clients.mkdir()
        self.fetchmail_out = self.clients / "fetchmail.mbox"
        self.getmail_out = self.clients / "getmail.mbox"
        self.getmail_out.touch()
        # As root, Dovecot runs as its package's user and the clients as
        # nobody (getmail refuses to deliver as root, and users run clients).
        root = os.geteuid() == 0
        self.run_as = pwd.getpwnam("dovecot") if root else None
        self.client_account = pwd.getpwnam("nobody") if root else pwd.getpwuid(os.geteuid())
        self._write_client_configs()
        if root:
            for root_dir, dirs, files in os.walk(self.clients):
                for entry in (root_dir, *(os.path.join(root_dir, e) for e in (*dirs, *files))):
                    os.lchown(entry, self.client_account.pw_uid, self.client_account.pw_gid)

    def _as_client(self, command: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return command
        account = self.client_account
        return ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups", "--", *command]

    def _write_client_configs(self) -> None:
        rc = self.clients / "fetchmailrc"
        rc.write_text(
            "set no syslog\n"
            f'set idfile "{self.clients}/fetchmail.ids"\n'
            f"poll 127.0.0.1 service {self.port} protocol pop3 uidl auth password timeout 20\n"
            f'  user "{USER}" there with password "{PASSWORD}" is "{self.client_account.pw_name}" here\n'
            "  keep sslproto ''\n"
            f"  mda \"/bin/sh -c 'cat >> {self.fetchmail_out}'\"\n"
        )
        rc.chmod(0o600)
        (self.clients / "getmail").mkdir()
        (self.clients / "getmail" / "getmailrc").write_text(
            "[retriever]\ntype = SimplePOP3Retriever\nserver = 127.0.0.1\n"
            f"port = {self.port}\nusername = {USER}\npassword = {PASSWORD}\n"
            f"[destination]\ntype = Mboxrd\npath = {self.getmail_out}\n"
            "[options]\ndelete = false\nread_all = false\nverbose = 0\n"
        )

    def fetchmail(self) -> None:
        env = {**os.environ, "HOME": str(self.clients), "FETCHMAILHOME": str(self.clients)}
        proc = subprocess.run(
            self._as_client(["fetchmail", "--nodetach", "-f", str(self.clients / "fetchmailrc")]),
            env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT,
        )
        assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # 1: no new mail

    def getmail(self) -> None:
        proc = subprocess.run(
            self._as_client(["getmail", f"--getmaildir={self.clients / 'getmail'}", "--rcfile=getmailrc"]),
            env={**os.environ, "HOME": str(self.clients)},
            capture_output=True, text=True, timeout=STEP_TIMEOUT,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def fetch_with_both(self) -> None:
        self.fetchmail()
        self.getmail()

    def fetched(self) -> dict[str, list[int]]:
        """Per client, the numbers of the messages it has stored, in order."""
        found = {}
        for client, out in (("fetchmail", self.fetchmail_out), ("getmail", self.getmail_out)):
            text = out.read_bytes() if out.exists() else b""
            found[client] = [int(n) for n in re.findall(rb"^Subject: migration message (\d+)$", text, re.M)]
        return found

    def uidls(self) -> list[str]:
        client = poplib.POP3("127.0.0.1", self.port, timeout=20)
        try:
            client.user(USER)
            client.pass_(PASSWORD)
            return [line.split()[1].decode() for line in client.uidl()[1]]
        finally:
            client.quit()

    def deliver(self, n: int, name: str | None = None, sub: str = "new") -> None:
        write_maildir_message(self.maildir, _message(n), name=name, sub=sub)
        if self.run_as is not None:
            self._hand_to_dovecot_user()

    def _hand_to_dovecot_user(self) -> None:
        assert self.run_as is not None
        for root, dirs, files in (*os.walk(self.base / "mail"), *os.walk(self.base / "dovecot")):
            for entry in (root, *(os.path.join(root, d) for d in dirs), *(os.path.join(root, f) for f in files)):
                os.lchown(entry, self.run_as.pw_uid, self.run_as.pw_gid)

    def dovecot(self, uidl_format: str | None = None) -> subprocess.Popen[bytes]:
        """A private Dovecot serving only POP3 on the site's port: its own
        configuration, sockets, state and log under the site; as root, its
        master runs as the package's `dovecot` user (Dovecot's rootless set-up)."""
        etc = self.base / "dovecot"
        for sub in ("run", "state"):
            (etc / sub).mkdir(parents=True, exist_ok=True)
        account = self.run_as or pwd.getpwuid(os.geteuid())
        (etc / "passwd").write_text(
            f"{USER}:{{PLAIN}}{PASSWORD}:{account.pw_uid}:{account.pw_gid}::{self.base}/mail/{USER}::\n"
        )
        extra = f"pop3_uidl_format = {uidl_format}\n" if uidl_format else ""
        (etc / "dovecot.conf").write_text(
            f"""protocols = pop3
listen = 127.0.0.1
base_dir = {etc}/run
state_dir = {etc}/state
instance_name = qpopper-migration-{self.port}
log_path = {etc}/dovecot.log
default_internal_user = {account.pw_name}
default_internal_group = {account.pw_name}
default_login_user = {account.pw_name}
first_valid_uid = {account.pw_uid}
first_valid_gid = {account.pw_gid}
disable_plaintext_auth = no
auth_mechanisms = plain
ssl = no
mail_location = maildir:{self.maildir}
{extra}passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {etc}/passwd
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {etc}/passwd
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
  chroot =
}}
service anvil {{
  chroot =
}}
service imap-login {{
  chroot =
}}
service submission-login {{
  chroot =
}}
service managesieve-login {{
  chroot =
}}
"""
        )
        (etc / "dovecot.log").touch()
        command = [DOVECOT, "-F", "-c", str(etc / "dovecot.conf")]
        if self.run_as is not None:
            self._hand_to_dovecot_user()
            command = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups", "--",
                       *command]
        with (etc / "dovecot.log").open("ab") as log:
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        _wait_for_port(self.port, proc, etc / "dovecot.log")
        return proc

    def qpopper(self) -> tuple[subprocess.Popen[bytes], Path]:
        passwd = self.base / "qpopper-passwd"
        passwd.write_text(f"{USER}:{{PLAIN}}{PASSWORD}::::{self.maildir.parent}::userdb_mail=maildir:{self.maildir}\n")
        log = self.base / "qpopper.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*QPOPPER, *TEST_DAEMON_ARGS, f"--passwd-file={passwd}", "-d", f"127.0.0.1:{self.port}"],
                stdout=subprocess.DEVNULL, stderr=out,
            )
        _wait_for_port(self.port, proc, log)
        return proc, log


@pytest.fixture
def site() -> Iterator[Site]:
    # Not under pytest's tmp_path: as root, Dovecot's unprivileged user must
    # reach the Maildir, and pytest's base directory is root's alone.
    base = Path(tempfile.mkdtemp(prefix="qpopper-migration-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield Site(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _take_over(site: Site, old_uidls: list[str]) -> None:
    """This server serves the Maildir: same UIDLs, nothing fetched again,
    a new message fetched once."""
    proc, log = site.qpopper()
    try:
        site.fetch_with_both()
        assert site.fetched() == {"fetchmail": [1, 2, 3], "getmail": [1, 2, 3]}
        assert site.uidls() == old_uidls
        site.deliver(4)
        site.fetch_with_both()
        site.fetch_with_both()
        assert site.fetched() == {"fetchmail": [1, 2, 3, 4], "getmail": [1, 2, 3, 4]}
        assert len(set(site.uidls())) == 4
    finally:
        _stop(proc)
    text = log.read_text()
    assert "Traceback" not in text and "internal error" not in text, text


def test_from_dovecot_nothing_is_fetched_again(site: Site) -> None:
    for n in (1, 2, 3):
        site.deliver(n)
    dovecot = site.dovecot()
    try:
        site.fetch_with_both()
        site.fetch_with_both()  # Dovecot's own UIDL tracking: nothing twice
        assert site.fetched() == {"fetchmail": [1, 2, 3], "getmail": [1, 2, 3]}
        old_uidls = site.uidls()
    finally:
        _stop(dovecot)
    assert (site.maildir / "dovecot-uidlist").exists()
    assert all(re.fullmatch(r"[0-9a-f]{16}", uidl) for uidl in old_uidls), old_uidls
    _take_over(site, old_uidls)


COURIER_UIDV = 1234567890


def test_from_courier_nothing_is_fetched_again(site: Site) -> None:
    # As courier-pop3d leaves a Maildir: messages in cur/, UIDs 17-19 (the
    # counter had moved on: earlier mail was deleted), its sizelist beside.
    names = [f"17000000{n:02d}.M{n}P42.courier.example" for n in (1, 2, 3)]
    for n, name in zip((1, 2, 3), names, strict=True):
        site.deliver(n, name=name + ":2,", sub="cur")
    sizes = [len(_message(n)) + _message(n).count(b"\n") for n in (1, 2, 3)]
    (site.maildir / "courierpop3dsizelist").write_text(
        f"/3 20 {COURIER_UIDV}\n"
        + "".join(f"{name}:2, {size} {16 + n}:{COURIER_UIDV}:0\n"
                  for n, name, size in zip((1, 2, 3), names, sizes, strict=True))
    )
    # Dovecot, standing in for courier-pop3d on the wire, with the same numbers.
    (site.maildir / "dovecot-uidlist").write_text(
        f"3 V{COURIER_UIDV} N20 G0123456789abcdef0123456789abcdef\n"
        + "".join(f"{16 + n} :{name}\n" for n, name in zip((1, 2, 3), names, strict=True))
    )
    dovecot = site.dovecot(uidl_format="UID%u-%v")
    try:
        site.fetch_with_both()
        site.fetch_with_both()
        assert site.fetched() == {"fetchmail": [1, 2, 3], "getmail": [1, 2, 3]}
        old_uidls = site.uidls()
    finally:
        _stop(dovecot)
    assert old_uidls == [f"UID{n}-{COURIER_UIDV}" for n in (17, 18, 19)]
    for leftover in site.maildir.glob("dovecot*"):
        leftover.unlink()
    _take_over(site, old_uidls)
