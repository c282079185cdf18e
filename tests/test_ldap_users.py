"""Users in LDAP (auth-backend = ldap), against a real slapd from Debian's
package with a throwaway database (tests/slapd_helpers.py), through the
real server and poplib: both of Dovecot's modes, filter and DN escaping,
attribute mapping, LDAPS and StartTLS with certificate checks, and a
directory that is down or hangs."""

from __future__ import annotations

import asyncio
import logging
import poplib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import slapd_helpers
from helpers import QPOPPER, TEST_DAEMON_ARGS, QpopperProcess, write_maildir_message
from qpopper import Controller
from qpopper.auth import Principal
from qpopper.auth.credentials import UserPass
from qpopper.errors import AuthUnavailable, ConfigError

pytest.importorskip("bonsai", reason="the ldap extra (bonsai) is not installed")
if (_missing := slapd_helpers.missing_reason()) is not None:
    pytest.skip(_missing, allow_module_level=True)

from passlib.hash import argon2, sha512_crypt

from qpopper.auth.backendargs import parse_backend_args
from qpopper.auth.ldap import (
    LdapBindDatabase,
    LdapSettings,
    LdapUserDatabase,
    escape_dn_value,
    escape_filter_value,
    expand,
)
from qpopper.auth.userdb import DatabaseAuthenticator, UserRecord
from slapd_helpers import BASE, READER_DN, READER_PW, Slapd, user_ldif

PEOPLE = f"ou=people,{BASE}"
ALICE_PW = "alice-Secret-1"
BOB_PW = "bob-Secret-2"
CAROL_PW = "carol-Secret-3"
ODD_PW = "odd-Secret-4"
# A uid made of the characters a filter and a DN reserve: found only by exact escaping.
ODD_UID = "x*)(uid=*"


def _entries(home: Path) -> str:
    alice = sha512_crypt.using(rounds=5000).hash(ALICE_PW)
    carol = argon2.using(type="ID", rounds=2, memory_cost=1024, parallelism=1).hash(CAROL_PW)
    return (
        user_ldif("alice", "{CRYPT}" + alice, 2001, 2001, f"{home}/alice", mail="maildir:%h/Maildir")
        + user_ldif("bob", "{SSHA}" + _ssha(BOB_PW), 2002, 2002, f"{home}/bob")
        + user_ldif("carol", "{ARGON2ID}" + carol, 2003, 2003, f"{home}/carol")
        + user_ldif("a+b=c", "{CRYPT}" + sha512_crypt.using(rounds=5000).hash(ALICE_PW), 2004, 2004, f"{home}/abc")
        + user_ldif(ODD_UID, "{CRYPT}" + sha512_crypt.using(rounds=5000).hash(ODD_PW), 2005, 2005, f"{home}/odd")
    ).replace(f"dn: uid=a+b=c,{PEOPLE}", f"dn: uid=a\\+b\\=c,{PEOPLE}").replace(
        f"dn: uid={ODD_UID},{PEOPLE}", f"dn: uid=x*)(uid\\=*,{PEOPLE}"
    )


def _ssha(password: str) -> str:
    import base64
    import hashlib

    salt = b"saltsalt"
    return base64.b64encode(hashlib.sha1(password.encode() + salt).digest() + salt).decode()


def _start(base: Path) -> Slapd:
    server = Slapd(base)
    server.start()
    try:
        server.load_base()
        server.ldapadd(_entries(base / "home"))
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    server = _start(tmp_path_factory.mktemp("slapd"))
    yield server
    server.stop()


@pytest.fixture
def own_slapd(tmp_path: Path) -> Iterator[Slapd]:
    """A directory of the test's own, to stop, pause and restart."""
    server = _start(tmp_path / "slapd")
    yield server
    server.stop()


def settings_text(server: Slapd, *lines: str, uri: str | None = None) -> str:
    """A dovecot-ldap.conf.ext for `server`; `lines` ("key = value") add or replace."""
    settings = {
        "uris": uri or server.url,
        "base": PEOPLE,
        "dn": READER_DN,
        "dnpass": READER_PW,
        "user_attrs": "homeDirectory=home, uidNumber=uid, gidNumber=gid, description=mail",
        "timeout": "3",
    }
    for line in lines:
        key, _, value = line.partition("=")
        settings[key.strip()] = value.strip()
    return "".join(f"{key} = {value}\n" for key, value in settings.items())


def database(server: Slapd, *lines: str, uri: str | None = None) -> LdapUserDatabase:
    text = settings_text(server, *lines, uri=uri)
    return LdapUserDatabase.from_args(parse_backend_args(text, "dovecot-ldap.conf.ext"))


