"""What the TLS side offers and how it reports a peer's TLS failure.

The suite scan asks for each TLS 1.2 suite OpenSSL knows, one handshake
per suite (as `openssl s_client -cipher` would), and checks that only
forward-secret AEAD suites are accepted by default; sslscan, where it is
installed (.ci/run installs it), is asked the same. The failure tests run
the real daemon, with and without uvloop, and read its log."""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from helpers import QpopperProcess
from qpopper import Controller, ListenAddress, StaticAuthenticator

AEAD_ECDHE = re.compile(r"^ECDHE-(RSA|ECDSA)-(AES(128|256)-GCM-SHA(256|384)|CHACHA20-POLY1305)$")


@pytest.fixture
def cert_files(tmp_path: Path) -> tuple[Path, Path]:
    ca = trustme.CA(key_type=trustme.KeyType.RSA)  # the RSA suites are the ones every scanner lists
    pem = tmp_path / "server.pem"
    leaf = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
    leaf.private_key_and_cert_chain_pem.write_to_path(str(pem))
    other_ca = tmp_path / "other-ca.pem"  # a CA that did not sign our certificate
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    return pem, other_ca


def _implicit_server(tmp_path: Path, pem: Path, **options: Any) -> Controller:
    auth = StaticAuthenticator({}, mail_location=f"maildir:{tmp_path}/%u/Maildir")
    implicit_tls = (ListenAddress("127.0.0.1", 0, tls=True),)
    return Controller(authenticator=auth, listen=implicit_tls, tls_cert_file=str(pem), **options)


def _tls12_suites() -> list[str]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    return sorted({c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"})


def _accepted(port: int, suites: list[str]) -> list[str]:
    accepted = []
    for name in suites:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(f"{name}:@SECLEVEL=0")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
                cipher = tls.cipher()
                assert cipher is not None  # set once the handshake is done
                accepted.append(cipher[0])
        except (ssl.SSLError, ConnectionError):
            continue
    return accepted


def test_tls12_offers_only_forward_secret_aead_suites(tmp_path: Path, cert_files: tuple[Path, Path]) -> None:
    suites = _tls12_suites()
    assert "ECDHE-RSA-AES256-SHA384" in suites and len(suites) > 20  # the scan really asks for the CBC ones
    with _implicit_server(tmp_path, cert_files[0]) as server:
        accepted = _accepted(server.port, suites)
    offered = {"ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305"}
    assert offered <= set(accepted)
    assert all(AEAD_ECDHE.match(name) for name in accepted), accepted


def test_tls_cipher_list_overrides_the_default(tmp_path: Path, cert_files: tuple[Path, Path]) -> None:
    with _implicit_server(tmp_path, cert_files[0], tls_cipher_list="ECDHE-RSA-AES128-SHA256") as server:
        assert _accepted(server.port, _tls12_suites()) == ["ECDHE-RSA-AES128-SHA256"]


@pytest.mark.skipif(shutil.which("sslscan") is None, reason="sslscan (Debian)")
def test_sslscan_sees_no_cbc_suite(tmp_path: Path, cert_files: tuple[Path, Path]) -> None:
    with _implicit_server(tmp_path, cert_files[0]) as server:
        out = subprocess.run(
            ["sslscan", "--no-colour", "--no-heartbleed", "--no-renegotiation", f"127.0.0.1:{server.port}"],
            capture_output=True, text=True, timeout=120,
        ).stdout  # fmt: skip
    offered = re.findall(r"^(?:Preferred|Accepted)\s+(TLSv1\.[0-3])\s+\d+ bits\s+(\S+)", out, re.M)
    assert offered, out
    assert not any(version in ("TLSv1.0", "TLSv1.1") for version, _ in offered), out
    tls12 = [name for version, name in offered if version == "TLSv1.2"]
    assert tls12 and all(AEAD_ECDHE.match(name) for name in tls12), out


# ---- a peer's TLS failure is an ordinary disconnect, logged with its reason --------


@pytest.fixture(params=["uvloop", "asyncio"])
def tls_daemon(
    request: pytest.FixtureRequest, tmp_path: Path, cert_files: tuple[Path, Path]
) -> Iterator[tuple[QpopperProcess, int, Path]]:
    passwd = tmp_path / "passwd"
    passwd.write_text(f"alice:{{PLAIN}}pw::::{tmp_path}/alice::userdb_mail=maildir:{tmp_path}/alice/Maildir\n")
    loop = [] if request.param == "uvloop" else ["--no-use-uvloop"]
    daemon = QpopperProcess(
        tmp_path,
        [f"--passwd-file={passwd}", f"--tls-server-cert-file={cert_files[0]}", "--tls-listen=127.0.0.1:0", *loop],
    )
    deadline = time.monotonic() + 10
    while not (found := re.search(r"listening on 127\.0\.0\.1:(\d+) \(TLS\)", daemon.log.read_text())):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    try:
        yield daemon, int(found.group(1)), cert_files[1]
    finally:
        daemon.stop()


def _wait_for(daemon: QpopperProcess, pattern: str) -> str:
    deadline = time.monotonic() + 10
    while not re.search(pattern, text := daemon.log.read_text()):
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
    return text


def _renegotiate(*connect: str) -> None:
    """openssl's `R` asks for a renegotiation, which the server refuses with an alert."""
    subprocess.run(
        f"(sleep 1; printf 'R\\n'; sleep 2) | openssl s_client {' '.join(connect)} -tls1_2 -no_ign_eof -crlf",
        shell=True, capture_output=True, timeout=30,
    )  # fmt: skip


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl")
def test_alert_after_the_handshake_is_one_info_line(tls_daemon: tuple[QpopperProcess, int, Path]) -> None:
    daemon, tls_port, _ = tls_daemon
    _renegotiate("-connect", f"127.0.0.1:{tls_port}")
    _renegotiate("-connect", f"127.0.0.1:{daemon.port}", "-starttls", "pop3")
    text = _wait_for(daemon, r"(?s)TLS error, connection closed: \S.*TLS error, connection closed: \S")
    assert re.search(
        r"INFO qpopper.session: 127\.0\.0\.1:\d+: TLS error, connection closed: sslv3 alert handshake failure", text
    )
    assert "Traceback" not in text and "internal error" not in text and "ERROR" not in text, text


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl")
def test_implicit_tls_handshake_failure_is_logged_with_its_reason(tls_daemon: tuple[QpopperProcess, int, Path]) -> None:
    daemon, tls_port, other_ca = tls_daemon
    # A client that does not trust our certificate aborts the handshake with an alert.
    subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{tls_port}", "-verify_return_error", "-CAfile", str(other_ca)],
        input=b"", capture_output=True, timeout=30,
    )  # fmt: skip
    text = _wait_for(daemon, r"TLS handshake failed")
    assert re.search(
        r"INFO qpopper.server: 127\.0\.0\.1:\d+: TLS handshake failed: tlsv1 alert (unknown ca|bad certificate)", text
    ), text
    assert "Traceback" not in text, text
    # The listener goes on serving.
    ctx = ssl.create_default_context(cafile=None)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        assert tls.recv(100).startswith(b"+OK")
