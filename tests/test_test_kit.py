"""The test kit stays shared code: helpers live in importable modules (`iot/testing/`, `<app>/testing.py`),
never in a `conftest.py`, and no module imports from one.

A conftest is loaded by pytest under a name that depends on how pytest was started (rootdir, `rootdir/conftest`
or a package path), so importing from it can load a second copy of it, with its own module-level state, and
ties every importer to one directory's fixtures. Fixtures (which must live in a conftest) stay thin wrappers
around the kit.
"""

import ast
from pathlib import Path

from iot.testing.processes import REPO_ROOT

SKIPPED_DIRS = {".git", ".venv", "var", "node_modules", "__pycache__", "build", "dist"}


def _python_files() -> list[Path]:
    found = []
    for path in REPO_ROOT.rglob("*.py"):
        parts = path.relative_to(REPO_ROOT).parts
        if not any(part in SKIPPED_DIRS or part.startswith(".") for part in parts[:-1]):
            found.append(path)
    return found


def _conftest_imports(tree: ast.AST) -> list[str]:
    """Every import statement of the module (at any depth) that names a conftest module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = [alias.name for alias in node.names]
            if "conftest" in module.split(".") or "conftest" in names:
                found.append(f"line {node.lineno}: from {'.' * node.level}{module} import {', '.join(names)}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if "conftest" in alias.name.split("."):
                    found.append(f"line {node.lineno}: import {alias.name}")
    return found


def _is_fixture_or_hook(function: ast.FunctionDef) -> bool:
    if function.name.startswith("pytest_"):
        return True
    return any("fixture" in ast.unparse(decorator) for decorator in function.decorator_list)


def test_the_scan_sees_the_suite():
    files = {path.relative_to(REPO_ROOT).as_posix() for path in _python_files()}
    assert {"conftest.py", "telemetry/tests/conftest.py", "iot/testing/live.py", "tests/test_test_kit.py"} <= files


def test_no_module_imports_from_a_conftest():
    offenders = {}
    for path in _python_files():
        imports = _conftest_imports(ast.parse(path.read_bytes(), filename=str(path)))
        if imports:
            offenders[path.relative_to(REPO_ROOT).as_posix()] = imports
    assert offenders == {}, (
        f"move the helpers into iot/testing/ or <app>/testing.py and import them from there: {offenders}"
    )


def test_conftest_files_define_only_fixtures_and_hooks():
    offenders = {}
    for path in _python_files():
        if path.name != "conftest.py":
            continue
        tree = ast.parse(path.read_bytes(), filename=str(path))
        helpers = [
            node.name
            for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and not (isinstance(node, ast.FunctionDef) and _is_fixture_or_hook(node))
        ]
        if helpers:
            offenders[path.relative_to(REPO_ROOT).as_posix()] = helpers
    assert offenders == {}, f"helpers belong in the test kit (iot/testing/, <app>/testing.py): {offenders}"


def test_the_scan_finds_what_it_forbids():
    """The checks above pass only if they can fail: each form of a conftest import, and a helper, is caught."""
    forbidden = """
from telemetry.tests.conftest import point_body
from .conftest import x
from . import conftest
import conftest
import telemetry.tests.conftest as helpers

def f():
    from conftest import y
"""
    assert len(_conftest_imports(ast.parse(forbidden))) == 6
    allowed = "from iot.testing.live import register_device\nimport conftest_like\nfrom a.conftests import b\n"
    assert _conftest_imports(ast.parse(allowed)) == []
    module = ast.parse(
        "@pytest.fixture(scope='session')\ndef a(): ...\n@pytest.hookimpl()\ndef pytest_x(): ...\ndef b(): ..."
    )
    assert [node.name for node in module.body if not _is_fixture_or_hook(node)] == ["b"]
