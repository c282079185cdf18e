"""All run-time settings in one frozen object.

Built once (the registry's defaults, then -f config files and switches in
command-line order) and passed down read-only; after login the user option
files give a changed copy for that session (`apply_settings`), as does a
SIGHUP reload (`replace`). Each field's default and check belong to its
setting in the registry (settings.py); this class only declares the types.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .settings import BY_FIELD, lookup


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """One listener: host None means every address (IPv4 and IPv6)."""

    host: str | None
    port: int
    # Implicit TLS ("alternate port", RFC 8314): handshake before the greeting.
    tls: bool = False
    # Behind a load balancer: each connection starts with a PROXY protocol
    # header from a trusted network (haproxy-trusted-networks).
    proxy: bool = False
    # KPOP (qpopper's -k on port 1109): the Kerberos exchange before the greeting.
    kpop: bool = False

    def __str__(self) -> str:
        if self.host is None:
            text = f"*:{self.port}"
        else:
            text = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        if self.kpop:
            return text + " (KPOP)"
        text = text + " (TLS)" if self.tls else text
        return text + " (PROXY)" if self.proxy else text


def parse_listen_address(text: str, default_port: int = 110, tls: bool = False, proxy: bool = False) -> ListenAddress:
    """qpopper's positional `[address][:port]`, with IPv6 in brackets.

    A bare number is a port on every address, as in the manual's own
    `popper 8110 -S -T600`: no host name is all digits (RFC 1123 names
    end in a letter-led label), so nothing is lost by reading it so.
    """
    host: str | None
    port_text = ""
    if text.isascii() and text.isdigit():
        host, port_text = None, text
    elif text.startswith("["):
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
        if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
            raise ConfigError(f"bad port in listen address {text!r}")
        port = int(port_text)
    else:
        port = default_port
    return ListenAddress(host or None, port, tls, proxy)


def doubtful_settings(options: Options) -> list[str]:
    """Combinations that start but do not do what they seem to ask, one
    sentence each, for the start-up log (and a configuration check)."""
    out = []
    if options.auto_delete and options.announce_expire not in (None, "0"):
        out.append(
            f"announce-expire {options.announce_expire} is overridden by auto-delete: "
            "retrieved mail is deleted at QUIT, so EXPIRE 0 is announced"
        )
    return out


def _default(name: str) -> Any:
    """The registry's default for field `name` (typed by the field)."""
    return BY_FIELD[name].default


def _default_factory(name: str) -> Callable[[], Any]:
    factory = BY_FIELD[name].default_factory
    assert factory is not None
    return factory


