"""A real PostgreSQL for tests: Debian's server, a throwaway cluster.

`PostgresServer` runs `initdb` in a fresh directory as an unprivileged
user (`nobody` when the tests run as root, PostgreSQL refuses root; the
test's own user otherwise), serves on a Unix socket in that directory
(and, when asked, on a free loopback port), and is stopped and removed
at the end. The superuser `postgres` connects without a password over
the socket; roles made with `create_role` need theirs (SCRAM), so that
tests can check that a connect password never reaches a log.

    with PostgresServer.started() as pg:
        pg.execute("CREATE TABLE users (...)")
        dsn = pg.dsn(user="qpopper", password="s3cret")

The SQL, LDAP and cluster tests share it; `pg_bin()` says where the
binaries are (None: the test skips, naming the Debian package).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PG_VERSIONS = ("17", "16", "15")
SKIP_REASON = "PostgreSQL's server binaries are missing (Debian: apt-get install postgresql)"


def pg_bin() -> Path | None:
    """The directory of initdb, pg_ctl and postgres, or None."""
    for version in PG_VERSIONS:
        path = Path(f"/usr/lib/postgresql/{version}/bin")
        if (path / "initdb").exists() and (path / "pg_ctl").exists():
            return path
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PostgresServer:
    """One PostgreSQL cluster of a test; see the module's docstring."""

    def __init__(self, tcp: bool = False) -> None:
        bindir = pg_bin()
        if bindir is None:
            raise RuntimeError(SKIP_REASON)
        self.bindir = bindir
        # Not under pytest's tmp_path: as root that is private to root, and
        # the server runs as nobody. Removed by stop().
        self.root = Path(tempfile.mkdtemp(prefix="qpopper-pg-"))
        self.data = self.root / "data"
        self.socket_dir = str(self.root)
        self.port = _free_port() if tcp else 5432
        self.tcp = tcp
        self.log = self.root / "postgres.log"
        self.running = False
        self._user: dict[str, Any] = {}
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
            self._user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        self._run([str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                   "-E", "UTF8", "--no-locale", "--no-sync"])  # fmt: skip
        with open(self.data / "pg_hba.conf", "w") as hba:
            hba.write("local all postgres trust\nlocal all all scram-sha-256\n")
            if tcp:
                hba.write("host all all 127.0.0.1/32 scram-sha-256\n")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"listen_addresses = '{'127.0.0.1' if tcp else ''}'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.socket_dir}'\nfsync = off\nmax_connections = 50\n"
                "shared_buffers = 16MB\nlog_connections = off\n"
            )

    def _run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(args, capture_output=True, check=check, timeout=60, cwd=self.root, **self._user)

    @classmethod
    @contextlib.contextmanager
    def started(cls, tcp: bool = False) -> Iterator[PostgresServer]:
        server = cls(tcp=tcp)
        try:
            server.start()
            yield server
        finally:
            server.stop(remove=True)

    def start(self) -> None:
        result = self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                            "-t", "60", "start"], check=False)  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr.decode()} {self.log_text()}")
        self.running = True

    def stop(self, remove: bool = False) -> None:
        """Stop the server (fast shutdown: sessions are cut, as a crash would)."""
        if self.running:
            self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"], check=False)
            self.running = False
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def dsn(self, user: str = "postgres", password: str | None = None, dbname: str = "postgres",
            over_tcp: bool = False) -> str:  # fmt: skip
        """A libpq connection string (the `connect =` of dovecot-sql.conf.ext)."""
        host = f"host=127.0.0.1 port={self.port}" if over_tcp else f"host={self.socket_dir} port={self.port}"
        text = f"{host} user={user} dbname={dbname}"
        return text + (f" password={password}" if password is not None else "")

    def execute(self, sql: str, params: tuple[Any, ...] = (), dbname: str = "postgres") -> list[tuple[Any, ...]]:
        """Run statements as the superuser (autocommit); the rows of the last."""
        import psycopg

        with psycopg.connect(self.dsn(dbname=dbname), autocommit=True) as conn:
            cursor = conn.execute(sql.encode(), params) if params else conn.execute(sql.encode())
            return list(cursor.fetchall()) if cursor.description else []

    def create_role(self, name: str, password: str, dbname: str = "postgres") -> None:
        """A login role with a SCRAM password, allowed to read `dbname`'s public tables."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn(dbname=dbname), autocommit=True) as conn:
            role = sql.Identifier(name)
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(role, sql.Literal(password)))
            conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(role))

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            result = self._run([str(self.bindir / "pg_isready"), "-h", self.socket_dir, "-p", str(self.port)],
                               check=False)  # fmt: skip
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL is not ready")
            time.sleep(0.1)
