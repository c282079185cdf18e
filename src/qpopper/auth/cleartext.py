"""The clear-text password policy: may this connection send a password?

qpopper's `-p`/`clear-text-password` values (read by the settings registry)
keep their meanings; the default when nothing is set follows Dovecot's
disable_plaintext_auth: once TLS is configured, passwords travel only over
TLS or loopback.
"""

from __future__ import annotations

from ..netaddr import is_loopback as _is_loopback_address


def is_loopback(host: str) -> bool:
    return _is_loopback_address(host) or host == "local"  # stdio (inetd on a pipe) has no address


def plaintext_allowed(policy: str | None, *, tls_active: bool, peer: str, tls_configured: bool) -> bool:
    if policy is None:
        return tls_active or not tls_configured or is_loopback(peer)
    if policy == "never":
        return False
    if policy == "local":
        return is_loopback(peer)
    if policy == "tls":
        return tls_active
    # "default" (allowed unless the user has an APOP secret: checked at
    # authentication) and "always".
    return True
