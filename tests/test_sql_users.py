"""Users in SQL (auth-backend sql): Dovecot's dovecot-sql.conf.ext, read
as Dovecot reads it, against a real PostgreSQL (Debian's, a throwaway
cluster started here) and a real SQLite file, through the real daemon
and poplib.

What a database outage looks like to a client is tested for real: the
server stopped, a query that sleeps, a pool whose one connection is
stuck behind a lock; each is -ERR [SYS/TEMP], never [AUTH].
"""

from __future__ import annotations

import contextlib
import poplib
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import (
    QPOPPER,
    TEST_DAEMON_ARGS,
    QpopperProcess,
    pop_login,
    pop_refusal,
    without_coverage,
    write_maildir_message,
)
from pg_helpers import SKIP_REASON, PostgresServer, pg_bin
from qpopper.auth.backendargs import parse_backend_args
from qpopper.auth.sql import bind_query, query_values, record_from_rows
from qpopper.errors import ConfigError

CONNECT_SECRET = "c0nnect-Secret-42"
QUOTED_USER = "o'brien'OR'1'='1"
MSG = b"From: a@example.org\nSubject: sql\n\nhello\n"
# The client's address (%r) takes part: from 192.0.2.99 nobody logs in.
PASSWORD_QUERY = ("SELECT userid AS user, password, nologin, allow_nets FROM users WHERE userid = '%u' "
                  "AND COALESCE('%r', '') <> '192.0.2.99'")  # fmt: skip
USER_QUERY = "SELECT home, maildir AS mail FROM users WHERE userid = '%u'"

needs_postgres = pytest.mark.skipif(pg_bin() is None, reason=SKIP_REASON)


def _hash(scheme: str, password: str) -> str:
    from passlib.hash import argon2, sha512_crypt

    if scheme == "ARGON2ID":
        return "{ARGON2ID}" + str(argon2.using(rounds=2, memory_cost=1024).hash(password))
    if scheme == "SHA512-CRYPT":
        return "{SHA512-CRYPT}" + str(sha512_crypt.using(rounds=5000).hash(password))
    return "{PLAIN}" + password


def _users(tmp_path: Path) -> list[tuple[str, str, str | None, str | None, str, str]]:
    """(userid, password, nologin, allow_nets, home, maildir) rows."""
    rows = []
    for user, password, nologin, nets in [
        ("alice", _hash("SHA512-CRYPT", "alice-pw"), None, None),
        ("bob@example.org", _hash("ARGON2ID", "bob-pw"), None, None),
        ("carol", _hash("PLAIN", "carol-pw"), "y", None),
        ("erin", _hash("PLAIN", "erin-pw"), None, "192.0.2.0/24"),
        (QUOTED_USER, _hash("PLAIN", "quoted-pw"), None, None),
    ]:
        home = tmp_path / "home" / user.replace("'", "_").replace(" ", "_")
        maildir = home / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        write_maildir_message(maildir, MSG)
        rows.append((user, password, nologin, nets, str(home), f"maildir:{maildir}"))
    return rows




def _wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _args_file(path: Path, driver: str, connect: str, **extra: str) -> Path:
    lines = [f"driver = {driver}", f"connect = {connect}", f"password_query = {PASSWORD_QUERY}",
             f"user_query = {USER_QUERY}"]  # fmt: skip
    lines += [f"{k} = {v}" for k, v in extra.items()]
    path.write_text("# as dovecot-sql.conf.ext\n" + "\n".join(lines) + "\n")
    return path


def _daemon(tmp_path: Path, args_file: Path, *more: str) -> QpopperProcess:
    return QpopperProcess(tmp_path, ["--workers=1", "--auth-backend=sql", f"--auth-backend-args={args_file}",
                                     "--debug", *more])  # fmt: skip


# ---- the queries' variables ----------------------------------------------------------


