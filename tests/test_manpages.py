"""The committed manual pages are the ones the registry generates."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from qpopper.config.manpages import PAGES
from qpopper.config.settings import SETTINGS

DOCS = Path(__file__).resolve().parent.parent / "docs" / "man"


@pytest.mark.parametrize("name", sorted(PAGES))
def test_committed_page_is_current(name: str) -> None:
    assert (DOCS / name).read_text() == PAGES[name](), "run: python -m qpopper.config.manpages docs/man"


def test_every_setting_and_switch_is_documented() -> None:
    conf = PAGES["qpopper.conf.5"]()
    page = PAGES["qpopper.8"]()
    for setting in SETTINGS:
        assert setting.name.replace("-", "\\-") in conf
        if setting.switch:
            assert f"\\fB{setting.switch.replace('-', chr(92) + '-')}\\fR" in page


def test_pages_render_without_warnings(tmp_path: Path) -> None:
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff is not installed")
    for name in PAGES:
        out = subprocess.run([groff, "-man", "-Tutf8", "-ww", str(DOCS / name)], capture_output=True, timeout=30)
        assert out.returncode == 0 and out.stderr == b"", out.stderr
