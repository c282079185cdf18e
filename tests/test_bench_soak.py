"""The soak run (bench/soak.py) in a short variant, as a smoke test of the
script and of the integrity check it ends with: the run completes, every
message delivered is either taken once or still there once, and the
samples and slopes are reported. No timing or slope is asserted (a soak's
figures mean something only over its full length)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


@pytest.mark.slow
def test_a_short_soak_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SOAK), "--minutes", "0.25", "--clients", "4", "--sample", "2", "--work", str(tmp_path)],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["ok"] and not report["lost"] and not report["duplicated"]
    assert report["delivered"] == report["taken"] + report["left"]
    assert report["ops"]["plain"] > 0 and report["ops"]["delivered"] > 0
    assert set(report["slopes_per_hour"]) == {"rss_mb", "fds", "tasks"}
    assert report["samples"] >= 2
    # The MDA keeps the maildrops steady: never more held than --hold (its default, 144).
    assert report["hold"] == 144 and report["held_at_end"] == report["left"] <= report["hold"]


@pytest.mark.parametrize("args", [["--minutes", "0"], ["--hold", "-1"]])
def test_bad_arguments_get_one_line_and_status_2(args: list[str]) -> None:
    result = subprocess.run([sys.executable, str(SOAK), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
