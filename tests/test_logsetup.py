"""The syslog handler: the wire format syslogd expects, a syslogd that
restarts, one that is gone; the record formatter writes what logging's own would;
stderr's records, one write per event-loop turn and none lost or doubled."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
import sys
import threading
from pathlib import Path

from qpopper.daemon.logsetup import RECORD_FORMAT, RecordFormatter, SyslogHandler, TurnBufferedHandler


def _listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    return sock


def _record(level: int, text: str) -> logging.LogRecord:
    return logging.LogRecord("qpopper.test", level, __file__, 1, text, None, None)


def test_priority_ident_and_text(tmp_path: Path) -> None:
    path = tmp_path / "log.sock"
    syslogd = _listener(path)
    handler = SyslogHandler(str(path), 2, "qpopper[7]: ")  # facility mail
    try:
        handler.emit(_record(logging.INFO, "Stats: carol 0 0 1 10"))
        handler.emit(_record(logging.ERROR, "caf\u00e9 broken"))
        assert syslogd.recv(4096) == b"<21>qpopper[7]: Stats: carol 0 0 1 10"  # mail.notice
        assert syslogd.recv(4096) == "<19>qpopper[7]: caf\u00e9 broken".encode()  # mail.err
    finally:
        handler.close()
        syslogd.close()


def test_syslogd_restart_and_absence(tmp_path: Path) -> None:
    path = tmp_path / "log.sock"
    syslogd = _listener(path)
    handler = SyslogHandler(str(path), 16, "x: ")
    try:
        syslogd.close()
        path.unlink()
        handler.emit(_record(logging.WARNING, "lost"))  # nobody listens: dropped, no error
        syslogd = _listener(path)  # a restarted syslogd binds a new socket
        handler.emit(_record(logging.WARNING, "found"))
        assert syslogd.recv(4096) == b"<132>x: found"
    finally:
        handler.close()
        syslogd.close()


def test_a_syslogd_that_stops_reading_never_blocks_the_server(tmp_path: Path) -> None:
    path = tmp_path / "log.sock"
    syslogd = _listener(path)  # bound, never read until the end: its queue fills up
    handler = SyslogHandler(str(path), 2, "q: ")
    try:
        done = threading.Event()

        def flood() -> None:
            for n in range(20_000):
                handler.emit(_record(logging.INFO, f"record {n} " + "x" * 200))
            done.set()

        threading.Thread(target=flood, daemon=True).start()
        assert done.wait(60), "emit blocked on a full syslog queue"  # a hang detector, not a speed test
        assert handler.dropped > 0
        received = 0
        syslogd.setblocking(False)
        while True:
            try:
                syslogd.recv(4096)
                received += 1
            except BlockingIOError:
                break
        syslogd.settimeout(5)
        assert 0 < received < 20_000
        handler.emit(_record(logging.WARNING, "after"))
        note = b"after (%d earlier records dropped: syslogd was not reading)" % (20_000 - received)
        assert syslogd.recv(4096).endswith(note)
        assert handler.dropped == 0
    finally:
        handler.close()
        syslogd.close()


def test_record_formatter_writes_what_the_generic_one_does() -> None:
    generic = {False: logging.Formatter(RECORD_FORMAT),
               True: logging.Formatter("%(asctime)s qpopper[%(process)d] %(levelname)s " + RECORD_FORMAT)}
    for stamped in (False, True):
        ours = RecordFormatter(stamped)
        for created in (1_700_000_000.0, 1_700_000_000.0421, 1_700_000_001.999):  # one second twice, then the next
            record = logging.LogRecord("qpopper.session", logging.INFO, __file__, 1, "%s: %s logged in, %d messages",
                                       ("127.0.0.1:4000", "alice", 3), None)
            record.created, record.msecs = created, (created - int(created)) * 1000
            assert ours.format(record) == generic[stamped].format(record)
        try:
            raise ValueError("broken")
        except ValueError:
            failed = logging.LogRecord("qpopper.session", logging.ERROR, __file__, 1, "internal error", None,
                                       sys.exc_info())
        text = ours.format(failed)
        assert text.startswith(generic[stamped].format(failed)[:10]) and text.endswith("ValueError: broken")


class CountingStream(io.StringIO):
    """A text stream that remembers each write, as the file behind stderr sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def _buffered() -> tuple[TurnBufferedHandler, CountingStream]:
    stream = CountingStream()
    handler = TurnBufferedHandler(stream)
    handler.setFormatter(RecordFormatter(stamped=False))
    return handler, stream


