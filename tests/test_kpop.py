"""KPOP (qpopper -k): the Kerberos 5 exchange before the greeting, then
USER/PASS as the principal, with Debian's fetchmail (`--auth kerberos_v5`,
which speaks krb5_sendauth) against a real MIT KDC in a throwaway realm
(the one tests/test_kerberos.py starts) and a real daemon.

Bad input, garbage, a client that stalls, a principal that may not be the
user: each ends the connection (or the login) with a log line, never a
crash of the daemon, which then still serves the next client."""

from __future__ import annotations

import concurrent.futures
import os
import random
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import QPOPPER, TEST_DAEMON_ARGS, QpopperProcess, write_maildir_message
from qpopper.auth.kpop import (
    APPL_VERSION,
    BAD_APPL_VERSION,
    SENDAUTH_VERSION,
    VERSIONS_OK,
    KpopError,
    length_prefixed,
    may_log_in,
    opening_problem,
    recvauth,
)
from test_kerberos import REALM, Realm

FETCH_TIMEOUT = 90

pytestmark = pytest.mark.skipif(shutil.which("krb5kdc") is None, reason="needs the MIT KDC (Debian krb5-kdc)")


# fetchmail speaks KPOP only to port 1109 (it sends "PASS krb_ticket" there,
# and nothing on any other port), so each test run takes an address of its
# own on the loopback network for its port 1109, and a service key for it.
HOST = "127.{}.{}.{}".format(*random.Random().randbytes(3))
KPOP_PORT = 1109


@pytest.fixture(scope="module")
def realm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Realm]:
    r = Realm(tmp_path_factory.mktemp("kpop-realm"))
    r.admin("addprinc -pw alice-kerberos-pw alice")
    r.admin("addprinc -pw stranger-pw stranger")
    r.admin("addprinc -pw admin-pw alice/admin")
    r.admin(f"addprinc -randkey pop/{HOST}")
    r.admin(f"ktadd -k {r.keytab} pop/{HOST}")
    r.start()
    yield r
    r.stop()


class Client:
    """A user's ticket cache (kinit), and fetchmail run with it."""

    def __init__(self, realm: Realm, base: Path, principal: str, password: str) -> None:
        base.mkdir()
        self.base = base
        self.env = {**realm.env, "KRB5CCNAME": f"FILE:{base}/ccache", "HOME": str(base), "FETCHMAILHOME": str(base)}
        subprocess.run(["kinit", principal], input=password.encode() + b"\n", env=self.env,
                       capture_output=True, check=True, timeout=60)
        self.mbox = base / "fetched.mbox"

    def fetchmail(
        self, user: str, how: str = 'protocol pop3 service "kpop" auth kerberos_v5'
    ) -> subprocess.CompletedProcess[str]:
        """fetchmail in a mount namespace of its own whose /etc/services
        names "kpop" (Debian 12's no longer does, and fetchmail sends its
        dummy PASS only to the service called so)."""
        rc = self.base / "fetchmailrc"
        services = self.base / "services"
        services.write_text(Path("/etc/services").read_text() + "kpop\t\t1109/tcp\n")
        rc.write_text(
            "set no syslog\n"
            f'set idfile "{self.base}/fetchids"\n'
            f"poll {HOST} {how} timeout 20\n"
            f'  user "{user}" is "{os.environ.get("USER", "root")}" here\n'
            "  keep sslproto ''\n"
            f"  mda \"/bin/sh -c 'cat >> {self.mbox}'\"\n"
        )
        rc.chmod(0o600)
        unshare = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount"]
        script = 'mount --bind "$0" /etc/services && exec fetchmail --nodetach -v -f "$1"'
        return subprocess.run([*unshare, "--", "sh", "-c", script, str(services), str(rc)], env=self.env,
                              capture_output=True, text=True, timeout=FETCH_TIMEOUT)


@pytest.fixture(scope="module")
def alice(realm: Realm, tmp_path_factory: pytest.TempPathFactory) -> Client:
    return Client(realm, tmp_path_factory.mktemp("alice") / "c", "alice", "alice-kerberos-pw")


