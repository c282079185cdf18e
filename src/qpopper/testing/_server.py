"""The test server: a Controller over an in-memory store, behind the fault proxy.

    with TestServer() as pop:
        pop.add_user("alice", "secret")
        pop.deliver("alice", b"Subject: hi\\n\\nhello\\n")
        client = poplib.POP3(pop.host, pop.port)
        ...
        assert pop.mailbox("alice").retrieved == [...]

Clients talk to the proxy's ports (`host`, `port`, `url`, `implicit_tls_port`);
the real server listens on loopback behind it. USER/PASS is allowed
without TLS (a test server: the client under test decides), and APOP,
CRAM-MD5, SCRAM-SHA-1/-256, PLAIN and LOGIN all work from a user's password.
"""

from __future__ import annotations

import email.message
import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Literal

from ..auth.sasl import SCRAM_MECHANISMS
from ..config.options import ListenAddress
from ..controller import Controller
from ..logtext import TRACE_LOGGER
from ._faults import Fault, FaultPlan
from ._proxy import FaultProxy
from ._store import MailboxState, StoreUsers, TestStore

TlsMode = Literal["none", "stls", "implicit", "both"]
MECHANISMS = (*SCRAM_MECHANISMS, "CRAM-MD5", "PLAIN", "LOGIN")


