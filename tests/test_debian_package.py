"""The Debian package end to end, as an administrator meets it: built by
packaging/debian/build-deb, installed with apt, `man -w qpopper`, the units
verified, the installed unit's ExecStart run with the installed config, a
real POP3 login as a throwaway Unix account, then purged with nothing left.

Root only (it installs a package and makes an account); CI runs as root."""

from __future__ import annotations

import os
import poplib
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
# Paths only this package may own: after a purge none of them may exist.
OURS = ("/opt/qpopper", "/etc/qpopper", "/usr/share/doc/qpopper")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="installs a package and makes an account: needs root"),
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("dpkg-deb", "apt-get", "useradd")),
        reason="needs dpkg-deb, apt-get and useradd (a Debian system)",
    ),
    pytest.mark.timeout(300),
]


def run(
    *argv: str, check: bool = True, env: dict[str, str] | None = None, cwd: str | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=240, env=env or APT_ENV, cwd=cwd, input=input, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{shlex.join(argv)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def installed() -> bool:
    return run("dpkg-query", "-W", "-f=${Status}", "qpopper", check=False).stdout.startswith("install ok")


def purge() -> None:
    run("apt-get", "purge", "-y", "qpopper")


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    pam = Path("/etc/pam.d/pop3")
    if pam.exists() and run("dpkg", "-S", str(pam), check=False).returncode != 0:
        pytest.skip("this machine has its own /etc/pam.d/pop3: installing and purging the package would replace it")
    if installed():
        purge()
    out = tmp_path_factory.mktemp("dist")
    built = run(str(REPO / "packaging" / "debian" / "build-deb"), env={**APT_ENV, "OUT": str(out)})
    deb = Path(built.stdout.strip().splitlines()[-1])
    assert deb.name.startswith("qpopper_") and deb.suffix == ".deb"
    run("apt-get", "install", "-y", "--no-install-recommends", f"./{deb.name}", cwd=str(deb.parent))
    try:
        yield deb
    finally:
        if installed():
            purge()


@pytest.fixture
def account() -> Iterator[tuple[str, str]]:
    name = f"qpdeb{uuid.uuid4().hex[:6]}"
    password = f"pw-{uuid.uuid4().hex[:12]}"
    run("useradd", "-m", "-U", "-K", "UID_MIN=24000", "-K", "UID_MAX=24999", name)
    spool = Path("/var/mail") / name
    try:
        run("chpasswd", input=f"{name}:{password}\n")
        spool.write_bytes(b"From someone@example.org Wed Dec  2 10:00:00 2026\nSubject: packaged\n\nhello\n")
        shutil.chown(spool, name, "mail")
        spool.chmod(0o660)
        yield name, password
    finally:
        run("userdel", "-r", name, check=False)
        spool.unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def unit_command(port: int, *options: str) -> list[str]:
    """The installed unit's ExecStart, word for word, with /etc/default/qpopper's QPOPPER_OPTIONS set as
    systemd would to `options` and a free loopback port (so the test does not take port 110)."""
    unit = Path("/lib/systemd/system/qpopper.service").read_text()
    line = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    defaults = Path("/etc/default/qpopper").read_text()
    assert 'QPOPPER_OPTIONS=""' in defaults.splitlines()  # as shipped: port 110, no TLS port
    argv = []
    for word in shlex.split(line.removeprefix("ExecStart=")):
        argv += [*options, f"127.0.0.1:{port}"] if word == "$QPOPPER_OPTIONS" else [word]
    return argv


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        return str(response.read().decode())


def test_install_man_unit_login_and_purge(package: Path, account: tuple[str, str]) -> None:
    files = run("dpkg", "-L", "qpopper").stdout.split("\n")
    for path in ("/usr/bin/qpopper", "/usr/bin/popper", "/usr/bin/popauth", "/etc/qpopper/qpopper.conf",
                 "/etc/pam.d/pop3", "/lib/systemd/system/qpopper.service",
                 "/usr/share/doc/qpopper/examples/fail2ban/filter.d/qpopper.conf",
                 "/usr/share/doc/qpopper/examples/xinetd.d/qpopper"):  # fmt: skip
        assert path in files, path
    conffiles = Path("/var/lib/dpkg/info/qpopper.conffiles").read_text().split()
    assert "/etc/qpopper/qpopper.conf" in conffiles
    if shutil.which("man") is not None:
        assert run("man", "-w", "qpopper").stdout.strip() == "/usr/share/man/man8/qpopper.8.gz"
        assert run("man", "-w", "5", "qpopper.conf").stdout.strip() == "/usr/share/man/man5/qpopper.conf.5.gz"
    if shutil.which("systemd-analyze") is not None:
        units = [f"/lib/systemd/system/{u}" for u in ("qpopper.service", "qpopper.socket", "qpopper@.service")]
        verify = run("systemd-analyze", "verify", *units, check=False)
        assert not [x for x in verify.stderr.splitlines() if "qpopper" in x], verify.stderr
    assert run("/usr/bin/qpopper", "-v").stdout.startswith("qpopper ")

    port, metrics_port = free_port(), free_port()
    user, password = account
    # With the metrics on: the package's environment has prometheus-client.
    command = unit_command(port, f"--metrics-listen=127.0.0.1:{metrics_port}")
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as daemon:
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    client = poplib.POP3("127.0.0.1", port, timeout=30)
                    break
                except ConnectionRefusedError:
                    assert daemon.poll() is None, daemon.stderr.read() if daemon.stderr else ""
                    assert time.monotonic() < deadline, "the installed daemon never listened"
                    time.sleep(0.1)
            assert "STLS" not in client.capa()  # no certificate as shipped
            client.user(user)
            client.pass_(password)
            assert client.stat()[0] == 1
            assert b"hello" in b"\n".join(client.retr(1)[1])
            client.quit()
            logins = 'qpopper_logins_total{mechanism="password",result="ok"} 1.0'
            while logins not in (text := _scrape(metrics_port)):  # published as the session process ends
                assert time.monotonic() < deadline, text
                time.sleep(0.1)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
    assert (Path("/var/mail") / user).read_bytes().endswith(b"hello\n")  # kept: not deleted, not touched

    purge()
    assert not installed()
    left = [p for p in files if p and os.path.lexists(p) and (not os.path.isdir(p) or p.startswith(OURS))]
    assert left == [], left
    for path in OURS:
        assert not os.path.lexists(path), path
    assert (Path("/var/mail") / user).exists()  # purge left the user's mail alone
