"""qpopper's extensions XTND XMIT/XLST, EUIDL and MDEF: in the core with
bytes, and on a real server with a real MTA binary (msmtp) delivering to a
real SMTP server (aiosmtpd)."""

from __future__ import annotations

import poplib
import shutil
import socket
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import rawpop
from conftest import PASSWORD
from qpopper import Controller, StaticAuthenticator
from qpopper.errors import ResponseCode
from qpopper.protocol import ListHeaders, SubmitMessage
from test_protocol import lines, logged_in, run

Fill = Callable[[str, list[bytes]], Path]

MSG1 = (
    b"From: Alice Example <alice@example.org>\nSubject: first\n  continued subject\nTo: bob\n"
    b"X-Trap: \x1b[31m%s%n%x\r\n\nbody\n"
)
MSG2 = b"Subject: second\nFrom: =?utf-8?q?Caf=C3=A9?= <cafe@example.org>\n\nbody 2\n"


# ---- the core ---------------------------------------------------------------


def test_xlst_and_euidl_effects() -> None:
    s = logged_in()
    _, effects = run(s, b"XTND XLST Subject\r\nxtnd xlist subj 2\r\nEUIDL\r\nEUIDL 3\r\n")
    assert effects == [
        ListHeaders(
            b"+OK xlst command accepted; headers coming.\r\n",
            ((0, 120, "uid-one"), (1, 200, "uid-two"), (2, 50, "uid-three")),
            "Subject",
            "xlst",
        ),
        ListHeaders(b"+OK xlst command accepted; headers coming.\r\n", ((1, 200, "uid-two"),), "subj", "xlst"),
        ListHeaders(
            b"+OK uidl command accepted.\r\n",
            ((0, 120, "uid-one"), (1, 200, "uid-two"), (2, 50, "uid-three")),
            "From",
            "euidl",
        ),
        ListHeaders(b"+OK ", ((2, 50, "uid-three"),), "From", "euidl", single=True),
    ]


@pytest.mark.parametrize(
    "command",
    [
        b"XTND",
        b"XTND FOO",
        b"XTND XLST",
        b"XTND XLST a b c",
        b"XTND XLST Subject 9",
        b"XTND XMIT x",
        b"EUIDL 0",
        b"EUIDL x",
    ],
)
def test_xtnd_errors(command: bytes) -> None:
    s = logged_in()
    out, effects = run(s, command + b"\r\n")
    assert out.startswith(b"-ERR ") and effects == []


def test_mdef_defines_runs_and_is_bounded() -> None:
    s = logged_in()
    out, _ = run(s, b"MDEF s(STAT)\r\nS\r\nMDEF l(LIST)\r\nl 2\r\n")
    assert lines(out) == [b"+OK Macro S defined.", b"+OK 3 370", b"+OK Macro L defined.", b"+OK 2 200"]
    out, _ = run(s, b"MDEF loop(loop)\r\nloop\r\nMDEF m(MDEF x(STAT))\r\nm\r\n")
    assert lines(out)[1] == b"-ERR A macro may not run a macro."
    assert lines(out)[3] == b"-ERR A macro may not run a macro."
    for i in range(20):
        run(s, b"MDEF m%d(NOOP)\r\n" % i)
    assert s.macros is not None and len(s.macros) == 10
    out, _ = run(s, b"MDEF " + b"n" * 101 + b"(NOOP)\r\nMDEF bad(\x01)\r\nMDEF nobrackets\r\n")
    assert all(line.startswith(b"-ERR") for line in lines(out))


def test_xmit_collects_unstuffs_and_submits() -> None:
    s = logged_in()
    out, _ = run(s, b"XTND XMIT\r\n")
    assert out == b"+OK Start sending message.\r\n"
    _, effects = run(s, b"To: bob@example.org\r\nSubject: hi\r\n\r\n..leading dot\r\nplain\r\n.\r\nNOOP\r\n")
    assert effects == [SubmitMessage(b"To: bob@example.org\nSubject: hi\n\n.leading dot\nplain\n", "alice")]
    assert effects[0].data.endswith(b"plain\n")  # type: ignore[attr-defined]
    s.submit_done(None)
    out, _ = run(s)
    assert lines(out) == [b"+OK Message sent successfully.", b"+OK no big woop"]


def test_xmit_size_limit_and_refusal() -> None:
    s = logged_in(xmit_max_size=100)
    run(s, b"XTND XMIT\r\n")
    out, effects = run(s, b"x" * 60 + b"\r\n" + b"y" * 60 + b"\r\n.\r\nSTAT\r\n")
    assert effects == []
    assert lines(out) == [b"-ERR Message too large or with over-long lines; not sent.", b"+OK 3 370"]
    s = logged_in(xmit=False)
    out, _ = run(s, b"XTND XMIT\r\nCAPA\r\n")
    assert out.startswith(b"-ERR XTND XMIT is disabled.")
    assert b"XTND XLST\r\n" in out and b"XMIT" not in out.split(b"\r\n", 1)[1]


