"""KPOP: qpopper's Kerberos 5 exchange before the POP dialogue (-k, port 1109).

A KPOP client (`fetchmail --auth kerberos_v5`) opens the connection with
MIT's sendauth exchange, before it waits for the greeting:

    client: [len]"KRB5_SENDAUTH_V1.0\\0"  [len]"KPOPV1.0\\0"
    server: one byte, 0 (1: bad sendauth version, 2: bad application version)
    client: [len]AP-REQ
    server: [len]KRB-ERROR, or [0] and then [len]AP-REP when the client
            asked for mutual authentication

`[len]` is a 4-octet big-endian length. The server's side of it is
`krb5_recvauth`, which no maintained Python binding offers; this module
reaches libkrb5 through ctypes. The framing above is read here first, so
that what reaches libkrb5 is complete and bounded (`opening_problem`,
`ap_req_length`): libkrb5 would allocate whatever a length claims, and
compares the version strings as C strings.

`krb5_recvauth` talks to a file descriptor, and blocks on it. It is given
one end of a socket pair that already holds every byte the client sent,
so it never waits on the network: the server reads the client with its
own deadline, off no thread, and then runs `recvauth` in a worker thread
for the CPU part (the keytab, the decryption). What libkrb5 writes back
lands in the pair and goes to the client from there.

After the exchange the client logs in with USER and PASS, the password
ignored as qpopper ignores it; `may_log_in` decides whether the
principal may be that user. Every libkrb5 call's return code is checked
and everything it allocates is freed, on every path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import socket
import struct
from dataclasses import dataclass
from typing import Any

SENDAUTH_VERSION = b"KRB5_SENDAUTH_V1.0\0"
APPL_VERSION = b"KPOPV1.0\0"  # what fetchmail and qpopper's clients send
# qpopper's port for KPOP ("kpop" in /etc/services).
KPOP_PORT = 1109
# The longest version string we read (MIT's own are under 20 octets).
MAX_VERSION_LENGTH = 64
# The longest AP-REQ we take: a ticket with a large authorisation-data
# (Active Directory's PAC) stays under 64 KiB; MIT would allocate any size.
MAX_AP_REQ_LENGTH = 65536

# Answers to the version messages, as krb5_sendauth reads them.
VERSIONS_OK = b"\0"
BAD_SENDAUTH_VERSION = b"\x01"
BAD_APPL_VERSION = b"\x02"

_NT_SRV_HST = 3  # KRB5_NT_SRV_HST: service with the host name as instance
_PAIR_TIMEOUT = 10.0  # seconds any one call on the socket pair may take (they take microseconds)
_LOCAL_NAME_MAX = 1024  # krb5_aname_to_localname's buffer; a longer name is an error, not an overflow


class KpopError(Exception):
    """The exchange failed; the text says why, for the log."""


class KpopUnavailable(KpopError):
    """libkrb5 cannot be loaded, or is not MIT's: KPOP cannot run here."""


@dataclass(frozen=True, slots=True)
class KpopIdentity:
    """Who the client proved to be: the principal, as libkrb5 writes it."""

    principal: str


