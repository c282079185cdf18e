"""The authenticators' optional abilities, and the auth package's import graph."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import qpopper.auth
from qpopper.auth import Authenticator, Principal, QuickAuthenticator, ScramSecretSource, UserLookup
from qpopper.auth.apopdb import ApopAuthenticator, ApopDatabase
from qpopper.auth.credentials import Credentials
from qpopper.auth.passwdfile import PasswdFileAuthenticator
from qpopper.auth.static import StaticAuthenticator
from qpopper.auth.system import SystemAuthenticator

AUTH_DIR = Path(qpopper.auth.__file__).parent
MODULES = sorted(m.name for m in pkgutil.iter_modules([str(AUTH_DIR)]))


class OnlyAuthenticates:
    def authenticate(self, credentials: Credentials) -> Principal | None:
        return None


def test_every_backend_declares_what_it_can_do(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("alice:{PLAIN}pw::::::\n")
    abilities = (Authenticator, QuickAuthenticator, ScramSecretSource, UserLookup)
    expected = {
        StaticAuthenticator: (Authenticator, QuickAuthenticator, ScramSecretSource),
        PasswdFileAuthenticator: abilities,
        ApopAuthenticator: abilities,
        SystemAuthenticator: (Authenticator,),
    }
    for cls, declared in expected.items():
        assert {a for a in abilities if issubclass(cls, a)} == set(declared), cls.__name__
    files = PasswdFileAuthenticator(str(passwd))
    assert files.lookup("alice") is not None
    apop = ApopAuthenticator(files, ApopDatabase(str(tmp_path / "pop.auth")), None)
    assert isinstance(apop, UserLookup) and apop.lookup("alice") is files.lookup("alice")


def test_a_wrapped_backend_without_the_abilities_answers_nothing_known(tmp_path: Path) -> None:
    apop = ApopAuthenticator(OnlyAuthenticates(), ApopDatabase(str(tmp_path / "pop.auth")), None)
    assert not isinstance(OnlyAuthenticates(), (QuickAuthenticator, ScramSecretSource, UserLookup))
    assert apop.scram_secret("alice", "SCRAM-SHA-256") is None
    assert apop.lookup("alice") is None
    from qpopper.auth.credentials import UserPass

    assert apop.authenticate_quickly(UserPass("alice", b"pw")) is None


def _imports(module: str) -> set[str]:
    """The auth modules `module` imports, at any level of its code."""
    tree = ast.parse((AUTH_DIR / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module is None:
                found |= {a.name for a in node.names if a.name in MODULES} or {"__init__"}
            else:
                found.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qpopper.auth."):
            found.add(node.module.split(".")[2])
    return found - {module}


def test_the_auth_modules_import_each_other_without_a_cycle() -> None:
    graph = {m: _imports(m) for m in MODULES}
    assert "sasl" not in graph["gssapi_mech"] and "sasl_types" in graph["gssapi_mech"]
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path, module))
        if module in done:
            return
        for imported in graph.get(module, ()):
            visit(imported, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())


@pytest.mark.parametrize("module", MODULES)
def test_each_auth_module_imports_alone_in_a_fresh_interpreter(module: str) -> None:
    name = "qpopper.auth" if module == "__init__" else f"qpopper.auth.{module}"
    subprocess.run([sys.executable, "-c", f"import {name}"], check=True, timeout=60)


def test_old_import_paths_of_the_sasl_types_still_work() -> None:
    from qpopper.auth import sasl, sasl_types

    for name in sasl_types.__all__:
        assert getattr(sasl, name) is getattr(sasl_types, name)
