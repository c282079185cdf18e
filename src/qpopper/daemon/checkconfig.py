"""`qpopper --check-config`: load what the daemon would load and say what is wrong.

`--show-config` prints the settings as parsed; this check goes further, as
`nginx -t` or `doveconf` do: it reads the passwd-file and the APOP
database, loads the certificate and key, and binds the listen addresses,
so that a configuration that parses but cannot serve is caught before the
daemon is put into service. Each problem is one line, with file:line where
there is one. The content checks (`content_problems`) are also what the
daemon logs as warnings at start-up: the same words in both places.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from ..auth.passwdfile import SCHEMES, split_scheme
from ..config.options import ListenAddress, Options
from ..errors import ConfigError
from ..usernames import is_valid_username

ERROR = "error"
WARNING = "warning"

# passlib's handler for each crypt scheme whose hash format can be checked
# without a password (the scheme names are the passwd-file's).
_CRYPT_FORMATS = {
    "SHA512-CRYPT": ("sha512_crypt",),
    "SHA256-CRYPT": ("sha256_crypt",),
    "MD5-CRYPT": ("md5_crypt",),
    "BLF-CRYPT": ("bcrypt",),
    "BCRYPT": ("bcrypt",),
    "CRYPT": ("sha512_crypt", "sha256_crypt", "bcrypt", "md5_crypt", "des_crypt"),
}


@dataclass(frozen=True)
class Problem:
    """One finding: how bad, where (file:line, a setting, or None), what."""

    severity: str
    where: str | None
    text: str

    def __str__(self) -> str:
        prefix = f"{self.where}: " if self.where else ""
        return f"{prefix}{self.severity}: {self.text}"


def _hash_is_wellformed(scheme: str, hashed: str) -> bool:
    import passlib.hash  # the check-config run and start-up only; sessions load it on demand anyway

    for name in _CRYPT_FORMATS[scheme]:
        handler = getattr(passlib.hash, name)
        if not handler.identify(hashed):
            continue
        try:
            handler.from_string(hashed)
        except ValueError:
            return False
        return True
    return False


def passwd_file_problems(path: str, default_scheme: str) -> Iterator[Problem]:
    """Lines of a passwd-file that can never log anybody in, or that are shadowed."""
    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        yield Problem(ERROR, path, "not UTF-8 text")
        return
    except OSError as exc:
        yield Problem(ERROR, path, f"cannot read passwd-file: {exc.strerror}")
        return
    first_seen: dict[str, int] = {}
    for lineno, line in enumerate(lines, 1):
        where = f"{path}:{lineno}"
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if ":" not in line:
            yield Problem(ERROR, where, "no ':' on this line (expected user:password[:uid:gid:gecos:home:shell:extra])")
            continue
        user, _, rest = line.partition(":")
        if not is_valid_username(user):
            yield Problem(ERROR, where, f"invalid user name {user!r}")
            continue
        if user in first_seen:
            first = first_seen[user]
            yield Problem(WARNING, where, f"user {user} is already defined at line {first}; this line is ignored")
            continue
        first_seen[user] = lineno
        password = rest.split(":", 1)[0]
        scheme, hashed = split_scheme(password, default_scheme)
        if scheme.partition(".")[0] not in SCHEMES:
            yield Problem(ERROR, where, f"unsupported password scheme {{{scheme}}} for {user}")
        elif not password:
            yield Problem(ERROR, where, f"{user} has an empty password and can never log in")
        elif scheme in _CRYPT_FORMATS and not _hash_is_wellformed(scheme, hashed):
            if not password.startswith("{") and scheme == default_scheme:
                yield Problem(
                    ERROR, where,
                    f"the password of {user} has no {{SCHEME}} and is not a {default_scheme} hash, so it can never "
                    f"match: write {{PLAIN}}secret or a hash (e.g. from mkpasswd -m sha-512)",
                )  # fmt: skip
            else:
                yield Problem(ERROR, where, f"malformed {{{scheme}}} hash for {user}: it can never match")


def backend_args_problems(options: Options) -> list[Problem]:
    """The sql or ldap backend's settings file, read as the daemon reads it
    (without connecting: the database may be down while this runs)."""
    from ..auth.userdb import open_user_database

    where = options.source_of("auth_backend_args") if options.auth_backend_args else options.source_of("auth_backend")
    if not options.auth_backend_args:
        text = f"auth-backend {options.auth_backend} needs auth-backend-args (its settings file)"
        return [Problem(ERROR, where, text)]
    path = options.auth_backend_args
    try:
        open_user_database(options.auth_backend, path)
    except ConfigError as exc:
        return [Problem(ERROR, None, str(exc))]
    from ..auth.backendargs import read_backend_args

    args = read_backend_args(path)  # read fine just now
    holds_secret = "password=" in (args.get("connect") or "") or bool(args.get("dnpass"))  # sql, ldap
    try:
        readable_by_all = os.stat(path).st_mode & 0o004
    except OSError:
        return []
    if readable_by_all and holds_secret:
        return [Problem(WARNING, path, "every user can read this file, and it holds the database password (chmod o-r)")]
    return []


def content_problems(options: Options) -> list[Problem]:
    """What is wrong in the files and settings, without binding or building TLS."""
    problems: list[Problem] = []
    if options.passwd_file and options.auth_backend not in ("sql", "ldap") and not options.system_users:
        problems += passwd_file_problems(options.passwd_file, options.default_password_scheme)
    if options.tls_key_file and not options.tls_cert_file:
        text = "tls-private-key-file is set but tls-server-cert-file is not; TLS stays off"
        problems.append(Problem(WARNING, options.source_of("tls_key_file"), text))
    if options.system_users:
        pam_file = os.path.join("/etc/pam.d", options.pam_service)
        if not os.path.exists(pam_file):
            problems.append(Problem(WARNING, options.source_of("pam_service"),
                                    f"PAM service {options.pam_service} has no {pam_file}: PAM uses 'other', "
                                    "which usually refuses everybody"))  # fmt: skip
        if "mail_location" not in options.sources and not os.path.isdir(options.spool_dir):
            problems.append(Problem(WARNING, options.source_of("spool_dir"),
                                    f"spool-dir {options.spool_dir} does not exist"))  # fmt: skip
    return problems


def _tls_problems(options: Options) -> list[Problem]:
    from ..server._tls import build_context

    problems: list[Problem] = []
    if options.tls_configured:
        try:
            build_context(options)
        except ConfigError as exc:
            problems.append(Problem(ERROR, options.source_of("tls_cert_file"), str(exc)))
    elif options.effective_tls_support != "none" or any(a.tls for a in options.listen):
        where = options.source_of("tls_support") if options.tls_support else options.source_of("listen")
        problems.append(Problem(ERROR, where, "TLS is enabled but no certificate is configured (tls-server-cert-file)"))
    return problems


def _apop_problems(options: Options) -> list[Problem]:
    if not options.apop_file or not os.path.exists(options.apop_file):
        return []
    from ..auth.apopdb import ApopDatabase

    try:
        ApopDatabase(options.apop_file).load()
    except ConfigError as exc:
        return [Problem(ERROR, options.source_of("apop_file"), str(exc))]
    return []


def bind_problem(address: ListenAddress) -> str | None:
    """Why `address` cannot be bound now, or None: bound and released at once."""
    family = socket.AF_INET6 if address.host is None or ":" in address.host else socket.AF_INET
    host = address.host or "::"
    try:
        infos = socket.getaddrinfo(host, address.port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        if address.host is None:  # no IPv6 here: the daemon falls back to IPv4
            infos = socket.getaddrinfo("0.0.0.0", address.port, socket.AF_INET, socket.SOCK_STREAM)
        else:
            return f"cannot resolve {address.host}: {exc.strerror}"
    fam, kind, proto, _, sockaddr = infos[0]
    with socket.socket(fam, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            return f"cannot bind {address}: {exc.strerror}"
    return None


def check_options(options: Options, bind: bool = True) -> list[Problem]:
    """Every problem a start with these options would meet, in the order met."""
    problems = content_problems(options)
    if options.auth_backend in ("sql", "ldap"):  # at start-up, the same error stops the daemon
        problems += backend_args_problems(options)
    problems += _apop_problems(options)
    problems += _tls_problems(options)
    if options.system_users and os.geteuid() != 0:
        problems.append(Problem(WARNING, None, "system users need root: the daemon refuses to start as this user"))
    if bind:
        for address in options.listen:
            reason = bind_problem(address)
            if reason is not None:
                problems.append(Problem(ERROR, options.source_of("listen"), reason))
    return problems


def report(problems: list[Problem]) -> tuple[str, int]:
    """The lines to print and the exit status: 1 on any error, 0 with warnings only."""
    lines = [f"qpopper: {p}" for p in problems]
    errors = sum(p.severity == ERROR for p in problems)
    warnings = len(problems) - errors
    lines.append(f"qpopper: configuration check: {errors} error(s), {warnings} warning(s)")
    return "\n".join(lines) + "\n", 1 if errors else 0