def test_variables_become_bound_parameters() -> None:
    query = bind_query("SELECT password FROM users WHERE userid = '%u' AND domain = '%d'", "%s", "f:1")
    assert query.text == "SELECT password FROM users WHERE userid = %s AND domain = %s"
    assert query.params(query_values(QUOTED_USER + "@x.org", "192.0.2.1")) == (QUOTED_USER + "@x.org", "x.org")
    mixed = bind_query("SELECT 1 FROM t WHERE u = '%Ln@%d' AND note LIKE 'a%%' AND ip = %{rip}", "?", "f:1")
    assert mixed.text == ("SELECT 1 FROM t WHERE u = (CAST(? AS TEXT) || '@' || CAST(? AS TEXT)) "
                          "AND note LIKE 'a%' AND ip = ?")
    assert mixed.params(query_values("Bob@ex.org", "::1")) == ("bob", "ex.org", "::1")
    assert mixed.uses_client and not query.uses_client
    assert "'a%%'" in bind_query("SELECT 1 WHERE x LIKE 'a%%'", "%s", "f:1").text  # psycopg's own % doubled


def test_the_local_address_is_bound_too() -> None:
    """%l and %{lip}, the address the client connected to: placeholders,
    never spliced, and NULL where there is none (a Unix socket)."""
    query = bind_query("SELECT 1 FROM vusers WHERE lip = '%l' AND note = 'at %{lip}' AND ip = %r", "%s", "f:1")
    assert query.text == "SELECT 1 FROM vusers WHERE lip = %s AND note = ('at ' || CAST(%s AS TEXT)) AND ip = %s"
    assert query.params(query_values("dave", "192.0.2.1", "127.0.0.2")) == ("127.0.0.2", "127.0.0.2", "192.0.2.1")
    assert query.params(query_values("dave", None)) == (None, None, None)
    assert query.uses_local and query.uses_client
    assert not bind_query("SELECT 1 WHERE ip = '%r'", "?", "f:1").uses_local


@pytest.mark.parametrize(("query", "complaint"), [
    ("SELECT password FROM users WHERE password = '%w'", "never sent to the database"),
    ("SELECT 1 WHERE a = '%q'", "not a known variable"),
    ("SELECT 1 WHERE a = '100%'", "starts no variable"),
    ("SELECT 1 WHERE a = 'open", "not closed"),
    ("SELECT 1 WHERE a = %{lport}", "not a known variable"),
])  # fmt: skip
def test_bad_queries_are_refused_with_their_line(query: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint) as caught:
        bind_query(query, "%s", "sql.conf:3")
    assert str(caught.value).startswith("sql.conf:3: ")


def test_rows_become_records() -> None:
    record = record_from_rows(
        "bob",
        {"user": "Bob@example.org", "password_noscheme": "x", "userdb_home": "/h", "nopassword": "y"},
        {"uid": "1001", "gid": "100", "mail": "maildir:~/M", "quota": "1G"},
        "SHA512-CRYPT",
    )
    assert (record.user, record.password, record.home, record.uid, record.gid, record.mail) == (
        "Bob@example.org", "{SHA512-CRYPT}x", "/h", 1001, 100, "maildir:~/M")
    assert dict(record.extra) == {"nopassword": "y", "quota": "1G"}


def test_dovecots_maxconns_sizes_the_pool() -> None:
    from qpopper.auth.sql import settings_from_args

    text = ("driver = pgsql\nconnect = host=/run/postgresql maxconns=3 dbname=mail\n"
            "password_query = SELECT password FROM users WHERE userid = '%u'\n")
    args = parse_backend_args(text, "sql.conf")
    settings = settings_from_args(args)
    assert (settings.connect, settings.pool_size) == ("host=/run/postgresql dbname=mail", 3)