def test_the_records_of_one_loop_turn_go_out_in_one_write() -> None:
    handler, stream = _buffered()

    async def sessions() -> list[str]:
        handler.attach(asyncio.get_running_loop())
        for n in range(3):  # one turn: three sessions' records
            handler.handle(_record(logging.INFO, f"login {n}"))
        written_in_the_turn = list(stream.writes)
        await asyncio.sleep(0)  # the turn ends
        handler.handle(_record(logging.INFO, "quit 0"))
        handler.detach()  # the loop ends: what it kept is written
        return written_in_the_turn

    assert asyncio.run(sessions()) == []
    assert stream.writes == [
        "qpopper.test: login 0\nqpopper.test: login 1\nqpopper.test: login 2\n", "qpopper.test: quit 0\n"]


def test_a_record_from_a_worker_thread_keeps_the_order_and_goes_out_at_once() -> None:
    handler, stream = _buffered()

    async def session() -> None:
        handler.attach(asyncio.get_running_loop())
        handler.handle(_record(logging.INFO, "on the loop"))
        worker = threading.Thread(target=handler.handle, args=(_record(logging.ERROR, "from a worker"),))
        worker.start()
        worker.join()
        assert stream.getvalue() == "qpopper.test: on the loop\nqpopper.test: from a worker\n"
        handler.detach()

    asyncio.run(session())
    assert len(stream.writes) == 1


def test_a_burst_is_written_before_it_grows_without_bound_and_flush_writes_the_rest() -> None:
    handler, stream = _buffered()

    async def burst() -> None:
        handler.attach(asyncio.get_running_loop())
        for n in range(TurnBufferedHandler.MAX_PENDING + 5):
            handler.handle(_record(logging.INFO, f"r{n}"))
        assert len(stream.writes) == 1  # the first MAX_PENDING
        handler.flush()  # what logging.shutdown does at exit

    asyncio.run(burst())
    lines = stream.getvalue().splitlines()
    assert lines == [f"qpopper.test: r{n}" for n in range(TurnBufferedHandler.MAX_PENDING + 5)]


def test_a_forked_child_writes_none_of_its_parents_kept_records(tmp_path: Path) -> None:
    out = tmp_path / "records"
    with open(out, "w", encoding="utf-8") as file:
        handler = TurnBufferedHandler(file)
        handler.setFormatter(RecordFormatter(stamped=False))

        async def fork_in_a_turn() -> int:
            handler.attach(asyncio.get_running_loop())
            handler.handle(_record(logging.INFO, "parent's"))
            pid = os.fork()
            if pid == 0:  # the child: no loop of the parent's, nothing kept
                handler.handle(_record(logging.INFO, "child's"))
                handler.flush()
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            handler.detach()
            return status

        assert asyncio.run(fork_in_a_turn()) == 0
    assert out.read_text().splitlines() == ["qpopper.test: child's", "qpopper.test: parent's"]


def test_a_record_after_the_loop_closed_is_written_at_once() -> None:
    handler, stream = _buffered()
    loop = asyncio.new_event_loop()
    handler.attach(loop)
    loop.close()  # a loop that ends without detaching: no turn will end to write for it
    handler.handle(_record(logging.INFO, "late"))
    assert stream.getvalue() == "qpopper.test: late\n"