def length_prefixed(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def opening_problem(sendauth: bytes, appl: bytes) -> bytes | None:
    """The answer byte for bad version strings, or None when both are
    what a KPOP client sends (and so what krb5_recvauth will accept)."""
    if sendauth != SENDAUTH_VERSION:
        return BAD_SENDAUTH_VERSION
    if appl != APPL_VERSION:
        return BAD_APPL_VERSION
    return None


# ---- the C types we read fields of (MIT krb5.h, stable since 1.0) -------------


class _Data(ctypes.Structure):
    _fields_ = (("magic", ctypes.c_int32), ("length", ctypes.c_uint), ("data", ctypes.c_void_p))


class _PrincipalData(ctypes.Structure):
    _fields_ = (
        ("magic", ctypes.c_int32),
        ("realm", _Data),
        ("data", ctypes.POINTER(_Data)),
        ("length", ctypes.c_int32),
        ("type", ctypes.c_int32),
    )


class _EncData(ctypes.Structure):
    _fields_ = (
        ("magic", ctypes.c_int32),
        ("enctype", ctypes.c_int32),
        ("kvno", ctypes.c_uint),
        ("ciphertext", _Data),
    )


class _EncTktPart(ctypes.Structure):
    # Only the leading fields: we read `client` and never allocate one.
    _fields_ = (
        ("magic", ctypes.c_int32),
        ("flags", ctypes.c_int32),
        ("session", ctypes.c_void_p),
        ("client", ctypes.POINTER(_PrincipalData)),
    )


class _Ticket(ctypes.Structure):
    _fields_ = (
        ("magic", ctypes.c_int32),
        ("server", ctypes.c_void_p),
        ("enc_part", _EncData),
        ("enc_part2", ctypes.POINTER(_EncTktPart)),
    )


_Context = ctypes.c_void_p
_Principal = ctypes.POINTER(_PrincipalData)
_Code = ctypes.c_int32


class _Krb5:
    """libkrb5's functions this module calls, declared once."""

    def __init__(self) -> None:
        name = "libkrb5.so.3"  # MIT's soname since 1.3; find_library runs ldconfig, so only as a fall-back
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            name = ctypes.util.find_library("krb5") or name
            try:
                lib = ctypes.CDLL(name)
            except OSError as exc:
                raise KpopUnavailable(f"cannot load libkrb5 ({name}): {exc}") from None
        if not hasattr(lib, "krb5_recvauth") or not hasattr(lib, "krb5_get_error_message"):
            raise KpopUnavailable(f"{name} lacks krb5_recvauth: not MIT Kerberos 5")
        self.lib = lib
        d, ptr, void, text = self._declare, ctypes.POINTER, ctypes.c_void_p, ctypes.c_char_p
        self.init_context = d("krb5_init_context", _Code, ptr(_Context))
        self.free_context = d("krb5_free_context", None, _Context)
        self.get_error_message = d("krb5_get_error_message", void, _Context, _Code)
        self.free_error_message = d("krb5_free_error_message", None, _Context, void)
        self.kt_resolve = d("krb5_kt_resolve", _Code, _Context, text, ptr(void))
        self.kt_default = d("krb5_kt_default", _Code, _Context, ptr(void))
        self.kt_close = d("krb5_kt_close", _Code, _Context, void)
        self.sname_to_principal = d(
            "krb5_sname_to_principal", _Code, _Context, text, text, ctypes.c_int32, ptr(_Principal)
        )
        self.parse_name = d("krb5_parse_name", _Code, _Context, text, ptr(_Principal))
        self.free_principal = d("krb5_free_principal", None, _Context, _Principal)
        self.recvauth = d(
            "krb5_recvauth", _Code,
            _Context, ptr(void), void, text, _Principal, ctypes.c_int32, void, ptr(ptr(_Ticket)),
        )  # fmt: skip
        self.auth_con_init = d("krb5_auth_con_init", _Code, _Context, ptr(void))
        self.auth_con_free = d("krb5_auth_con_free", _Code, _Context, void)
        self.free_ticket = d("krb5_free_ticket", None, _Context, ptr(_Ticket))
        self.unparse_name = d("krb5_unparse_name", _Code, _Context, _Principal, ptr(void))
        self.free_unparsed_name = d("krb5_free_unparsed_name", None, _Context, void)
        self.kuserok = d("krb5_kuserok", ctypes.c_uint, _Context, _Principal, text)
        self.aname_to_localname = d("krb5_aname_to_localname", _Code, _Context, _Principal, ctypes.c_int, void)

    def _declare(self, name: str, restype: Any, *argtypes: Any) -> Any:
        func = getattr(self.lib, name)
        func.restype = restype
        func.argtypes = argtypes
        return func

    def message(self, context: Any, code: int) -> str:
        """libkrb5's text for an error code (freed here)."""
        if not context:
            return f"Kerberos error {code}"
        text = self.get_error_message(context, code)
        if not text:
            return f"Kerberos error {code}"
        try:
            return ctypes.string_at(text).decode("utf-8", "replace")
        finally:
            self.free_error_message(context, text)


@functools.cache
def library() -> _Krb5:
    """libkrb5, loaded at the first use (a server without -k never does)."""
    return _Krb5()


class _Session:
    """One krb5 context and what was allocated in it, all freed at exit."""

    def __init__(self) -> None:
        self.k = library()
        self.context = _Context()
        self._cleanups: list[tuple[Any, Any]] = []
        code = self.k.init_context(ctypes.byref(self.context))
        if code:
            self.context = _Context()
            raise KpopError(f"krb5_init_context failed: {self.k.message(None, code)}")

    def check(self, code: int, what: str) -> None:
        if code:
            raise KpopError(f"{what}: {self.k.message(self.context, code)}")

    def later(self, free: Any, pointer: Any) -> None:
        """Free `pointer` with `free(context, pointer)` when the session ends."""
        self._cleanups.append((free, pointer))

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc: object) -> None:
        for free, pointer in reversed(self._cleanups):
            if pointer:
                free(self.context, pointer)
        self._cleanups.clear()
        if self.context:
            self.k.free_context(self.context)
            self.context = _Context()

    def principal(self, name: str) -> Any:
        out = _Principal()
        self.check(self.k.parse_name(self.context, name.encode("utf-8"), ctypes.byref(out)),
                   f"cannot parse the principal {name!r}")
        self.later(self.k.free_principal, out)
        return out

    def unparse(self, principal: Any) -> str:
        text = ctypes.c_void_p()
        self.check(self.k.unparse_name(self.context, principal, ctypes.byref(text)),
                   "cannot write the client's principal")
        try:
            return ctypes.string_at(text).decode("utf-8", "replace")
        finally:
            self.k.free_unparsed_name(self.context, text)


