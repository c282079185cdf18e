"""The APOP stamp and the CRAM-MD5 challenge, from sources given to the core.

A challenge must never repeat, so it mixes the process id, the clock and
random bits. The core does not read those itself: they come from an
`Entropy` in the session's configuration, the real ones by default, so a
test can give fixed ones and replay a whole session byte for byte.

Both challenges stay plain `<digits.digits@host>` msg-ids: strict clients
(mpop) refuse an APOP stamp of any other shape.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

# Random bits mixed into each kind of challenge.
STAMP_RANDOM_BITS = 40
CRAM_RANDOM_BITS = 64


def make_timestamp(hostname: str, pid: int, clock_ns: int, random_bits: int) -> str:
    """The APOP stamp `<pid.clock@host>` (RFC 1939 section 7).

    The clock part is the time in microseconds shifted left by 40 bits
    plus `random_bits` (below 2**40), so two greetings in the same
    microsecond of one process still differ.
    """
    clock = clock_ns // 1000 * (1 << STAMP_RANDOM_BITS) + random_bits
    return f"<{pid}.{clock}@{hostname}>"


def make_cram_challenge(hostname: str, pid: int, random_bits: int) -> bytes:
    """A CRAM-MD5 challenge (RFC 2195) `<pid.random@host>`."""
    return f"<{pid}.{random_bits}@{hostname}>".encode("ascii")


@dataclass(frozen=True, slots=True)
class Entropy:
    """Where challenges get their uniqueness: replace for reproducible tests."""

    pid: Callable[[], int] = os.getpid
    clock_ns: Callable[[], int] = time.time_ns
    # Called with a bit count k, returns a random int below 2**k.
    random_bits: Callable[[int], int] = secrets.randbits

    def timestamp(self, hostname: str) -> str:
        return make_timestamp(hostname, self.pid(), self.clock_ns(), self.random_bits(STAMP_RANDOM_BITS))

    def cram_challenge(self, hostname: str) -> bytes:
        return make_cram_challenge(hostname, self.pid(), self.random_bits(CRAM_RANDOM_BITS))


SYSTEM_ENTROPY = Entropy()
