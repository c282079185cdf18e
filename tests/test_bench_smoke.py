"""Benchmark smoke run in CI: fails on a gross performance regression only.

bench/guard.py brings everything it needs (a generated Maildir and a load
driver) and measures the server's CPU per login session and per GB
retrieved, in units of a calibration task timed in the same run: never an
absolute time. Its limits are about three times the usual figures. Full
comparisons against Dovecot: bench/run.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

GUARD = Path(__file__).resolve().parent.parent / "bench" / "guard.py"

pytestmark = pytest.mark.slow


def _guard(work: Path) -> dict[str, object]:
    r = subprocess.run(
        [sys.executable, str(GUARD), "--work", str(work)], check=False, capture_output=True, text=True, timeout=120
    )
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert lines, f"guard printed nothing (status {r.returncode}): {r.stderr[-2000:]}"
    result: dict[str, object] = json.loads(lines[-1])
    log = (work / "qpopper.log").read_text()[-2000:] if "error" in result else ""
    assert "error" not in result, f"guard run failed: {result['error']}; log: {log}"
    return result


def test_no_gross_regression(tmp_path: Path) -> None:
    result = _guard(tmp_path)
    figures, scaled, limits = result["figures"], result["scaled"], result["limits"]
    assert isinstance(figures, dict) and isinstance(scaled, dict) and isinstance(limits, dict)
    assert figures["sessions"] > 100 and figures["octets"] > 10_000_000, figures
    report = ", ".join(f"{k}: {scaled[k]:.3g} (limit {limits[k]:g})" for k in limits)
    print("bench smoke:", report)
    assert not result["regressed"], f"gross performance regression: {report}"
    assert all(scaled[k] < limits[k] for k in limits), report

