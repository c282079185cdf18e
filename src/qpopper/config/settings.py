"""The one registry of settings: qpopper's switches and config-file options,
and this server's own.

Everything that reads or documents settings works from this table: the
`Options` defaults, the command line (getopt's strings, the usage line and
`--help`, in `commandline`), the config file and the per-user option files
(`configfile`), `qpopper --show-config`, and the generated manual pages.
A setting names the `Options` field it fills, its default, how its text is
parsed and then checked, its qpopper switch, and where it may be set:
qpopper's restriction classes, read strictly (a restricted option is
refused in both user option files).
"""

from __future__ import annotations

import enum
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass

from ..auth.sasl import ALL_MECHANISMS, DEFAULT_MECHANISMS
from ..errors import ConfigError
from ..maildrop.location import DEFAULT_LOCATION


class Restriction(enum.Enum):
    NONE = "anywhere"  # also in ~/.qpopper-options and the spool option file
    USER = "restricted"  # not in user option files
    INIT = "start-up"  # only on the command line and in -f files


class Kind(enum.Enum):
    BOOL = "boolean"
    INT = "integer"
    FLOAT = "number"
    STR = "string"
    MNEMONIC = "mnemonic"


# A setting's own rule, run on every value it is given (from any source)
# after its kind's parser: returns the value to store, or ConfigError.
Check = Callable[["Setting", object, str], object]


@dataclass(frozen=True, slots=True)
class Setting:
    name: str  # config-file name (case-insensitive)
    field: str | None  # Options field; None: accepted, logged as ignored
    kind: Kind
    help: str
    restriction: Restriction = Restriction.NONE
    switch: str | None = None  # qpopper's one-letter switch, e.g. "-T"
    mnemonics: tuple[tuple[str, object], ...] = ()  # accepted words -> value
    ignored: str | None = None  # why a C-only option has no effect here
    qpopper: bool = True  # in qpopper 4.1's table (else our own)
    default: object = None  # the field's value when nothing sets it
    # For a default known only at run time (the host name), and its wording.
    default_factory: Callable[[], object] | None = None
    default_text: str | None = None
    check: Check | None = None

    def parse(self, text: str, where: str) -> object:
        """Turn the text of a value into the field's value, or ConfigError."""
        try:
            return _PARSERS[self.kind](self, text)
        except ValueError as exc:
            raise ConfigError(f"{where}: {self.name}: {exc}", where) from None

    def convert(self, value: object, where: str) -> object:
        """A parsed value (or one a switch gave) as the field holds it."""
        return value if self.check is None else self.check(self, value, where)

    def value_word(self) -> str:
        """What the value is called in the usage and the manual pages."""
        if self.kind is Kind.BOOL:
            return ""
        if self.mnemonics:
            return "|".join(dict.fromkeys(w for w, _ in self.mnemonics))
        return str(self.kind.value)

    def describe_default(self) -> str:
        """The default as the manual pages and `--help` write it."""
        if self.field is None:
            return "none"
        if self.default_text is not None:
            return self.default_text
        value = self.default
        if value is None:
            return "unset"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            return f"{value:g}"
        if isinstance(value, tuple):
            return " ".join(str(v) for v in value)
        return str(value)


def _bool(setting: Setting, text: str) -> object:
    word = text.strip().lower()
    if word in ("true", "yes", "on"):
        return True
    if word in ("false", "no", "off"):
        return False
    try:
        number = _int(setting, text)
    except ValueError:
        number = None
    if number in (0, 1):
        return bool(number)
    raise ValueError(f"expected true, false, 1 or 0 (or yes/no, on/off), not {text!r}")


def _int(setting: Setting, text: str) -> int:
    word = text.strip()
    try:
        # qpopper reads numbers with strtol(..., 0): 0x1F and 017 work.
        if word.lower().startswith(("0x", "-0x")):
            return int(word, 16)
        if len(word.lstrip("-")) > 1 and word.lstrip("-").startswith("0"):
            return int(word, 8)
        return int(word, 10)
    except ValueError:
        raise ValueError(f"expected a number, not {text!r}") from None


