"""All run-time settings in one frozen object.

Built once (from defaults, then the command line; the config file and the
per-user option files join in the administrator-surface issue) and passed
down read-only. `replace` gives a changed copy, e.g. for a SIGHUP reload.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..auth.sasl import ALL_MECHANISMS, DEFAULT_MECHANISMS
from ..errors import ConfigError
from ..maildrop.location import DEFAULT_LOCATION


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """One listener: host None means every address (IPv4 and IPv6)."""

    host: str | None
    port: int
    # Implicit TLS ("alternate port", RFC 8314): handshake before the greeting.
    tls: bool = False

    def __str__(self) -> str:
        if self.host is None:
            text = f"*:{self.port}"
        else:
            text = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return text + " (TLS)" if self.tls else text


def parse_listen_address(text: str, default_port: int = 110, tls: bool = False) -> ListenAddress:
    """qpopper's positional `[address][:port]`, with IPv6 in brackets."""
    host: str | None
    port_text = ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"bad listen address {text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"bad listen address {text!r}")
            port_text = rest[1:]
    elif text.count(":") > 1:
        host = text  # a bare IPv6 address without a port
    else:
        host, _, port_text = text.partition(":")
    if port_text:
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ConfigError(f"bad port in listen address {text!r}")
        port = int(port_text)
    else:
        port = default_port
    return ListenAddress(host or None, port, tls)


