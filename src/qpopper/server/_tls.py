"""TLS contexts from the tls-* options, channel binding, live reloads.

Defaults follow RFC 8996/8997: TLS 1.2 is the minimum, and qpopper's old
`tls-version` values (SSLv2, SSLv3, TLSv1, SSLv23, all) are raised to it
with a log line rather than honoured. A certificate reload (SIGHUP) loads
the new files into the live context, which new handshakes use at once
while established sessions keep theirs.
"""

from __future__ import annotations

import ctypes
import logging
import os
import ssl

from ..config.options import Options
from ..config.settings import LEGACY_TLS_VERSION_NAMES, TLS_VERSION_NAMES
from ..errors import ConfigError

log = logging.getLogger("qpopper.tls")

# The names are the settings registry's (config/settings.py); this maps them to protocols.
_MINIMUM_VERSIONS = {
    "default": ssl.TLSVersion.TLSv1_2,
    "tlsv1.2": ssl.TLSVersion.TLSv1_2,
    "tlsv1.3": ssl.TLSVersion.TLSv1_3,
}
assert set(_MINIMUM_VERSIONS) == {name.lower() for name in TLS_VERSION_NAMES}
# qpopper 4.x names that asked for older protocols than we will speak.
_LEGACY_VERSIONS = {name.lower() for name in LEGACY_TLS_VERSION_NAMES}
TLS_VERSIONS = sorted(_MINIMUM_VERSIONS) + sorted(_LEGACY_VERSIONS)
# TLS 1.2 suites offered unless tls-cipher-list says otherwise: forward
# secret and AEAD only. Python's own default adds the CBC suites with
# SHA-256/384 MACs (Lucky 13 territory); every client that speaks TLS 1.2,
# our floor, has AES-GCM or ChaCha20-Poly1305. TLS 1.3 suites are all AEAD.
DEFAULT_CIPHER_LIST = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"


def minimum_version(name: str) -> ssl.TLSVersion:
    key = name.lower()
    if key in _MINIMUM_VERSIONS:
        return _MINIMUM_VERSIONS[key]
    if key in _LEGACY_VERSIONS:
        log.warning("tls-version %s is obsolete; using TLS 1.2 as the minimum", name)
        return ssl.TLSVersion.TLSv1_2
    raise ConfigError(f"unknown tls-version {name!r} (expected one of {', '.join(TLS_VERSIONS)})")


def _readable(path: str, what: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from exc


def _has_private_key(path: str) -> bool:
    """Whether a PEM file holds a key: OpenSSL's own word for its absence is "PEM lib"."""
    try:
        with open(path, "rb") as f:
            return b"PRIVATE KEY-----" in f.read()
    except OSError:
        return True  # unreadable now: let the original error speak


def _load_chain(ctx: ssl.SSLContext, options: Options) -> None:
    assert options.tls_cert_file is not None
    cert = options.tls_cert_file
    key = options.tls_key_file or cert
    _readable(cert, "tls-server-cert-file")
    _readable(key, "tls-private-key-file")
    combined: str | None = None
    try:
        if options.tls_chain_file:
            # Python loads a chain only from the certificate file itself.
            _readable(options.tls_chain_file, "tls-chain-file")
            import tempfile  # here: it pulls in shutil, bz2 and lzma, ~0.5 MB a server rarely needs

            fd, combined = tempfile.mkstemp(prefix="qpopper-chain-", suffix=".pem")
            with os.fdopen(fd, "wb") as out:
                for part in (cert, options.tls_chain_file):
                    with open(part, "rb") as f:
                        out.write(f.read().rstrip(b"\n") + b"\n")
            cert = combined
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise ConfigError(
                f"tls-private-key-file {key} does not match the certificate {options.tls_cert_file}"
            ) from exc
        if not _has_private_key(key):
            missing = "tls-private-key-file" if options.tls_key_file else "no tls-private-key-file is set and it"
            raise ConfigError(f"{key} has no private key ({missing} must hold the PEM key)") from exc
        raise ConfigError(f"cannot load certificate {options.tls_cert_file} / key {key}: {exc.reason or exc}") from exc
    finally:
        if combined is not None:
            os.unlink(combined)


def _set_tls13_ciphersuites(ctx: ssl.SSLContext, suites: str) -> None:
    """Python has no API for TLS 1.3 suites; call OpenSSL through the
    library the ssl module itself uses, after checking that the context
    pointer is the right one."""
    import _ssl

    lib = ctypes.CDLL(_ssl.__file__)
    get_options = lib.SSL_CTX_get_options
    get_options.restype = ctypes.c_uint64
    get_options.argtypes = [ctypes.c_void_p]
    set_suites = lib.SSL_CTX_set_ciphersuites
    set_suites.restype = ctypes.c_int
    set_suites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not pointer or get_options(pointer) != int(ctx.options):
        raise ConfigError("tls-ciphersuites cannot be set with this Python build")
    if set_suites(pointer, suites.encode("ascii")) != 1:
        raise ConfigError(f"tls-ciphersuites {suites!r} names no usable TLS 1.3 suite")


def build_context(options: Options) -> ssl.SSLContext:
    if options.tls_cert_file is None:
        raise ConfigError("TLS needs tls-server-cert-file (and tls-private-key-file)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = minimum_version(options.tls_version)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    ciphers = options.tls_cipher_list or DEFAULT_CIPHER_LIST
    try:
        ctx.set_ciphers(ciphers)
    except ssl.SSLError as exc:
        raise ConfigError(f"tls-cipher-list {ciphers!r} selects no cipher") from exc
    if options.tls_ciphersuites:
        _set_tls13_ciphersuites(ctx, options.tls_ciphersuites)
    _load_chain(ctx, options)
    if options.tls_client_ca_file:
        _readable(options.tls_client_ca_file, "tls-client-ca-file")
        try:
            ctx.load_verify_locations(cafile=options.tls_client_ca_file)
        except ssl.SSLError as exc:
            raise ConfigError(f"tls-client-ca-file {options.tls_client_ca_file}: {exc.reason or exc}") from exc
        ctx.verify_mode = ssl.CERT_OPTIONAL  # a certificate is asked for, never required
    return ctx


def tls_failure_reason(exc: BaseException) -> str:
    """What went wrong in a handshake or a TLS record, in one log-line
    phrase: OpenSSL's reason (an alert the client sent, a protocol
    mismatch) rather than the exception's repr with its C file and line."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    return str(exc) or type(exc).__name__


def certificate_identity(ssl_object: ssl.SSLObject | None) -> str | None:
    """The common name of a client certificate the handshake verified."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    subject: tuple[tuple[tuple[str, str], ...], ...] = cert.get("subject", ())  # type: ignore[assignment]
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def reload_certificates(ctx: ssl.SSLContext, options: Options) -> None:
    """Check the files in a scratch context first, so a bad edit never
    breaks the live one."""
    build_context(options)
    _load_chain(ctx, options)

