"""The shipped units and config start as shipped: the unit's own ExecStart with
/etc/default/qpopper's arguments passes --check-config, asks for no TLS port
without a certificate, and systemd-analyze accepts the units."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGING = Path(__file__).resolve().parent.parent / "packaging"
UNITS = PACKAGING / "systemd"
QPOPPER_BIN = Path(sys.executable).parent / "qpopper"


def exec_start(unit: Path) -> list[str]:
    line = next(x for x in unit.read_text().splitlines() if x.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


def default_options() -> list[str]:
    """QPOPPER_OPTIONS as /etc/default/qpopper sets it (its first, uncommented assignment)."""
    for line in (PACKAGING / "default" / "qpopper").read_text().splitlines():
        if line.startswith("QPOPPER_OPTIONS="):
            value = "".join(shlex.split(line.partition("=")[2]))  # systemd unquotes it...
            return value.split()  # ...and an unbraced $QPOPPER_OPTIONS is split at white space
    return []


def shipped_command(config: Path) -> list[str]:
    """The unit's ExecStart with the repository's files: $QPOPPER_OPTIONS expanded, paths local."""
    argv: list[str] = []
    for word in exec_start(UNITS / "qpopper.service"):
        if word == "$QPOPPER_OPTIONS":
            argv += default_options()
        elif word == "/usr/bin/qpopper":
            argv += [sys.executable, "-m", "qpopper"]
        elif word == "/etc/qpopper/qpopper.conf":
            argv.append(str(config))
        else:
            argv.append(word)
    return argv


def test_the_unit_asks_for_no_tls_port_as_shipped() -> None:
    argv = shipped_command(PACKAGING / "default" / "qpopper.conf")
    assert not any(a.startswith("--tls-listen") for a in argv), argv
    conf = (PACKAGING / "default" / "qpopper.conf").read_text()
    assert "\nset tls-server-cert-file" not in conf  # commented out: a fresh machine has no certificate
    assert "#set tls-server-cert-file = /etc/ssl/certs/ssl-cert-snakeoil.pem" in conf
    assert "\nset xmit-disable\n" in conf


def test_the_shipped_config_passes_the_check_with_the_units_arguments() -> None:
    argv = shipped_command(PACKAGING / "default" / "qpopper.conf")
    if os.geteuid() != 0:  # port 110 needs root: check the same arguments on a free port
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            argv.append(f"127.0.0.1:{probe.getsockname()[1]}")
    else:
        with socket.socket(socket.AF_INET6) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("::", 110))
            except OSError as exc:
                pytest.skip(f"port 110 is taken on this machine: {exc.strerror}")
    result = subprocess.run([*argv, "--check-config"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert " 0 error(s)" in result.stdout


def test_the_shipped_config_with_the_snakeoil_lines_is_checked_for_real(tmp_path: Path) -> None:
    """Uncommenting the documented certificate lines gives a working TLS set-up (given the files)."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("pop.example.org")
    cert_path, key_path = tmp_path / "snakeoil.pem", tmp_path / "snakeoil.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    conf = (PACKAGING / "default" / "qpopper.conf").read_text()
    conf = conf.replace("#set tls-server-cert-file = /etc/ssl/certs/ssl-cert-snakeoil.pem",
                        f"set tls-server-cert-file = {cert_path}")  # fmt: skip
    conf = conf.replace("#set tls-private-key-file = /etc/ssl/private/ssl-cert-snakeoil.key",
                        f"set tls-private-key-file = {key_path}")  # fmt: skip
    (tmp_path / "qpopper.conf").write_text(conf)
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    argv = [sys.executable, "-m", "qpopper", "-f", str(tmp_path / "qpopper.conf"), "--check-config",
            f"127.0.0.1:{ports[0]}", f"--tls-listen=127.0.0.1:{ports[1]}"]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    """The units as shipped, with /usr/bin/qpopper pointed at this checkout's script (the package
    test verifies the installed ones)."""
    for unit in UNITS.iterdir():
        (tmp_path / unit.name).write_text(unit.read_text().replace("/usr/bin/qpopper", str(QPOPPER_BIN)))
    names = sorted(str(p) for p in tmp_path.iterdir())
    # Documentation=man:… is checked with man(1): give it the generated pages as the package installs them.
    docs = Path(__file__).resolve().parent.parent / "docs" / "man"
    for page in docs.iterdir():
        section = tmp_path / "man" / f"man{page.suffix[1:]}"
        section.mkdir(parents=True, exist_ok=True)
        (section / page.name).symlink_to(page)
    env = {**os.environ, "MANPATH": str(tmp_path / "man")}
    result = subprocess.run(["systemd-analyze", "verify", *names], capture_output=True, text=True, timeout=120, env=env)
    problems = [
        line for line in result.stderr.splitlines()
        # Outside a booted systemd (a container, CI) verify also reports on the host's own units.
        if any(Path(n).name in line for n in names)
    ]  # fmt: skip
    assert result.returncode == 0 or not problems, result.stderr
    assert not problems, problems