@dataclass(frozen=True, slots=True)
class Options:
    listen: tuple[ListenAddress, ...] = (ListenAddress(None, 110),)
    passwd_file: str | None = None
    mail_location: str = DEFAULT_LOCATION
    default_password_scheme: str = "CRYPT"
    hostname: str = field(default_factory=socket.getfqdn)
    # RFC 1939: an autologout timer must be at least 10 minutes.
    timeout: float = 600.0
    # Every failed login is answered this long after it was sent, at least;
    # each recent failure from the same address doubles it, up to the max.
    auth_fail_delay: float = 1.0
    auth_fail_delay_max: float = 15.0
    # One log line per failed login in a form fail2ban matches easily.
    log_auth_failures: bool = False
    # Seconds a client has to log in, in all (a slow-drip client cannot
    # hold a connection by sending a byte now and then).
    login_timeout: float = 60.0
    max_connections: int = 1000
    max_connections_per_ip: int = 100
    # Serving processes for virtual users (one core each); 0: one per CPU.
    workers: int = 1
    update_on_abort: bool = False
    shy: bool = False
    apop: bool = True
    allow_user_pass: bool = True
    announce_login_delay: int | None = None
    announce_expire: str | None = "NEVER"
    # Seconds a SIGTERM waits for sessions in UPDATE before exiting.
    drain_timeout: float = 30.0
    use_uvloop: bool = True
    # TLS (qpopper's tls-* options). tls_support None means: STLS when a
    # certificate is configured, nothing otherwise.
    tls_support: str | None = None  # "none" | "stls" | "alternate-port"
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_chain_file: str | None = None
    tls_cipher_list: str | None = None
    tls_ciphersuites: str | None = None
    tls_version: str = "default"
    tls_handshake_timeout: float = 30.0
    # SASL EXTERNAL: clients presenting a certificate from this CA log in as
    # the certificate's common name. Off unless a CA file is given.
    tls_client_ca_file: str | None = None
    # qpopper's clear-text-password (-p): default/never/always/local/tls.
    # None: allowed on TLS and loopback connections only when TLS is
    # configured, everywhere when it is not.
    clear_text_password: str | None = None
    # Offered where usable: EXTERNAL needs a client certificate, -PLUS TLS
    # (and being named here: not offered by default), PLAIN and LOGIN the
    # clear-text policy's consent.
    sasl_mechanisms: tuple[str, ...] = DEFAULT_MECHANISMS
    # Logging and records (qpopper's -d, -s, -t, -y, log-login, timing).
    debug: bool = False
    statistics: bool = False
    timing: bool = False
    trace_file: str | None = None
    log_facility: str = "mail"
    log_login: str | None = None
    syslog_socket: str | None = "/dev/log"
    # Who may log in, and under which name.
    downcase_user: bool = False
    trim_domain: bool = False
    nonauth_file: str | None = "/etc/ftpusers"
    auth_file: str | None = None
    reverse_lookup: bool = True
    enforce_login_delay: bool = False
    auto_delete: bool = False
    user_options: bool = False
    spool_options: bool = False
    # Bulletins (-b, -B): directory, mark database, first-contact count.
    bulldir: str | None = None
    bulldb: bool = False
    bulldb_nonfatal: bool = False
    bulldb_max_tries: int = 75
    max_bulletins: int = 1
    group_bulletins: bool = False
    # Kerberos 5 through SASL GSSAPI (-k, -K): service, keytab, realms.
    kerberos: bool = False
    kerberos_service: str = "pop"
    kerberos_keytab: str | None = None
    kerberos_realms: str | None = None  # space separated; default realm if unset
    # After each login: DRAC (-D), a hook command (no shell), a hook file.
    drac_host: str | None = None
    post_login_command: str | None = None
    post_login_file: str | None = None
    # XTND XMIT: the sendmail-compatible command (no shell), -x, size limit.
    mail_command: str = "/usr/sbin/sendmail"
    xmit_disable: bool = False
    xmit_max_size: int = 10 * 1024 * 1024
    # The APOP database (popauth); a missing file means no APOP secrets.
    apop_file: str | None = "/etc/qpopper/pop.auth"
    # mbox spools live here; so do qpopper's per-user spool option files.
    spool_dir: str = "/var/mail"
    hash_spool: int = 0
    home_dir_mail: str | None = None
    check_hash_dir: bool = True
    # qpopper's spool handling (-S, -F, temp drop, write-back, UW kluge).
    # Server mode is the default here: the spool is locked only while it is
    # indexed and committed, so the temp copy buys nothing and costs I/O.
    server_mode: bool = True
    group_server_mode: str | None = None
    group_no_server_mode: str | None = None
    fast_update: bool = False
    keep_temp_drop: bool = False
    temp_dir: str | None = None
    temp_name: str = ".%s.pop"
    # Off: messages are served exactly as delivered (qpopper added an
    # X-UIDL header); UIDs are stable without it. `set` it to write
    # Status: RO and X-UIDL: back as qpopper did.
    update_status_headers: bool = False
    uw_kluge: bool = False
    # System users (Unix accounts through PAM, a process per session that
    # drops to the user) unless a passwd-file of virtual users is given.
    auth_backend: str = "auto"  # "auto" | "pam" | "passwd-file"
    pam_service: str = "pop3"
    min_uid: int = 1000
    # Where each value came from ("default", "file:line", "-T", "--name"),
    # and the settings given that have no effect in this server.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    ignored: tuple[str, ...] = field(default=(), compare=False)

    @property
    def system_users(self) -> bool:
        if self.auth_backend == "auto":
            return self.passwd_file is None
        return self.auth_backend == "pam"

    @property
    def effective_mail_location(self) -> str:
        """Where system users' mail is: qpopper's <spool-dir>/<user> mbox
        unless mail-location was set."""
        if self.system_users and "mail_location" not in self.sources:
            return f"mbox:{self.spool_dir.rstrip('/')}/%u"
        return self.mail_location

    @property
    def tls_configured(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def effective_workers(self) -> int:
        """Serving processes: `workers`, or one per CPU this process may use."""
        return self.workers or len(os.sched_getaffinity(0))

    @property
    def effective_tls_support(self) -> str:
        if self.tls_support is not None:
            return self.tls_support
        return "stls" if self.tls_configured else "none"

    def replace(self, **changes: object) -> Options:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def source_of(self, name: str) -> str:
        return self.sources.get(name, "default")


def _convert(name: str, value: object, where: str) -> object:
    """Field-specific forms and checks beyond the setting's kind."""
    if name == "announce_expire":
        text = str(value).strip()
        if text.lower() == "never":
            return "NEVER"
        if not text.isdigit():
            raise ConfigError(f"{where}: announce-expire must be a number of days or never", where)
        return str(int(text))
    if name == "announce_login_delay":
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where}: announce-login-delay must be a number of seconds", where)
    if name in ("timeout", "auth_fail_delay", "auth_fail_delay_max", "tls_handshake_timeout", "drain_timeout", "login_timeout"):
        if not isinstance(value, float) or value < 0 or (name == "timeout" and value == 0):
            raise ConfigError(f"{where}: {name.replace('_', '-')} must be a positive number of seconds", where)
    if name == "workers" and (not isinstance(value, int) or not 0 <= value <= 256):
        raise ConfigError(f"{where}: workers must be 0 (one per CPU) to 256", where)
    if name in ("max_connections", "max_connections_per_ip"):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: {name.replace('_', '-')} must be at least 1", where)
    if name == "sasl_mechanisms":
        names = tuple(m.upper() for m in str(value).replace(",", " ").split())
        unknown = [m for m in names if m not in ALL_MECHANISMS]
        if unknown:
            raise ConfigError(f"{where}: unknown SASL mechanism {unknown[0]} (known: {' '.join(ALL_MECHANISMS)})", where)
        return names
    if name in ("nonauth_file", "auth_file", "trace_file", "log_login", "home_dir_mail", "temp_dir", "group_server_mode", "group_no_server_mode", "bulldir", "drac_host", "post_login_command", "post_login_file", "kerberos_keytab", "kerberos_realms") and value == "":
        return None
    if name == "hash_spool" and value not in (0, 1, 2):
        raise ConfigError(f"{where}: hash-spool must be 0, 1 or 2", where)
    if name == "temp_name" and (str(value).count("%s") != 1 or "/" in str(value)):
        raise ConfigError(f"{where}: temp-name must hold one %s and no slash", where)
    return value


def apply_settings(options: Options, assignments: Iterable[tuple[str, object, str]]) -> Options:
    """Apply (setting name, value, source) in order; later ones win."""
    from .settings import lookup

    changes: dict[str, object] = {}
    sources = dict(options.sources)
    ignored = list(options.ignored)
    for name, value, where in assignments:
        setting = lookup(name)
        if setting is None:
            raise ConfigError(f"{where}: unknown option {name!r}")
        if setting.field is None:
            if setting.name not in ignored:
                ignored.append(setting.name)
            sources[setting.name] = where
            continue
        changes[setting.field] = _convert(setting.field, value, where)
        sources[setting.field] = where
    return dataclasses.replace(options, sources=sources, ignored=tuple(ignored), **changes)  # type: ignore[arg-type]
