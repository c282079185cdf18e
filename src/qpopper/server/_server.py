"""The asyncio server: listeners, the connection registry, limits, shutdown.

One `Server` serves any mix of listening sockets: addresses it binds
itself, sockets handed over by systemd, or a single inetd connection on
stdin/stdout. It never configures logging, installs signal handlers or
exits the process; the command line (`qpopper.daemon.cli`) and the embedding
`Controller` do those things.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from ..auth import AsyncAuthenticator, Authenticator, AuthTuning, Reloadable, UserLookup
from ..auth.access import AccessPolicy
from ..auth.filestamp import recheck_all
from ..auth.passwdfile import PasswdFileAuthenticator
from ..config.options import ListenAddress, Options
from ..errors import ConfigError
from ._channel_binding import server_end_point
from ._connection import Connection
from ._memory import TRIM_INTERVAL, release_free_memory
from ._services import Peer, Services, TlsState
from ._stream import PopStream
from ._tls import build_context, reload_certificates, tls_failure_reason

if TYPE_CHECKING:
    from ..auth.kpop import KpopIdentity
    from ._proxied import ProxyPolicy
    from .proxyheader import ProxyHeader

log = logging.getLogger("qpopper.server")
T = TypeVar("T")

_BUSY_REPLY = b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"


def _host_of(info: object) -> str | None:
    """The address of a socket name or a PROXY header's (address, port);
    None for an AF_UNIX one. An IPv4 address on a dual-stack socket is
    written as IPv4, as queries and logs expect it."""
    if isinstance(info, tuple) and len(info) >= 2:
        host = str(info[0])
        return host[7:] if host.startswith("::ffff:") and "." in host else host
    return None


def _peer_from(info: object, local: object = None, tls_at_balancer: bool = False) -> Peer:
    """The client's address from a socket's peer name (an AF_UNIX one is
    "local"), or from the (address, port) of a trusted PROXY header; `local`
    is the other end's name (the socket's own, or the header's destination)."""
    host = _host_of(info)
    if host is not None:
        assert isinstance(info, tuple)
        return Peer(host, int(info[1]), tls_at_balancer, local=_host_of(local))
    return Peer("local", 0)


def _behind_balancer(balancer: Peer, header: ProxyHeader, policy: ProxyPolicy) -> Peer:
    """The client a trusted balancer's header names; the balancer itself for
    its own health checks (LOCAL) and for clients it cannot name."""
    if header.command == "LOCAL":
        return dataclasses.replace(balancer, balancer_check=True)
    if header.source is None:  # UNKNOWN: a client the balancer cannot name
        return balancer
    return _peer_from(header.source, header.destination, tls_at_balancer=policy.secure(header))


def _peer_of(stream: PopStream) -> Peer:
    peer = stream.get_extra_info("peername")
    local = None
    if isinstance(peer, tuple):  # a network socket: not inetd's pipes, where asking the name fails
        try:
            local = stream.get_extra_info("sockname")
        except OSError:
            pass
    return _peer_from(peer, local)


def _peer_of_socket(sock: socket.socket) -> Peer:
    try:
        return _peer_from(sock.getpeername(), sock.getsockname())
    except OSError:  # gone already
        return Peer("unknown", 0)


async def _refuse_busy(stream: PopStream, peer: Peer, where: str = "") -> None:
    log.warning("%s: connection refused, limit reached%s", peer, f" {where}" if where else "")
    try:
        stream.write(_BUSY_REPLY)
        await asyncio.wait_for(stream.drain(), 5)
    except (OSError, RuntimeError):  # the peer may be gone (uvloop: RuntimeError); it is closed below
        pass
    stream.close()