def recvauth(
    client_bytes: bytes, service: str, hostname: str, keytab: str | None
) -> tuple[KpopIdentity | None, bytes, str]:
    """Run krb5_recvauth over what the client sent (both version messages
    and the AP-REQ, each length-prefixed, exactly as read from it).

    Returns who the client is (None if refused), what libkrb5 answered
    after the version byte (a KRB-ERROR, or the empty message and the
    AP-REP) for the client, and libkrb5's reason when it refused. Blocking
    but never on the network: run it in a worker thread."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with ours, theirs:
            # Room for all of it each way, and a bound on every call should
            # that ever be wrong: a stuck pair is an error, never a hung thread.
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * MAX_AP_REQ_LENGTH)
            ours.settimeout(_PAIR_TIMEOUT)
            theirs.settimeout(None)  # libkrb5 needs a blocking descriptor...
            for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):  # ...whose reads and writes end
                theirs.setsockopt(socket.SOL_SOCKET, option, struct.pack("ll", int(_PAIR_TIMEOUT), 0))
            ours.sendall(client_bytes)
            ours.shutdown(socket.SHUT_WR)  # a short message ends in EOF, never a wait
            identity, reason = _recvauth_on(theirs.fileno(), service, hostname, keytab)
            theirs.shutdown(socket.SHUT_WR)
            reply = _read_all(ours)
    except OSError as exc:
        raise KpopError(f"KPOP exchange failed: {exc}") from None
    if reply[:1] != VERSIONS_OK:  # cannot be: the versions were checked before
        raise KpopError("krb5_recvauth refused the versions it was given")
    return identity, reply[1:], reason


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _recvauth_on(fd: int, service: str, hostname: str, keytab: str | None) -> tuple[KpopIdentity | None, str]:
    with _Session() as s:
        k = s.k
        table = ctypes.c_void_p()
        if keytab:
            s.check(k.kt_resolve(s.context, keytab.encode("utf-8"), ctypes.byref(table)),
                    f"cannot open the keytab {keytab}")
        else:
            s.check(k.kt_default(s.context, ctypes.byref(table)), "cannot open the default keytab")
        s.later(k.kt_close, table)
        server = _Principal()
        s.check(
            k.sname_to_principal(
                s.context, hostname.encode("utf-8"), service.encode("utf-8"), _NT_SRV_HST, ctypes.byref(server)
            ),
            f"cannot name the service {service}/{hostname}",
        )
        s.later(k.free_principal, server)
        # Ours, made before the call: krb5_recvauth frees an auth context it
        # made itself when it fails, but leaves the caller's pointer to it.
        auth_context = ctypes.c_void_p()
        s.check(k.auth_con_init(s.context, ctypes.byref(auth_context)), "krb5_auth_con_init failed")
        s.later(k.auth_con_free, auth_context)
        ticket = ctypes.POINTER(_Ticket)()
        descriptor = ctypes.c_int(fd)
        code = k.recvauth(
            s.context, ctypes.byref(auth_context), ctypes.cast(ctypes.byref(descriptor), ctypes.c_void_p),
            APPL_VERSION.rstrip(b"\0"), server, 0, table, ctypes.byref(ticket),
        )
        s.later(k.free_ticket, ticket)  # set only on success
        if code:
            return None, k.message(s.context, code)
        part = ticket.contents.enc_part2 if ticket else None
        if not part or not part.contents.client:
            raise KpopError("krb5_recvauth returned a ticket without its client")
        return KpopIdentity(s.unparse(part.contents.client)), ""


def may_log_in(principal: str, user: str, realms: tuple[str, ...] = (), unix_accounts: bool = False) -> bool:
    """Whether `principal` may log in as the local `user`, as qpopper
    decides it. A principal with an instance (`alice/admin@R`) never. With
    `realms` configured (kerberos-realms), `user@REALM` for those realms
    only, the rule SASL GSSAPI follows too. Otherwise libkrb5 decides:
    for Unix accounts `krb5_kuserok` (the user's own `~/.k5login`, else
    krb5.conf's auth_to_local rules), qpopper's KUSEROK build; for virtual
    users, who have no home to keep a .k5login in (and whom kuserok
    refuses for that), the auth_to_local mapping alone
    (`krb5_aname_to_localname`; by default the default realm's
    `user@REALM` is `user`). Blocking (it may read files)."""
    with _Session() as s:
        parsed = s.principal(principal)
        if parsed.contents.length != 1:
            return False
        if realms:
            name, _, realm = principal.rpartition("@")
            return realm in realms and name == user
        if unix_accounts:
            return bool(s.k.kuserok(s.context, parsed, user.encode("utf-8")))
        buffer = ctypes.create_string_buffer(_LOCAL_NAME_MAX)
        code = s.k.aname_to_localname(s.context, parsed, len(buffer), buffer)
        if code:  # KRB5_LNAME_NOTRANS: no rule maps it; other codes alike, no local name
            return False
        return buffer.value == user.encode("utf-8")
