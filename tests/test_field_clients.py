"""Clients as people run them, with their default settings: neomutt (GNU
SASL over GnuTLS), mpop with each of its --auth methods, fdm and curl,
over STLS and implicit TLS, against a real daemon. The account is named as
in the field report, and its password is stored {PLAIN}, so every
mechanism (SCRAM, CRAM-MD5, APOP) can be used."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from helpers import QpopperProcess, write_maildir_message

USER = "rcuser"
PASSWORD = "field-secret"
SUBJECT = "hello from the field"
MESSAGE = f"From: a@example.org\nTo: {USER}@example.org\nSubject: {SUBJECT}\n\nbody line\n.dot line\n".encode()


@dataclass
class FieldServer:
    daemon: QpopperProcess
    plain_port: int
    tls_port: int
    ca_file: Path
    maildir: Path

    def log(self) -> str:
        return self.daemon.log.read_text()


@pytest.fixture
def field_server(tmp_path: Path) -> Iterator[FieldServer]:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert = tmp_path / "server.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    maildir = tmp_path / "mail" / USER / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    write_maildir_message(maildir, MESSAGE)
    passwd = tmp_path / "passwd"
    passwd.write_text(f"{USER}:{{PLAIN}}{PASSWORD}::::{maildir.parent}::userdb_mail=maildir:{maildir}\n")
    daemon = QpopperProcess(
        tmp_path,
        [f"--passwd-file={passwd}", f"--tls-server-cert-file={cert}", "--tls-listen=127.0.0.1:0", "-d"],
    )
    deadline = time.monotonic() + 10
    while not (tls := re.search(r"listening on 127\.0\.0\.1:(\d+) \(TLS\)", daemon.log.read_text())):
        assert time.monotonic() < deadline, daemon.log.read_text()
        time.sleep(0.02)
    server = FieldServer(daemon, daemon.port, int(tls.group(1)), ca_file, maildir)
    try:
        yield server
    finally:
        log = daemon.stop()
        assert "Traceback" not in log and "internal error" not in log, log


def _wait_for_log(server: FieldServer, pattern: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, log := server.log()):
        assert time.monotonic() < deadline, f"{pattern!r} not in:\n{log}"
        time.sleep(0.05)
    return log


# ---- neomutt ------------------------------------------------------------------


def _run_neomutt(server: FieldServer, home: Path, url: str) -> tuple[str, str]:
    """neomutt in a tmux pane, configured only with what a user must say
    (where, who, the password, which CA); returns the screen and its debug log."""
    home.mkdir()
    (home / "Mail").mkdir()
    muttrc = home / "muttrc"
    muttrc.write_text(
        f"set ssl_ca_certificates_file={server.ca_file}\n"
        f"set pop_user={USER}\nset pop_pass={PASSWORD}\n"
        f"set spoolfile={url}\nset folder={home / 'Mail'}\n"
    )
    session = f"qp-neomutt-{os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, "HOME": str(home), "TERM": "xterm"}
    command = f"neomutt -n -F {muttrc} -d 5 -l {home / 'neomutt.log'}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "40", command], env=env, check=True)
    screen = ""
    try:
        deadline = time.monotonic() + 20
        while SUBJECT not in screen and time.monotonic() < deadline:
            time.sleep(0.2)
            capture = ["tmux", "capture-pane", "-p", "-t", session]
            screen = subprocess.run(capture, capture_output=True, text=True).stdout
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    debug = "".join(p.read_text(errors="replace") for p in sorted(home.glob("neomutt.log*")))
    return screen, debug


@pytest.mark.skipif(shutil.which("neomutt") is None or shutil.which("tmux") is None, reason="neomutt and tmux (Debian)")
@pytest.mark.parametrize("scheme", ["pop", "pops"])
def test_neomutt_default_configuration_logs_in(field_server: FieldServer, tmp_path: Path, scheme: str) -> None:
    port = field_server.plain_port if scheme == "pop" else field_server.tls_port
    screen, debug = _run_neomutt(field_server, tmp_path / f"home-{scheme}", f"{scheme}://127.0.0.1:{port}/")
    assert SUBJECT in screen, screen + debug[-3000:]
    if scheme == "pop":
        assert "4> STLS" in debug  # its default: upgrade or refuse
    # GNU SASL picks SCRAM from the default list and succeeds at the first try:
    # no aborted exchange, no fall-back to APOP after a failure.
    assert "using mech SCRAM-SHA-256" in debug
    assert "authentication failed" not in debug.lower() and "APOP" not in debug.split("using mech", 1)[1]
    log = _wait_for_log(field_server, rf"{USER} logged in")
    assert "Authentication" not in log


# ---- mpop ---------------------------------------------------------------------

MPOP_AUTH = ["user", "apop", "plain", "login", "cram-md5", "scram-sha-1", "scram-sha-256"]


@pytest.mark.skipif(shutil.which("mpop") is None, reason="mpop (Debian)")
@pytest.mark.parametrize("tls", ["starttls", "implicit"])
@pytest.mark.parametrize("auth", MPOP_AUTH)
def test_mpop_every_auth_method(field_server: FieldServer, tmp_path: Path, auth: str, tls: str) -> None:
    target = tmp_path / "fetched"
    for sub in ("new", "cur", "tmp"):
        (target / sub).mkdir(parents=True)
    port = field_server.plain_port if tls == "starttls" else field_server.tls_port
    result = subprocess.run(
        [
            "mpop", "--host=127.0.0.1", f"--port={port}", "--tls=on",
            f"--tls-starttls={'on' if tls == 'starttls' else 'off'}", f"--tls-trust-file={field_server.ca_file}",
            f"--auth={auth}", f"--user={USER}", f"--passwordeval=echo {PASSWORD}",
            f"--delivery=maildir,{target}", "--keep=on", "--only-new=off", "--uidls-file=" + str(tmp_path / "uidls"),
        ],
        capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    fetched = [p.read_bytes() for p in (target / "new").iterdir()]
    assert len(fetched) == 1 and fetched[0].endswith(MESSAGE.split(b"\n", 1)[1]), fetched


# ---- fdm and curl ---------------------------------------------------------------


@pytest.mark.skipif(shutil.which("fdm") is None, reason="fdm (Debian)")
@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_fdm_fetches_the_message(field_server: FieldServer, tmp_path: Path, tls: str) -> None:
    target = tmp_path / "fdm-mbox"
    conf = tmp_path / "fdm.conf"
    credentials = f'user "{USER}" pass "{PASSWORD}"'
    if tls == "starttls":
        account = f'pop3 server "127.0.0.1" port {field_server.plain_port} {credentials} starttls'
    else:
        account = f'pop3s server "127.0.0.1" port {field_server.tls_port} {credentials}'
    conf.write_text(
        # fdm's default: no certificate check (it reads no CA file we could give it)
        f'set lock-file "{tmp_path / "fdm.lock"}"\n'
        f'account "a" {account} keep\n'
        f'action "save" mbox "{target}"\n'
        'match all action "save"\n'
    )
    conf.chmod(0o600)
    env = {**os.environ, "HOME": str(tmp_path), "SSL_CERT_FILE": str(field_server.ca_file)}
    result = subprocess.run(["fdm", "-n", "-f", str(conf)], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run(
        ["fdm", "-v", "-f", str(conf), "fetch"], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert target.exists(), result.stdout + result.stderr
    assert f"Subject: {SUBJECT}".encode() in target.read_bytes()


@pytest.mark.parametrize("mechanism", [None, "PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"])
def test_curl_pop3s_with_default_and_each_mechanism(field_server: FieldServer, mechanism: str | None) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl")
    curl_features = subprocess.run(["curl", "-V"], capture_output=True, text=True).stdout
    if mechanism == "SCRAM-SHA-256" and "gsasl" not in curl_features:
        pytest.skip("this curl is built without GNU SASL, so without SCRAM (Debian 12's 7.88)")
    args = ["curl", "-sS", "--cacert", str(field_server.ca_file), "-u", f"{USER}:{PASSWORD}"]
    if mechanism is not None:
        args += ["--login-options", f"AUTH={mechanism}"]
    result = subprocess.run(
        [*args, f"pop3s://127.0.0.1:{field_server.tls_port}/1"], capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert f"Subject: {SUBJECT}".encode() in result.stdout
