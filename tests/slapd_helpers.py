"""A real OpenLDAP slapd (Debian's package) for the tests and the benchmark.

`Slapd` writes a throwaway slapd.conf and an mdb database under a directory
of the caller's (pytest's tmp_path), listens on loopback only, on a plain
port (StartTLS offered) and an LDAPS port, both with a certificate issued by
a trustme CA, loads entries with ldapadd, and is stopped at the end. It can
also be paused (SIGSTOP: a directory that accepts connections and never
answers) and stopped and started again on the same ports and data.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SLAPD = shutil.which("slapd") or ("/usr/sbin/slapd" if os.path.exists("/usr/sbin/slapd") else None)
LDAPADD = shutil.which("ldapadd")
SCHEMA_DIR = Path("/etc/ldap/schema")
MODULE_DIR = Path("/usr/lib/ldap")

BASE = "dc=example,dc=org"
ROOT_DN = f"cn=admin,{BASE}"
ROOT_PW = "root-secret"
# The service account of Dovecot's "fetch the password" mode: it may read
# userPassword, nothing more (the ACL below).
READER_DN = f"cn=reader,{BASE}"
READER_PW = "reader-secret-Xq7"


def missing_reason() -> str | None:
    """Why a real slapd cannot run here, or None."""
    if SLAPD is None or LDAPADD is None:
        return "slapd and ldap-utils are not installed (apt-get install slapd ldap-utils)"
    if not (MODULE_DIR / "back_mdb.la").exists() and not (MODULE_DIR / "back_mdb.so").exists():
        return f"slapd's mdb backend is not in {MODULE_DIR}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(base: Path, cert: Path, key: Path, argon2: bool) -> str:
    schemas = "".join(f"include {SCHEMA_DIR}/{name}.schema\n" for name in ("core", "cosine", "nis", "inetorgperson"))
    modules = "moduleload back_mdb\n" + ("moduleload argon2\n" if argon2 else "")
    return (
        f"{schemas}"
        f"pidfile {base}/slapd.pid\nargsfile {base}/slapd.args\n"
        f"modulepath {MODULE_DIR}\n{modules}"
        f"TLSCertificateFile {cert}\nTLSCertificateKeyFile {key}\n"
        # {CRYPT} values are checked by crypt(3): $6$ is SHA512-CRYPT.
        "password-hash {SSHA}\n"
        'password-crypt-salt-format "$6$%.16s"\n'
        "sizelimit 500\n"
        "database mdb\nmaxsize 67108864\n"
        f'suffix "{BASE}"\nrootdn "{ROOT_DN}"\nrootpw {ROOT_PW}\n'
        f"directory {base}/db\n"
        "index objectClass eq\nindex uid eq\n"
        "access to attrs=userPassword\n"
        "  by self write\n"
        f'  by dn.exact="{READER_DN}" read\n'
        "  by anonymous auth\n"
        "  by * none\n"
        "access to * by * read\n"
    )


class Slapd:
    """One slapd process over a directory it owns."""

    def __init__(self, base: Path, argon2: bool = False) -> None:
        import trustme

        self.base = base
        self.port = free_port()
        self.ldaps_port = free_port()
        self.url = f"ldap://127.0.0.1:{self.port}"
        self.ldaps_url = f"ldaps://127.0.0.1:{self.ldaps_port}"
        (base / "db").mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = base / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        cert_file, key_file = base / "server.pem", base / "server.key"
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        for pem in cert.cert_chain_pems[1:]:
            pem.write_to_path(str(cert_file), append=True)
        cert.private_key_pem.write_to_path(str(key_file))
        self.config = base / "slapd.conf"
        self.config.write_text(_config(base, cert_file, key_file, argon2))
        self.log = base / "slapd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    def start(self) -> None:
        assert SLAPD is not None
        self._log_file = self.log.open("ab")
        # -d 0: stay in the foreground as our child, so a test can stop, pause and wait for it.
        self.proc = subprocess.Popen(
            [SLAPD, "-d", "0", "-f", str(self.config), "-h", f"{self.url}/ {self.ldaps_url}/"],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            ready = 0
            for port in (self.port, self.ldaps_port):
                with socket.socket() as s:
                    ready += s.connect_ex(("127.0.0.1", port)) == 0
            if ready == 2:
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"slapd did not start: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self._paused:
            self.resume()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log_file.close()
        self.proc = None

    def pause(self) -> None:
        """The directory hangs: connections are accepted by the kernel, never answered."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self._paused = True
        # SIGSTOP takes each of slapd's threads as the kernel next schedules it: on a busy
        # machine one can still answer a request sent right after the signal. Wait until
        # every thread is stopped.
        deadline = time.monotonic() + 10
        while not all(_thread_state(task) in ("T", "t") for task in Path(f"/proc/{self.proc.pid}/task").iterdir()):
            assert time.monotonic() < deadline, "slapd did not stop"
            time.sleep(0.005)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self._paused = False

    def ldapadd(self, ldif: str) -> None:
        assert LDAPADD is not None
        subprocess.run(
            [LDAPADD, "-x", "-H", self.url, "-D", ROOT_DN, "-w", ROOT_PW],
            input=ldif.encode("utf-8"),
            capture_output=True,
            check=True,
            timeout=30,
        )

    def load_base(self) -> None:
        """The suffix, ou=people and the read-only service account."""
        self.ldapadd(
            f"dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n\n"
            f"dn: ou=people,{BASE}\nobjectClass: organizationalUnit\nou: people\n\n"
            f"dn: {READER_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
            f"cn: reader\nuserPassword: {READER_PW}\n\n"
        )


def user_ldif(
    user: str, password: str, uid: int, gid: int, home: str, mail: str | None = None, surname: str = "User"
) -> str:
    """A posixAccount + inetOrgPerson entry under ou=people; `password` is
    the userPassword value as stored ("{CRYPT}$6$...", "{SSHA}...", plain)."""
    lines = [
        f"dn: uid={user},ou=people,{BASE}",
        "objectClass: inetOrgPerson",
        "objectClass: posixAccount",
        f"uid: {user}",
        f"cn: {user}",
        f"sn: {surname}",
        f"uidNumber: {uid}",
        f"gidNumber: {gid}",
        f"homeDirectory: {home}",
        f"userPassword: {password}",
    ]
    if mail is not None:
        lines.append(f"description: {mail}")
    return "\n".join(lines) + "\n\n"


def _thread_state(task: Path) -> str:
    """One thread's state letter from /proc/PID/task/TID/stat (after the command's parenthesis)."""
    try:
        return (task / "stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return "T"  # gone: it answers nothing either