def test_args_file_format() -> None:
    args = parse_backend_args(
        'driver = pgsql\n# comment\n\nconnect = "host=/tmp dbname=mail"\npassword_query = SELECT a \\\n  FROM b\n',
        "sql.conf",
    )
    assert args.values == {"driver": "pgsql", "connect": "host=/tmp dbname=mail", "password_query": "SELECT a FROM b"}
    assert args.lines["password_query"] == 5
    with pytest.raises(ConfigError, match=r"sql.conf:2: expected key = value"):
        parse_backend_args("driver = sqlite\nthis is no setting\n", "sql.conf")
    with pytest.raises(ConfigError, match=r"sql.conf:2: driver is set twice"):
        parse_backend_args("driver = sqlite\ndriver = pgsql\n", "sql.conf")


# ---- SQLite ----------------------------------------------------------------------------


@pytest.fixture
def sqlite_args(tmp_path: Path) -> Path:
    db = tmp_path / "users.sqlite"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE users (userid TEXT PRIMARY KEY, password TEXT, nologin TEXT, allow_nets TEXT, "
                     "home TEXT, maildir TEXT)")  # fmt: skip
        conn.executemany("INSERT INTO users VALUES (?, ?, ?, ?, ?, ?)", _users(tmp_path))
        conn.commit()
    return _args_file(tmp_path / "sql.conf", "sqlite", str(db), default_pass_scheme="SHA512-CRYPT")


def test_sqlite_users_log_in(sqlite_args: Path, tmp_path: Path) -> None:
    daemon = _daemon(tmp_path, sqlite_args)
    try:
        for user, password in [("alice", "alice-pw"), ("bob@example.org", "bob-pw")]:
            client = pop_login(daemon.port, user, password)
            assert client.stat()[0] == 1  # the user query's maildir
            client.quit()
        assert "[AUTH]" in pop_refusal(daemon.port, "alice", "wrong")
        assert "[AUTH]" in pop_refusal(daemon.port, "nobody", "alice-pw")
        assert "[AUTH]" in pop_refusal(daemon.port, "carol", "carol-pw")  # nologin
        assert "[AUTH]" in pop_refusal(daemon.port, "erin", "erin-pw")  # not from allow_nets
        # The protocol refuses a quote in a name before any database sees it;
        # the database's own defence is tested below without that guard.
        assert "Invalid user name" in pop_refusal(daemon.port, "x'OR'1'='1", "alice-pw")
    finally:
        log = daemon.stop()
    for secret in ("alice-pw", "bob-pw", "quoted-pw"):
        assert secret not in log


def test_nologin_reason_is_shown_only_with_the_right_password(sqlite_args: Path, tmp_path: Path) -> None:
    """Dovecot's nologin with reason=: the administrator's text replaces
    "Authentication failed." once the password matched (one line, control
    characters gone); a wrong password gets the usual answer."""
    text = sqlite_args.read_text().replace(
        "SELECT userid AS user, password, nologin, allow_nets FROM users",
        "SELECT userid AS user, password, nologin, allow_nets, CASE WHEN nologin IS NOT NULL THEN "
        "'Mailbox moving to the new server' || char(13, 10) || '+OK forged  until Monday' END AS reason FROM users",
    )
    assert "AS reason" in text
    sqlite_args.write_text(text)
    daemon = _daemon(tmp_path, sqlite_args)
    try:
        assert pop_refusal(daemon.port, "carol", "carol-pw") == (
            "-ERR [AUTH] Mailbox moving to the new server +OK forged until Monday")
        assert pop_refusal(daemon.port, "carol", "wrong") == "-ERR [AUTH] Authentication failed."
        pop_login(daemon.port, "alice", "alice-pw").quit()  # no nologin: the reason column is NULL
    finally:
        log = daemon.stop()
    assert "login of carol refused by the user database (nologin)" in log


