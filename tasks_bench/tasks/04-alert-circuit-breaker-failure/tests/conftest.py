"""The grader's live platform. Fixtures only.

A platform of the grader's own (web x2 + worker with 2 processes, no MQTT), in a Redis namespace inside
the run's `REDIS_KEY_PREFIX`, with the limits of a test: webhooks to the loopback allowed (the graders'
receiver runs in the test process), 1 s connect and read timeouts, a breaker that opens after 3
consecutive failures for 5 s and then lets 1 probe through, retries after 0.5-2 s.
"""

import pytest
from django.conf import settings

from iot.testing.live import UNLIMITED, dedicated_platform
from iot.testing.redis import redis_prefix_new

ENV = {
    **UNLIMITED,
    "WORKER_CONCURRENCY": "2",
    "ALERT_WEBHOOK_ALLOW_PRIVATE": "1",
    "WEBHOOK_CONNECT_TIMEOUT_SECONDS": "1",
    "WEBHOOK_READ_TIMEOUT_SECONDS": "1",
    "CIRCUIT_BREAKER_FAILURE_THRESHOLD": "3",
    "CIRCUIT_BREAKER_TIMEOUT_SECONDS": "5",
    "CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS": "1",
    "CIRCUIT_BREAKER_PROBE_LEASE_SECONDS": "5",
    "ALERT_NOTIFICATION_LEASE_SECONDS": "5",
    "ALERT_NOTIFICATION_RETRY_BASE_SECONDS": "0.5",
    "ALERT_NOTIFICATION_RETRY_MAX_SECONDS": "2",
}


@pytest.fixture(scope="session")
def platform(django_db_setup, django_db_blocker, platform_logs):
    env = {**ENV, "REDIS_KEY_PREFIX": redis_prefix_new(settings.REDIS_KEY_PREFIX, "grader")}
    with dedicated_platform(django_db_blocker, platform_logs, name="grader", env=env) as running:
        yield running
