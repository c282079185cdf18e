"""`qpopper --check-config` on real files: passwd-file lines that can never log in,
certificates without keys, TLS without a certificate, addresses in use, bad usage."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import trustme
from passlib.hash import sha512_crypt

QPOPPER = [sys.executable, "-m", "qpopper"]


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*QPOPPER, "--check-config", *args], capture_output=True, text=True, timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def virtual(tmp_path: Path, passwd_lines: list[str], *extra: str) -> list[str]:
    passwd = tmp_path / "passwd"
    passwd.write_text("\n".join(passwd_lines) + "\n")
    return ["--passwd-file", str(passwd), "--mail-location", f"maildir:{tmp_path}/%u", *extra,
            f"127.0.0.1:{free_port()}"]  # fmt: skip


def test_a_good_configuration_passes_with_exit_0(tmp_path: Path) -> None:
    good = sha512_crypt.using(rounds=5000).hash("secret")
    result = check(*virtual(tmp_path, ["# users", f"alice:{{SHA512-CRYPT}}{good}", "bob:{PLAIN}pw"]))
    assert result.returncode == 0, result.stderr
    assert "0 error(s), 0 warning(s)" in result.stdout


def test_every_bad_passwd_line_is_named_by_file_and_line(tmp_path: Path) -> None:
    lines = [
        "alice:{PLAIN}one",
        "nocolonsatall",
        "alice:{PLAIN}two",
        "carol:secret",
        "dave:{SHA512-CRYPT}$6$salt$tooshort",
        "erin:{NOPE}x",
    ]
    result = check(*virtual(tmp_path, lines))
    assert result.returncode == 1
    path = tmp_path / "passwd"
    out = result.stderr.splitlines()
    assert any(f"{path}:2: error: no ':'" in line for line in out), out
    assert any(f"{path}:3: warning: user alice is already defined at line 1" in line for line in out), out
    assert any(f"{path}:4: error: the password of carol has no {{SCHEME}}" in line for line in out), out
    assert any(f"{path}:5: error: malformed {{SHA512-CRYPT}} hash for dave" in line for line in out), out
    assert any(f"{path}:6: error: unsupported password scheme {{NOPE}}" in line for line in out), out
    assert "4 error(s), 1 warning(s)" in out[-1]
    assert "Traceback" not in result.stderr


def test_warnings_only_exit_0(tmp_path: Path) -> None:
    result = check(*virtual(tmp_path, ["alice:{PLAIN}one", "alice:{PLAIN}two"]))
    assert result.returncode == 0, result.stderr
    assert "warning: user alice is already defined" in result.stdout


def test_a_missing_passwd_file_is_an_error(tmp_path: Path) -> None:
    result = check("--passwd-file", str(tmp_path / "absent"), f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert f"{tmp_path / 'absent'}: error: cannot read passwd-file: No such file or directory" in result.stderr


def test_tls_without_a_certificate_is_an_error(tmp_path: Path) -> None:
    result = check(*virtual(tmp_path, ["a:{PLAIN}b"]), f"--tls-listen=127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "TLS is enabled but no certificate is configured" in result.stderr


def test_a_certificate_without_its_key_and_a_mismatched_key(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    other = ca.issue_cert("other")
    cert_only = tmp_path / "cert.pem"
    cert_only.write_bytes(cert.cert_chain_pems[0].bytes())
    result = check(*virtual(tmp_path, ["a:{PLAIN}b"]), "--tls-server-cert-file", str(cert_only))
    assert result.returncode == 1
    assert f"{cert_only} has no private key" in result.stderr, result.stderr
    wrong_key = tmp_path / "other.key"
    wrong_key.write_bytes(other.private_key_pem.bytes())
    result = check(*virtual(tmp_path, ["a:{PLAIN}b"]), "--tls-server-cert-file", str(cert_only),
                   "--tls-private-key-file", str(wrong_key))  # fmt: skip
    assert result.returncode == 1
    assert "does not match the certificate" in result.stderr


def test_a_bad_tls_version_is_an_error_without_a_certificate(tmp_path: Path) -> None:
    conf = tmp_path / "qpopper.conf"
    conf.write_text("set tls-version = TLSv9\n")
    result = check("-f", str(conf), *virtual(tmp_path, ["a:{PLAIN}b"]))
    assert result.returncode == 1
    assert f"{conf}:1: tls-version must be default, TLSv1.2, TLSv1.3" in result.stderr
    assert check("--tls-version=TLSv9").returncode == 2  # on the command line: bad usage


def test_an_address_in_use_is_named(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        passwd = tmp_path / "passwd"
        passwd.write_text("a:{PLAIN}b\n")
        result = check("--passwd-file", str(passwd), f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert f"error: cannot bind 127.0.0.1:{port}: Address already in use" in result.stderr


def test_a_config_file_error_is_exit_1_and_bad_usage_exit_2(tmp_path: Path) -> None:
    conf = tmp_path / "qpopper.conf"
    conf.write_text("set timeout = 600\nset no-such-thing = 1\n")
    result = check("-f", str(conf))
    assert result.returncode == 1
    assert f"{conf}:2" in result.stderr
    result = check("--no-such-switch")
    assert result.returncode == 2
    assert result.stderr.startswith("qpopper: option --no-such-switch not recognized")


def test_every_config_file_error_is_reported_included_files_too(tmp_path: Path) -> None:
    included = tmp_path / "more.conf"
    included.write_text("set shy\nset not-an-option-either = 0\n")
    conf = tmp_path / "qpopper.conf"
    conf.write_text(
        f"set timeout = 600\nset no-such-thing = 1\nset timeout = abc\nwhat is this\nset config-file = {included}\n"
    )
    result = check(f"-f{conf}", *virtual(tmp_path, ["alice:{PLAIN}pw::::::"]))
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert [line.split(": error: ")[1].split(": ")[0] for line in lines] == [
        f"{conf}:2", f"{conf}:3", f"{conf}:4", f"{included}:2",
    ], result.stderr


def test_the_daemon_logs_the_same_warnings_at_start_up(tmp_path: Path) -> None:
    args = virtual(tmp_path, ["alice:{PLAIN}one", "alice:{PLAIN}two"])
    with subprocess.Popen([*QPOPPER, "--no-use-uvloop", *args], stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()
            assert "warning: user alice is already defined at line 1" in line, line
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def test_a_malformed_apop_database_is_named_by_line(tmp_path: Path) -> None:
    apop = tmp_path / "pop.auth"
    apop.write_text("alice:{PLAIN}secret\nbob has no colon\n")
    result = check(*virtual(tmp_path, ["alice:{PLAIN}pw"]), "--apop-file", str(apop))
    assert result.returncode == 1
    assert f"{apop}:2: expected user:{{PLAIN}}secret" in result.stderr
