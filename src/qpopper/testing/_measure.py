"""What a TestServer costs: start-up, stop, memory per running server.

    python -m qpopper.testing._measure [none|stls|implicit|both]

A measurement for docs/testing.md, not a test: timings are never asserted.
"""

from __future__ import annotations

import gc
import resource
import statistics
import sys
import time
import tracemalloc

from ._server import TestServer, TlsMode

ROUNDS = 20


def measure(tls: TlsMode) -> str:
    """One line: start and stop times, heap and RSS per running server."""
    TestServer(tls=tls).start().stop()  # imports and first-use costs out of the way
    starts = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        server = TestServer(tls=tls).start()
        starts.append(time.perf_counter() - started)
        server.stop()
    gc.collect()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    running = [TestServer(tls=tls).start() for _ in range(ROUNDS)]
    heap, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    for server in running:
        server.stop()
    stop = (time.perf_counter() - started) / ROUNDS
    return (
        f"tls={tls}: start median {statistics.median(starts) * 1000:.1f} ms (max {max(starts) * 1000:.1f}), "
        f"stop {stop * 1000:.1f} ms, Python heap {heap / ROUNDS / 1024:.0f} KiB and peak RSS growth "
        f"{(rss_after - rss_before) / ROUNDS:.0f} KiB per running server ({ROUNDS} at once)"
    )


if __name__ == "__main__":
    for mode in sys.argv[1:] or ["none", "stls"]:
        print(measure(mode))  # type: ignore[arg-type]
