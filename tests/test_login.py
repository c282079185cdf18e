"""The login step without sockets: a real Session, a real authenticator and
a Maildir on disk, driven through `Login` by a loop that stands in for the
connection (it only collects the replies)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from helpers import write_maildir_message
from qpopper.auth import Authenticator
from qpopper.auth.credentials import UserPass
from qpopper.auth.passwdfile import PasswdFileAuthenticator
from qpopper.auth.static import StaticAuthenticator
from qpopper.config.options import Options
from qpopper.extensions.bulletins import deliver_new_bulletins
from qpopper.maildrop import Maildrop
from qpopper.protocol import (
    Authenticate,
    LookupScramSecret,
    OpenMaildrop,
    SaslStep,
    Send,
    Session,
    wire_size,
)
from qpopper.server._login import Login, read_user_options
from qpopper.server._records import SessionRecords
from qpopper.server._services import Peer, Services

PEER = Peer("192.0.2.7", 40000)
MESSAGE = b"From: a@example.org\nSubject: hi\n\nbody\n"


class Runner:
    """The thread pool's stand-in: runs the call inline and counts it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, func: Callable[..., Any], *args: Any) -> Any:
        self.calls.append(getattr(func, "__name__", type(func).__name__))
        return func(*args)


@dataclasses.dataclass
class Result:
    replies: list[bytes]
    maildrop: Maildrop | None
    login: Login

    @property
    def last(self) -> bytes:
        return self.replies[-1]


class Bench:
    """One server's shared services and the sessions logged in through them."""

    def __init__(self, authenticator: Authenticator, **settings: Any) -> None:
        settings = {"hostname": "pop.example.org", "nonauth_file": None, "auth_fail_delay": 0.001,
                    "auth_fail_delay_max": 0.002, **settings}
        self.options = Options(**settings)
        self.runner = Runner()
        self.services = Services(self.options, authenticator, self.runner)

    def login(self, *lines: bytes) -> Result:
        return asyncio.run(self._login(lines))

    async def _login(self, lines: tuple[bytes, ...]) -> Result:
        session = Session(self.services.session_config(), timestamp="<1.2@pop.example.org>")
        login = Login(self.services, PEER, session, SessionRecords(self.options, PEER.host, self.runner))
        replies: list[bytes] = []
        maildrop = None
        session.receive_data(b"".join(line + b"\r\n" for line in lines))
        while (effect := session.next_effect()) is not None:
            if isinstance(effect, Send):
                replies.append(effect.data)
            elif isinstance(effect, Authenticate):
                await login.authenticate(effect)
            elif isinstance(effect, SaslStep):
                await login.sasl_step(effect)
            elif isinstance(effect, LookupScramSecret):
                await login.lookup_scram_secret(effect)
            elif isinstance(effect, OpenMaildrop):
                maildrop = await login.open_maildrop()
            else:
                raise AssertionError(f"not a login effect: {effect!r}")
        await login.wait_background(timeout=10)
        if maildrop is not None:
            maildrop.close()
        return Result(replies, maildrop, login)


@pytest.fixture
def maildirs(tmp_path: Path) -> Path:
    for user, count in (("alice", 2), ("bob", 0)):
        md = tmp_path / user / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (md / sub).mkdir(parents=True)
        for n in range(count):
            # Sizes in the name (S=, W=), as Dovecot writes them: a quick open needs them.
            name = f"{1700000000 + n}.M{n}P1.host,S={len(MESSAGE)},W={wire_size(MESSAGE)}"
            write_maildir_message(md, MESSAGE, name=name)
    return tmp_path


def static(maildirs: Path) -> StaticAuthenticator:
    return StaticAuthenticator({"alice": "secret", "bob": "secret"}, mail_location=f"maildir:{maildirs}/%u/Maildir",
                               home=f"{maildirs}/%u")


