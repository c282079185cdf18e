"""The one-line messages of issue 18, each with its exit code: a certificate
without its key, a yes/no setting given a bad value, an unknown tls-version
with no certificate, popauth -list with no database, popauth with nothing
to read a secret from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trustme

QPOPPER = [sys.executable, "-m", "qpopper"]
POPAUTH = [sys.executable, "-m", "qpopper.daemon.popauth"]


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)


def test_a_certificate_without_its_key_is_named(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    trustme.CA().issue_cert("localhost").cert_chain_pems[0].write_to_path(str(cert))
    passwd = tmp_path / "passwd"
    passwd.write_text("a:{PLAIN}b\n")
    result = run([*QPOPPER, "--passwd-file", str(passwd), "--tls-server-cert-file", str(cert), "127.0.0.1:0"])
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"qpopper: {cert} has no private key (no tls-private-key-file is set and it must hold the PEM key)"
    ]
    assert "PEM lib" not in result.stderr


def test_a_bad_yes_no_value_says_yes_or_no(tmp_path: Path) -> None:
    conf = tmp_path / "qpopper.conf"
    conf.write_text("set shy = maybe\n")
    result = run([*QPOPPER, "-f", str(conf), "--show-config"])
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == (
        f"qpopper: {conf}:1: shy: expected true, false, 1 or 0 (or yes/no, on/off), not 'maybe'"
    )
    assert "expected a number" not in result.stderr


def test_an_unknown_tls_version_is_refused_without_a_certificate() -> None:
    result = run([*QPOPPER, "--tls-version=TLSv9", "--show-config"])
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == (
        "qpopper: --tls-version: tls-version must be default, TLSv1.2, TLSv1.3 (or an older qpopper name), not 'TLSv9'"
    )
    assert run([*QPOPPER, "--tls-version=SSLv3", "--show-config"]).returncode == 0  # qpopper's old names still load


def test_popauth_list_without_a_database_says_so(tmp_path: Path) -> None:
    result = run([*POPAUTH, "-file", str(tmp_path / "pop.auth"), "-list"])
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"popauth: {tmp_path / 'pop.auth'} does not exist (run popauth -init first)"]
    assert result.stdout == ""


def test_popauth_without_arguments_or_terminal_is_one_line_and_exit_2(tmp_path: Path) -> None:
    db = tmp_path / "pop.auth"
    result = run([*POPAUTH, "-file", str(db)])
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "popauth: no secret given and no terminal to ask on: give it as an argument or a line on stdin"
    ]
