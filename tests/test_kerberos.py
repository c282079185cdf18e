"""Kerberos 5 logins (qpopper -k) against a real MIT KDC in a throwaway
realm on loopback: kinit gets a ticket, then curl and a python-gssapi
client log in with SASL GSSAPI."""

from __future__ import annotations

import base64
import os
import poplib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import rawpop
from conftest import PASSWORD
from qpopper import Controller, StaticAuthenticator

REALM = "QPTEST.REALM"
Fill = Callable[[str, list[bytes]], Path]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Realm:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = _free_port()
        self.keytab = base / "pop.keytab"
        self.env = {
            **os.environ,
            "KRB5_CONFIG": str(base / "krb5.conf"),
            "KRB5_KDC_PROFILE": str(base / "kdc.conf"),
            "KRB5CCNAME": f"FILE:{base}/ccache",
        }
        (base / "krb5.conf").write_text(
            f"[libdefaults]\n default_realm = {REALM}\n"
            " dns_lookup_kdc = false\n dns_lookup_realm = false\n rdns = false\n"
            f"[realms]\n {REALM} = {{\n  kdc = 127.0.0.1:{self.port}\n }}\n"
        )
        (base / "kdc.conf").write_text(
            f"[kdcdefaults]\n kdc_ports = {self.port}\n kdc_tcp_ports = {self.port}\n"
            f"[realms]\n {REALM} = {{\n  database_name = {base}/principal\n  key_stash_file = {base}/stash\n"
            f"  acl_file = {base}/kadm5.acl\n  kdc_ports = {self.port}\n  kdc_tcp_ports = {self.port}\n }}\n"
        )
        self.run(["kdb5_util", "create", "-s", "-r", REALM, "-P", "master-password"])
        self.proc: subprocess.Popen[bytes] | None = None

    def run(self, argv: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(argv, env=self.env, input=stdin, capture_output=True, check=True, timeout=60)

    def admin(self, query: str) -> None:
        self.run(["kadmin.local", "-q", query])

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["krb5kdc", "-n"], env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            assert time.monotonic() < deadline and self.proc.poll() is None, "krb5kdc did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def realm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Realm]:
    if shutil.which("krb5kdc") is None or shutil.which("kdb5_util") is None:
        pytest.skip("the MIT KDC is not installed (Debian krb5-kdc)")
    pytest.importorskip("gssapi")
    r = Realm(tmp_path_factory.mktemp("krb"))
    r.admin("addprinc -pw alice-kerberos-pw alice")
    r.admin("addprinc -pw stranger-pw stranger")
    r.admin("addprinc -randkey pop/localhost")
    r.admin(f"ktadd -k {r.keytab} pop/localhost")
    r.start()
    r.run(["kinit", "alice"], stdin=b"alice-kerberos-pw\n")
    yield r
    r.stop()


@pytest.fixture
def kerberos_server(realm: Realm, mailroot: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Controller]:
    for key in ("KRB5_CONFIG", "KRB5CCNAME"):
        monkeypatch.setenv(key, realm.env[key])
    auth = StaticAuthenticator(
        {"alice": PASSWORD, "stranger": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir"
    )
    with Controller(authenticator=auth, kerberos=True, kerberos_keytab=str(realm.keytab)) as server:
        yield server


def test_capa_lists_gssapi(kerberos_server: Controller) -> None:
    c = poplib.POP3(kerberos_server.host, kerberos_server.port, timeout=10)
    assert c.capa()["SASL"][0] == "GSSAPI"
    c.quit()


def test_curl_logs_in_with_gssapi(kerberos_server: Controller, realm: Realm, fill: Fill) -> None:
    fill("alice", [b"Subject: kerberised\n\nhello\n"])
    out = subprocess.run(
        ["curl", "-sS", "--login-options", "AUTH=GSSAPI", "-u", f"alice@{REALM}:", f"pop3://localhost:{kerberos_server.port}/1"],
        env=realm.env,
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"Subject: kerberised\r\n\r\nhello\r\n"


def gssapi_login(server: Controller, env: dict[str, str], authzid: bytes = b"") -> poplib.POP3:
    import gssapi

    os.environ["KRB5CCNAME"] = env["KRB5CCNAME"]
    name = gssapi.Name("pop@localhost", gssapi.NameType.hostbased_service)
    ctx = gssapi.SecurityContext(name=name, usage="initiate", flags=gssapi.RequirementFlag.mutual_authentication)
    c = poplib.POP3(server.host, server.port, timeout=10)

    def send(data: bytes) -> bytes:
        rawpop.putline(c, data)
        return rawpop.getline(c)

    reply = send(b"AUTH GSSAPI " + base64.b64encode(ctx.step()))
    while not ctx.complete:
        if not reply.startswith(b"+ "):
            c.close()
            raise poplib.error_proto(reply)
        token = ctx.step(base64.b64decode(reply[2:]))
        reply = send(base64.b64encode(token or b""))
    if reply.startswith(b"+ ") and len(reply) > 2:
        offer = ctx.unwrap(base64.b64decode(reply[2:])).message
        assert offer[0] & 1  # "no security layer" is offered
        reply = send(base64.b64encode(ctx.wrap(b"\x01\x00\x00\x00" + authzid, False).message))
    elif reply == b"+ ":
        reply = send(b"")
    if not reply.startswith(b"+OK"):
        c.close()
        raise poplib.error_proto(reply)
    return c


def test_python_gssapi_client(kerberos_server: Controller, realm: Realm, fill: Fill) -> None:
    fill("alice", [b"Subject: one\n\nx\n"])
    c = gssapi_login(kerberos_server, realm.env)
    assert c.stat()[0] == 1
    c.quit()
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        gssapi_login(kerberos_server, realm.env, authzid=b"stranger")  # someone else: refused


def test_foreign_realm_principal_is_refused(realm: Realm, mailroot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("KRB5_CONFIG", "KRB5CCNAME"):
        monkeypatch.setenv(key, realm.env[key])
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    with Controller(
        authenticator=auth, kerberos=True, kerberos_keytab=str(realm.keytab), kerberos_realms="OTHER.REALM"
    ) as server, pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        gssapi_login(server, realm.env)


def test_bad_keytab_is_a_clear_startup_error(tmp_path: Path, realm: Realm, monkeypatch: pytest.MonkeyPatch) -> None:
    from qpopper.errors import ConfigError

    monkeypatch.setenv("KRB5_CONFIG", realm.env["KRB5_CONFIG"])
    with pytest.raises(ConfigError, match="Kerberos: cannot use the key of pop@localhost"):
        Controller(
            authenticator=StaticAuthenticator({}), kerberos=True, kerberos_keytab=str(tmp_path / "none.keytab")
        ).start()
