"""Run qpopper with tracemalloc on, for finding where a long run's memory goes (bench-only).

    python bench/tracehook.py QPOPPER-ARGUMENTS...

Environment: QPOPPER_TRACE_DIR (required: where the reports go), QPOPPER_TRACE_FRAMES (frames kept
per allocation, default 1: a line each, the cheapest).

Every process of the server (the daemon, each worker, the exporter: they fork from this one and
keep its tracing) answers SIGUSR2: the first signal takes a baseline snapshot, each later one writes
`trace-PID-N.txt` in QPOPPER_TRACE_DIR: the lines whose live allocations grew most since the
baseline, and the totals. Growth that follows the maildrops' size shows as the maildrop code's
lines; a leak as lines that keep growing whatever the load holds. The server itself has no such
hook: tracing costs a third of its speed, and a signal an operator might send should not.
"""

from __future__ import annotations

import linecache
import os
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parent.parent
TOP = 30

_state: dict[str, object] = {}


def _report(_signo: int, _frame: FrameType | None) -> None:
    """SIGUSR2: the baseline, or what grew since it (written by the process that got the signal)."""
    snapshot = tracemalloc.take_snapshot().filter_traces((
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, linecache.__file__),
    ))
    pid = os.getpid()
    base = _state.get(f"base-{pid}")
    if not isinstance(base, tracemalloc.Snapshot):
        # A forked child inherits its parent's baseline key under another pid: it starts its own.
        _state[f"base-{pid}"] = snapshot
        _state[f"n-{pid}"] = 0
        return
    n = int(str(_state[f"n-{pid}"])) + 1
    _state[f"n-{pid}"] = n
    diffs = snapshot.compare_to(base, "lineno")
    current, peak = tracemalloc.get_traced_memory()
    lines = [f"pid {pid} report {n}: traced {current / 1e6:.2f} MB (peak {peak / 1e6:.2f} MB), "
             f"{sum(d.size_diff for d in diffs) / 1e3:+.1f} kB since the baseline"]
    lines += [f"{d.size_diff / 1e3:+9.1f} kB {d.count_diff:+7d} blocks  {d.traceback}"
              for d in diffs[:TOP]]
    out = Path(os.environ["QPOPPER_TRACE_DIR"]) / f"trace-{pid}-{n}.txt"
    out.write_text("\n".join(lines) + "\n")


def main() -> int:
    if "QPOPPER_TRACE_DIR" not in os.environ:
        print("tracehook.py: set QPOPPER_TRACE_DIR", file=sys.stderr)
        return 2
    tracemalloc.start(int(os.environ.get("QPOPPER_TRACE_FRAMES", "1")))
    signal.signal(signal.SIGUSR2, _report)
    sys.path.insert(0, str(REPO / "src"))
    from qpopper.daemon.cli import main as qpopper_main

    return qpopper_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
