"""inetd as qpopper's inetd build ran it: a connected socket on stdin and no
listener on the command line is one session, with or without -i; stdin or
stdout that cannot carry a session is one line and exit 2, on both loops."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import write_maildir_message

QPOPPER = [sys.executable, "-m", "qpopper"]
LOOPS = [pytest.param([], id="uvloop"), pytest.param(["--no-use-uvloop"], id="asyncio")]


@pytest.fixture
def passwd(tmp_path: Path) -> Path:
    path = tmp_path / "passwd"
    path.write_text(f"carol:{{PLAIN}}pw::::{tmp_path}/home/carol::\n")
    write_maildir_message(tmp_path / "home" / "carol" / "Maildir", b"Subject: hi\n\nhello\n")
    return path


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A real loopback TCP connection: (the client's end, the end inetd would hand over)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=30)
        served, _ = listener.accept()
    with client, served:
        yield client, served


def _session(client: socket.socket) -> bytes:
    client.sendall(b"USER carol\r\nPASS pw\r\nSTAT\r\nRETR 1\r\nQUIT\r\n")
    data = b""
    while chunk := client.recv(4096):
        data += chunk
    return data


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("flags", [pytest.param([], id="no -i"), pytest.param(["-i"], id="-i")])
def test_a_connected_socket_on_stdin_is_served(
    passwd: Path, tcp_pair: tuple[socket.socket, socket.socket], loop: list[str], flags: list[str]
) -> None:
    client, served = tcp_pair
    with subprocess.Popen(
        [*QPOPPER, *flags, *loop, "--passwd-file", str(passwd), "--hostname", "pop.test"],
        stdin=served.fileno(), stdout=served.fileno(), stderr=subprocess.PIPE,
    ) as proc:  # fmt: skip
        served.close()
        data = _session(client)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert data.startswith(b"+OK Qpopper") and b"pop.test" in data
    assert b"+OK 1 " in data and b"hello\r\n.\r\n" in data and data.endswith(b"\r\n")


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("flags", [pytest.param([], id="no -i"), pytest.param(["-i"], id="-i")])
def test_a_unix_socketpair_on_stdin_is_served(passwd: Path, loop: list[str], flags: list[str]) -> None:
    ours, theirs = socket.socketpair()
    with (
        ours,
        subprocess.Popen(
            [*QPOPPER, *flags, *loop, "--passwd-file", str(passwd)], stdin=theirs.fileno(), stdout=theirs.fileno()
        ) as proc,
    ):
        theirs.close()
        data = _session(ours)
        assert proc.wait(timeout=30) == 0
    assert b"hello\r\n.\r\n" in data


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("where", ["stdin", "stdout"])
@pytest.mark.parametrize("what", ["devnull", "regular file"])
def test_a_file_or_dev_null_is_one_line_and_exit_2(
    tmp_path: Path, passwd: Path, loop: list[str], where: str, what: str
) -> None:
    path = Path("/dev/null") if what == "devnull" else tmp_path / "plain"
    if what != "devnull":
        path.write_bytes(b"USER carol\r\n")
    with open(path, "r+b") as bad:
        result = subprocess.run(
            [*QPOPPER, "-i", *loop, "--passwd-file", str(passwd)],
            stdin=bad if where == "stdin" else subprocess.PIPE,
            stdout=bad if where == "stdout" else subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=30,
            check=False,
        )
    assert result.returncode == 2
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    kind = "a character device" if what == "devnull" else "a regular file"
    name = "standard input" if where == "stdin" else "standard output"
    assert lines[0] == (
        f"qpopper: inetd mode needs a connected socket or a pipe on {name}, which is {kind}; "
        "to listen on a port, give an address (e.g. :110) instead of -i"
    )


def test_a_socket_on_stdin_with_an_address_given_is_standalone(
    passwd: Path, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    """A listener on the command line wins: the daemon listens there and leaves stdin alone."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _, served = tcp_pair
    with subprocess.Popen(
        [*QPOPPER, "--no-use-uvloop", "--passwd-file", str(passwd), f"127.0.0.1:{port}"],
        stdin=served.fileno(), stderr=subprocess.DEVNULL,
    ) as proc:  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
                        assert conn.recv(100).startswith(b"+OK")
                        break
                except ConnectionRefusedError:
                    assert time.monotonic() < deadline, "the daemon never listened"
                    time.sleep(0.05)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