def _header_failure(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no PROXY header in time"
    if isinstance(exc, OSError):
        return f"connection lost before the PROXY header: {exc.strerror or exc}"
    return f"bad PROXY header: {exc}"


class TlsListener:
    """An implicit-TLS listening socket, accepted by hand.

    `loop.create_server(ssl=...)` would run the handshake itself and drop
    a failed one without a word (asyncio logs it only in debug mode, uvloop
    not at all); accepting here and shaking hands in `serve` (as a session
    process does with its one socket) lets the failure and its reason be
    logged. Connections are accepted from a reader callback, as many as
    are waiting, so a stop never strands one accepted but unserved. Shaped
    like the part of asyncio.Server the Server uses."""

    # Accepts per wake-up, like asyncio's own listeners: the others wait.
    BACKLOG_BURST = 100

    def __init__(self, sock: socket.socket, serve: Callable[[socket.socket, bool], Coroutine[Any, Any, None]]) -> None:
        self.sockets = (sock,)
        self._serve = serve
        self._loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._accept_ready)

    def _accept_ready(self) -> None:
        sock = self.sockets[0]
        for _ in range(self.BACKLOG_BURST):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # taken by another worker, or none left
            except OSError as exc:  # out of descriptors, say: log, and try at the next wake-up
                log.error("accept on %s failed: %s", sock.getsockname(), exc)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._serve(conn, True))
            self._tasks.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        if not self._closed.is_set():
            self._loop.remove_reader(self.sockets[0].fileno())
            self.sockets[0].close()
            self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()


def bind_socket(address: ListenAddress) -> socket.socket:
    """A listening TCP socket; host None listens on IPv6 and IPv4 at once."""
    if address.host is None:
        families = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]
    else:
        try:
            infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise ConfigError(f"cannot resolve listen address {address}: {exc}") from exc
        families = [(infos[0][0], str(infos[0][4][0]))]
    last_error: OSError | None = None
    for family, host in families:
        # Named TCP, so that accepted sockets say so too: asyncio (as uvloop
        # always does) then sets TCP_NODELAY on each at no cost of ours.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and address.host is None:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, address.port))
            sock.listen(128)
            sock.setblocking(False)
            return sock
        except OSError as exc:
            sock.close()
            last_error = exc
    raise ConfigError(f"cannot listen on {address}: {last_error.strerror if last_error else 'unknown error'}")


async def accepted_socket_stream(
    sock: socket.socket, ssl_context: ssl.SSLContext | None = None, handshake_timeout: float | None = None,
    new_stream: Callable[..., PopStream] = PopStream,
) -> PopStream:
    """The stream of an already accepted socket (inetd, a forked session);
    with `ssl_context` the implicit-TLS handshake runs first."""
    loop = asyncio.get_running_loop()
    tls_args: dict[str, Any] = {}
    if ssl_context is not None:
        tls_args = {"ssl": ssl_context, "ssl_handshake_timeout": handshake_timeout}
    stream = new_stream(loop)
    # Our protocol object, not the one returned: with TLS, uvloop returns
    # its SSL protocol rather than the application's.
    await loop.connect_accepted_socket(lambda: stream, sock, **tls_args)
    return stream


def _kpop_ports(options: Options) -> frozenset[int]:
    """The ports whose connections start with KPOP: with -k, each KPOP
    listener's and qpopper's 1109 (so inetd's and systemd's sockets for the
    "kpop" service need no flag); none without -k."""
    kpop = [a.port for a in options.listen if a.kpop]
    if not options.kerberos:
        if kpop:
            raise ConfigError("a KPOP listener needs Kerberos: add -k (kerberos)")
        return frozenset()
    from ..auth.kpop import KPOP_PORT, KpopUnavailable, library  # Kerberos sites only

    try:
        library()  # a KPOP site learns at start-up, not at the first client, that libkrb5 is missing
    except KpopUnavailable as exc:
        if kpop:
            raise ConfigError(f"KPOP: {exc}") from None
        return frozenset()
    return frozenset([*kpop, KPOP_PORT])


def auth_tuning(options: Options) -> AuthTuning:
    """The cache and hash-pool sizes of the settings, which SIGHUP may change."""
    return AuthTuning(options.auth_cache_size, options.auth_cache_ttl, options.auth_cache_negative_ttl,
                      options.auth_hash_workers)  # fmt: skip


