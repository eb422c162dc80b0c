"""The grader's live platform. Fixtures only.

A platform of the grader's own (web x2 + worker, no MQTT), in a Redis namespace inside the run's
`REDIS_KEY_PREFIX`. A device that reports nothing counts as silent after 15 s instead of 10 minutes, and
the saga sweeper looks every second, so a silent device's update ends within the test's patience.
"""

import pytest
from django.conf import settings

from iot.testing.live import UNLIMITED, dedicated_platform
from iot.testing.redis import redis_prefix_new

ENV = {
    **UNLIMITED,
    "FIRMWARE_DEVICE_TIMEOUT_SECONDS": "15",
    "SAGA_SWEEP_INTERVAL_SECONDS": "1",
}


@pytest.fixture(scope="session")
def platform(django_db_setup, django_db_blocker, platform_logs):
    env = {**ENV, "REDIS_KEY_PREFIX": redis_prefix_new(settings.REDIS_KEY_PREFIX, "grader")}
    with dedicated_platform(django_db_blocker, platform_logs, name="grader", env=env) as running:
        yield running
