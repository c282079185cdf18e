"""The clear-text password policy: may this connection send a password?

qpopper's `-p`/`clear-text-password` values keep their meanings; the
default when nothing is set follows Dovecot's disable_plaintext_auth: once
TLS is configured, passwords travel only over TLS or loopback.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..netaddr import is_loopback as _is_loopback_address

CLEAR_TEXT_POLICIES = ("default", "never", "always", "local", "tls")
# qpopper's -p numbers (note: not the order of its config-file names).
CLEAR_TEXT_BY_NUMBER = {"0": "default", "1": "never", "2": "always", "3": "local", "4": "tls"}


def parse_clear_text_policy(value: str) -> str:
    key = value.lower()
    key = CLEAR_TEXT_BY_NUMBER.get(key, key)
    if key == "ssl":
        key = "tls"
    if key not in CLEAR_TEXT_POLICIES:
        raise ConfigError(f"clear-text-password must be one of {', '.join(CLEAR_TEXT_POLICIES)} or 0-4, not {value!r}")
    return key


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
