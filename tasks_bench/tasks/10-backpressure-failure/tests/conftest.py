"""The grader's live platform: what `api` (the root conftest's operator client) talks to. Fixtures only.

A platform of the grader's own (web x2, no MQTT) with a small event queue: at most 1 000 points, 429 from
800, 503 from 950 (the production 10 000 / 8 000 / 9 500 scaled down ten times, so a test fills it in a
second) and no rate limit. It starts without a worker: no consumer drains the queue unless a test starts
one (`consumers` in test_grader.py), so the queue fills exactly as fast as the test publishes. Redis
namespace inside the run's `REDIS_KEY_PREFIX`.
"""

import pytest
from django.conf import settings

from iot.testing.live import UNLIMITED, dedicated_platform
from iot.testing.redis import redis_prefix_new

QUEUE = {"EVENT_QUEUE_MAX_SIZE": "1000", "BACKPRESSURE_QUEUE_THRESHOLD": "800", "BACKPRESSURE_REJECT_THRESHOLD": "950"}


@pytest.fixture(scope="session")
def platform(django_db_setup, django_db_blocker, platform_logs):
    env = {**UNLIMITED, **QUEUE, "REDIS_KEY_PREFIX": redis_prefix_new(settings.REDIS_KEY_PREFIX, "grader")}
    with dedicated_platform(django_db_blocker, platform_logs, name="grader", env=env, worker=False) as running:
        yield running
