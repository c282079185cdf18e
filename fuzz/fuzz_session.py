"""Coverage-guided fuzzing of the sans-IO protocol core with atheris.

    python fuzz/fuzz_session.py -runs=20000        # the bounded run CI does
    python fuzz/fuzz_session.py -max_total_time=3600 corpus/   # a longer campaign

Any input must either work or end in a protocol reply: an exception, a
hang or an unbounded buffer is a finding.
"""

from __future__ import annotations

import random
import sys

import atheris

with atheris.instrument_imports():
    from qpopper.auth.credentials import Rejected
    from qpopper.errors import ResponseCode
    from qpopper.maildrop import MessageInfo
    from qpopper.protocol import (
        Authenticate,
        Close,
        Commit,
        ComputeSizes,
        LookupScramSecret,
        OpenMaildrop,
        SendMessage,
        Session,
        SessionConfig,
        StartTls,
        SubmitMessage,
    )

BUFFER_BOUND = 16384 + 1


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    rng = random.Random(fdp.ConsumeIntInRange(0, 2**31))
    session = Session(SessionConfig(hostname="h"), timestamp="<1.2@h>")
    while fdp.remaining_bytes():
        session.receive_data(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 300)))
        for _ in range(10_000):
            effect = session.next_effect()
            if effect is None:
                break
            if isinstance(effect, Authenticate):
                if rng.random() < 0.5 and not isinstance(effect.credentials, Rejected):
                    session.auth_succeeded(effect.credentials.user)
                else:
                    session.auth_failed(ResponseCode.AUTH)
            elif isinstance(effect, OpenMaildrop):
                session.maildrop_opened([MessageInfo(rng.randrange(1, 10**6), f"u{i}") for i in range(rng.randrange(4))])
            elif isinstance(effect, Commit):
                session.commit_done()
            elif isinstance(effect, StartTls):
                session.tls_started(session.security)
            elif isinstance(effect, LookupScramSecret):
                session.scram_secret(None)
            elif isinstance(effect, SubmitMessage):
                session.submit_done(None)
            elif isinstance(effect, ComputeSizes):
                session.sizes_computed(effect.spec, {i: 1 for i in effect.indices})
            elif isinstance(effect, SendMessage) and rng.random() < 0.1:
                session.message_unavailable()
            elif isinstance(effect, Close):
                return
        else:
            raise RuntimeError("the session produced effects without end")
        if len(session._buffer) > BUFFER_BOUND:  # noqa: SLF001
            raise RuntimeError("unbounded input buffer")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