class _Transcripts(logging.Handler):
    """Collects the session trace (qpopper.trace, passwords already masked
    by the protocol core) for every TestServer running in this process."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.servers: list[TestServer] = []
        self.previous_level = logging.NOTSET

    def emit(self, record: logging.LogRecord) -> None:
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else None
        port = getattr(peer, "port", None)
        line = record.getMessage()
        for server in list(self.servers):
            if port is None or server.serves_peer_port(port):
                server.record_trace(line)


_transcripts = _Transcripts()
_transcripts_lock = threading.Lock()


def _attach(server: TestServer) -> None:
    with _transcripts_lock:
        logger = logging.getLogger(TRACE_LOGGER)
        if not _transcripts.servers:
            _transcripts.previous_level = logger.level
            logger.setLevel(logging.DEBUG)
            logger.addHandler(_transcripts)
        _transcripts.servers.append(server)


def _detach(server: TestServer) -> None:
    with _transcripts_lock:
        if server in _transcripts.servers:
            _transcripts.servers.remove(server)
            if not _transcripts.servers:
                logger = logging.getLogger(TRACE_LOGGER)
                logger.removeHandler(_transcripts)
                logger.setLevel(_transcripts.previous_level)


class TestServer:
    """A POP3 server for a client's tests: users, mail, faults, a record.

    `tls`: "none", "stls" (STLS on the port), "implicit" (TLS from the
    first byte) or "both" (STLS on `port`, implicit TLS on
    `implicit_tls_port`); a throwaway CA (trustme) signs the certificate
    for localhost and 127.0.0.1, and `ca_path` is its PEM for the client
    to trust. `settings`: Options fields, as for Controller."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        *,
        tls: TlsMode = "none",
        host: str = "127.0.0.1",
        port: int = 0,
        ready_timeout: float = 10.0,
        **settings: Any,
    ) -> None:
        if tls not in ("none", "stls", "implicit", "both"):
            raise ValueError(f"tls is one of none, stls, implicit, both; not {tls!r}")
        self.tls: TlsMode = tls
        self.faults = FaultPlan()
        self.store = TestStore(self.faults)
        self.users = StoreUsers(self.store)
        self._host = host
        self._port = port
        self._ready_timeout = ready_timeout
        self._settings = settings
        self._transcript: list[str] = []
        self._tmp: Path | None = None
        self._controller: Controller | None = None
        self._proxy: FaultProxy | None = None
        self.ca_path: str | None = None

    # ---- life cycle ---------------------------------------------------------

    def start(self) -> TestServer:
        """Start the server and the proxy; returns once both listen."""
        if self._controller is not None:
            return self
        settings: dict[str, Any] = {
            "sasl_mechanisms": MECHANISMS,
            "clear_text_password": "always",
            **self._settings,
        }
        listen = []
        if self.tls in ("none", "stls", "both"):
            listen.append(ListenAddress("127.0.0.1", 0))
        if self.tls in ("implicit", "both"):
            listen.append(ListenAddress("127.0.0.1", 0, tls=True))
        settings["listen"] = tuple(listen)
        if self.tls != "none":
            settings.update(self._certificates())
        controller = Controller(authenticator=self.users, ready_timeout=self._ready_timeout, **settings)
        _attach(self)
        try:
            controller.start()
            targets = [(port, tls) for _, port, tls in controller.server.listeners]
            proxy = FaultProxy(self.faults, self._host, targets, first_port=self._port)
            try:
                proxy.start()
            except BaseException:
                controller.stop()
                raise
        except BaseException:
            _detach(self)
            self._remove_certificates()
            raise
        self._controller, self._proxy = controller, proxy
        return self

    def _certificates(self) -> dict[str, str]:
        import trustme  # only a TLS test server needs it

        self._tmp = Path(tempfile.mkdtemp(prefix="qpopper-testserver-"))
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1", "::1")
        cert, key, ca_file = self._tmp / "cert.pem", self._tmp / "key.pem", self._tmp / "ca.pem"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        ca.cert_pem.write_to_path(str(ca_file))
        self.ca_path = str(ca_file)
        return {"tls_cert_file": str(cert), "tls_key_file": str(key)}

    def _remove_certificates(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
            self.ca_path = None

    def stop(self) -> None:
        """Stop the proxy and the server; forget the certificates."""
        proxy, controller = self._proxy, self._controller
        self._proxy = self._controller = None
        if proxy is not None:
            proxy.stop()
        if controller is not None:
            controller.stop()
        _detach(self)
        self._remove_certificates()

    def __enter__(self) -> TestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- where clients connect ------------------------------------------------

    @property
    def controller(self) -> Controller:
        """The Controller running the real server (behind the proxy)."""
        if self._controller is None:
            raise RuntimeError("the test server is not started")
        return self._controller

    def _listeners(self) -> list[tuple[str, int, bool]]:
        if self._proxy is None:
            raise RuntimeError("the test server is not started")
        return self._proxy.listeners

    @property
    def host(self) -> str:
        """The address clients connect to."""
        return self._listeners()[0][0]

    @property
    def port(self) -> int:
        """The first port clients connect to (implicit TLS for tls="implicit")."""
        return self._listeners()[0][1]

    @property
    def implicit_tls_port(self) -> int | None:
        """The implicit-TLS port, if there is one."""
        return next((port for _, port, tls in self._listeners() if tls), None)

    @property
    def url(self) -> str:
        """pop3://host:port (pop3s:// for tls="implicit")."""
        host, port, tls = self._listeners()[0]
        return f"{'pop3s' if tls else 'pop3'}://{host}:{port}"

    # ---- users, mail, records ---------------------------------------------------

    def add_user(self, user: str, password: str = "secret") -> str:
        """Create `user` with `password` (and an empty mailbox); returns the name."""
        self.users.add(user, password)
        return user

    def remove_user(self, user: str) -> None:
        """Remove `user` and their mail."""
        self.users.remove(user)

    def deliver(self, user: str, message: bytes | email.message.Message, uid: str | None = None) -> str:
        """Add a message (bytes, or an email.message.EmailMessage) to `user`'s
        mailbox; returns its UID. A session already open sees it at its next login."""
        data = message.as_bytes() if isinstance(message, email.message.Message) else message
        return self.store.deliver(user, data, uid)

    def mailbox(self, user: str) -> MailboxState:
        """What `user`'s mailbox holds, and what sessions retrieved and deleted."""
        return self.store.state(user)

    def serves_peer_port(self, port: int) -> bool:
        """True if a session whose peer (as the server sees it) has this
        port came through this server's proxy."""
        proxy = self._proxy
        return proxy is not None and port in proxy.upstream_ports

    def record_trace(self, line: str) -> None:
        """Add a line to the transcript (called by the trace handler)."""
        self._transcript.append(line)

    def transcript(self) -> list[str]:
        """The sessions' command and reply lines while this server ran
        (passwords, APOP digests and SASL responses masked; a reply shows its
        first line), this server's sessions only."""
        return list(self._transcript)

    def add_fault(self, kind: str, **fields: Any) -> Fault:
        """Schedule a fault (qpopper.testing.Fault's fields); returns it."""
        return self.faults.add(Fault(kind, **fields))

    def clear_faults(self) -> None:
        """Remove every scheduled fault."""
        self.faults.clear()

    def reset(self) -> None:
        """Forget users, mail, faults and the transcript (sessions running go on)."""
        self.faults.clear()
        self.users.clear()
        self.store.reset()
        self._transcript.clear()

    # ---- waits (woken by the server, never polled) ------------------------------

    def wait_sessions_ended(self, timeout: float = 10.0) -> None:
        """Return once no session runs; TimeoutError otherwise."""
        self.controller.wait_sessions_ended(timeout)

    def wait_deleted(self, n: int, timeout: float = 10.0) -> None:
        """Return once clients deleted `n` messages in all; TimeoutError otherwise."""
        self.controller.wait_deleted(n, timeout)

    def wait_retrieved(self, n: int, timeout: float = 10.0) -> None:
        """Return once clients retrieved `n` messages in all (counted at UPDATE)."""
        self.controller.wait_retrieved(n, timeout)

    def wait_for_mail(self, user: str, count: int, timeout: float = 10.0) -> None:
        """Return once `user`'s mailbox holds exactly `count` messages."""
        if not self.store.wait_until(lambda: len(self.store.mailbox(user).messages) == count, timeout):
            raise TimeoutError(f"{user}'s mailbox did not reach {count} messages in {timeout} s")
