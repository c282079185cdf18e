"""The pytest plugin of qpopper.testing: its fixtures, used here as a client
developer's suite would, and the plugin loaded by its entry point in a
fresh pytest run (under pytest-xdist too)."""

from __future__ import annotations

import email.message
import os
import poplib
import ssl
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

import rawpop
from qpopper.testing import TestServer


def test_a_fresh_server_per_test_with_users_and_mail(
    pop3_server: TestServer, pop3_user: Callable[..., str], pop3_deliver: Callable[..., str]
) -> None:
    user = pop3_user("carol", "pw")
    message = email.message.EmailMessage()
    message["Subject"] = "built with the email package"
    message.set_content("hello\n.dotted line\n")
    uid = pop3_deliver(user, message)
    pop3_deliver(user, b"Subject: two\n\nsecond\n")
    client = poplib.POP3(pop3_server.host, pop3_server.port, timeout=10)
    client.apop(user, "pw")
    assert client.uidl(1).split()[2].decode() == uid
    lines = client.retr(1)[1]
    assert b".dotted line" in lines  # un-stuffed by poplib
    client.dele(2)
    client.quit()
    pop3_server.wait_sessions_ended()
    state = pop3_server.mailbox(user)
    assert state.messages == [message.as_bytes()]
    assert state.retrieved == [message.as_bytes()]
    assert state.deleted == [b"Subject: two\n\nsecond\n"]
    assert pop3_server.url == f"pop3://127.0.0.1:{pop3_server.port}"


def test_the_transcript_masks_secrets(pop3_server: TestServer, pop3_user: Callable[..., str]) -> None:
    pop3_user("dave", "hunter2")
    client = poplib.POP3(pop3_server.host, pop3_server.port, timeout=10)
    client.user("dave")
    client.pass_("hunter2")
    client.quit()
    pop3_server.wait_sessions_ended()
    transcript = "\n".join(pop3_server.transcript())
    assert "PASS <password>" in transcript and "hunter2" not in transcript
    assert "dave > +OK" in transcript


def test_stls_and_implicit_tls_with_the_throwaway_ca(
    pop3_stls_server: TestServer, pop3_tls_server: TestServer
) -> None:
    for server in (pop3_stls_server, pop3_tls_server):
        server.add_user("erin", "pw")
        server.deliver("erin", b"Subject: secret\n\nover TLS\n")
        assert server.ca_path is not None and Path(server.ca_path).is_file()
    context = ssl.create_default_context(cafile=pop3_stls_server.ca_path)
    client = poplib.POP3(pop3_stls_server.host, pop3_stls_server.port, timeout=10)
    client.stls(context)
    client.user("erin")
    client.pass_("pw")
    assert client.stat()[0] == 1
    client.quit()
    context = ssl.create_default_context(cafile=pop3_tls_server.ca_path)
    assert pop3_tls_server.url.startswith("pop3s://")
    tls_client = poplib.POP3_SSL(pop3_tls_server.host, pop3_tls_server.port, context=context, timeout=10)
    tls_client.user("erin")
    tls_client.pass_("pw")
    assert tls_client.retr(1)[1][-1] == b"over TLS"
    tls_client.quit()


def test_sasl_logins_work_from_the_password(pop3_server: TestServer) -> None:
    import base64
    import hashlib
    import hmac

    pop3_server.add_user("frank", "pw")
    client = poplib.POP3(pop3_server.host, pop3_server.port, timeout=10)
    rawpop.putcmd(client, "AUTH CRAM-MD5")
    challenge = rawpop.getline(client)[2:]
    digest = hmac.new(b"pw", base64.b64decode(challenge), hashlib.md5).hexdigest()
    assert rawpop.shortcmd(client, base64.b64encode(f"frank {digest}".encode()).decode()).startswith(b"+OK")
    client.quit()


def test_the_plugin_loads_by_its_entry_point_under_xdist(tmp_path: Path) -> None:
    test_file = tmp_path / "test_client.py"
    test_file.write_text(
        textwrap.dedent(
            """
            import poplib
            import pytest

            @pytest.mark.parametrize("n", range(4))
            def test_fetch(pop3_server, pop3_user, pop3_deliver, n):
                pop3_deliver(pop3_user("u%d" % n), b"Subject: %d\\n\\nbody\\n" % n)
                client = poplib.POP3(pop3_server.host, pop3_server.port, timeout=10)
                client.user("u%d" % n)
                client.pass_("secret")
                assert client.stat()[0] == 1
                client.quit()
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("PYTEST_XDIST_WORKER", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider", str(test_file)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env,
    )
    if "unrecognized arguments: -n" in result.stderr:
        pytest.skip("pytest-xdist is not installed")
    if "fixture 'pop3_server' not found" in result.stdout:
        pytest.skip("qpopper is not installed (its pytest11 entry point is not registered)")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout


def test_two_servers_at_once_keep_their_own_transcripts(pop3_server_factory: Callable[..., TestServer]) -> None:
    first, second = pop3_server_factory(), pop3_server_factory()
    for server, name in ((first, "gina"), (second, "hank")):
        server.add_user(name, "pw")
        client = poplib.POP3(server.host, server.port, timeout=10)
        client.user(name)
        client.pass_("pw")
        client.quit()
        server.wait_sessions_ended()
    assert "USER gina" in "\n".join(first.transcript()) and "hank" not in "\n".join(first.transcript())
    assert "USER hank" in "\n".join(second.transcript()) and "gina" not in "\n".join(second.transcript())
