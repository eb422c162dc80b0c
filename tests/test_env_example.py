"""`.env.example` is meant to be copied to `.env`: every line must parse and load the settings."""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import os, environ
environ.Env.read_env(".env.example", overwrite=True)
os.environ["DJANGO_SECRET_KEY"] = "env-example-check"
os.environ["DJANGO_SETTINGS_MODULE"] = "iot.settings"
from django.conf import settings
assert settings.REDIS_SOCKET_TIMEOUT == 5.0, settings.REDIS_SOCKET_TIMEOUT
assert settings.WEB_THREADS == 16 and settings.DEVICE_TOKEN_CACHE_TTL_SECONDS == 3600
assert settings.DATABASES["default"]["OPTIONS"]["pool"]["timeout"] == 1.0
print("ok")
"""


def test_env_example_loads_as_a_dotenv_file():
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
