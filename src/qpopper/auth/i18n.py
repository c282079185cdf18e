"""UTF-8 user names and passwords (RFC 6856 section 2.2), prepared as
RFC 8265 says, so that the forms a keyboard may produce of one name or
password (composed or decomposed letters, a no-break space) compare equal.

Only non-ASCII input comes here: an ASCII name or password is used as
sent, exactly as before, and the PRECIS library is loaded only by the
first session that needs it (a plain session never does).

The profiles (RFC 8265): user names take UsernameCasePreserved, the
successor of SASLprep's rules that RFC 6856 names, since user names here
are case-sensitive as on Unix; with `downcase-user` UsernameCaseMapped.
Passwords take OpaqueString. The precis-i18n package implements them.
"""

from __future__ import annotations


def prepare_username(name: str, casefold: bool = False) -> str | None:
    """`name` in its prepared form, or None if RFC 8265 disallows it."""
    if name.isascii():
        return name
    import precis_i18n  # only sessions with a UTF-8 name pay for it

    profile = precis_i18n.get_profile("UsernameCaseMapped" if casefold else "UsernameCasePreserved")
    try:
        prepared: str = profile.enforce(name)
    except UnicodeError:
        return None
    return prepared


def prepare_password(password: bytes) -> bytes | None:
    """A UTF-8 password in its prepared form (OpaqueString, as UTF-8), or
    None if it is not well-formed UTF-8 or RFC 8265 disallows it."""
    if password.isascii():
        return password
    try:
        text = password.decode("utf-8")
    except UnicodeDecodeError:
        return None
    import precis_i18n

    try:
        prepared: str = precis_i18n.get_profile("OpaqueString").enforce(text)
    except UnicodeError:
        return None
    return prepared.encode("utf-8")