def authenticator(server: Slapd, *lines: str, uri: str | None = None) -> DatabaseAuthenticator:
    db = database(server, *lines, uri=uri)
    return DatabaseAuthenticator(db, "maildir:/nonexistent/%u", db.settings.default_pass_scheme)


def check(auth: DatabaseAuthenticator, user: str, password: str) -> Principal | None:
    """One login's answer, on an event loop of its own (closed after)."""

    async def run() -> Principal | None:
        try:
            return await auth.authenticate_async(UserPass(user, password.encode()), "127.0.0.1")
        finally:
            await auth.aclose()

    return asyncio.run(run())


def pop_reply(server: Controller, user: str, password: str) -> str:
    """The server's answer to USER/PASS: "+OK..." or the -ERR line."""
    client = poplib.POP3(server.host, server.port, timeout=30)
    try:
        client.user(user)
        reply = client.pass_(password).decode()
        client.quit()
        return reply
    except poplib.error_proto as exc:
        return str(exc.args[0].decode() if isinstance(exc.args[0], bytes) else exc.args[0])
    finally:
        client.close()


def wait_for_reply(server: Controller, user: str, password: str, prefix: str, within: float = 60) -> str:
    deadline = time.monotonic() + within
    while True:
        reply = pop_reply(server, user, password)
        if reply.startswith(prefix) or time.monotonic() > deadline:
            return reply
        time.sleep(0.2)


# ---- the settings file ---------------------------------------------------------------


def test_escaping_follows_rfc_4515_and_4514() -> None:
    assert escape_filter_value("*)(uid=*") == r"\2a\29\28uid=\2a"
    assert escape_filter_value("a\\b\0") == r"a\5cb\00"
    assert escape_filter_value("jörg") == "jörg"  # UTF-8 stays as it is (RFC 4515 allows it)
    assert escape_dn_value("a+b=c,d") == r"a\+b\=c\,d"
    assert escape_dn_value("#x ") == r"\#x\ "
    assert escape_dn_value(" #x") == r"\ #x"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("ldap_version = 2", "only LDAP version 3"),
        ("scope = everything", "scope must be"),
        ("tls = maybe", "tls must be yes or no"),
        ("sasl_bind = yes", "sasl_bind is not supported"),
        ("colour = blue", "has no setting 'colour'"),
        ("user_filter = (uid=%q)", "unknown variable %q"),
        ("pass_attrs = =home", "needs =field=value"),
    ],
)
def test_bad_settings_are_refused_with_their_line(line: str, message: str) -> None:
    text = f"uris = ldap://127.0.0.1\nbase = {PEOPLE}\n{line}\n"
    with pytest.raises(ConfigError, match=message) as caught:
        LdapSettings.from_args(parse_backend_args(text, "ldap.conf"))
    assert "ldap.conf:3" in str(caught.value)


def test_starttls_and_ldaps_together_are_refused() -> None:
    text = f"uris = ldaps://127.0.0.1\nbase = {PEOPLE}\ntls = yes\n"
    with pytest.raises(ConfigError, match="choose one"):
        LdapSettings.from_args(parse_backend_args(text, "ldap.conf"))


def test_hosts_and_defaults_as_dovecot_has_them() -> None:
    settings = LdapSettings.from_args(parse_backend_args(f"hosts = ldap1 ldap2:3389\nbase = {PEOPLE}\n", "x"))
    assert settings.uris == ("ldap://ldap1", "ldap://ldap2:3389")
    assert settings.pass_filter == settings.user_filter == "(&(objectClass=posixAccount)(uid=%u))"
    assert {m.field for m in settings.user_attrs} == {"home", "uid", "gid"}
    assert settings.require_cert == "demand"  # certificates are checked unless the file says otherwise


# ---- the password read by the service account -------------------------------------------


def test_password_attribute_mode_maps_home_uid_gid_and_mail(slapd: Slapd) -> None:
    principal = check(authenticator(slapd), "alice", ALICE_PW)
    home = f"{slapd.base}/home/alice"
    assert principal is not None
    assert (principal.user, principal.uid, principal.gid, principal.home) == ("alice", 2001, 2001, home)
    assert principal.mail == f"maildir:{home}/Maildir"


@pytest.mark.parametrize(("user", "password"), [("bob", BOB_PW), ("carol", CAROL_PW)])
def test_ssha_and_argon2id_hashes_from_the_directory(slapd: Slapd, user: str, password: str) -> None:
    principal = check(authenticator(slapd), user, password)
    assert principal is not None
    assert principal.mail == "maildir:/nonexistent/" + user  # no mail attribute: the server's