@pytest.fixture
def daemon(realm: Realm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[QpopperProcess]:
    """qpopper -k with a KPOP listener, users alice and stranger in a passwd-file."""
    for key in ("KRB5_CONFIG", "KRB5_KDC_PROFILE"):
        monkeypatch.setenv(key, realm.env[key])
    monkeypatch.setenv("KRB5RCACHEDIR", str(tmp_path))  # the replay cache stays in the test's directory
    mail = tmp_path / "mail"
    passwd = tmp_path / "passwd"
    passwd.write_text(
        f"alice:{{PLAIN}}not-the-kerberos-pw::::::userdb_mail=maildir:{mail}/alice\n"
        f"stranger:{{PLAIN}}x::::::userdb_mail=maildir:{mail}/stranger\n"
    )
    write_maildir_message(mail / "alice", b"Subject: over KPOP\n\nhello through Kerberos\n")
    d = QpopperProcess(tmp_path, [
        f"--passwd-file={passwd}", "-k", f"--kerberos-keytab={realm.keytab}", f"--hostname={HOST}",
        f"--kpop-listen={HOST}", "--login-timeout=3", "--workers=2",
    ])  # fmt: skip
    yield d
    d.stop()


def _wait_for_log(d: QpopperProcess, text: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = d.log.read_text()
        if text in log:
            return log
        assert time.monotonic() < deadline, f"no {text!r} in:\n{log}"
        time.sleep(0.05)


def _greets(port: int) -> bool:
    """A plain POP client on the KPOP port gets no greeting (KPOP first);
    this asks the ordinary listener instead, to show the daemon is alive."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return s.recv(100).startswith(b"+OK")


# ---- the real client ----------------------------------------------------------


needs_fetchmail = pytest.mark.skipif(shutil.which("fetchmail") is None, reason="needs Debian's fetchmail")


@needs_fetchmail
@pytest.mark.parametrize("how", ['protocol pop3 service "kpop" auth kerberos_v5', "protocol KPOP auth kerberos_v5"])
def test_fetchmail_fetches_over_kpop(daemon: QpopperProcess, alice: Client, how: str) -> None:
    """`--auth kerberos_v5` on the kpop service, and `--protocol KPOP`
    (fetchmail's name for POP3 on that service): the Kerberos exchange,
    then USER alice / PASS krb_ticket, which is not alice's password."""
    out = alice.fetchmail("alice", how)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASS krb_ticket" in out.stdout  # a dummy: the ticket proved who it is
    fetched = alice.mbox.read_bytes()
    assert b"Subject: over KPOP" in fetched and b"hello through Kerberos" in fetched
    log = _wait_for_log(daemon, "alice quit")
    assert "KPOP refused" not in log and "KPOP authentication failed" not in log


@needs_fetchmail
def test_principal_of_another_user_is_refused(daemon: QpopperProcess, alice: Client) -> None:
    d = daemon
    out = alice.fetchmail("stranger")  # alice's ticket, stranger's mailbox
    assert out.returncode != 0
    assert "-ERR [AUTH]" in out.stdout + out.stderr
    _wait_for_log(d, "KPOP principal alice@QPTEST.REALM may not log in as stranger")


@needs_fetchmail
def test_principal_with_an_instance_is_refused(
    daemon: QpopperProcess, realm: Realm, tmp_path: Path
) -> None:
    d = daemon
    admin = Client(realm, tmp_path / "admin", "alice/admin", "admin-pw")
    out = admin.fetchmail("alice")
    assert out.returncode != 0
    _wait_for_log(d, "KPOP principal alice/admin@QPTEST.REALM may not log in as alice")


# ---- bad input: closed with a log line, the daemon serves on -------------------


def test_garbage_instead_of_kerberos_is_closed_with_a_log_line(daemon: QpopperProcess) -> None:
    d = daemon
    with socket.create_connection((HOST, KPOP_PORT), timeout=10) as s:
        s.sendall(b"USER alice\r\nPASS secret\r\n")  # a POP client on the KPOP port: a 1.4 GB "length"
        assert _closed(s)  # nothing sent
    _wait_for_log(d, "KPOP refused: not a Kerberos exchange")
    assert _greets(d.port)


def test_wrong_versions_get_krb5s_answer_byte(daemon: QpopperProcess) -> None:
    d = daemon
    with socket.create_connection((HOST, KPOP_PORT), timeout=10) as s:
        s.sendall(length_prefixed(SENDAUTH_VERSION) + length_prefixed(b"IMAPV1.0\0"))
        assert s.recv(10) == BAD_APPL_VERSION
        assert _closed(s)
    _wait_for_log(d, "KPOP refused: not a KPOP client")


def test_garbage_ap_req_is_refused_by_libkrb5(daemon: QpopperProcess) -> None:
    d = daemon
    with socket.create_connection((HOST, KPOP_PORT), timeout=10) as s:
        s.sendall(length_prefixed(SENDAUTH_VERSION) + length_prefixed(APPL_VERSION))
        assert s.recv(1) == VERSIONS_OK
        s.sendall(length_prefixed(os.urandom(300)))
        (length,) = struct.unpack(">I", _recv_exactly(s, 4))
        assert 0 < length < 4096  # a KRB-ERROR, written by krb5_recvauth
        _recv_exactly(s, length)
        assert _closed(s)
    _wait_for_log(d, "KPOP authentication failed")
    assert _greets(d.port)


def test_a_client_that_stalls_is_closed_at_the_deadline(daemon: QpopperProcess) -> None:
    d = daemon
    with socket.create_connection((HOST, KPOP_PORT), timeout=30) as s:
        s.sendall(length_prefixed(SENDAUTH_VERSION)[:10])  # then nothing
        assert _closed(s)  # by the server (login-timeout 3 s), not by our timeout
    _wait_for_log(d, "KPOP exchange not finished in 3 s")
    assert _greets(d.port)


def test_a_stop_ends_an_exchange_under_way(daemon: QpopperProcess) -> None:
    with socket.create_connection((HOST, KPOP_PORT), timeout=30) as s:
        s.sendall(length_prefixed(SENDAUTH_VERSION) + length_prefixed(APPL_VERSION))
        assert s.recv(1) == VERSIONS_OK  # the exchange is waiting for the AP-REQ
        log = daemon.stop()  # SIGTERM: the daemon ends without waiting for this client
        assert _closed(s)
    assert daemon.proc.returncode == 0
    assert "Traceback" not in log


def test_an_oversized_ap_req_is_refused_unread(daemon: QpopperProcess) -> None:
    d = daemon
    with socket.create_connection((HOST, KPOP_PORT), timeout=10) as s:
        s.sendall(length_prefixed(SENDAUTH_VERSION) + length_prefixed(APPL_VERSION))
        assert s.recv(1) == VERSIONS_OK
        s.sendall(struct.pack(">I", 0x7FFFFFFF))
        assert _closed(s)
    _wait_for_log(d, "an AP-REQ of 2147483647 octets")


def test_a_plain_pop_client_on_the_kpop_port_and_many_hang_ups(daemon: QpopperProcess) -> None:
    """Bounded: one connection cut at each point of the opening (36)."""
    d = daemon
    opening = length_prefixed(SENDAUTH_VERSION) + length_prefixed(APPL_VERSION)
    for cut in range(len(opening)):
        with socket.create_connection((HOST, KPOP_PORT), timeout=10) as s:
            s.sendall(opening[:cut])
    assert _greets(d.port)
    assert d.proc.poll() is None
    assert "Traceback" not in d.log.read_text()


# ---- the pieces, without a daemon --------------------------------------------------


def test_opening_problem_matches_sendauths_answers() -> None:
    assert opening_problem(SENDAUTH_VERSION, APPL_VERSION) is None
    assert opening_problem(b"KRB5_SENDAUTH_V1.0", APPL_VERSION) == b"\x01"  # no NUL: not what MIT sends
    assert opening_problem(SENDAUTH_VERSION, b"KPOPV0.1\0") == BAD_APPL_VERSION


def test_recvauth_on_truncated_input_is_an_error_not_a_crash(realm: Realm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KRB5_CONFIG", realm.env["KRB5_CONFIG"])
    opening = length_prefixed(SENDAUTH_VERSION) + length_prefixed(APPL_VERSION)
    for tail in (b"", struct.pack(">I", 50) + b"short", length_prefixed(b"\x6e\x82\xff\xff")):
        identity, _, reason = recvauth(opening + tail, "pop", "localhost", str(realm.keytab))
        assert identity is None and reason
    identity, _, reason = recvauth(opening + length_prefixed(b"x"), "pop", "localhost", "/nonexistent/dir/keytab")
    assert identity is None and reason
    with pytest.raises(KpopError, match="cannot parse the principal"):
        may_log_in("alice@ONE@TWO", "alice")


def test_may_log_in_follows_qpopper(realm: Realm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KRB5_CONFIG", realm.env["KRB5_CONFIG"])
    assert may_log_in(f"alice@{REALM}", "alice")
    assert not may_log_in(f"alice@{REALM}", "stranger")
    assert not may_log_in(f"alice/admin@{REALM}", "alice")  # an instance: never
    assert not may_log_in("alice@OTHER.REALM", "alice")  # kuserok: only the default realm maps
    assert may_log_in("alice@OTHER.REALM", "alice", realms=("OTHER.REALM",))
    assert not may_log_in(f"alice@{REALM}", "alice", realms=("OTHER.REALM",))


def _recv_exactly(s: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = s.recv(count - len(data))
        assert chunk, "closed early"
        data += chunk
    return data


def _closed(s: socket.socket) -> bool:
    """The server closed the connection: end of stream, or a reset when it
    left our bytes unread (both are a close without a reply)."""
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


@needs_fetchmail
def test_inetd_kpop_line_needs_no_flag(realm: Realm, alice: Client, tmp_path: Path) -> None:
    """qpopper's own inetd.conf line, `kpop stream tcp nowait root popper popper -k`:
    a connection inetd accepted on port 1109 starts with KPOP."""
    mail = tmp_path / "mail"
    passwd = tmp_path / "passwd"
    passwd.write_text(f"alice:{{PLAIN}}x::::::userdb_mail=maildir:{mail}/alice\n")
    write_maildir_message(mail / "alice", b"Subject: from inetd\n\nkpop by inetd\n")
    env = {**os.environ, "KRB5_CONFIG": realm.env["KRB5_CONFIG"], "KRB5RCACHEDIR": str(tmp_path)}
    # inetd's part: listen, accept, hand the connection over as stdin and stdout.
    with socket.create_server((HOST, KPOP_PORT)) as listener, concurrent.futures.ThreadPoolExecutor(1) as pool:
        fetched = pool.submit(alice.fetchmail, "alice")
        listener.settimeout(30)
        conn, _ = listener.accept()
        with conn:
            daemon = subprocess.run(
                [*QPOPPER, *TEST_DAEMON_ARGS, "-k", f"--kerberos-keytab={realm.keytab}", f"--hostname={HOST}",
                 f"--passwd-file={passwd}"],
                stdin=conn.fileno(), stdout=conn.fileno(), stderr=subprocess.PIPE, env=env, timeout=FETCH_TIMEOUT,
            )  # fmt: skip
        out = fetched.result(timeout=FETCH_TIMEOUT)
    assert out.returncode == 0, out.stdout + out.stderr + daemon.stderr.decode()
    assert b"kpop by inetd" in alice.mbox.read_bytes()


@needs_fetchmail
@pytest.mark.skipif(os.geteuid() != 0, reason="Unix accounts and a forking daemon need root")
def test_unix_accounts_follow_krb5_kuserok_and_k5login(
    realm: Realm, alice: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """System users (a process per session, qpopper's model): krb5_kuserok
    decides, so the account's ~/.k5login may let alice@REALM in, and an
    account without one is not alice's."""
    from test_system_users import REPO, _make_account, procmail_deliver

    if shutil.which("useradd") is None or shutil.which("procmail") is None:
        pytest.skip("needs useradd and procmail")
    base = 24000 + random.randrange(0, 900)
    shared, other = _make_account("k", base), _make_account("k", base + 1)
    pam = Path("/etc/pam.d") / f"qpopper-kpop-{base}"
    shutil.copy(REPO / "packaging" / "pam.d" / "pop3", pam)
    d = None
    try:
        (shared.home / ".k5login").write_text(f"alice@{REALM}\n")
        os.chown(shared.home / ".k5login", shared.uid, shared.gid)
        procmail_deliver(shared, "for the shared account")
        monkeypatch.setenv("KRB5_CONFIG", realm.env["KRB5_CONFIG"])
        monkeypatch.setenv("KRB5RCACHEDIR", str(tmp_path))
        d = QpopperProcess(tmp_path, [
            "-k", f"--kerberos-keytab={realm.keytab}", f"--hostname={HOST}", f"--kpop-listen={HOST}",
            f"--pam-service={pam.name}", "--min-uid=1000",
        ])  # fmt: skip
        out = alice.fetchmail(shared.name)
        assert out.returncode == 0, out.stdout + out.stderr
        assert b"for the shared account" in alice.mbox.read_bytes()
        out = alice.fetchmail(other.name)
        assert out.returncode != 0 and "-ERR [AUTH]" in out.stdout
        _wait_for_log(d, f"KPOP principal alice@{REALM} may not log in as {other.name}")
    finally:
        if d is not None:
            d.stop()
        pam.unlink(missing_ok=True)
        for account in (shared, other):
            subprocess.run(["userdel", "-r", account.name], capture_output=True)
            Path(f"/var/mail/{account.name}").unlink(missing_ok=True)
