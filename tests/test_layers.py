"""The import rules of docs/architecture.md, checked on the source.

Each part of the package may import only the parts below it; the table
here is the one the document draws. A new import across parts that breaks
it fails this test, which names the file and the import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "qpopper"

# Shared modules at the top of the package: they import nothing of ours
# but each other's errors (checked below).
BASE = {"errors", "usernames", "netaddr", "wiresize", "logtext", "_version", "_lazy"}

ALLOWED: dict[str, set[str]] = {
    "maildrop": BASE,
    "auth": BASE | {"maildrop"},  # a principal's maildrop location is expanded from its template
    "config": BASE | {"auth", "maildrop"},  # defaults and checks: SASL names, the location syntax
    # The protocol core, and the protocol halves of qpopper's extensions
    # (extensions/*/commands.py), which plug into its command table.
    "protocol": BASE | {"auth", "maildrop", "extensions"},
    "extensions": BASE | {"auth", "maildrop", "protocol", "config"},  # config: read the Options they run by
    "server": BASE | {"auth", "maildrop", "protocol", "extensions", "config"},
    "controller": BASE | {"auth", "config", "server"},
    "testing": BASE | {"auth", "maildrop", "protocol", "extensions", "config", "server", "controller"},
    "daemon": BASE | {"auth", "maildrop", "protocol", "extensions", "config", "server"},
}


def _part(module: str) -> str:
    """qpopper.server._tls -> server; qpopper.errors -> errors."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[int, str]]:
    """The qpopper modules `path` imports, with their line numbers."""
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    module = ".".join(relative.parts)
    package = module.removesuffix(".__init__") if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target == "qpopper":
                found += [(node.lineno, f"qpopper.{alias.name}") for alias in node.names]
            elif target.startswith("qpopper."):
                found.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("qpopper.")]
    return found


def _part_of_file(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_each_part_imports_only_the_parts_below_it(part: str) -> None:
    files = sorted(PACKAGE.glob(f"{part}/**/*.py")) or [PACKAGE / f"{part}.py"]
    broken = []
    for path in files:
        for line, target in _imports(path):
            other = _part(target)
            if other and other != part and other not in ALLOWED[part]:
                broken.append(f"{path.relative_to(PACKAGE)}:{line} imports {target}")
    assert not broken, "\n".join(broken)


def test_the_shared_base_modules_import_nothing_above_them() -> None:
    for name in BASE:
        path = PACKAGE / f"{name}.py"
        others = {_part(target) for _, target in _imports(path)} - {name}
        assert others <= {"errors"}, (name, others)


def test_nothing_but_the_entry_point_imports_the_daemon() -> None:
    for path in PACKAGE.rglob("*.py"):
        if _part_of_file(path) in ("daemon", "__main__"):
            continue
        # The package's lazy __init__ names no daemon module either.
        assert not [t for _, t in _imports(path) if _part(t) == "daemon"], path


def test_every_part_is_in_the_table() -> None:
    parts = {_part_of_file(p) for p in PACKAGE.rglob("*.py")}
    assert parts - set(ALLOWED) - BASE <= {"__init__", "__main__"}, parts


# Optional packages, and the only modules that may import them at their top (the others load
# them lazily, inside the function that needs them, so a server without the feature never does).
OPTIONAL_IMPORTERS = {
    "prometheus_client": {"server/_metrics.py"},
}


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
    return names


@pytest.mark.parametrize("package", sorted(OPTIONAL_IMPORTERS))
def test_optional_packages_are_imported_at_the_top_of_their_own_modules_only(package: str) -> None:
    importers = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if package in _top_level_imports(p)}
    assert importers <= OPTIONAL_IMPORTERS[package], importers
