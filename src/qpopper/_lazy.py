"""Names a package exports but imports on first use (PEP 562).

Both `qpopper` and `qpopper.protocol` need this: `import qpopper.protocol`
runs qpopper/__init__.py first, and neither may drag in the server (asyncio,
ssl, socket, threading) or go round in a circle with the extensions."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, where: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module `__getattr__` and `__dir__` for `package` that import each
    name of `where` (name -> relative module) when it is first asked for,
    and keep it in the package's namespace so later look-ups skip them."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__