@dataclass(frozen=True, slots=True)
class Options:
    """Every setting (see settings.SETTINGS for each one's meaning), plus
    the listeners, the switches embedders set in code (`apop`,
    `allow_user_pass`) and where each value came from."""

    listen: tuple[ListenAddress, ...] = (ListenAddress(None, 110),)
    passwd_file: str | None = _default("passwd_file")
    mail_location: str = _default("mail_location")
    default_password_scheme: str = _default("default_password_scheme")
    hostname: str = field(default_factory=_default_factory("hostname"))
    # RFC 1939: an autologout timer must be at least 10 minutes.
    timeout: float = _default("timeout")
    # Every failed login is answered this long after it was sent, at least;
    # each recent failure from the same address doubles it, up to the max.
    auth_fail_delay: float = _default("auth_fail_delay")
    auth_fail_delay_max: float = _default("auth_fail_delay_max")
    # One log line per failed login in a form fail2ban matches easily.
    log_auth_failures: bool = _default("log_auth_failures")
    # Operations: the OpenMetrics endpoint, its processes' files, the control sockets (who, kick).
    metrics_listen: str | None = _default("metrics_listen")
    metrics_dir: str | None = _default("metrics_dir")
    control_dir: str | None = _default("control_dir")
    # Seconds a client has to log in, in all (a slow-drip client cannot
    # hold a connection by sending a byte now and then).
    login_timeout: float = _default("login_timeout")
    max_connections: int = _default("max_connections")
    max_connections_per_ip: int = _default("max_connections_per_ip")
    # Serving processes for virtual users (one core each); 0: one per CPU.
    workers: int = _default("workers")
    update_on_abort: bool = _default("update_on_abort")
    shy: bool = _default("shy")
    apop: bool = True
    allow_user_pass: bool = True
    announce_login_delay: int | None = _default("announce_login_delay")
    announce_expire: str | None = _default("announce_expire")
    # Seconds a SIGTERM waits for sessions in UPDATE before exiting.
    drain_timeout: float = _default("drain_timeout")
    use_uvloop: bool = _default("use_uvloop")
    # TLS (qpopper's tls-* options). tls_support None means: STLS when a
    # certificate is configured, nothing otherwise.
    tls_support: str | None = _default("tls_support")  # "none" | "stls" | "alternate-port"
    tls_cert_file: str | None = _default("tls_cert_file")
    tls_key_file: str | None = _default("tls_key_file")
    tls_chain_file: str | None = _default("tls_chain_file")
    tls_cipher_list: str | None = _default("tls_cipher_list")
    tls_ciphersuites: str | None = _default("tls_ciphersuites")
    tls_version: str = _default("tls_version")
    tls_handshake_timeout: float = _default("tls_handshake_timeout")
    # SASL EXTERNAL: clients presenting a certificate from this CA log in as
    # the certificate's common name. Off unless a CA file is given.
    tls_client_ca_file: str | None = _default("tls_client_ca_file")
    # qpopper's clear-text-password (-p): default/never/always/local/tls.
    # None: allowed on TLS and loopback connections only when TLS is
    # configured, everywhere when it is not.
    clear_text_password: str | None = _default("clear_text_password")
    # Offered where usable: EXTERNAL needs a client certificate, -PLUS TLS
    # (and being named: not offered by default), PLAIN and LOGIN the
    # clear-text policy's consent.
    sasl_mechanisms: tuple[str, ...] = _default("sasl_mechanisms")
    # Logging and records (qpopper's -d, -s, -t, -y, log-login, timing).
    debug: bool = _default("debug")
    statistics: bool = _default("statistics")
    timing: bool = _default("timing")
    trace_file: str | None = _default("trace_file")
    log_facility: str = _default("log_facility")
    log_login: str | None = _default("log_login")
    syslog_socket: str | None = _default("syslog_socket")
    # Who may log in, and under which name.
    downcase_user: bool = _default("downcase_user")
    trim_domain: bool = _default("trim_domain")
    nonauth_file: str | None = _default("nonauth_file")
    auth_file: str | None = _default("auth_file")
    reverse_lookup: bool = _default("reverse_lookup")
    enforce_login_delay: bool = _default("enforce_login_delay")
    auto_delete: bool = _default("auto_delete")
    user_options: bool = _default("user_options")
    spool_options: bool = _default("spool_options")
    # Bulletins (-b, -B): directory, mark database, first-contact count.
    bulldir: str | None = _default("bulldir")
    bulldb: bool = _default("bulldb")
    bulldb_nonfatal: bool = _default("bulldb_nonfatal")
    bulldb_max_tries: int = _default("bulldb_max_tries")
    max_bulletins: int = _default("max_bulletins")
    group_bulletins: bool = _default("group_bulletins")
    # Kerberos 5 through SASL GSSAPI (-k, -K): service, keytab, realms.
    kerberos: bool = _default("kerberos")
    kerberos_service: str = _default("kerberos_service")
    kerberos_keytab: str | None = _default("kerberos_keytab")
    kerberos_realms: str | None = _default("kerberos_realms")  # space separated; default realm if unset
    # After each login: DRAC (-D), a hook command (no shell), a hook file.
    drac_host: str | None = _default("drac_host")
    post_login_command: str | None = _default("post_login_command")
    post_login_file: str | None = _default("post_login_file")
    # XTND XMIT: the sendmail-compatible command (no shell), -x, size limit.
    mail_command: str = _default("mail_command")
    xmit_disable: bool = _default("xmit_disable")
    xmit_max_size: int = _default("xmit_max_size")
    # The APOP database (popauth); a missing file means no APOP secrets.
    apop_file: str | None = _default("apop_file")
    # mbox spools live here; so do qpopper's per-user spool option files.
    spool_dir: str = _default("spool_dir")
    hash_spool: int = _default("hash_spool")
    home_dir_mail: str | None = _default("home_dir_mail")
    check_hash_dir: bool = _default("check_hash_dir")
    # qpopper's spool handling (-S, -F, temp drop, write-back, UW kluge).
    # Server mode is the default here: the spool is locked only while it is
    # indexed and committed, so the temp copy buys nothing and costs I/O.
    server_mode: bool = _default("server_mode")
    group_server_mode: str | None = _default("group_server_mode")
    group_no_server_mode: str | None = _default("group_no_server_mode")
    fast_update: bool = _default("fast_update")
    keep_temp_drop: bool = _default("keep_temp_drop")
    temp_dir: str | None = _default("temp_dir")
    temp_name: str = _default("temp_name")
    # Off: messages are served exactly as delivered (qpopper added an
    # X-UIDL header); UIDs are stable without it. `set` it to write
    # Status: RO and X-UIDL: back as qpopper did.
    update_status_headers: bool = _default("update_status_headers")
    uw_kluge: bool = _default("uw_kluge")
    # System users (Unix accounts through PAM, a process per session that
    # drops to the user) unless a passwd-file of virtual users is given.
    auth_backend: str = _default("auth_backend")  # "auto" | "pam" | "passwd-file" | "sql" | "ldap"
    auth_backend_args: str | None = _default("auth_backend_args")
    auth_cache_size: int = _default("auth_cache_size")
    auth_cache_ttl: float = _default("auth_cache_ttl")
    auth_cache_negative_ttl: float = _default("auth_cache_negative_ttl")
    auth_hash_workers: int = _default("auth_hash_workers")
    pam_service: str = _default("pam_service")
    min_uid: int = _default("min_uid")
    # Behind HAProxy: who may send PROXY headers, how long one may take,
    # and whether TLS the balancer terminated counts as TLS here.
    haproxy_trusted_networks: str | None = _default("haproxy_trusted_networks")
    haproxy_timeout: float = _default("haproxy_timeout")
    haproxy_tls_is_secure: bool = _default("haproxy_tls_is_secure")
    # State shared by several instances (failure delays, LOGIN-DELAY,
    # per-address caps) in Redis; unset: each process keeps its own.
    redis_url: str | None = _default("redis_url")
    redis_timeout: float = _default("redis_timeout")
    redis_key_prefix: str = _default("redis_key_prefix")
    # The mail storage is shared by several hosts: session locks do not rely on OFD locks alone.
    shared_storage: bool = _default("shared_storage")
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


def apply_settings(options: Options, assignments: Iterable[tuple[str, object, str]]) -> Options:
    """Apply (setting name, value, source) in order; later ones win. Each
    value is one its setting parsed (or a switch gave) and is checked here
    by the setting's own rule."""
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
        changes[setting.field] = setting.convert(value, where)
        sources[setting.field] = where
    return dataclasses.replace(options, sources=sources, ignored=tuple(ignored), **changes)  # type: ignore[arg-type]
