"""After-login integrations: DRAC through a real rpcbind to an RPC server
written from DRAC's protocol definition, and the generic hook."""

from __future__ import annotations

import os
import poplib
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import PASSWORD
from qpopper import Controller, StaticAuthenticator
from qpopper.extensions.drac import (
    DRAC_PROGRAM,
    DRAC_VERSION,
    DRACPROC_ADD,
    PMAP_PORT,
    PMAP_PROGRAM,
    PMAP_VERSION,
    RpcError,
    call_message,
    drac_add,
    parse_reply,
    rpc_call,
)

PMAPPROC_SET = 1
PMAPPROC_UNSET = 2


class DracDaemon:
    """A DRAC server: answers DRACPROC_ADD, records the addresses, and
    registers itself with the portmapper like rpc.dracd does."""

    def __init__(self, status: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.status = status
        self.added: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._stop = False

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                data, peer = self.sock.recvfrom(8192)
            except TimeoutError:
                continue
            except OSError:
                return
            xid, _mtype, _rpcvers, prog, vers, proc = struct.unpack(">IIIIII", data[:24])
            offset = 24
            for _ in range(2):  # credentials, verifier
                _flavor, length = struct.unpack(">II", data[offset : offset + 8])
                offset += 8 + ((length + 3) & ~3)
            accept = 0 if (prog, vers, proc) == (DRAC_PROGRAM, DRAC_VERSION, DRACPROC_ADD) else 3
            result = b""
            if accept == 0:
                (address,) = struct.unpack(">I", data[offset : offset + 4])
                self.added.append(socket.inet_ntoa(struct.pack(">I", address)))
                result = struct.pack(">I", self.status)
            reply = struct.pack(">IIIIII", xid, 1, 0, 0, 0, accept) + result
            self.sock.sendto(reply, peer)

    def register(self) -> None:
        args = struct.pack(">IIII", DRAC_PROGRAM, DRAC_VERSION, 17, self.port)
        reply = rpc_call("127.0.0.1", PMAP_PORT, PMAP_PROGRAM, PMAP_VERSION, PMAPPROC_SET, args, 5)
        assert reply == struct.pack(">I", 1)

    def start(self) -> None:
        self._thread.start()
        self.register()

    def stop(self) -> None:
        args = struct.pack(">IIII", DRAC_PROGRAM, DRAC_VERSION, 17, self.port)
        try:
            rpc_call("127.0.0.1", PMAP_PORT, PMAP_PROGRAM, PMAP_VERSION, PMAPPROC_UNSET, args, 5)
        except (OSError, RpcError):
            pass
        self._stop = True
        self._thread.join()
        self.sock.close()


def _rpcbind_answers() -> bool:
    try:
        rpc_call("127.0.0.1", PMAP_PORT, PMAP_PROGRAM, PMAP_VERSION, 0, b"", 1)
        return True
    except (OSError, RpcError):
        return False


@pytest.fixture(scope="module")
def rpcbind() -> Iterator[None]:
    """The real portmapper: the one running, or one started for the tests."""
    if _rpcbind_answers():
        yield
        return
    binary = shutil.which("rpcbind") or "/usr/sbin/rpcbind"
    if not os.path.exists(binary) or os.geteuid() != 0:
        pytest.skip("rpcbind is not installed or we are not root")
    os.makedirs("/run/rpcbind", exist_ok=True)
    proc = subprocess.Popen([binary, "-f", "-w"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not _rpcbind_answers():
        assert time.monotonic() < deadline and proc.poll() is None, "rpcbind did not start"
        time.sleep(0.05)
    yield
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def drac(rpcbind: None) -> Iterator[DracDaemon]:
    daemon = DracDaemon()
    daemon.start()
    yield daemon
    daemon.stop()


def test_rpc_message_format() -> None:
    message = call_message(0x01020304, DRAC_PROGRAM, DRAC_VERSION, DRACPROC_ADD, struct.pack(">I", 0x7F000001))
    assert message == bytes.fromhex(
        "01020304 00000000 00000002 000dbc05 00000001 00000001 00000000 00000000 00000000 00000000 7f000001"
    )
    reply = struct.pack(">IIIIII", 7, 1, 0, 0, 0, 0) + struct.pack(">I", 0)
    assert parse_reply(7, reply) == struct.pack(">I", 0)
    with pytest.raises(RpcError):
        parse_reply(7, struct.pack(">III", 7, 1, 1))


def test_drac_add_through_rpcbind(drac: DracDaemon) -> None:
    assert drac_add("127.0.0.1", "192.0.2.7") == "success"
    assert drac.added == ["192.0.2.7"]
    with pytest.raises(RpcError):
        drac_add("127.0.0.1", "2001:db8::1")


def test_login_registers_the_client_with_drac(drac: DracDaemon, mailroot: Path) -> None:
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    with Controller(authenticator=auth, drac_host="127.0.0.1") as server:
        c = poplib.POP3(server.host, server.port, timeout=10)
        c.user("alice")
        c.pass_(PASSWORD)
        c.quit()
        deadline = time.monotonic() + 10
        while not drac.added:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert drac.added == ["127.0.0.1"]


def test_unreachable_drac_never_fails_or_delays_a_login(mailroot: Path, caplog: pytest.LogCaptureFixture) -> None:
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    # 192.0.2.1 (TEST-NET-1) is never answered... but the rules here allow only
    # loopback targets, so use a loopback port where nothing listens.
    with Controller(authenticator=auth, drac_host="127.0.0.9") as server:
        started = time.monotonic()
        c = poplib.POP3(server.host, server.port, timeout=10)
        c.user("alice")
        assert c.pass_(PASSWORD).startswith(b"+OK")
        assert c.stat() == (0, 0)
        login_time = time.monotonic() - started
        c.quit()
    assert login_time < 5  # the RPC retries ran beside the session


def test_post_login_command_and_file(tmp_path: Path, mailroot: Path) -> None:
    record = tmp_path / "hook.txt"
    script = tmp_path / "hook"
    script.write_text(
        f"#!{sys.executable}\nimport sys\nopen({str(record)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
    )
    script.chmod(0o755)
    logfile = tmp_path / "logins.txt"
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    with Controller(authenticator=auth, post_login_command=str(script), post_login_file=str(logfile)) as server:
        for _ in range(3):
            c = poplib.POP3(server.host, server.port, timeout=10)
            c.user("alice")
            c.pass_(PASSWORD)
            c.quit()
        c = poplib.POP3(server.host, server.port, timeout=10)
        c.user("alice")
        with pytest.raises(poplib.error_proto):
            c.pass_("wrong")  # failed logins run no hook
        c.quit()
        deadline = time.monotonic() + 10
        while not record.exists() or record.read_text().count("\n") < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    lines = logfile.read_text().splitlines()
    assert len(lines) == 3
    for line in lines:
        when, user, address = line.split()
        assert user == "alice" and address == "127.0.0.1" and abs(int(when) - time.time()) < 60
    calls = record.read_text().splitlines()
    assert len(calls) == 3 and all(c.startswith("alice 127.0.0.1 ") for c in calls)
