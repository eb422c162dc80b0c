"""Settings reach the code one way: `django.conf.settings`, each defined once in iot/settings.py.

`os.environ` in a Django module is banned by ruff (TID251, pyproject.toml): checked here
on planted source, so the rule can't be switched off unnoticed. ruff has no rule for
`getattr(settings, NAME, default)` (a second default that drifts from the one in
iot/settings.py), so the source is searched for it. And a setting nothing reads is a knob
that does nothing: every platform setting must be read somewhere.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

from django.conf import global_settings

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("iot", "devices", "telemetry", "firmware", "alerts", "analytics", "mqtt")
SETTINGS_FILES = {REPO_ROOT / "iot" / "settings.py", REPO_ROOT / "iot" / "settings_test.py"}
# Read by the libraries they configure (Django's own are in django.conf.global_settings; CELERY_*: Celery).
LIBRARY_SETTINGS = {"ASGI_APPLICATION", "CHANNEL_LAYERS", "REST_FRAMEWORK", "ROOT_URLCONF", "SPECTACULAR_SETTINGS"}

PLANTED = 'import os\n\nLIMIT = int(os.environ.get("LIMIT", "5"))\n'


def ruff_on(filename: str, source: str) -> subprocess.CompletedProcess:
    """ruff with the project's configuration on `source`, as if it were the file `filename`."""
    ruff = str(Path(sys.executable).with_name("ruff"))
    command = [ruff, "check", "--no-cache", "--select", "TID251", "--stdin-filename", filename, "-"]
    return subprocess.run(command, cwd=REPO_ROOT, input=source, capture_output=True, text=True, timeout=60)


def python_files(*roots: str):
    for root in roots:
        for path in sorted((REPO_ROOT / root).rglob("*.py")):
            if "migrations" not in path.parts:
                yield path


def test_ruff_refuses_os_environ_in_a_django_module():
    for module in ("iot/planted.py", "devices/planted.py", "telemetry/api/planted.py"):
        result = ruff_on(module, PLANTED)
        assert result.returncode == 1 and "TID251 `os.environ` is banned" in result.stdout, (module, result.stdout)
    # The process runner and the entry points that set DJANGO_SETTINGS_MODULE are exempt.
    for module in ("scripts/planted.py", "iot/asgi.py", "manage.py"):
        assert ruff_on(module, PLANTED).returncode == 0, module


def test_no_getattr_default_repeats_a_setting():
    offenders = []
    for path in python_files(*PACKAGES, "scripts"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")
                and node.args
                and isinstance(node.args[0], ast.Name)
                and node.args[0].id == "settings"
            ):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert not offenders, f"read the setting as settings.NAME (defined in iot/settings.py): {offenders}"


def platform_settings() -> set[str]:
    """Settings of the platform's own defined in iot/settings.py, less those it uses to build others
    (e.g. a beat schedule's interval, read by Celery through CELERY_BEAT_SCHEDULE)."""
    tree = ast.parse((REPO_ROOT / "iot" / "settings.py").read_text())
    defined = {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name) and target.id.isupper()
    }
    used_within = {
        name.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        for name in ast.walk(node.value)
        if isinstance(name, ast.Name)
    }
    return {
        name
        for name in defined - used_within
        if not hasattr(global_settings, name) and not name.startswith("CELERY_") and name not in LIBRARY_SETTINGS
    }


def test_every_platform_setting_is_read():
    # Read by the running platform: tests that set a knob don't count as its reader.
    sources = "\n".join(
        path.read_text()
        for path in python_files(*PACKAGES, "scripts")
        if path not in SETTINGS_FILES and "tests" not in path.parts
    )
    names = platform_settings()
    assert "DEVICE_TOKEN_CACHE_TTL_SECONDS" in names  # the scan sees the platform's own settings
    unread = sorted(name for name in names if not re.search(rf"\bsettings\.{name}\b", sources))
    assert not unread, f"defined in iot/settings.py but read by nothing (remove them, and from .env.example): {unread}"
