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
import functools
import logging
import os
import socket
import ssl
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from ..auth import Authenticator, UserLookup
from ..auth.access import AccessPolicy
from ..auth.passwdfile import PasswdFileAuthenticator
from ..config.options import ListenAddress, Options
from ..errors import ConfigError
from ._channel_binding import server_end_point
from ._connection import Connection
from ._memory import TRIM_INTERVAL, release_free_memory
from ._services import Peer, Services, TlsState
from ._stream import PopStream
from ._tls import build_context, reload_certificates, tls_failure_reason

log = logging.getLogger("qpopper.server")

_BUSY_REPLY = b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"


def _peer_from(info: object) -> Peer:
    """The client's address from a socket's peer name (an AF_UNIX one is "local")."""
    if isinstance(info, tuple) and len(info) >= 2:
        host = str(info[0])
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]  # an IPv4 client on a dual-stack socket
        return Peer(host, int(info[1]))
    return Peer("local", 0)


def _peer_of(stream: PopStream) -> Peer:
    return _peer_from(stream.get_extra_info("peername"))


def _peer_of_socket(sock: socket.socket) -> Peer:
    try:
        return _peer_from(sock.getpeername())
    except OSError:  # gone already
        return Peer("unknown", 0)


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


def _set_nodelay(stream: PopStream) -> None:
    sock = stream.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


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
        sock = socket.socket(family, socket.SOCK_STREAM)
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


def make_authenticator(options: Options) -> Authenticator:
    if options.system_users:
        from ..auth.system import SystemAuthenticator

        try:
            return SystemAuthenticator(
                options.effective_mail_location, service=options.pam_service, min_uid=options.min_uid
            )
        except ImportError as exc:
            raise ConfigError(f"system users need python-pam and libpam: {exc}") from None
    if options.passwd_file is None:
        raise ConfigError("no user database: give --passwd-file (or run --demo)")
    return PasswdFileAuthenticator(options.passwd_file, options.mail_location, options.default_password_scheme)


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
        if not sockets:
            try:
                for address in self.options.listen:
                    sockets.append((bind_socket(address), address.tls or alternate_port))
            except BaseException:
                for sock, _ in sockets:
                    sock.close()
                raise
        loop = asyncio.get_running_loop()
        try:
            for sock, implicit_tls in sockets:
                handshake_first = implicit_tls or alternate_port
                listener: asyncio.Server | TlsListener
                if handshake_first:
                    if self.tls.context is None:
                        raise ConfigError("an implicit-TLS listener needs tls-server-cert-file")
                    listener = TlsListener(sock, self.serve_socket)
                else:
                    listener = await loop.create_server(lambda: self.new_stream(loop, self._accept), sock=sock)
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
        self._executor.shutdown(wait=drain, cancel_futures=True)
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
                        "passwd_file": self.options.passwd_file}
                options = options.replace(**kept)
                self.options = options
                self.services.options = options
                self.services.access = AccessPolicy(options.nonauth_file, options.auth_file)
            if reload is not None:
                reload("")
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
        asyncio.get_running_loop().create_task(self.serve_stream(stream))

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

    async def serve_socket(self, sock: socket.socket, implicit_tls: bool = False) -> None:
        """Serve one accepted connection (a forked session process, or one
        accepted by an implicit-TLS listener)."""
        context = self.tls.context if implicit_tls else None
        peer = _peer_of_socket(sock)  # asked now: a failed handshake closes the socket
        task = asyncio.current_task()
        assert task is not None
        self._handshaking.add(task)  # a stop ends handshakes still under way
        try:
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
        await self.serve_stream(stream)

    async def serve_stream(self, stream: PopStream) -> None:
        """Serve one session on an already connected stream."""
        peer = _peer_of(stream)
        _set_nodelay(stream)
        task = asyncio.current_task()
        assert task is not None
        if (
            len(self._connections) >= self.options.max_connections
            and self._per_ip[peer.host] < self.options.max_connections_per_ip
        ):
            self._evict_oldest_idle()
        if (
            len(self._connections) >= self.options.max_connections
            or self._per_ip[peer.host] >= self.options.max_connections_per_ip
        ):
            log.warning("%s: connection refused, limit reached", peer)
            if self.services.tally is not None:
                full = len(self._connections) >= self.options.max_connections
                self.services.tally.refused("max-connections" if full else "max-connections-per-ip")
            try:
                stream.write(_BUSY_REPLY)
                await asyncio.wait_for(stream.drain(), 5)
            except (OSError, RuntimeError):  # the peer may be gone (uvloop: RuntimeError); it is closed below
                pass
            stream.close()
            return
        self._connections[task] = None
        self._idle.clear()
        self._per_ip[peer.host] += 1
        self._sessions_seen += 1
        try:
            conn = Connection(stream, peer, self.services)
            self._connections[task] = conn
            await conn.run()
        finally:
            self._sessions_seen += 1
            if task in self._connections:  # not if it was evicted (counted then)
                del self._connections[task]
                self._per_ip[peer.host] -= 1
            if self._per_ip.get(peer.host, 0) <= 0:
                self._per_ip.pop(peer.host, None)
            if not self._connections:
                self._idle.set()