def _float(setting: Setting, text: str) -> object:
    try:
        return float(_int(setting, text))
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number, not {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"expected a finite number, not {text!r}")
    return value


def _str(setting: Setting, text: str) -> object:
    return text


def _mnemonic(setting: Setting, text: str) -> object:
    for word, value in setting.mnemonics:
        if word.lower() == text.strip().lower():
            return value
    words = ", ".join(w for w, _ in setting.mnemonics)
    raise ValueError(f"expected one of {words}, not {text!r}")


_PARSERS: dict[Kind, Callable[[Setting, str], object]] = {
    Kind.BOOL: _bool,
    Kind.INT: _int,
    Kind.FLOAT: _float,
    Kind.STR: _str,
    Kind.MNEMONIC: _mnemonic,
}

# ---- the settings' own checks -----------------------------------------------


def _refuse(setting: Setting, where: str, rule: str) -> ConfigError:
    return ConfigError(f"{where}: {setting.name} {rule}", where)


def _expire_days(setting: Setting, value: object, where: str) -> object:
    text = str(value).strip()
    if text.lower() == "never":
        return "NEVER"
    if not text.isdigit():
        raise _refuse(setting, where, "must be a number of days or never")
    return str(int(text))


def _delay_seconds(setting: Setting, value: object, where: str) -> object:
    if not isinstance(value, int) or value < 0:
        raise _refuse(setting, where, "must be a number of seconds")
    return value


def _seconds(setting: Setting, value: object, where: str) -> object:
    if not isinstance(value, float) or value < 0:
        raise _refuse(setting, where, "must be a positive number of seconds")
    return value


def _timer_seconds(setting: Setting, value: object, where: str) -> object:
    if value == 0:
        raise _refuse(setting, where, "must be a positive number of seconds")
    return _seconds(setting, value, where)


def _worker_count(setting: Setting, value: object, where: str) -> object:
    if not isinstance(value, int) or not 0 <= value <= 256:
        raise _refuse(setting, where, "must be 0 (one per CPU) to 256")
    return value


def _at_least_one(setting: Setting, value: object, where: str) -> object:
    if not isinstance(value, int) or value < 1:
        raise _refuse(setting, where, "must be at least 1")
    return value


def _mechanism_list(setting: Setting, value: object, where: str) -> object:
    words = value if isinstance(value, tuple) else str(value).replace(",", " ").split()
    names = tuple(str(m).upper() for m in words)
    unknown = [m for m in names if m not in ALL_MECHANISMS]
    if unknown:
        raise ConfigError(f"{where}: unknown SASL mechanism {unknown[0]} (known: {' '.join(ALL_MECHANISMS)})", where)
    return names


def _networks(setting: Setting, value: object, where: str) -> object:
    import ipaddress  # only where the setting is given: a plain daemon never loads it

    text = str(value).replace(",", " ").strip()
    for word in text.split():
        try:
            ipaddress.ip_network(word, strict=False)
        except ValueError as exc:
            raise _refuse(setting, where, f"holds a bad network: {exc}") from None
    return text or None


_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30}
_TIME_UNITS = {
    "": 1, "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1, "m": 60, "min": 60, "mins": 60, "minute": 60,
    "minutes": 60, "h": 3600, "hour": 3600, "hours": 3600, "d": 86400, "day": 86400, "days": 86400,
}


def _byte_size(setting: Setting, value: object, where: str) -> object:
    """Bytes, with Dovecot's units: 10M, 512 k, 1G."""
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", str(value))
    if match is None or match.group(2).upper() not in _SIZE_UNITS:
        raise _refuse(setting, where, "must be a size such as 0, 512k or 10M")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]