def test_a_good_password_opens_the_maildrop_on_the_quick_path(maildirs: Path) -> None:
    bench = Bench(static(maildirs))
    result = bench.login(b"USER alice", b"PASS secret")
    assert result.last.startswith(b"+OK") and b"2" in result.last
    assert result.maildrop is not None and len(result.maildrop.messages()) == 2
    assert result.login.principal is not None and result.login.principal.user == "alice"
    assert result.login.records.authenticated is not None and result.login.records.opened is not None
    assert bench.runner.calls == []  # in-memory secrets and a small Maildir: no worker trip at all


def test_a_slow_hash_goes_to_a_worker(maildirs: Path, tmp_path: Path) -> None:
    from passlib.hash import sha512_crypt

    passwd = tmp_path / "passwd"
    passwd.write_text(f"alice:{{SHA512-CRYPT}}{sha512_crypt.hash('secret')}::::{maildirs}/alice::\n")
    bench = Bench(PasswdFileAuthenticator(str(passwd), mail_location=f"maildir:{maildirs}/%u/Maildir"))
    result = bench.login(b"USER alice", b"PASS secret")
    assert result.last.startswith(b"+OK")
    assert bench.runner.calls == ["authenticate"]


@pytest.mark.parametrize("lines", [
    (b"USER alice", b"PASS wrong"),
    (b"USER nobody", b"PASS secret"),
    # SASL PLAIN acting for somebody else ends in Rejected credentials.
    (b"AUTH PLAIN " + base64.b64encode(b"bob\0alice\0secret"),),
])
def test_every_failure_answers_alike_and_raises_the_delay(maildirs: Path, lines: tuple[bytes, ...]) -> None:
    bench = Bench(static(maildirs))
    before = bench.services.failures.delay(PEER.host)
    result = bench.login(*lines)
    assert result.last.startswith(b"-ERR [AUTH]")
    assert result.maildrop is None and result.login.principal is None
    assert bench.services.failures.delay(PEER.host) > before


def test_rejected_credentials_never_reach_the_authenticator(maildirs: Path) -> None:
    class Counting(StaticAuthenticator):
        asked = 0

        def authenticate(self, credentials: Any) -> Any:
            Counting.asked += 1
            return super().authenticate(credentials)

    auth = Counting({"alice": "secret", "bob": "secret"}, mail_location=f"maildir:{maildirs}/%u/Maildir")
    result = Bench(auth).login(b"AUTH PLAIN " + base64.b64encode(b"bob\0alice\0secret"))
    assert result.last.startswith(b"-ERR [AUTH]") and Counting.asked == 0


