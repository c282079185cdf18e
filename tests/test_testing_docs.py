"""docs/testing.md: its API reference is the one generated from the
docstrings, and its recipes' fixtures and faults exist."""

from __future__ import annotations

from pathlib import Path

from qpopper.testing import FAULT_KINDS
from qpopper.testing._reference import BEGIN, END, reference

DOC = Path(__file__).resolve().parent.parent / "docs" / "testing.md"


def test_the_reference_is_generated_from_the_docstrings() -> None:
    text = DOC.read_text()
    section = text[text.index(BEGIN) : text.index(END) + len(END)] + "\n"
    assert section == reference(), "regenerate: python -m qpopper.testing._reference (and paste it in)"


def test_every_fault_kind_is_in_the_table() -> None:
    text = DOC.read_text()
    for kind in FAULT_KINDS:
        assert f"| `{kind}` |" in text


def test_the_packaged_openapi_document_names_every_fault_kind() -> None:
    import importlib.resources
    import json

    document = json.loads(importlib.resources.files("qpopper.testing").joinpath("openapi.json").read_text())
    assert document["components"]["schemas"]["Fault"]["properties"]["kind"]["enum"] == list(FAULT_KINDS)
