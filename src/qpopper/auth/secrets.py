"""Checks against a clear (plaintext-equivalent) secret, shared by every
backend that stores one: APOP, CRAM-MD5 and USER/PASS all reduce to one
constant-time comparison."""

from __future__ import annotations

import hashlib
import hmac

from .credentials import ApopDigest, CramMD5, Credentials, UserPass


def matches_secret(secret: bytes, credentials: Credentials) -> bool:
    if isinstance(credentials, UserPass):
        return hmac.compare_digest(secret, credentials.password)
    if isinstance(credentials, ApopDigest):
        expected = hashlib.md5(credentials.timestamp.encode("ascii") + secret).hexdigest()
        return hmac.compare_digest(expected, credentials.digest)
    if isinstance(credentials, CramMD5):
        expected = hmac.new(secret, credentials.challenge, hashlib.md5).hexdigest()
        return hmac.compare_digest(expected, credentials.digest)
    return False
