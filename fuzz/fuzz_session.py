"""Coverage-guided fuzzing of the sans-IO protocol core with atheris.

    python fuzz/fuzz_session.py -runs=20000        # the bounded run CI does
    python fuzz/fuzz_session.py -max_total_time=3600 corpus/   # a longer campaign

Any input must either work or end in a protocol reply: an exception, a
hang or an unbounded buffer is a finding (see driver.py).
"""

from __future__ import annotations

import os
import random
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

with atheris.instrument_imports():
    from driver import drive_blindly
    from qpopper.protocol import Entropy, Session, SessionConfig


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    rng = random.Random(fdp.ConsumeIntInRange(0, 2**31))
    chunks = []
    while fdp.remaining_bytes():
        chunks.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 300)))
    # Fixed sources for the challenges too, so that a finding replays exactly.
    entropy = Entropy(pid=lambda: 1, clock_ns=lambda: 0, random_bits=rng.getrandbits)
    drive_blindly(Session(SessionConfig(hostname="h", entropy=entropy), timestamp="<1.2@h>"), chunks, rng)


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