def make_authenticator(options: Options) -> Authenticator:
    if options.system_users:
        from ..auth.system import SystemAuthenticator

        try:
            return SystemAuthenticator(
                options.effective_mail_location, service=options.pam_service, min_uid=options.min_uid
            )
        except ImportError as exc:
            raise ConfigError(f"system users need python-pam and libpam: {exc}") from None
    if options.auth_backend in ("sql", "ldap"):
        from ..auth.userdb import database_authenticator  # only where a database backend is configured

        return database_authenticator(
            options.auth_backend,
            options.auth_backend_args,
            mail_location=options.mail_location,
            default_scheme=options.default_password_scheme,
            tuning=auth_tuning(options),
        )
    if options.passwd_file is None:
        raise ConfigError("no user database: give --passwd-file (or run --demo)")
    return PasswdFileAuthenticator(
        options.passwd_file, options.mail_location, options.default_password_scheme, options.auth_hash_workers
    )


class Server:
    """A running POP3 service; also usable as `async with Server(...)`."""

    def __init__(
        self,
        options: Options,
        authenticator: Authenticator | None = None,
        sockets: Iterable[tuple[socket.socket, bool]] = (),
        per_session_process: bool = False,
    ) -> None:
        """`sockets`: already listening sockets (systemd), each with
        whether it speaks implicit TLS; otherwise options.listen is bound.
        `per_session_process`: each session runs in a process of its own
        (forked, or inetd), the only model in which a login may switch
        the process to the user's uid; system users need it."""
        self.options = options
        # The uid switch is for the whole process: in a process that serves
        # more than one session (an embedding test, a worker) it would hand
        # every other session, and the caller, to the first user.
        if options.system_users and authenticator is None and not per_session_process:
            raise ConfigError(
                "system users switch the process to the user's uid, which only a process per session may do; "
                "give an authenticator or a passwd-file"
            )
        base = authenticator if authenticator is not None else make_authenticator(options)
        if options.apop_file:
            from ..auth.apopdb import ApopAuthenticator, ApopDatabase  # an APOP database is optional

            base = ApopAuthenticator(base, ApopDatabase(options.apop_file), options.clear_text_password)
        self.authenticator: Authenticator = base
        self._given_sockets = list(sockets)
        self._proxy: ProxyPolicy | None = None
        if any(a.proxy for a in options.listen):
            from ._proxied import policy_of  # only behind a balancer

            self._proxy = policy_of(
                options.haproxy_trusted_networks, options.haproxy_timeout, options.haproxy_tls_is_secure
            )
        self.tls = TlsState()
        if options.tls_configured:
            self.tls.context = build_context(options)
            assert options.tls_cert_file is not None
            self.tls.channel_binding = server_end_point(options.tls_cert_file)
        elif options.effective_tls_support != "none" or any(a.tls for a in options.listen):
            raise ConfigError("TLS is enabled but no certificate is configured (tls-server-cert-file)")
        self._servers: list[asyncio.Server | TlsListener] = []
        self._implicit_tls: list[bool] = []  # per entry of _servers
        self._connections: dict[asyncio.Task[None], Connection | None] = {}
        self._handshaking: set[asyncio.Task[Any]] = set()
        self._per_ip: collections.Counter[str] = collections.Counter()
        self._sessions_seen = 0  # sessions started + ended, for the housekeeping task
        self._housekeeping_task: asyncio.Task[None] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(32, (os.cpu_count() or 1) * 4 + 4), thread_name_prefix="qpopper-blocking"
        )
        self._closed = asyncio.Event()
        self._idle = asyncio.Event()  # set while no session runs (wait_idle)
        self._idle.set()
        kerberos = None
        if options.kerberos:
            from ..auth.gssapi_mech import KerberosAcceptor

            kerberos = KerberosAcceptor(
                service=options.kerberos_service,
                hostname=options.hostname,
                keytab=options.kerberos_keytab,
                realms=tuple((options.kerberos_realms or "").split()),
            )
            key = f"{options.kerberos_service}@{options.hostname}"
            try:
                import gssapi.raw.misc
            except ImportError as exc:  # the optional package is not installed
                raise ConfigError(f"Kerberos: cannot use the key of {key}: {exc}") from None
            try:
                kerberos.credentials()
            # gssapi's errors carry the reason; NotImplementedError: a keytab given
            # to a GSSAPI library without the credential-store extension.
            except (gssapi.raw.misc.GSSError, NotImplementedError) as exc:
                raise ConfigError(f"Kerberos: cannot use the key of {key}: {exc}") from None
        self.kpop_ports = _kpop_ports(options)
        # Only a server that authenticates Unix accounts itself switches to
        # them; an embedding caller's authenticator keeps the process as is.
        self.services = Services(
            options,
            self.authenticator,
            self._run_blocking,
            self.tls,
            drop_privileges=options.system_users and authenticator is None,
            kerberos=kerberos,
        )
        if options.redis_url:
            try:
                from ._shared_state import SharedState  # only where state is shared
            except ImportError as exc:
                raise ConfigError(f"redis-url needs redis-py (pip install redis): {exc}") from None
            self.services.shared = SharedState(
                options.redis_url, options.redis_timeout, options.redis_key_prefix,
                self.services.failures, self.services.login_delays,
            )
        # Operations (metrics, the control socket): a counting stream; the plain one otherwise.
        self.new_stream: Callable[..., PopStream] = PopStream
        self.control: Any = None  # the control socket's listener (`_control.ControlListener`)
        if options.metrics_listen or options.control_dir:
            from ._operations import attach

            attach(self, per_session_process)

    # ---- life cycle -------------------------------------------------------

    async def start(self) -> None:
        """Bind (or adopt) every listener; errors surface here, not later."""
        sockets = list(self._given_sockets)
        alternate_port = self.options.effective_tls_support == "alternate-port"
        proxied: list[bool] = []  # per socket: behind a balancer
        if not sockets:
            try:
                for address in self.options.listen:
                    sockets.append((bind_socket(address), address.tls or alternate_port))
                    proxied.append(address.proxy)
            except BaseException:
                for sock, _ in sockets:
                    sock.close()
                raise
        else:
            proxied = [self.behind_balancer(sock) for sock, _ in sockets]
        loop = asyncio.get_running_loop()
        if isinstance(self.authenticator, AsyncAuthenticator):
            self.authenticator.attach(loop)
        try:
            for (sock, implicit_tls), behind_balancer in zip(sockets, proxied, strict=True):
                handshake_first = implicit_tls or alternate_port
                listener: asyncio.Server | TlsListener
                if self.speaks_kpop(sock):  # accepted by hand, as TLS ones: the exchange reads the raw socket
                    listener = TlsListener(sock, lambda conn, _tls: self.serve_socket(conn))
                    handshake_first = False
                elif handshake_first:
                    if self.tls.context is None:
                        raise ConfigError("an implicit-TLS listener needs tls-server-cert-file")
                    serve = functools.partial(self.serve_socket, proxied=True) if behind_balancer else self.serve_socket
                    listener = TlsListener(sock, serve)
                else:
                    accept = self._accept_proxied if behind_balancer else self._accept
                    listener = await loop.create_server(functools.partial(self.new_stream, loop, accept), sock=sock)
                self._servers.append(listener)
                self._implicit_tls.append(handshake_first)
        except BaseException:
            for sock, _ in sockets:
                sock.close()
            raise
        for host, port, tls in self.listeners:
            log.info("listening on %s", ListenAddress(host, port, tls))
        if self.control is not None:
            await self.control.start()
        self._housekeeping_task = asyncio.get_running_loop().create_task(self._housekeeping())

    async def _housekeeping(self) -> None:
        """After sessions start or end, give the memory they freed back to
        the system (opening a maildrop frees its indexing buffers too)."""
        seen = 0
        while True:
            await asyncio.sleep(TRIM_INTERVAL)
            if self._sessions_seen != seen:
                seen = self._sessions_seen
                release_free_memory()

    def behind_balancer(self, sock: socket.socket) -> bool:
        """Whether a socket handed over (workers, systemd, a forked session)
        is a PROXY listener's or was accepted by one: known by its port."""
        if self._proxy is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        return int(sock.getsockname()[1]) in {a.port for a in self.options.listen if a.proxy}

    @property
    def addresses(self) -> list[tuple[str, int]]:
        out = []
        for server in self._servers:
            for sock in server.sockets:
                name = sock.getsockname()
                out.append((str(name[0]), int(name[1])))
        return out

    @property
    def listeners(self) -> list[tuple[str, int, bool]]:
        """(host, port, implicit TLS) of every listening socket."""
        out = []
        for server, tls in zip(self._servers, self._implicit_tls, strict=True):
            for sock in server.sockets:
                name = sock.getsockname()
                out.append((str(name[0]), int(name[1]), tls))
        return out

    @property
    def port(self) -> int:
        """The port of the first listener (handy after binding port 0)."""
        return self.addresses[0][1]

    async def serve_forever(self) -> None:
        await self._closed.wait()

    async def stop(self, drain: bool = True) -> None:
        """Stop accepting; end sessions. With `drain`, sessions in UPDATE
        finish their commit first (bounded by options.drain_timeout)."""
        if self._housekeeping_task is not None:
            self._housekeeping_task.cancel()
        for server in self._servers:
            server.close()
        await asyncio.sleep(0)  # connections accepted just now take their first step
        for task in self._handshaking:
            task.cancel()
        for task, conn in list(self._connections.items()):
            if conn is None:
                task.cancel()
            elif not (drain and conn.updating):
                # Closing the socket ends the session the normal way (as a
                # lost connection: nothing is deleted); cancelling a stream
                # task would trip asyncio 3.11's connection callback.
                conn.shutdown()
        pending = list(self._connections) + list(self._handshaking)
        if pending:
            _, late = await asyncio.wait(pending, timeout=self.options.drain_timeout if drain else 5)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=5)
        for server in self._servers:
            await server.wait_closed()
        if self.services.shared is not None:
            await self.services.shared.close()
        self._executor.shutdown(wait=drain, cancel_futures=True)
        if isinstance(self.authenticator, AsyncAuthenticator):
            await self.authenticator.aclose()
        if self.control is not None:
            self.control.close()
        if self.services.tally is not None:
            self.services.tally.publish()
        self._closed.set()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def reload(self, options: Options | None = None) -> None:
        """SIGHUP: pick up new settings (re-read config files, given as
        `options`), a changed user database and new certificates, for the
        sessions that start from now on. Listeners, the user backend and
        the process model stay as they are until a restart.

        A broken file is logged and the running configuration kept."""
        reload = self.authenticator.lookup if isinstance(self.authenticator, UserLookup) else None
        try:
            if options is not None:
                kept = {"listen": self.options.listen, "auth_backend": self.options.auth_backend,
                        "passwd_file": self.options.passwd_file, "auth_backend_args": self.options.auth_backend_args}
                options = options.replace(**kept)
                self.options = options
                self.services.options = options
                self.services.access = AccessPolicy(options.nonauth_file, options.auth_file)
            recheck_all()  # the user files' next use asks the file system, not the stat of the last second
            if reload is not None:
                reload("")
            if isinstance(self.authenticator, Reloadable):
                self.authenticator.reload(auth_tuning(self.options))
            if self.tls.context is not None and self.options.tls_cert_file is not None:
                reload_certificates(self.tls.context, self.options)
                self.tls.channel_binding = server_end_point(self.options.tls_cert_file)
        except Exception as exc:  # noqa: BLE001 - a bad edit, or any backend's reload, must not stop the service
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        log.info("configuration reloaded")

    def sessions(self) -> list[Connection]:
        """The sessions running now (who, kick and the metrics read them)."""
        return [conn for conn in self._connections.values() if conn is not None]

    @property
    def connection_count(self) -> int:
        """Sessions running now."""
        return len(self._connections)

    async def wait_idle(self) -> None:
        """Return once no session runs (at once if none does)."""
        await self._idle.wait()

    # ---- connections ------------------------------------------------------

    async def _run_blocking(self, func: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(func, *args))

    def _accept(self, stream: PopStream) -> None:
        """A client connected (and finished the TLS handshake on a TLS port)."""
        # No reference kept here: serve_stream files its task in _connections
        # at its first step, which the loop's ready queue holds it until.
        stream.loop.create_task(self.serve_stream(stream))

    def _accept_proxied(self, stream: PopStream) -> None:
        """A connection from a load balancer: a PROXY header comes first."""
        stream.loop.create_task(self.serve_stream(stream, proxied=True))

    def _refuse_untrusted(self, peer: Peer) -> bool:
        """True (and logged) if a PROXY listener's peer is not a trusted balancer."""
        assert self._proxy is not None
        if self._proxy.trusts(peer.host):
            return False
        if peer.host in ("local", "unknown"):
            # A PROXY listener is TCP: no address means the peer was gone (a
            # reset, as HAProxy's health checks end) before its address was read.
            log.debug("%s: connection gone before it was served", peer)
            return True
        log.warning("%s: connection refused: not from haproxy-trusted-networks", peer)
        return True

    def _evict_oldest_idle(self) -> None:
        """Full: make room by closing the oldest connection that has not
        logged in and sits waiting (slow-drip and idle crowds go first)."""
        idle = [c for c in self._connections.values() if c is not None and c.evictable]
        if idle:
            oldest = min(idle, key=lambda c: c.connected_at)
            log.warning("%s: closed to make room (not logged in, idle)", oldest.peer)
            oldest.shutdown()
            for task, conn in list(self._connections.items()):
                if conn is oldest:
                    del self._connections[task]
                    self._per_ip[oldest.peer.host] -= 1

    def speaks_kpop(self, sock: socket.socket) -> bool:
        """Whether connections on `sock` (listening or accepted) start with
        the KPOP exchange: those to a KPOP port, with -k on."""
        if not self.kpop_ports or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        try:
            return int(sock.getsockname()[1]) in self.kpop_ports
        except OSError:
            return False

    async def serve_kpop_socket(self, sock: socket.socket) -> None:
        """A KPOP connection: the Kerberos exchange, then the POP session
        as the principal it proved (`_kpop`)."""
        from ._kpop import kpop_exchange  # Kerberos sites only

        peer = _peer_of_socket(sock)
        task = asyncio.current_task()
        assert task is not None
        self._handshaking.add(task)  # a stop ends exchanges still under way
        try:
            sock.setblocking(False)
            identity = await kpop_exchange(sock, peer, self.services)
            if identity is None:
                sock.close()
                return
            stream = await accepted_socket_stream(sock, new_stream=self.new_stream)
        except OSError as exc:
            log.info("%s: connection lost after KPOP: %s", peer, exc)
            sock.close()
            return
        except asyncio.CancelledError:
            sock.close()
            raise
        finally:
            self._handshaking.discard(task)
        await self.serve_stream(stream, kpop=identity)

    async def serve_socket(self, sock: socket.socket, implicit_tls: bool = False, proxied: bool = False) -> None:
        """Serve one accepted connection (a forked session process, or one
        accepted by an implicit-TLS or KPOP listener); `proxied`: a PROXY
        header comes first, before any TLS handshake."""
        if not implicit_tls and not proxied and self.speaks_kpop(sock):
            await self.serve_kpop_socket(sock)
            return
        context = self.tls.context if implicit_tls else None
        peer = _peer_of_socket(sock)  # asked now: a failed handshake closes the socket
        if proxied and self._refuse_untrusted(peer):
            sock.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._handshaking.add(task)  # a stop ends handshakes still under way
        try:
            if proxied:
                from ._proxied import read_from_socket
                from .proxyheader import ProxyHeaderError

                assert self._proxy is not None
                try:
                    header = await read_from_socket(sock, self._proxy.timeout)
                except (ProxyHeaderError, TimeoutError, OSError) as exc:
                    log.warning("%s: connection refused: %s", peer, _header_failure(exc))
                    sock.close()
                    return
                peer = _behind_balancer(peer, header, self._proxy)
            stream = await accepted_socket_stream(sock, context, self.options.tls_handshake_timeout, self.new_stream)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            log.info("%s: TLS handshake failed: %s", peer, tls_failure_reason(exc))
            if context is not None and self.services.tally is not None:
                self.services.tally.tls_handshake("implicit", ok=False)
            sock.close()
            return
        except asyncio.CancelledError:
            sock.close()
            raise
        finally:
            self._handshaking.discard(task)
        if context is not None and self.services.tally is not None:
            self.services.tally.tls_handshake("implicit", ok=True)
        await self.serve_stream(stream, peer=peer if proxied else None)

    async def _read_proxy_header(self, stream: PopStream, balancer: Peer, task: asyncio.Task[Any]) -> Peer | None:
        """The client a trusted balancer names; None (logged, closed) if the
        peer is not trusted or its header is late or invalid."""
        from ._proxied import read_from_stream
        from .proxyheader import ProxyHeaderError

        assert self._proxy is not None
        if self._refuse_untrusted(balancer):
            stream.close()
            return None
        self._handshaking.add(task)  # a stop ends it like a TLS handshake
        try:
            header = await read_from_stream(stream, self._proxy.timeout)
        except (ProxyHeaderError, TimeoutError, OSError) as exc:
            log.warning("%s: connection refused: %s", balancer, _header_failure(exc))
            stream.close()
            return None
        except asyncio.CancelledError:  # the server stops
            stream.close()
            raise
        finally:
            self._handshaking.discard(task)
        peer = _behind_balancer(balancer, header, self._proxy)
        log.debug("%s: %s client %s via %s", peer, header.command, header.family, balancer)
        return peer

    async def _before_session(self, task: asyncio.Task[Any], stream: PopStream, step: Awaitable[T]) -> T:
        """`step` (a refusal, a Redis call) before the session starts, ended
        by a stop as a handshake is: the stream closed, no session begun on
        a stopping server."""
        self._handshaking.add(task)
        try:
            return await step
        except asyncio.CancelledError:
            stream.close()
            raise
        finally:
            self._handshaking.discard(task)

    async def serve_stream(
        self, stream: PopStream, proxied: bool = False, peer: Peer | None = None, kpop: KpopIdentity | None = None
    ) -> None:
        """Serve one session on an already connected stream; `proxied`: it
        starts with a PROXY header; `peer`: the client, known already;
        `kpop`: the principal a KPOP exchange proved on it."""
        if peer is None:
            peer = _peer_of(stream)
        task = asyncio.current_task(stream.loop)
        assert task is not None
        if proxied:
            found = await self._read_proxy_header(stream, peer, task)
            if found is None:
                return
            peer = found
        if (
            len(self._connections) >= self.options.max_connections
            and self._per_ip[peer.host] < self.options.max_connections_per_ip
        ):
            self._evict_oldest_idle()
        if (
            len(self._connections) >= self.options.max_connections
            or self._per_ip[peer.host] >= self.options.max_connections_per_ip
        ):
            if self.services.tally is not None:
                full = len(self._connections) >= self.options.max_connections
                self.services.tally.refused("max-connections" if full else "max-connections-per-ip")
            await self._before_session(task, stream, _refuse_busy(stream, peer))
            return
        shared = self.services.shared
        token = None
        if shared is not None:  # the address's sessions on every instance
            token = await self._before_session(
                task, stream, shared.open_session(peer.host, self.options.max_connections_per_ip)
            )
            if token is None:
                if self.services.tally is not None:
                    self.services.tally.refused("max-connections-per-ip")
                await self._before_session(task, stream, _refuse_busy(stream, peer, "on all instances"))
                return
        self._connections[task] = None
        self._idle.clear()
        self._per_ip[peer.host] += 1
        self._sessions_seen += 1
        try:
            conn = Connection(stream, peer, self.services, kpop)
            self._connections[task] = conn
            await conn.run()
        finally:
            try:
                # Still one of the server's sessions while its slot goes back, so that a
                # stop waits for this call before it closes the Redis client.
                if token is not None:
                    assert shared is not None
                    await shared.close_session(token)
            finally:
                self._sessions_seen += 1
                if task in self._connections:  # not if it was evicted (counted then)
                    del self._connections[task]
                    self._per_ip[peer.host] -= 1
                if self._per_ip.get(peer.host, 0) <= 0:
                    self._per_ip.pop(peer.host, None)
                if not self._connections:
                    self._idle.set()