def _duration(setting: Setting, value: object, where: str) -> object:
    """Seconds, with Dovecot's units: 3600, 1 hour, 10 mins."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    if match is None or match.group(2).lower() not in _TIME_UNITS:
        raise _refuse(setting, where, "must be a time such as 3600, 10 mins or 1 hour")
    return float(match.group(1)) * _TIME_UNITS[match.group(2).lower()]


def _empty_is_unset(setting: Setting, value: object, where: str) -> object:
    return None if value == "" else value


def _hash_method(setting: Setting, value: object, where: str) -> object:
    if value not in (0, 1, 2):
        raise _refuse(setting, where, "must be 0, 1 or 2")
    return value


# tls-version's names (server/_tls.py maps them to protocol versions): the
# current ones, and qpopper 4.x's older ones, which mean TLS 1.2 here.
TLS_VERSION_NAMES = ("default", "TLSv1.2", "TLSv1.3")
LEGACY_TLS_VERSION_NAMES = ("SSLv2", "SSLv3", "SSLv23", "TLSv1", "TLSv1.0", "TLSv1.1", "all")


def _tls_version(setting: Setting, value: object, where: str) -> object:
    known = {name.lower() for name in TLS_VERSION_NAMES + LEGACY_TLS_VERSION_NAMES}
    if str(value).strip().lower() not in known:
        names = ", ".join(TLS_VERSION_NAMES)
        raise _refuse(setting, where, f"must be {names} (or an older qpopper name), not {value!r}")
    return str(value).strip()


def _temp_drop_name(setting: Setting, value: object, where: str) -> object:
    if str(value).count("%s") != 1 or "/" in str(value):
        raise _refuse(setting, where, "must hold one %s and no slash")
    return value


B, INT, F, S, M = Kind.BOOL, Kind.INT, Kind.FLOAT, Kind.STR, Kind.MNEMONIC
U, INIT = Restriction.USER, Restriction.INIT

_FACILITIES = tuple((name, name) for name in ("mail", "daemon", "user", *(f"local{i}" for i in range(8))))
_CLEAR_TEXT = (
    ("default", "default"),
    ("never", "never"),
    ("always", "always"),
    ("local", "local"),
    ("tls", "tls"),
    ("ssl", "tls"),
    *((number, name) for number, name in (("0", "default"), ("1", "never"), ("2", "always"), ("3", "local"),
                                          ("4", "tls"))),
)
_TLS_SUPPORT = (
    ("default", "none"),
    ("none", "none"),
    ("stls", "stls"),
    ("alternate-port", "alternate-port"),
    ("0", "none"),
    ("1", "stls"),
    ("2", "alternate-port"),
)
_C_ONLY = "an OpenSSL/SSL Plus build detail of the C qpopper"

SETTINGS: tuple[Setting, ...] = (
    # ---- qpopper 4.1 -----------------------------------------------------
    Setting("announce-expire", "announce_expire", S, "days announced as EXPIRE in CAPA, or never (-e expire=N)",
            default="NEVER", check=_expire_days),
    Setting("announce-login-delay", "announce_login_delay", INT,
            "seconds announced as LOGIN-DELAY in CAPA (-e login_delay=N)", check=_delay_seconds),
    Setting("auth-file", "auth_file", S, "only users listed in this file may log in", INIT, check=_empty_is_unset),
    Setting("auto-delete", "auto_delete", B, "delete retrieved messages at QUIT; announces EXPIRE 0", U, default=False),
    Setting("bulldb-max-tries", "bulldb_max_tries", INT, "attempts to lock the bulletin database", default=75),
    Setting("bulldb-nonfatal", "bulldb_nonfatal", B, "let the login go on when the bulletin database cannot be opened",
            switch="-B", default=False),
    Setting("bulldir", "bulldir", S, "bulletin directory (turns bulletins on)", switch="-b", check=_empty_is_unset),
    Setting("cache-dir", None, S, "qpopper's drop cache directory", U, ignored="this server keeps no drop cache file"),
    Setting("cache-name", None, S, "qpopper's drop cache file name", U, ignored="this server keeps no drop cache file"),
    Setting("check-hash-dir", "check_hash_dir", B, "create missing hashed spool directories", default=True),
    Setting("check-old-spool-loc", None, B, "look for a temp drop in the pre-hashing place",
            ignored="temp drops are looked for where the current settings put them"),
    Setting("check-password-expired", None, B, "refuse accounts whose password expired", INIT,
            ignored="expired passwords and accounts are always refused: PAM's account stage checks them, and the "
                    "shadow entry for logins proved otherwise"),
    Setting("chunky-writes", None, M, "output buffering of the C qpopper",
            mnemonics=(("default", "always"), ("always", "always"), ("tls", "tls"), ("ssl", "tls"), ("never", "never")),
            ignored="replies are always batched here"),
    Setting("clear-text-password", "clear_text_password", M, "where USER/PASS and SASL PLAIN/LOGIN are allowed", U,
            "-p", mnemonics=_CLEAR_TEXT),
    Setting("config-file", None, S, "read another config file here", switch="-f"),
    Setting("debug", "debug", B, "log debug records", switch="-d", default=False),
    Setting("downcase-user", "downcase_user", B, "lower-case user names before lookup", U, "-c", default=False),
    Setting("drac-host", "drac_host", S, "DRAC server told the address of each client that logs in", switch="-D",
            check=_empty_is_unset),
    Setting("fast-update", "fast_update", B, "rename instead of copy where the temp drop allows it", switch="-F",
            default=False),
    Setting("group-bulletins", "group_bulletins", B, "NUMBER.GROUP bulletin files go to that group only", U,
            default=False),
    Setting("group-no-server-mode", "group_no_server_mode", S, "group whose members never get server mode", U,
            check=_empty_is_unset),
    Setting("group-server-mode", "group_server_mode", S, "group whose members get server mode", U,
            check=_empty_is_unset),
    Setting("hash-spool", "hash_spool", INT, "hashed spool directories, method 1 or 2", U, default=0,
            check=_hash_method),
    Setting("home-dir-mail", "home_dir_mail", S, "the spool is ~/<this> instead of <spool-dir>/<user>", U,
            check=_empty_is_unset),
    Setting("keep-temp-drop", "keep_temp_drop", B, "keep .<user>.pop after the session", U, default=False),
    Setting("kerberos", "kerberos", B, "Kerberos 5 logins: SASL GSSAPI, and KPOP on port 1109 (--kpop-listen)", U,
            "-k", default=False),
    Setting("kerberos-service", "kerberos_service", S, "Kerberos service name (principal service/host)", U, "-K",
            default="pop"),
    Setting("kerberos-keytab", "kerberos_keytab", S, "keytab with the service key", INIT, qpopper=False,
            default_text="the system's", check=_empty_is_unset),
    Setting("kerberos-realms", "kerberos_realms", S, "realms whose user@REALM principals are local users", INIT,
            qpopper=False, default_text="the default realm", check=_empty_is_unset),
    Setting("log-facility", "log_facility", M, "syslog facility", INIT, "-y", mnemonics=_FACILITIES, default="mail"),
    Setting("log-login", "log_login", S, "template of the login record: %0 version, %1 user, %2 host, %3 address", INIT,
            check=_empty_is_unset),
    Setting("mail-command", "mail_command", S, "sendmail-compatible command for XTND XMIT (run without a shell)", U,
            default="/usr/sbin/sendmail"),
    Setting("mail-lock-check", None, INT, "refresh the mail lock every n messages while copying", switch="-L",
            ignored="the dotlock is refreshed by time, at least every 60 s"),
    Setting("max-bulletins", "max_bulletins", INT, "bulletins a user seen for the first time gets (the newest ones)",
            default=1),
    Setting("no-atomic-open", None, B, "do not trust O_EXCL (old NFS)", U,
            ignored="lock files are made by link(2), which NFS honours"),
    Setting("nonauth-file", "nonauth_file", S, "users listed in this file may not log in", INIT,
            default="/etc/ftpusers", check=_empty_is_unset),
    Setting("old-style-uid", None, B, "qpopper 2.x hex UIDs",
            ignored="UIDs are qpopper 4's; spools from before 3.0 keep theirs only through X-UIDL headers"),
    Setting("reverse-lookup", "reverse_lookup", B, "look up the client's host name (-R turns it off)", U, default=True),
    Setting("server-mode", "server_mode", B, "serve the spool in place, no temp copy (the default here)", switch="-S",
            default=True),
    Setting("shy", "shy", B, "hide the version in the greeting and CAPA", INIT, default=False),
    Setting("spool-dir", "spool_dir", S, "mbox spool directory; also holds .<user>.qpopper-options", U,
            default="/var/mail"),
    Setting("spool-options", "spool_options", B, "read <spool-dir>/.<user>.qpopper-options after login", U, "-U",
            default=False),
    Setting("statistics", "statistics", B, "log a statistics record at session end", switch="-s", default=False),
    Setting("temp-dir", "temp_dir", S, "directory of the temp drop", U, default_text="the spool's",
            check=_empty_is_unset),
    Setting("temp-name", "temp_name", S, "name of the temp drop, %s being the spool's name", U, default=".%s.pop",
            check=_temp_drop_name),
    Setting("timeout", "timeout", F, "autologout timer in seconds (RFC 1939: at least 600)", switch="-T", default=600.0,
            check=_timer_seconds),
    Setting("timing", "timing", B, "log a timing record at session end", default=False),
    Setting("tls-cipher-list", "tls_cipher_list", S, "OpenSSL cipher list for TLS 1.2", INIT),
    Setting("tls-identity-file", None, S, "SSL Plus identity", INIT, ignored=_C_ONLY),
    Setting("tls-options", None, INT, "OpenSSL SSL_OP_* bits", U, ignored=_C_ONLY),
    Setting("tls-passphrase", None, S, "SSL Plus key passphrase", INIT, ignored=_C_ONLY),
    Setting("tls-private-key-file", "tls_key_file", S, "private key of the certificate", INIT),
    Setting("tls-server-cert-file", "tls_cert_file", S, "server certificate (PEM)", INIT),
    Setting("tls-support", "tls_support", M, "none, stls, or alternate-port (implicit TLS)", INIT, "-l",
            mnemonics=_TLS_SUPPORT),
    Setting("tls-version", "tls_version", S, "minimum TLS version: TLSv1.2 or TLSv1.3; older names mean TLSv1.2", INIT,
            default="default", check=_tls_version),
    Setting("tls-workarounds", None, B, "OpenSSL SSL_OP_ALL", U, ignored=_C_ONLY),
    Setting("tracefile", "trace_file", S, "append every command and reply here (passwords masked)", INIT, "-t",
            check=_empty_is_unset),
    Setting("trim-domain", "trim_domain", B, "drop @domain from user names", U, "-C", default=False),
    Setting("update-on-abort", "update_on_abort", B, "commit deletions when the connection is lost (off: RFC 1939)",
            default=False),
    Setting("update-status-headers", "update_status_headers", B,
            "write Status: RO and X-UIDL: into mbox spools when they are rewritten", default=False),
    Setting("user-options", "user_options", B, "read ~/.qpopper-options after login", U, "-u", default=False),
    Setting("UW-kluge", "uw_kluge", B, "hide UW-IMAP's folder-data first message", default=False),
    Setting("xmit-disable", "xmit_disable", B, "refuse XTND XMIT (qpopper 4.1 -x)", U, "-x", default=False),
    Setting("xmit-max-size", "xmit_max_size", INT, "largest message XTND XMIT accepts, in octets", U, qpopper=False,
            default=10 * 1024 * 1024),
    # ---- this server's own -----------------------------------------------
    Setting("bulldb", "bulldb", B,
            "keep bulletin marks in <bulldir>/bulldb instead of ~/.popbull (qpopper: --enable-bulldb)", qpopper=False,
            default=False),
    Setting("post-login-command", "post_login_command", S,
            "run after each login (no shell) with arguments: user, address, time", INIT, qpopper=False,
            check=_empty_is_unset),
    Setting("post-login-file", "post_login_file", S, "append \"TIME USER ADDRESS\" to this file after each login", INIT,
            qpopper=False, check=_empty_is_unset),
    Setting("apop-file", "apop_file", S, "the APOP database managed with popauth (qpopper: --enable-apop=path)", INIT,
            qpopper=False, default="/etc/qpopper/pop.auth"),
    Setting("auth-backend", "auth_backend", M,
            "pam: system users, a process per session; passwd-file: virtual users; sql, ldap: virtual users in a "
            "database (auth-backend-args); auto: pam unless passwd-file is set",
            INIT, mnemonics=(("auto", "auto"), ("pam", "pam"), ("passwd-file", "passwd-file"), ("sql", "sql"),
                             ("ldap", "ldap")), qpopper=False, default="auto"),
    Setting("auth-backend-args", "auth_backend_args", S,
            "the sql or ldap backend's settings file, in Dovecot's dovecot-sql.conf.ext / dovecot-ldap.conf.ext format",
            INIT, qpopper=False, check=_empty_is_unset),
    Setting("auth-cache-size", "auth_cache_size", S, "bytes of looked-up users kept (0: no cache), e.g. 10M", INIT,
            qpopper=False, default=0, check=_byte_size),
    Setting("auth-cache-ttl", "auth_cache_ttl", S, "how long a cached user is used, e.g. 1 hour", INIT,
            qpopper=False, default=3600.0, check=_duration),
    Setting("auth-cache-negative-ttl", "auth_cache_negative_ttl", S,
            "how long \"no such user\" is cached (0: not at all)", INIT, qpopper=False, default=3600.0,
            check=_duration),
    Setting("auth-hash-workers", "auth_hash_workers", INT,
            "slow password hashes (ARGON2ID, BLF-CRYPT, SHA512-CRYPT) checked at once (0: one per CPU)", INIT,
            qpopper=False, default=0, check=_worker_count),
    Setting("pam-service", "pam_service", S, "PAM service name for system users", INIT, qpopper=False, default="pop3"),
    Setting("min-uid", "min_uid", INT, "lowest uid that may log in (root never may)", INIT, qpopper=False,
            default=1000),
    Setting("passwd-file", "passwd_file", S, "virtual users, Dovecot passwd-file format", INIT, qpopper=False),
    Setting("mail-location", "mail_location", S, "maildrop template, e.g. maildir:~/Maildir", INIT, qpopper=False,
            default=DEFAULT_LOCATION),
    Setting("default-password-scheme", "default_password_scheme", S, "scheme of hashes without {SCHEME}", INIT,
            qpopper=False, default="CRYPT"),
    Setting("hostname", "hostname", S, "name in the greeting and APOP stamp", INIT, qpopper=False,
            default_factory=socket.getfqdn, default_text="this host's name"),
    Setting("auth-fail-delay", "auth_fail_delay", F, "seconds before a failed login is answered", INIT, qpopper=False,
            default=1.0, check=_seconds),
    Setting("auth-fail-delay-max", "auth_fail_delay_max", F,
            "cap of the failure delay, which doubles per recent failure from one address", INIT, qpopper=False,
            default=15.0, check=_seconds),
    Setting("log-auth-failures", "log_auth_failures", B,
            "log each failed login as 'authentication failure; rhost=ADDRESS user=NAME' (fail2ban)", INIT,
            qpopper=False, default=False),
    Setting("metrics-listen", "metrics_listen", S,
            "address[:port] of the OpenMetrics endpoint (HTTP, /metrics); empty: no metrics", INIT, qpopper=False,
            check=_empty_is_unset),
    Setting("metrics-dir", "metrics_dir", S,
            "directory of the serving processes' metric files (emptied at start; a root daemon gives it nobody's "
            "group, mode 2750, for the exporter); default: a private temporary one",
            INIT, qpopper=False, check=_empty_is_unset),
    Setting("control-dir", "control_dir", S,
            "directory of the control sockets qpopper-admin talks to (who, kick); empty: none", INIT, qpopper=False,
            check=_empty_is_unset),
    Setting("login-timeout", "login_timeout", F, "seconds a client has to log in after connecting", INIT, qpopper=False,
            default=60.0, check=_seconds),
    Setting("enforce-login-delay", "enforce_login_delay", B,
            "refuse logins within announce-login-delay of the last one", U, qpopper=False, default=False),
    Setting("max-connections", "max_connections", INT, "sessions at once in total", INIT, qpopper=False, default=1000,
            check=_at_least_one),
    Setting("max-connections-per-ip", "max_connections_per_ip", INT, "sessions at once per client address", INIT,
            qpopper=False, default=100, check=_at_least_one),
    Setting("tls-chain-file", "tls_chain_file", S, "intermediate certificates", INIT, qpopper=False),
    Setting("tls-ciphersuites", "tls_ciphersuites", S, "TLS 1.3 cipher suites", INIT, qpopper=False),
    Setting("tls-client-ca-file", "tls_client_ca_file", S, "CA of client certificates for SASL EXTERNAL", INIT,
            qpopper=False),
    Setting("tls-handshake-timeout", "tls_handshake_timeout", F, "seconds a TLS handshake may take", INIT,
            qpopper=False, default=30.0, check=_seconds),
    Setting("sasl-mechanisms", "sasl_mechanisms", S, "SASL mechanisms to offer (space separated)", INIT, qpopper=False,
            default=DEFAULT_MECHANISMS, check=_mechanism_list),
    Setting("syslog-socket", "syslog_socket", S, "syslog's socket; empty: no syslog", INIT, qpopper=False,
            default="/dev/log"),
    Setting("drain-timeout", "drain_timeout", F, "seconds SIGTERM waits for sessions in UPDATE", INIT, qpopper=False,
            default=30.0, check=_seconds),
    Setting("use-uvloop", "use_uvloop", B, "use uvloop when installed", INIT, qpopper=False, default=True),
    Setting("haproxy-trusted-networks", "haproxy_trusted_networks", S,
            "networks whose PROXY headers are believed (space separated, e.g. 10.0.0.0/8 ::1)", INIT, qpopper=False,
            check=_networks),
    Setting("haproxy-timeout", "haproxy_timeout", F, "seconds the PROXY header may take to arrive", INIT,
            qpopper=False, default=3.0, check=_timer_seconds),
    Setting("haproxy-tls-is-secure", "haproxy_tls_is_secure", B,
            "TLS terminated at the balancer (its SSL TLV) counts as TLS for clear-text-password", INIT,
            qpopper=False, default=False),
    Setting("redis-url", "redis_url", S, "Redis shared by instances: redis://host:port/db or unix:///path",
            INIT, qpopper=False, check=_empty_is_unset),
    Setting("redis-timeout", "redis_timeout", F, "seconds a Redis call may take before per-process state is used",
            INIT, qpopper=False, default=0.25, check=_timer_seconds),
    Setting("redis-key-prefix", "redis_key_prefix", S, "prefix of this service's Redis keys", INIT, qpopper=False,
            default="qpopper:"),
    Setting("shared-storage", "shared_storage", B,
            "the mail is on storage several hosts share (NFS): session locks also take an owner file", INIT,
            qpopper=False, default=False),
    Setting("workers", "workers", INT, "serving processes sharing the listeners (virtual users; 0: one per CPU)", INIT,
            qpopper=False, default=1, check=_worker_count),
)

BY_NAME: dict[str, Setting] = {s.name.lower(): s for s in SETTINGS}
BY_FIELD: dict[str, Setting] = {s.field: s for s in SETTINGS if s.field is not None}
BY_NAME["uw-kludge"] = BY_NAME["uw-kluge"]
BY_SWITCH: dict[str, Setting] = {s.switch: s for s in SETTINGS if s.switch}
# Every setting is also a long option: --name=value, and --name / --no-name
# for Booleans; the command line is generated from this table.
BY_LONG: dict[str, Setting] = {s.name.lower(): s for s in SETTINGS}


def lookup(name: str) -> Setting | None:
    return BY_NAME.get(name.lower())
