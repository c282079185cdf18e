"""The standalone test server, driven as a non-Python client would: the API
with curl, POP3 with curl, fetchmail and mpop. Python here only starts the
processes and checks what they printed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

MESSAGE = "Subject: from the API\n\nhello from curl\n"


class Standalone:
    def __init__(self, args: list[str]) -> None:
        script = Path(sys.executable).parent / "qpopper-testserver"
        command = [str(script)] if script.exists() else [sys.executable, "-m", "qpopper.testing"]
        self.process = subprocess.Popen(
            [*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # the ready line; the process is killed below if it never comes
        assert line, self.process.stderr.read() if self.process.stderr else ""
        self.ready: dict[str, Any] = json.loads(line)
        self.api: str = self.ready["api"]

    def stop(self) -> int:
        self.process.terminate()
        try:
            return self.process.wait(10)
        finally:
            self.process.kill()
            for stream in (self.process.stdout, self.process.stderr):
                if stream is not None:
                    stream.close()


def run(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    if shutil.which(args[0]) is None:
        pytest.skip(f"{args[0]} is not installed (Debian package {args[0]})")
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=60, env=env)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def api(server: Standalone, method: str, path: str, *extra: str) -> Any:
    result = run("curl", "--silent", "--max-time", "30", "-X", method, *extra, f"{server.api}{path}")
    return json.loads(result.stdout)


def status(server: Standalone, method: str, path: str, *extra: str) -> int:
    out = run("curl", "--silent", "--max-time", "30", "-o", "/dev/null", "-w", "%{http_code}", "-X", method, *extra,
              f"{server.api}{path}").stdout
    return int(out)


@pytest.fixture
def standalone() -> Iterator[Standalone]:
    server = Standalone(["--user", "alice:pw"])
    yield server
    assert server.stop() == 0


def test_users_mail_and_mailbox_through_the_api_with_curl(standalone: Standalone) -> None:
    assert api(standalone, "GET", "/health")["ready"] is True
    assert api(standalone, "GET", "/openapi.json")["openapi"].startswith("3.")
    assert api(standalone, "POST", "/users", "-d", '{"user": "bob", "password": "pw2"}') == {"user": "bob"}
    assert api(standalone, "GET", "/users")["users"] == ["alice", "bob"]
    uid = api(standalone, "POST", "/users/bob/messages?uid=first-one", "--data-binary", MESSAGE)["uid"]
    assert uid == "first-one"
    api(standalone, "POST", "/users/bob/messages", "-H", "Content-Type: application/json",
        "-d", json.dumps({"message": "Subject: two\n\nsecond\n"}))
    pop3 = standalone.ready["pop3"]
    fetched = run("curl", "--silent", "--max-time", "20", "-u", "bob:pw2", f"{pop3}/1").stdout
    assert fetched.replace("\r\n", "\n") == MESSAGE
    run("curl", "--silent", "--max-time", "20", "-u", "bob:pw2", "-X", "DELE", "--head", f"{pop3}/2")
    assert api(standalone, "POST", "/wait?deleted=1&timeout=10")["sessions_ended"] is True
    mailbox = api(standalone, "GET", "/users/bob/mailbox")
    assert [m["text"] for m in mailbox["messages"]] == [MESSAGE]
    assert [m["text"] for m in mailbox["deleted"]] == ["Subject: two\n\nsecond\n"]
    transcript = "\n".join(api(standalone, "GET", "/transcript")["lines"])
    assert "pw2" not in transcript  # curl logs in with SASL CRAM-MD5: its response is masked
    assert "< AUTH CRAM-MD5" in transcript and "< <SASL response>" in transcript
    assert status(standalone, "DELETE", "/users/bob") == 200
    assert status(standalone, "GET", "/users/bob/mailbox") == 404
    assert api(standalone, "POST", "/reset") == {"reset": True}
    assert api(standalone, "GET", "/users")["users"] == []


def test_bad_requests_get_a_clear_error(standalone: Standalone) -> None:
    assert status(standalone, "POST", "/users", "-d", "not json") == 400
    assert status(standalone, "POST", "/users", "-d", '{"user": "../etc"}') == 400
    assert status(standalone, "POST", "/faults", "-d", '{"kind": "explode"}') == 400
    assert status(standalone, "POST", "/faults", "-d", '{"kind": "login", "colour": "red"}') == 400
    assert status(standalone, "POST", "/users/alice/messages?uid=has%20space", "--data-binary", MESSAGE) == 400
    assert status(standalone, "GET", "/no/such/call") == 404
    assert "error" in api(standalone, "POST", "/wait?timeout=soon")


def test_faults_through_the_api_seen_by_fetchmail(standalone: Standalone, tmp_path: Path) -> None:
    api(standalone, "POST", "/users/alice/messages", "--data-binary", MESSAGE)
    fault = api(standalone, "POST", "/faults", "-d", '{"kind": "login", "code": "IN-USE", "user": "alice"}')
    assert fault["code"] == "IN-USE" and fault["sessions"] is None
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        f"poll 127.0.0.1 service {standalone.ready['port']} protocol pop3 auth password\n"
        f'  user "alice" password "pw" is alice here no keep sslproto ""\n'
        f'  mda "cat >> {tmp_path / "delivered"}"\n'
    )
    rc.chmod(0o600)
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    args = ["fetchmail", "--nodetach", "--nosyslog", "-f", str(rc), "--pidfile", str(tmp_path / "pid")]
    refused = run(*args, env=env, check=False)
    assert refused.returncode != 0 and "IN-USE" in refused.stdout + refused.stderr
    assert api(standalone, "DELETE", "/faults") == {"faults": []}
    run(*args, env=env)
    assert (tmp_path / "delivered").read_text().endswith(MESSAGE)
    assert api(standalone, "GET", "/users/alice/mailbox")["messages"] == []


def test_mpop_fetches_over_stls_trusting_the_ca(tmp_path: Path) -> None:
    server = Standalone(["--tls", "stls", "--user", "alice:pw"])
    try:
        api(server, "POST", "/users/alice/messages", "--data-binary", MESSAGE)
        mbox = tmp_path / "mbox"
        mbox.touch()
        run("mpop", "--file=/dev/null", "--host=127.0.0.1", f"--port={server.ready['port']}", "--user=alice",
            "--passwordeval=echo pw", "--tls=on", "--tls-starttls=on", f"--tls-trust-file={server.ready['ca_file']}",
            "--auth=user", f"--delivery=mbox,{mbox}", "--keep=off", "--only-new=off", "-q",
            env={**os.environ, "HOME": str(tmp_path)})
        assert mbox.read_text().endswith(MESSAGE + "\n")
        assert api(server, "POST", "/wait?deleted=1&timeout=10")["deleted"] == 1
    finally:
        assert server.stop() == 0


def test_a_bad_argument_is_one_line_and_exit_2() -> None:
    result = subprocess.run([sys.executable, "-m", "qpopper.testing", "--host", "0.0.0.0"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "loopback" in result.stderr
