"""The grader's live platform. Fixtures only.

A platform of the grader's own (web x2 + worker, no MQTT) with the rate limits and queue thresholds out
of the way (50 devices send batches at once), in a Redis namespace inside the run's `REDIS_KEY_PREFIX`.
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