def test_xmit_failure_reply() -> None:
    s = logged_in()
    run(s, b"XTND XMIT\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    s.submit_done(ResponseCode.SYS_TEMP, "The mail system cannot take the message now.")
    out, _ = run(s)
    assert out == b"-ERR [SYS/TEMP] The mail system cannot take the message now.\r\n"


# ---- a real server ----------------------------------------------------------


def test_xlst_and_euidl_over_the_wire(pop_server: Controller, fill: Fill) -> None:
    fill("alice", [MSG1, MSG2])
    c = poplib.POP3(pop_server.host, pop_server.port, timeout=10)
    c.user("alice")
    c.pass_(PASSWORD)
    resp, listing, _ = rawpop.longcmd(c, "XTND XLST subj")
    assert resp.startswith(b"+OK xlst")
    assert listing == [b"1 Subject: first", b"  continued subject", b"2 Subject: second"]
    resp, listing, _ = rawpop.longcmd(c, "XTND XLST x-trap 1")
    assert listing == [b"1 X-Trap:  [31m%s%n%x"]  # control characters blanked, never formatted
    uids = [line.split()[1] for line in c.uidl()[1]]
    resp, listing, _ = rawpop.longcmd(c, "EUIDL")
    sizes = [int(line.split()[1]) for line in c.list()[1]]
    assert listing == [
        b"1 " + uids[0] + b" %d Alice Example <alice@example.org>" % sizes[0],
        b"2 " + uids[1] + b" %d =?utf-8?q?Caf=C3=A9?= <cafe@example.org>" % sizes[1],
    ]
    euidl = rawpop.shortcmd(c, "EUIDL 2")
    assert euidl == b"+OK 2 " + uids[1] + b" %d =?utf-8?q?Caf=C3=A9?= <cafe@example.org>" % sizes[1]
    assert rawpop.shortcmd(c, "MDEF cnt(STAT)").startswith(b"+OK")
    assert rawpop.shortcmd(c, "CNT") == b"+OK 2 %d" % sum(sizes)
    c.quit()


class SmtpSink:
    """A real SMTP server (aiosmtpd) that records what it receives."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller as SmtpController

        self.received: list[tuple[str, list[str], bytes]] = []
        sink = self

        class Handler:
            async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
                sink.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))  # type: ignore[attr-defined]
                return "250 OK"

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.controller = SmtpController(Handler(), hostname="127.0.0.1", port=port)
        self.port = port


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    pytest.importorskip("aiosmtpd")
    sink = SmtpSink()
    sink.controller.start()
    yield sink
    sink.controller.stop()


def test_xmit_through_msmtp_to_a_real_smtp_server(smtp_sink: SmtpSink, mailroot: Path, fill: Fill) -> None:
    msmtp = shutil.which("msmtp")
    assert msmtp is not None, "msmtp is installed by .ci/run"
    fill("alice", [MSG2])
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    command = f"{msmtp} --host=127.0.0.1 --port={smtp_sink.port} --auth=off --tls=off"
    with Controller(authenticator=auth, mail_command=command) as server:
        c = poplib.POP3(server.host, server.port, timeout=10)
        c.user("alice")
        c.pass_(PASSWORD)
        assert rawpop.shortcmd(c, "XTND XMIT") == b"+OK Start sending message."
        for line in [
            b"From: alice@example.org",
            b"To: carol@example.net",
            b"Subject: via XMIT",
            b"",
            b"..dot-stuffed line",
            b"end",
        ]:
            rawpop.putline(c, line)
        assert rawpop.shortcmd(c, ".") == b"+OK Message sent successfully."
        c.quit()
    (sender, recipients, content) = smtp_sink.received[0]
    assert sender == "alice" and recipients == ["carol@example.net"]
    assert b"Subject: via XMIT" in content and b"\n.dot-stuffed line" in content.replace(b"\r\n", b"\n")


def test_xmit_runs_no_shell_and_reports_the_exit_status(tmp_path: Path, mailroot: Path, fill: Fill) -> None:
    fill("alice", [MSG2])
    record = tmp_path / "argv.txt"
    script = tmp_path / "fake-sendmail"
    script.write_text(
        f"#!{sys.executable}\nimport sys\nopen({str(record)!r}, 'w').write(repr(sys.argv[1:]))\n"
        "sys.stdin.read()\nsys.exit(0 if '$HOME;x' in sys.argv else 75)\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    auth = StaticAuthenticator({"alice": PASSWORD}, mail_location=f"maildir:{mailroot}/%u/Maildir")
    for command, reply in (
        (f"{script} '$HOME;x'", b"+OK Message sent successfully."),
        (f"{script}", b"-ERR [SYS/TEMP]"),
    ):
        with Controller(authenticator=auth, mail_command=command) as server:
            c = poplib.POP3(server.host, server.port, timeout=10)
            c.user("alice")
            c.pass_(PASSWORD)
            rawpop.shortcmd(c, "XTND XMIT")
            rawpop.putline(c, b"Subject: x")
            rawpop.putline(c, b"")
            try:
                got = rawpop.shortcmd(c, ".")
            except poplib.error_proto as exc:
                got = exc.args[0]
            assert got.startswith(reply)
            c.quit()
    assert eval(record.read_text()) == ["-oi", "-t", "-f", "alice"]
