"""Small helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def write_maildir_message(maildir: Path, message: bytes, name: str | None = None, sub: str = "new") -> str:
    """Deliver like a Maildir MDA: write in tmp/, rename into new/."""
    for d in ("cur", "new", "tmp"):
        (maildir / d).mkdir(parents=True, exist_ok=True)
    if name is None:
        name = f"{time.time_ns()}.P{os.getpid()}Q{write_maildir_message.counter}.test"  # type: ignore[attr-defined]
        write_maildir_message.counter += 1  # type: ignore[attr-defined]
    tmp = maildir / "tmp" / name
    tmp.write_bytes(message)
    os.rename(tmp, maildir / sub / name)
    return name


write_maildir_message.counter = 0  # type: ignore[attr-defined]