def _quote_laden_lookups(args_file: Path) -> None:
    """Names full of quotes straight at the database: each finds its own
    row or none, as bound parameters do (spliced, the first would match all)."""
    import asyncio

    from qpopper.auth.backendargs import read_backend_args
    from qpopper.auth.sql import database_from_args

    async def run() -> None:
        database = database_from_args(read_backend_args(str(args_file)))
        try:
            found = await database.lookup(QUOTED_USER, "192.0.2.7")
            assert found is not None and found.user == QUOTED_USER and found.password == "{PLAIN}quoted-pw"
            for name in ("x'OR'1'='1", "alice' --", "alice'; DROP TABLE users; --", "%u", "' UNION SELECT 'a', 'b"):
                assert await database.lookup(name, None) is None
            alice = await database.lookup("alice", None)
            assert alice is not None and alice.mail is not None  # the table is still there
            assert await database.lookup("alice", "192.0.2.99") is None  # %r, bound too
        finally:
            await database.close()

    asyncio.run(run())


def test_sqlite_quote_laden_names_are_bound(sqlite_args: Path) -> None:
    _quote_laden_lookups(sqlite_args)


def test_check_config_reads_the_args_file(sqlite_args: Path, tmp_path: Path) -> None:
    def check(args_file: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(QPOPPER + TEST_DAEMON_ARGS + ["--check-config", "--auth-backend=sql",
                              f"--auth-backend-args={args_file}", "127.0.0.1:0"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    good = check(sqlite_args)
    assert good.returncode == 0, good.stderr
    shown = subprocess.run(QPOPPER + ["--show-config", "--auth-backend=sql", f"--auth-backend-args={sqlite_args}"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert f"# user database: sql sqlite ({sqlite_args})" in shown.stdout, shown.stdout
    secret = _args_file(tmp_path / "secret.conf", "pgsql", f"host={tmp_path} dbname=mail password=x")
    secret.chmod(0o644)
    warned = check(secret)
    assert warned.returncode == 0 and "every user can read this file" in warned.stdout, warned.stdout
    bad = tmp_path / "bad.conf"
    bad.write_text("driver = sqlite\nconnect = /x\npassword_query = SELECT password FROM u WHERE p = '%w'\n")
    result = check(bad)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == [f"qpopper: error: {bad}:3: %w is the password, which is never sent to the database"]
    assert "Traceback" not in result.stderr
    # Started for real, the daemon says the same in one line and exits 2.
    started = subprocess.run(QPOPPER + TEST_DAEMON_ARGS + ["--auth-backend=sql", f"--auth-backend-args={bad}",
                             "127.0.0.1:0"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert started.returncode == 2
    assert started.stderr.strip().splitlines() == [f"qpopper: {bad}:3: %w is the password, which is never sent to "
                                                   "the database"]  # fmt: skip


# ---- PostgreSQL --------------------------------------------------------------------------


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[PostgresServer]:
    with PostgresServer.started() as pg:
        pg.execute("CREATE TABLE users (userid TEXT PRIMARY KEY, password TEXT, nologin TEXT, allow_nets TEXT, "
                   "home TEXT, maildir TEXT)")  # fmt: skip
        import psycopg

        with psycopg.connect(pg.dsn(), autocommit=True) as conn, conn.cursor() as cursor:
            cursor.executemany("INSERT INTO users VALUES (%s, %s, %s, %s, %s, %s)", _users(tmp_path))
        pg.create_role("qpopper", CONNECT_SECRET)
        yield pg


def _pg_args(tmp_path: Path, pg: PostgresServer, **extra: str) -> Path:
    return _args_file(tmp_path / "sql.conf", "pgsql", pg.dsn("qpopper", CONNECT_SECRET), **extra)


@needs_postgres
def test_postgres_users_log_in(postgres: PostgresServer, tmp_path: Path) -> None:
    daemon = _daemon(tmp_path, _pg_args(tmp_path, postgres), "--auth-cache-size=1M")
    try:
        for user, password in [("alice", "alice-pw"), ("bob@example.org", "bob-pw")]:
            client = pop_login(daemon.port, user, password)
            assert client.stat()[0] == 1
            client.quit()
        assert "[AUTH]" in pop_refusal(daemon.port, "alice", "wrong")  # a cache hit, still refused
        assert "[AUTH]" in pop_refusal(daemon.port, "nobody", "x")
        assert "[AUTH]" in pop_refusal(daemon.port, "carol", "carol-pw")
        # A changed password works at once, though the old record is cached.
        postgres.execute("UPDATE users SET password = %s WHERE userid = 'alice'", (_hash("SHA512-CRYPT", "new-pw"),))
        pop_login(daemon.port, "alice", "new-pw").quit()
        assert "[AUTH]" in pop_refusal(daemon.port, "alice", "alice-pw")
    finally:
        log = daemon.stop()
    assert "auth cache:" in log  # the figures at stop
    for secret in (CONNECT_SECRET, "alice-pw", "bob-pw", "new-pw", "quoted-pw"):
        assert secret not in log


@needs_postgres
def test_postgres_quote_laden_names_are_bound(postgres: PostgresServer, tmp_path: Path) -> None:
    _quote_laden_lookups(_pg_args(tmp_path, postgres))


@needs_postgres
def test_postgres_down_is_sys_temp_and_back_is_served(postgres: PostgresServer, tmp_path: Path) -> None:
    daemon = _daemon(tmp_path, _pg_args(tmp_path, postgres, query_timeout="2"))
    try:
        pop_login(daemon.port, "alice", "alice-pw").quit()
        postgres.stop()
        started = time.monotonic()
        reply = pop_refusal(daemon.port, "alice", "alice-pw")
        assert "[SYS/TEMP]" in reply and "[AUTH]" not in reply
        assert time.monotonic() - started < 30  # bounded (2 s, and the login itself)
        postgres.start()

        def served() -> bool:
            try:
                pop_login(daemon.port, "alice", "alice-pw").quit()
            except poplib.error_proto as exc:
                replies.append(exc.args[0])
                return False
            return True

        replies: list[bytes] = []

        _wait_for(served, 60, "the pool did not reconnect")
        assert all(b"[SYS/TEMP]" in r for r in replies), replies
    finally:
        log = daemon.stop()
    assert "authentication backend failed" in log
    assert CONNECT_SECRET not in log and "alice-pw" not in log


@needs_postgres
def test_slow_query_is_sys_temp(postgres: PostgresServer, tmp_path: Path) -> None:
    slow = ("SELECT userid AS user, password FROM users WHERE userid = '%u' "
            "AND (userid <> 'alice' OR (SELECT true FROM pg_sleep(30)))")  # fmt: skip
    args = _pg_args(tmp_path, postgres, query_timeout="1.5")
    args.write_text(args.read_text().replace(PASSWORD_QUERY, slow))
    daemon = _daemon(tmp_path, args)
    try:
        reply = pop_refusal(daemon.port, "alice", "alice-pw")
        assert "[SYS/TEMP]" in reply
        pop_login(daemon.port, "bob@example.org", "bob-pw").quit()  # the next query is served
    finally:
        log = daemon.stop()
    assert "query ran past 1.5 s" in log or "no answer within 1.5 s" in log


@needs_postgres
def test_exhausted_pool_queues_with_a_deadline(postgres: PostgresServer, tmp_path: Path) -> None:
    daemon = _daemon(tmp_path, _pg_args(tmp_path, postgres, query_timeout="2", pool_size="1"))
    try:
        # Logins queue for the one connection and are all served.
        for i in range(4):
            maildir = tmp_path / f"u{i}"
            for sub in ("cur", "new", "tmp"):
                (maildir / sub).mkdir(parents=True)
            postgres.execute("INSERT INTO users (userid, password, maildir) VALUES (%s, '{PLAIN}pw', %s)",
                             (f"u{i}", f"maildir:{maildir}"))  # fmt: skip
        done: list[str] = []

        def log_in(user: str) -> None:
            pop_login(daemon.port, user, "pw").quit()
            done.append("ok")

        threads = [threading.Thread(target=log_in, args=(f"u{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert done == ["ok"] * 4
        # The one connection stuck behind a lock: the login on it and the one
        # queued behind it each get [SYS/TEMP] at their deadline.
        import psycopg

        with psycopg.connect(postgres.dsn()) as locker:
            locker.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
            replies: list[str] = []
            waiting = [threading.Thread(target=lambda u=user: replies.append(pop_refusal(daemon.port, u, "pw")))
                       for user in ("u0", "u1")]  # fmt: skip
            for t in waiting:
                t.start()
            for t in waiting:
                t.join(60)
            locker.rollback()
        assert len(replies) == 2 and all("[SYS/TEMP]" in r for r in replies)
        pop_login(daemon.port, "alice", "alice-pw").quit()
    finally:
        log = daemon.stop()
    assert "query ran past 2 s" in log  # the one on the connection; the other waited for it, 2 s at most


@needs_postgres
def test_sighup_reloads_the_args_file(postgres: PostgresServer, tmp_path: Path) -> None:
    args = _pg_args(tmp_path, postgres)
    daemon = _daemon(tmp_path, args)
    try:
        pop_login(daemon.port, "alice", "alice-pw").quit()
        postgres.execute("CREATE TABLE other (userid TEXT, password TEXT, home TEXT, maildir TEXT); "
                         "INSERT INTO other SELECT 'zed', '{PLAIN}zed-pw', home, maildir FROM users "
                         "WHERE userid = 'alice'; GRANT SELECT ON other TO qpopper")  # fmt: skip
        args.write_text(args.read_text().replace("FROM users", "FROM other").replace(", nologin, allow_nets", "")
                        .replace(" AND COALESCE('%r', '') <> '192.0.2.99'", ""))
        daemon.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: "user database reloaded" in daemon.log.read_text(), 20, "no reload")
        pop_login(daemon.port, "zed", "zed-pw").quit()
        assert "[AUTH]" in pop_refusal(daemon.port, "alice", "alice-pw")
        args.write_text("driver = oracle\n")  # a broken edit keeps the running database
        daemon.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: "not reloaded, keeping the running ones" in daemon.log.read_text(), 20, "no refusal")
        pop_login(daemon.port, "zed", "zed-pw").quit()
    finally:
        log = daemon.stop()
    assert CONNECT_SECRET not in log


def test_sighup_applies_new_cache_and_hash_settings(sqlite_args: Path, tmp_path: Path) -> None:
    """auth-cache-size and auth-hash-workers from a -f file, changed and
    picked up at SIGHUP without a restart (Dovecot needs a reload too)."""
    conf = tmp_path / "qpopper.conf"
    conf.write_text("set auth-cache-size = 0\n")
    daemon = _daemon(tmp_path, sqlite_args, "-f", str(conf))
    try:
        pop_login(daemon.port, "alice", "alice-pw").quit()
        conf.write_text("set auth-cache-size = 1M\nset auth-cache-negative-ttl = 0\nset auth-hash-workers = 3\n")
        daemon.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: "password hashes: 3 checked at once" in daemon.log.read_text(), 20, "no reload")
        for _ in range(3):
            pop_login(daemon.port, "alice", "alice-pw").quit()
    finally:
        log = daemon.stop()
    # At stop: the new cache saw the three logins, one miss and two hits.
    assert "auth cache: 1 entries" in log and "2 hits (0 negative), 1 misses" in log, log


def test_sql_backend_is_not_loaded_by_a_plain_session() -> None:
    """The passwd-file path loads none of this (tests/test_memory.py counts the rest)."""
    code = ("import sys, qpopper.server, qpopper.daemon.cli; "
            "print(sorted(m for m in sys.modules if m.startswith(('psycopg', 'qpopper.auth.sql', "
            "'qpopper.auth.userdb', 'qpopper.auth.authcache', 'sqlite3'))))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         env=without_coverage())  # coverage's data file is SQLite
    assert out.stdout.strip() == "[]"


def _scram_login(port: int, mechanism: str, user: str, password: str) -> tuple[bytes, bytes]:
    """A whole SCRAM exchange over the wire with scramp's client (RFC 5802):
    the server's final reply and the answer to STAT after it."""
    import base64

    import scramp

    client = scramp.ScramClient([mechanism], user, password)
    with contextlib.closing(poplib.POP3("127.0.0.1", port, timeout=30)) as pop:
        wire = pop.file

        def send(line: bytes) -> bytes:
            pop.sock.sendall(line + b"\r\n")
            return wire.readline().rstrip(b"\r\n")

        first = send(b"AUTH " + mechanism.encode() + b" " + base64.b64encode(client.get_client_first().encode()))
        assert first.startswith(b"+ "), first
        client.set_server_first(base64.b64decode(first[2:]).decode())
        final = send(base64.b64encode(client.get_client_final().encode()))
        if final.startswith(b"+ "):
            client.set_server_final(base64.b64decode(final[2:]).decode())  # checks the server's signature
            final = send(b"")
        stat = send(b"STAT") if final.startswith(b"+OK") else b""
        send(b"QUIT")
        return final, stat


@needs_postgres
@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_scram_logins_against_postgres(postgres: PostgresServer, tmp_path: Path, mechanism: str) -> None:
    """SCRAM end to end with the secret from the database: stored as
    Dovecot stores it ({SCRAM-SHA-256}iterations,salt,stored,server), or
    derived from a {PLAIN} password; a wrong password fails at the proof."""
    import base64

    from qpopper.auth.sasl import scram_secret_from_password

    secret = scram_secret_from_password(b"dave-pw", mechanism)
    salt, stored_key, server_key = (base64.b64encode(v).decode() for v in (secret.salt, secret.stored_key,
                                                                          secret.server_key))  # fmt: skip
    stored = f"{{{mechanism}}}{secret.iterations},{salt},{stored_key},{server_key}"
    home = tmp_path / "home" / "dave"
    write_maildir_message(home / "Maildir", MSG)
    postgres.execute("INSERT INTO users (userid, password, home, maildir) VALUES (%s, %s, %s, %s)",
                     ("dave", stored, str(home), f"maildir:{home / 'Maildir'}"))  # fmt: skip
    postgres.execute("UPDATE users SET allow_nets = NULL WHERE userid = 'erin'")  # erin: {PLAIN}
    daemon = _daemon(tmp_path, _pg_args(tmp_path, postgres), "--auth-cache-size=1M")
    try:
        for user, password in [("dave", "dave-pw"), ("dave", "dave-pw"), ("erin", "erin-pw")]:  # the 2nd: a cache hit
            final, stat = _scram_login(daemon.port, mechanism, user, password)
            assert final.startswith(b"+OK"), final
            assert stat.startswith(b"+OK 1 "), stat
        final, _ = _scram_login(daemon.port, mechanism, "dave", "wrong")
        assert final.startswith(b"-ERR [AUTH]"), final
        final, _ = _scram_login(daemon.port, mechanism, "nobody", "x")
        assert final.startswith(b"-ERR [AUTH]"), final
    finally:
        log = daemon.stop()
    assert "Traceback" not in log
    for text in (CONNECT_SECRET, "dave-pw", "erin-pw"):
        assert text not in log


# ---- %l: one address per virtual domain ---------------------------------------------------

# "dave" is a different user at each local address: the address names the domain.
VHOST_QUERY = ("SELECT userid || '@' || domain AS user, password, maildir AS userdb_mail FROM vusers "
               "WHERE userid = '%n' AND lip = '%l'")  # fmt: skip


def _vhost_args(tmp_path: Path) -> Path:
    """A SQLite file with dave@one.example at 127.0.0.1 (one message) and
    dave@two.example at 127.0.0.2 (two), and its args file."""
    db = tmp_path / "vusers.sqlite"
    rows = []
    for domain, lip, messages in [("one.example", "127.0.0.1", 1), ("two.example", "127.0.0.2", 2)]:
        maildir = tmp_path / domain / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True)
        for _ in range(messages):
            write_maildir_message(maildir, MSG)
        rows.append(("dave", domain, lip, "{PLAIN}" + domain + "-pw", f"maildir:{maildir}"))
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE vusers (userid TEXT, domain TEXT, lip TEXT, password TEXT, maildir TEXT)")
        conn.executemany("INSERT INTO vusers VALUES (?, ?, ?, ?, ?)", rows)
        conn.commit()
    path = tmp_path / "vhost.conf"
    path.write_text(f"driver = sqlite\nconnect = {db}\npassword_query = {VHOST_QUERY}\n")
    return path


def _messages_at(host: str, port: int, user: str, password: str) -> int | str:
    """The number of messages USER/PASS at `host` finds, or the -ERR line."""
    client = poplib.POP3(host, port, timeout=30)
    try:
        client.user(user)
        client.pass_(password)
        count: int = client.stat()[0]
        client.quit()
        return count
    except poplib.error_proto as exc:
        reply: bytes = exc.args[0]
        return reply.decode()
    finally:
        client.close()


def test_local_address_picks_the_user_and_the_cache_keeps_addresses_apart(tmp_path: Path) -> None:
    """The server on 127.0.0.1 and 127.0.0.2: %l is the address each
    connection reached, and the auth cache keys by it. Keyed by user alone,
    the record cached at .1 would let one.example's password in at .2."""
    daemon = _daemon(tmp_path, _vhost_args(tmp_path), "--auth-cache-size=1M", "127.0.0.2:0")
    try:
        match = re.search(r"listening on 127\.0\.0\.2:(\d+)", daemon.log.read_text())
        assert match is not None
        one, two = ("127.0.0.1", daemon.port), ("127.0.0.2", int(match.group(1)))
        assert _messages_at(*one, "dave", "one.example-pw") == 1
        assert "[AUTH]" in str(_messages_at(*two, "dave", "one.example-pw"))  # .1's record is not served at .2
        assert _messages_at(*two, "dave", "two.example-pw") == 2
        assert "[AUTH]" in str(_messages_at(*one, "dave", "two.example-pw"))
        assert _messages_at(*one, "dave", "one.example-pw") == 1  # a hit, for .1
    finally:
        log = daemon.stop()
    assert "auth cache: 2 entries" in log


def test_a_proxy_headers_destination_is_the_local_address(tmp_path: Path) -> None:
    """Behind a balancer %l is the address the client reached there (the
    header's destination), as %r is the header's source."""
    import socket

    from qpopper import Controller
    from qpopper.auth.backendargs import read_backend_args
    from qpopper.auth.sql import database_from_args
    from qpopper.auth.userdb import DatabaseAuthenticator
    from qpopper.config.options import ListenAddress

    auth = DatabaseAuthenticator(database_from_args(read_backend_args(str(_vhost_args(tmp_path)))), "maildir:/none")
    listen = (ListenAddress("127.0.0.1", 0, proxy=True),)
    with Controller(authenticator=auth, listen=listen, haproxy_trusted_networks="127.0.0.0/8") as pop:
        for destination, password, expected in [("127.0.0.2", "two.example-pw", b"+OK 2 "),
                                                ("127.0.0.1", "two.example-pw", b"-ERR [AUTH]"),
                                                ("127.0.0.1", "one.example-pw", b"+OK 1 ")]:  # fmt: skip
            with socket.create_connection((pop.host, pop.port), 30) as sock, sock.makefile("rwb") as wire:
                wire.write(f"PROXY TCP4 203.0.113.9 {destination} 40000 110\r\n".encode())
                wire.write(f"USER dave\r\nPASS {password}\r\nSTAT\r\nQUIT\r\n".encode())
                wire.flush()
                replies = [wire.readline() for _ in range(4)]  # the greeting, USER, PASS, STAT
                assert replies[3 if expected.startswith(b"+") else 2].startswith(expected), replies
