"""The grader's live platform: what `api` (the root conftest's operator client) talks to. Fixtures only.

A platform of the grader's own (web x2 + worker, no MQTT), in a Redis namespace inside the run's
`REDIS_KEY_PREFIX`, so two benchmark runs never share a key.
"""

import pytest
from django.conf import settings

from iot.testing.live import UNLIMITED, dedicated_platform
from iot.testing.redis import redis_prefix_new


@pytest.fixture(scope="session")
def platform(django_db_setup, django_db_blocker, platform_logs):
    env = {**UNLIMITED, "REDIS_KEY_PREFIX": redis_prefix_new(settings.REDIS_KEY_PREFIX, "grader")}
    with dedicated_platform(django_db_blocker, platform_logs, name="grader", env=env) as running:
        yield running