def test_wrong_password_and_unknown_user_are_refused(slapd: Slapd) -> None:
    assert check(authenticator(slapd), "alice", "wrong") is None
    assert check(authenticator(slapd), "nobody", ALICE_PW) is None


@pytest.mark.parametrize("user", ["*)(uid=*", "*", "alice)(uid=*", "al*", "*)(|(uid=*"])
def test_filter_metacharacters_in_a_name_match_no_other_entry(slapd: Slapd, user: str) -> None:
    assert check(authenticator(slapd), user, ALICE_PW) is None


def test_an_escaped_name_finds_exactly_its_own_entry(slapd: Slapd) -> None:
    async def run() -> UserRecord | None:
        db = database(slapd)
        try:
            return await db.lookup(ODD_UID, None)
        finally:
            await db.close()

    record = asyncio.run(run())
    assert record is not None
    assert record.uid == 2005  # the entry whose uid is "x*)(uid=*", nobody else's


def test_templates_prefetch_names_and_extra_fields(slapd: Slapd) -> None:
    db = database(
        slapd,
        "user_attrs = homeDirectory=home, =mail=mbox:%{ldap:homeDirectory}/inbox, uidNumber=userdb_uid, "
        "=quota_rule=*:storage=%{ldap:gidNumber}M",
        "pass_attrs = uid=user, userPassword=password, =allow_nets=127.0.0.0/8",
    )

    async def run() -> UserRecord | None:
        try:
            return await db.lookup("alice", "127.0.0.1")
        finally:
            await db.close()

    record = asyncio.run(run())
    home = f"{slapd.base}/home/alice"
    assert record is not None
    assert record.mail == f"mbox:{home}/inbox"
    assert record.uid == 2001 and record.gid is None
    assert dict(record.extra) == {"quota_rule": "*:storage=2001M", "allow_nets": "127.0.0.0/8"}


def test_a_burst_of_logins_takes_turns_on_the_connections(slapd: Slapd) -> None:
    auth = authenticator(slapd, "max_connections = 2")

    async def run() -> list[Principal | None]:
        try:
            return await asyncio.gather(
                *(auth.authenticate_async(UserPass("bob", BOB_PW.encode()), None) for _ in range(40))
            )
        finally:
            await auth.aclose()

    results = asyncio.run(run())
    assert all(r is not None for r in results)


# ---- %l: one address per virtual domain ------------------------------------------------


def test_local_address_in_a_filter_picks_the_entry_and_keys_the_cache(slapd: Slapd) -> None:
    """"dave" is dave@one.example at 127.0.0.1 and dave@two.example at
    127.0.0.2 (sn holds the address here): %l goes into the filter escaped,
    and the auth cache keeps the two answers apart."""
    from qpopper.auth import AuthTuning

    slapd.ldapadd("".join(
        user_ldif(f"dave@{domain}", "{SSHA}" + _ssha(f"{domain}-pw"), uid, uid, f"/home/{domain}", surname=lip)
        .replace(f"cn: dave@{domain}", "cn: dave")
        for domain, lip, uid in [("one.example", "127.0.0.1", 2101), ("two.example", "127.0.0.2", 2102)]
    ))  # fmt: skip
    query = "(&(objectClass=posixAccount)(cn=%n)(sn=%{lip}))"
    db = database(slapd, f"pass_filter = {query}", f"user_filter = {query}",
                  "pass_attrs = uid=user, userPassword=password")  # fmt: skip
    assert db.uses_local and not db.uses_client
    auth = DatabaseAuthenticator(db, "maildir:/nonexistent/%u", tuning=AuthTuning(cache_size=1 << 20))

    async def login(password: str, local: str) -> str | None:
        principal = await auth.authenticate_async(UserPass("dave", password.encode()), "192.0.2.1", local)
        return None if principal is None else principal.user

    async def run() -> None:
        try:
            assert await login("one.example-pw", "127.0.0.1") == "dave@one.example"
            assert await login("one.example-pw", "127.0.0.2") is None  # not .1's cached record
            assert await login("two.example-pw", "127.0.0.2") == "dave@two.example"
            assert await login("one.example-pw", "127.0.0.1") == "dave@one.example"  # a hit
            assert await login("one.example-pw", "*") is None  # a filter's metacharacter, escaped: no entry
        finally:
            await auth.aclose()

    asyncio.run(run())
    assert auth.cache is not None and auth.cache.hits == 2 and auth.lookups == 3
    assert expand("(sn=%l)", {"lip": "*)(cn=*"}, escape_filter_value) == r"(sn=\2a\29\28cn=\2a)"