def test_deny_and_allow_lists(maildirs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    deny = tmp_path / "ftpusers"
    deny.write_text("# no mail for her\nalice\n")
    allow = tmp_path / "popusers"
    allow.write_text("alice\n")
    with caplog.at_level(logging.WARNING, "qpopper.session"):
        denied = Bench(static(maildirs), nonauth_file=str(deny)).login(b"USER alice", b"PASS secret")
        assert denied.last.startswith(b"-ERR [AUTH]")
    assert "refused: listed in" in caplog.text
    assert Bench(static(maildirs), nonauth_file=str(deny)).login(b"USER bob", b"PASS secret").last.startswith(b"+OK")
    assert Bench(static(maildirs), auth_file=str(allow)).login(b"USER alice", b"PASS secret").last.startswith(b"+OK")
    not_listed = Bench(static(maildirs), auth_file=str(allow)).login(b"USER bob", b"PASS secret")
    assert not_listed.last.startswith(b"-ERR [AUTH]")


def test_login_delay_is_enforced_per_user(maildirs: Path) -> None:
    bench = Bench(static(maildirs), enforce_login_delay=True, announce_login_delay=60)
    assert bench.login(b"USER alice", b"PASS secret").last.startswith(b"+OK")
    again = bench.login(b"USER alice", b"PASS secret")
    assert again.last.startswith(b"-ERR [LOGIN-DELAY]") and again.maildrop is None and again.login.principal is None
    assert bench.login(b"USER bob", b"PASS secret").last.startswith(b"+OK")


def test_a_spool_option_file_changes_this_session_only(maildirs: Path, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / ".alice.qpopper-options").write_text("set announce-expire = 120\n")
    bench = Bench(static(maildirs), spool_options=True, spool_dir=str(spool))
    result = bench.login(b"USER alice", b"PASS secret")
    assert result.last.startswith(b"+OK")
    assert result.login.options.announce_expire == "120" and bench.options.announce_expire != "120"
    assert result.login.session.config.expire == "120"
    assert bench.login(b"USER bob", b"PASS secret").login.options is bench.options


def test_a_broken_option_file_is_no_failed_login(maildirs: Path, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / ".alice.qpopper-options").write_text("set no-such-option\n")
    options = Options(spool_options=True, spool_dir=str(spool))
    principal = static(maildirs).authenticate(UserPass("alice", b"secret"))
    assert principal is not None
    assert read_user_options(options, principal) is options
    bench = Bench(static(maildirs), spool_options=True, spool_dir=str(spool))
    assert bench.login(b"USER alice", b"PASS secret").last.startswith(b"+OK")


def test_the_post_login_hook_runs_beside_the_login(maildirs: Path, tmp_path: Path) -> None:
    hook = tmp_path / "logins"
    bench = Bench(static(maildirs), post_login_file=str(hook))
    assert bench.login(b"USER alice", b"PASS secret").last.startswith(b"+OK")
    assert hook.read_text().split()[1:] == ["alice", PEER.host]


def test_a_maildrop_that_cannot_be_opened_fails_the_login(tmp_path: Path) -> None:
    (tmp_path / "alice").mkdir()  # a directory where the mbox spool should be
    auth = StaticAuthenticator({"alice": "secret"}, mail_location=f"mbox:{tmp_path}/alice")
    result = Bench(auth).login(b"USER alice", b"PASS secret")
    assert result.last.startswith(b"-ERR [SYS/")
    assert result.maildrop is None and result.login.principal is None


def test_new_bulletins_arrive_in_this_session(maildirs: Path, tmp_path: Path) -> None:
    bulldir = tmp_path / "bulletins"
    bulldir.mkdir()
    (bulldir / "1.news").write_bytes(b"From admin Mon Jan  1 00:00:00 2024\nTo: all\nSubject: news\n\nhello\n")
    bench = Bench(static(maildirs), bulldir=str(bulldir))
    result = bench.login(b"USER alice", b"PASS secret")
    assert result.last.startswith(b"+OK") and b"3" in result.last
    assert len(list((maildirs / "alice" / "Maildir" / "new").iterdir())) == 3
    assert (maildirs / "alice" / ".popbull").read_text().strip() == "1"
    assert bench.login(b"USER alice", b"PASS secret").last.startswith(b"+OK")  # once only
    assert len(list((maildirs / "alice" / "Maildir" / "new").iterdir())) == 3


def test_deliver_new_bulletins_counts_and_keeps_the_mark(maildirs: Path, tmp_path: Path) -> None:
    bulldir = tmp_path / "bulletins"
    bulldir.mkdir()
    for n in (1, 2, 3):
        (bulldir / str(n)).write_bytes(b"From admin Mon Jan  1 00:00:00 2024\nSubject: b%d\n\nx\n" % n)
    options = Options(bulldir=str(bulldir), bulldb=True, max_bulletins=2)
    principal = static(maildirs).authenticate(UserPass("bob", b"secret"))
    assert principal is not None
    ran: list[str] = []

    def privileged(func: Callable[..., Any], *args: Any) -> Any:
        ran.append(func.__name__)
        return func(*args)

    assert deliver_new_bulletins(options, principal, privileged) == 2  # first seen: the newest max-bulletins
    assert ran == ["update"]
    assert deliver_new_bulletins(options, principal, privileged) == 0
    assert (bulldir / "bulldb").read_text() == "bob 3\n"
