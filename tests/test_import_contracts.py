"""The app boundaries in pyproject.toml ([tool.importlinter]) hold, and `lint-imports` fails when one is crossed.

Each violation is planted in a copy of the packages (the working tree is never touched) and
must make `lint-imports` exit non-zero naming the contract it breaks; `make lint` and
`make test` run the same command.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = [str(Path(sys.executable).with_name("lint-imports")), "--no-cache", "--no-logo"]
PACKAGES = ("iot", "devices", "telemetry", "firmware", "alerts", "analytics", "mqtt")

IOT_SHARED = "Shared package iot imports no domain app (composition root excepted)"
COMPOSITION_ROOT = "Nothing imports the composition root (iot.asgi, iot.urls, iot.settings, iot.celery)"
MQTT_BROKER = "The embedded MQTT broker imports no Django code (mqtt.broker)"
LAYERS = "Domain apps import only the apps below them (devices < telemetry < firmware | alerts < analytics | mqtt)"


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    # A wide terminal, so that contract names are printed on one line.
    env = {"PATH": str(Path(sys.executable).parent), "COLUMNS": "300"}
    return subprocess.run(LINT_IMPORTS, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def tree(tmp_path) -> Path:
    """A copy of the packages and the configuration: what `lint-imports` reads."""
    for package in PACKAGES:
        shutil.copytree(REPO_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_keeps_every_contract():
    result = lint_imports(REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in (IOT_SHARED, COMPOSITION_ROOT, LAYERS, MQTT_BROKER):
        assert f"{name} KEPT" in result.stdout


@pytest.mark.parametrize(
    ("module", "violation", "contract"),
    [
        # The shared package reaching into an app, directly or by way of the composition root.
        ("iot/cache.py", "from devices.selectors import device_get", IOT_SHARED),
        ("iot/api/permissions.py", "import telemetry.models", IOT_SHARED),
        ("iot/health.py", "from iot.asgi import application", COMPOSITION_ROOT),
        # The base app depending on one built on it; two sibling apps on each other.
        ("devices/selectors.py", "from telemetry.models import TelemetryPoint", LAYERS),
        ("telemetry/selectors.py", "import alerts", LAYERS),
        ("alerts/apps.py", "from firmware import apps", LAYERS),
        ("firmware/selectors.py", "from analytics import selectors", LAYERS),
        ("devices/selectors.py", "from mqtt import selectors", LAYERS),
        ("analytics/selectors.py", "import mqtt.services", LAYERS),
        # The embedded MQTT broker runs without Django.
        ("mqtt/broker/plugin.py", "from mqtt.services import mqtt_client_authenticate", MQTT_BROKER),
    ],
)
def test_a_crossed_boundary_fails_the_lint(tree, module, violation, contract):
    with (tree / module).open("a") as source:
        source.write(f"\n{violation}  # planted by tests/test_import_contracts.py\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert f"{contract} BROKEN" in result.stdout, result.stdout
    importer = module.removesuffix(".py").replace("/", ".")
    assert f"{importer} -> {violation.split()[1]}" in result.stdout  # the report names the planted import


def test_make_lint_and_make_test_run_the_contracts():
    for target in ("lint", "test"):
        commands = subprocess.run(
            ["make", "-n", target], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
        ).stdout
        assert "lint-imports" in commands, f"make {target} does not run lint-imports:\n{commands}"
