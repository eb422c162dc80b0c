"""Settings for the test suite: the real settings, plus an isolated Redis key prefix."""

import os

os.environ.setdefault("DJANGO_SECRET_KEY", "test-only-secret-key-not-for-production")
os.environ.setdefault("REDIS_KEY_PREFIX", "iottest")

from iot.settings import *  # noqa: E402,F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