# ---- auth_bind: the directory checks the password ----------------------------------------


def test_auth_bind_with_a_dn_template_escapes_the_name(slapd: Slapd) -> None:
    lines = ("auth_bind = yes", f"auth_bind_userdn = uid=%u,{PEOPLE}")
    assert isinstance(database(slapd, *lines), LdapBindDatabase)
    principal = check(authenticator(slapd, *lines), "alice", ALICE_PW)
    assert principal is not None and principal.uid == 2001
    assert check(authenticator(slapd, *lines), "a+b=c", ALICE_PW) is not None  # uid=a\+b\=c
    assert check(authenticator(slapd, *lines), "alice", "wrong") is None
    assert check(authenticator(slapd, *lines), "nobody", ALICE_PW) is None


def test_auth_bind_refuses_an_empty_password(slapd: Slapd) -> None:
    """An empty password is an unauthenticated bind, which slapd grants."""
    lines = ("auth_bind = yes", f"auth_bind_userdn = uid=%u,{PEOPLE}")
    assert check(authenticator(slapd, *lines), "alice", "") is None
    db = database(slapd, *lines)
    assert isinstance(db, LdapBindDatabase)

    async def run() -> UserRecord | None:
        try:  # a NUL would end the password early in C: refused before any bind
            return await db.bind("alice", ALICE_PW + "\0tail", None)
        finally:
            await db.close()

    assert asyncio.run(run()) is None


def test_auth_bind_after_a_search_by_the_service_account(slapd: Slapd) -> None:
    principal = check(authenticator(slapd, "auth_bind = yes"), "alice", ALICE_PW)
    assert principal is not None and principal.home == f"{slapd.base}/home/alice"
    assert check(authenticator(slapd, "auth_bind = yes"), "alice", BOB_PW) is None
    assert check(authenticator(slapd, "auth_bind = yes"), "*)(uid=*", ALICE_PW) is None


# ---- TLS to the directory -----------------------------------------------------------------


@pytest.mark.parametrize("how", ["starttls", "ldaps"])
def test_tls_with_the_right_ca(slapd: Slapd, how: str) -> None:
    lines = [f"tls_ca_cert_file = {slapd.ca_file}"] + (["tls = yes"] if how == "starttls" else [])
    auth = authenticator(slapd, *lines, uri=slapd.ldaps_url if how == "ldaps" else None)
    assert check(auth, "alice", ALICE_PW) is not None


@pytest.fixture
def wrong_ca(tmp_path: Path) -> Path:
    import trustme

    path = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


@pytest.mark.parametrize("how", ["starttls", "ldaps"])
def test_a_certificate_from_another_ca_is_sys_temp_not_auth(slapd: Slapd, wrong_ca: Path, how: str) -> None:
    lines = [f"tls_ca_cert_file = {wrong_ca}"] + (["tls = yes"] if how == "starttls" else [])
    auth = authenticator(slapd, *lines, uri=slapd.ldaps_url if how == "ldaps" else None)
    with pytest.raises(AuthUnavailable, match="cannot connect"):
        check(auth, "alice", ALICE_PW)
    with Controller(authenticator=authenticator(slapd, *lines, uri=slapd.ldaps_url if how == "ldaps" else None)) as pop:
        assert pop_reply(pop, "alice", ALICE_PW).startswith("-ERR [SYS/TEMP]")


# ---- a directory that is down or hangs ---------------------------------------------------------


def test_a_stopped_directory_is_sys_temp_and_is_used_again_when_back(own_slapd: Slapd) -> None:
    with Controller(authenticator=authenticator(own_slapd)) as pop:
        assert pop_reply(pop, "alice", ALICE_PW).startswith("+OK")
        own_slapd.stop()
        assert pop_reply(pop, "alice", ALICE_PW).startswith("-ERR [SYS/TEMP]")
        assert pop_reply(pop, "alice", "wrong").startswith("-ERR [SYS/TEMP]")  # never [AUTH] while down
        own_slapd.start()
        assert wait_for_reply(pop, "alice", ALICE_PW, "+OK").startswith("+OK")


