"""maildrop/ sits below protocol/: nothing in it may import the protocol core.

The size rule both need lives in `qpopper.wiresize`, which imports nothing
of ours; this test keeps the maildrops from reaching up again.
"""

from __future__ import annotations

import ast
from pathlib import Path

import qpopper
import qpopper.wiresize

SRC = Path(qpopper.__file__).parent


def _imported_modules(path: Path) -> list[str]:
    """Absolute names of the modules a source file imports."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    out: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            name = node.module or ""
            full = f"{base}.{name}".strip(".") if node.level else name
            out.append(full)
            out.extend(f"{full}.{alias.name}" for alias in node.names)
    return out


def test_nothing_under_maildrop_imports_the_protocol() -> None:
    files = sorted((SRC / "maildrop").rglob("*.py"))
    assert len(files) > 5
    offending = {
        str(path.relative_to(SRC)): name
        for path in files
        for name in _imported_modules(path)
        if name == "qpopper.protocol" or name.startswith(("qpopper.protocol.", "qpopper.server", "qpopper.extensions"))
    }
    assert offending == {}


def test_the_size_rule_imports_nothing_of_ours() -> None:
    names = _imported_modules(Path(qpopper.wiresize.__file__))
    assert [n for n in names if n.startswith("qpopper")] == []


def test_the_checker_sees_relative_imports() -> None:
    maildir = SRC / "maildrop" / "maildir.py"
    assert "qpopper.wiresize" in _imported_modules(maildir)
    assert "qpopper.maildrop._base" in _imported_modules(maildir)
