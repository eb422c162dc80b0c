"""The graders' live platforms. Fixtures only.

`platform` (what the root conftest's `api` talks to) runs with the production limits the task states:
100 points per device per 60 s window, 10 000 points per second across the fleet. `short_window` is a
second platform whose device window is 2 s and whose global limit is 150 points per second, for the
window reset and the global limit (no 61 s sleep). Both are web x2 + worker, no MQTT, in Redis
namespaces inside the run's `REDIS_KEY_PREFIX`, with a queue large enough never to refuse anything.
"""

import pytest
from django.conf import settings

from iot.testing.live import UNLIMITED, dedicated_platform
from iot.testing.processes import http_client
from iot.testing.redis import redis_prefix_new

QUEUE = {name: value for name, value in UNLIMITED.items() if not name.startswith("RATE_LIMIT_")}


@pytest.fixture(scope="session")
def platform(django_db_setup, django_db_blocker, platform_logs):
    env = {
        **QUEUE,
        "RATE_LIMIT_TELEMETRY_PER_DEVICE": "100",
        "RATE_LIMIT_WINDOW_SECONDS": "60",
        "RATE_LIMIT_GLOBAL_PER_SECOND": "10000",
        "REDIS_KEY_PREFIX": redis_prefix_new(settings.REDIS_KEY_PREFIX, "grader"),
    }
    with dedicated_platform(django_db_blocker, platform_logs, name="grader", env=env) as running:
        yield running


@pytest.fixture(scope="module")
def short_window(django_db_setup, django_db_blocker, platform_logs, operator_token):
    """An operator client of a platform with a 2 s device window and a global limit of 150 points/s."""
    env = {
        **QUEUE,
        "RATE_LIMIT_TELEMETRY_PER_DEVICE": "100",
        "RATE_LIMIT_WINDOW_SECONDS": "2",
        "RATE_LIMIT_GLOBAL_PER_SECOND": "150",
        "REDIS_KEY_PREFIX": redis_prefix_new(settings.REDIS_KEY_PREFIX, "window"),
    }
    with (
        dedicated_platform(django_db_blocker, platform_logs, name="window", env=env, worker=False) as running,
        http_client(running, operator_token) as client,
    ):
        yield client