def test_a_hanging_directory_is_sys_temp_within_the_timeout(own_slapd: Slapd) -> None:
    with Controller(authenticator=authenticator(own_slapd, "timeout = 1")) as pop:
        assert pop_reply(pop, "bob", BOB_PW).startswith("+OK")
        own_slapd.pause()
        try:
            assert pop_reply(pop, "bob", BOB_PW).startswith("-ERR [SYS/TEMP]")
            assert pop_reply(pop, "alice", ALICE_PW).startswith("-ERR [SYS/TEMP]")
        finally:
            own_slapd.resume()
        assert wait_for_reply(pop, "bob", BOB_PW, "+OK").startswith("+OK")


def test_a_hanging_directory_during_auth_bind_is_sys_temp(own_slapd: Slapd) -> None:
    lines = ("auth_bind = yes", f"auth_bind_userdn = uid=%u,{PEOPLE}", "timeout = 1")
    with Controller(authenticator=authenticator(own_slapd, *lines)) as pop:
        own_slapd.pause()
        try:
            assert pop_reply(pop, "alice", ALICE_PW).startswith("-ERR [SYS/TEMP]")
        finally:
            own_slapd.resume()
        assert wait_for_reply(pop, "alice", ALICE_PW, "+OK").startswith("+OK")


def test_no_password_reaches_a_log_line(own_slapd: Slapd, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for lines in ((), ("auth_bind = yes",)):
        with Controller(authenticator=authenticator(own_slapd, *lines, "timeout = 1")) as pop:
            pop_reply(pop, "alice", ALICE_PW)
            pop_reply(pop, "alice", "wrong-" + BOB_PW)
            own_slapd.pause()
            try:
                pop_reply(pop, "alice", ALICE_PW)
            finally:
                own_slapd.resume()
            own_slapd.stop()
            pop_reply(pop, "alice", ALICE_PW)
            own_slapd.start()
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "SYS/TEMP" in text or "no answer" in text or "cannot connect" in text  # the failures were logged
    for secret in (READER_PW, ALICE_PW, BOB_PW):
        assert secret not in text
    settings = database(own_slapd).settings
    assert READER_PW not in settings.describe() and READER_PW not in repr(settings)


# ---- the daemon, configured as an administrator would -------------------------------------


def test_the_daemon_serves_ldap_users_with_the_cache(slapd: Slapd, tmp_path: Path) -> None:
    """auth-backend = ldap with Dovecot's args file; the maildrop comes from
    the directory's mail attribute; a cached login still checks the password."""
    home = tmp_path / "home" / "bob"
    write_maildir_message(home / "Maildir", b"Subject: hi\n\nfrom the directory\n")
    args = tmp_path / "dovecot-ldap.conf.ext"
    text = settings_text(slapd, "user_attrs = uidNumber=uid, gidNumber=gid, =mail=maildir:" + str(home) + "/Maildir")
    args.write_text("# copied from Dovecot\n" + text)
    daemon = QpopperProcess(tmp_path, ["--workers=1", "--auth-backend=ldap", f"--auth-backend-args={args}",
                                       "--auth-cache-size=1M"])  # fmt: skip
    try:
        for _ in range(2):  # the second login is served from the cache
            client = daemon.login("bob", BOB_PW)
            assert client.stat()[0] == 1
            assert b"from the directory" in b"\n".join(client.retr(1)[1])
            client.quit()
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            daemon.login("bob", "wrong")
        # SIGHUP re-reads the file: its new filter also wants uidNumber=9, which bob has not.
        args.write_text(args.read_text().replace("timeout = 3", "timeout = 3\npass_filter = (&(uid=%u)(uidNumber=9))"))
        daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "user database reloaded" not in daemon.log.read_text():
            assert time.monotonic() < deadline, daemon.log.read_text()
            time.sleep(0.05)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            daemon.login("bob", BOB_PW)
    finally:
        log = daemon.stop()
    assert READER_PW not in log and BOB_PW not in log


def test_a_plain_session_loads_no_ldap_code() -> None:
    code = ("import sys, qpopper.server, qpopper.daemon.cli; "
            "print(sorted(m for m in sys.modules if m.startswith(('bonsai', 'qpopper.auth.ldap'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_check_config_refuses_a_bad_ldap_file_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "ldap.conf"
    bad.write_text(f"uris = ldap://127.0.0.1\nbase = {PEOPLE}\nscope = wide\n")
    result = subprocess.run(QPOPPER + TEST_DAEMON_ARGS + ["--check-config", "--auth-backend=ldap",
                            f"--auth-backend-args={bad}", "127.0.0.1:0"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert [line for line in result.stderr.splitlines() if "error:" in line] == [
        f"qpopper: error: {bad}:3: scope must be base, onelevel or subtree, not 'wide'"
    ]
    assert "Traceback" not in result.stderr
