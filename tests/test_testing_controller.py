"""The hermetic Controller: its API used as a client developer would (this
file is type-checked with mypy --strict like the rest of tests/)."""

from __future__ import annotations

import os
import poplib
import threading
from pathlib import Path

import pytest

from helpers import write_maildir_message
from qpopper import Controller, StaticAuthenticator
from qpopper.config.options import ListenAddress, Options
from qpopper.errors import ConfigError

PASSWORD = "secret"


def _auth(tmp_path: Path) -> StaticAuthenticator:
    return StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{tmp_path}/%u/Maildir")


def test_defaults_read_nothing_under_etc_and_never_choose_pam() -> None:
    controller = Controller(passwd_file="/nonexistent-users")
    assert controller.options.nonauth_file is None
    assert controller.options.apop_file is None
    assert not controller.options.system_users


def test_without_a_user_database_it_says_so() -> None:
    with pytest.raises(ConfigError, match="authenticator or a passwd_file"):
        Controller()


def test_host_and_port_beside_options_are_refused() -> None:
    options = Options(hostname="localhost")
    with pytest.raises(ConfigError, match="ignored"):
        Controller(options, port=1110)


def test_a_server_for_system_users_outside_a_process_per_session_is_refused() -> None:
    from qpopper import Server

    with pytest.raises(ConfigError, match="process per session"):
        Server(Options(hostname="localhost", auth_backend="pam"))


def test_options_listen_is_used_and_url_names_it(tmp_path: Path) -> None:
    options = Options(hostname="localhost", listen=(ListenAddress("127.0.0.1", 0),), nonauth_file=None)
    with Controller(options, authenticator=_auth(tmp_path)) as pop:
        assert pop.host == "127.0.0.1"
        assert pop.url == f"pop3://127.0.0.1:{pop.port}"


def test_host_and_port_are_honoured(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:  # a port free a moment ago; loopback, so nobody else takes it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with Controller(authenticator=_auth(tmp_path), host="127.0.0.1", port=port) as pop:
        assert (pop.host, pop.port) == ("127.0.0.1", port)
        assert pop.url == f"pop3://127.0.0.1:{port}"


def test_login_keeps_the_uid_of_the_process(tmp_path: Path) -> None:
    write_maildir_message(tmp_path / "alice" / "Maildir", b"Subject: one\n\nbody\n")
    uid = os.geteuid()
    with Controller(authenticator=_auth(tmp_path)) as pop:
        client = poplib.POP3(pop.host, pop.port, timeout=10)
        client.user("alice")
        client.pass_(PASSWORD)
        assert client.stat()[0] == 1
        assert os.geteuid() == uid
        client.quit()


def test_waits_are_woken_by_the_server(tmp_path: Path) -> None:
    for n in range(3):
        write_maildir_message(tmp_path / "alice" / "Maildir", b"Subject: %d\n\nbody\n" % n)
    with Controller(authenticator=_auth(tmp_path), ready_timeout=5.0) as pop:
        assert pop.ready_timeout == 5.0
        pop.wait_sessions_ended(timeout=1)  # none runs: returns at once

        def client() -> None:
            c = poplib.POP3(pop.host, pop.port, timeout=10)
            c.user("alice")
            c.pass_(PASSWORD)
            c.retr(1)
            c.retr(2)
            c.dele(1)
            c.quit()

        thread = threading.Thread(target=client)
        thread.start()
        pop.wait_deleted(1, timeout=10)
        pop.wait_retrieved(2, timeout=10)
        pop.wait_sessions_ended(timeout=10)
        thread.join()
        assert (pop.deleted, pop.retrieved) == (1, 2)
        assert pop.server.connection_count == 0
        with pytest.raises(TimeoutError):
            pop.wait_deleted(5, timeout=0.05)
